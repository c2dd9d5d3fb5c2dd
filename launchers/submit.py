"""A generic submitit layer: one function submits any launched job to SLURM or runs it locally.

``submit_jobs(tasks, "slurm" | "local", folder, options)`` checks the request against the cluster (``sinfo``),
builds the submitit executor, and submits one job (one callable) or a job array (several callables); with
``dry_run=True`` it returns the sbatch script submitit would submit, and submits nothing. ``folder`` holds
submitit's pickles and logs and should contain ``%j`` (one folder per job; ``%A_%a`` for arrays is handled by
submitit). :func:`wait_jobs` waits for results with a timeout, reading states from ``scontrol`` so that it also
works on clusters without an accounting database (where ``sacct``, which submitit polls, is unavailable).
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from g3dr.errors import ConfigError
from g3dr.launchers import slurm
from g3dr.log import get_logger

log = get_logger("g3dr.launchers")

ExecutorKind = Literal["local", "slurm"]


def default_executor() -> ExecutorKind:
    """``slurm`` where ``sbatch`` exists, else ``local``."""
    return "slurm" if slurm.sbatch_available() else "local"


@dataclass
class LaunchOptions:
    """Resources and scheduling of one submission (flags of ``g3dr submit``)."""

    job_name: str = "g3dr"
    partition: str | None = None
    """SLURM partition; None: the cluster's default partition."""
    nodes: int = 1
    gpus_per_node: int = 0
    """GPUs per node; when > 0 there is one task per GPU and ``tasks_per_node`` must equal it or be left at 0."""
    tasks_per_node: int = 0
    """Tasks (ranks) per node; 0: one per GPU, or 1 on a CPU-only request."""
    cpus_per_task: int = 1
    time_min: int = 60
    mem_gb: int | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    signal_delay_s: int = 120
    """USR2 comes this many seconds before the time limit (SLURM sends it up to 30 s earlier: it checks limits
    every 30 s); the job checkpoints and requeues itself on it. Must be >= 1: ``--signal=USR2@0`` sends nothing."""
    max_requeues: int = 50
    """How many time-limit requeues are allowed (preemptions do not count; submitit's ``max_num_timeout``). A long
    training runs as a chain of time-limited runs, one requeue each."""
    array_parallelism: int = 256
    dependency: str | None = None
    """A SLURM dependency (``afterok:123``); set by :func:`submit_jobs` callers chaining jobs."""
    exclude: str | None = None
    """Nodes to leave out (``node[01-04],node17``)."""
    comment: str | None = None
    mail_user: str | None = None
    mail_type: str | None = None
    """``END,FAIL`` etc.; with ``mail_user``."""
    setup: tuple[str, ...] = ()
    """Shell lines run in the job script before the tasks start (``module load cuda/12.4``, ``export X=1``)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """More sbatch options by their long name (``{"reservation": "r1"}``)."""

    def __post_init__(self) -> None:
        for name in ("nodes", "cpus_per_task", "time_min", "max_requeues", "array_parallelism"):
            if getattr(self, name) < 1 and not (name == "max_requeues" and self.max_requeues == 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.gpus_per_node < 0 or self.tasks_per_node < 0:
            raise ConfigError("--gpus-per-node and --tasks-per-node must be >= 0")
        if self.gpus_per_node and self.tasks_per_node not in (0, self.gpus_per_node):
            raise ConfigError(f"one task per GPU: --tasks-per-node {self.tasks_per_node} != --gpus-per-node "
                              f"{self.gpus_per_node} (leave --tasks-per-node out)")
        if self.mem_gb is not None and self.mem_gb < 1:
            raise ConfigError(f"--mem-gb must be >= 1, got {self.mem_gb}")
        if self.signal_delay_s < 1:
            # slurmctld only sends the warning signal when its time is non-zero: @0 would mean no checkpoint at
            # the time limit, only the kill.
            raise ConfigError(f"--signal-delay-s must be >= 1 (SLURM sends no time-limit signal with 0), "
                              f"got {self.signal_delay_s}")

    @property
    def ntasks_per_node(self) -> int:
        return self.gpus_per_node or self.tasks_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node


def slurm_parameters(options: LaunchOptions) -> dict[str, Any]:
    """submitit ``SlurmExecutor`` parameters (sbatch's names) for ``options``."""
    params: dict[str, Any] = {
        "job_name": options.job_name, "nodes": options.nodes, "ntasks_per_node": options.ntasks_per_node,
        "cpus_per_task": options.cpus_per_task, "time": options.time_min, "signal_delay_s": options.signal_delay_s,
        "array_parallelism": options.array_parallelism,
        # One task failing (bad data, OOM, a crash) ends the step's other tasks at once; without it they
        # would wait in their next collective until distributed.timeout_minutes, holding the allocation.
        "srun_args": ["--kill-on-bad-exit=1"],
    }
    if options.gpus_per_node:
        params["gpus_per_node"] = options.gpus_per_node
    for key, value in (("partition", options.partition), ("account", options.account), ("qos", options.qos),
                       ("constraint", options.constraint), ("dependency", options.dependency),
                       ("exclude", options.exclude), ("comment", options.comment), ("mail_user", options.mail_user),
                       ("mail_type", options.mail_type)):
        if value:
            params[key] = value
    if options.setup:
        params["setup"] = list(options.setup)
    if options.mem_gb is not None:
        params["mem"] = f"{options.mem_gb}GB"
    if options.extra:
        params["additional_parameters"] = dict(options.extra)
    return params


def early_signal_warning(options: LaunchOptions) -> str | None:
    """Why the time-limit signal would cut every run short (``None`` when it would not).

    SLURM sends USR2 at the first time-limit check at most ``signal_delay_s + 30`` s before the limit; when
    that span covers the whole time limit, every run is signalled at its first check, within 30 s of its start.
    """
    if options.signal_delay_s + slurm.TIME_LIMIT_CHECK_S < options.time_min * 60:
        return None
    return (f"--signal-delay-s {options.signal_delay_s} with --time {options.time_min}: SLURM sends USR2 at its "
            f"first time-limit check, within {slurm.TIME_LIMIT_CHECK_S} s of the start, so every run is stopped and "
            "requeued early; use a longer --time or a shorter --signal-delay-s")


def check_cluster(options: LaunchOptions) -> slurm.PartitionInfo:
    """The partition ``options`` land on; a ConfigError if the cluster cannot run them."""
    return slurm.check_request(slurm.partitions(), options.partition, options.nodes, options.ntasks_per_node,
                               options.gpus_per_node, options.cpus_per_task)


def render_sbatch(folder: str | Path, options: LaunchOptions, array_size: int = 1) -> str:
    """The sbatch script submitit writes for this submission (same function, same parameters).

    The one use of a private submitit function: submitit 1.5 has no public way to render the script without
    submitting it (``SlurmExecutor`` writes it only inside ``submit``), so ``--dry-run`` calls the function that
    ``SlurmExecutor`` itself calls; keep it here, and only here."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=str(folder), map_count=array_size if array_size > 1 else None,
                               **slurm_parameters(options))


def make_executor(kind: ExecutorKind, folder: str | Path, options: LaunchOptions):
    """A submitit executor for ``kind`` with ``options`` applied."""
    import submitit

    match kind:
        case "slurm":
            if not slurm.sbatch_available():
                raise ConfigError("sbatch is not installed here: run on a SLURM login node, or use --executor local")
            executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=options.max_requeues)
            executor.update_parameters(**slurm_parameters(options))
        case "local":
            if options.nodes != 1:
                raise ConfigError(f"--executor local runs on this machine only: --nodes must be 1, got {options.nodes}")
            executor = submitit.LocalExecutor(folder=str(folder), max_num_timeout=options.max_requeues)
            executor.update_parameters(timeout_min=options.time_min, tasks_per_node=options.ntasks_per_node,
                                       signal_delay_s=options.signal_delay_s)
        case _:
            raise ConfigError(f"--executor must be 'local' or 'slurm', got {kind!r}")
    return executor


def submit_jobs(tasks: Sequence[Any], executor: ExecutorKind, folder: str | Path, options: LaunchOptions,
                dry_run: bool = False) -> list[Any] | str:
    """Submit ``tasks`` (one callable: one job; several: a job array) and return submitit jobs.

    With ``dry_run`` nothing is submitted and the sbatch script (``slurm``) or a description of the local run
    is returned. On SLURM the request is first checked against ``sinfo`` (missing partition, too many nodes,
    GPUs or CPUs give a ConfigError); a dry run skips that check where ``sinfo`` is not installed.
    """
    if not tasks:
        raise ValueError("submit_jobs needs at least one task")
    if executor == "slurm" and (not dry_run or slurm.sbatch_available()):
        info = check_cluster(options)
        log.info("partition %s: %d nodes, %d CPUs and %d GPUs per node, time limit %s", info.name, info.nodes,
                 info.cpus_per_node, info.gpus_per_node, info.time_limit)
    early = early_signal_warning(options) if executor == "slurm" else None
    if early:
        log.warning("%s", early)
    if dry_run:
        if executor == "slurm":
            return render_sbatch(folder, options, array_size=len(tasks))
        return (f"# local executor: {len(tasks)} job(s) of {options.ntasks_per_node} task(s), time limit "
                f"{options.time_min} min, logs in {folder}\n" + "".join(f"# {t!r}\n" for t in tasks))
    Path(str(folder).split("%", 1)[0]).mkdir(parents=True, exist_ok=True)
    ex = make_executor(executor, folder, options)
    if len(tasks) == 1:
        jobs = [ex.submit(tasks[0])]
    else:
        jobs = ex.submit_array(list(tasks))
    for job in jobs:
        log.info("submitted %s job %s: logs %s", executor, job.job_id, job.paths.stdout)
    return jobs


def job_failed_message(job: Any, state: str) -> str:
    """Why ``job`` ended without a result, with the tail of its logs."""
    parts = [f"job {job.job_id} ended in state {state} without a result"]
    for path in (job.paths.stderr, job.paths.stdout):
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        parts.append(f"--- {path} (last lines) ---\n" + "\n".join(text.splitlines()[-30:]))
    return "\n".join(parts)


def wait_jobs(jobs: Sequence[Any], timeout_s: float = 3600.0, poll_s: float = 1.0) -> list[Any]:
    """Wait for every job and return their results (a list per job with several tasks, as submitit returns).

    Raises TimeoutError after ``timeout_s``, and RuntimeError when a job fails or SLURM ends it without a
    result (states read with ``scontrol``, so this works without ``sacct``).
    """
    import submitit

    deadline = time.monotonic() + timeout_s
    pending = list(jobs)
    ended_at: dict[str, float] = {}
    while pending:
        for job in list(pending):
            if not isinstance(job, submitit.SlurmJob):
                if job.done():
                    pending.remove(job)
                continue
            # Every task writes its own result; a multi-task job is done when all have.
            if all(job.task(i).paths.result_pickle.exists() for i in range(job.num_tasks)):
                pending.remove(job)
                continue
            state, _ = slurm.job_state(job.job_id)
            if state in slurm.TERMINAL_STATES or state == "UNKNOWN":
                # The results are written before the job ends; allow a shared filesystem a moment.
                first = ended_at.setdefault(job.job_id, time.monotonic())
                if time.monotonic() - first > 10:
                    raise RuntimeError(job_failed_message(job, state))
            else:
                ended_at.pop(job.job_id, None)
        if pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs {[j.job_id for j in pending]} did not finish within {timeout_s:.0f}s")
            time.sleep(poll_s)
    return [job.results() if job.num_tasks > 1 else job.result() for job in jobs]


def job_restarts(job: Any) -> int:
    """How many times SLURM restarted (requeued) ``job`` so far (0 for local jobs)."""
    import submitit

    if not isinstance(job, submitit.SlurmJob):
        return 0
    return slurm.job_state(job.job_id)[1]
