"""pal.py: the whole pipeline end to end on a tiny random GPT-2 (with GPT-2's real tokenizer), resume after a
stage's output is deleted, and what each baseline / ablation flag changes."""
import dataclasses
import io
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from conftest import _args, _Recorder

import data
import model as modeling
import pal

METRIC_KEYS = {"bleu1", "bleu2", "rouge_l", "entropy", "entropy1", "entropy2", "entropy3", "entropy4",
               "distinct1", "distinct2", "persona_coverage", "c_score", "c_score_sum", "n"}
# the fixtures tiny_model_dir (a tiny random GPT-2 with GPT-2's BPE files) and data_dir (PERSONA-CHAT), the
# helpers _args (the tiny run's options) and _Recorder (stands in for dpo.train): conftest.py


def _mtimes(run: Path) -> dict:
    return {p: (run / p).stat().st_mtime_ns for p in
            ("sft/final/model.safetensors", "pairs.jsonl", "dpo/final/model.safetensors", "generations.jsonl",
             "results.json")}


def test_end_to_end_and_resume(tmp_path, tiny_model_dir, data_dir):
    run = tmp_path / "run"
    pal.main(["all", *_args(run, tiny_model_dir, data_dir)])
    res = json.loads((run / "results.json").read_text())
    assert METRIC_KEYS <= set(res), METRIC_KEYS - set(res)
    assert res["c_score"] is None  # no NLI checkpoint given: reported unavailable, never invented
    assert res["n"] == 4
    rows = pal.read_jsonl(run / "generations.jsonl")
    assert len(rows) == 4 and all({"personas", "history", "selected_persona", "response", "gold"} <= set(r)
                                  for r in rows)
    pairs = pal.read_jsonl(run / "pairs.jsonl")
    assert len(pairs) == 4 and all(r["chosen"] and "rejected" in r for r in pairs)
    assert "| BLEU-1 |" in (run / "results.md").read_text()

    # delete one stage's output: only that stage runs again
    before = _mtimes(run)
    (run / "pairs.jsonl").unlink()
    pal.main(["all", "--run-dir", str(run)])  # every option comes back from run.json
    after = _mtimes(run)
    assert after["pairs.jsonl"] != before["pairs.jsonl"]
    assert {k: v for k, v in after.items() if k != "pairs.jsonl"} == \
           {k: v for k, v in before.items() if k != "pairs.jsonl"}
    # greedy decoding from the same SFT weights gives the same pairs again
    assert pal.read_jsonl(run / "pairs.jsonl") == pairs


def test_interrupted_generation_resumes_after_last_complete_line(tmp_path):
    out = tmp_path / "g.jsonl"
    w = pal.JsonlWriter(out)
    w.write({"i": 0})
    w.write({"i": 1})
    w.f.close()
    with open(out.with_name("g.jsonl.partial"), "a") as f:
        f.write('{"i": 2, "cut')  # killed mid-line
    w = pal.JsonlWriter(out)
    assert w.done_rows == [{"i": 0}, {"i": 1}]
    w.write({"i": 2})
    w.finish()
    assert pal.read_jsonl(out) == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert not out.with_name("g.jsonl.partial").exists()


# ---- baselines and ablations: what each flag changes ------------------------------------------------------

def _cfg(**kw):
    return pal.RunConfig(**kw)


@pytest.mark.parametrize("variant,phases", [
    ("pal", [("mix", ["select", "generate"])]),
    ("wo_mix", []),  # no Persona-aware Learning at all: pairs and DPO start from the base model
    ("only_dg", [("dg", ["generate"])]),  # the paper's: persona-enhanced generation (highlighted), no selection
    ("only_dg_list", [("gen", ["personas"])]),  # generation from the persona list: nothing selects a highlight
    ("only_ps", [("ps", ["select"])]),
    ("prompting", [("gen", ["personas"])]),
    ("ft", [("dg", ["noprompt"])]),
])
def test_variant_sft_tasks(variant, phases):
    sw = _cfg(variant=variant).switches()
    assert pal.sft_phases(sw["tasks"], sw["fmt"]) == phases


