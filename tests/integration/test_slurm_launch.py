"""The launcher against a real single-node SLURM cluster on this machine (tests/slurm/start_cluster.sh).

Stand-in callables (defined here, pickled by value) prove the protocol end to end: rendezvous of a two-task
job, and a job whose short time limit brings the USR2 signal, whose ``checkpoint()`` requeues it, and whose
requeued run finishes the work exactly once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from g3dr.errors import ConfigError
from g3dr.launchers.jobs import LaunchedJob
from g3dr.launchers.rendezvous import port_from_job_id
from g3dr.launchers.submit import LaunchOptions, job_restarts, submit_jobs, wait_jobs

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]


@pytest.fixture
def cancel_on_exit():
    """Job ids to ``scancel`` when the test ends (a failed test must not leave jobs in the queue)."""
    ids: list[str] = []
    yield ids
    for job_id in ids:
        subprocess.run(["scancel", job_id], capture_output=True)


@pytest.fixture(scope="module")
def cluster(slurm_cluster):
    slurm_cluster("debug")
    import cloudpickle

    # The stand-in jobs live in this test module, which the job process cannot import: ship them by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


class WhoAmI(LaunchedJob):
    """Reports the rendezvous each task computed."""

    name = "whoami"

    def run(self, rdv):
        return {"rank": rdv.rank, "world": rdv.world_size, "local": rdv.local_rank, "addr": rdv.master_addr,
                "port": rdv.master_port, "job": rdv.job_id, "env_rank": os.environ["RANK"],
                "env_port": os.environ["MASTER_PORT"], "source": rdv.source}


class AllReduce(LaunchedJob):
    """Joins a gloo process group from the exported rendezvous and sums ``rank + 1`` over all tasks."""

    name = "all-reduce"

    def run(self, rdv):
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=120))
        total = torch.tensor([rdv.rank + 1.0])
        dist.all_reduce(total)
        dist.destroy_process_group()
        return {"rank": rdv.rank, "node_rank": rdv.node_rank, "node": os.environ["SLURMD_NODENAME"],
                "addr": rdv.master_addr, "port": rdv.master_port, "world": rdv.world_size, "sum": total.item()}


class OneRankFails(LaunchedJob):
    """Rank 1 raises (as on bad data); rank 0 blocks for 10 minutes without noticing, as a rank inside an NCCL
    collective does when a peer dies (gloo notices the closed connection; NCCL waits for its timeout)."""

    name = "one-rank-fails"

    def run(self, rdv):
        if rdv.rank == 1:
            time.sleep(1)
            raise RuntimeError("rank 1 stops on bad data")
        time.sleep(600)
        return "rank 0 finished"


class StepCounter(LaunchedJob):
    """Does ``total`` one-second steps, appending each finished step to ``log``; resumes from the log."""

    name = "step-counter"

    def __init__(self, log: str, total: int, step_s: float = 1.0) -> None:
        super().__init__()
        self.log, self.total, self.step_s = log, total, step_s

    def run(self, rdv):
        path = Path(self.log)
        done = len(path.read_text().split()) if path.exists() else 0
        starts = Path(self.log + ".starts")
        with starts.open("a") as f:
            f.write(f"{done} {self.requeue_count(rdv)} {time.time():.1f}\n")
        for step in range(done, self.total):
            time.sleep(self.step_s)
            with path.open("a") as f:
                f.write(f"{step}\n")
        return {"steps": self.total, "requeues": self.requeue_count(rdv)}


def test_dry_run_prints_sbatch_without_submitting(cluster, tmp_path):
    opts = LaunchOptions(job_name="g3dr-dry", nodes=1, tasks_per_node=2, cpus_per_task=1, time_min=7, mem_gb=2,
                         signal_delay_s=30, partition="debug")
    # Only jobs of this name: other tests' jobs may leave the queue meanwhile.
    queued = ["squeue", "-h", "-n", "g3dr-dry", "-o", "%i"]
    before = subprocess.run(queued, capture_output=True, text=True).stdout
    text = submit_jobs([WhoAmI()], "slurm", tmp_path / "%j", opts, dry_run=True)
    for line in ("#SBATCH --job-name=g3dr-dry", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=2",
                 "#SBATCH --cpus-per-task=1", "#SBATCH --time=7", "#SBATCH --mem=2GB", "#SBATCH --partition=debug",
                 "#SBATCH --signal=USR2@30", f"#SBATCH --output={tmp_path}/%j/%j_0_log.out",
                 "#SBATCH --open-mode=append"):
        assert line in text.splitlines(), f"{line!r} missing from:\n{text}"
    assert "srun" in text and "submitit.core._submit" in text
    assert not any(tmp_path.iterdir()), "a dry run must not write job files"
    assert subprocess.run(queued, capture_output=True, text=True).stdout == before
    array = submit_jobs([WhoAmI()] * 3, "slurm", tmp_path / "%j", opts, dry_run=True)
    assert "#SBATCH --array=0-2%3" in array.splitlines()
    assert f"#SBATCH --output={tmp_path}/%A_%a/%A_%a_0_log.out" in array.splitlines()


def test_clear_errors_for_missing_partition_and_too_many_nodes(cluster, tmp_path):
    with pytest.raises(ConfigError, match="partition 'no-such-partition' does not exist.*debug"):
        submit_jobs([WhoAmI()], "slurm", tmp_path / "%j", LaunchOptions(partition="no-such-partition"))
    with pytest.raises(ConfigError, match=r"--nodes 64 is more than partition 'debug' has \(1 nodes\)"):
        submit_jobs([WhoAmI()], "slurm", tmp_path / "%j", LaunchOptions(nodes=64), dry_run=True)
    with pytest.raises(ConfigError, match="has no GPUs"):
        submit_jobs([WhoAmI()], "slurm", tmp_path / "%j", LaunchOptions(gpus_per_node=1))
    with pytest.raises(ConfigError, match="CPUs per node"):
        submit_jobs([WhoAmI()], "slurm", tmp_path / "%j", LaunchOptions(tasks_per_node=64))
    assert not any(tmp_path.iterdir())


def test_two_task_job_runs_and_agrees_on_rendezvous(cluster, tmp_path, cancel_on_exit):
    start = time.monotonic()
    [job] = submit_jobs([WhoAmI()], "slurm", tmp_path / "%j", LaunchOptions(job_name="g3dr-whoami", tasks_per_node=2,
                                                                             time_min=10))
    cancel_on_exit.append(job.job_id)
    [results] = wait_jobs([job], timeout_s=600, poll_s=0.5)  # the cluster may be busy
    print(f"two-task job {job.job_id}: {time.monotonic() - start:.1f}s from submit to results")
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert {r["world"] for r in results} == {2}
    assert {(r["addr"], r["port"]) for r in results} == {(host, port_from_job_id(job.job_id))}
    assert all(r["env_rank"] == str(r["rank"]) and r["env_port"] == str(r["port"]) for r in results)
    assert {r["source"] for r in results} == {"slurm"}
    assert job.paths.folder == tmp_path / job.job_id, "one log folder per job (%j)"
    assert "master {}:{}, requeue count 0".format(host, port_from_job_id(job.job_id)) in job.paths.stderr.read_text()


def test_two_node_job_meets_at_the_first_node(cluster, slurm_cluster, tmp_path, cancel_on_exit):
    """Partition `multi`: two (virtual) nodes, one task each; a real gloo all-reduce across them."""
    slurm_cluster("multi")
    start = time.monotonic()
    [job] = submit_jobs([AllReduce()], "slurm", tmp_path / "%j",
                        LaunchOptions(job_name="g3dr-2nodes", partition="multi", nodes=2, time_min=5))
    cancel_on_exit.append(job.job_id)
    results = wait_jobs([job], timeout_s=600, poll_s=0.5)[0]
    print(f"two-node all-reduce job {job.job_id}: {time.monotonic() - start:.1f}s")
    assert sorted((r["rank"], r["node_rank"], r["node"]) for r in results) == [(0, 0, "g3dr-vnode1"),
                                                                                 (1, 1, "g3dr-vnode2")]
    assert {(r["addr"], r["port"], r["world"], r["sum"]) for r in results} == {
        ("g3dr-vnode1", port_from_job_id(job.job_id), 2, 3.0)}
    with pytest.raises(ConfigError, match=r"--nodes 3 is more than partition 'multi' has \(2 nodes\)"):
        submit_jobs([AllReduce()], "slurm", tmp_path / "%j", LaunchOptions(partition="multi", nodes=3))


def test_time_limit_signal_checkpoints_requeues_and_finishes(cluster, tmp_path, cancel_on_exit):
    """A 1-minute job with 35 one-second steps (longer than the 30 s between SLURM's time-limit checks):
    USR2 comes early (the signal delay exceeds the limit), the job requeues itself, and the requeued run(s)
    do the remaining steps, each exactly once."""
    total = 35
    log = tmp_path / "steps.txt"
    opts = LaunchOptions(job_name="g3dr-requeue", time_min=1, signal_delay_s=90, max_requeues=3)
    start = time.monotonic()
    [job] = submit_jobs([StepCounter(str(log), total)], "slurm", tmp_path / "%j", opts)
    cancel_on_exit.append(job.job_id)
    result = wait_jobs([job], timeout_s=700, poll_s=1)[0]
    elapsed = time.monotonic() - start
    starts = [line.split() for line in Path(str(log) + ".starts").read_text().splitlines()]
    print(f"requeue job {job.job_id}: {elapsed:.1f}s, runs (steps done at start, requeue count, time): {starts}")
    assert [int(s) for s in log.read_text().split()] == list(range(total)), "every step exactly once, in order"
    assert len(starts) >= 2 and int(starts[0][0]) == 0 and 0 < int(starts[1][0]) < total, starts
    assert [int(s[1]) for s in starts] == list(range(len(starts))), "requeue count logged as 0, 1, ..."
    assert result == {"steps": total, "requeues": len(starts) - 1}
    assert job_restarts(job) == len(starts) - 1
    out = job.paths.stdout.read_text() + job.paths.stderr.read_text()
    assert "Caught signal SIGUSR2" in out and "requeueing, this will be requeue #1" in out


def test_wait_reports_a_job_slurm_ended_without_a_result(cluster, tmp_path, cancel_on_exit):
    [job] = submit_jobs([StepCounter(str(tmp_path / "steps.txt"), total=300)], "slurm", tmp_path / "%j",
                        LaunchOptions(job_name="g3dr-cancelled", time_min=5))
    cancel_on_exit.append(job.job_id)
    deadline = time.monotonic() + 600
    while not (tmp_path / "steps.txt").exists():  # running
        assert time.monotonic() < deadline
        time.sleep(0.2)
    subprocess.run(["scancel", job.job_id], check=True)
    with pytest.raises(RuntimeError, match=f"job {job.job_id} ended in state CANCELLED without a result"):
        wait_jobs([job], timeout_s=120, poll_s=0.5)


def test_a_failed_task_ends_the_others_instead_of_a_collective_timeout(cluster, tmp_path, cancel_on_exit):
    # srun --kill-on-bad-exit=1: rank 0, blocked where it cannot notice that rank 1 is gone, is ended as soon as
    # rank 1 fails instead of holding the allocation until its own timeout.
    [job] = submit_jobs([OneRankFails()], "slurm", tmp_path / "%j",
                        LaunchOptions(job_name="g3dr-one-fails", tasks_per_node=2, time_min=15))
    cancel_on_exit.append(job.job_id)
    began = time.monotonic()
    with pytest.raises((RuntimeError, TimeoutError)):  # RuntimeError once the failure is known
        wait_jobs([job], timeout_s=120, poll_s=0.5)
    state = ""
    while time.monotonic() - began < 120:  # the job itself ends only when SLURM has ended the waiting task
        state = subprocess.run(["scontrol", "show", "job", job.job_id], capture_output=True, text=True).stdout
        if "JobState=RUNNING" not in state and "JobState=COMPLETING" not in state:
            break
        time.sleep(0.5)
    took = time.monotonic() - began
    assert "JobState=FAILED" in state, f"after {took:.0f} s (rank 0 would block for 600 s):\n{state}"
    errors = "".join(p.read_text() for p in (tmp_path / job.job_id).glob("*_log.err"))
    assert "rank 1 stops on bad data" in errors


class SetupSeen(LaunchedJob):
    """Reports what the job script's setup lines exported."""

    name = "setup-seen"

    def run(self, rdv):
        return os.environ.get("G3DR_SETUP_SEEN", "")


def test_operator_sbatch_options_and_setup_lines(cluster, tmp_path, cancel_on_exit, capsys, tiny_config_path):
    """``g3dr submit`` passes an operator's options through: exclude, comment, mail, any --sbatch KEY=VALUE, and
    setup lines that run before the tasks (seen by a real job); too few CPUs for the loader is refused."""
    from g3dr.launchers.main import main

    argv = ["submit", "train", "--executor", "slurm", "--dry-run", "--skip-weights-check", "--config",
            str(tiny_config_path), f"run_dir={tmp_path / 'run'}", "--exclude", "node[01-04]", "--comment", "g3dr test",
            "--mail-user", "ops@example.org", "--mail-type", "END,FAIL", "--sbatch", "reservation=r1",
            "--sbatch", "begin=now+1hour", "--setup", "module load cuda/12.4", "--setup", "export X=1"]
    assert main(argv) == 0
    script = capsys.readouterr().out.splitlines()
    for line in ("#SBATCH --exclude='node[01-04]'", "#SBATCH --comment='g3dr test'", "#SBATCH --mail-user=ops@example.org",
                 "#SBATCH --mail-type=END,FAIL", "#SBATCH --reservation=r1", "#SBATCH --begin=now+1hour",
                 "module load cuda/12.4", "export X=1"):
        assert line in script, f"{line!r} missing from:\n" + "\n".join(script)
    assert script.index("export X=1") < next(i for i, x in enumerate(script) if x.startswith("srun"))

    assert main([*argv[:8], "data.num_workers=4", "--cpus-per-task", "2"]) == 2
    assert "--cpus-per-task 2 is less than data.num_workers + 1 = 5" in capsys.readouterr().err

    opts = LaunchOptions(job_name="g3dr-setup", time_min=5, comment="g3dr-setup-test",
                         setup=("export G3DR_SETUP_SEEN=from-setup",))
    [job] = submit_jobs([SetupSeen()], "slurm", tmp_path / "%j", opts)
    cancel_on_exit.append(job.job_id)
    assert wait_jobs([job], timeout_s=300, poll_s=1.0)[0] == "from-setup"
