"""Files that are never half written, and JSON / JSON-lines readers whose errors name the file and the line."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path


class CheckpointError(ValueError):
    """A file whose content is not what it should be: damaged JSON, a truncated checkpoint, shapes that do not fit."""


def readable_by_all(path: Path) -> None:
    """The modes a plain open() or mkdir() would give under the umask (0644 / 0755 with the usual 022), for `path` and
    everything in it: safetensors writes its files 0600 and a copied read-only file stays 0444, so that an export
    could not be read by another user or overwritten by its owner's tools."""
    mask = os.umask(0)
    os.umask(mask)  # reading the umask means setting it; set back at once
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary sibling of `path` for the caller to create a file or directory at; on success rename it onto
    `path`, on error remove it. Readers see the old `path` or the complete new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{os.urandom(4).hex()}-{path.name}")
    try:
        yield tmp
        readable_by_all(tmp)
        if path.is_dir() and tmp.is_dir():  # rename() cannot replace a non-empty directory: move it aside
            old = path.with_name(f".old-{os.getpid()}-{os.urandom(4).hex()}-{path.name}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()


def open_nofollow(path, mode: str = "r"):
    """`path` opened as text (UTF-8; mode "r", "a" or "a+") without following a symbolic link: a link planted in a run
    directory (RUN_DIR/.lock -> ~/notes.txt) would have its target truncated and rewritten. A link is refused,
    naming it."""
    flags = {"r": os.O_RDONLY, "a": os.O_WRONLY | os.O_APPEND | os.O_CREAT,
             "a+": os.O_RDWR | os.O_APPEND | os.O_CREAT}[mode]
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)  # 0o666: the umask decides, as for open()
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW on a link
            raise ValueError(f"{path} is a symbolic link: refused (this file is written in place; remove the link)") \
                from None
        raise
    return os.fdopen(fd, mode, encoding="utf-8")


def to_json(obj, path, **kw) -> str:
    """json.dumps(obj) with NaN and inf refused (they are not JSON: `Infinity` breaks every other reader), naming the
    file it was meant for."""
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, **kw)
    except ValueError as e:
        raise ValueError(f"{path}: not written: a value is not a finite number ({e})") from None


def write_text(path, text: str) -> None:
    """A text file written atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path, obj) -> None:
    """A JSON file written atomically (indent 2, UTF-8 as is)."""
    write_text(path, to_json(obj, path, indent=2) + "\n")


def read_json(path: Path) -> dict:
    """The JSON object in `path`; an empty file, invalid JSON or another JSON value is a CheckpointError naming it."""
    raw = Path(path).read_bytes()
    if not raw.strip():
        raise CheckpointError(f"{path}: empty file ({len(raw)} bytes; an interrupted download or write?)")
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # re-raised naming the file
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file (blank lines skipped); a bad line is one error naming path:line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON line ({e}): {line[:80]!r}") from None
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """A JSON-lines file written atomically."""
    write_text(path, "".join(to_json(r, path) + "\n" for r in rows))


def append_jsonl(path: Path, row: dict) -> None:
    """One JSON line appended (a training log)."""
    with open_nofollow(path, "a") as f:
        f.write(to_json(row, path) + "\n")


class JsonlWriter:
    """Appends rows to PATH.partial and renames it to PATH when complete, so a finished file is never half
    written and an interrupted run resumes after the last complete line (done_rows)."""

    def __init__(self, path: Path):
        self.path, self.partial = path, path.with_name(path.name + ".partial")
        self.done_rows = []
        if self.partial.exists() or self.partial.is_symlink():  # keep the complete lines of an interrupted run
            with open_nofollow(self.partial) as f:
                lines = f.read().split("\n")[:-1]  # the last piece: cut mid-write
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    self.done_rows.append(json.loads(line))
                except json.JSONDecodeError as e:  # re-raised naming the file and line
                    raise ValueError(f"{self.partial}:{n}: not a JSON line ({e}); delete the file to start this "
                                     "output again") from None
            write_jsonl(self.partial, self.done_rows)
        self.f = open_nofollow(self.partial, "a")

    def write(self, row: dict):
        self.f.write(to_json(row, self.partial) + "\n")
        self.f.flush()

    def finish(self):
        self.f.close()
        os.replace(self.partial, self.path)
