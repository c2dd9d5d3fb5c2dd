"""``--executor local``: the same job objects run on this machine through submitit's local executor (no SLURM)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from g3dr.errors import ConfigError
from g3dr.data_prep.cli import ValidateRequest
from g3dr.launchers.jobs import PrepJob
from g3dr.launchers.submit import LaunchOptions, submit_jobs, wait_jobs

REPO = Path(__file__).resolve().parents[2]
G3DR = Path(sys.executable).with_name("g3dr")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A tiny shard folder with its manifest (4 synthetic samples): what the jobs below validate."""
    from g3dr.data.synth import write_synthetic_shards

    out = tmp_path_factory.mktemp("launch") / "shards"
    write_synthetic_shards(str(out), 4, (32,), shard_size=2, progress=False)
    return out


def test_local_executor_runs_g3dr_commands_in_two_tasks(tmp_path, shards):
    job = PrepJob([ValidateRequest(str(shards), progress=False)], name="validate")
    [submitted] = submit_jobs([job], "local", tmp_path / "logs" / "%j", LaunchOptions(tasks_per_node=2, time_min=5))
    results = wait_jobs([submitted], timeout_s=180, poll_s=0.2)[0]
    assert results == [[0], [0]]  # one list of exit codes per task
    for task in range(2):  # each task validated the folder: its summary line
        lines = submitted.task(task).paths.stdout.read_text().splitlines()
        assert [json.loads(line) for line in lines if line.startswith('{"folder"')] == [
            {"folder": str(shards), "problems": 0, "rejected": 0, "samples": 4, "shards": 2}]
    log = submitted.paths.stderr.read_text()
    assert "validate: task 0/2" in log and "(local), master 127.0.0.1:" in log and "requeue count 0" in log


def test_the_users_log_level_reaches_the_job(tmp_path, shards):
    """``g3dr --log-level WARNING submit ...``: the job's tasks log at WARNING (no INFO line in its log)."""
    from g3dr.log import request_level

    request_level("WARNING")
    try:
        job = PrepJob([ValidateRequest(str(shards), progress=False)], name="quiet")
    finally:
        request_level(None)
    assert job.log_level == "WARNING"
    [submitted] = submit_jobs([job], "local", tmp_path / "logs" / "%j", LaunchOptions(time_min=5))
    assert wait_jobs([submitted], timeout_s=180, poll_s=0.2)[0] == [0]  # one task: its exit codes
    log = submitted.paths.stderr.read_text()
    assert " INFO " not in log and "quiet: task 0/1" not in log, log[-2000:]


def test_local_executor_reports_a_failing_command(tmp_path, shards):
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    next(broken.glob("*.tar")).unlink()  # validate reports the missing shard and exits 1
    job = PrepJob([ValidateRequest(str(broken), progress=False)], name="bad")
    [submitted] = submit_jobs([job], "local", tmp_path / "logs" / "%j", LaunchOptions(time_min=5))
    with pytest.raises(Exception, match="exited with status 1"):
        wait_jobs([submitted], timeout_s=180, poll_s=0.2)


def test_local_executor_is_one_node_only(tmp_path):
    with pytest.raises(ConfigError, match="--nodes must be 1"):
        submit_jobs([PrepJob([ValidateRequest(str(tmp_path))])], "local", tmp_path / "%j", LaunchOptions(nodes=2))


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
    prep_args = ["--src", str(release_samples), "--layout", "release", "--out", str(shards), "--resolution", "32",
                 "--shard-size", "8", "--no-progress"]
    out = subprocess.run([str(G3DR), "submit", "prep", "shards", "--executor", "local", "--num-shard-jobs", "2", "--",
                          *prep_args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "prep shards (2 jobs): finished" in out.stdout and "prep merge + validate: finished" in out.stdout
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["num_samples"] == 24 and manifest["num_shards"] == 3
    # Written last by the merge job: the command that runs it by hand (not submitit's argv), and its arguments.
    assert manifest["command"] == shlex.join(["g3dr", "prep", "shards", *prep_args, "--shard-index", "0",
                                              "--num-shard-jobs", "1"])
    assert manifest["config"]["shard_index"] == 0 and manifest["config"]["num_shard_jobs"] == 1
    assert manifest["config"]["out"] == str(shards) and manifest["config"]["resolution"] == [32]
    job_dirs = [d for d in (tmp_path / "shards-slurm").iterdir() if d.name.isdigit()]  # local job ids are pids
    assert len(job_dirs) == 3 and all((d / f"{d.name}_0_result.pkl").is_file() for d in job_dirs)  # 2 + merge
