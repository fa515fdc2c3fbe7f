"""The training loop of dpo.py: on tiny random models, DDP == one process, resume == uninterrupted, early
stopping, the reference cache, that SFT / DPO actually learn; with LoRA, exported checkpoints load in transformers
with our logits, adapters-only export and resume; on the real SmolLM2-135M-Instruct, SFT memorizes and DPO
separates the pairs."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import (collate_dpo, collate_sft, dpo_features, free_port, log_records, sft_features, tiny_gpt2,
                      tiny_llama, trained)

import data
import dpo
import model as modeling


# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_model_logps_lean_path_equals_full_logits(family):
    m = tiny_llama() if family == "llama" else tiny_gpt2(dropout=0.0)
    b = collate_sft(sft_features(3, seed=1))
    got, n1 = dpo.model_logps(m, b["input_ids"], b["labels"])
    got.sum().backward()
    g1 = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    ref, n2 = dpo.sequence_logps(m(b["input_ids"]), b["labels"])
    ref.sum().backward()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert n1.tolist() == n2.tolist()
    for k, p in m.named_parameters():
        torch.testing.assert_close(g1[k], p.grad, atol=1e-6, rtol=1e-4, msg=k)


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = dpo.TrainConfig(mode="sft", out_dir=out_dir, batch_size=2, grad_accum=2, max_steps=3, lr=1e-3,
                              warmup_steps=1, sft_reduction="mean", progress=False, device="cpu")
        dpo.train(tiny_llama(), cfg, sft_features(16), collate_sft, export=False)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_one(tmp_path):
    """2 gloo processes x 2 sequences x 2 accumulation steps == 1 process x 4 x 2, after 3 optimizer steps."""
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    cfg = dpo.TrainConfig(mode="sft", out_dir=str(tmp_path / "one"), batch_size=4, grad_accum=2, max_steps=3,
                          lr=1e-3, warmup_steps=1, sft_reduction="mean", progress=False)
    start = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    dpo.train(tiny_llama(), cfg, sft_features(16), collate_sft, export=False)
    a, b = trained(tmp_path / "ddp", 3), trained(tmp_path / "one", 3)
    assert set(a) == set(b)
    moved = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)  # float noise through AdamW: ~1e-6
        moved += int(not torch.allclose(a[k], start[k]))
    assert moved == len(a)  # every parameter trained (the comparison is not between two untouched models)
    # the logged losses agree too (same global batches, globally normalized)
    la, lb = log_records(tmp_path / "ddp"), log_records(tmp_path / "one")
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], abs=1e-5)


def test_resume_equals_uninterrupted(tmp_path):
    """Dropout on (RNG state), linear schedule (scheduler), AdamW (optimizer), 2+ epochs (data position)."""
    def cfg(out, **kw):
        return dpo.TrainConfig(mode="sft", out_dir=str(out), batch_size=3, max_steps=7, lr=5e-3, warmup_steps=2,
                               schedule="linear", progress=False, **kw)
    feats = sft_features(10)  # 3 steps per epoch: the run crosses two epoch boundaries
    full = dpo.train(tiny_gpt2(), cfg(tmp_path / "a"), feats, collate_sft, export=False)
    part = dpo.train(tiny_gpt2(), cfg(tmp_path / "b", stop_at=4), feats, collate_sft, export=False)
    assert part["step"] == 4 and full["step"] == 7
    # a fresh process would build the model from scratch with another seed: the checkpoint must supply everything
    rest = dpo.train(tiny_gpt2(seed=123), cfg(tmp_path / "b", resume=True), feats, collate_sft, export=False)
    assert rest["step"] == 7
    a, b = trained(tmp_path / "a", 7), trained(tmp_path / "b", 7)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la, lb = log_records(tmp_path / "a"), log_records(tmp_path / "b")
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


def test_early_stopping_and_best_checkpoint(tmp_path):
    scores = iter([1.0, 3.0, 2.0, 2.5, 9.0])
    cfg = dpo.TrainConfig(mode="sft", out_dir=str(tmp_path), batch_size=2, max_steps=50, eval_every=2, patience=2,
                          lr=1e-3, warmup_steps=1, progress=False)
    r = dpo.train(tiny_llama(), cfg, sft_features(8), collate_sft, eval_fn=lambda m: next(scores), export=False)
    assert r["stopped_early"] and r["step"] == 8 and r["best_score"] == 3.0
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["step"] == 4 and (tmp_path / best["dir"] / "trainable.safetensors").exists()
    kept = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert kept == ["step-000004", "step-000008"]  # the best and the latest; the others were pruned
    evals = [rec["eval"]["score"] for rec in log_records(tmp_path) if "eval" in rec]
    assert evals == [1.0, 3.0, 2.0, 2.5]


def test_reference_cache_detects_stale(tmp_path, capsys):
    m = tiny_llama()
    feats = dpo_features(5)
    path = tmp_path / "ref.pt"
    ref = dpo.cached_reference_logps(m, m, feats, collate_dpo, path, batch_size=2)
    c, r = dpo.concatenated_forward(m, collate_dpo(feats))
    torch.testing.assert_close(ref[:, 0], c.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref[:, 1], r.detach(), atol=1e-5, rtol=1e-5)
    again = dpo.cached_reference_logps(m, m, feats, collate_dpo, path, batch_size=2)
    assert torch.equal(again, ref) and "stale" not in capsys.readouterr().err
    with torch.no_grad():
        m.embed.weight[3] += 1.0  # other reference weights
    changed = dpo.cached_reference_logps(m, m, feats, collate_dpo, path, batch_size=2)
    assert "stale" in capsys.readouterr().err and not torch.allclose(changed, ref)
    feats[0]["chosen_labels"][-1] = 7  # other data
    dpo.cached_reference_logps(m, m, feats, collate_dpo, path, batch_size=2)
    assert "stale" in capsys.readouterr().err


@pytest.mark.parametrize("logps", ["plain", "chunked"])
def test_sft_learns_tiny(tmp_path, logps):
    """lr 1e-2: at 2e-2 the last steps bounce (0.003 .. 0.2 on either path), so the final loss was chance."""
    cfg = dpo.TrainConfig(mode="sft", out_dir=str(tmp_path), batch_size=8, max_steps=60, lr=1e-2, warmup_steps=5,
                          sft_reduction="mean", progress=False, logps=logps)
    dpo.train(tiny_llama(), cfg, sft_features(8), collate_sft, export=False)
    losses = [r["loss"] for r in log_records(tmp_path)]
    assert losses[0] > 3.5 and losses[-1] < 0.05  # ln(64) = 4.16 at the start: memorized at the end


@pytest.mark.parametrize("reference", ["cache", "live"])
def test_dpo_learns_tiny_full_finetuning(tmp_path, reference):
    policy = tiny_llama()
    ref = tiny_llama()  # the same start weights, frozen
    cfg = dpo.TrainConfig(mode="dpo", out_dir=str(tmp_path), batch_size=4, max_steps=25, lr=1e-2, warmup_steps=2,
                          beta=0.1, reference=reference, progress=False)
    dpo.train(policy, cfg, dpo_features(4), collate_dpo, ref_model=ref, export=False)
    recs = log_records(tmp_path)
    assert abs(recs[0]["reward_margin"]) < 1e-4  # policy == reference at step 1: margin 0
    assert recs[-1]["reward_accuracy"] == 1.0 and recs[-1]["reward_margin"] > 1.0
    assert recs[-1]["loss"] < recs[0]["loss"]


def test_dpo_turns_dropout_off(tmp_path):
    """With lr 0 the policy stays equal to its reference: every margin is 0 only if dropout is off in both."""
    policy, ref = tiny_gpt2(dropout=0.5), tiny_gpt2(dropout=0.5)
    cfg = dpo.TrainConfig(mode="dpo", out_dir=str(tmp_path), batch_size=2, max_steps=3, lr=0.0, warmup_steps=1,
                          reference="live", progress=False)
    dpo.train(policy, cfg, dpo_features(4), collate_dpo, ref_model=ref, export=False)
    for rec in log_records(tmp_path):
        assert rec["reward_margin"] == 0.0 and rec["loss"] == pytest.approx(0.6931471806, abs=1e-6)  # log 2
    assert not policy.training


# ---------------------------------------------------------------------------------------------------------------
# LoRA: export and resume

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


# ---------------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct with LoRA (the real model; a few steps on short sequences)

@pytest.fixture(scope="module")
def smol(smol_dir):
    return smol_dir, data.load_tokenizer(smol_dir)


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
