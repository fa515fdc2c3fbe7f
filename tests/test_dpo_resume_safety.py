"""Training runs that stop badly: kill -9 mid-epoch, a crash after log lines past the last checkpoint, checkpoints
by the clock (also under torchrun), the latest checkpoint kept beside the best, and resume files that are corrupt
or crafted to run code when unpickled."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import dpo_features, free_port, sft_features, tiny_llama

import data
import dpo
import model as modeling

V = 64
ROOT = Path(__file__).resolve().parent.parent


def tiny_gpt2(seed=0):
    """GPT-2 with its default dropout 0.1: resuming exactly needs the random streams too."""
    torch.manual_seed(seed)
    return modeling.build_model(modeling.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2))


def sft_cfg(out, **kw):
    return dpo.TrainConfig(**{"mode": "sft", "out_dir": str(out), "batch_size": 2, "lr": 5e-3, "warmup_steps": 2,
                              "schedule": "linear", "progress": False, **kw})


def trained(out_dir, step):
    return load_file(str(Path(out_dir) / "ckpt" / f"step-{step:06d}" / "trainable.safetensors"))


def log_records(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def without_timing(records):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def latest_step(out_dir):
    return json.loads((Path(out_dir) / "latest.json").read_text())["step"]


# ---------------------------------------------------------------------------------------------------------------
# kill -9 during a one-epoch SFT

def one_epoch_sft(out_dir, resume=False, seed=0, eval_seconds=0.0, threads=None):
    """12 steps (24 sequences, batch 2), a checkpoint after each. Each step's evaluation, which comes after the
    step's log line and before its checkpoint, sleeps eval_seconds (drawing no random numbers) so that a parent
    can kill the run there; run as a child process by the test."""
    if threads:
        torch.set_num_threads(threads)  # as many as the parent's: the sums must round the same way

    def eval_fn(model):
        time.sleep(eval_seconds)
        return 0.0

    cfg = sft_cfg(out_dir, epochs=1.0, save_every=1, eval_every=1, resume=resume)
    return dpo.train(tiny_gpt2(seed), cfg, sft_features(24), data.collate_sft, eval_fn=eval_fn, export=False)


def logged_steps(out_dir):
    """Steps of the training records in log.jsonl, complete lines only (a writer may be halfway through one)."""
    path = Path(out_dir) / "log.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [r["step"] for r in map(json.loads, lines) if "eval" not in r]


def test_kill_9_mid_epoch_then_resume_equals_uninterrupted(tmp_path, capsys):
    out = tmp_path / "killed"
    child = (f"import runpy, sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]; t = runpy.run_path("
             f"{__file__!r}); t['one_epoch_sft']({str(out)!r}, eval_seconds=0.2, threads={torch.get_num_threads()})")
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    # kill once step k >= 2 is saved and step k+1 is logged but not saved: the log runs ahead of the checkpoint
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        k = latest_step(out) if (out / "latest.json").exists() else 0
        if k >= 2 and logged_steps(out)[-1] > k:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    k = latest_step(out)
    assert proc.returncode == -signal.SIGKILL and 2 <= k < 12 and logged_steps(out)[-1] == k + 1

    # a fresh process builds its model with another seed: the checkpoint must supply everything
    capsys.readouterr()
    rest = one_epoch_sft(out, resume=True, seed=123)
    assert rest["step"] == 12 and f"at step {k}" in capsys.readouterr().err  # went on from k, not from 0
    full = one_epoch_sft(tmp_path / "full")
    a, b = trained(tmp_path / "full", 12), trained(out, 12)
    assert full["step"] == 12 and set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert logged_steps(out) == list(range(1, 13))  # each step once: the lines of step k+1 were dropped
    assert without_timing(log_records(out)) == without_timing(log_records(tmp_path / "full"))


# ---------------------------------------------------------------------------------------------------------------
# DPO: a crash after log lines past the last checkpoint; the latest checkpoint is kept beside the best

class Crash(Exception):
    pass


def scorer(first_step, crash_at=None, seen=None):
    """eval_fn whose score depends on the step only (1 -> 1.0, 2 -> 3.0 the best, then lower), counting steps
    from first_step; raises Crash at step crash_at (after that step's log line, before its checkpoint)."""
    scores = {1: 1.0, 2: 3.0, 3: 2.0, 4: 2.0, 5: 2.5, 6: 2.0}
    step = [first_step - 1]

    def eval_fn(model):
        step[0] += 1
        if step[0] == crash_at:
            raise Crash(step[0])
        if seen is not None:
            seen.append(step[0])
        return scores[step[0]]
    return eval_fn


def test_dpo_crash_resumes_from_latest_not_best_and_log_has_each_step_once(tmp_path, capsys):
    def run(out, eval_fn, **kw):
        cfg = dpo.TrainConfig(mode="dpo", out_dir=str(out), batch_size=2, max_steps=6, lr=1e-2, warmup_steps=1,
                              eval_every=1, save_every=2, progress=False, **kw)
        return dpo.train(tiny_llama(), cfg, dpo_features(6), data.collate_dpo, eval_fn=eval_fn,
                         ref_model=tiny_llama(), export=False)

    full = run(tmp_path / "full", scorer(1))
    out = tmp_path / "crashed"
    with pytest.raises(Crash):
        run(out, scorer(1, crash_at=5))
    assert [r["step"] for r in log_records(out) if "eval" not in r] == [1, 2, 3, 4, 5]  # step 5: no checkpoint
    assert json.loads((out / "best.json").read_text())["step"] == 2 and latest_step(out) == 4
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["step-000002", "step-000004"]  # best and latest

    seen = []
    capsys.readouterr()
    rest = run(out, scorer(5, seen=seen), resume=True)
    assert "at step 4" in capsys.readouterr().err and seen == [5, 6]  # from the latest, not from the best
    assert rest["step"] == full["step"] == 6 and rest["best_dir"] == full["best_dir"] == "ckpt/step-000002"
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["step-000002", "step-000006"]
    a, b = trained(tmp_path / "full", 6), trained(out, 6)
    assert all(torch.equal(a[n], b[n]) for n in a)
    recs = log_records(out)
    assert [r["step"] for r in recs if "eval" not in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in recs if "eval" in r] == [1, 2, 3, 4, 5, 6]
    assert without_timing(recs) == without_timing(log_records(tmp_path / "full"))


# ---------------------------------------------------------------------------------------------------------------
# checkpoints by the clock

@pytest.mark.parametrize("option", ["save_every", "save_minutes"])
def test_save_options_must_not_be_negative(option):
    with pytest.raises(ValueError, match=f"TrainConfig.{option}"):
        dpo.TrainConfig(**{option: -1})


def latest_seen_by_eval(out_dir, seen):
    """eval_fn: records the step of latest.json (None before the first) at every evaluation; a constant score, so
    the first evaluation alone is a new best (which saves)."""
    def eval_fn(model):
        seen.append(latest_step(out_dir) if (Path(out_dir) / "latest.json").exists() else None)
        return 0.0
    return eval_fn


@pytest.mark.parametrize("minutes, expected", [(1e-9, [None, 1, 2, 3]), (60.0, [None, 1, 1, 1])])
def test_save_minutes_writes_a_checkpoint_when_due(tmp_path, minutes, expected):
    seen = []
    cfg = sft_cfg(tmp_path, max_steps=5, eval_every=1, save_minutes=minutes)
    dpo.train(tiny_gpt2(), cfg, sft_features(4), data.collate_sft, eval_fn=latest_seen_by_eval(tmp_path, seen),
              export=False)
    assert seen[:4] == expected  # an evaluation at step s sees the checkpoints of steps < s


def _save_minutes_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    if rank == 1:  # rank 1's clock never advances: rank 0 alone must decide, or the ranks part ways and hang
        dpo.time.monotonic = lambda: 0.0
    try:
        seen = []
        cfg = sft_cfg(out_dir, max_steps=4, eval_every=1, save_minutes=1e-9, device="cpu")
        dpo.train(tiny_gpt2(), cfg, sft_features(8), data.collate_sft, eval_fn=latest_seen_by_eval(out_dir, seen),
                  export=False)
        if rank == 0:
            (Path(out_dir) / "seen.json").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


def test_save_minutes_under_ddp_rank_0_decides(tmp_path):
    mp.spawn(_save_minutes_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    assert json.loads((tmp_path / "seen.json").read_text()) == [None, 1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "ckpt" / "step-000004").iterdir()) == [
        "rng-rank0.pt", "rng-rank1.pt", "trainable.safetensors", "trainer.pt"]


# ---------------------------------------------------------------------------------------------------------------
# resume files: crafted pickles are refused without running them; corrupt files are named

class Payload:
    """Unpickling this calls open(path, "w"): code run by a crafted checkpoint, visible as a new file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def dpo_run_stopped_at_2(out, resume=False):
    cfg = dpo.TrainConfig(mode="dpo", out_dir=str(out), batch_size=2, max_steps=4, stop_at=None if resume else 2,
                          lr=1e-2, warmup_steps=1, resume=resume, progress=False)
    return dpo.train(tiny_llama(), cfg, dpo_features(4), data.collate_dpo, ref_model=tiny_llama(), export=False)


@pytest.mark.parametrize("name", ["ckpt/step-000002/trainer.pt", "ckpt/step-000002/rng-rank0.pt", "ref_logps.pt"])
def test_crafted_pickle_is_refused_and_not_run(tmp_path, name):
    dpo_run_stopped_at_2(tmp_path)
    marker = tmp_path / "payload-ran"
    torch.save({"logps": Payload(marker), "key": "x", "step": 2}, tmp_path / name)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name}: refusing to unpickle arbitrary objects")):
        dpo_run_stopped_at_2(tmp_path, resume=True)
    assert not marker.exists()
    torch.load(tmp_path / name, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()


@pytest.mark.parametrize("name, content", [
    ("latest.json", b""), ("latest.json", b'{"dir": "ckpt/step-0000'), ("latest.json", b'{"step": 2}'),
    ("ckpt/step-000002/trainable.safetensors", b""), ("ckpt/step-000002/trainable.safetensors", b"garbage" * 9),
    ("ckpt/step-000002/trainer.pt", b""), ("ckpt/step-000002/rng-rank0.pt", b"PK\x03\x04 truncated zip"),
    ("latest.json", b'{"dir": "../../elsewhere", "step": 2}'), ("ckpt/step-000002/trainer.pt", "cut")],
    ids=["latest-empty", "latest-cut", "latest-no-dir", "safetensors-empty", "safetensors-garbage",
         "trainer-empty", "rng-not-zip", "latest-outside", "trainer-truncated"])
def test_corrupt_resume_file_is_named(tmp_path, name, content):
    dpo.train(tiny_gpt2(), sft_cfg(tmp_path, max_steps=4, stop_at=2), sft_features(4), data.collate_sft,
              export=False)
    whole = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(whole[:len(whole) // 10] if content == "cut" else content)  # a zip cut short
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / name))):
        dpo.train(tiny_gpt2(), sft_cfg(tmp_path, max_steps=4, resume=True), sft_features(4), data.collate_sft,
                  export=False)


def test_corrupt_best_json_does_not_lose_the_best_checkpoint(tmp_path):
    """Pruning keeps the best checkpoint that trainer.pt names; best.json is for people, and a damaged one is
    rewritten at the next best."""
    def run(**kw):
        cfg = sft_cfg(tmp_path, max_steps=5, eval_every=1, **kw)
        return dpo.train(tiny_gpt2(), cfg, sft_features(4), data.collate_sft, eval_fn=lambda m: 0.0, export=False)

    run(stop_at=3)
    (tmp_path / "best.json").write_text("")
    assert run(resume=True)["best_dir"] == "ckpt/step-000001"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-000001", "step-000005"]


# ---- issue 23: non-finite values stop training and are never saved ------------------------------------------------

def test_a_non_finite_loss_stops_training_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    """Step 3's logits are NaN (a forward hook): the run stops naming step 3 and the stage, latest.json still names
    step 2's checkpoint (finite weights), nothing is exported and log.jsonl holds no NaN."""
    model, calls = tiny_gpt2(), []

    def poison(module, args, out):
        calls.append(1)
        return out * float("nan") if len(calls) == 3 else out  # one forward per step: batch 2, no accumulation

    model.register_forward_hook(poison)
    cfg = sft_cfg(tmp_path, max_steps=6, save_every=1, log_every=1)
    with pytest.raises(FloatingPointError, match=r"sft: the loss or gradient norm is not finite .* at step 3 in "):
        dpo.train(model, cfg, sft_features(4), data.collate_sft)
    assert latest_step(tmp_path) == 2 and not (tmp_path / "final").exists()
    assert all(torch.isfinite(t).all() for t in trained(tmp_path, 2).values())
    assert [r["step"] for r in log_records(tmp_path)] == [1, 2]  # json.loads would read NaN: none was written


def test_weights_with_nan_are_never_exported(tmp_path):
    model = tiny_gpt2()
    with torch.no_grad():
        model.wte.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=re.escape(f"{tmp_path / 'final'}: not exported")):
        dpo.export_model(model, tmp_path / "final")
    assert not (tmp_path / "final").exists()


