"""extras/dnli.py (`bash train.sh nli`): Dialogue NLI fetched through Google Drive's confirm page from a local HTTP
server, checked against its sha256, unpacked safely, fine-tuned on a tiny random RoBERTa, and found by the presets.

The references are what the test builds: a zip in the release's layout (dnli/dialogue_nli/dialogue_nli_*.jsonl, each
one JSON array of {label, sentence1, sentence2, ...}), its sha256 (hashlib), and a task a tiny model learns from a cue
word; the accuracies are measured by transformers' own classifier, not by the code under test."""
import hashlib
import http.server
import io
import json
import os
import random
import subprocess
import urllib.parse
import zipfile
from pathlib import Path

import pytest
import torch

from extras import dnli
from conftest import loopback_server

ROOT = Path(__file__).resolve().parent.parent.parent
LABELS = {0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}
CUE = {"negative": "zero", "neutral": "quite", "positive": "yes"}  # one cue word per DNLI label


def dnli_rows(n: int, seed: int, split: str) -> list[dict]:
    """Rows in DNLI's own keys; the label is carried by a cue word a tiny model can learn."""
    rng = random.Random(seed)
    words = "dogs cats skiing music nurse".split()
    rows = []
    for i in range(n):
        y = rng.choice(sorted(CUE))
        rows.append({"label": y, "sentence1": f"i like {rng.choice(words)} .",
                     "sentence2": f"{CUE[y]} , {rng.choice(words)} .", "triple1": ["i", "like", "x"],
                     "triple2": ["i", "like", "y"], "dtype": "misc_up", "id": f"dialogue_nli_{split}_{i}"})
    return rows


