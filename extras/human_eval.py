"""The human evaluation of the paper's Table 4: blind sheets for annotators, then their scores unblinded with Fleiss'
kappa.

    python extras/human_eval.py sheets --runs R1 R2 R3 --out EVAL [--n 100] [--annotators 2] [--seed 0]
    (the annotators fill EVAL/sheet-1.csv, EVAL/sheet-2.csv, ...: every fluency / coherence / consistency cell 1-3)
    python extras/human_eval.py score --dir EVAL

`sheets` draws --n Test examples (seeded) that every run answered, takes each run's reply to each of them, shuffles
all these (example, system) items together and numbers them: a sheet shows an item's persona, history and reply,
never which system wrote it. Every annotator gets the same items in the same order (Fleiss' kappa compares their
scores item by item). EVAL/key.json (keep it from the annotators) maps each item back to its system and example.
`score` checks every sheet (each item once, each cell 1, 2 or 3; every bad cell is named by file, row and column,
and the exit status is non-zero), unblinds, and prints the Table 4 layout: each system's mean per criterion over all
items and annotators, and Fleiss' kappa per criterion (EVAL/table4.md).
"""
import argparse
import csv
import io
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.files import read_json, read_jsonl, write_json, write_text  # noqa: E402

CRITERIA = [("fluency", "Fluency"), ("coherence", "Coherence"), ("consistency", "Persona Consistency")]
COLUMNS = ["item", "persona", "history", "reply"] + [c for c, _ in CRITERIA]
SCORES = ("1", "2", "3")


def fleiss_kappa(counts: list[list[int]]) -> float | None:
    """Fleiss' kappa (Fleiss 1971) of counts[i][j] = how many raters put item i in category j, every item rated by
    the same number n >= 2 of raters:
        P_i = (sum_j counts[i][j]^2 - n) / (n (n - 1))     agreement on item i
        p_j = sum_i counts[i][j] / (N n)                    share of all ratings in category j
        kappa = (mean_i P_i - sum_j p_j^2) / (1 - sum_j p_j^2)
    None when chance agreement is 1 (every rating in one category: kappa is undefined)."""
    n = sum(counts[0])
    if n < 2 or any(sum(row) != n for row in counts):
        raise ValueError(f"Fleiss' kappa needs the same number (>= 2) of ratings per item, got "
                         f"{[sum(r) for r in counts]}")
    N = len(counts)
    p_bar = sum((sum(c * c for c in row) - n) / (n * (n - 1)) for row in counts) / N
    p_e = sum((sum(row[j] for row in counts) / (N * n)) ** 2 for j in range(len(counts[0])))
    return None if p_e == 1 else (p_bar - p_e) / (1 - p_e)


# ---- sheets ------------------------------------------------------------------------------------------------------

def system_name(run: Path) -> str:
    """The run's row as the paper names it (model and method, from results.json), else its directory name."""
    res = run / "results.json"
    if res.exists():
        from pal import row_name  # the core's naming of a row; imported only here
        r = read_json(res)
        return f"{Path(str(r.get('model'))).name} {row_name(r)}"
    return run.name


def load_generations(runs: list[Path]) -> list[list[dict]]:
    """Each run's Test generations; they must answer the same examples in the same order (same history and gold)."""
    gens = []
    for run in runs:
        path = run / "generations.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run predict first (pal.py all --run-dir {run})")
        gens.append(read_jsonl(path))
    for run, rows in zip(runs[1:], gens[1:]):
        if len(rows) != len(gens[0]):
            raise ValueError(f"{run}: {len(rows)} generations, {runs[0]} has {len(gens[0])}: not the same Test set")
        for i, (a, b) in enumerate(zip(gens[0], rows)):
            if (a["history"], a["gold"]) != (b["history"], b["gold"]):
                raise ValueError(f"{run / 'generations.jsonl'}: row {i + 1} answers another example than "
                                 f"{runs[0] / 'generations.jsonl'} row {i + 1}: not the same Test set")
    return gens


def make_sheets(runs: list[Path], out: Path, n: int = 100, annotators: int = 2, seed: int = 0,
                names: list[str] | None = None) -> Path:
    names = names or [system_name(r) for r in runs]
    if len(set(names)) != len(names):
        names = [str(r) for r in runs]  # two runs of one row: their directories tell them apart
    gens = load_generations(runs)
    if n > len(gens[0]):
        raise ValueError(f"--n {n}: the runs have only {len(gens[0])} Test examples")
    rng = random.Random(seed)
    examples = sorted(rng.sample(range(len(gens[0])), n))
    items = [(s, i) for i in examples for s in range(len(runs))]
    rng.shuffle(items)  # systems and examples interleaved: position tells nothing
    key = {f"item-{k + 1:04d}": {"system": names[s], "run": str(runs[s]), "example": i}
           for k, (s, i) in enumerate(items)}
    sheet_rows = []
    for k, (s, i) in enumerate(items):
        row = gens[s][i]
        sheet_rows.append([f"item-{k + 1:04d}", "\n".join(row["personas"]), "\n".join(row["history"]),
                           row["response"], "", "", ""])
    sheets = [f"sheet-{a + 1}.csv" for a in range(annotators)]
    for name in sheets:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(COLUMNS)
        w.writerows(sheet_rows)
        write_text(out / name, buf.getvalue())
    write_json(out / "key.json", {"systems": names, "n": n, "seed": seed, "sheets": sheets, "items": key})
    return out


