"""Fixtures shared by all tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
RELEASE_SAMPLES = SHARED_DATA / "g3dr_release_samples"

# Tests share 2 CPU cores in CI: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def release_samples() -> Path:
    """The 24 real ImageNet photo + 16-bit depth pairs of ``../shared``; skips when absent (plain clone)."""
    if not RELEASE_SAMPLES.is_dir():
        pytest.skip(f"real release samples not found at {RELEASE_SAMPLES} (needs the ../shared checkout)")
    return RELEASE_SAMPLES


@pytest.fixture(scope="session")
def tiny_config_path() -> Path:
    return REPO_ROOT / "configs" / "tiny.yaml"
