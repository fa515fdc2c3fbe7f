"""Where a model's files come from and how they are read: a local directory or a Hugging Face hub id
(snapshot_download), and the checkpoint files in it (safetensors, or pytorch_model.bin loaded with
weights_only: nothing is ever unpickled)."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import torch
from huggingface_hub import get_token, snapshot_download
from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from infra.files import CheckpointError, read_json, write_json


def hf_cache_dir() -> Path:
    """Hugging Face's hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.environ.get("HF_HUB_CACHE") or Path(home).expanduser() / "hub")


HUB_FILES = ["config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
             "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja"]
HUB_BIN_FILES = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]  # if no safetensors
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def resolve_model_dir(name_or_path) -> Path:
    """A directory holding config.json + the weights for `name_or_path`: an existing local directory as is, or a
    hub repo id ("owner/name") through snapshot_download (the local cache only when HF_HUB_OFFLINE is set): HUB_FILES,
    then HUB_BIN_FILES only when no safetensors came, so a repo that has both is never downloaded twice."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: directory has no config.json")
        return path
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not _REPO_ID.fullmatch(name):   # a path
        raise FileNotFoundError(f"unknown model {name!r}: no such directory (expected a directory with config.json "
                                "or a hub repo id like 'owner/name')")
    # HF_HUB_OFFLINE and the cache directory are read now: huggingface_hub reads them once, at import.
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    login = (f"accept its licence on https://huggingface.co/{name} and log in: `hf auth login`, or set HF_TOKEN to "
             "an access token")
    try:
        path = Path(snapshot_download(name, cache_dir=hf_cache_dir(), allow_patterns=HUB_FILES,
                                      local_files_only=offline))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(name, cache_dir=hf_cache_dir(), allow_patterns=HUB_BIN_FILES,
                                          local_files_only=offline))
    except GatedRepoError as e:   # (a subclass of RepositoryNotFoundError, so caught first)
        raise PermissionError(f"hub repo {name!r} is gated: {login}") from e
    except (LocalEntryNotFoundError, HfHubHTTPError) as e:   # not cached / no such repo / hub unreachable
        if (isinstance(e, RepositoryNotFoundError) and getattr(e.response, "status_code", None) == 401
                and get_token() is None):   # tokenless, the hub answers 401 for gated, private and missing repos
            raise PermissionError(f"hub repo {name!r} refused a download without a token: it is gated or private, "
                                  f"or does not exist. If it is gated, {login}") from e
        why = "HF_HUB_OFFLINE is set" if offline else f"{type(e).__name__}: " + str(e).partition("\n")[0]
        raise FileNotFoundError(f"unknown model {name!r}: not a local directory, and not in the Hugging Face "
                                f"cache {hf_cache_dir()} ({why})") from e
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"hub repo {name!r} ({path}) has no config.json")
    return path


# A checkpoint's weights: one file, or shards named by an index. Safetensors first; pytorch_model.bin is read only
# for the older repos that ship nothing else (microsoft/DialoGPT-*, uer/gpt2-chinese-cluecorpussmall).
CHECKPOINT_NAMES = [("model.safetensors", "model.safetensors.index.json"),
                    ("pytorch_model.bin", "pytorch_model.bin.index.json")]


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The first of CHECKPOINT_NAMES present: the single file, or every shard its index's weight_map names."""
    for single, index in CHECKPOINT_NAMES:
        if (model_dir / single).exists():
            return [model_dir / single]
        if (model_dir / index).exists():
            weight_map = read_json(model_dir / index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{model_dir / index}: no \"weight_map\" object (key -> shard file)")
            names = sorted(set(weight_map.values()))
            if outside := [n for n in names if not isinstance(n, str) or Path(n).name != n]:  # "../x", "/etc/x"
                raise CheckpointError(f"{model_dir / index}: shard names must be files in {model_dir}, found "
                                      f"{outside[0]!r}")
            shards = [model_dir / name for name in names]
            if missing := [s.name for s in shards if not s.exists()]:
                raise FileNotFoundError(f"{model_dir}: shard(s) {missing} listed in {index} are missing")
            return shards
    raise FileNotFoundError(f"{model_dir}: no checkpoint (looked for " +
                            ", ".join(name for pair in CHECKPOINT_NAMES for name in pair) + ")")


DIGEST_CACHE = ".weights-digest.json"


def weights_digest(model_dir) -> str:
    """sha256 of a model directory's checkpoint files (their sha256s, by name): the weights a stage was built from,
    recorded with it, so that weights replaced in place are caught. Hashing a large model takes a while, so each
    file's digest is cached beside it in DIGEST_CACHE, keyed by its size and modification time."""
    model_dir = Path(model_dir)
    cache_path = model_dir / DIGEST_CACHE
    cache = read_json(cache_path) if cache_path.is_file() else {}
    files = {}
    for f in checkpoint_files(model_dir):
        st = f.stat()
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
        entry = cache.get(f.name)
        if not (isinstance(entry, dict) and entry.get("stamp") == stamp):
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
            entry = {"stamp": stamp, "sha256": h.hexdigest()}
        files[f.name] = entry
    if files != cache and os.access(model_dir, os.W_OK):  # a read-only model is hashed each time
        write_json(cache_path, files)
    return hashlib.sha256(json.dumps({n: e["sha256"] for n, e in sorted(files.items())}).encode()).hexdigest()


def load_plain(path: Path, mmap: bool = False):
    """torch.load of tensors and plain containers only (weights_only=True): a pickle that names any other global,
    i.e. that would run code while loading, is refused, and so is a corrupt file; the error names the file. The
    one reader of torch files here (pytorch_model.bin; dpo.py's trainer state, random streams, reference cache)."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:   # what weights_only raises on a global it does not allow
        why = re.search(r"Unsupported (global: GLOBAL [\w.]+|operand \w+)", str(e))  # e.g. GLOBAL os.system
        raise CheckpointError(f"{path}: refusing to unpickle arbitrary objects ({why[0] if why else 'not plain data'}"
                              "); loading would run code: delete it unless you trust its source") from None
    except (EOFError, RuntimeError, OSError) as e:  # empty; a zip archive cut short (OSError: EINVAL past its end)
        raise CheckpointError(f"{path}: corrupt or truncated torch file (an interrupted download?): {e}") from None


def load_pytorch_bin(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a pytorch_model.bin (load_plain). mmap for zip-format files, which torch >= 1.6 writes: each
    tensor's pages are read when it is used; the legacy format of older files cannot be mapped and is read whole."""
    sd = load_plain(path, mmap=zipfile.is_zipfile(path))
    if not (isinstance(sd, dict) and all(isinstance(t, torch.Tensor) for t in sd.values())):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    return sd


def checkpoint_reader(path: Path):
    """({key: shape}, read) for one checkpoint file, read(key) -> that tensor. Safetensors: shapes from the header
    alone, and each tensor read through its own short-lived mapping; pytorch_model.bin: the mapped dict."""
    if path.suffix == ".bin":
        tensors = load_pytorch_bin(path)
        return {key: tuple(t.shape) for key, t in tensors.items()}, tensors.__getitem__

    def read(key):
        # Opened for this one tensor, the copy-on-write mapping lets its pages go once the tensor is converted;
        # a tensor already in the wanted dtype on the CPU stays those pages (read lazily, never copied).
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)
    return header_shapes(path), read


def header_shapes(path: Path) -> dict[str, tuple]:
    """{key: shape} of one safetensors file, read from its header alone; a truncated download said plainly."""
    try:
        f = safe_open(str(path), framework="pt")
    except SafetensorError as e:   # a header that does not cover the file: most often a truncated download
        raise CheckpointError(f"{path}: not a complete safetensors file ({path.stat().st_size} bytes: a truncated "
                              f"download, or not safetensors at all): {e}") from e
    with f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def read_all_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in `model_dir`, by its checkpoint name (a small model read whole)."""
    out = {}
    for path in checkpoint_files(Path(model_dir)):
        shapes, read = checkpoint_reader(path)
        out.update({key: read(key) for key in shapes})
    return out


def copy_tokenizer_files(src: Path, out: Path) -> None:
    """The tokenizer files of model directory `src` (HUB_FILES without weights and configs), copied into `out`."""
    skip = ("config.json", "generation_config.json")
    for name in (n for n in HUB_FILES if "safetensors" not in n and n not in skip):
        if (src / name).is_file():
            shutil.copy(src / name, out / name)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file; a missing, empty or truncated file is one error naming it."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except SafetensorError as e:  # empty, truncated or not safetensors at all
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None
