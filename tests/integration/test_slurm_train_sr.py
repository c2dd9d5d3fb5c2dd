"""``g3dr submit train-sr`` on the local SLURM cluster: the tiny super-resolution stage as a two-task job (two
ranks, one node), end to end through the CLI. Preemption and requeue are the same job class and trainer as
``g3dr submit train`` (``test_slurm_train.py``); this test is kept short."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
G3DR = Path(sys.executable).with_name("g3dr")
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]
STEPS = 4


def test_submit_train_sr_runs_a_two_task_job(slurm_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    from g3dr.config import load_config
    from g3dr.models.checkpoint_io import save_f_trigen
    from g3dr.models.f_trigen import FTrigen
    from g3dr.models.sr import load_sr

    slurm_cluster("debug")
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    torch.manual_seed(0)
    generator = save_f_trigen(FTrigen(cfg), cfg, tmp_path / "f_trigen.safetensors", source="test")
    run = tmp_path / "run"
    start = time.monotonic()
    out = subprocess.run([str(G3DR), "submit", "train-sr", "--partition", "debug", "--tasks-per-node", "2",
                          "--time", "10", "--wait", "--config", str(REPO / "configs" / "tiny.yaml"),
                          f"run_dir={run}", f"data.synthetic_dir={tmp_path / 'synth'}", f"sr.generator={generator}",
                          f"logging.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"train.total_steps={STEPS}",
                          "train.checkpoint_every=2", "train.global_batch_size=4", "train.image_every=0"],
                         capture_output=True, text=True, timeout=800)
    logs = "\n".join(p.read_text(errors="replace") for p in sorted(run.glob("slurm/*/*_log.*")))
    assert out.returncode == 0, out.stdout + out.stderr + logs
    print(f"two-task tiny train-sr ({STEPS} steps) via SLURM: {time.monotonic() - start:.1f}s")
    assert "train-sr (2 ranks, run_dir" in out.stdout and "g3dr-train-sr" not in out.stderr
    assert "task 0/2" in logs and "global_rank=1(2)" in logs and "train-sr: g3dr train-sr --resume auto" in logs
    assert (run / "checkpoints" / f"step-{STEPS}").is_dir()
    assert load_sr(run / "sr.safetensors").source == "train"

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1 and runs[0].data.tags["g3dr.stage"] == "sr"
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "loss/sr/l1"))
    assert steps == list(range(1, STEPS + 1))
