"""The training loop of G3DR on DeepSpeed, and the setup around it (device, process group, engine).

``train(cfg, resume)`` reads build -> resume -> loop -> close. Each optimizer step is :func:`train_step` (the one
the benchmark, ``g3dr bench step``, also times): for every micro-batch, the stage's task chooses the view by
Eq. 1, renders, weights the losses; then backward and step. Around the step the loop reaches its components only
through their ``should_*`` checks:

- :class:`~g3dr.train.checkpointer.CheckpointManager` (``g3dr/train/checkpointer.py``): the resume plan, the
  state saved and restored (engine, RNG states, data position, MLflow run id), ``should_save``, the exports;
- :class:`~g3dr.train.metrics_log.MetricsLogger` (``g3dr/train/metrics_log.py``): the logging window, the
  progress bar and the image grids, ``should_log`` / ``should_log_images``;
- the tracker (:mod:`g3dr.tracking`), the :class:`StopSignal` and the loader (:class:`~g3dr.train.stage.Loader`).

What is trained is a :class:`~g3dr.train.stage.TrainingStage` (``g3dr/train/stage.py``): it supplies the model,
the task (forward + loss), the loader, the image grid and the fp32 export. :data:`~g3dr.train.stage.F_TRIGEN`
(the default) is G3DR's f_trigen; the super-resolution stage (``g3dr train-sr``, :mod:`g3dr.train.sr`) runs
through the same loop, checkpoints, resume and MLflow.

Seeds: the model is initialised from ``train.seed`` on every rank (DeepSpeed also broadcasts rank 0's
weights); afterwards each rank seeds its RNGs from ``(train.seed, rank)``, so view choice, novel cameras
and renderer jitter differ between ranks, and the whole run is reproducible from the one seed. The RNG
states and the data position of every rank are saved with each checkpoint, so a resume on the same world size
continues exactly; on another world size (docs/training.md) weights, Adam state and schedules continue exactly
and RNG and data position are re-derived from the seed and the step.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch

from g3dr.config import CONFIG_FILENAME, Config, save_config
from g3dr.distributed import (DistEnv, StopSignal, all_ranks_true, any_rank_flags, init_process_group,
                              resolve_dist_env)
from g3dr.errors import ConfigError, G3DRError, OutputError
from g3dr.log import get_logger
from g3dr.train.checkpoint import seed_everything
from g3dr.train.checkpointer import CheckpointManager, ResumePlan, check_outputs
from g3dr.train.metrics_log import MetricsLogger
from g3dr.train.stage import F_TRIGEN, Batch, Loader, TrainingStage, as_loader

log = get_logger("g3dr.train")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after a checkpoint; rerun with --resume auto


class NonFiniteLossError(G3DRError):
    """Too many non-finite losses in a row; a checkpoint of the last good state was written."""


@dataclass
class TrainResult:
    """What a training run did (returned on every rank)."""

    start_step: int
    step: int
    losses: list[float] = field(default_factory=list)
    """Rank-local ``loss/total`` of every optimizer step run by this process (mean over micro-batches)."""
    skipped: int = 0
    checkpoint: Path | None = None
    export: Path | None = None
    run_id: str | None = None
    preempted: bool = False
    view_draws: list[float] = field(default_factory=list)
    """The Eq. 1 draws ``r`` of this rank, one per micro-batch (they differ between ranks)."""
    param_digest: str = ""
    """sha256 of this rank's fp32 parameters at the end (checked equal on every rank)."""
    already_finished: bool = False
    """The checkpoint resumed from was already at ``train.total_steps``: nothing was trained or rewritten."""
    abandoned: list[str] = field(default_factory=list)
    """Checkpoints set aside because this run resumed from an older one (a rollback)."""



def resolve_device(cfg: Config, dist: DistEnv) -> torch.device:
    """``cfg.device`` (``auto``: CUDA if available) with this rank's local GPU."""
    want = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA device is available; set device=cpu or device=auto")
        torch.cuda.set_device(dist.local_rank)
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def parameter_digest(module: torch.nn.Module) -> str:
    """sha256 over the names and fp32 values of ``module``'s parameters (identical replicas, identical digest)."""
    import hashlib

    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _check_replicas_agree(module: torch.nn.Module) -> str:
    digest = parameter_digest(module)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        digests: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"model replicas diverged between ranks (parameter digests {digests})")
    return digest


