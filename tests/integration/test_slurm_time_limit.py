"""``g3dr submit train`` under a real SLURM time limit: SLURM itself signals the job before its 1-minute limit,
the trainer checkpoints, the job requeues itself (submitit's checkpoint/requeue protocol) and resumes from that
checkpoint in the same MLflow run, as often as needed, and ends with the same final step and per-step losses as
an uninterrupted ``--executor local`` run of the same config.

Timing. SLURM's limits are wall-clock and coarse: ``--time`` is whole minutes (1 at least) and slurmctld checks
limits every 30 s, sending ``--signal=USR2@D`` at the first check at most ``D + 30`` s before the limit, i.e.
between 25 and 55 s after the start for ``--time 1 --signal-delay-s 5``. The training must still be running
then, but CPU speed differs by more than 10x between an idle CI machine and a shared, loaded one. So the test
first times a short real training of the same config (``g3dr train``, 10 steps) and sizes ``train.total_steps``
so that the first run would last well past 55 s at that speed; the SLURM job and the uninterrupted local run then
run side by side (one CPU thread each). Should the machine get so much faster meanwhile that the job ends before
SLURM signals it, the pair is run once more with twice the steps. Nothing in the product is slowed for the test.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
G3DR = Path(sys.executable).with_name("g3dr")
TINY = REPO / "configs" / "tiny.yaml"
TIME_MIN = 1
SIGNAL_DELAY_S = 5
# USR2 comes 25 to 55 s after a run's start (slurmctld checks every 30 s: launchers/slurm.py TIME_LIMIT_CHECK_S).
SIGNAL_BY_S = TIME_MIN * 60 - SIGNAL_DELAY_S
CALIBRATION_STEPS = 10
SPEED_MARGIN = 1.3  # the first run's training lasts this much longer than needed at the measured speed
MAX_STEPS = 3000
# One thread per process: the SLURM job (1 CPU) and the local run share the 2-core machine without slowing each
# other, and the calibration measures the same per-process speed.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cluster(slurm_cluster):
    slurm_cluster("debug")


def _overrides(root: Path, synth: Path, steps: int) -> list[str]:
    return [f"run_dir={root / 'run'}", f"data.synthetic_dir={synth}",
            f"logging.mlflow_uri=sqlite:///{root / 'mlflow.db'}", f"train.total_steps={steps}",
            "train.checkpoint_every=100000", "train.image_every=0", "train.log_every=1"]


def _metrics(root: Path) -> tuple[set[str], dict[str, dict[int, tuple[float, float]]]]:
    """Run ids of the MLflow store under ``root`` and, per metric, ``step -> (value, unix time)`` (last logged)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for run in runs:
        for key in ("loss/total", "seconds_per_step"):
            for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp):
                out.setdefault(key, {})[m.step] = (m.value, m.timestamp / 1000)
    return {r.info.run_id for r in runs}, out


