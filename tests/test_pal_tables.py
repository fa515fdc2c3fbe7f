"""pal.py table: the paper's numbers kept in docs/paper_tables.csv (checked against the paper's tables as printed),
the t-test behind the paper's `*` (against scipy), runs that differ only by seed grouped into mean ± std, the
metric conventions of results.json, and `--paper` beside each row."""
import json
import math
import re
from pathlib import Path

import pytest
from conftest import ROOT, shared_file

import pal

stats = pytest.importorskip("scipy.stats", reason="scipy is the t-test's reference (requirements-test.txt)")
special = pytest.importorskip("scipy.special")

KEYS = ["bleu1", "bleu2", "rouge_l", "entropy", "c_score"]


# ---- the paper's numbers

def printed_tables() -> dict:
    """{(table, persona, model, row): [the five numbers as printed, marks removed]} read from the paper's tables
    (../shared/paper/tables.md): rows of Tables 2, 3 and 5 that are not other people's methods."""
    rows = {"(base model, zero-shot)": "zero_shot", "+Few-Shot": "few_shot", "+FineTuning": "ft",
            "+Prompting": "prompting", "+PAL(ours)": "pal", "PAL": "pal", "w/o Mix": "wo_mix", "w/o PA": "wo_pa",
            "only DG": "only_dg", "only PS": "only_ps", "w/o PC": "wo_pc"}
    out = {}
    for section in shared_file("paper/tables.md").read_text(encoding="utf-8").split("\n## ")[1:]:
        table = re.match(r"Table (\d)", section)
        if not table or table.group(1) not in "235":
            continue
        t = table.group(1)
        for line in section.splitlines():
            cells = [c.strip().rstrip("*†").rstrip("*") for c in line.strip().strip("|").split("|")]
            if not line.startswith("|") or cells[0] in ("model", "row") or set(cells[0]) <= set("-"):
                continue
            if t == "5":  # GPT-2's five columns, then Llama's
                out[(t, "original", "GPT-2", rows[cells[0]])] = cells[1:6]
                out[(t, "original", "Llama 3.1 8B", rows[cells[0]])] = cells[6:11]
            elif "(external)" not in cells[1]:
                out[(t, "original", cells[0], rows[cells[1]])] = cells[2:7]
                if t == "2":  # the revised personas' column group
                    out[(t, "revised", cells[0], rows[cells[1]])] = cells[7:12]
    return out


def test_the_projects_copy_of_the_papers_numbers_is_the_paper_as_printed():
    printed = printed_tables()
    lines = [ln.split(",") for ln in (ROOT / "docs" / "paper_tables.csv").read_text().splitlines()
             if ln and not ln.startswith("#")]
    assert lines[0] == ["table", "persona", "model", "row"] + KEYS
    ours = {tuple(r[:4]): r[4:] for r in lines[1:]}
    assert len(ours) == len(lines) - 1  # no row twice
    assert ours == printed  # the same rows, the same digits
    assert len(printed) == 44 and printed[("2", "revised", "GPT-2", "pal")] == ["15.94", "7.89", "14.55", "6.75",
                                                                                "0.427"]
    want = dict(zip(KEYS, [9.77, 3.28, 8.85, 6.63, 0.576]))
    assert pal.paper_numbers()[("5", "original", "Llama 3.1 8B", "only_ps")] == want


# ---- the t-test

@pytest.mark.parametrize("a,b", [
    ([17.1, 17.4, 16.9], [16.2, 16.6, 16.4]),  # three runs each, as the paper
    ([0.81, 0.80, 0.83], [0.79, 0.82, 0.80]),
    ([1.0, 2.0], [1.5, 9.0, 3.0, 4.0]),
    ([5.0, 5.1, 5.2, 5.3, 5.4], [5.0, 5.1, 5.2, 5.3, 5.45]),
    ([100.0, 100.001, 100.002], [0.0, 0.001, 0.003]),  # a huge t: p underflows towards 0
])
def test_t_test_is_students_independent_samples_test(a, b):
    want = stats.ttest_ind(a, b, equal_var=True).pvalue
    assert pal.t_test(a, b) == pytest.approx(want, rel=1e-9, abs=1e-300)
    assert pal.t_test(b, a) == pytest.approx(want, rel=1e-9, abs=1e-300)  # two-sided


@pytest.mark.parametrize("a,b,x", [(2.0, 0.5, 0.3), (0.5, 7.0, 0.99), (30.0, 0.5, 0.5), (1.0, 1.0, 0.25),
                                   (2.5, 2.5, 0.999999)])
def test_betainc_is_the_regularized_incomplete_beta(a, b, x):
    assert pal.betainc(a, b, x) == pytest.approx(special.betainc(a, b, x), rel=1e-12)


