"""dpo.py's training loop, ready for the GPU runs (issue 12), checked on CPU: fp16 loss scaling refuses fp16
trainable weights; optimizer steps read nothing off the device until a log line; length-grouped batches (each
example once per epoch, far less padding, exact resume, the real-token share in the log); the process group's
timeout; DPO at lr 0 gives ln 2 under bf16 autocast; DPO, the reference cache and resume under 2 gloo ranks."""
import math
import os
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import (collate_dpo, collate_sft, dpo_features, free_port, log_records, sft_features, tiny_gpt2,
                      tiny_llama, trained)

import dpo
from infra import trainlog
import model as modeling

V = 64


def varied_sft(n, seed=0):
    """n sequences of 4..39 tokens (first 3: prompt): lengths vary enough for grouping to matter."""
    return sft_features(n, seed, lo=4, hi=40)


def varied_dpo(n, seed=0):
    """n pairs: prompt 2..9 tokens, chosen and rejected 1..19 tokens each."""
    g = torch.Generator().manual_seed(seed)
    feats = []
    for _ in range(n):
        p, c, r = (torch.randint(1, V, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
                   for lo, hi in ((2, 10), (1, 20), (1, 20)))
        feats.append({"chosen_input_ids": p + c, "chosen_labels": [-100] * len(p) + c,
                      "rejected_input_ids": p + r, "rejected_labels": [-100] * len(p) + r})
    return feats


def without_timing(records):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def expected_share(feats, global_batch, batch_size, world, steps, lengths, dpo_pairs=False):
    """real / padded tokens of each step's micro-batches over all ranks, from the features alone."""
    keys = ("chosen_input_ids", "rejected_input_ids") if dpo_pairs else ("input_ids",)
    shares = []
    for step in range(steps):
        idx = dpo.global_batch_indices(len(feats), global_batch, 0, step, lengths)
        real = sum(len(feats[i][k]) for i in idx for k in keys)
        padded = sum(len(keys) * len(rows) * max(len(feats[i][k]) for i in rows for k in keys)
                     for rows in (idx[lo:lo + batch_size] for lo in range(0, global_batch, batch_size)))
        shares.append(real / padded)
    return shares


# ---------------------------------------------------------------------------------------------------------------
# 1. fp16 loss scaling needs fp32 trainable weights

def test_fp16_precision_refuses_fp16_trainable_weights(tmp_path):
    cfg = dpo.TrainConfig(mode="sft", out_dir=str(tmp_path), batch_size=2, max_steps=1, precision="fp16",
                          device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"needs fp32 trainable weights.*dtype fp32.*LoRA"):
        dpo.train(tiny_llama().half(), cfg, varied_sft(4), collate_sft, export=False)
    # fp32 adapters on an fp16 base pass this check and meet the next one: fp16 autocast needs a GPU
    m = tiny_llama().half()
    modeling.add_lora(m, r=4, alpha=8)
    for p in dpo._trainable(m).values():
        p.data = p.data.float()
    with pytest.raises(ValueError, match="needs a GPU"):
        dpo.train(m, cfg, varied_sft(4), collate_sft, export=False)


# ---------------------------------------------------------------------------------------------------------------
# 2. no reads off the device inside optimizer_step

READS = ("item", "tolist", "__float__", "__int__", "__bool__")  # each makes the CPU wait for the GPU


@pytest.mark.parametrize("mode, reference", [("sft", None), ("dpo", "cache"), ("dpo", "live")])
def test_optimizer_step_reads_nothing_off_the_device(tmp_path, monkeypatch, mode, reference):
    """Steps 1..3 do not log (log_every=100); step 4, the last, does: only log_record reads values."""
    reads, inside = {"optimizer_step": [], "log_record": []}, []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if inside and sys._getframe(1).f_code.co_filename in (dpo.__file__, trainlog.__file__):  # the loop's code
                reads[inside[-1]].append(name)
            return original(self, *args, **kwargs)
        return read

    def watched(fn):
        def call(*args, **kwargs):
            inside.append(fn.__name__)
            try:
                return fn(*args, **kwargs)
            finally:
                inside.pop()
        return call

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    for fn in (dpo.optimizer_step, dpo.log_record):
        monkeypatch.setattr(dpo, fn.__name__, watched(fn))
    cfg = dpo.TrainConfig(mode=mode, out_dir=str(tmp_path), batch_size=2, grad_accum=2, max_steps=4, lr=1e-3,
                          warmup_steps=1, log_every=100, reference=reference or "cache", group_by_length=True,
                          progress=False)
    if mode == "sft":
        dpo.train(tiny_llama(), cfg, varied_sft(8), collate_sft, export=False)
    else:
        dpo.train(tiny_llama(), cfg, varied_dpo(8), collate_dpo, ref_model=tiny_llama(), export=False)
    assert reads["optimizer_step"] == []
    assert reads["log_record"]  # the log line reads the sums (and the gradient norm) once
    (rec,) = log_records(tmp_path)
    assert rec["step"] == 4 and math.isfinite(rec["loss"]) and rec["grad_norm"] > 0


# ---------------------------------------------------------------------------------------------------------------
# 3. length-grouped batches

def test_grouped_batches_hold_each_example_once_per_epoch():
    n, gb = 103, 8  # 12 batches per epoch, 7 examples dropped
    lengths = torch.randint(1, 500, (n,), generator=torch.Generator().manual_seed(0))
    for epoch in range(2):
        steps = range(epoch * 12, (epoch + 1) * 12)
        grouped = [dpo.global_batch_indices(n, gb, 0, s, lengths, group=4) for s in steps]
        plain = [dpo.global_batch_indices(n, gb, 0, s) for s in steps]
        seen = [i for b in grouped for i in b]
        assert len(seen) == len(set(seen)) == 96
        assert set(seen) == {i for b in plain for i in b}  # the same remainder is dropped as without grouping
        assert all(lengths[b].tolist() == sorted(lengths[b].tolist()) for b in grouped)
        assert grouped == [dpo.global_batch_indices(n, gb, 0, s, lengths, group=4) for s in steps]  # pure
    # the batches of an epoch come in random order, not from short to long
    firsts = [lengths[dpo.global_batch_indices(n, gb, 0, s, lengths, group=4)[0]].item() for s in range(12)]
    assert firsts != sorted(firsts)


def test_grouped_batches_pad_much_less():
    n, gb, micro = 4096, 16, 8
    lengths = (torch.randn(n, generator=torch.Generator().manual_seed(0)) * 70 + 237).clamp(20, 512).long()

    def padded(grouped: bool) -> int:  # tokens the model runs over in one epoch, padding included
        total = 0
        for step in range(n // gb):
            idx = dpo.global_batch_indices(n, gb, 0, step, lengths if grouped else None)
            total += sum(micro * lengths[idx[lo:lo + micro]].max().item() for lo in range(0, gb, micro))
        return total

    real = lengths.sum().item()  # n is a multiple of gb: nothing is dropped
    plain, grouped = padded(False), padded(True)
    print(f"padded tokens over one epoch: {plain} random, {grouped} grouped ({real} real)")
    assert grouped < 0.8 * plain and real / grouped > 0.95 and real / plain < 0.8


def test_real_token_share_is_logged(tmp_path):
    feats = varied_sft(12)
    cfg = dpo.TrainConfig(mode="sft", out_dir=str(tmp_path), batch_size=2, grad_accum=2, max_steps=4, lr=1e-3,
                          warmup_steps=1, group_by_length=True, progress=False)
    dpo.train(tiny_llama(), cfg, feats, collate_sft, export=False)
    want = expected_share(feats, 4, 2, 1, 4, dpo.row_lengths(feats, False))
    assert [r["real_token_share"] for r in log_records(tmp_path)] == pytest.approx(want, abs=1e-12)


def test_resume_with_grouped_batches_equals_uninterrupted(tmp_path):
    """Dropout on, linear schedule, AdamW, 5 epochs of 2 steps: the grouped data position follows from the step."""
    def cfg(out, **kw):
        return dpo.TrainConfig(mode="sft", out_dir=str(out), batch_size=2, grad_accum=2, max_steps=9, lr=5e-3,
                               warmup_steps=2, schedule="linear", group_by_length=True, progress=False, **kw)
    feats = varied_sft(10)
    dpo.train(tiny_gpt2(), cfg(tmp_path / "a"), feats, collate_sft, export=False)
    dpo.train(tiny_gpt2(), cfg(tmp_path / "b", stop_at=5), feats, collate_sft, export=False)
    dpo.train(tiny_gpt2(seed=123), cfg(tmp_path / "b", resume=True), feats, collate_sft, export=False)
    a, b = trained(tmp_path / "a", 9), trained(tmp_path / "b", 9)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert without_timing(log_records(tmp_path / "a")) == without_timing(log_records(tmp_path / "b"))


# ---------------------------------------------------------------------------------------------------------------
# 4. the process group's timeout

def test_set_up_gives_the_process_group_a_long_timeout(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(kw["timeout"]))
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun; the fake init leaves the process alone (world 1)
    monkeypatch.delenv("PAL_DIST_TIMEOUT_MIN", raising=False)

    def set_up(**kw):
        cfg = dpo.TrainConfig(mode="sft", out_dir=str(tmp_path), device="cpu", progress=False, **kw)
        dpo.set_up(tiny_llama(), cfg, 8, None)

    set_up()
    monkeypatch.setenv("PAL_DIST_TIMEOUT_MIN", "30")
    set_up()
    set_up(dist_timeout_min=5)  # the option wins over the environment
    assert calls == [timedelta(minutes=240), timedelta(minutes=30), timedelta(minutes=5)]  # one rule: infra/dist.py
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # the caller's process group is kept
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    set_up()
    assert len(calls) == 3
    with pytest.raises(ValueError, match="dist_timeout_min"):
        dpo.TrainConfig(dist_timeout_min=0)


# ---------------------------------------------------------------------------------------------------------------
# 5. DPO at lr 0 under bf16 autocast: the cached reference equals the policy, the loss is ln 2

@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_bf16_autocast_at_lr_0_gives_ln2(tmp_path, lora):
    """Every pair has the same shape, so the cache's batches and the training micro-batches run the same kernels:
    policy and reference agree to the bit in bf16, and the loss is ln 2 to fp32 rounding. A reference cached in
    fp32 instead (autocast not passed on) misses ln 2 by 2e-5 here."""
    policy, ref = tiny_llama(), None
    if lora:
        torch.manual_seed(1)
        modeling.add_lora(policy, r=4, alpha=8)  # B = 0: the adapters start as a no-op; the reference has them off
    else:
        ref = tiny_llama()
    feats = dpo_features(8)
    cfg = dpo.TrainConfig(mode="dpo", out_dir=str(tmp_path), batch_size=4, max_steps=2, lr=0.0, warmup_steps=1,
                          precision="bf16", progress=False)
    dpo.train(policy, cfg, feats, collate_dpo, ref_model=ref, export=False)
    recs = log_records(tmp_path)
    assert recs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and abs(recs[0]["reward_margin"]) < 1e-6
    cached = torch.load(tmp_path / "ref_logps.pt")["logps"]
    with torch.no_grad():
        c, r = dpo.concatenated_forward(tiny_llama(), collate_dpo(feats))  # fp32
    assert not torch.allclose(cached, torch.stack([c, r], 1), atol=1e-4)  # the cache really is bf16


# ---------------------------------------------------------------------------------------------------------------
# 6. two gloo ranks: DPO and its reference cache equal one process; resume equals uninterrupted

def _init(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))


def dpo_cfg(out, batch_size, **kw):
    return dpo.TrainConfig(mode="dpo", out_dir=str(out), batch_size=batch_size, max_steps=3, lr=1e-3,
                           warmup_steps=1, group_by_length=True, progress=False, device="cpu", **kw)


def _dpo_worker(rank, world, port, out_dir):
    _init(rank, world, port)
    try:
        dpo.train(tiny_llama(), dpo_cfg(out_dir, 2), varied_dpo(9), collate_dpo, ref_model=tiny_llama(), export=False)
    finally:
        dist.destroy_process_group()


def test_ddp_dpo_and_its_reference_cache_equal_one_process(tmp_path):
    """2 ranks x 2 pairs == 1 x 4 after 3 steps (an epoch boundary at 2); 9 pairs: ranks cache 5 and 4 of them."""
    mp.spawn(_dpo_worker, args=(2, free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    feats = varied_dpo(9)
    dpo.train(tiny_llama(), dpo_cfg(tmp_path / "one", 4), feats, collate_dpo, ref_model=tiny_llama(), export=False)
    cache = [torch.load(tmp_path / d / "ref_logps.pt")["logps"] for d in ("ddp", "one")]
    torch.testing.assert_close(cache[0], cache[1], atol=1e-5, rtol=0)
    assert (cache[0] != 0).all()
    a, b = trained(tmp_path / "ddp", 3), trained(tmp_path / "one", 3)
    start = tiny_llama().state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)
        assert not torch.equal(a[k], start[k]), k  # trained: not two untouched models compared
    la, lb = log_records(tmp_path / "ddp"), log_records(tmp_path / "one")
    for key in ("loss", "reward_margin", "grad_norm"):  # not the accuracy: at step 1 it compares float noise
        assert [r[key] for r in la] == pytest.approx([r[key] for r in lb], abs=1e-5), key
    # each rank pads its own 2 pairs: the share adds up both ranks' micro-batches
    want = expected_share(feats, 4, 2, 2, 3, dpo.row_lengths(feats, True), dpo_pairs=True)
    assert [r["real_token_share"] for r in la] == pytest.approx(want, abs=1e-12)


def _resume_worker(rank, world, port, out_dir):
    _init(rank, world, port)
    try:
        def cfg(out, **kw):
            return dpo.TrainConfig(mode="sft", out_dir=os.path.join(out_dir, out), batch_size=2, grad_accum=2,
                                   max_steps=5, lr=5e-3, warmup_steps=2, schedule="linear", group_by_length=True,
                                   progress=False, device="cpu", **kw)
        feats = varied_sft(20)  # global batch 8: 2 steps per epoch
        dpo.train(tiny_gpt2(), cfg("a"), feats, collate_sft, export=False)
        dpo.train(tiny_gpt2(), cfg("b", stop_at=2), feats, collate_sft, export=False)
        dpo.train(tiny_gpt2(seed=123), cfg("b", resume=True), feats, collate_sft, export=False)
    finally:
        dist.destroy_process_group()


def test_ddp_resume_equals_uninterrupted(tmp_path):
    """Dropout differs per rank (each rank's random streams are saved and restored), grouped batches, 2.5 epochs."""
    mp.spawn(_resume_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = trained(tmp_path / "a", 5), trained(tmp_path / "b", 5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert without_timing(log_records(tmp_path / "a")) == without_timing(log_records(tmp_path / "b"))
