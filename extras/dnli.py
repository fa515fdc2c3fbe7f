"""The C.score model in one command: Dialogue NLI fetched, checked and unpacked, roberta-large-mnli fine-tuned on it
(extras/nli_finetune.py), its accuracy on DNLI's test file reported, and the result cached where the GPU presets of
train.sh find it.

    python extras/dnli.py                      # what `bash train.sh nli` runs
    python extras/dnli.py --archive dialogue_nli.zip    # a copy you fetched yourself (still checksum-verified)

Cache (--cache, default $PAL_CACHE/nli-dnli or ~/.cache/pal/nli-dnli):
    data/dnli/dialogue_nli/dialogue_nli_{train,dev,test,verified_test}.jsonl   the archive's files, unpacked
    model/            the fine-tuned classifier (Hugging Face layout; `pal.py --nli` and transformers read it)
    train/            the training run (checkpoints: an interrupted call resumes from the last one)
    finetune.json     pair counts and accuracies (dev picks the weights; test is only measured)
`train.sh gpt2|dialogpt|llama` pass `--nli CACHE/model` once finetune.json is there.

The archive is the one ParlAI's dialogue_nli task fetches (parlai/tasks/dialogue_nli/build.py): Google Drive file
1WtbXCv3vPB5ql6w0FVDmAEMmWadbrCuG, sha256 1164b0d9…5e42; its files sit under dnli/dialogue_nli/ (the teacher in
agents.py reads them there). Their format (one JSON array per file, labels positive / neutral / negative) is read
by extras/nli_finetune.read_pairs.
"""
import argparse
import hashlib
import html.parser
import json
import os
import re
import stat
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.files import atomic_path, read_json  # noqa: E402

DRIVE_ID = "1WtbXCv3vPB5ql6w0FVDmAEMmWadbrCuG"
DNLI_URL = f"https://drive.google.com/uc?export=download&id={DRIVE_ID}"
DNLI_SHA256 = "1164b0d9a0a1a6006891a6d4435a6a813464bc9b1e2f1ec5ce28c47267ad5e42"
SPLITS = {"train": "dialogue_nli_train.jsonl", "dev": "dialogue_nli_dev.jsonl", "test": "dialogue_nli_test.jsonl"}
PAPER_TEST_ACCURACY = 0.841  # PAL paper, its C.score model on DNLI's test set
MAX_DOWNLOAD = 1 << 30       # bytes: the real archive is far smaller; a server sending more is refused
MAX_UNPACKED = 4 << 30       # bytes, all members together (a zip bomb stops here)
MAX_MEMBERS = 1000


def cache_dir() -> Path:
    """$PAL_CACHE/nli-dnli, or ~/.cache/pal/nli-dnli (train.sh looks in the same place)."""
    return Path(os.environ.get("PAL_CACHE") or Path.home() / ".cache" / "pal") / "nli-dnli"


# ---- download ----------------------------------------------------------------------------------------------------

class _FormParser(html.parser.HTMLParser):
    """The first <form>'s action and its hidden inputs: Google Drive's "can't scan this file for viruses" page
    asks the browser to submit such a form (id, export, confirm, uuid) to get the file itself."""

    def __init__(self):
        super().__init__()
        self.action, self.fields, self._in_form = None, {}, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form" and self.action is None:
            self.action, self._in_form = a.get("action") or "", True
        elif tag == "input" and self._in_form and a.get("type") == "hidden" and a.get("name"):
            self.fields[a["name"]] = a.get("value") or ""

    def handle_endtag(self, tag):
        if tag == "form":
            self._in_form = False


def confirm_url(page: str, url: str) -> str | None:
    """The URL Google Drive's confirm page leads to: its form (action + hidden fields), or else a link that carries
    confirm=TOKEN (the older page). None when the page has neither."""
    form = _FormParser()
    form.feed(page)
    if form.action is not None and form.fields:
        action = urllib.parse.urljoin(url, form.action)
        return action + ("&" if "?" in action else "?") + urllib.parse.urlencode(form.fields)
    link = re.search(r'href="([^"]*confirm=[^"]*)"', page)
    return urllib.parse.urljoin(url, html.unescape(link.group(1))) if link else None


