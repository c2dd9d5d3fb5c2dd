"""``--executor local``: the same job objects run on this machine through submitit's local executor (no SLURM)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from g3dr.errors import ConfigError
from g3dr.launchers.jobs import CommandJob
from g3dr.launchers.submit import LaunchOptions, submit_jobs, wait_jobs

REPO = Path(__file__).resolve().parents[2]
G3DR = Path(sys.executable).with_name("g3dr")


def test_local_executor_runs_g3dr_commands_in_two_tasks(tmp_path):
    saved = tmp_path / "cfg"
    job = CommandJob([["config", "--config", str(REPO / "configs" / "tiny.yaml"), "--check", "--save", str(saved)]],
                     name="config-check")
    [submitted] = submit_jobs([job], "local", tmp_path / "logs" / "%j", LaunchOptions(tasks_per_node=2, time_min=5))
    results = wait_jobs([submitted], timeout_s=180, poll_s=0.2)[0]
    assert results == [[0], [0]]  # one list of exit codes per task
    assert (saved / "config.yaml").is_file()
    log = submitted.paths.stderr.read_text()
    assert "config-check: task 0/2" in log and "(local), master 127.0.0.1:" in log and "requeue count 0" in log


def test_the_users_log_level_reaches_the_job(tmp_path):
    """``g3dr --log-level WARNING submit ...``: the job's tasks log at WARNING (no INFO line in its log)."""
    from g3dr.log import request_level

    request_level("WARNING")
    try:
        job = CommandJob([["config", "--config", str(REPO / "configs" / "tiny.yaml"), "--check"]], name="quiet")
    finally:
        request_level(None)
    assert job.argv(job.steps[0])[:2] == ["--log-level", "WARNING"]
    [submitted] = submit_jobs([job], "local", tmp_path / "logs" / "%j", LaunchOptions(time_min=5))
    assert wait_jobs([submitted], timeout_s=180, poll_s=0.2)[0] == [0]  # one task: its exit codes
    log = submitted.paths.stderr.read_text()
    assert " INFO " not in log and "quiet: task 0/1" not in log, log[-2000:]


def test_local_executor_reports_a_failing_command(tmp_path):
    job = CommandJob([["config", "--config", str(tmp_path / "missing.yaml"), "--check"]], name="bad")
    [submitted] = submit_jobs([job], "local", tmp_path / "logs" / "%j", LaunchOptions(time_min=5))
    with pytest.raises(Exception, match="exited with status 2"):
        wait_jobs([submitted], timeout_s=180, poll_s=0.2)


def test_local_executor_is_one_node_only(tmp_path):
    with pytest.raises(ConfigError, match="--nodes must be 1"):
        submit_jobs([CommandJob([["config"]])], "local", tmp_path / "%j", LaunchOptions(nodes=2))


def test_submit_cli_checks_before_submitting(tmp_path, tiny_config_path):
    def g3dr(*argv):
        return subprocess.run([str(G3DR), *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path)

    bad_batch = g3dr("submit", "train", "--executor", "local", "--tasks-per-node", "3", "--config",
                     str(tiny_config_path))
    assert bad_batch.returncode == 2 and "not divisible" in bad_batch.stderr and "world size 3" in bad_batch.stderr
    bad_key = g3dr("submit", "train", "--executor", "local", "--config", str(tiny_config_path), "train.nope=1")
    assert bad_key.returncode == 2 and "train.nope" in bad_key.stderr
    no_ck = g3dr("submit", "eval", "--executor", "local", "--checkpoints", str(tmp_path / "none.safetensors"))
    assert no_ck.returncode == 2 and "not found" in no_ck.stderr
    local_dry = g3dr("submit", "train", "--executor", "local", "--dry-run", "--config", str(tiny_config_path))
    assert local_dry.returncode == 0 and "# local executor: 1 job(s)" in local_dry.stdout
    assert "resume='auto'" in local_dry.stdout
    assert not any(tmp_path.iterdir()), "nothing may be written before a job is submitted"


def test_local_prep_array_then_merge(tmp_path, release_samples):
    """The local executor has no job dependencies: the CLI waits for the array, then runs merge + validate."""
    shards = tmp_path / "shards"
    out = subprocess.run([str(G3DR), "submit", "prep", "shards", "--executor", "local", "--num-shard-jobs", "2", "--",
                          "--src", str(release_samples), "--layout", "release", "--out", str(shards), "--resolution",
                          "32", "--shard-size", "8", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "prep shards (2 jobs): finished" in out.stdout and "prep merge + validate: finished" in out.stdout
    import json

    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["num_samples"] == 24 and manifest["num_shards"] == 3
    job_dirs = [d for d in (tmp_path / "shards-slurm").iterdir() if d.name.isdigit()]  # local job ids are pids
    assert len(job_dirs) == 3 and all((d / f"{d.name}_0_result.pkl").is_file() for d in job_dirs)  # 2 + merge