def _run_dir_intact(run_dir: Path, root: Path) -> bool:
    return (run_dir / CONFIG_FILENAME).is_file() and root.is_dir()


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Engine(Protocol):
    """What :func:`train_step` calls on the trained model: a DeepSpeed engine (gradient accumulation, clipping,
    ZeRO inside ``step``), or the benchmark's plain module-and-optimizer stand-in."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def backward(self, loss: torch.Tensor) -> Any: ...

    def step(self) -> Any: ...


class NonFiniteGuard:
    """Skips a micro-batch whose loss is not finite on some rank (every rank skips it, so none is left in a
    collective); after ``max_in_row`` in a row it calls ``save(step)`` for the last good state, if given, and
    raises :class:`NonFiniteLossError`."""

    def __init__(self, max_in_row: int, device: torch.device, save: Callable[[int], Path] | None = None):
        self.max_in_row, self.device, self.save = max_in_row, device, save
        self.skipped = 0
        self.in_row = 0

    def finite(self, loss: torch.Tensor, step: int) -> bool:
        """True when ``loss`` is finite on every rank (collective)."""
        if all_ranks_true(bool(torch.isfinite(loss))):
            self.in_row = 0
            return True
        self.skipped += 1
        self.in_row += 1
        log.warning("non-finite loss at step %d (%d in a row): micro-batch skipped on every rank", step, self.in_row)
        if self.in_row >= self.max_in_row:
            saved = f"the last good state is in {self.save(step)}" if self.save else "nothing was saved"
            raise NonFiniteLossError(f"{self.in_row} non-finite losses in a row at step {step}; {saved}. Lower "
                                     "train.lr or check the data, then rerun with --resume auto")
        return False


@dataclass
class StepOutput:
    """What one :func:`train_step` did."""

    reports: list[dict[str, Any]]
    """The task's report of every micro-batch that was stepped (only the last keeps its ``images``, if any)."""
    batch: Batch
    """The last micro-batch, on the device (the image grid draws it)."""
    data_wait: float
    """Seconds spent waiting for the loader."""

    @property
    def loss(self) -> float:
        """The step's ``loss/total``: the mean over its micro-batches."""
        return sum(r["loss/total"] for r in self.reports) / len(self.reports)


def train_step(engine: Engine, task: Callable[..., Any], batches: Iterator[Batch], step: int, accumulation: int,
               device: torch.device, guard: NonFiniteGuard) -> StepOutput:
    """One optimizer step at step ``step``: ``accumulation`` good micro-batches, each drawn from ``batches``
    (outside the training RNG), forwarded by ``task(engine, batch, step) -> (loss, report)`` (Eq. 1 view, render,
    weighted losses), checked by ``guard`` (a non-finite loss skips the micro-batch), then ``engine.backward`` and
    ``engine.step`` (which steps the optimizer at the accumulation boundary)."""
    reports: list[dict[str, Any]] = []
    data_wait = 0.0
    while len(reports) < accumulation:
        waited = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # the loader must not consume training randomness
            batch = _to_device(next(batches), device)
        data_wait += time.perf_counter() - waited
        loss, report = task(engine, batch, step)
        if not guard.finite(loss, step):
            continue
        engine.backward(loss)
        engine.step()
        if reports:
            reports[-1].pop("images", None)  # only the last micro-batch's images can reach a grid
        reports.append(report)
    return StepOutput(reports, batch, data_wait)


