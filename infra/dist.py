"""torchrun: the process group, ranks and barriers, and work shared across ranks. Without torchrun (no WORLD_SIZE
in the environment) every function here is the one-process case: rank 0 of 1, barriers are no-ops."""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from infra.files import JsonlWriter, read_jsonl, write_jsonl

# Ranks wait in a collective while rank 0 alone generates (validation, pairs), evaluates or exports, and NCCL's
# watchdog kills a run whose collective waits 10 minutes by default: allow 4 hours unless told otherwise.
DEFAULT_TIMEOUT_MIN = 240.0


def timeout_minutes(minutes: float | None = None) -> float:
    """The one rule for the process group's timeout: the caller's value, else $PAL_DIST_TIMEOUT_MIN, else 240."""
    return minutes or float(os.environ.get("PAL_DIST_TIMEOUT_MIN", DEFAULT_TIMEOUT_MIN))


_started: list[bool] = []  # [True] once start() made the group: stop() leaves only a group made here


def start(minutes: float | None = None) -> Callable[[], None]:
    """Under torchrun (WORLD_SIZE set, also for one process), join the process group: nccl on GPUs, gloo on CPUs.
    A group the caller already started is kept. Returns `barrier` (the team's ../shared/tools/gpu_check.sh waits
    on what pal.start_ranks returns)."""
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return barrier
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                            timeout=timedelta(minutes=timeout_minutes(minutes)))
    _started.append(True)
    return barrier


def stop() -> None:
    """Leave the process group start() made, at the end of a run that went well (a failed rank just exits: its
    peers' collectives time out). A caller's group is the caller's to end; without a group, a no-op."""
    if _started and dist.is_initialized():
        dist.destroy_process_group()
        _started.clear()


def rank_world() -> tuple[int, int]:
    """(this rank, number of ranks): (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_rank0() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def world_size() -> int:
    """Ranks torchrun started (known before the process group is): what turns batches into global batches."""
    return int(os.environ.get("WORLD_SIZE", 1))


def local_device() -> torch.device:
    """This rank's GPU (LOCAL_RANK), or the CPU."""
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def sum_across(t: torch.Tensor) -> torch.Tensor:
    """t summed over the ranks, in place (t itself without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def min_across(t: torch.Tensor) -> torch.Tensor:
    """t's smallest value over the ranks, in place (t itself without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def from_rank0(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's value of t on every rank, in place."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(t, 0)
    return t


def interleave(parts: list[list], n: int) -> list:
    """The n rows of examples[r::world] parts (r = 0..world-1) back in the examples' order."""
    return [parts[i % len(parts)][i // len(parts)] for i in range(n)]


def gather_rows(mine: list, n: int) -> list:
    """Every rank's rows for its examples[rank::world] -> all n rows in order (on every rank)."""
    rank, world = rank_world()
    if world == 1:
        return mine
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return interleave(parts, n)


def write_rows_shared(out: Path, items: list, produce: Callable[[list, JsonlWriter], None]) -> None:
    """Write one JSON line per item into `out`, in the items' order, with produce(items, writer), which resumes after
    writer.done_rows. Under torchrun rank r takes every world-th item into a file of its own (resumable alone), and
    rank 0 interleaves the shards back into `out`."""
    rank, world = rank_world()
    shard = lambda r: out.with_name(f"{out.name}.rank{r}-of-{world}") if world > 1 else out  # noqa: E731
    if not shard(rank).exists():
        writer = JsonlWriter(shard(rank))
        produce(items[rank::world], writer)
        writer.finish()
    if world == 1:
        return
    dist.barrier()
    if rank == 0:
        write_jsonl(out, interleave([read_jsonl(shard(r)) for r in range(world)], len(items)))
        for r in range(world):
            shard(r).unlink()