# ---- score -------------------------------------------------------------------------------------------------------

def read_sheet(path: Path, items: dict) -> tuple[dict[str, dict[str, int]], list[str]]:
    """{item: {criterion: score}} of a filled sheet, and a line per problem (row numbers as a spreadsheet shows
    them: the header is row 1)."""
    problems, scores = [], {}
    if not path.exists():
        return {}, [f"{path}: missing"]
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"))))
    if not rows or rows[0][:len(COLUMNS)] != COLUMNS:
        return {}, [f"{path}: row 1: expected the columns {','.join(COLUMNS)}"]
    for r, row in enumerate(rows[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        item = row[0].strip()
        if item not in items:
            problems.append(f"{path}: row {r}: unknown item {item!r}")
            continue
        if item in scores:
            problems.append(f"{path}: row {r}: {item} appears twice")
            continue
        scores[item] = {}
        for c, (crit, _) in enumerate(CRITERIA, 4):
            cell = row[c].strip() if c < len(row) else ""
            if cell not in SCORES:
                problems.append(f"{path}: row {r} ({item}), column {crit}: {cell!r} is not 1, 2 or 3")
            else:
                scores[item][crit] = int(cell)
    problems += [f"{path}: {item} is missing (no row)" for item in items if item not in scores]
    return scores, problems


def score(eval_dir: Path) -> str:
    """Check the sheets, unblind, and return the Table 4 layout (also written to EVAL/table4.md)."""
    key = read_json(eval_dir / "key.json")
    items = key["items"]
    sheets, problems = [], []
    for name in key["sheets"]:
        s, p = read_sheet(eval_dir / name, items)
        sheets.append(s)
        problems += p
    if problems:  # every problem up to 30, then how many more
        more = f"\n... and {len(problems) - 30} more" if len(problems) > 30 else ""
        raise ValueError("\n".join(problems[:30]) + more + f"\n{len(problems)} problem(s); fix the sheets and run "
                         "score again")
    head = "| System | " + " | ".join(label for _, label in CRITERIA) + " |"
    lines = [head, "|---|" + "---:|" * len(CRITERIA)]
    for system in key["systems"]:
        mine = [i for i, v in items.items() if v["system"] == system]
        means = [sum(s[i][c] for s in sheets for i in mine) / (len(mine) * len(sheets)) for c, _ in CRITERIA]
        lines.append(f"| {system} | " + " | ".join(f"{m:.2f}" for m in means) + " |")
    # per criterion: counts[item][score - 1] = how many annotators gave the item that score
    kappas = [fleiss_kappa([[sum(s[i][c] == v for s in sheets) for v in (1, 2, 3)] for i in items])
              for c, _ in CRITERIA]
    lines.append("| Fleiss' kappa | " + " | ".join("n/a" if k is None else f"{k:.2f}" for k in kappas) + " |")
    table = (f"Human evaluation (the paper's Table 4): {key['n']} Test examples, {len(sheets)} annotators, "
             "scores 1-3\n\n" + "\n".join(lines))
    write_text(eval_dir / "table4.md", table + "\n")
    return table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sh = sub.add_parser("sheets", help="blind annotation sheets from several runs' Test generations")
    sh.add_argument("--runs", nargs="+", required=True, help="run directories (each with generations.jsonl)")
    sh.add_argument("--names", nargs="+", default=None, help="system names in the key (default: model and row)")
    sh.add_argument("--out", required=True, help="directory for sheet-*.csv and key.json")
    sh.add_argument("--n", type=int, default=100, help="Test examples (the paper: 100)")
    sh.add_argument("--annotators", type=int, default=2, help="sheets, one per annotator (the paper: 2)")
    sh.add_argument("--seed", type=int, default=0)
    sc = sub.add_parser("score", help="check the filled sheets, unblind, print Table 4 with Fleiss' kappa")
    sc.add_argument("--dir", required=True, help="the directory `sheets` wrote")
    args = ap.parse_args(argv)
    try:
        if args.command == "sheets":
            if args.names and len(args.names) != len(args.runs):
                raise ValueError(f"--names: {len(args.names)} names for {len(args.runs)} runs")
            if args.n < 1 or args.annotators < 2:
                raise ValueError("--n must be >= 1 and --annotators >= 2 (kappa compares annotators)")
            out = make_sheets([Path(r) for r in args.runs], Path(args.out), args.n, args.annotators, args.seed,
                              args.names)
            print(f"wrote {args.annotators} sheets of {args.n * len(args.runs)} items to {out} (key.json: keep it "
                  "from the annotators)")
        else:
            print(score(Path(args.dir)))
    except (OSError, ValueError) as e:
        sys.exit(f"extras/human_eval.py {args.command}: error: {e}")


if __name__ == "__main__":
    main()