def test_t_test_edges():
    assert pal.t_test([1.0, 1.0], [1.0, 1.0]) == 1.0 and pal.t_test([2.0, 2.0], [1.0, 1.0]) == 0.0
    with pytest.raises(ValueError, match="two values or more"):
        pal.t_test([1.0], [1.0, 2.0])


# ---- runs in the paper's layouts

def write_run(root: Path, name: str, model="gpt2", variant="pal", seed=1, personas="original", lang="en",
              shift=0.0, default_shift=-1.0, **extra_options) -> str:
    """A results.json as evaluate writes it: the default convention on top and under metrics, the authors' one,
    the run's identity and the options that shaped it (seed excepted)."""
    authors = {"bleu1": 10 + shift, "bleu2": 5 + shift, "rouge_l": 12 + shift, "entropy": 6 + shift / 10,
               "c_score": 0.5 + shift / 100}
    default = {k: v + default_shift for k, v in authors.items()}
    res = {**default, "metrics": {"default": default, "authors": authors}, "variant": variant, "model": model,
           **pal.VARIANTS[variant], "shots": 0, "tune": "weights", "lang": lang, "seed": seed, "personas": personas,
           "dataset": pal.data_name(lang), "options": {"model": model, "personas": personas, **extra_options}}
    d = root / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps(res))
    return str(d)


def table(capsys, *args) -> str:
    capsys.readouterr()
    pal.main(["table", *map(str, args)])
    return capsys.readouterr().out


def data_rows(text: str, name: str) -> list[list[str]]:
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in text.splitlines() if f"| {name} |" in ln]


def test_runs_that_differ_only_by_seed_are_one_row_with_mean_std_and_a_star_where_significant(tmp_path, capsys):
    pal_runs = [write_run(tmp_path, f"pal-seed{s}", seed=s, shift=x) for s, x in ((1, 1.0), (2, 1.2), (3, 1.1))]
    ft_runs = [write_run(tmp_path, f"ft-seed{s}", variant="ft", seed=s, shift=x) for s, x in ((1, 0), (2, .1), (3, 0))]
    other = write_run(tmp_path, "pal-lr", shift=-5.0, dpo_lr=1e-5)  # another option: a row of its own, not a seed
    out = table(capsys, *pal_runs, *ft_runs, other)
    main = out.split("Table 2")[1].split("| Diagnostics")[0]
    (pal_row,), (ft_row,) = data_rows(main, "PAL"), data_rows(main, "+FineTuning")
    values = [9 + x for x in (1.0, 1.2, 1.1)]  # default convention: 10 - 1 + shift
    mean, std = sum(values) / 3, math.sqrt(sum((v - sum(values) / 3) ** 2 for v in values) / 2)
    assert pal_row[2] == f"{mean:.2f} ± {std:.2f}*"  # BLEU-1 of the three seeds; beats +FineTuning, p < 0.05
    assert stats.ttest_ind(values, [9.0, 9.1, 9.0]).pvalue < 0.05
    assert pal_row[-1] == ", ".join(pal_runs) and ft_row[-1] == ", ".join(ft_runs)
    assert "*" not in "".join(ft_row)
    assert data_rows(main, "PAL #2")[0][2:3] + data_rows(main, "PAL #2")[0][-1:] == ["4.00", other]


def test_no_star_without_significance_or_without_seeds(tmp_path, capsys):
    a = [write_run(tmp_path, f"pal-seed{s}", seed=s, shift=x) for s, x in ((1, 1.0), (2, 0.0), (3, 2.0))]
    b = [write_run(tmp_path, f"ft-seed{s}", variant="ft", seed=s, shift=x) for s, x in ((1, 0.5), (2, 1.5), (3, 0.7))]
    assert stats.ttest_ind([1.0, 0.0, 2.0], [0.5, 1.5, 0.7]).pvalue > 0.05
    assert "*" not in table(capsys, *a, *b).split("| Diagnostics")[0]
    single = [write_run(tmp_path, "pal1", shift=9.0), write_run(tmp_path, "ft1", variant="ft")]
    assert "*" not in table(capsys, *single).split("| Diagnostics")[0]  # one run each: nothing to test