def make_zip(members: dict[str, bytes], links: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, raw in members.items():
            zf.writestr(name, raw)
        for name in links:  # a symbolic link: Unix mode 0o120777 in the upper half of external_attr
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


FILES = {f"dnli/dialogue_nli/dialogue_nli_{s}.jsonl": json.dumps(dnli_rows(n, i, s)).encode()
         for i, (s, n) in enumerate([("train", 160), ("dev", 24), ("test", 40), ("verified_test", 8)])}
GOOD = make_zip({**FILES, "dnli/README.txt": b"a test archive in the release's layout\n"})
TRAVERSAL = make_zip({**FILES, "dnli/../../escaped.jsonl": b"[]"})
SYMLINK = make_zip(FILES, links=("dnli/dialogue_nli/link",))


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class Drive(http.server.BaseHTTPRequestHandler):
    """Google Drive as ParlAI meets it: /uc answers with the "can't scan for viruses" page, whose form leads to
    /download?id=..&export=download&confirm=t&uuid=..; only that request gets the file."""
    seen: list = []

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        q = dict(urllib.parse.parse_qsl(url.query))
        Drive.seen.append(self.path)
        if url.path == "/uc":
            page = ('<html><body>Google Drive can\'t scan this file for viruses.<form id="download-form" '
                    'action="/download" method="get"><input type="submit" value="Download anyway"/>'
                    f'<input type="hidden" name="id" value="{q.get("id", "")}">'
                    '<input type="hidden" name="export" value="download">'
                    '<input type="hidden" name="confirm" value="t">'
                    '<input type="hidden" name="uuid" value="u-123"></form></body></html>').encode()
            return self.reply(page, "text/html; charset=utf-8")
        if url.path == "/download" and q.get("confirm") == "t" and q.get("uuid") == "u-123":
            return self.reply({"good": GOOD, "traversal": TRAVERSAL, "symlink": SYMLINK}[q["id"]],
                              "application/octet-stream")
        if url.path == "/quota":
            return self.reply(b"<html>Too many users have viewed or downloaded this file recently.</html>",
                              "text/html")
        self.send_error(404)

    def reply(self, body: bytes, ctype: str):
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    Drive.seen = []
    with loopback_server(monkeypatch, Drive) as url:
        yield url


def test_constants_are_parlais():
    """The file id and checksum ParlAI's dialogue_nli/build.py pins (copied from the issue, which quotes it)."""
    assert dnli.DRIVE_ID in dnli.DNLI_URL and dnli.DRIVE_ID == "1WtbXCv3vPB5ql6w0FVDmAEMmWadbrCuG"
    assert dnli.DNLI_SHA256 == "1164b0d9a0a1a6006891a6d4435a6a813464bc9b1e2f1ec5ce28c47267ad5e42"


def test_download_through_the_confirm_page_and_unpack(server, tmp_path):
    files = dnli.prepare_data(tmp_path / "cache", f"{server}/uc?export=download&id=good", sha(GOOD))
    assert [p for p in Drive.seen if p.startswith("/download")] == [
        "/download?id=good&export=download&confirm=t&uuid=u-123"]
    for split in ("train", "dev", "test"):
        name = f"dnli/dialogue_nli/dialogue_nli_{split}.jsonl"
        assert files[split] == tmp_path / "cache" / "data" / name
        assert files[split].read_bytes() == FILES[name]
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no work directory left
    Drive.seen = []
    assert dnli.prepare_data(tmp_path / "cache", f"{server}/uc?id=good", sha(GOOD)) == files and not Drive.seen


@pytest.mark.parametrize("archive, message", [("traversal", "outside the target"), ("symlink", "symbolic link")])
def test_unsafe_members_refused(server, tmp_path, capsys, archive, message):
    body = {"traversal": TRAVERSAL, "symlink": SYMLINK}[archive]
    with pytest.raises(SystemExit) as e:
        dnli.main(["--cache", str(tmp_path / "cache"), "--url", f"{server}/uc?id={archive}", "--sha256", sha(body)])
    assert "refusing archive member" in str(e.value) and message in str(e.value)
    assert not (tmp_path / "cache" / "data").exists() and not (tmp_path / "escaped.jsonl").exists()
    assert not list((tmp_path / "cache").iterdir())


def test_checksum_mismatch_refused(server, tmp_path):
    with pytest.raises(SystemExit) as e:
        dnli.main(["--cache", str(tmp_path / "cache"), "--url", f"{server}/uc?id=good"])  # the real release's sha256
    line = str(e.value)
    assert line.startswith("extras/dnli.py: error:") and "\n" not in line
    assert f"sha256 {sha(GOOD)} does not match the expected {dnli.DNLI_SHA256}" in line
    assert not (tmp_path / "cache" / "data").exists()
    # a local copy is checked the same way
    (tmp_path / "dialogue_nli.zip").write_bytes(GOOD)
    with pytest.raises(SystemExit, match="does not match"):
        dnli.main(["--cache", str(tmp_path / "cache"), "--archive", str(tmp_path / "dialogue_nli.zip")])


def test_quota_page_named(server, tmp_path):
    with pytest.raises(SystemExit, match="web page instead of the archive.*--archive FILE"):
        dnli.main(["--cache", str(tmp_path / "cache"), "--url", f"{server}/quota"])


def _tiny_roberta(d: Path) -> None:
    """A tiny random RobertaForSequenceClassification (transformers' init) with a byte-level tokenizer: 256 byte
    symbols after <s> <pad> </s> <unk>, then <mask>; no merges."""
    import transformers
    from infra.tokfiles import byte_to_unicode

    d.mkdir()
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for b in range(256):
        vocab[byte_to_unicode()[b]] = len(vocab)
    vocab["<mask>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    cfg = transformers.RobertaConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=80, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        id2label=LABELS, label2id={v: k for k, v in LABELS.items()}, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    transformers.RobertaForSequenceClassification(cfg).save_pretrained(d)


def test_train_sh_nli_end_to_end_then_the_preset_finds_it(server, tmp_path, one_thread):
    """`bash train.sh nli` from the local server into PAL_CACHE: the classifier learns DNLI's labels (test accuracy
    measured here with transformers on the test file's rows), then `train.sh gpt2` passes --nli CACHE/model and says
    so; an explicit --nli wins; the Chinese preset does not take the English model."""
    import transformers
    base = tmp_path / "base"
    _tiny_roberta(base)
    env = {**os.environ, "PAL_CACHE": str(tmp_path / "pal"), "PAL_DNLI_URL": f"{server}/uc?id=good",
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", "train.sh", "nli", "--model", str(base), "--sha256", sha(GOOD), "--epochs", "5",
                          "--lr", "5e-3", "--batch-size", "16", "--eval-every", "10"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    cache = tmp_path / "pal" / "nli-dnli"
    report = json.loads((cache / "finetune.json").read_text())
    assert (report["train_pairs"], report["valid_pairs"], report["test_pairs"]) == (160, 24, 40)
    assert "DNLI test accuracy" in out.stdout and "paper: 84.1%" in out.stdout

    hf = transformers.RobertaForSequenceClassification.from_pretrained(str(cache / "model")).eval()
    tok = transformers.RobertaTokenizer(str(base / "vocab.json"), str(base / "merges.txt"))
    rows = json.loads(FILES["dnli/dialogue_nli/dialogue_nli_test.jsonl"])
    gold = {"positive": "ENTAILMENT", "neutral": "NEUTRAL", "negative": "CONTRADICTION"}
    with torch.no_grad():
        enc = tok([r["sentence1"] for r in rows], [r["sentence2"] for r in rows], padding=True, return_tensors="pt")
        pred = hf(**enc).logits.argmax(-1).tolist()
    acc = sum(LABELS[p] == gold[r["label"]] for p, r in zip(pred, rows)) / len(rows)
    assert acc >= 0.75, acc
    assert abs(report["test_accuracy_after"] - acc) < 1e-6

    again = subprocess.run(["bash", "train.sh", "nli"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)  # a finished model is reused, not trained again
    assert again.returncode == 0 and "is built already" in again.stdout
    assert json.loads((cache / "finetune.json").read_text()) == report

    dry = {**env, "PAL_DRY_RUN": "1"}
    run = subprocess.run(["bash", "train.sh", "gpt2", "--data-dir", "DATA"], cwd=ROOT, env=dry, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"--nli {cache / 'model'}" in run.stdout.splitlines()[-1]
    assert [line for line in run.stdout.splitlines() if line.startswith("== C.score model: --nli")]
    assert "WARNING" not in run.stderr
    run = subprocess.run(["bash", "train.sh", "gpt2", "--data-dir", "DATA", "--nli", "MINE"], cwd=ROOT, env=dry,
                         capture_output=True, text=True, timeout=120)
    assert "--nli MINE" in run.stdout.splitlines()[-1] and str(cache) not in run.stdout
    run = subprocess.run(["bash", "train.sh", "gpt2-zh", "--data-dir", "DATA"], cwd=ROOT, env=dry,
                         capture_output=True, text=True, timeout=120)
    assert "--nli" not in run.stdout.splitlines()[-1] and "Chinese" in run.stderr


def test_unreachable_url_named(tmp_path):
    from conftest import free_port
    url = f"http://127.0.0.1:{free_port()}/dialogue_nli.zip"
    with pytest.raises(SystemExit) as e:
        dnli.main(["--cache", str(tmp_path / "cache"), "--url", url])
    line = str(e.value)
    assert line.startswith(f"extras/dnli.py: error: could not fetch {url}: ") and "--archive FILE" in line