class Trainer:
    """One run's parts, built from a :class:`~g3dr.train.stage.TrainingStage` and the resume plan: the DeepSpeed
    engine (with its LR schedule), the task, the loader, the checkpoint manager and (from :meth:`resume`) the
    tracker. :func:`train` drives it: build, :meth:`resume`, :meth:`loop`, :meth:`finish`, :meth:`close`."""

    def __init__(self, cfg: Config, stage: TrainingStage, dist: DistEnv, device: torch.device,
                 checkpoints: CheckpointManager, plan: ResumePlan,
                 build_loader: Callable[[Config, DistEnv], Iterable[Batch]] | None = None):
        import deepspeed

        from g3dr.train.ds_config import deepspeed_config
        from g3dr.train.schedules import StepSchedule

        self.cfg, self.stage, self.dist, self.device, self.checkpoints = cfg, stage, dist, device, checkpoints
        self.accumulation = cfg.train.grad_accumulation(dist.world_size)
        seed_everything(cfg.train.seed)  # the same initial weights on every rank (DeepSpeed broadcasts rank 0's anyway)
        model = stage.build_model(cfg)
        checkpoints.keep_initial(model, plan)
        checkpoints.check_space(model, plan)
        ds_config = deepspeed_config(cfg, dist.world_size, device.type)
        if plan.universal:
            ds_config["checkpoint"] = {"load_universal": True}
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config,
                                                    lr_scheduler=lambda optimizer: StepSchedule(optimizer, cfg.train),
                                                    dist_init_required=False)
        self.dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self.task = stage.build_task(cfg, device, self.dtype)
        self.loader: Loader = as_loader((build_loader or stage.build_loader)(cfg, dist))
        checkpoints.attach(self.engine, self.loader)
        self.tracker: Any = None

    def resume(self, plan: ResumePlan) -> TrainResult:
        """Load ``plan``'s checkpoint (or seed a fresh start), then start tracking: the MLflow run resumed, forked
        after a rollback (the abandoned steps stay in the old run, so no curve holds two values of one step) or
        new; the resolved config.yaml is written and logged."""
        from g3dr.tracking import build_tracker

        cfg, dist = self.cfg, self.dist
        start_step, run_id = self.checkpoints.load(plan)
        forked_from = (run_id, start_step, plan.abandoned) if plan.abandoned and run_id else None
        self.tracker = build_tracker(cfg, dist.is_main, run_id=None if forked_from else run_id,
                                     forked_from=forked_from, world_size=dist.world_size)
        if dist.is_main:
            self.tracker.log_artifact(save_config(cfg, self.checkpoints.run_dir))  # the resolved config.yaml
            if self.stage.name != F_TRIGEN.name:
                self.tracker.set_tags({"g3dr.stage": self.stage.name})
        self.checkpoints.run_id = self.tracker.run_id
        self.checkpoints.export_initial()
        return TrainResult(start_step=start_step, step=start_step, run_id=self.tracker.run_id,
                           abandoned=plan.abandoned)

    def loop(self, result: TrainResult, stop: StopSignal, stop_at: int | None, progress: bool) -> None:
        """Optimizer steps from ``result.step`` until ``train.total_steps``, ``stop_at`` or a stop signal, with
        logging, image grids and checkpoints when their ``should_*`` check says so; fills ``result``."""
        cfg, engine, checkpoints = self.cfg, self.engine, self.checkpoints
        guard = NonFiniteGuard(cfg.train.max_nonfinite_in_row, self.device, checkpoints.save)
        metrics = MetricsLogger(cfg, self.tracker, self.device, self.dist.is_main, result.step, progress)
        batches = iter(self.loader)
        end = cfg.train.total_steps if stop_at is None else min(stop_at, cfg.train.total_steps)
        try:
            while result.step < end:
                lr = float(engine.get_lr()[0])
                out = train_step(engine, self.task, batches, result.step, self.accumulation, self.device, guard)
                step = result.step = result.step + 1
                result.skipped = guard.skipped
                result.losses.append(out.loss)
                result.view_draws += [r["view_r"] for r in out.reports if "view_r" in r]
                metrics.add(out.reports, out.data_wait)
                if metrics.should_log(step):
                    metrics.log(step, lr, engine, {"skipped_micro_batches": guard.skipped,
                                                   **self.loader.data_metrics()})  # data/skipped, ...
                if metrics.should_log_images(step):
                    grid = self.stage.image_grid(engine.module, cfg, out.batch, self.dtype, out.reports[-1])
                    metrics.log_images(grid, step)
                stopping = self._stop_requested(stop, step)
                if checkpoints.should_save(step, stopping):
                    result.checkpoint = checkpoints.save(step)
                if stopping:
                    log.warning("stopped by a signal at step %d after a checkpoint; rerun with --resume auto", step)
                    result.preempted = True
                    break
        finally:
            metrics.close()

    def _stop_requested(self, stop: StopSignal, step: int) -> bool:
        """One collective per step: a stop signal on any rank, and the run folder still there (rank 0 looks)."""
        run_dir = self.checkpoints.run_dir
        stopping, gone = any_rank_flags([stop.received is not None,
                                          self.dist.is_main and not _run_dir_intact(run_dir, self.checkpoints.root)])
        if gone:
            raise OutputError(f"the run folder {run_dir} was deleted or moved during training ({CONFIG_FILENAME} or "
                              f"checkpoints/ is gone) at step {step}; stopping, since nothing more can be saved "
                              "there (its checkpoints and the default MLflow store went with it). Restore the "
                              "folder and rerun with --resume auto, or start again in a new run_dir")
        return stopping

    def finish(self, result: TrainResult, export: bool) -> None:
        """Check that every rank holds the same weights; rank 0 exports the last checkpoint unless stopped."""
        result.param_digest = _check_replicas_agree(self.engine.module)
        if export and not result.preempted and self.dist.is_main and self.checkpoints.last is not None:
            result.export = self.checkpoints.export()

    def close(self, status: str) -> None:
        """End the MLflow run with ``status`` and stop the loader's workers."""
        self.tracker.close(status)
        self.loader.close()