def test_table_names_its_convention_and_paper_puts_the_papers_number_and_the_difference_beside_each_row(tmp_path,
                                                                                                        capsys):
    runs = [write_run(tmp_path, "gpt2-pal"), write_run(tmp_path, "gpt2-pal-rev", personas="revised", shift=1.0),
            write_run(tmp_path, "gpt2-wo-pa", variant="wo_pa")]
    plain = table(capsys, *runs)
    assert "metrics: the project's default convention" in plain and "| paper |" not in plain
    assert data_rows(plain.split("Table 5")[0], "PAL")[0][2] == "9.00"  # default convention: 10 - 1
    out = table(capsys, "--paper", *runs)
    t2, t5 = out.split("Table 2")[1].split("Table 5")
    assert "metrics: the paper's convention" in t2 and "metrics: the paper's convention" in t5
    lines = t2.splitlines()
    at = next(i for i, ln in enumerate(lines) if "| PAL |" in ln)
    ours, paper, diff = ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[at:at + 3])
    assert ours[:3] == ["GPT-2", "PAL", "10.00"] and ours[7] == "11.00"  # original, then revised BLEU-1
    assert paper[1] == "paper" and paper[2:12] == ["17.05", "8.77", "16.66", "6.93", "0.811",  # Table 2, original
                                                   "15.94", "7.89", "14.55", "6.75", "0.427"]  # and revised
    assert diff[1] == "ours − paper" and diff[2] == "-7.05" and diff[7] == "-4.94" and diff[6] == "-0.311"
    t5_lines = t5.splitlines()
    at = next(i for i, ln in enumerate(t5_lines) if "| w/o PA |" in ln)
    assert [c.strip() for c in t5_lines[at + 1].strip("|").split("|")][2:7] == ["14.45", "7.86", "16.81", "6.58",
                                                                                "0.521"]


def test_a_model_the_paper_did_not_run_has_no_paper_row_unless_asked(tmp_path, capsys):
    run = write_run(tmp_path, "smol-pal", model="/cache/SmolLM2-135M-Instruct")
    assert "| paper |" not in table(capsys, "--paper", run)
    out = table(capsys, "--paper", "--paper-model", "GPT-2", run)
    assert "compared with the paper's GPT-2 rows: another model" in out and "| paper | 17.05" in out
    with pytest.raises(SystemExit, match="--paper-model 'GPT-3'"):
        pal.main(["table", "--paper", "--paper-model", "GPT-3", run])


def test_chinese_runs_are_table_3_in_the_default_convention_said_so(tmp_path, capsys):
    run = write_run(tmp_path, "zh-pal", model="uer/gpt2-chinese-cluecorpussmall", lang="zh")
    res = json.loads((Path(run) / "results.json").read_text())
    res["metrics"]["authors"] = None  # what evaluate writes for Chinese
    (Path(run) / "results.json").write_text(json.dumps(res))
    out = table(capsys, "--paper", run)
    assert out.startswith("Table 3 (Baidu-Persona-Chat") and "needs jieba" in out
    assert "| paper | 29.48 |" in out and "| GPT-2 | PAL | 9.00 |" in out


def test_an_older_results_json_is_read_in_its_convention_and_refused_in_the_other(tmp_path, capsys):
    d = tmp_path / "old"
    d.mkdir()
    (d / "results.json").write_text(json.dumps({"bleu1": 3.0, "bleu2": 1.0, "rouge_l": 4.0, "entropy": 5.0,
                                                "c_score": None, "variant": "pal", "model": "gpt2"}))
    assert "| GPT-2 | PAL | 3.00 | 1.00 | 4.00 | 5.00 | n/a |" in table(capsys, d)
    with pytest.raises(SystemExit, match="holds the default metric convention only .* delete it and run"):
        pal.main(["table", "--paper", str(d)])


# ---- what evaluate writes, and the option that went

def test_evaluate_writes_both_conventions_named_and_the_runs_identity(tmp_path):
    row = {"response": "i like dogs .", "gold": "I like my dogs", "personas": ["i like dogs ."], "history": ["hi"],
           "dialogue_id": 0, "selected_persona": None, "selection_output": None, "gold_persona": None}
    (tmp_path / "generations.jsonl").write_text(json.dumps(row) + "\n")
    pal.stage_evaluate(pal.RunConfig(model="gpt2", seed=3, personas="revised", variant="wo_pa"), tmp_path)
    res = json.loads((tmp_path / "results.json").read_text())
    # default: lower-cased word/punctuation tokens, reply as hypothesis: i like dogs . vs i like my dogs: 3 of 4
    assert res["metrics"]["default"]["bleu1"] == pytest.approx(75.0) == res["bleu1"]
    # the authors': whitespace tokens, case kept, the gold in the hypothesis' place: I like my dogs vs i like dogs .
    # -> "like", "dogs" of 4 gold tokens (pycocoevalcap's smoothing aside)
    assert res["metrics"]["authors"]["bleu1"] == pytest.approx(50.0, rel=1e-6)
    assert (res["seed"], res["personas"], res["dataset"], res["variant"]) == (3, "revised", "PERSONA-CHAT", "wo_pa")
    assert "seed" not in res["options"] and res["options"]["personas"] == "revised"


def test_metrics_compat_is_gone_from_the_command_line_and_older_runs_still_load(tmp_path, capsys):
    with pytest.raises(SystemExit):
        pal.main(["evaluate", "--run-dir", str(tmp_path), "--metrics-compat", "authors"])
    assert "unrecognized arguments: --metrics-compat" in capsys.readouterr().err
    (tmp_path / "run.json").write_text(json.dumps({"model": "gpt2", "metrics_compat": "authors"}))
    assert pal.load_run_config(tmp_path, {}).model == "gpt2"
