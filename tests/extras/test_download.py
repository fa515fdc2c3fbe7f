"""extras/download.py (download_personachat and its command line) against a local HTTP server on 127.0.0.1 serving archives built here.

The reference is the archive the test builds: its bytes, its sha256 (hashlib) and its member files."""
import hashlib
import http.server
import io
import os
import tarfile

import pytest

import data
from extras import download
from conftest import loopback_server

VALID = ("1 your persona: i ski.\n2 your persona: i swim.\n3 hi !\thello , i ski .\n4 cool\tthanks\n"
         "1 your persona: i am a nurse.\n2 hey\thi\n")
TRAIN = "1 your persona: i bake.\n2 hello\thi , i bake bread .\n"


def make_tgz(members: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, text in members.items():
            raw = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))
    return buf.getvalue()


GOOD = make_tgz({"personachat/valid_self_original.txt": VALID, "personachat/train_self_original.txt": TRAIN,
                 "personachat/README.txt": "test archive\n"})
EVIL = make_tgz({"../escape_self_original.txt": VALID})


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/short.tgz":  # announces more bytes than it sends: an interrupted download
            self.send_response(200)
            self.send_header("Content-Length", str(len(GOOD)))
            self.end_headers()
            self.wfile.write(GOOD[:100])
            self.wfile.flush()
            self.close_connection = True
            return
        body = {"/personachat.tgz": GOOD, "/evil.tgz": EVIL}.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    with loopback_server(monkeypatch, Handler) as url:
        yield url


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_download_extract_and_reuse(server, tmp_path, capsys):
    data_dir = tmp_path / "data"
    d = download.download_personachat(data_dir, url=server + "/personachat.tgz", sha256=sha(GOOD), size=len(GOOD))
    assert d == data_dir / "personachat"
    assert (d / "valid_self_original.txt").read_text() == VALID and (d / "train_self_original.txt").read_text() == TRAIN
    assert sorted(os.listdir(data_dir)) == ["personachat"]  # no temporary directory or archive left
    assert "extracted to" in capsys.readouterr().out
    # present -> no network at all (this URL would fail)
    assert download.download_personachat(data_dir, url="http://127.0.0.1:9/nothing.tgz") == d
    # and the parsers read it through the same directory argument
    splits, info = data.load_splits(data_dir)
    assert info.carved and sum(len(v) for v in splits.values()) == 4
    # the command line does the same
    download.main(["--data-dir", str(tmp_path / "cli"), "--url", server + "/personachat.tgz", "--sha256", sha(GOOD)])
    assert "valid_self_original.txt" in capsys.readouterr().out


def test_existing_local_directory(tmp_path):
    (tmp_path / "valid_self_original.txt").write_text(VALID)
    assert download.download_personachat(tmp_path, url="http://127.0.0.1:9/x.tgz") == tmp_path


@pytest.mark.parametrize("path,kw,match", [
    ("/personachat.tgz", {"sha256": "0" * 64}, "does not match"),
    ("/personachat.tgz", {"sha256": None, "size": len(GOOD) + 1}, "expected"),
    ("/short.tgz", {"sha256": None}, "interrupted"),     # the connection closes early
    ("/evil.tgz", {"sha256": sha(EVIL)}, "refusing"),     # '..' member
    ("/missing.tgz", {"sha256": None}, "404"),
])
def test_bad_downloads_leave_nothing(server, tmp_path, path, kw, match):
    fresh = tmp_path / "fresh"          # created by the call: removed again
    existing = tmp_path / "existing"    # already there: left exactly as it was (empty)
    existing.mkdir()
    for data_dir in (fresh, existing):
        with pytest.raises(Exception, match=match):
            download.download_personachat(data_dir, url=server + path, **kw)
    assert not fresh.exists()
    assert os.listdir(existing) == []
    assert not (tmp_path / "escape_self_original.txt").exists()
