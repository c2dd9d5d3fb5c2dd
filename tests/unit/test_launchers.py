"""Launcher pieces that need no cluster: sinfo parsing, request checks, rendezvous, options, job pickling."""

from __future__ import annotations

import pickle
import shlex
from pathlib import Path

import pytest

from g3dr.config import load_config
from g3dr.errors import ConfigError
from g3dr.data_prep.cli import ValidateRequest, shards_request_from_args
from g3dr.launchers.cli import check_g3dr_arguments, prep_jobs
from g3dr.launchers.jobs import PrepJob, train_job
from g3dr.launchers.rendezvous import port_from_job_id, rendezvous_from_env
from g3dr.launchers.slurm import check_request, parse_gpu_count, parse_sinfo
from g3dr.launchers.submit import LaunchOptions, early_signal_warning, render_sbatch, slurm_parameters

SINFO = """debug*|1|2|(null)|infinite|up
gpu|4|64|gpu:h100:8(S:0-1)|2-00:00:00|up
gpu|2|32|gpu:h100:8(S:0-1)|2-00:00:00|up
old|3|16+|gpu:2,gpu:1|1:00:00|down
"""


def test_parse_gpu_count():
    assert parse_gpu_count("(null)") == 0
    assert parse_gpu_count("gpu:8") == 8
    assert parse_gpu_count("gpu:h100:8(S:0-1)") == 8
    assert parse_gpu_count("gpu:a100:4,gpu:t4:2") == 6
    assert parse_gpu_count("mps:100") == 0


def test_parse_sinfo_sums_node_groups_and_keeps_minimum_per_node():
    parts = parse_sinfo(SINFO)
    assert set(parts) == {"debug", "gpu", "old"}
    assert parts["debug"].default and parts["debug"].nodes == 1 and parts["debug"].cpus_per_node == 2
    assert parts["debug"].gpus_per_node == 0
    assert parts["gpu"].nodes == 6 and parts["gpu"].cpus_per_node == 32 and parts["gpu"].gpus_per_node == 8
    assert not parts["gpu"].default and parts["gpu"].time_limit == "2-00:00:00"
    assert parts["old"].cpus_per_node == 16 and parts["old"].gpus_per_node == 3 and not parts["old"].up


def test_check_request_errors_name_what_would_fit():
    parts = parse_sinfo(SINFO)
    assert check_request(parts, None, 1, 1, 0, 1).name == "debug"
    assert check_request(parts, "gpu", 6, 8, 8, 4).name == "gpu"
    with pytest.raises(ConfigError, match="partition 'cpu' does not exist.*debug, gpu, old"):
        check_request(parts, "cpu", 1, 1, 0, 1)
    with pytest.raises(ConfigError, match=r"--nodes 7 is more than partition 'gpu' has \(6 nodes\)"):
        check_request(parts, "gpu", 7, 8, 8, 1)
    with pytest.raises(ConfigError, match="has 8 GPUs per node"):
        check_request(parts, "gpu", 1, 16, 16, 1)
    with pytest.raises(ConfigError, match="has no GPUs"):
        check_request(parts, None, 1, 1, 1, 1)
    with pytest.raises(ConfigError, match="CPUs per node"):
        check_request(parts, "gpu", 1, 8, 8, 8)
    with pytest.raises(ConfigError, match="not up"):
        check_request(parts, "old", 1, 1, 0, 1)
    with pytest.raises(ConfigError, match="no default partition"):
        check_request({"gpu": parts["gpu"]}, None, 1, 1, 0, 1)


def test_port_from_job_id_is_stable_distinct_and_in_range():
    assert port_from_job_id("4242") == port_from_job_id(4242) == 14242
    assert port_from_job_id("123") != port_from_job_id("124")
    assert all(10000 <= port_from_job_id(j) < 30000 for j in (0, 1, 19999, 20000, 987654321))
    with pytest.raises(ConfigError):
        port_from_job_id("abc")


