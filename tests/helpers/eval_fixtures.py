"""Tiny checkpoints, data and Inception files for the eval tests (import by path, see tiny_inception.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from g3dr_test_support import load_test_helper as load_helper  # tests/conftest.py: tests/helpers/<name>.py by name

REPO = Path(__file__).resolve().parents[2]


def tiny_config(workdir: Path, *extra: str):
    """configs/tiny.yaml with its synthetic data (16 samples) and stats cache under ``workdir``."""
    from g3dr.config import load_config

    return load_config(REPO / "configs" / "tiny.yaml", [
        f"data.synthetic_dir={workdir / 'synth'}", "data.synthetic_size=16", f"run_dir={workdir / 'run'}",
        f"eval.stats_cache={workdir / 'stats-cache'}", f"eval.inception_weights={workdir / 'inception.pt'}",
        "eval.num_samples=6", "eval.metrics=[is, nfs, da]", *extra])


def make_checkpoint(cfg, path: Path, step: int, seed: int = 0, training_run_id: str = "") -> Path:
    """A random-weight f_trigen of ``cfg`` saved as a real checkpoint file."""
    from g3dr.models.checkpoint_io import save_f_trigen
    from g3dr.models.f_trigen import FTrigen

    torch.manual_seed(seed)
    extra = {"mlflow_run_id": training_run_id} if training_run_id else None
    return save_f_trigen(FTrigen(cfg), cfg, path, step=step, extra_metadata=extra)


def make_inception(cfg) -> Path:
    return load_helper("tiny_inception").save_tiny_inception(cfg.eval.inception_weights)
