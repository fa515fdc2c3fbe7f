"""The layout the README promises: the five core files read the paper; infra/ holds the machinery they call and imports
no core file; extras/ imports the core and is imported by no core or infra file; a core file imports only files
below it (pal -> dpo / nli -> data / model), and no core file does file-system, hub, lock or process-group work
itself."""
import ast

import pytest

from conftest import ROOT

CORE = ["model", "data", "dpo", "nli", "pal"]
BELOW = {"model": set(), "data": set(), "dpo": {"data", "model"}, "nli": {"data", "model"},
         "pal": {"data", "dpo", "model", "nli"}}
INFRA = sorted(p.stem for p in (ROOT / "infra").glob("*.py") if p.stem != "__init__")
# Modules and calls that belong to infra/: locks, hub downloads, process groups, unpickling, raw renames.
MACHINERY_MODULES = {"fcntl", "huggingface_hub", "torch.distributed", "pickle", "zipfile", "socket", "datetime"}
MACHINERY_CALLS = {"os.replace", "os.rename", "torch.load", "init_process_group", "snapshot_download", "flock",
                   "all_reduce", "broadcast", "all_gather_object", "barrier"}


def imports(path) -> set[str]:
    """Top-level names of every module `path` imports ("infra.files" -> "infra", "torch.distributed" kept whole)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module)
    return found


def roots(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


@pytest.mark.parametrize("name", INFRA)
def test_infra_imports_no_core_and_no_extras_file(name):
    used = roots(imports(ROOT / "infra" / f"{name}.py"))
    assert not used & (set(CORE) | {"extras"}), f"infra/{name}.py imports {sorted(used & set(CORE + ['extras']))}"


@pytest.mark.parametrize("name", CORE)
def test_core_imports_only_files_below_it_and_never_extras(name):
    used = roots(imports(ROOT / f"{name}.py"))
    assert "extras" not in used
    assert used & set(CORE) <= BELOW[name], f"{name}.py imports {sorted(used & set(CORE) - BELOW[name])}"


def test_every_infra_module_is_used_by_the_core():
    used = set().union(*(imports(ROOT / f"{name}.py") for name in CORE))
    used_infra = {n.split(".")[1] for n in used if n.startswith("infra.")} | {
        a for name in CORE for node in ast.walk(ast.parse((ROOT / f"{name}.py").read_text()))
        if isinstance(node, ast.ImportFrom) and node.module == "infra" for a in (x.name for x in node.names)}
    # a module the core does not reach directly must be reached through another infra module the core uses
    reached = set(used_infra)
    for name in INFRA:
        if name in used_infra:
            reached |= {n.split(".")[1] for n in imports(ROOT / "infra" / f"{name}.py") if n.startswith("infra.")}
    assert set(INFRA) <= reached, f"infra modules no core file uses: {sorted(set(INFRA) - reached)}"


@pytest.mark.parametrize("name", CORE)
def test_core_files_leave_files_hub_locks_and_process_groups_to_infra(name):
    """No machinery module is imported, and no machinery call is made but through infra (infra.dist.barrier(), or a
    name imported from infra, is how the core asks for one)."""
    tree = ast.parse((ROOT / f"{name}.py").read_text(encoding="utf-8"))
    assert not imports(ROOT / f"{name}.py") & MACHINERY_MODULES
    from_infra = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                  and (node.module or "").startswith("infra") for a in node.names}
    own = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f, text = node.func, ast.unparse(node.func)
            leaf = f.attr if isinstance(f, ast.Attribute) else text
            if (text in MACHINERY_CALLS or leaf in MACHINERY_CALLS) and not (
                    text.startswith("infra.") or text.split(".")[0] in from_infra):
                own.add(text)
    assert not own, f"{name}.py calls {sorted(own)} itself"


def test_extras_are_imported_by_no_core_or_infra_file():
    for path in [ROOT / f"{name}.py" for name in CORE] + list((ROOT / "infra").glob("*.py")):
        assert "extras" not in roots(imports(path)), path


def test_no_test_file_imports_another():
    """Helpers and fixtures that several test files share live in tests/conftest.py."""
    for path in (ROOT / "tests").rglob("test_*.py"):
        assert not {n for n in imports(path) if n.split(".")[0].startswith("test_")}, path
