"""``g3dr submit train`` on the local SLURM cluster: the tiny config as a two-task job, uninterrupted on two
(virtual) nodes and preempted + requeued on one node with two tasks; both must end at the same step with the
same per-step losses, the requeued one in a single MLflow run."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from g3dr.launchers.jobs import train_job
from g3dr.launchers.submit import LaunchOptions, job_restarts, submit_jobs, wait_jobs

REPO = Path(__file__).resolve().parents[2]
G3DR = Path(sys.executable).with_name("g3dr")
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]
STEPS = 6


@pytest.fixture(scope="module")
def cluster(slurm_cluster):
    if importlib.util.find_spec("g3dr.train.cli") is None:
        pytest.skip("g3dr train is not in this checkout")
    slurm_cluster("debug", "multi")


def _overrides(root: Path) -> list[str]:
    return [f"run_dir={root / 'run'}", f"data.synthetic_dir={root.parent / 'synth'}",
            f"logging.mlflow_uri=sqlite:///{root / 'mlflow.db'}", f"train.total_steps={STEPS}",
            "train.checkpoint_every=2", "train.global_batch_size=4", "train.image_every=0"]


def _history(root: Path) -> tuple[set[str], dict[int, float]]:
    """Run ids and the last logged ``loss/total`` per step from the run's MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if "g3dr.kind" not in r.data.tags]  # training runs (eval runs carry g3dr.kind)
    losses: dict[int, float] = {}
    for run in runs:
        for m in sorted(client.get_metric_history(run.info.run_id, "loss/total"), key=lambda m: m.timestamp):
            losses[m.step] = m.value
    return {r.info.run_id for r in runs}, losses


def _logs(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(run_dir.glob("slurm/*/*_log.*")))


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    """The tiny config trained by `g3dr submit train --partition multi --nodes 2 --wait` (the CLI, end to end):
    two nodes, one task each."""
    root = tmp_path_factory.mktemp("train") / "straight"
    start = time.monotonic()
    out = subprocess.run([str(G3DR), "submit", "train", "--partition", "multi", "--nodes", "2", "--time", "10",
                          "--wait", "--eval", "--eval-args", "--metrics nfs,da --sigma-scales 1 --num-samples 2",
                          "--config", str(REPO / "configs" / "tiny.yaml"), *_overrides(root)],
                         capture_output=True, text=True, timeout=800)
    elapsed = time.monotonic() - start
    assert out.returncode == 0, out.stdout + out.stderr + _logs(root / "run")
    print(f"uninterrupted two-node tiny training ({STEPS} steps) via SLURM: {elapsed:.1f}s")
    (root / "submit.out").write_text(out.stdout)
    return root


def test_train_eval_queues_a_sweep_after_the_training(uninterrupted):
    """``--eval``: a sweep job that waits for the training job (afterany) and then evaluates its checkpoints."""
    (eval_job,) = re.findall(r"eval sweep: slurm job (\d+) \(after (\d+)\)", (uninterrupted / "submit.out").read_text())
    deadline = time.monotonic() + 600
    while subprocess.run(["squeue", "-h", "-j", eval_job[0]], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, "the eval sweep job did not finish"
        time.sleep(2)
    results = sorted((uninterrupted / "run" / "eval").glob("*/results.json"))
    steps = sorted(int(p.parent.name.split("-step")[1].split("-")[0]) for p in results)
    assert steps and max(steps) == STEPS, (steps, _logs(uninterrupted / "run"))


def test_tiny_config_trains_as_two_task_job(uninterrupted):
    run = uninterrupted / "run"
    assert (run / "checkpoints" / f"step-{STEPS}").is_dir() and (run / "f_trigen.safetensors").is_file()
    logs = _logs(run)
    assert "task 0/2" in logs and "requeue count 0" in logs  # rank 1 logs warnings only; submitit names it:
    assert "global_rank=0(2)" in logs and "global_rank=1(2)" in logs
    assert "node=0(2)" in logs and "node=1(2)" in logs and "master g3dr-vnode1:" in logs
    run_ids, losses = _history(uninterrupted)
    assert len(run_ids) == 1 and sorted(losses) == list(range(1, STEPS + 1)), losses


def test_preempted_training_requeues_and_matches_uninterrupted(uninterrupted, tmp_path, request):
    root = tmp_path / "preempted"
    job = train_job(str(REPO / "configs" / "tiny.yaml"), _overrides(root))
    start = time.monotonic()
    [submitted] = submit_jobs([job], "slurm", root / "run" / "slurm" / "%j",
                              LaunchOptions(job_name="g3dr-train-preempt", tasks_per_node=2, time_min=10))
    request.addfinalizer(lambda: subprocess.run(["scancel", submitted.job_id], capture_output=True))
    # Preempt once training has checkpointed step 2 (as SLURM does: USR2 to every task of the job).
    deadline = time.monotonic() + 600  # the cluster may be busy
    while not (root / "run" / "checkpoints" / "step-2").is_dir():
        assert time.monotonic() < deadline, _logs(root / "run")
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", submitted.job_id], check=True)
    signalled = time.monotonic()
    wait_jobs([submitted], timeout_s=700, poll_s=0.5)
    elapsed = time.monotonic() - start
    logs = _logs(root / "run")
    stopped = [int(s) for s in re.findall(r"stopped by a signal at step (\d+) after a checkpoint", logs)]
    print(f"preempted two-task training: {elapsed:.1f}s total, {time.monotonic() - signalled:.1f}s from the "
          f"signal to the end; stopped at steps {stopped}, restarts {job_restarts(submitted)}")
    assert job_restarts(submitted) == 1
    assert stopped and 2 <= stopped[0] < STEPS, logs
    assert "requeueing, this will be requeue #1" in logs and "requeue count 1" in logs
    assert f"resumed from {root / 'run' / 'checkpoints' / f'step-{stopped[0]}'} at step {stopped[0]}" in logs
    assert (root / "run" / "checkpoints" / f"step-{STEPS}").is_dir()
    run_ids, losses = _history(root)
    straight_ids, straight = _history(uninterrupted)
    assert len(run_ids) == 1, f"the requeued job must continue the same MLflow run, got {run_ids}"
    assert sorted(losses) == sorted(straight) == list(range(1, STEPS + 1))
    worst = max(abs(losses[s] - straight[s]) / max(abs(straight[s]), 1e-12) for s in straight)
    print(f"max relative loss difference preempted vs uninterrupted over {STEPS} steps: {worst:.2e}")
    assert worst <= 1e-6, {s: (losses[s], straight[s]) for s in straight}
