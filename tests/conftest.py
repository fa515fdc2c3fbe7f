"""Shared test fixtures: where ../shared lives, and a skip helper for files that may be absent."""
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
