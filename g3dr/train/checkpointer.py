"""The trainer's checkpoint manager: which checkpoint a run resumes from, the state it saves and restores, and
the fp32 exports. :mod:`g3dr.train.checkpoint` owns the folders themselves (names, completeness, lineage,
verification, pruning, the universal conversion); this module decides what goes into them and when.

:class:`CheckpointManager`, used by :func:`g3dr.train.trainer.train` in this order:

1. :meth:`~CheckpointManager.plan` (before the model is built, every rank alike): the verified checkpoint to
   resume from, or a fresh start, as a :class:`ResumePlan`; refuses a checkpoint of another stage or past
   ``train.total_steps``, sets newer checkpoints aside on a rollback, and decides whether the engine must load
   a universal checkpoint (another world size with ZeRO 1/2 partitions).
2. :meth:`~CheckpointManager.attach` the engine and the loader, then :meth:`~CheckpointManager.load`: weights,
   Adam and LR state; RNG states and data position of this rank on the same world size, else re-derived from
   the seed and the step (a statistical resume: :func:`fresh_data_position`).
3. :meth:`~CheckpointManager.should_save` / :meth:`~CheckpointManager.save` every ``train.checkpoint_every``
   steps, at the end, at ``stop_at`` and on a stop signal. The client state holds the step, the MLflow run id,
   the world size, the resolved config and the stage; the per-rank state the RNG states and the data position.
4. :meth:`~CheckpointManager.export`: the stage's fp32 export of the last checkpoint (and
   ``exports/step-0.safetensors`` of the initial weights with ``train.export_initial``).

:func:`export_checkpoint` is ``g3dr export``: any complete checkpoint as its stage's fp32 file. This module knows
every stage by name (:func:`stage_named`); the stages themselves never import it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from g3dr.config import CONFIG_FILENAME, Config, config_to_dict
from g3dr.distributed import DistEnv, broadcast_object
from g3dr.errors import ConfigError, G3DRError, OutputError
from g3dr.log import get_logger
from g3dr.train import checkpoint as ckpt
from g3dr.train.sr import SR_STAGE
from g3dr.train.stage import EXPORT_FILENAME, F_TRIGEN, Loader, TrainingStage

log = get_logger("g3dr.train")

STAGE_KEY = "stage"
"""Checkpoint client-state key naming the stage of a non-f_trigen run (absent: f_trigen, as before stages)."""
STAGES = {stage.name: stage for stage in (F_TRIGEN, SR_STAGE)}


def stage_named(name: str) -> TrainingStage:
    """The stage called ``name`` (a checkpoint's ``client_state["stage"]``)."""
    if name not in STAGES:
        raise ConfigError(f"this g3dr cannot export a checkpoint of stage {name!r} (known: {', '.join(STAGES)})")
    return STAGES[name]


def stage_of_checkpoint(meta: dict[str, Any]) -> str:
    """The stage name a checkpoint's ``meta.json`` records (f_trigen when it names none)."""
    return str(meta.get("client_state", {}).get(STAGE_KEY, F_TRIGEN.name))


@dataclass(frozen=True)
class ResumePlan:
    """Where a run starts: a verified checkpoint and what resuming it implies, or a fresh start (``path`` None)."""

    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    abandoned: list[str] = field(default_factory=list)
    """Checkpoints set aside because the run resumes from an older one (a rollback)."""
    universal: bool = False
    """The engine loads a universal checkpoint (``checkpoint.load_universal``): ZeRO 1/2 on another world size."""
    finished: bool = False
    """The checkpoint is already at ``train.total_steps``: nothing to train."""

    @property
    def step(self) -> int:
        return int(self.meta["step"]) if self.path is not None else 0


class CheckpointManager:
    """Resume, per-rank state, saves and exports of one training run (module docstring); every method but
    :meth:`export` and :meth:`finished_export` is collective."""

    def __init__(self, cfg: Config, stage: TrainingStage, dist: DistEnv, stop_at: int | None = None):
        self.cfg, self.stage, self.dist, self.stop_at = cfg, stage, dist, stop_at
        self.run_dir = Path(cfg.run_dir)
        self.root = ckpt.checkpoints_root(self.run_dir)
        self.last: Path | None = None
        """The newest checkpoint this run saved."""
        self.run_id: str | None = None
        """The MLflow run id saved with every checkpoint (set once tracking has started)."""
        self.engine: Any = None
        self.loader: Loader | None = None
        self._initial: dict[str, torch.Tensor] | None = None

    def plan(self, resume: str | None) -> ResumePlan:
        """The checkpoint to resume from (``resume``: None, ``auto`` or a path), chosen and verified by all ranks
        together (each hashes a share of its files); with ``auto`` a damaged head is set aside and the previous
        one taken. Raises a :class:`ConfigError` for a checkpoint this run cannot continue."""
        dist, train_cfg = self.dist, self.cfg.train
        path = ckpt.resolve_resume(resume, self.run_dir, dist.rank, dist.world_size)
        if path is None:
            if resume == "auto":
                log.info("--resume auto: no complete checkpoint under %s; starting fresh", self.root)
            elif (latest := ckpt.find_latest(self.root)) is not None:
                raise ConfigError(f"run_dir {self.run_dir} already holds checkpoints (newest: {latest.name}); "
                                  "continue that run with --resume auto, or set run_dir to a new folder")
            return ResumePlan()
        meta = ckpt.read_meta(path)
        step = int(meta["step"])
        if stage_of_checkpoint(meta) != self.stage.name:
            raise ConfigError(f"{path} is a checkpoint of the {stage_of_checkpoint(meta)} stage, not of "
                              f"{self.stage.name}: set run_dir to a folder of its own for each stage")
        if step > train_cfg.total_steps:
            raise ConfigError(f"{path} is at step {step}, past train.total_steps={train_cfg.total_steps}: nothing was "
                              f"trained and {self.run_dir / CONFIG_FILENAME} was left as it was. To train further set "
                              f"train.total_steps above {step} (docs/training.md, 'Extending a run'); the run's own "
                              "end is the one its config.yaml names")
        if step == train_cfg.total_steps:
            return ResumePlan(path, meta, finished=True)
        warning = _total_steps_change(self.cfg, meta.get("client_state", {}).get("config", {}).get("train", {})
                                      .get("total_steps"), step)
        if warning:
            log.warning("%s", warning)
        # A rollback (resuming from an older checkpoint than the newest): the newer ones are set aside, `latest`
        # names the one resumed from, and the MLflow run is forked (g3dr.tracking).
        abandoned = broadcast_object(ckpt.set_aside_newer(self.root, path) if dist.is_main else None) or []
        return ResumePlan(path, meta, abandoned, universal=self._needs_universal(path))

    def _needs_universal(self, path: Path) -> bool:
        ckpt.check_zero_stage(path, self.cfg.train.zero_stage)
        saved_world = ckpt.saved_world_size(path)
        if saved_world == self.dist.world_size:
            return False
        universal = ckpt.needs_universal(path, self.dist.world_size)
        log.warning("checkpoint %s was saved by %d ranks, this run has %d: %s; RNG states and the data position "
                    "are re-derived from the seed and the step (a statistical resume, not exactly-once)",
                    path, saved_world, self.dist.world_size,
                    "its ZeRO optimizer partitions are converted to a universal checkpoint and re-partitioned"
                    if universal else "it holds no partitioned Adam state to convert (ZeRO 0, or step 0)")
        return universal

    def keep_initial(self, model: torch.nn.Module, plan: ResumePlan) -> None:
        """With ``train.export_initial`` on a fresh start, keep (rank 0) the initial weights of ``model`` for
        :meth:`export_initial`."""
        if self.cfg.train.export_initial and plan.path is None and self.dist.is_main:
            self._initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def check_space(self, model: torch.nn.Module, plan: ResumePlan) -> None:
        """An :class:`OutputError` on every rank when the disk cannot take one checkpoint (a warning when it cannot
        take the ``keep_last + 1`` a save needs at its peak)."""
        need = ckpt.checkpoint_bytes(plan.path) if plan.path is not None else expected_checkpoint_bytes(model, self.cfg)
        problem = _free_space_problem(self.root, need, self.cfg.train.keep_last) if self.dist.is_main else None
        problem = broadcast_object(problem)
        if problem is not None:
            raise OutputError(problem)

    def attach(self, engine: Any, loader: Loader) -> None:
        """The DeepSpeed engine and the loader whose state :meth:`load` restores and :meth:`save` saves."""
        self.engine, self.loader = engine, loader

    def load(self, plan: ResumePlan) -> tuple[int, str | None]:
        """Seed this rank's RNGs and, when ``plan`` names a checkpoint, load it into the attached engine and loader;
        returns ``(start step, MLflow run id or None)``."""
        dist, seed = self.dist, self.cfg.train.seed
        ckpt.seed_everything(ckpt.rank_seed(seed, dist.rank))
        if plan.path is None:
            return 0, None
        client_state, rank_state = ckpt.load_checkpoint(self.engine, plan.path, dist.rank, dist.world_size)
        step = int(client_state["step"])
        if rank_state is not None:
            ckpt.set_rng_state(rank_state["rng"])
            if rank_state.get("data") is not None:
                self.loader.load_state_dict(rank_state["data"])
        else:  # another world size: per-rank state cannot carry over
            ckpt.seed_everything(ckpt.rank_seed(seed + step, dist.rank))
            if self.loader.state_dict() is not None:
                self.loader.load_state_dict(fresh_data_position(self.loader, ckpt.read_rank_states(plan.path)))
        log.info("resumed from %s at step %d", plan.path, step)
        return step, client_state.get("mlflow_run_id")

    def should_save(self, step: int, stopping: bool) -> bool:
        """After optimizer step ``step``: every ``train.checkpoint_every`` steps, at the end, at ``stop_at`` and
        when a stop signal arrived."""
        train_cfg = self.cfg.train
        return step % train_cfg.checkpoint_every == 0 or step in (train_cfg.total_steps, self.stop_at) or stopping

    def save(self, step: int) -> Path:
        """Save the attached engine and loader after ``step`` optimizer steps (collective); returns the folder."""
        dist = self.dist
        client = {"step": step, "mlflow_run_id": self.run_id, "world_size": dist.world_size,
                  "config": config_to_dict(self.cfg)}
        if self.stage.name != F_TRIGEN.name:
            client[STAGE_KEY] = self.stage.name
        rank_state = {"rng": ckpt.rng_state(), "data": self.loader.state_dict()}
        self.last = ckpt.save_checkpoint(self.engine, self.root, step, client, rank_state, dist.rank,
                                         dist.world_size, self.cfg.train.keep_last)
        return self.last

    def export_initial(self) -> None:
        """``train.export_initial``: the weights kept by :meth:`keep_initial` as ``exports/step-0.safetensors``."""
        if self._initial is not None:
            self.stage.export_initial(self.cfg, self._initial, self.run_dir, self.run_id)
            self._initial = None

    def export(self) -> Path:
        """The stage's fp32 export of the last checkpoint saved, in ``run_dir`` (rank 0, at the end of a run); its
        metadata names the MLflow run, so its evaluations link to it."""
        named = {"mlflow_run_id": self.run_id} if self.run_id else None
        out = self.stage.export(self.cfg, self.last, self.run_dir / self.stage.export_filename, extra_metadata=named)
        log.info("exported %s (fp32) to %s", self.stage.name, out)
        return out

    def finished_export(self, plan: ResumePlan, export: bool) -> Path | None:
        """A resume of a checkpoint already at ``train.total_steps``: train nothing, rewrite nothing (config.yaml,
        the MLflow run); only a missing fp32 export of that final checkpoint is written (a job stopped between
        its last save and the export). Returns that export, if written."""
        out = self.run_dir / self.stage.export_filename
        written = None
        if export and self.dist.is_main and not out.is_file():
            from g3dr.config import config_from_dict

            client = plan.meta.get("client_state", {})
            saved = (config_from_dict(client["config"], source=f"{plan.path}/meta.json") if "config" in client
                     else self.cfg)
            written = self.stage.export(saved, plan.path, out)
            log.info("exported the final checkpoint %s (fp32) to %s", plan.path, written)
        log.warning("nothing to train: %s is already at train.total_steps=%d; config.yaml and the MLflow run were left "
                    "as they were. To train further, raise train.total_steps (docs/training.md, 'Extending a run')",
                    plan.path, plan.step)
        return written


def fresh_data_position(loader: Loader, saved: list[dict[str, Any]]) -> dict[str, Any]:
    """The data position for a resume on another world size: every rank starts the epoch after the newest
    one any saved rank reached, so its resampled shard draws, seeded by (seed, rank, worker, epoch), are ones
    no rank of the saved run consumed. Statistical, not exactly-once: with resampling, which samples come
    next was random anyway; a rank of the new world does not continue the stream of the old rank of that index.
    """
    epochs = [int(s["data"]["epoch"]) for s in saved if s.get("data") is not None]
    position = dict(loader.state_dict())
    position.update(epoch=max(epochs) + 1 if epochs else int(position["epoch"]), batches_done=0, consumed={})
    return position


def expected_checkpoint_bytes(model: torch.nn.Module, cfg: Config) -> int:
    """About how many bytes one checkpoint of ``model`` takes: the module weights (bf16 or fp32) and buffers,
    plus Adam's state: fp32 master weights and two moments with ZeRO 1/2 (12 bytes per parameter), the two
    moments with ZeRO 0 (8 bytes). Per-rank files (RNG, data position) are small."""
    n = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    weights = n * (2 if cfg.train.precision == "bf16" else 4)
    return weights + buffers + n * (12 if cfg.train.zero_stage in (1, 2) else 8)


def check_outputs(cfg: Config, export: bool, export_filename: str = EXPORT_FILENAME) -> None:
    """Before any work: the run folder and its checkpoint folder can be written (created if needed), and the
    export path is not a folder. An :class:`OutputError` names the location, the cause (read-only, full,
    permission, a file where a folder should be) and the fix."""
    from g3dr.outputs import check_output_file, check_writable_dir

    run_dir = Path(cfg.run_dir)
    fix = "set run_dir to a writable folder (checkpoints, config.yaml, the export and MLflow's default store go there)"
    check_writable_dir(run_dir, "run_dir", fix)
    check_writable_dir(ckpt.checkpoints_root(run_dir), "checkpoint folder", fix)
    if export:
        check_output_file(run_dir / export_filename, "the fp32 export", "remove it or pass --no-export")


def _free_space_problem(root: Path, need: int, keep_last: int) -> str | None:
    """An error message when the disk of ``root`` cannot take one checkpoint of ``need`` bytes; a warning (logged)
    when it cannot take the ``keep_last + 1`` a save needs at its peak."""
    from g3dr.outputs import free_bytes, human_bytes

    free = free_bytes(root)
    if free is None:
        return None
    if free < need:
        return (f"checkpoint folder {root}: {human_bytes(free)} free, but one checkpoint takes about "
                f"{human_bytes(need)}; free space or set run_dir to another disk")
    held = sum(ckpt.checkpoint_bytes(p) for p in ckpt.list_complete(root))
    peak = (keep_last + 1) * need - held
    if free < peak:
        log.warning("checkpoint folder %s: %s free; train.keep_last=%d keeps up to %d checkpoints of about %s during "
                    "a save (%s more than now): the disk may fill before the run ends", root, human_bytes(free),
                    keep_last, keep_last + 1, human_bytes(need), human_bytes(peak))
    return None


def _total_steps_change(cfg: Config, saved_total: Any, step: int) -> str | None:
    """A warning when a resume changes ``train.total_steps``: the schedules that depend on it move."""
    from g3dr.train.schedules import learning_rate

    if not isinstance(saved_total, int) or saved_total == cfg.train.total_steps:
        return None
    before = learning_rate(step, dataclasses.replace(cfg.train, total_steps=saved_total))
    after = learning_rate(step, cfg.train)
    return (f"train.total_steps changed from {saved_total} to {cfg.train.total_steps} on resume at step {step}: the "
            f"schedules computed from it change from here on: the LR at step {step} goes from {before:.3g} to "
            f"{after:.3g} ({cfg.train.lr_schedule}), Eq. 1's canonical-view threshold, the novel yaw range and loss "
            "weights given as fractions of training move too (docs/training.md, 'Extending a run')")


def export_checkpoint(checkpoint: str | Path, out: str | Path | None = None) -> Path:
    """``g3dr export``: the fp32 ``.safetensors`` of the complete training checkpoint ``checkpoint`` (a ``step-N``
    folder), written to ``out`` (default ``<run_dir>/exports/step-N.safetensors``, where ``g3dr eval --sweep`` puts
    its exports). The checkpoint is verified first; the config is the one saved in it; the training run's MLflow
    id goes into the file's metadata. One process."""
    from g3dr.config import config_from_dict, load_config
    from g3dr.outputs import check_output_file

    checkpoint = Path(checkpoint)
    if not ckpt.is_complete(checkpoint):
        raise ConfigError(f"{checkpoint} is not a complete training checkpoint (a step-N folder holding meta.json)")
    problems = ckpt.verify_checkpoint(checkpoint)
    if problems:
        raise G3DRError(f"{checkpoint} is damaged: {problems[0]}; export another checkpoint")
    out = Path(out) if out else checkpoint.parent.parent / "exports" / f"{checkpoint.name}.safetensors"
    if out.suffix != ".safetensors":
        raise ConfigError(f"the export {out} must end in .safetensors")
    check_output_file(out, "the export")
    meta = ckpt.read_meta(checkpoint)
    client = meta.get("client_state", {})
    if "config" in client:
        cfg = config_from_dict(client["config"], source=f"{checkpoint}/meta.json")
    else:
        cfg = load_config(checkpoint.parent.parent / CONFIG_FILENAME)
    extra = {"mlflow_run_id": str(client["mlflow_run_id"])} if client.get("mlflow_run_id") else None
    return stage_named(stage_of_checkpoint(meta)).export(cfg, checkpoint, out, extra_metadata=extra)