def _job_environment(monkeypatch, env):
    """``env`` as the whole scheduler environment of this process (what submitit's JobEnvironment reads)."""
    import os

    for name in list(os.environ):
        if name.startswith(("SLURM_", "SUBMITIT_", "MASTER_", "_TEST_CLUSTER_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_rendezvous_from_slurm_environment(monkeypatch):
    env = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "777", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
           "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_RESTART_COUNT": "2"}
    _job_environment(monkeypatch, env)
    rdv = rendezvous_from_env()
    assert (rdv.master_addr, rdv.master_port) == ("gpu07", 10777)
    assert (rdv.rank, rdv.local_rank, rdv.world_size, rdv.local_world_size, rdv.node_rank) == (5, 1, 8, 4, 1)
    assert rdv.restarts == 2 and rdv.source == "slurm"
    assert rdv.env() == {"MASTER_ADDR": "gpu07", "MASTER_PORT": "10777", "RANK": "5", "LOCAL_RANK": "1",
                         "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"}
    _job_environment(monkeypatch, {k: v for k, v in env.items() if k != "SLURM_NTASKS"})
    with pytest.raises(ConfigError, match="SLURM_NTASKS"):
        rendezvous_from_env()


def test_rendezvous_local_and_single(monkeypatch):
    _job_environment(monkeypatch, {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "31337",
                                   "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "1",
                                   "SUBMITIT_LOCAL_LOCALID": "1"})
    local = rendezvous_from_env()
    assert (local.master_addr, local.master_port, local.rank, local.world_size) == ("127.0.0.1", 21337, 1, 2)
    _job_environment(monkeypatch, {})
    single = rendezvous_from_env()
    assert (single.rank, single.world_size, single.source) == (0, 1, "single")


def test_launch_options_checks_and_parameters():
    opts = LaunchOptions(nodes=2, gpus_per_node=4, cpus_per_task=8, time_min=30, mem_gb=64, account="a", qos="q",
                         constraint="h100", partition="gpu")
    assert opts.ntasks_per_node == 4 and opts.world_size == 8
    params = slurm_parameters(opts)
    assert params["ntasks_per_node"] == 4 and params["gpus_per_node"] == 4 and params["mem"] == "64GB"
    assert (params["account"], params["qos"], params["constraint"], params["partition"]) == ("a", "q", "h100", "gpu")
    assert params["srun_args"] == ["--kill-on-bad-exit=1"]  # a failed rank ends the others, no collective timeout
    assert LaunchOptions(tasks_per_node=3).world_size == 3 and LaunchOptions().world_size == 1
    with pytest.raises(ConfigError, match="one task per GPU"):
        LaunchOptions(gpus_per_node=4, tasks_per_node=2)
    with pytest.raises(ConfigError, match="--nodes must be >= 1"):
        LaunchOptions(nodes=0)
    with pytest.raises(ConfigError, match="--mem-gb"):
        LaunchOptions(mem_gb=0)


def test_signal_delay_must_reach_slurm_and_early_signals_are_named():
    # slurmctld sends the --signal only when its time is non-zero: 0 would leave a job no checkpoint at its limit.
    with pytest.raises(ConfigError, match="--signal-delay-s must be >= 1"):
        LaunchOptions(signal_delay_s=0)
    assert early_signal_warning(LaunchOptions(time_min=60, signal_delay_s=120)) is None
    assert early_signal_warning(LaunchOptions(time_min=1, signal_delay_s=5)) is None  # USR2 25-55 s after start
    assert early_signal_warning(LaunchOptions(time_min=1, signal_delay_s=30)) is not None  # at the first check
    assert "--time 2" in early_signal_warning(LaunchOptions(time_min=2, signal_delay_s=120))


def test_render_sbatch_multi_node_gpu(tmp_path):
    opts = LaunchOptions(job_name="g3dr-train", nodes=4, gpus_per_node=8, cpus_per_task=10, time_min=240,
                         account="proj", qos="high", constraint="h100", partition="gpu", signal_delay_s=120)
    lines = render_sbatch(tmp_path / "%j", opts).splitlines()
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=10", "#SBATCH --time=240", "#SBATCH --account=proj", "#SBATCH --qos=high",
                 "#SBATCH --constraint=h100", "#SBATCH --partition=gpu", "#SBATCH --signal=USR2@120"):
        assert line in lines