def test_tasks_flag_overrides_variant_and_the_selection_target_picks_the_selection_prompt():
    sw = _cfg(variant="pal", tasks="gen").switches()
    assert pal.sft_phases(sw["tasks"], sw["fmt"]) == [("gen", ["personas"])]
    assert pal.sft_phases("mix", "prompt", "select_sentence") == [("mix", ["select_sentence", "generate"])]
    assert pal.sft_phases("seq", "prompt", "select_sentence") == [("ps", ["select_sentence"]), ("dg", ["generate"])]


def test_every_run_option_is_declared_on_the_command_line(tmp_path):
    """Each RunConfig field declares its option's type or choices; values outside the choices are refused."""
    for f in dataclasses.fields(pal.RunConfig):
        kind = f.metadata["kind"]
        assert kind in (str, int, float) or (isinstance(kind, tuple) and f.default in kind + (None,)), f.name
    with pytest.raises(SystemExit):
        pal.main(["sft", "--run-dir", str(tmp_path / "r"), "--dtype", "fp8"])
    assert not (tmp_path / "r").exists()


@pytest.fixture
def sft_run(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    """A run directory whose sft/final and pairs.jsonl exist (written with the tiny model)."""
    run = tmp_path / "run"
    rec = _Recorder()
    monkeypatch.setattr("dpo.train", rec)
    return run, rec


def _decode_prompts(tok, feats, key="input_ids", labels="labels"):
    out = []
    for f in feats:
        ids, lab = f[key], f[labels]
        n = next(i for i, l in enumerate(lab) if l != -100)
        out.append(tok.decode(ids[:n]))
    return out


@pytest.mark.parametrize("variant", ["pal", "seq", "ft"])
def test_sft_stage_trains_the_variant_tasks(sft_run, tiny_model_dir, data_dir, variant):
    run, rec = sft_run
    flags = ["--tasks", "seq"] if variant == "seq" else ["--variant", variant]
    pal.main(["sft", *_args(run, tiny_model_dir, data_dir, *flags)])
    tok = data.load_tokenizer(str(tiny_model_dir))
    prompts = [p for c in rec.calls for p in _decode_prompts(tok, c["feats"])]
    n_select = sum("Which single sentence" in p for p in prompts)
    n_generate = sum("Write your next reply" in p for p in prompts)
    if variant == "pal":
        assert len(rec.calls) == 1 and n_select == 4 and n_generate == 4
    elif variant == "seq":  # --tasks seq: selection first, then generation, as two phases
        assert len(rec.calls) == 2 and n_select == 4 and n_generate == 4
        assert all("Which single sentence" in p for p in _decode_prompts(tok, rec.calls[0]["feats"]))
    else:  # fine-tuning without prompts: no instruction text at all
        assert n_select == n_generate == 0 and len(prompts) == 4
        assert all("Reply:" not in p for p in prompts)


@pytest.mark.parametrize("variant,expect", [("pal", "dpo"), ("wo_pc", "sft"), ("wo_pa", None)])
def test_alignment_stage_of_variant(sft_run, tiny_model_dir, data_dir, variant, expect):
    run, rec = sft_run
    args = _args(run, tiny_model_dir, data_dir, "--variant", variant)
    pal.main(["sft", *args])
    pal.main(["pairs", *args])
    assert (run / "pairs.jsonl").exists() == (variant == "pal")  # only DPO needs persona-less responses
    rec.calls.clear()
    pal.main(["dpo", *args])
    if expect is None:  # w/o PA: no second stage; predict reads the SFT weights
        assert rec.calls == [] and pal.final_weights(pal.load_run_config(run, {}), run) == run / "sft" / "final"
        return
    (call,) = rec.calls
    assert call["mode"] == expect
    if expect == "dpo":  # chosen = gold, rejected = the SFT model's persona-less reply, same prompt
        f = call["feats"][0]
        assert "chosen_input_ids" in f and "rejected_input_ids" in f
        assert call["ref"] is not None  # full fine-tuning: a frozen copy of the SFT model is the reference


@pytest.mark.parametrize("strategy", ["select", "random", "none"])
def test_inference_strategy(tiny_model_dir, data_dir, strategy, monkeypatch):
    cfg = pal.RunConfig(model=str(tiny_model_dir), data_dir=data_dir, limit=3, max_new_tokens=3,
                        select_max_new_tokens=3, strategy=strategy)
    splits, lang = pal.load_data(data_dir, limit=3)
    tok = pal.load_tokenizer(str(tiny_model_dir))
    m = modeling.load_model(str(tiny_model_dir))
    modes, encode = [], data.encode_generation_prompt
    monkeypatch.setattr(data, "encode_generation_prompt", lambda tok, e, mode, *a, **kw: (
        modes.append(mode), encode(tok, e, mode, *a, **kw))[1])
    rows = pal.select_then_generate(m, tok, splits["test"], lang, **pal.decoding(cfg))
    assert len(rows) == 3
    if strategy == "select":  # the model's own selection output is parsed; the gold label is never used
        assert all(r["selection_output"] is not None for r in rows)
        assert modes == ["select"] * 3 + ["generate"] * 3
    elif strategy == "random":
        assert all(r["selected_persona"] in r["personas"] for r in rows)
        assert modes == ["generate"] * 3
    else:  # Not Select: the full persona list and no highlighted sentence, not the "no persona" sentinel
        assert all(r["selected_persona"] is None and r["selection_output"] is None for r in rows)
        assert modes == ["personas"] * 3
        prompt = data.build_prompt("personas", ["i like cats ."], ["hi"])
        assert "i like cats ." in prompt and "Keep this in mind" not in prompt and data.NO_PERSONA["en"] not in prompt


def test_zero_shot_variant_uses_the_base_model_untrained(tmp_path, tiny_model_dir, data_dir, capsys):
    run = tmp_path / "zs"
    pal.main(["all", *_args(run, tiny_model_dir, data_dir, "--variant", "zero_shot")])
    assert not (run / "sft").exists() and not (run / "dpo").exists() and not (run / "pairs.jsonl").exists()
    assert pal.final_weights(pal.load_run_config(run, {}), run) == str(tiny_model_dir)
    rows = pal.read_jsonl(run / "generations.jsonl")
    assert rows and all(r["selection_output"] is None for r in rows)
    assert json.loads((run / "results.json").read_text())["variant"] == "zero_shot"
    capsys.readouterr()
    pal.main(["table", "--examples", "2", str(run)])  # the table, then the first two replies with their gold
    out = capsys.readouterr().out
    assert "| Diagnostics |" in out and "| gold responses |" in out
    assert "Example 2." in out and "Example 3." not in out and f"zs: {rows[1]['response']}" in out


def test_chat_in_the_terminal(tmp_path, tiny_model_dir, data_dir, capsys):
    run = tmp_path / "run"
    modeling.save_model(modeling.load_model(str(tiny_model_dir)), run / "sft" / "final")
    cfg = pal.load_run_config(run, {"model": str(tiny_model_dir), "data_dir": data_dir, "variant": "wo_pa",
                                    "max_new_tokens": 4, "select_max_new_tokens": 4})
    typed = io.StringIO("i love dogs .\ni work at a bank .\n\nhello , how are you ?\nwhat do you do ?\n\n")
    pal.stage_chat(cfg, run, stream=typed)
    out = capsys.readouterr().out
    assert "- i love dogs ." in out and "- i work at a bank ." in out
    assert out.count("bot>") == 2 and out.count("[persona:") == 2


def test_the_same_command_twice_gives_the_same_lora_run(tmp_path, tiny_model_dir, data_dir):
    """Two runs of one command (LoRA SFT, then DPO) in two run directories: the exported adapters are equal to the
    bit, and so are the replies. Before add_lora took --seed, A came from whatever the global stream held."""
    for name in ("a", "b"):
        torch.manual_seed(len(name) * 1000 + ord(name))  # the process's random stream differs between the runs
        pal.main(["all", *_args(tmp_path / name, tiny_model_dir, data_dir, "--lora-r", "4", "--seed", "3")])
    for stage in ("sft", "dpo"):
        a, b = (safetensors.torch.load_file(tmp_path / n / stage / "final" / "adapter.safetensors") for n in "ab")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
    assert (tmp_path / "a" / "generations.jsonl").read_text() == (tmp_path / "b" / "generations.jsonl").read_text()