def test_a_killed_checkpoint_write_is_cleaned_up_and_a_damaged_log_line_does_not_block_the_resume(tmp_path, capsys):
    """issue 23: each kill during a checkpoint write left a ckpt/.tmp-* directory forever; one corrupt log.jsonl
    line stopped the resume with a JSON traceback naming no file."""
    dpo.train(tiny_gpt2(), sft_cfg(tmp_path, max_steps=4, stop_at=2), sft_features(4), data.collate_sft,
              export=False)
    stale = tmp_path / "ckpt" / ".tmp-999999-0a0b0c0d-step-000003"
    stale.mkdir()
    (stale / "trainer.pt").write_bytes(b"half a checkpoint")
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 2, "lo\n')
    capsys.readouterr()
    dpo.train(tiny_gpt2(), sft_cfg(tmp_path, max_steps=4, resume=True), sft_features(4), data.collate_sft,
              export=False)
    assert not stale.exists() and latest_step(tmp_path) == 4
    assert f"{tmp_path / 'log.jsonl'}:3: not a log record, dropped" in capsys.readouterr().err


def test_exports_are_readable_by_others_as_the_umask_says(tmp_path):
    """issue 23: safetensors writes 0600, so exported models were unreadable to other users."""
    old = os.umask(0o022)
    try:
        dpo.export_model(tiny_gpt2(), tmp_path / "final")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "final").iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes
