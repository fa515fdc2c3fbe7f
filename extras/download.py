"""Fetch PERSONA-CHAT: the official ParlAI archive, checked and extracted into a data directory atomically.

    python extras/download.py --data-dir DIR [--url URL] [--sha256 HEX|''] [--size BYTES]

Then `python extras/data_stats.py --data-dir DIR` reads it (data.load_splits finds DIR or DIR/personachat).
"""
import argparse
import hashlib
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from infra.files import atomic_path  # noqa: E402  (the project's one atomic writer)

# The URL and sha256 ParlAI's personachat task pins.
PERSONACHAT_URL = "http://parl.ai/downloads/personachat/personachat.tgz"
PERSONACHAT_SHA256 = "507cf8641d333240654798870ea584d854ab5261071c5e3521c20d8fa41d5622"


def _has_split_files(d: Path) -> bool:
    return d.is_dir() and any(d.glob("*_self_*.txt"))


def _fetch(url: str, out: Path, size: int | None, sha256: str | None, timeout: float) -> tuple[int, str]:
    """Stream url into out, hashing as it goes; (bytes, sha256 hex) once the size and hash checks pass."""
    h, got = hashlib.sha256(), 0
    with urllib.request.urlopen(url, timeout=timeout) as r, open(out, "wb") as f:
        length = r.headers.get("Content-Length")
        length = int(length) if length is not None else None
        with tqdm(total=length or size, unit="B", unit_scale=True, desc=f"download {url.rsplit('/', 1)[-1]}") as bar:
            for chunk in iter(lambda: r.read(1 << 20), b""):
                f.write(chunk)
                h.update(chunk)
                got += len(chunk)
                bar.update(len(chunk))
    if length is not None and got != length:
        raise IOError(f"{url}: got {got} bytes, the server announced {length} (interrupted download)")
    if size is not None and got != size:
        raise IOError(f"{url}: got {got} bytes, expected {size}")
    if sha256 is not None and h.hexdigest() != sha256.lower():
        raise IOError(f"{url}: sha256 {h.hexdigest()} does not match the expected {sha256}")
    return got, h.hexdigest()


def _extract(archive: Path, out: Path, url: str) -> Path:
    """Extract the archive into out (members with absolute paths, '..' or links are refused); the shallowest
    directory that holds *_self_*.txt files."""
    with tarfile.open(archive, "r:*") as tf:
        for m in tf.getmembers():
            if m.name.startswith(("/", "\\")) or ".." in Path(m.name).parts or m.issym() or m.islnk():
                raise IOError(f"{url}: refusing archive member {m.name!r}")
        tf.extractall(out, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    found = sorted({p.parent for p in out.rglob("*_self_*.txt")}, key=lambda p: len(p.parts))
    if not found:
        raise IOError(f"{url}: the archive holds no *_self_*.txt file")
    return found[0]


def download_personachat(data_dir, url: str = PERSONACHAT_URL, sha256: str | None = PERSONACHAT_SHA256,
                         size: int | None = None, name: str = "personachat", timeout: float = 60.0) -> Path:
    """Fetch and extract the archive into data_dir/name unless PERSONA-CHAT files are already there.

    The download and extraction happen in a temporary directory inside data_dir (same filesystem): the download
    is hashed as it streams, its size checked against `size` and the server's Content-Length, its sha256
    against `sha256`; then the directory that holds the *_self_*.txt files is renamed into place in one step
    (infra/files.py, atomic_path). On any failure nothing is left behind: data_dir never holds a half file, and a
    data_dir
    this call created is removed again. Returns the directory with the files."""
    data_dir = Path(data_dir)
    for cand in (data_dir, data_dir / name):
        if _has_split_files(cand):
            return cand
    target = data_dir / name
    if target.exists():
        raise FileExistsError(f"{target} exists but holds no *_self_*.txt file; remove it or pick another --data-dir")
    created = not data_dir.exists()
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix=f".{name}-download-", dir=data_dir) as work:
            got, digest = _fetch(url, Path(work) / "archive.tgz", size, sha256, timeout)
            found = _extract(Path(work) / "archive.tgz", Path(work) / "extract", url)
            with atomic_path(target) as tmp:
                found.rename(tmp)
    except BaseException:  # clean up, then let the error through
        if created:
            shutil.rmtree(data_dir, ignore_errors=True)
        raise
    print(f"PERSONA-CHAT ({got} bytes, sha256 {digest[:12]}…) extracted to {target}")
    return target


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--url", default=PERSONACHAT_URL)
    ap.add_argument("--sha256", default=PERSONACHAT_SHA256, help="expected sha256 ('' to skip the check)")
    ap.add_argument("--size", type=int, default=None, help="expected size in bytes")
    args = ap.parse_args(argv)
    try:
        d = download_personachat(args.data_dir, url=args.url, sha256=args.sha256 or None, size=args.size)
    except OSError as e:  # URLError, timeouts, refused connections: say what failed, without a traceback
        raise SystemExit(f"extras/download.py: could not fetch {args.url}: {getattr(e, 'reason', e)} "
                         f"(nothing was written to {args.data_dir})")
    print(f"PERSONA-CHAT files in {d}: " + ", ".join(sorted(p.name for p in d.glob("*.txt"))))


if __name__ == "__main__":
    main()
