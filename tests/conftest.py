"""Shared test setup: the repository root on sys.path, offline tiktoken files, and the ../shared assets."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
# tiktoken downloads its BPE files at run time; ../shared holds the official ones so tests run offline.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the calling test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the read-only ../shared assets are not beside this checkout)")
    return path


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread than two, by far when other processes share the cores
    (pytestmark = pytest.mark.usefixtures("one_thread") in a test file)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
