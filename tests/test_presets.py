"""The GPU presets' resolved settings against docs/schedules.md's table (issues 11, 21): `PAL_DRY_RUN=1 bash train.sh
P` prints the command a preset would run; global batches, DPO length and intervals are computed from it the way
pal.py does (batch x accumulation x ranks), the LoRA layers it wraps are named as Hugging Face names them, and all
are compared with the table's entries."""
import dataclasses
import os
import re
import subprocess

import pytest

from conftest import ROOT, tiny_gpt2, tiny_llama

import model as modeling
import pal

PRESETS = ["gpt2", "dialogpt", "gpt2-zh", "llama"]


def cell(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text.strip("`")


def schedule_table() -> dict[str, dict[str, float | str]]:
    """{setting: {preset: number or text}} from the table of docs/schedules.md (its header row starts with
    "| setting |")."""
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
        table[cells[0]] = {p: cell(cells[header.index(p)]) for p in PRESETS}
    return table


def lora_layers_hf(preset: str, targets: str) -> str:
    """The layers `--lora-targets` wraps in one block of the preset's model family, by their Hugging Face names."""
    m = tiny_llama() if preset == "llama" else tiny_gpt2()
    names = modeling.add_lora(m, r=2, targets=targets.split(","))
    return ", ".join(sorted({modeling.hf_name(m, f"{n}.weight").split(".")[-2] for n in names}))


def resolved_command(preset: str, *extra: str) -> str:
    env = {**os.environ, "PAL_DRY_RUN": "1"}
    return subprocess.run(["bash", "train.sh", preset, "--data-dir", "DATA", "--nli", "NLI", *extra], cwd=ROOT,
                          env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]


def resolved(preset: str) -> dict[str, float | str]:
    flags = dict(re.findall(r"--([\w-]+) (?!--)(\S+)", resolved_command(preset)))
    ranks = int(flags.get("nproc_per_node", 1))
    per_rank = int(flags["batch-size"]) * ranks
    # the options pal.py would run with (RunConfig's defaults under the flags), in the training loop's terms
    kinds = {f.name: f.metadata["kind"] for f in dataclasses.fields(pal.RunConfig)}
    cfg = pal.RunConfig(**{n: kind(flags[n.replace("_", "-")]) if kind in (int, float) else flags[n.replace("_", "-")]
                           for n, kind in kinds.items() if n.replace("_", "-") in flags})
    train = pal.train_config(cfg, "dpo", ROOT / "unused", 1)
    optimizer = "Adam" if train.optimizer == "adamw" and train.weight_decay == 0 else train.optimizer
    sft_r, dpo_r = cfg.lora_r, pal.lora_rank(cfg, "dpo")
    return {"SFT learning rate": float(flags["sft-lr"]), "SFT warmup steps": float(flags["sft-warmup"]),
            "SFT epochs": float(flags["sft-epochs"]),
            "SFT global batch": per_rank * int(flags.get("grad-accum", 1)),
            "DPO beta": float(flags["dpo-beta"]), "DPO learning rate": float(flags["dpo-lr"]),
            "DPO warmup steps": float(flags["dpo-warmup"]), "DPO epochs": float(flags["dpo-epochs"]),
            "DPO global batch": per_rank * int(flags.get("dpo-grad-accum", flags.get("grad-accum", 1))),
            "validation every (examples)": float(flags["eval-every"]),
            "max new tokens": float(flags["max-new-tokens"]),
            "LoRA in": ", ".join(s for s, r in (("SFT", sft_r), ("DPO", dpo_r)) if r),
            "LoRA rank": float(dpo_r), "LoRA alpha": cfg.lora_alpha, "LoRA dropout": cfg.lora_dropout,
            "LoRA targets": lora_layers_hf(preset, cfg.lora_targets), "LoRA A init": cfg.lora_init,
            "LoRA+ ratio (lr of B / lr)": train.lora_plus_ratio, "optimizer": optimizer,
            "gradient clip (max norm)": train.grad_clip}


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


@pytest.mark.parametrize("preset", PRESETS)
def test_lora_targets_are_pefts_defaults_for_the_family(preset):
    """The table's targets are what PEFT's LoraConfig wraps when given none, as the authors' train_lora.py."""
    peft_targets = pytest.importorskip("peft.utils.constants").TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    family = "llama" if preset == "llama" else "gpt2"
    assert schedule_table()["LoRA targets"][preset] == ", ".join(sorted(peft_targets[family]))


def dry_run(*args) -> list[str]:
    env = {**os.environ, "PAL_DRY_RUN": "1"}
    return subprocess.run(["bash", "train.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True).stdout.strip().splitlines()


@pytest.mark.parametrize("preset", PRESETS)
def test_gpu_presets_answer_the_selection_task_as_the_authors(preset):
    last = dry_run(preset, "--data-dir", "DATA", "--nli", "NLI")[-1]
    assert re.findall(r"--select-target (\S+)", last) == ["sentence"]


def test_seeds_run_a_row_in_sibling_directories_then_print_its_table():
    """--seeds 3: the row with --seed 1, 2, 3 in RUN-seed1..3 (each seed last on its line, so it is the one used),
    then pal.py table over the three."""
    lines = dry_run("gpt2", "--data-dir", "DATA", "--nli", "NLI", "--variant", "wo_pa", "--seeds", "3")
    runs = [ln for ln in lines if " pal.py all " in ln]
    assert len(runs) == 3
    for k, ln in enumerate(runs, 1):
        assert f"--run-dir runs/gpt2-wo_pa-seed{k} " in ln and re.findall(r"--seed (\d+)", ln) == [str(k)]
    assert lines[-1].endswith("pal.py table runs/gpt2-wo_pa-seed1 runs/gpt2-wo_pa-seed2 runs/gpt2-wo_pa-seed3")
    bad = subprocess.run(["bash", "train.sh", "gpt2", "--data-dir", "DATA", "--seeds", "x"], cwd=ROOT,
                         env={**os.environ, "PAL_DRY_RUN": "1"}, capture_output=True, text=True)
    assert bad.returncode == 2 and "--seeds x: give a count" in bad.stderr


def test_a_train_sh_option_without_its_value_is_one_clear_line():
    """issue 23: `train.sh smol --limit` died with "unbound variable"."""
    out = subprocess.run(["bash", "train.sh", "smol", "--limit"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip() == "train.sh: --limit needs a value", out.stderr