def test_jobs_pickle_and_checkpoint_returns_a_requeue_of_themselves():
    job = train_job("configs/tiny.yaml", ["train.total_steps=4"])
    assert job.config == load_config("configs/tiny.yaml", ["train.total_steps=4"]) and job.stage == "f_trigen"
    again = pickle.loads(pickle.dumps(job))
    assert again.config == job.config and again.requeues == 0
    delayed = again.checkpoint()
    assert delayed.function is not again and delayed.function.requeues == 1 and delayed.function.config == job.config
    assert delayed.function.checkpoint().function.requeues == 2
    assert train_job("configs/tiny.yaml", [], "train-sr").stage == "sr"
    prep, merge = prep_jobs(["--src", "s", "--layout", "release", "--out", "o"], 3)
    assert [(j.steps[0].spec.shard_index, j.steps[0].spec.num_jobs) for j in prep] == [(0, 3), (1, 3), (2, 3)]
    assert [j.steps[0].command.split()[-4:] for j in prep] == [["--shard-index", str(i), "--num-shard-jobs", "3"]
                                                             for i in range(3)]
    assert merge.steps[-1] == ValidateRequest(str(Path("o").resolve())) and merge.steps[-1].command.startswith(
        "g3dr prep validate ")
    assert (merge.steps[0].spec.shard_index, merge.steps[0].spec.num_jobs) == (0, 1)
    assert merge.steps[0].command.split()[-4:] == ["--shard-index", "0", "--num-shard-jobs", "1"]
    again = pickle.loads(pickle.dumps(merge))
    assert again.steps == merge.steps and again.checkpoint().function.requeues == 1
    with pytest.raises(ValueError):
        PrepJob([])


def test_prep_requests_are_what_the_commands_they_record_parse():
    """Each prep job's request, parsed once at submission, is what its recorded command (``g3dr prep shards ...
    --shard-index I --num-shard-jobs N``, written to the manifest) parses to: same plan, spec and recorded config as
    running that command by hand; the submitting user's --log-level is part of both."""
    from g3dr.log import request_level

    prep_args = ["--src", "s", "--layout", "release", "--out", "o", "--resolution", "32", "64", "--shard-size", "8",
                 "--no-progress"]
    request_level("WARNING")
    try:
        array, merge = prep_jobs(prep_args, 2)
    finally:
        request_level(None)
    steps = [*(job.steps[0] for job in array), merge.steps[0]]
    for step, (i, n) in zip(steps, [(0, 2), (1, 2), (0, 1)]):
        assert step.command == shlex.join(["g3dr", "--log-level", "WARNING", "prep", "shards", *prep_args,
                                           "--shard-index", str(i), "--num-shard-jobs", str(n)])
        assert shards_request_from_args(check_g3dr_arguments(shlex.split(step.command)[1:]), step.command) == step
        assert step.config["log_level"] == "WARNING" and not step.progress
    assert all(step.source == steps[0].source for step in steps)
    with pytest.raises(ConfigError, match="not after --"):
        prep_jobs([*prep_args, "--shard-index", "1"], 2)
    with pytest.raises(ConfigError, match="unrecognized arguments: --bogus"):
        prep_jobs([*prep_args, "--bogus"], 2)


def test_eval_jobs_are_checkpoints_times_metrics(tmp_path):
    from g3dr.launchers.cli import check_g3dr_arguments, eval_jobs

    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    jobs = eval_jobs([a, b], ["fid", "is"], ["--num-samples", "8"])
    assert [(j.request.checkpoint, j.request.overrides) for j in jobs] == [
        (ck, (f"eval.metrics=[{m}]", "eval.num_samples=8")) for ck in (a, b) for m in ("fid", "is")]
    assert [j.request.checkpoint for j in eval_jobs([a, b], [], [])] == [a, b]
    assert pickle.loads(pickle.dumps(jobs[0])).request == jobs[0].request
    with pytest.raises(ConfigError, match="unrecognized arguments: --bogus"):
        eval_jobs([a], [], ["--bogus"])
    with pytest.raises(ConfigError, match="unrecognized arguments: --bogus"):
        check_g3dr_arguments(["eval", "--checkpoint", a, "--bogus"])


def test_one_stop_signal_is_what_a_launched_training_hands_usr2_to():
    """The trainer and eval share :class:`StopSignal`; a launched job finds the installed one without knowing who
    installed it, and the previous handlers come back on exit."""
    import os
    import signal

    from g3dr.distributed import StopSignal

    before = signal.getsignal(signal.SIGUSR1)
    assert StopSignal.installed() is None
    with StopSignal((signal.SIGTERM, signal.SIGUSR1)) as stop:
        assert StopSignal.installed() is stop and not stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop() and stop.received == signal.SIGUSR1
        inner = StopSignal().install()
        assert StopSignal.installed() is inner
        inner.uninstall()
        assert StopSignal.installed() is stop
    assert StopSignal.installed() is None and signal.getsignal(signal.SIGUSR1) is before
    by_hand = StopSignal()
    by_hand.request()
    assert by_hand() and by_hand.received == signal.SIGTERM