def fetch(url: str, out: Path, sha256: str | None, timeout: float = 60.0) -> str:
    """Download url into out, following Google Drive's confirm page once; the sha256 is checked against `sha256`
    (None: not checked). Returns the sha256 hex of what was written."""
    for attempt in range(2):
        with urllib.request.urlopen(url, timeout=timeout) as r:
            if r.headers.get_content_type() == "text/html":  # a web page, not the archive
                page = r.read(1 << 20).decode("utf-8", "replace")
                nxt = confirm_url(page, r.geturl())
                if attempt == 0 and nxt is not None:
                    url = nxt
                    continue
                raise IOError(f"{url}: the server sent a web page instead of the archive (Google Drive's download "
                              "quota?); fetch dialogue_nli.zip in a browser and pass --archive FILE")
            h, got = hashlib.sha256(), 0
            with open(out, "wb") as f:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    got += len(chunk)
                    if got > MAX_DOWNLOAD:
                        raise IOError(f"{url}: more than {MAX_DOWNLOAD} bytes; refusing the rest")
                    f.write(chunk)
                    h.update(chunk)
            length = r.headers.get("Content-Length")
            if length is not None and got != int(length):
                raise IOError(f"{url}: got {got} bytes, the server announced {length} (interrupted download)")
        check_sha256(h.hexdigest(), sha256, url)
        return h.hexdigest()
    raise AssertionError("unreachable: the loop returns or raises")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(got: str, expected: str | None, where) -> None:
    if expected is not None and got != expected.lower():
        raise IOError(f"{where}: sha256 {got} does not match the expected {expected}: not the Dialogue NLI release "
                      "(a changed or damaged file); nothing was unpacked")


# ---- unpacking ---------------------------------------------------------------------------------------------------

def check_member(info: zipfile.ZipInfo, where) -> None:
    """Refuse a member that could write outside the target: an absolute path, a drive letter, '..', a backslash,
    or a symbolic link (Unix mode bits in the upper half of external_attr)."""
    name = info.filename
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or ":" in parts[0] or ".." in parts:
        raise IOError(f"{where}: refusing archive member {name!r} (it would be written outside the target)")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise IOError(f"{where}: refusing archive member {name!r} (a symbolic link)")


def unpack(archive: Path, out: Path) -> None:
    """Extract the zip into the new directory `out`, atomically, after checking every member (check_member) and
    the totals (MAX_MEMBERS, MAX_UNPACKED: declared sizes, and the bytes actually written, which a lying header
    cannot raise past the limit)."""
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise IOError(f"{archive}: {len(infos)} members, more than {MAX_MEMBERS}")
        for info in infos:
            check_member(info, archive)
        if sum(i.file_size for i in infos) > MAX_UNPACKED:
            raise IOError(f"{archive}: unpacks to more than {MAX_UNPACKED} bytes")
        written = 0
        with atomic_path(out) as tmp:
            tmp.mkdir()
            for info in infos:
                target = tmp / info.filename
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        written += len(chunk)
                        if written > MAX_UNPACKED:
                            raise IOError(f"{archive}: unpacks to more than {MAX_UNPACKED} bytes")
                        dst.write(chunk)


def split_files(root: Path) -> dict[str, Path]:
    """{"train", "dev", "test"} -> the DNLI file under root (dnli/dialogue_nli/ in the release; found anywhere, the
    shallowest copy first)."""
    found = {}
    for split, name in SPLITS.items():
        hits = sorted(root.rglob(name), key=lambda p: len(p.parts))
        if not hits:
            raise FileNotFoundError(f"{root}: no {name} (expected the release's dnli/dialogue_nli/{name})")
        found[split] = hits[0]
    return found


def prepare_data(cache: Path, url: str, sha256: str | None, archive: str | None = None) -> dict[str, Path]:
    """The unpacked split files in cache/data, fetched and unpacked once (a second call finds them)."""
    data = cache / "data"
    if data.is_dir():
        return split_files(data)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".dnli-", dir=cache) as work:
        if archive is not None:
            check_sha256(file_sha256(Path(archive)), sha256, archive)
            zpath = Path(archive)
        else:
            zpath = Path(work) / "dialogue_nli.zip"
            print(f"== Dialogue NLI: downloading {url}")
            fetch(url, zpath, sha256)
        unpack(zpath, Path(work) / "data")
        split_files(Path(work) / "data")  # the layout is checked before anything lands in the cache
        with atomic_path(data) as tmp:
            (Path(work) / "data").rename(tmp)
    return split_files(data)


