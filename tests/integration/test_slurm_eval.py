"""``g3dr submit eval`` on the local SLURM cluster: an array over 2 tiny checkpoints x 1 metric (the product
with several metrics is unit-tested), each job a real ``g3dr eval`` (tiny random-weight Inception, synthetic
data), results read back from their logs."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

G3DR = Path(sys.executable).with_name("g3dr")
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def cluster(slurm_cluster):
    if importlib.util.find_spec("g3dr.eval.cli") is None:
        pytest.skip("g3dr eval is not in this checkout")
    slurm_cluster("debug")


def test_eval_array_over_checkpoints_and_metrics(cluster, helper_module, tmp_path):
    from g3dr.data.loader import ensure_synthetic

    fx = helper_module("eval_fixtures")
    cfg = fx.tiny_config(tmp_path)
    fx.make_inception(cfg)
    ensure_synthetic(cfg)  # written once here, not raced by the jobs
    checkpoints = [fx.make_checkpoint(cfg, tmp_path / "run" / f"step-{s}.safetensors", step=s, seed=s) for s in (3, 6)]
    # The jobs share one sqlite store: create its tables once here, or their first connections race on the
    # schema migration (on a cluster, use an MLflow server).
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()
    start = time.monotonic()
    out = subprocess.run(
        [str(G3DR), "submit", "eval", "--checkpoints", *map(str, checkpoints), "--metrics", "nfs", "--time", "10",
         "--wait", "--log-dir", str(tmp_path / "logs"), "--",
         "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--sigma-scales", "1", "--views", "novel",
         "--num-samples", "6", "--device", "cpu", "--no-progress"],
        capture_output=True, text=True, timeout=800)
    logs = {p.parent.name: p.read_text(errors="replace") for p in sorted((tmp_path / "logs").glob("*/*_0_log.out"))}
    errs = "\n".join(p.read_text(errors="replace") for p in (tmp_path / "logs").glob("*/*_0_log.err"))
    assert out.returncode == 0, out.stdout + out.stderr + errs
    print(f"eval array (2 checkpoints x 1 metric) via SLURM: {time.monotonic() - start:.1f}s")
    assert len(logs) == 2 and all(re.fullmatch(r"\d+_[01]", k) for k in logs), sorted(logs)  # array tasks
    lines = [line for text in logs.values() for line in text.splitlines() if line.startswith("evaluated\t")]
    assert len(lines) == 2, logs
    seen = set()
    for line in lines:
        fields = line.split("\t")
        assert fields[-1].startswith("nfs/") and "da/" not in fields[-1], line  # only the metric asked for
        seen.add(Path(fields[1]).name)
    assert seen == {"step-3.safetensors", "step-6.safetensors"}


def test_a_watching_sweep_runs_as_a_job(cluster, helper_module, tmp_path):
    """``g3dr submit eval --sweep DIR --watch``: one job polls DIR, evaluates a checkpoint that appears while it
    runs, and ends cleanly when cancelled (SIGTERM)."""
    from g3dr.data.loader import ensure_synthetic

    fx = helper_module("eval_fixtures")
    cfg = fx.tiny_config(tmp_path)
    ensure_synthetic(cfg)
    run = tmp_path / "run"
    fx.make_checkpoint(cfg, run / "step-3.safetensors", step=3, seed=3)
    out = subprocess.run(
        [str(G3DR), "submit", "eval", "--sweep", str(run), "--watch", "--metrics", "nfs", "--time", "10",
         "--log-dir", str(tmp_path / "logs"), "--", "--poll-seconds", "1", "--sigma-scales", "1",
         "--num-samples", "4", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (job_id,) = re.findall(r"slurm job (\d+)", out.stdout)
    try:
        deadline = time.monotonic() + 400

        def evaluated() -> set[str]:
            return {p.parent.name.split("-step")[0] for p in (run / "eval").glob("*/results.json")}

        while "step-3" not in evaluated():
            assert time.monotonic() < deadline, "the watching sweep did not evaluate step-3"
            time.sleep(1)
        fx.make_checkpoint(cfg, run / "step-6.safetensors", step=6, seed=6)  # appears while the job watches
        while "step-6" not in evaluated():
            assert time.monotonic() < deadline, "the watching sweep did not pick up step-6"
            time.sleep(1)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    log = "\n".join(p.read_text(errors="replace") for p in (tmp_path / "logs").glob("*/*_log.*"))
    assert "eval --sweep" in log and "--watch" in log
