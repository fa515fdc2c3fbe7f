"""The run directory: one process at a time works in it (a lock), and each stage records what it was built from
(RUN_DIR/stages.json), so that a later call with other settings is refused, or with --redo starts again."""
from __future__ import annotations

import fcntl
import hashlib
import os
import sys
import time
from pathlib import Path

from infra.files import open_nofollow, read_json, write_json
from infra.options import flag


class RunLock:
    """An exclusive lock on RUN_DIR/.lock while this process works there: a second process on the same run is
    refused (two writers would append every row twice). flock is released by the kernel when the process ends,
    so a process killed with -9 leaves no stale lock behind."""

    def __init__(self, run: Path):
        run.mkdir(parents=True, exist_ok=True)
        self.f = open_nofollow(run / ".lock", "a+")  # a planted link is refused, its target left alone
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.seek(0)
            holder = self.f.read().strip() or "another process"
            self.f.close()
            raise RuntimeError(f"{run} is in use by {holder}: wait for it to finish, or use another --run-dir") \
                from None
        self.f.seek(0)
        self.f.truncate()
        self.f.write(f"pid {os.getpid()} ({' '.join(sys.argv[:2])})")
        self.f.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def release(self):
        self.f.close()  # closing the descriptor drops the flock


def file_digests(paths: list[Path]) -> dict:
    """{"file REALPATH": sha256} of each file: a file changed under a run is caught like a changed option."""
    return {f"file {os.path.realpath(p)}": hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def check_parsed(run: Path, parsed: dict[str, str]) -> None:
    """The digests of the bytes a stage's parser read ({path: sha256}) against those the run's stages recorded
    when they started: a data file edited while a run goes on is refused, so that no run mixes two versions."""
    recorded = {k: v for r in read_records(run).values() for k, v in r["options"].items() if k.startswith("file ")}
    for path, digest in parsed.items():
        then = recorded.get(f"file {os.path.realpath(path)}")
        if then is not None and then != digest:
            raise ValueError(f"{path} changed during this run (sha256 {then[:12]} when its stages started, "
                             f"{digest[:12]} as read now): one run never mixes two versions of its data; restore "
                             "the file, or add --redo to start again with it")


def read_records(run: Path) -> dict:
    """RUN_DIR/stages.json: {stage: {"options": {...}, "started": time}}, {} for a new run."""
    return read_json(run / "stages.json") if (run / "stages.json").exists() else {}


UNRECORDED = "(not recorded)"  # added_later's value for an input older records did not note: not checked


def check_untracked(run: Path, output_globs: list[str], trust: bool) -> None:
    """A run directory with stage outputs but no stages.json (made by hand, or by a version that kept no records)
    says nothing of what its outputs were built from: refused, unless the user trusts them (--trust-outputs)."""
    found = sorted(p.name for g in output_globs for p in run.glob(g))
    if found and not (run / "stages.json").exists() and not trust:
        raise ValueError(f"{run} holds outputs ({', '.join(found)}) but no stages.json recording what they were "
                         "built from: add --trust-outputs to take them as built with these options, or use another "
                         "--run-dir")


def wrote_anything(run: Path, pattern: str) -> bool:
    """Is there a file at the glob `pattern` in RUN_DIR, or under a directory it matches?"""
    return any(p.is_file() or any(q.is_file() for q in p.rglob("*")) for p in run.glob(pattern))


def check_records(run: Path, records: dict, now: dict[str, dict], finished: dict[str, bool],
                  outputs: dict[str, str], redo: bool, resume_only: dict | None = None,
                  added_later: dict | None = None, say=print) -> dict:
    """Compare the options each started stage would be built from now (`now`, in stage order) with what it recorded.
    A difference is refused, naming it; with redo=True that stage's and every later stage's outputs (`outputs`: glob
    patterns in RUN_DIR) move to RUN_DIR/superseded/TIME and their records are dropped. resume_only: options checked
    only while a stage is unfinished; added_later: what a record without an option meant (UNRECORDED: it was not
    recorded then, and is not checked). -> the valid records."""
    stages = list(now)
    for k, stage in enumerate(stages):
        if stage not in records:
            continue
        then = {**{n: v for n, v in (added_later or {}).items() if n in now[stage]}, **records[stage]["options"]}
        state = "finished" if finished[stage] else "started"
        ignored = (resume_only or {}).get(stage, ()) if finished[stage] else ()
        changed = [n for n in {**then, **now[stage]} if now[stage].get(n) != then.get(n) and n not in ignored
                   and then.get(n) != UNRECORDED]
        if not changed:
            continue
        if not finished[stage] and not wrote_anything(run, outputs[stage]):  # it failed while loading its inputs
            records.pop(stage)
            write_json(run / "stages.json", records)
            say(f"{stage}: started before with other settings but wrote nothing; it starts with these")
            continue
        what = "; ".join(f"{n if ' ' in n else flag(n)}: {then.get(n)!r} then, {now[stage].get(n)!r} now"
                         for n in changed)
        if not redo:
            raise ValueError(f"{run}: stage {stage} ({state}) was built with other settings ({what}). Keep them, "
                             f"use another --run-dir, or add --redo to start {stage} and the stages after it again")
        old = run / "superseded" / time.strftime("%Y%m%d-%H%M%S")
        for later in stages[k:]:
            for path in run.glob(outputs[later]):
                old.mkdir(parents=True, exist_ok=True)
                os.replace(path, old / path.name)
            records.pop(later, None)
        write_json(run / "stages.json", records)
        say(f"--redo: {stage} and the stages after it start again; their old outputs are in {old}")
        break
    return records


def record_stage(run: Path, records: dict, stage: str, options: dict) -> None:
    """Note in RUN_DIR/stages.json what `stage` is built from, before it writes anything (once)."""
    if stage not in records:
        records[stage] = {"options": options, "started": time.ctime()}
        write_json(run / "stages.json", records)