def first_pairs(path: Path, n: int, out: Path) -> Path:
    """The first n rows of a DNLI file (one JSON array), as a JSON array at out: a quick run on a small share."""
    rows = json.loads(path.read_text(encoding="utf-8"))
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(rows[:n]), encoding="utf-8")
    return out


def build(cache: Path, model: str, url: str = DNLI_URL, sha256: str | None = DNLI_SHA256, archive: str | None = None,
          limit: int | None = None, **train_opts) -> dict:
    """Fetch, unpack, fine-tune (extras/nli_finetune.finetune: the dev file picks the weights, the test file is only
    measured); returns finetune.json's report."""
    from extras.nli_finetune import finetune  # imports torch and the core: after the cheap checks
    out = cache / f"limit-{limit}" if limit else cache  # a quick check never lands where the presets look
    if (out / "finetune.json").exists() and (out / "model").is_dir():
        print(f"== {out / 'model'} is built already (delete {out / 'model'} to build it again)")
        return read_json(out / "finetune.json")
    if sha256 is None:
        print("== the archive's sha256 is not checked (--sha256 '')")
    files = prepare_data(cache, url, sha256, archive)
    if limit:
        files = {k: first_pairs(p, limit, out / "pairs" / p.name) for k, p in files.items()}
    # resume: an interrupted run goes on from its last checkpoint (every 10 minutes and at each new best)
    return finetune(model, files["train"], out, valid_path=files["dev"], test_path=files["test"], resume=True,
                    save_minutes=10.0, **train_opts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=None, help="where everything goes (default: $PAL_CACHE/nli-dnli or "
                    "~/.cache/pal/nli-dnli, where train.sh looks)")
    ap.add_argument("--model", default="roberta-large-mnli", help="the NLI model to start from (dir or hub id)")
    ap.add_argument("--url", default=os.environ.get("PAL_DNLI_URL", DNLI_URL), help="where dialogue_nli.zip is "
                    "fetched from (default: $PAL_DNLI_URL, else ParlAI's Google Drive file)")
    ap.add_argument("--sha256", default=DNLI_SHA256, help="expected sha256 of the archive ('' skips the check)")
    ap.add_argument("--archive", default=None, help="a local dialogue_nli.zip instead of the download")
    ap.add_argument("--limit", type=int, default=None, help="only the first N pairs of each file, a quick check "
                    "written to CACHE/limit-N (the presets do not use it)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=0, help="steps between dev evaluations (0: each epoch)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cache = Path(args.cache) if args.cache else cache_dir()
    try:
        report = build(cache, args.model, args.url, args.sha256 or None, args.archive, args.limit, epochs=args.epochs,
                       max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size,
                       eval_every=args.eval_every, seed=args.seed)
    except urllib.error.URLError as e:  # no network, a refused connection, an HTTP error: one line
        sys.exit(f"extras/dnli.py: error: could not fetch {args.url}: {e.reason} (fetch dialogue_nli.zip in a "
                 "browser and pass --archive FILE)")
    except (OSError, ValueError, zipfile.BadZipFile) as e:  # one line naming what failed
        sys.exit(f"extras/dnli.py: error: {e}")
    print(json.dumps(report, indent=2))
    print(f"== DNLI test accuracy {100 * report['test_accuracy_after']:.1f}% (paper: {100 * PAPER_TEST_ACCURACY:.1f}%; "
          f"before fine-tuning {100 * report['test_accuracy_before']:.1f}%)")
    if args.limit:
        print(f"== a quick check on {args.limit} pairs a file: {report['model_dir']} (the presets do not use it)")
    else:
        print(f"== the C.score model: {report['model_dir']} (train.sh's GPU presets pass it as --nli)")


if __name__ == "__main__":
    main()
