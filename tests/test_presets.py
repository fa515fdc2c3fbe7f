"""The GPU presets' resolved settings against docs/schedules.md's table (issue 11): `PAL_DRY_RUN=1 bash train.sh P`
prints the command a preset would run; global batches, DPO length and intervals are computed from it the way
pal.py does (batch x accumulation x ranks) and compared with the table's numbers."""
import os
import re
import subprocess

import pytest

from conftest import ROOT

PRESETS = ["gpt2", "dialogpt", "gpt2-zh", "llama"]


def schedule_table() -> dict[str, dict[str, float]]:
    """{setting: {preset: number}} from the table of docs/schedules.md (its header row starts with "| setting |")."""
    lines = (ROOT / "docs" / "schedules.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| setting |"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    table = {}
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[cells[0]] = {p: float(cells[header.index(p)]) for p in PRESETS}
    return table


def resolved(preset: str) -> dict[str, float]:
    env = {**os.environ, "PAL_DRY_RUN": "1"}
    out = subprocess.run(["bash", "train.sh", preset, "--data-dir", "DATA", "--nli", "NLI"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    flags = dict(re.findall(r"--([\w-]+) (?!--)(\S+)", out))
    ranks = int(flags.get("nproc_per_node", 1))
    per_rank = int(flags["batch-size"]) * ranks
    return {"SFT learning rate": float(flags["sft-lr"]), "SFT warmup steps": float(flags["sft-warmup"]),
            "SFT epochs": float(flags["sft-epochs"]),
            "SFT global batch": per_rank * int(flags.get("grad-accum", 1)),
            "DPO beta": float(flags["dpo-beta"]), "DPO learning rate": float(flags["dpo-lr"]),
            "DPO warmup steps": float(flags["dpo-warmup"]), "DPO epochs": float(flags["dpo-epochs"]),
            "DPO global batch": per_rank * int(flags.get("dpo-grad-accum", flags.get("grad-accum", 1))),
            "validation every (examples)": float(flags["eval-every"]),
            "max new tokens": float(flags["max-new-tokens"])}


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_settings_equal_schedule_table(preset):
    table, got = schedule_table(), resolved(preset)
    assert set(table) == set(got), set(table) ^ set(got)
    for setting, values in table.items():
        assert got[setting] == pytest.approx(values[preset]), (preset, setting)


@pytest.mark.parametrize("variant", ["few_shot", "prompting", "wo_mix"])
def test_a_row_of_the_tables_gets_its_own_run_directory(variant):
    """`bash train.sh gpt2 --variant X` runs row X in runs/gpt2-X (a run keeps its settings, so rows cannot share
    one); few-shot's demonstrations get --max-len 1024, given after the preset's 512 so that it is the one used."""
    env = {**os.environ, "PAL_DRY_RUN": "1"}
    out = subprocess.run(["bash", "train.sh", "gpt2", "--data-dir", "DATA", "--nli", "NLI", "--variant", variant],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    assert f"--run-dir runs/gpt2-{variant} " in out and out.count("--variant") == 1 and f"--variant {variant}" in out
    lengths = re.findall(r"--max-len (\d+)", out)
    assert lengths[-1] == ("1024" if variant == "few_shot" else "512")


def test_a_train_sh_option_without_its_value_is_one_clear_line():
    """issue 23: `train.sh smol --limit` died with "unbound variable"."""
    out = subprocess.run(["bash", "train.sh", "smol", "--limit"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip() == "train.sh: --limit needs a value", out.stderr
