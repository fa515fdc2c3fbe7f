"""Training checkpoints: everything a run needs to go on exactly where it stopped, written so that a kill at any
moment leaves the last complete checkpoint usable.

    out_dir/ckpt/step-000120/  trainable.safetensors (the trained tensors by name), trainer.pt (optimizer, scheduler,
                               loss scale, progress, config: plain tensors and containers, read with weights_only),
                               rng-rank{r}.pt (every random stream of rank r: dropout differs per rank)
    out_dir/latest.json        {"dir": "ckpt/step-000120", "step": 120}, written once that directory is complete
    out_dir/best.json          {"dir", "score", "step"}: for people; the trainer's own progress keeps the best one
    out_dir/log.jsonl          one JSON line per log record; on resume the records after the checkpoint go
"""
from __future__ import annotations

import json
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from infra.dist import barrier, rank_world
from infra.files import atomic_path, write_json
from infra.hub import load_plain, read_safetensors


def ckpt_name(step: int) -> str:
    return f"ckpt/step-{step:06d}"


def seed_all(seed: int) -> None:
    """Python's, numpy's and torch's random streams from one seed."""
    for fn in (torch.manual_seed, random.seed, np.random.seed):
        fn(seed)


def rng_state() -> dict:
    np_name, np_keys, *np_rest = np.random.get_state()  # np_keys: a uint32 array, saved as an int64 tensor
    return {"python": random.getstate(), "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), *np_rest],
            "torch": torch.get_rng_state(),
            # this rank's GPU only (the current device: dropout draws there); a resume may see fewer GPUs
            "cuda_device": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(rng: dict) -> None:
    version, mt, gauss = rng["python"]
    random.setstate((version, tuple(mt), gauss))  # tuple(): earlier checkpoints stored a list
    np_name, np_keys, *np_rest = rng["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), *np_rest))
    torch.set_rng_state(rng["torch"])
    if not torch.cuda.is_available():
        return
    here = torch.cuda.current_device()
    mine = rng.get("cuda_device")
    if mine is None and here < len(rng.get("cuda") or []):  # earlier checkpoints: every visible GPU's, in a list
        mine = rng["cuda"][here]
    if mine is not None:
        torch.cuda.set_rng_state(mine)  # the current GPU (set_up made it this rank's)


def save(out_dir: Path, step: int, tensors: dict[str, torch.Tensor], state: dict, keep: set[str],
         best_score: float | None = None) -> None:
    """Write ckpt/step-N atomically, then latest.json (and best.json when best_score is given) naming it; delete the
    other checkpoints but those in `keep`. Every rank calls this: rank 0 writes the directory, then each rank adds its
    own random streams."""
    rank, _ = rank_world()
    name = ckpt_name(step)
    if rank == 0:
        ckpt = out_dir / "ckpt"
        for stale in [*ckpt.glob(".tmp-*"), *ckpt.glob(".old-*")]:  # a checkpoint write a kill interrupted
            shutil.rmtree(stale, ignore_errors=True)
        with atomic_path(out_dir / name) as tmp:
            tmp.mkdir()
            save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()},
                      str(tmp / "trainable.safetensors"))
            torch.save(state, tmp / "trainer.pt")
    barrier()
    with atomic_path(out_dir / name / f"rng-rank{rank}.pt") as tmp:
        torch.save(rng_state(), tmp)
    barrier()
    if rank == 0:
        write_json(out_dir / "latest.json", {"dir": name, "step": step})
        if best_score is not None:
            write_json(out_dir / "best.json", {"dir": name, "score": best_score, "step": step})
        for d in (out_dir / "ckpt").glob("step-*"):  # only the latest and those kept (the best) stay
            if str(d.relative_to(out_dir)) not in keep | {name}:
                shutil.rmtree(d, ignore_errors=True)
    barrier()


def read_pointer(path: Path) -> dict:
    """latest.json: {"dir": ..., "step": ...}; a damaged one is named in one error, not in a JSON traceback."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        obj = None
    if not (isinstance(obj, dict) and isinstance(obj.get("dir"), str) and re.fullmatch(r"ckpt/step-\d+", obj["dir"])):
        raise ValueError(f'{path}: corrupt, expected {{"dir": "ckpt/step-N", "step": N}} (a directory in ckpt/); point '
                         "it at a complete ckpt/step-* directory or delete it to start over")
    return obj


def latest(out_dir: Path) -> Path | None:
    """The last complete checkpoint directory, or None (then any log lines are stale: dropped, and checkpoints
    that never completed are mentioned)."""
    pointer = out_dir / "latest.json"
    if pointer.exists():
        return out_dir / read_pointer(pointer)["dir"]
    if rank_world()[0] == 0:
        if any((out_dir / "ckpt").glob("step-*")):
            print(f"{pointer} does not exist (no checkpoint completed); starting from step 0", file=sys.stderr)
        trim_log(out_dir / "log.jsonl", 0)
    return None


def load(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(the trained tensors, the trainer state) of a checkpoint directory; this rank's random streams restored
    (absent when the run saved with fewer ranks: then they stay seeded)."""
    tensors = read_safetensors(ckpt / "trainable.safetensors")
    state = load_plain(ckpt / "trainer.pt")
    rng = ckpt / f"rng-rank{rank_world()[0]}.pt"
    if rng.exists():
        set_rng_state(load_plain(rng))
    if rank_world()[0] == 0:
        print(f"resumed from {ckpt} at step {state['step']}", file=sys.stderr)
        trim_log(ckpt.parent.parent / "log.jsonl", state["step"])
    return tensors, state


def trim_log(path: Path, step: int) -> None:
    """Rewrite log.jsonl atomically with the records of steps <= `step` only: a resumed run writes the later ones
    again. A line cut short by a kill has no newline yet: it goes too."""
    if path.exists():
        lines = path.read_text(encoding="utf-8").split("\n")[:-1]  # complete lines only
        kept = []
        for n, line in enumerate(lines, 1):
            record = json.loads(line) if is_json_object(line) else None
            if record is None or not isinstance(record.get("step"), int):  # said, and dropped: the log is for people
                print(f"{path}:{n}: not a log record, dropped: {line[:80]!r}", file=sys.stderr)
            elif record["step"] <= step:
                kept.append(f"{line}\n")
        with atomic_path(path) as tmp:
            tmp.write_text("".join(kept), encoding="utf-8")


def is_json_object(line: str) -> bool:
    """Does `line` hold one JSON object (a test, so that a damaged log line is not an exception)?"""
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # JSONDecodeError
        return False


def read_cached_logps(path: Path, key: str, shape: tuple) -> torch.Tensor | None:
    """The log-probs cached at `path` under `key` (write_cached_logps), or None when there are none or they are stale
    (another key or shape: said once, then recomputed by the caller)."""
    if not Path(path).exists():
        return None
    saved = load_plain(path)
    logps = saved.get("logps")
    if saved.get("key") == key and logps is not None and tuple(logps.shape) == tuple(shape):
        return logps
    if rank_world()[0] == 0:
        print(f"{path} is stale (other data or weights); recomputing", file=sys.stderr)
    return None


def write_cached_logps(path: Path, key: str, logps: torch.Tensor) -> None:
    """Cache `logps` at `path` under `key` (a digest of everything they depend on), atomically."""
    with atomic_path(path) as tmp:
        torch.save({"key": key, "logps": logps}, tmp)
