"""The paper's Figures 3 and 4 from one trained run, without training again: a table (Markdown and CSV) and a plot
(PNG) each.

    python extras/figures.py fig3 --run R                    # Select then Generate vs Random vs Not Select
    python extras/figures.py fig4 --run R --steps 0,50,100   # the metrics after that many DPO steps, on Test

fig3: R's own Test results are the PAL bar; Random and Not Select are pal.py runs with `--from R` (inference only,
R's model: R/figures/fig3/random, R/figures/fig3/not_select), so the three differ only in how the persona sentence
is chosen. fig4: each step's DPO checkpoint (R/dpo/ckpt/step-N, kept by training R with `--keep-steps`; step 0 is
the SFT model DPO starts from) generates on Test with R's settings and is scored with R's metrics
(R/figures/fig4/step-N). Both skip what is already done, so a second call only redraws. Outputs: R/figures/fig3.md,
.csv, .png and fig4.md, .csv, .png. matplotlib is needed for the PNG only (imported when the plot is drawn).
"""
import argparse
import csv
import dataclasses
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dpo  # noqa: E402
import pal  # noqa: E402
from infra.ckpt import ckpt_name  # noqa: E402
from infra.options import flag  # noqa: E402
from infra.files import atomic_path, read_json, write_json, write_jsonl, write_text  # noqa: E402

# the paper's metrics, as the figures label them: (label, key in results.json)
METRICS = [("BLEU-1", "bleu1"), ("BLEU-2", "bleu2"), ("ROUGE-L", "rouge_l"), ("Entropy", "entropy"),
           ("C.score", "c_score")]
FIG3_ROWS = [("PAL (Select then Generate)", None), ("Random", "random"), ("Not Select", "not_select")]


def finished_run(run: Path) -> pal.RunConfig:
    """R's settings; R must have finished training (its results.json is the PAL bar and proves it)."""
    if not (run / "run.json").exists():
        raise FileNotFoundError(f"{run / 'run.json'} does not exist: no run there (check --run)")
    if not (run / "results.json").exists():
        raise FileNotFoundError(f"{run / 'results.json'} does not exist: finish the run first (pal.py all --run-dir "
                                f"{run}, or the same train.sh command again)")
    return pal.load_run_config(run, {})


# ---- tables and plots --------------------------------------------------------------------------------------------

def cell(value) -> str:
    return "n/a" if value is None else f"{value:.2f}" if not isinstance(value, str) else value


def write_table(out: Path, first: str, rows: list[tuple[str, dict]]) -> str:
    """out.md and out.csv: one row per (name, results), the paper's metrics as columns (C.score n/a without
    --nli). Returns the Markdown."""
    head = [first] + [label for label, _ in METRICS]
    md = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(METRICS)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    for name, res in rows:
        md.append(f"| {name} | " + " | ".join(cell(res.get(k)) for _, k in METRICS) + " |")
        w.writerow([name] + ["" if res.get(k) is None else f"{res[k]:.4f}" for _, k in METRICS])
    write_text(out.with_suffix(".md"), "\n".join(md) + "\n")
    write_text(out.with_suffix(".csv"), buf.getvalue())
    return "\n".join(md)


def pyplot():
    """matplotlib's pyplot without a display, or None (then no PNG, said once)."""
    try:
        import matplotlib
    except ImportError:
        print("figures: matplotlib is not installed: tables only (pip install matplotlib for the PNG)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_png(fig, plt, out: Path) -> Path:
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_bars(out: Path, title: str, rows: list[tuple[str, dict]]) -> Path | None:
    """One panel per metric (a metric without values, C.score without --nli, is left out), one bar per row."""
    plt = pyplot()
    metrics = [(label, k) for label, k in METRICS if any(res.get(k) is not None for _, res in rows)]
    if plt is None or not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(3 * len(metrics), 3.2), squeeze=False,
                             constrained_layout=True)  # room for the labels and the title, no overlaps
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    for ax, (label, k) in zip(axes[0], metrics):
        values = [res.get(k) or 0.0 for _, res in rows]
        ax.bar(range(len(rows)), values, color=colors[:len(rows)])
        ax.set_xticks(range(len(rows)), [name.split(" (")[0] for name, _ in rows], rotation=20)
        ax.set_ylabel(label)
    fig.suptitle(title)
    return save_png(fig, plt, out)


def plot_lines(out: Path, title: str, steps: list[int], results: list[dict]) -> Path | None:
    """One panel per metric against the number of DPO steps."""
    plt = pyplot()
    metrics = [(label, k) for label, k in METRICS if any(res.get(k) is not None for res in results)]
    if plt is None or not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(3 * len(metrics), 3.2), squeeze=False,
                             constrained_layout=True)  # room for the labels and the title, no overlaps
    for ax, (label, k) in zip(axes[0], metrics):
        ax.plot(steps, [res.get(k) for res in results], marker="o")
        ax.set_xlabel("DPO steps")
        ax.set_ylabel(label)
    fig.suptitle(title)
    return save_png(fig, plt, out)


# ---- Figure 3 ----------------------------------------------------------------------------------------------------

