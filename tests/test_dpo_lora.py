"""dpo.train with LoRA: exported checkpoints load in transformers with our logits, adapters-only export,
resume, and learning on the real SmolLM2-135M-Instruct (SFT memorizes, DPO separates the pairs)."""

import pytest
import torch

import dpo
import model as modeling
from test_dpo_train import (collate_dpo, collate_sft, dpo_features, log_records, sft_features, tiny_gpt2,
                            tiny_llama, trained)


def _ids(batch_size=2, t=10, seed=9):
    return torch.randint(1, 64, (batch_size, t), generator=torch.Generator().manual_seed(seed))


def test_lora_dpo_export_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    policy = tiny_llama()
    modeling.add_lora(policy, r=4, alpha=8)
    cfg = dpo.TrainConfig(mode="dpo", out_dir=str(tmp_path), batch_size=4, max_steps=4, lr=1e-2, warmup_steps=1,
                          reference="live", progress=False)
    r = dpo.train(policy, cfg, dpo_features(4), collate_dpo)  # reference: the same model with adapters off
    assert r["final_dir"] == tmp_path / "final"
    assert any(p.abs().max() > 0 for n, p in policy.named_parameters() if "lora_B" in n)  # adapters trained
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "final").eval()
    ids = _ids()
    with torch.no_grad():
        ours = policy.eval()(ids)
        with modeling.lora_disabled(policy):
            base = policy(ids)
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert (theirs - base).abs().max() > 1e-3  # the export holds the trained adapters, not the base
    assert sum(p.numel() for p in hf.parameters()) == sum(
        p.numel() for n, p in policy.named_parameters() if "lora_" not in n)


def test_full_sft_export_gpt2_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    m = tiny_gpt2()
    cfg = dpo.TrainConfig(mode="sft", out_dir=str(tmp_path), batch_size=4, max_steps=3, lr=1e-2, warmup_steps=1,
                          progress=False)
    dpo.train(m, cfg, sft_features(8), collate_sft)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "final").eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, m.eval()(ids), atol=1e-4, rtol=1e-4)


def test_lora_adapter_export_and_resume(tmp_path):
    def cfg(out, **kw):
        return dpo.TrainConfig(mode="dpo", out_dir=str(out), batch_size=2, max_steps=6, lr=5e-3, warmup_steps=2,
                               lora_export="adapter", progress=False, **kw)

    def lora_model():
        m = tiny_llama()  # the frozen base comes from the pretrained weights, not from the checkpoint
        torch.manual_seed(1)
        modeling.add_lora(m, r=4, alpha=8)
        return m

    feats = dpo_features(6)
    full = lora_model()
    dpo.train(full, cfg(tmp_path / "a"), feats, collate_dpo)
    dpo.train(lora_model(), cfg(tmp_path / "b", stop_at=2), feats, collate_dpo)
    torch.manual_seed(5)  # other adapter init than the checkpoint's: resume must overwrite it
    fresh = tiny_llama()
    modeling.add_lora(fresh, r=4, alpha=8)
    dpo.train(fresh, cfg(tmp_path / "b", resume=True), feats, collate_dpo)
    a, b = trained(tmp_path / "a", 6), trained(tmp_path / "b", 6)
    assert set(a) == set(modeling.lora_state_dict(full)) and all(torch.equal(a[k], b[k]) for k in a)
    # adapters-only export: a fresh base + these adapters gives the trained model
    assert sorted(p.name for p in (tmp_path / "a" / "final").iterdir()) == ["adapter.safetensors"]
    again = tiny_llama()
    modeling.add_lora(again, r=4, alpha=8)
    modeling.load_lora(again, tmp_path / "a" / "final" / "adapter.safetensors")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(again(ids), full(ids), atol=0, rtol=0)


# ---- SmolLM2-135M-Instruct with LoRA (the real model; a few steps on short sequences)

@pytest.fixture(scope="module")
def smol():
    try:
        path = modeling.resolve_model_dir("smol")
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"SmolLM2 is not available here: {e}")
    import data
    return path, data.load_tokenizer("smol")


def _smol_lora(path):
    torch.manual_seed(0)
    m = modeling.load_model(path)
    modeling.add_lora(m, r=8, alpha=16)
    return m


FACTS = [("Your dog?", "My dog is named Biscuit."), ("Where do you live?", "In a small town by the sea."),
         ("Favourite colour?", "Green, like moss."), ("Your job?", "I work night shifts at a bakery."),
         ("Siblings?", "Two older sisters."), ("What do you play?", "The cello, every Sunday."),
         ("Allergies?", "I am allergic to cats."), ("What do you collect?", "Old maps of Europe.")]


def test_smol_lora_sft_memorizes_eight_examples(tmp_path, smol):
    path, tok = smol
    feats = []
    for question, fact in FACTS:  # distinct prompts: each answer is determined by its question
        prompt, resp = tok.encode(question), tok.encode(" " + fact) + [tok.eos_id]
        feats.append({"input_ids": prompt + resp, "labels": [-100] * len(prompt) + resp})
    cfg = dpo.TrainConfig(mode="sft", out_dir=str(tmp_path), batch_size=8, max_steps=12, lr=3e-3, warmup_steps=2,
                          sft_reduction="mean", progress=False)
    dpo.train(_smol_lora(path), cfg, feats, collate_sft, export=False)
    losses = [r["loss"] for r in log_records(tmp_path)]
    assert losses[0] > 2.0 and losses[-1] < 0.05, losses  # per-token NLL: from unknown facts to memorized


def test_smol_lora_dpo_separates_pairs(tmp_path, smol):
    path, tok = smol
    pairs = [("What pet do you have?", " I have a dog named Biscuit.", " I do not like animals."),
             ("Where do you live?", " By the sea, in a small town.", " I live on the moon."),
             ("What do you do on Sundays?", " I play the cello.", " Nothing at all."),
             ("Any allergies?", " Yes, I am allergic to cats.", " I can eat anything.")]
    feats = []
    for q, c, r in pairs:
        p, cc, rr = tok.encode(q), tok.encode(c) + [tok.eos_id], tok.encode(r) + [tok.eos_id]
        feats.append({"chosen_input_ids": p + cc, "chosen_labels": [-100] * len(p) + cc,
                      "rejected_input_ids": p + rr, "rejected_labels": [-100] * len(p) + rr})
    cfg = dpo.TrainConfig(mode="dpo", out_dir=str(tmp_path), batch_size=4, max_steps=12, lr=5e-3, warmup_steps=2,
                          beta=0.1, progress=False)
    dpo.train(_smol_lora(path), cfg, feats, collate_dpo, export=False)
    recs = log_records(tmp_path)
    assert abs(recs[0]["reward_margin"]) < 1e-3  # step 1: policy == reference (B = 0)
    assert recs[-1]["reward_accuracy"] == 1.0
    assert recs[-1]["reward_margin"] > 1.0 and recs[-1]["loss"] < 0.3, recs[-1]
