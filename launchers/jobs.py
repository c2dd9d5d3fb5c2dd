"""The callables that launched jobs run: small, picklable, the same object under the local and SLURM executors.

A job holds only plain, picklable arguments -- a training job the resolved :class:`~g3dr.config.Config`, an eval
job a typed :class:`~g3dr.eval.cli.EvalRequest`, a data preparation job typed ``g3dr prep`` requests
(:class:`~g3dr.data_prep.cli.ShardsRequest`, :class:`~g3dr.data_prep.cli.ValidateRequest`) -- and calls the library
directly in ``__call__``, where the heavy code is imported; it never goes back through the ``g3dr`` command line.
Every job follows submitit's checkpoint/requeue protocol: on the preemption or time-limit signal (USR2) rank 0 calls
``checkpoint()``, which returns a delayed resubmission of the job itself; submitit then requeues the SLURM job and
the next run calls ``__call__`` again. The jobs keep their state in their output folders (training resumes from
its newest checkpoint in ``run_dir``; shard writing skips finished shards; a sweep skips finished evaluations), so
the resubmitted object needs nothing new except its requeue count.
"""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path
from typing import Any, Literal, Sequence

from g3dr.launchers.rendezvous import Rendezvous, rendezvous_from_env
from g3dr.log import get_logger

log = get_logger("g3dr.launchers")


class LaunchedJob:
    """Base of every launched job: rendezvous, logging, requeue bookkeeping, then :meth:`run` (``run(rdv) ->
    result``, what subclasses implement)."""

    name = "job"

    def __init__(self) -> None:
        from g3dr.log import requested_level

        self.requeues = 0
        """Times this job object was resubmitted by :meth:`checkpoint` (counts local requeues too)."""
        self.log_level = requested_level()
        """The console level the submitting user asked for (None: the job's own default)."""

    def requeue_count(self, rdv: Rendezvous) -> int:
        """Times this job was requeued: SLURM's restart count, or our own count where SLURM has none."""
        return max(self.requeues, rdv.restarts)

    def __call__(self) -> Any:
        from g3dr.log import request_level, requested_level, setup_logging

        rdv = rendezvous_from_env()
        os.environ.update(rdv.env())
        request_level(self.log_level)  # as `g3dr --log-level` would: training then keeps it over logging.level
        setup_logging(self.log_level or requested_level() or "INFO")
        log.info("%s: task %d/%d (local %d) on %s, job %s (%s), master %s:%d, requeue count %d",
                 self.name, rdv.rank, rdv.world_size, rdv.local_rank, socket.gethostname(), rdv.job_id, rdv.source,
                 rdv.master_addr, rdv.master_port, self.requeue_count(rdv))
        return self.run(rdv)

    def run(self, rdv: Rendezvous) -> Any:
        raise NotImplementedError

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's protocol: a delayed resubmission of this job, with its requeue count advanced."""
        import submitit

        resubmitted = copy.copy(self)
        resubmitted.requeues = self.requeues + 1
        log.warning("%s: signalled (preemption or time limit); requeueing, this will be requeue #%d",
                    self.name, resubmitted.requeues)
        return submitit.helpers.DelayedSubmission(resubmitted, *args, **kwargs)


class PrepJob(LaunchedJob):
    """Data preparation requests run one after the other in this process (``steps``: a
    :class:`~g3dr.data_prep.cli.ShardsRequest` or :class:`~g3dr.data_prep.cli.ValidateRequest` each, resolved at
    submission). Writing shards and validating are idempotent, so a requeue re-runs the steps safely.

    The job fails (raises) on the first step whose exit code is not 0; the result is the list of exit codes.
    """

    def __init__(self, steps: Sequence[Any], name: str = "prep") -> None:
        super().__init__()
        if not steps:
            raise ValueError("PrepJob needs at least one request")
        self.steps = tuple(steps)
        self.name = name

    def run(self, rdv: Rendezvous) -> list[int]:
        codes = []
        for step in self.steps:
            log.info("%s: %s", self.name, step.command)
            code = step.run()
            codes.append(code)
            if code != 0:
                raise RuntimeError(f"`{step.command}` exited with status {code} (see the log above)")
        return codes

    def __repr__(self) -> str:
        return (f"PrepJob(name={self.name!r}, steps={tuple(step.command for step in self.steps)!r}, "
                f"requeues={self.requeues})")