def inference_run(run: Path, cfg: pal.RunConfig, variant: str, out: Path) -> dict:
    """pal.py all --run-dir OUT --from RUN --variant VARIANT with RUN's other settings: predict and evaluate only.
    Returns OUT's results.json."""
    fields = {**dataclasses.asdict(cfg), "variant": variant, "from_run": str(run), "strategy": None,
              "keep_steps": None}
    argv = ["all", "--run-dir", str(out)]
    for name, value in fields.items():  # pal.py's own command line: its checks and defaults, as a user's call
        if value is not None:
            argv += [flag(name), str(value)]
    pal.main(argv)  # an error exits with pal.py's one line
    return read_json(out / "results.json")


def fig3(run: Path) -> str:
    cfg = finished_run(run)
    if cfg.switches()["strategy"] != "select":
        raise ValueError(f"--run {run}: variant {cfg.variant} does not Select then Generate; Figure 3 compares a "
                         "PAL run's selection with Random and Not Select")
    rows = []
    for name, variant in FIG3_ROWS:
        res = read_json(run / "results.json") if variant is None else \
            inference_run(run, cfg, variant, run / "figures" / "fig3" / variant)
        rows.append((name, res))
    out = run / "figures" / "fig3"
    md = write_table(out, "Inference", rows)
    png = plot_bars(out.with_suffix(".png"), f"Figure 3: persona selection at inference ({Path(cfg.model).name})",
                    rows)
    return md + f"\n\nwritten: {out}.md, {out}.csv" + (f", {png}" if png else "")


# ---- Figure 4 ----------------------------------------------------------------------------------------------------

def kept_steps(run: Path) -> list[int]:
    return sorted(int(d.name.split("-")[1]) for d in (run / "dpo" / "ckpt").glob("step-*") if d.is_dir())


def step_model(cfg: pal.RunConfig, run: Path, step: int):
    """The policy after `step` DPO steps: the SFT model for 0, else the DPO policy (pal.trainable_model: fresh
    LoRA on the SFT weights, or every weight) with the checkpoint's trained tensors loaded."""
    if step == 0:
        return pal.generation_model(cfg, pal.sft_weights(cfg, run))
    model = pal.trainable_model(cfg, pal.sft_weights(cfg, run), "dpo")
    dpo.load_trainable(model, run / "dpo" / ckpt_name(step))
    return model.eval()


def score_step(cfg: pal.RunConfig, run: Path, step: int, splits: dict, lang: str, tok, nli_model) -> dict:
    out = run / "figures" / "fig4" / f"step-{step:06d}"
    if (out / "results.json").exists():
        return read_json(out / "results.json")
    model = step_model(cfg, run, step)
    context = pal.prompt_context(cfg, model, tok, splits, lang)
    rows = pal.select_then_generate(model, tok, splits["test"], lang, desc=f"step {step}", **pal.decoding(cfg),
                                    **context)
    res = {**pal.score_generations(rows, lang, nli_model), "step": step}
    write_jsonl(out / "generations.jsonl", rows)
    write_json(out / "results.json", res)
    return res


def fig4(run: Path, steps: list[int]) -> str:
    cfg = finished_run(run)
    if cfg.switches()["align"] != "dpo":
        raise ValueError(f"--run {run}: variant {cfg.variant} has no DPO stage to sweep")
    missing = [s for s in steps if s and not (run / "dpo" / ckpt_name(s)).is_dir()]
    if missing:
        raise FileNotFoundError(f"--steps: no checkpoint for step(s) {missing} in {run / 'dpo' / 'ckpt'} (kept: "
                                f"{kept_steps(run) or 'none'}); train with --keep-steps {','.join(map(str, steps))}")
    splits, lang = pal.run_data(cfg)
    tok = pal.load_tokenizer(cfg.model)
    nli_model = pal.load_nli(cfg.nli)
    results = [score_step(cfg, run, s, splits, lang, tok, nli_model) for s in steps]
    out = run / "figures" / "fig4"
    md = write_table(out, "DPO steps", [(str(s), r) for s, r in zip(steps, results)])
    png = plot_lines(out.with_suffix(".png"), f"Figure 4: metrics against DPO steps ({Path(cfg.model).name})",
                     steps, results)
    return md + f"\n\nwritten: {out}.md, {out}.csv" + (f", {png}" if png else "")


def parse_steps(text: str) -> list[int]:
    parts = text.split(",")
    if not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--steps {text}: expected step numbers separated by commas (0: the SFT model)")
    return sorted({int(p) for p in parts})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="figure", required=True)
    f3 = sub.add_parser("fig3", help="PAL vs Random vs Not Select from one trained run (the paper's Figure 3)")
    f3.add_argument("--run", required=True, help="a finished PAL run directory")
    f4 = sub.add_parser("fig4", help="the metrics after chosen numbers of DPO steps (the paper's Figure 4)")
    f4.add_argument("--run", required=True, help="a finished run trained with --keep-steps")
    f4.add_argument("--steps", required=True, help="comma-separated DPO steps, e.g. 0,50,100,150 (0: SFT model)")
    args = ap.parse_args(argv)
    try:
        print(fig3(Path(args.run)) if args.figure == "fig3" else fig4(Path(args.run), parse_steps(args.steps)))
    except (OSError, ValueError) as e:
        sys.exit(f"extras/figures.py {args.figure}: error: {e}")


if __name__ == "__main__":
    main()