def _prepare(cfg: Config, stage: TrainingStage, export: bool) -> tuple[DistEnv, torch.device]:
    """Every check that needs no process group (so a mistake fails before anything starts), then the group."""
    stage.check(cfg)
    dist = resolve_dist_env()
    device = resolve_device(cfg, dist)
    cfg.train.grad_accumulation(dist.world_size)  # a ConfigError when batch sizes and world size disagree
    if device.type == "cpu" and cfg.train.precision == "bf16":
        raise ConfigError("train.precision=bf16 runs on CUDA only: PyTorch's CPU kernels used by the renderer "
                          "(antialiased downsampling of the triplanes) have no bf16 version; on the CPU set "
                          "train.precision=fp32")
    # A read-only, full or mistyped output location fails now, not at the first save.
    check_outputs(cfg, export and dist.is_main, stage.export_filename)
    init_process_group(dist, device.type, cfg.distributed.backend, cfg.distributed.timeout_minutes, via="deepspeed",
                       launch_hint="torchrun, the DeepSpeed launcher or `g3dr submit train`")
    return dist, device


def train(cfg: Config, resume: str | None = None,
          build_loader: Callable[[Config, DistEnv], Iterable[Batch]] | None = None,
          export: bool = True, stop_at: int | None = None, progress: bool = True,
          stage: TrainingStage | None = None) -> TrainResult:
    """Train ``stage``'s model (default :data:`~g3dr.train.stage.F_TRIGEN`) as configured; ``resume``: None,
    ``auto`` or a checkpoint directory.

    ``progress``: a progress bar on rank 0, and only when stderr is a terminal (a log file gets no
    carriage-return updates; the logged metrics say how far it is).

    ``build_loader`` defaults to the stage's (:func:`g3dr.data.build_train_loader`); it may return any iterable of
    batches (a :class:`~g3dr.train.stage.Loader` keeps its position across a resume). ``stop_at``: end this
    process after that optimizer step with a checkpoint (schedules still run to ``train.total_steps``; a later
    ``--resume auto`` continues). Returns a :class:`TrainResult`.
    """
    stage = stage or F_TRIGEN
    dist, device = _prepare(cfg, stage, export)
    checkpoints = CheckpointManager(cfg, stage, dist, stop_at)
    # Signals are caught from here on: one arriving during setup stops the run after its first step.
    with StopSignal((signal.SIGTERM, signal.SIGUSR1)) as stop:
        plan = checkpoints.plan(resume)
        if not plan.finished:
            trainer = Trainer(cfg, stage, dist, device, checkpoints, plan, build_loader)
            result = trainer.resume(plan)
            status = "FAILED"
            try:
                trainer.loop(result, stop, stop_at, progress)
                trainer.finish(result, export)
                status = "KILLED" if result.preempted else "FINISHED"
            finally:
                trainer.close(status)
            return result
    return _already_finished(checkpoints, plan, export)


def _already_finished(checkpoints: CheckpointManager, plan: ResumePlan, export: bool) -> TrainResult:
    """``--resume`` of a checkpoint already at ``train.total_steps`` (outside the signal handler, as an export)."""
    client = plan.meta.get("client_state", {})
    return TrainResult(start_step=plan.step, step=plan.step, checkpoint=plan.path, run_id=client.get("mlflow_run_id"),
                       already_finished=True, export=checkpoints.finished_export(plan, export))