class TrainJob(LaunchedJob):
    """One task of ``g3dr train --resume auto`` (``stage="sr"``: of ``g3dr train-sr``) on the resolved ``config``;
    every task of the job runs it and they meet at the rendezvous.

    The preemption/time-limit signal (USR2, sent by SLURM to every task) is handed to the trainer's stop signal
    (the :class:`~g3dr.distributed.StopSignal` installed while training): all ranks finish the current step, save
    a checkpoint and return preempted; then rank 0 runs submitit's requeue (``checkpoint()`` above) and the
    requeued job resumes from that checkpoint and the same MLflow run. A signal outside the training loop
    (start-up, export) goes straight to submitit: requeue now, resume from the newest checkpoint.
    """

    def __init__(self, config: Any, stage: Literal["f_trigen", "sr"] = "f_trigen") -> None:
        super().__init__()
        self.config = config
        self.stage = stage
        self.name = "train-sr" if stage == "sr" else "train"

    def run(self, rdv: Rendezvous) -> Any:
        import signal
        import time

        from g3dr.distributed import StopSignal
        from g3dr.train.cli import run_training

        submitit_handler = signal.getsignal(signal.SIGUSR2)
        received: list[int] = []

        def on_usr2(signum: int, frame: Any) -> None:
            stop = StopSignal.installed()
            if stop is not None:  # the trainer's, in its loop
                log.warning("%s: USR2 received: checkpointing at the end of this step, then requeueing", self.name)
                received.append(signum)
                stop.request(signal.SIGUSR1, frame)
            elif callable(submitit_handler):
                submitit_handler(signum, frame)

        signal.signal(signal.SIGUSR2, on_usr2)
        try:
            log.info("%s: g3dr %s --resume auto on the config resolved at submission (run_dir %s)", self.name,
                     self.name, self.config.run_dir)
            result = run_training(self.config, resume="auto", stage=self.stage)
        finally:
            signal.signal(signal.SIGUSR2, submitit_handler)
        if result.preempted:
            # The trainer saved a checkpoint on every rank. Rank 0 requeues (submitit: checkpoint() + scontrol
            # requeue + exit); the other ranks wait for the requeue to end them.
            log.warning("%s: stopped after a checkpoint (%s); requeueing", self.name,
                        "USR2" if received else "SIGTERM/USR1")
            if callable(submitit_handler):
                submitit_handler(signal.SIGUSR2, None)
            if rdv.rank != 0:
                time.sleep(120)
            raise RuntimeError("training stopped by a signal and the job could not be requeued; "
                               "resubmit it (it resumes from its newest checkpoint)")
        return [0]

    def __repr__(self) -> str:
        return (f"TrainJob(stage={self.stage!r}, resume='auto', run_dir={self.config.run_dir!r}, "
                f"requeues={self.requeues})")


def train_job(config: str | None, overrides: Sequence[str], command: str = "train") -> TrainJob:
    """The job of ``g3dr submit train`` (``command="train-sr"``: of ``g3dr submit train-sr``) on the config file
    ``config`` with ``overrides``, resolved now: see :class:`TrainJob`."""
    from g3dr.config import load_config

    if command not in ("train", "train-sr"):
        raise ValueError(f"a training job runs g3dr train or g3dr train-sr, not {command!r}")
    return TrainJob(load_config(config, list(overrides)), "sr" if command == "train-sr" else "f_trigen")


class EvalJob(LaunchedJob):
    """One ``g3dr eval`` run (a checkpoint, or a sweep of a folder) from its typed request; every task of the job
    runs it (samples are split across ranks). A sweep is idempotent, so a requeue re-runs it safely."""

    def __init__(self, request: Any, name: str = "eval") -> None:
        super().__init__()
        self.request = request
        self.name = name

    def run(self, rdv: Rendezvous) -> int:
        from g3dr.eval.cli import run_request

        r = self.request
        target = f"--sweep {r.sweep}{' --watch' if r.watch else ''}" if r.sweep else f"--checkpoint {r.checkpoint}"
        log.info("%s: g3dr eval %s %s", self.name, target, " ".join(r.overrides))
        code = run_request(r)
        if code != 0:
            raise RuntimeError(f"{self.name}: the evaluation ended with status {code} (see the log above)")
        return code

    def __repr__(self) -> str:
        return f"EvalJob(name={self.name!r}, request={self.request!r}, requeues={self.requeues})"


def prep_shard_jobs(request: Any, argv: Sequence[str], num_jobs: int) -> list[PrepJob]:
    """The array of ``g3dr prep shards`` jobs of ``request`` (a :class:`~g3dr.data_prep.cli.ShardsRequest`, parsed
    from ``g3dr ARGV``): job ``i`` writes the shards ``s`` with ``s % num_jobs == i``."""
    return [PrepJob([_prep_shards_step(request, argv, i, num_jobs)], name=f"prep-{i}") for i in range(num_jobs)]


def prep_merge_job(request: Any, argv: Sequence[str]) -> PrepJob:
    """After the array: the same plan as one job (finished shards are skipped, so this only writes the
    manifest from the per-shard records; a shard an array job lost is written here), then ``prep validate`` of
    the output folder."""
    from g3dr.data_prep.cli import ValidateRequest

    return PrepJob([_prep_shards_step(request, argv, 0, 1), ValidateRequest(str(Path(request.spec.out).resolve()))],
                   name="prep-merge")


def _prep_shards_step(request: Any, argv: Sequence[str], shard_index: int, num_jobs: int) -> Any:
    """``request`` as job ``shard_index`` of ``num_jobs``. Its manifest records the command that runs that job by
    hand, ``g3dr ARGV --shard-index I --num-shard-jobs N`` (not the job's own argv, which is submitit's)."""
    from g3dr.data_prep.cli import command_line

    command = command_line([*argv, "--shard-index", str(shard_index), "--num-shard-jobs", str(num_jobs)])
    return request.for_job(shard_index, num_jobs, command)
