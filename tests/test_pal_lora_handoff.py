"""The SFT -> DPO hand-off of a LoRA run (issue 21, point 2), on the tiny GPT-2 through pal.main. With
--dpo-adapters continue (the authors' train_lora.py: PeftModel.from_pretrained(..., is_trainable=True)) DPO goes on
training the SFT adapters on their base: the model DPO starts from is the model that wrote the pairs, and the DPO
reference is that same model, frozen (its log-probs cached before the first step). The base model, which switching
the adapters off would give (the authors' reference), is not it."""
import json
from pathlib import Path

import pytest
import torch
# the fixtures tiny_model_dir and data_dir come from conftest.py
from conftest import _args

import dpo
import model as modeling
import pal
from infra import rundir
from infra.hub import load_plain, read_safetensors

LORA = ["--lora-r", "4", "--lora-alpha", "8", "--lora-targets", "q,k,v,o", "--lora-init", "gaussian",
        "--lora-plus-ratio", "4", "--sft-lr", "3e-2", "--grad-clip", "10", "--sft-epochs", "2"]


@torch.no_grad()
def pair_logps(model, feats, collate) -> torch.Tensor:
    """(N, 2) fp32 log-probs (chosen, rejected) of the DPO pairs under `model`, dropout off."""
    was = model.training
    model.eval()
    out = torch.cat([torch.stack(dpo.concatenated_forward(model, collate(feats[i:i + 4])), 1)
                     for i in range(0, len(feats), 4)])
    model.train(was)
    return out


def run_lora(tmp_path, tiny_model_dir, data_dir, monkeypatch, *extra):
    """sft, pairs and dpo of a LoRA run; dpo.train wrapped to record the policy's log-probs before it trains."""
    run = tmp_path / "run"
    seen = {}
    real_train = dpo.train

    def train(model, cfg, feats, collate, **kw):
        if cfg.mode == "dpo":
            seen.update(start=pair_logps(model, feats, collate), feats=feats, collate=collate, cfg=cfg,
                        trainable=sorted(n for n, p in model.named_parameters() if p.requires_grad),
                        adapters={n: t.clone() for n, t in modeling.lora_state_dict(model).items()})
        return real_train(model, cfg, feats, collate, **kw)

    monkeypatch.setattr(dpo, "train", train)
    for stage in ("sft", "pairs", "dpo"):
        pal.main([stage, *_args(run, tiny_model_dir, data_dir, *LORA, *extra)])
    return run, seen


def test_dpo_continues_the_sft_adapters_and_its_reference_is_the_model_that_wrote_the_pairs(
        tmp_path, tiny_model_dir, data_dir, monkeypatch, one_thread):
    run, seen = run_lora(tmp_path, tiny_model_dir, data_dir, monkeypatch)
    cfg = pal.load_run_config(run, {})
    assert cfg.dpo_adapters == "continue" and seen["cfg"].reference_adapters
    feats, collate = seen["feats"], seen["collate"]
    writer = pal.generation_model(cfg, run / "sft" / "final")  # what stage_pairs generated with
    wrote = pair_logps(writer, feats, collate)
    base = pair_logps(modeling.load_model(tiny_model_dir), feats, collate)
    assert (wrote - base).abs().max() > 0.5  # SFT moved the model: the base would be another reference

    # 1. DPO starts from that model: base + the SFT adapters themselves, unmerged, and they are what trains
    torch.testing.assert_close(seen["start"], wrote, rtol=0, atol=1e-4)
    sft_adapters = read_safetensors(run / "sft" / "final" / "adapter.safetensors")
    assert set(seen["adapters"]) == set(sft_adapters)
    for k, t in sft_adapters.items():
        assert torch.equal(seen["adapters"][k], t), k
    assert seen["trainable"] == sorted(sft_adapters)

    # 2. the reference: those log-probs, cached before the first step (not the base's)
    ref = load_plain(run / "dpo" / "ref_logps.pt")["logps"]
    torch.testing.assert_close(ref, wrote, rtol=0, atol=1e-4)

    # 3. the export: its adapters belong on the base, and base + them is the merged export (fp32: equal)
    noted = json.loads((run / "dpo" / "final" / "adapter_base.json").read_text())
    assert Path(noted["base"]) == Path(tiny_model_dir).resolve() and noted["r"] == 4
    rebuilt = pair_logps(pal.generation_model(cfg, run / "dpo" / "final"), feats, collate)
    merged = pair_logps(modeling.load_model(run / "dpo" / "final"), feats, collate)
    torch.testing.assert_close(rebuilt, merged, rtol=0, atol=1e-4)
    assert (rebuilt - wrote).abs().max() > 0  # and DPO did train them


def test_fresh_adapters_on_the_merged_sft_weights_remain_an_option(
        tmp_path, tiny_model_dir, data_dir, monkeypatch, one_thread):
    run, seen = run_lora(tmp_path, tiny_model_dir, data_dir, monkeypatch, "--dpo-adapters", "fresh")
    assert not seen["cfg"].reference_adapters  # the reference: the policy with its (fresh) adapters off
    assert all(torch.count_nonzero(t) == 0 for k, t in seen["adapters"].items() if k.endswith("lora_B"))
    noted = json.loads((run / "dpo" / "final" / "adapter_base.json").read_text())
    assert noted["base"] == "sft/final" and noted["in_run"]  # inside the run: noted relative to it (issue 23)
    # with fp32 weights the merged SFT model is the pairs' writer to rounding, so the start is the same model
    cfg = pal.load_run_config(run, {})
    wrote = pair_logps(pal.generation_model(cfg, run / "sft" / "final"), seen["feats"], seen["collate"])
    torch.testing.assert_close(seen["start"], wrote, rtol=0, atol=1e-4)


@pytest.mark.parametrize("lora_r, given, refused", [(4, "fresh", False), (4, None, True), (0, None, False)])
def test_a_dpo_stage_recorded_before_the_option_resumes_as_it_was_built(
        tmp_path, tiny_model_dir, data_dir, lora_r, given, refused):
    """A DPO stage recorded before --dpo-adapters existed trained fresh adapters. After LoRA SFT, resuming it with
    fresh is accepted and with the new default (continue) refused, naming the option; after full SFT the option
    changes nothing and is not asked for."""
    cfg = pal.load_run_config(tmp_path, {"model": str(tiny_model_dir), "data_dir": data_dir, "lora_r": lora_r,
                                         "dpo_lora_r": 4})
    old = {k: v for k, v in pal.stage_options(cfg, "dpo").items() if k not in pal.ADDED_LATER}
    records = {"dpo": {"options": old, "started": "then"}}
    now = pal.stage_options(pal.load_run_config(tmp_path, {**vars(cfg), "dpo_adapters": given}), "dpo")

    def check():
        # finished: a started stage that wrote nothing would just start again with the new settings (issue 23)
        rundir.check_records(tmp_path, records, {"dpo": now}, {"dpo": True}, pal.STAGE_PATHS, False,
                             pal.RESUME_ONLY, pal.ADDED_LATER)

    if refused:
        with pytest.raises(ValueError, match="--dpo-adapters: 'fresh' then, 'continue' now"):
            check()
    else:
        check()
