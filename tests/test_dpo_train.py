"""The training loop of dpo.py on tiny random models: DDP == one process, resume == uninterrupted,
early stopping, the reference cache, and that SFT / DPO actually learn."""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import dpo
import model as modeling

V = 64


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = modeling.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                               tie_word_embeddings=True)
    return modeling.Llama(cfg)


def tiny_gpt2(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    cfg = modeling.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                              embd_pdrop=dropout, attn_pdrop=dropout, resid_pdrop=dropout)
    return modeling.GPT2(cfg)


def sft_features(n, seed=0, lo=6, hi=14):
    """n sequences of random length; the first 3 tokens are the 'prompt' (label -100)."""
    g = torch.Generator().manual_seed(seed)
    feats = []
    for _ in range(n):
        t = int(torch.randint(lo, hi, (1,), generator=g))
        ids = torch.randint(1, V, (t,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return feats


def pad(seqs, value):
    t = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (t - len(s)) for s in seqs])


def collate_sft(feats):
    return {"input_ids": pad([f["input_ids"] for f in feats], 0), "labels": pad([f["labels"] for f in feats], -100)}


def dpo_features(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = []
    for _ in range(n):
        prompt = torch.randint(1, V, (4,), generator=g).tolist()
        c, r = torch.randint(1, V, (5,), generator=g).tolist(), torch.randint(1, V, (3,), generator=g).tolist()
        feats.append({"chosen_input_ids": prompt + c, "chosen_labels": [-100] * 4 + c,
                      "rejected_input_ids": prompt + r, "rejected_labels": [-100] * 4 + r})
    return feats


def collate_dpo(feats):
    return {k: pad([f[k] for f in feats], -100 if k.endswith("labels") else 0)
            for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")}


def trained(out_dir, step):
    return load_file(str(out_dir / "ckpt" / f"step-{step:06d}" / "trainable.safetensors"))


def log_records(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    cfg = dpo.TrainConfig(mode="sft", out_dir=str(tmp_path / "one"), batch_size=4, grad_accum=2, max_steps=3,
                          lr=1e-3, warmup_steps=1, sft_reduction="mean", progress=False)
    start = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    dpo.train(tiny_llama(), cfg, sft_features(16), collate_sft, export=False)
    a, b = trained(tmp_path / "ddp", 3), trained(tmp_path / "one", 3)
    assert set(a) == set(b)
    moved = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
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


def test_sft_learns_tiny(tmp_path):
    cfg = dpo.TrainConfig(mode="sft", out_dir=str(tmp_path), batch_size=8, max_steps=60, lr=2e-2, warmup_steps=5,
                          sft_reduction="mean", progress=False)
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