def _calibrate(root: Path, synth: Path) -> tuple[float, float]:
    """Seconds per training step (wall clock from step 2 on) and seconds from process start to the first step, of
    `g3dr train` of the tiny config here and now."""
    start = time.time()
    out = subprocess.run([str(G3DR), "train", "--config", str(TINY), *_overrides(root, synth, CALIBRATION_STEPS)],
                         capture_output=True, text=True, timeout=600, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    per_step = _metrics(root)[1]["seconds_per_step"]
    # Wall time between logged steps (it includes the logging itself, which seconds_per_step leaves out).
    stamps = [per_step[s][1] for s in range(2, CALIBRATION_STEPS + 1)]
    step_s = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return step_s, per_step[1][1] - per_step[1][0] - start


def _logs(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(run_dir.glob("slurm/*/*_log.*")))


def _times(pattern: str, text: str) -> list[tuple[float, str]]:
    """(unix time, first group of ``pattern``) of every g3dr log record matching it (records start with the local
    time, possibly after a progress bar on the same line)."""
    found = []
    for m in re.finditer(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) [A-Z]+ +\[rank \d+\] [\w.]+: " + pattern, text):
        found.append((datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp(), m.group(2)))
    return found


def _run_pair(root: Path, synth: Path, steps: int, cancel: list[str]) -> dict:
    """The time-limited SLURM job and the uninterrupted local run of ``steps`` steps, side by side, both through
    `g3dr submit train --wait`; returns their folders, wall times and the SLURM job's id, state and restarts."""
    from g3dr.launchers.slurm import TERMINAL_STATES, job_state

    timed, straight = root / "time-limited", root / "uninterrupted"
    common = ["--wait", "--wait-timeout", "700", "--config", str(TINY)]
    root.mkdir(parents=True)
    start = time.monotonic()
    with open(root / "slurm-submit.log", "w") as slurm_out, open(root / "local-submit.log", "w") as local_out:
        procs = [subprocess.Popen([str(G3DR), "submit", "train", "--partition", "debug", "--time", str(TIME_MIN),
                                   "--signal-delay-s", str(SIGNAL_DELAY_S), "--max-requeues", "8", *common,
                                   *_overrides(timed, synth, steps)], stdout=slurm_out, stderr=subprocess.STDOUT,
                                  env=ENV),
                 subprocess.Popen([str(G3DR), "submit", "train", "--executor", "local", *common,
                                   *_overrides(straight, synth, steps)], stdout=local_out, stderr=subprocess.STDOUT,
                                  env=ENV)]
        ends = [0.0, 0.0]
        try:
            for i in (1, 0):
                procs[i].wait(timeout=800)
                ends[i] = time.monotonic() - start
        finally:
            cancel.extend(p.name for p in (timed / "run" / "slurm").glob("[0-9]*"))
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
    logs = _logs(timed / "run")
    assert procs[1].returncode == 0, (root / "local-submit.log").read_text()[-3000:] + _logs(straight / "run")[-3000:]
    assert procs[0].returncode == 0, (root / "slurm-submit.log").read_text()[-3000:] + logs[-6000:]
    [job_id] = [p.name for p in (timed / "run" / "slurm").iterdir() if p.is_dir()]
    for _ in range(60):  # the result is written before the job ends
        state, restarts = job_state(job_id)
        if state in TERMINAL_STATES:
            break
        time.sleep(1)
    return {"timed": timed, "straight": straight, "logs": logs, "job_id": job_id, "state": state,
            "restarts": restarts, "slurm_s": ends[0], "local_s": ends[1]}


def test_time_limited_training_requeues_and_matches_uninterrupted(cluster, tmp_path, request):
    cancel: list[str] = []
    request.addfinalizer(lambda: [subprocess.run(["scancel", job], capture_output=True) for job in cancel])
    synth = tmp_path / "synth"  # written by the calibration run, read by all runs below
    began = time.monotonic()
    step_s, startup_s = _calibrate(tmp_path / "calibration", synth)
    needed_s = max(SIGNAL_BY_S - startup_s, 20.0)
    steps = max(40, math.ceil(SPEED_MARGIN * needed_s / step_s))
    print(f"calibration ({time.monotonic() - began:.0f}s): {step_s:.3f} s/step, {startup_s:.1f} s to the first "
          f"step -> train.total_steps={steps} (about {steps * step_s:.0f} s of training)")
    assert steps < MAX_STEPS, f"{step_s:.4f} s per step: too fast to be still training when the signal comes"
    for attempt in (1, 2):
        run = _run_pair(tmp_path / f"attempt-{attempt}", synth, steps, cancel)
        stops = _times(r"stopped by a signal at step (\d+) after a checkpoint", run["logs"])
        if any(int(s) < steps for _, s in stops) or attempt == 2:
            break
        print(f"job {run['job_id']} ({steps} steps) was not signalled before its last step ({run['slurm_s']:.0f}s, "
              f"the machine got faster than calibrated): once more with twice the steps")
        steps *= 2
    timed, logs, restarts = run["timed"], run["logs"], run["restarts"]

    # The timeline of the SLURM job, from its rank-0 log (one file, appended to by every run).
    starts = _times(r"train: task 0/1 .*requeue count (\d+)", logs)
    signals = _times(r"train: (USR2) received", logs)
    t0 = starts[0][0] if starts else 0.0
    timeline = sorted([(t, f"run {n} starts") for t, n in starts] + [(t, "USR2") for t, _ in signals]
                      + [(t, f"stopped at step {s}") for t, s in stops])
    print(f"time-limited job {run['job_id']} ({steps} steps): {run['state']}, Restarts={restarts}, "
          f"{run['slurm_s']:.0f}s from submit to the end (uninterrupted local run: {run['local_s']:.0f}s); "
          + ", ".join(f"+{t - t0:.0f}s {what}" for t, what in timeline))

    # SLURM signalled (no one else does here), the trainer checkpointed and the job requeued itself, >= once. A
    # signal during a run's start-up (before the training loop) requeues at once, without a checkpoint of its own.
    sbatch = (timed / "run" / "slurm" / run["job_id"] / f"{run['job_id']}_submission.sh").read_text().splitlines()
    assert f"#SBATCH --time={TIME_MIN}" in sbatch and f"#SBATCH --signal=USR2@{SIGNAL_DELAY_S}" in sbatch
    assert run["state"] == "COMPLETED" and restarts >= 1, (run["state"], restarts, logs[-4000:])
    assert [int(n) for _, n in starts] == list(range(restarts + 1)), "every run logs its requeue count"
    assert 1 <= len(stops) == len(signals) <= restarts, logs[-6000:]
    assert "DUE TO TIME LIMIT" not in logs, "the limit killed a run: it did not requeue before the limit"
    for signal_t, _ in signals:
        run_start = max(t for t, _ in starts if t <= signal_t)
        assert signal_t - run_start < TIME_MIN * 60, "USR2 must come before the time limit"
    for n in range(1, restarts + 1):
        assert f"requeueing, this will be requeue #{n}" in logs
    stopped = [int(s) for _, s in stops]
    assert 0 < stopped[0] and stopped == sorted(set(stopped)) and stopped[-1] < steps, stopped
    for step in stopped:
        assert f"resumed from {timed / 'run' / 'checkpoints' / f'step-{step}'} at step {step}" in logs
    assert (timed / "run" / "checkpoints" / f"step-{steps}").is_dir()
    assert (timed / "run" / "f_trigen.safetensors").is_file()

    # Same final step and per-step losses as the uninterrupted run, in one MLflow run.
    run_ids, metrics = _metrics(timed)
    straight_ids, straight_metrics = _metrics(run["straight"])
    assert len(run_ids) == 1, f"the requeued job must continue the same MLflow run, got {run_ids}"
    losses = {s: v for s, (v, _) in metrics["loss/total"].items()}
    reference = {s: v for s, (v, _) in straight_metrics["loss/total"].items()}
    assert len(straight_ids) == 1 and sorted(losses) == sorted(reference) == list(range(1, steps + 1))
    worst = max(abs(losses[s] - reference[s]) / max(abs(reference[s]), 1e-12) for s in reference)
    print(f"max relative loss difference, time-limited vs uninterrupted, over {steps} steps: {worst:.2e}")
    assert worst <= 1e-6, {s: (losses[s], reference[s]) for s in reference if losses[s] != reference[s]}
