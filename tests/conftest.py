"""Fixtures shared by all tests."""

from __future__ import annotations

import importlib.util
import os
import sys
import types
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


def load_test_module(path: Path, name: str) -> types.ModuleType:
    """The file ``path`` (a helper under tests/) imported as module ``name``, once per session.

    Tests run with ``--import-mode=importlib``, so tests/ is not a package and helpers are imported by path.
    Every caller asking for ``name`` gets the same module object, so a helper's state (the SLURM cluster helper
    remembers whether it started the cluster) is shared by all test files. Test files use the fixtures below;
    helper files reach this function as ``from g3dr_test_support import load_test_module``.
    """
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def load_test_helper(name: str) -> types.ModuleType:
    """``tests/helpers/<name>.py`` as module ``g3dr_test_helper_<name>``."""
    return load_test_module(REPO_ROOT / "tests" / "helpers" / f"{name}.py", f"g3dr_test_helper_{name}")


_support = types.ModuleType("g3dr_test_support", "load_test_module / load_test_helper of tests/conftest.py")
_support.load_test_module, _support.load_test_helper = load_test_module, load_test_helper
sys.modules.setdefault("g3dr_test_support", _support)


@pytest.fixture(scope="session")
def helper_module():
    """``helper_module("eval_fixtures")``: ``tests/helpers/eval_fixtures.py`` as a module (one per session)."""
    return load_test_helper


@pytest.fixture(scope="session")
def slurm_cluster():
    """``slurm_cluster("debug", "multi")`` skips the calling test (with the reason) unless the local SLURM test
    cluster is up with those partitions (default ``debug``), starting it once per session where it can
    (``tests/slurm/cluster.py``); returns the cluster helper module."""
    helper = load_test_module(REPO_ROOT / "tests" / "slurm" / "cluster.py", "g3dr_tests_slurm_cluster")

    def require(*partitions: str) -> types.ModuleType:
        reason = helper.ensure_cluster(partitions or ("debug",))
        if reason:
            pytest.skip(reason)
        return helper

    return require
