"""The training loop of G3DR on DeepSpeed, and the setup around it (process group, engine, resume, export).

``train(cfg, resume)`` reads like the paper: for every optimizer step, for every micro-batch, choose the
view by Eq. 1, render, weight the losses, backward; then step. Checkpoints, tracking, images and signals
are reached through small components with ``should_*`` checks.

What is trained is a :class:`TrainingStage`: it supplies the model, the task (forward + loss), the loader,
the image grid and the fp32 export. :data:`F_TRIGEN` (the default) is G3DR's f_trigen; the super-resolution
stage (``g3dr train-sr``, :mod:`g3dr.train.sr`) runs through the same loop, checkpoints, resume and MLflow.

Seeds: the model is initialised from ``train.seed`` on every rank (DeepSpeed also broadcasts rank 0's
weights); afterwards each rank seeds its RNGs from ``(train.seed, rank)``, so view choice, novel cameras
and renderer jitter differ between ranks, and the whole run is reproducible from the one seed. The RNG
states and the data position of every rank are saved with each checkpoint, so a resume on the same world size
continues exactly; on another world size (docs/training.md) weights, Adam state and schedules continue exactly
and RNG and data position are re-derived from the seed and the step.
"""

from __future__ import annotations

import math
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from g3dr.config import CONFIG_FILENAME, Config, config_to_dict, save_config
from g3dr.distributed import DistEnv, StopSignal, init_process_group, resolve_dist_env
from g3dr.errors import ConfigError, G3DRError, OutputError
from g3dr.log import get_logger

log = get_logger("g3dr.train")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after a checkpoint; rerun with --resume auto
EXPORT_FILENAME = "f_trigen.safetensors"
STAGE_KEY = "stage"
"""Checkpoint client-state key naming the stage of a non-f_trigen run (absent: f_trigen, as before stages)."""


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


def rank_seed(seed: int, rank: int) -> int:
    """The RNG seed of ``rank``, derived from the run's one seed (distinct per rank, stable across runs)."""
    return (seed * 1_000_003 + rank * 7919 + 1) % (2**63 - 1)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(cfg: Config, dist: DistEnv) -> torch.device:
    """``cfg.device`` (``auto``: CUDA if available) with this rank's local GPU."""
    want = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA device is available; set device=cpu or device=auto")
        torch.cuda.set_device(dist.local_rank)
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def _all_ranks_true(flag: bool, device: torch.device) -> bool:
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return flag
    comm = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=comm)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def _any_rank_flags(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag OR-ed over the ranks, in one collective."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return list(flags)
    comm = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=comm)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def _raise_on_every_rank(message: str | None, error: type[G3DRError] = OutputError) -> None:
    """Rank 0 found ``message`` (None: nothing); every rank raises it, so no rank is left in a collective."""
    message = _broadcast(message)
    if message is not None:
        raise error(message)


def _broadcast(value: Any) -> Any:
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def step_line(step: int, total: int, metrics: dict[str, float]) -> str:
    """One plain log line per logging window (a SLURM log reads like a table): step, every loss term, lr,
    grad norm, samples/s, data-wait fraction, peak memory, ETA at the window's pace."""
    eta = max(total - step, 0) * metrics["seconds_per_step"]
    parts = [f"step {step}/{total}"]
    parts += [f"{k[5:]} {v:.4g}" for k, v in sorted(metrics.items()) if k.startswith("loss/")]
    parts.append(f"lr {metrics['lr']:.3g}")
    if "grad_norm" in metrics:
        parts.append(f"grad_norm {metrics['grad_norm']:.3g}")
    parts += [f"{metrics['samples_per_second']:.3g} samples/s", f"data_wait {metrics['data_wait_fraction']:.0%}",
              f"peak_mem {metrics['peak_memory_mb']:.0f} MB", f"eta {_duration(eta)}"]
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


GRID_COLUMNS = ("input", "canonical", "novel -yaw", "novel +yaw", "depth", "pseudo-depth")
"""The columns of the training grid, as labelled in its header (short forms where tiles are narrow)."""
_GRID_SHORT = ("input", "canon", "nov-", "nov+", "depth", "prior")


def image_grid(model: torch.nn.Module, cfg: Config, batch: dict[str, Any], dtype: torch.dtype, n: int = 4) -> Any:
    """uint8 (H, W, 3) grid under a header naming its columns (:data:`GRID_COLUMNS`), one row per sample:
    input, canonical render, two novel renders (yaw at the edges of the novel range), canonical depth,
    pseudo-depth. Depth is coloured as everywhere else (:func:`g3dr.assets.video.colorize_depth`: near
    bright) over the batch's pseudo-depth range. Uses a forked RNG, so training randomness is untouched."""
    import numpy as np
    from torchvision.utils import make_grid

    from g3dr.assets.video import colorize_depth
    from g3dr.render.cameras import camera_to_world_from_angles

    cam = cfg.camera
    rgb, depth = batch["rgb"][:n], batch["depth"][:n]
    b = rgb.shape[0]
    dev = rgb.device
    spread = math.pi / cam.novel_yaw_den_end
    with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        planes = model.make_planes(rgb.to(dtype), depth.to(dtype))
        tiles = [rgb.float().cpu()]
        depths = []
        for yaw_offset in (0.0, -spread, spread):
            yaw = torch.full((b,), cam.canonical_yaw + yaw_offset, device=dev)
            pitch = torch.full((b,), cam.canonical_pitch, device=dev)
            c2w = camera_to_world_from_angles(yaw, pitch, cam.radius)  # geometry stays float32
            out = model.render(planes, c2w, canonical=yaw_offset == 0.0, depth=depth.float())
            tiles.append(out["rgb"].float().cpu())
            depths.append(out["depth"].float())
        lo, hi = float(depth.min()), float(depth.max()) + 1e-6
        for d in (depths[0], depth.float()):
            coloured = torch.from_numpy(colorize_depth(d, lo, hi)).permute(0, 3, 1, 2).float() / 127.5 - 1
            tiles.append(coloured)
    rows = torch.stack(tiles, dim=1).flatten(0, 1)  # sample-major: one row of len(tiles) tiles per sample
    grid = make_grid((rows.clamp(-1, 1) + 1) / 2, nrow=len(tiles), padding=1)
    body = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    from g3dr.assets.sheet import with_header

    return with_header(body, GRID_COLUMNS, tile=rgb.shape[-1] + 1, short=_GRID_SHORT)


def export_checkpoint(checkpoint: str | Path, out: str | Path | None = None) -> Path:
    """``g3dr export``: the fp32 ``.safetensors`` of the complete training checkpoint ``checkpoint`` (a ``step-N``
    folder), written to ``out`` (default ``<run_dir>/exports/step-N.safetensors``, where ``g3dr eval --sweep`` puts
    its exports). The checkpoint is verified first; the config is the one saved in it; the training run's MLflow
    id goes into the file's metadata. One process."""
    from g3dr.config import config_from_dict, load_config
    from g3dr.outputs import check_output_file
    from g3dr.train import checkpoint as ckpt

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
    client = ckpt.read_meta(checkpoint).get("client_state", {})
    if "config" in client:
        cfg = config_from_dict(client["config"], source=f"{checkpoint}/meta.json")
    else:
        cfg = load_config(checkpoint.parent.parent / CONFIG_FILENAME)
    extra = {"mlflow_run_id": str(client["mlflow_run_id"])} if client.get("mlflow_run_id") else None
    return _stage_for(str(client.get(STAGE_KEY, F_TRIGEN.name))).export(cfg, checkpoint, out, extra_metadata=extra)


def _export_initial(cfg: Config, state: dict[str, torch.Tensor], run_dir: Path, run_id: str | None) -> Path:
    """``train.export_initial``: the initial weights (before any step) as ``exports/step-0.safetensors``."""
    from g3dr.models.checkpoint_io import save_f_trigen
    from g3dr.models.f_trigen import FTrigen

    model = FTrigen(cfg)
    model.load_state_dict(state, strict=True)
    out = save_f_trigen(model, cfg, run_dir / "exports" / "step-0.safetensors", step=0, source="train",
                        extra_metadata={"mlflow_run_id": run_id} if run_id else None)
    log.info("train.export_initial: wrote the initial weights to %s", out)
    return out


def export_f_trigen(cfg: Config, checkpoint: Path, out: Path, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write one fp32 ``.safetensors`` of f_trigen from a complete checkpoint directory (rank 0, after a save).

    With ZeRO 1/2 the fp32 master weights are rebuilt from the optimizer partitions (DeepSpeed's
    ``zero_to_fp32``); with ZeRO 0 the module weights are fp32 only in fp32 training (bf16 with ZeRO 0
    exports the bf16 module weights upcast, with a warning).
    """
    from g3dr.models.checkpoint_io import save_f_trigen
    from g3dr.models.f_trigen import FTrigen
    from g3dr.train.checkpoint import step_of

    model = FTrigen(cfg)
    model.load_state_dict(checkpoint_fp32_state(cfg, checkpoint), strict=True)
    return save_f_trigen(model, cfg, out, step=step_of(checkpoint), source="train", extra_metadata=extra_metadata)


def checkpoint_fp32_state(cfg: Config, checkpoint: Path) -> dict[str, torch.Tensor]:
    """The trained module's fp32 state dict from a complete checkpoint directory (what every stage exports).

    With ZeRO 1/2 the fp32 master weights are rebuilt from the optimizer partitions (DeepSpeed's
    ``zero_to_fp32``: trained parameters only); with ZeRO 0 the module weights, upcast (bf16 with ZeRO 0
    exports the bf16 weights, with a warning).
    """
    if cfg.train.zero_stage in (1, 2):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    else:
        if cfg.train.precision != "fp32":
            log.warning("exporting bf16 module weights upcast to fp32 (ZeRO stage 0 keeps no fp32 copy on disk)")
        state = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in state.items()}


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
    from g3dr.train.checkpoint import checkpoints_root

    run_dir = Path(cfg.run_dir)
    fix = "set run_dir to a writable folder (checkpoints, config.yaml, the export and MLflow's default store go there)"
    check_writable_dir(run_dir, "run_dir", fix)
    check_writable_dir(checkpoints_root(run_dir), "checkpoint folder", fix)
    if export:
        check_output_file(run_dir / export_filename, "the fp32 export", "remove it or pass --no-export")


def _free_space_problem(root: Path, need: int, keep_last: int) -> str | None:
    """An error message when the disk of ``root`` cannot take one checkpoint of ``need`` bytes; a warning (logged)
    when it cannot take the ``keep_last + 1`` a save needs at its peak."""
    from g3dr.outputs import free_bytes, human_bytes
    from g3dr.train.checkpoint import checkpoint_bytes, list_complete

    free = free_bytes(root)
    if free is None:
        return None
    if free < need:
        return (f"checkpoint folder {root}: {human_bytes(free)} free, but one checkpoint takes about "
                f"{human_bytes(need)}; free space or set run_dir to another disk")
    held = sum(checkpoint_bytes(p) for p in list_complete(root))
    peak = (keep_last + 1) * need - held
    if free < peak:
        log.warning("checkpoint folder %s: %s free; train.keep_last=%d keeps up to %d checkpoints of about %s during "
                    "a save (%s more than now): the disk may fill before the run ends", root, human_bytes(free),
                    keep_last, keep_last + 1, human_bytes(need), human_bytes(peak))
    return None


def _run_dir_intact(run_dir: Path, root: Path) -> bool:
    return (run_dir / CONFIG_FILENAME).is_file() and root.is_dir()


def _total_steps_change(cfg: Config, saved_total: Any, step: int) -> str | None:
    """A warning when a resume changes ``train.total_steps``: the schedules that depend on it move."""
    import dataclasses

    from g3dr.train.schedules import learning_rate

    if not isinstance(saved_total, int) or saved_total == cfg.train.total_steps:
        return None
    before = learning_rate(step, dataclasses.replace(cfg.train, total_steps=saved_total))
    after = learning_rate(step, cfg.train)
    return (f"train.total_steps changed from {saved_total} to {cfg.train.total_steps} on resume at step {step}: the "
            f"schedules computed from it change from here on: the LR at step {step} goes from {before:.3g} to "
            f"{after:.3g} ({cfg.train.lr_schedule}), Eq. 1's canonical-view threshold, the novel yaw range and loss "
            "weights given as fractions of training move too (docs/training.md, 'Extending a run')")


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class TrainingStage:
    """What :func:`train` trains: the model, its task (forward + loss), the loader, the image grid and the export.

    The loop, the DeepSpeed engine, checkpoints, exact resume, signals and MLflow are the trainer's and the same
    for every stage. This base class is f_trigen's stage (:data:`F_TRIGEN`); another stage overrides what differs
    (:class:`g3dr.train.sr.SRStage`). A stage holds no state: methods get the config.
    """

    name = "f_trigen"
    """Saved in the checkpoints of other stages (``client_state["stage"]``) and tagged on their MLflow runs."""
    export_filename = EXPORT_FILENAME
    """The fp32 export at the end of a run, in ``run_dir``."""

    def check(self, cfg: Config) -> None:
        """Stage-specific checks before anything starts (clear errors for missing inputs)."""

    def build_model(self, cfg: Config) -> torch.nn.Module:
        """The trained module, initialised from the global RNG (seeded with ``train.seed`` on every rank)."""
        from g3dr.models.f_trigen import FTrigen

        return FTrigen(cfg)

    def build_task(self, cfg: Config, device: torch.device, dtype: torch.dtype) -> Callable[..., Any]:
        """``task(engine, batch, step) -> (loss, report)``: the report holds ``loss/total`` and the logged
        ``loss/...`` and ``weight/...`` terms; f_trigen's also ``canonical`` and the Eq. 1 draw ``view_r``."""
        from g3dr.losses import build_critics
        from g3dr.train.task import G3DRTask

        critics_dtype = dtype if device.type == "cuda" else torch.float32
        return G3DRTask(cfg, build_critics(cfg.loss, device, critics_dtype, cfg.data.resolution), model_dtype=dtype)

    def build_loader(self, cfg: Config, dist: DistEnv) -> Iterable[dict[str, Any]]:
        return _default_loader(cfg, dist)

    def image_grid(self, module: torch.nn.Module, cfg: Config, batch: dict[str, Any], dtype: torch.dtype,
                   report: dict[str, Any]) -> Any:
        """The uint8 (H, W, 3) grid logged every ``train.image_every`` steps (``report``: the last micro-batch's)."""
        return image_grid(module, cfg, batch, dtype)

    def export(self, cfg: Config, checkpoint: Path, out: Path, extra_metadata: dict[str, str] | None = None) -> Path:
        """The fp32 weights of the complete checkpoint ``checkpoint`` as one ``.safetensors`` at ``out``."""
        return export_f_trigen(cfg, checkpoint, out, extra_metadata=extra_metadata)

    def export_initial(self, cfg: Config, state: dict[str, torch.Tensor], run_dir: Path, run_id: str | None) -> Path:
        """``train.export_initial``: the weights before any step as ``exports/step-0.safetensors``."""
        return _export_initial(cfg, state, run_dir, run_id)


F_TRIGEN = TrainingStage()
"""G3DR's f_trigen: the stage :func:`train` runs by default (``g3dr train``)."""


def stage_of_checkpoint(meta: dict[str, Any]) -> str:
    """The stage name a checkpoint's ``meta.json`` records (f_trigen when it names none)."""
    return str(meta.get("client_state", {}).get(STAGE_KEY, F_TRIGEN.name))


def _stage_for(name: str) -> TrainingStage:
    if name == F_TRIGEN.name:
        return F_TRIGEN
    if name == "sr":
        from g3dr.train.sr import SR_STAGE

        return SR_STAGE
    raise ConfigError(f"this g3dr cannot export a checkpoint of stage {name!r} (known: f_trigen, sr)")


def train(cfg: Config, resume: str | None = None,
          build_loader: Callable[[Config, DistEnv], Iterable[dict[str, Any]]] | None = None,
          export: bool = True, stop_at: int | None = None, progress: bool = True,
          stage: TrainingStage | None = None) -> TrainResult:
    """Train ``stage``'s model (default :data:`F_TRIGEN`) as configured; ``resume``: None, ``auto`` or a
    checkpoint directory.

    ``progress``: a progress bar on rank 0, and only when stderr is a terminal (a log file gets no
    carriage-return updates; the logged metrics say how far it is).

    ``build_loader`` defaults to the stage's (:func:`g3dr.data.build_train_loader`). ``stop_at``: end this process after
    that optimizer step with a checkpoint (schedules still run to ``train.total_steps``; a later
    ``--resume auto`` continues). Returns a :class:`TrainResult`.
    """
    from tqdm import tqdm

    from g3dr.train import checkpoint as ckpt
    from g3dr.train.ds_config import deepspeed_config
    from g3dr.train.schedules import StepSchedule
    from g3dr.tracking import build_tracker

    stage = stage or F_TRIGEN
    stage.check(cfg)
    dist = resolve_dist_env()
    device = resolve_device(cfg, dist)
    accumulation = cfg.train.grad_accumulation(dist.world_size)  # a ConfigError before anything starts
    if device.type == "cpu" and cfg.train.precision == "bf16":
        raise ConfigError("train.precision=bf16 runs on CUDA only: PyTorch's CPU kernels used by the renderer "
                          "(antialiased downsampling of the triplanes) have no bf16 version; on the CPU set "
                          "train.precision=fp32")
    # Before anything starts: a read-only, full or mistyped output location fails now, not at the first save.
    check_outputs(cfg, export and dist.is_main, stage.export_filename)
    init_process_group(dist, device.type, cfg.distributed.backend, cfg.distributed.timeout_minutes, via="deepspeed",
                       launch_hint="torchrun, the DeepSpeed launcher or `g3dr submit train`")
    # Signals are caught from here on: one arriving during setup stops the run after its first step.
    stop = StopSignal((signal.SIGTERM, signal.SIGUSR1)).__enter__()
    import deepspeed

    run_dir = Path(cfg.run_dir)
    root = ckpt.checkpoints_root(run_dir)
    train_cfg = cfg.train

    # Resume: the checkpoint is chosen and verified by all ranks together (each hashes a share of its files), so
    # every rank gets the same one; with `auto` a damaged head is set aside and the previous one taken.
    resume_path = ckpt.resolve_resume(resume, run_dir, dist.rank, dist.world_size)
    abandoned: list[str] = []
    if resume_path is not None:
        meta = ckpt.read_meta(resume_path)
        saved_step = int(meta["step"])
        saved_cfg = meta.get("client_state", {}).get("config", {})
        if stage_of_checkpoint(meta) != stage.name:
            stop.__exit__(None, None, None)
            raise ConfigError(f"{resume_path} is a checkpoint of the {stage_of_checkpoint(meta)} stage, not of "
                              f"{stage.name}: set run_dir to a folder of its own for each stage")
        if saved_step > train_cfg.total_steps:
            stop.__exit__(None, None, None)
            raise ConfigError(f"{resume_path} is at step {saved_step}, past train.total_steps={train_cfg.total_steps}: "
                              f"nothing was trained and {run_dir / CONFIG_FILENAME} was left as it was. To train "
                              f"further set train.total_steps above {saved_step} (docs/training.md, 'Extending a "
                              "run'); the run's own end is the one its config.yaml names")
        if saved_step == train_cfg.total_steps:
            stop.__exit__(None, None, None)
            return _already_finished(cfg, resume_path, meta, dist, export, stage)
        warning = _total_steps_change(cfg, saved_cfg.get("train", {}).get("total_steps"), saved_step)
        if warning:
            log.warning("%s", warning)
        # A rollback (resuming from an older checkpoint than the newest): the newer ones are set aside, `latest`
        # names the one resumed from, and the MLflow run is forked below.
        abandoned = _broadcast(ckpt.set_aside_newer(root, resume_path) if dist.is_main else None) or []
    load_universal = False
    if resume_path is not None:
        ckpt.check_zero_stage(resume_path, train_cfg.zero_stage)
        saved_world = ckpt.saved_world_size(resume_path)
        if saved_world != dist.world_size:
            load_universal = ckpt.needs_universal(resume_path, dist.world_size)
            log.warning("checkpoint %s was saved by %d ranks, this run has %d: %s; RNG states and the data position "
                        "are re-derived from the seed and the step (a statistical resume, not exactly-once)",
                        resume_path, saved_world, dist.world_size,
                        "its ZeRO optimizer partitions are converted to a universal checkpoint and re-partitioned"
                        if load_universal else "it holds no partitioned Adam state to convert (ZeRO 0, or step 0)")

    # Same initial weights on every rank (DeepSpeed broadcasts rank 0's anyway).
    seed_everything(train_cfg.seed)
    model = stage.build_model(cfg)
    initial = ({k: v.detach().clone() for k, v in model.state_dict().items()}
               if train_cfg.export_initial and resume_path is None and dist.is_main else None)
    need = ckpt.checkpoint_bytes(resume_path) if resume_path is not None else expected_checkpoint_bytes(model, cfg)
    _raise_on_every_rank(_free_space_problem(root, need, train_cfg.keep_last) if dist.is_main else None)
    ds_config = deepspeed_config(cfg, dist.world_size, device.type)
    if load_universal:
        ds_config["checkpoint"] = {"load_universal": True}

    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                   config=ds_config,
                                                   lr_scheduler=lambda optimizer: StepSchedule(optimizer, train_cfg),
                                                   dist_init_required=False)
    dtype = torch.bfloat16 if train_cfg.precision == "bf16" else torch.float32
    task = stage.build_task(cfg, device, dtype)
    loader = (build_loader or stage.build_loader)(cfg, dist)

    start_step, run_id = 0, None
    seed_everything(rank_seed(train_cfg.seed, dist.rank))
    if resume_path is not None:
        client_state, rank_state = ckpt.load_checkpoint(engine, resume_path, dist.rank, dist.world_size)
        start_step, run_id = int(client_state["step"]), client_state.get("mlflow_run_id")
        if rank_state is not None:
            ckpt.set_rng_state(rank_state["rng"])
            if rank_state.get("data") is not None and hasattr(loader, "load_state_dict"):
                loader.load_state_dict(rank_state["data"])
        else:  # another world size: per-rank state cannot carry over
            seed_everything(rank_seed(train_cfg.seed + start_step, dist.rank))
            if hasattr(loader, "load_state_dict") and hasattr(loader, "state_dict"):
                loader.load_state_dict(_fresh_data_position(loader, ckpt.read_rank_states(resume_path)))
        log.info("resumed from %s at step %d", resume_path, start_step)
    elif resume == "auto":
        log.info("--resume auto: no complete checkpoint under %s; starting fresh", root)
    elif ckpt.find_latest(root) is not None:
        raise ConfigError(f"run_dir {run_dir} already holds checkpoints (newest: {ckpt.find_latest(root).name}); "
                          "continue that run with --resume auto, or set run_dir to a new folder")

    # After a rollback the MLflow run forks: the abandoned steps stay in the old run, which is tagged; the new run
    # continues from the step resumed from, so no curve holds two values of one step.
    forked_from = (run_id, start_step, abandoned) if abandoned and run_id else None
    tracker = build_tracker(cfg, dist.is_main, run_id=None if forked_from else run_id, forked_from=forked_from,
                            world_size=dist.world_size)
    if dist.is_main:
        tracker.log_artifact(save_config(cfg, run_dir))  # the resolved config.yaml, beside the params
        if stage.name != F_TRIGEN.name:
            tracker.set_tags({"g3dr.stage": stage.name})
    if initial is not None and start_step == 0:
        stage.export_initial(cfg, initial, run_dir, tracker.run_id)
        del initial
    result = TrainResult(start_step=start_step, step=start_step, run_id=tracker.run_id, abandoned=abandoned)

    def save(step: int) -> Path:
        client = {"step": step, "mlflow_run_id": tracker.run_id, "world_size": dist.world_size,
                  "config": config_to_dict(cfg)}
        if stage.name != F_TRIGEN.name:
            client[STAGE_KEY] = stage.name
        rank_state = {"rng": ckpt.rng_state(),
                      "data": loader.state_dict() if hasattr(loader, "state_dict") else None}
        path = ckpt.save_checkpoint(engine, root, step, client, rank_state, dist.rank, dist.world_size,
                                    train_cfg.keep_last)
        result.checkpoint = path
        return path

    step = start_step
    batches = iter(loader)
    samples_per_step = train_cfg.global_batch_size
    bad_in_row = 0
    window: dict[str, list[float]] = {}
    window_start, window_steps, window_wait = time.time(), 0, 0.0
    bar = tqdm(total=train_cfg.total_steps, initial=start_step, unit="step",
               disable=not (progress and dist.is_main and sys.stderr.isatty()),
               dynamic_ncols=True)
    status = "FINISHED"
    try:
        end = train_cfg.total_steps if stop_at is None else min(stop_at, train_cfg.total_steps)
        while step < end:
            # One optimizer step: `accumulation` good micro-batches (Eq. 1 view, render, losses, backward).
            lr = float(engine.get_lr()[0])
            reports = []
            while len(reports) < accumulation:
                waited = time.perf_counter()
                with torch.random.fork_rng(devices=[]):  # the loader must not consume training randomness
                    batch = _to_device(next(batches), device)
                window_wait += time.perf_counter() - waited
                loss, report = task(engine, batch, step)
                if not _all_ranks_true(bool(torch.isfinite(loss)), device):
                    result.skipped += 1
                    bad_in_row += 1
                    log.warning("non-finite loss at step %d (%d in a row): micro-batch skipped on every rank",
                                step, bad_in_row)
                    if bad_in_row >= train_cfg.max_nonfinite_in_row:
                        path = save(step)
                        raise NonFiniteLossError(
                            f"{bad_in_row} non-finite losses in a row at step {step}; the last good state is "
                            f"in {path}. Lower train.lr or check the data, then rerun with --resume auto")
                    continue
                bad_in_row = 0
                engine.backward(loss)
                engine.step()
                reports.append(report)
                if "view_r" in report:
                    result.view_draws.append(report["view_r"])
            step += 1
            result.step = step
            window_steps += 1
            step_loss = sum(r["loss/total"] for r in reports) / len(reports)
            result.losses.append(step_loss)
            for r in reports:
                for k, v in r.items():
                    if k.startswith(("loss/", "weight/")):
                        window.setdefault(k, []).append(v)
                if "canonical" in r:
                    window.setdefault("canonical_fraction", []).append(float(r["canonical"]))
            bar.update(1)
            if step % train_cfg.log_every == 0 or step == train_cfg.total_steps:
                elapsed = time.time() - window_start
                metrics = {k: sum(v) / len(v) for k, v in window.items()}
                if train_cfg.beta1_cycle:
                    metrics["beta1"] = float(engine.optimizer.param_groups[0]["betas"][0])
                grad_norm = engine.get_global_grad_norm()
                metrics.update({"lr": lr, "seconds_per_step": elapsed / window_steps,
                                "samples_per_second": samples_per_step * window_steps / max(elapsed, 1e-9),
                                "data_wait_fraction": min(1.0, window_wait / max(elapsed, 1e-9)),
                                "peak_memory_mb": _peak_memory_mb(device), "skipped_micro_batches": result.skipped})
                if grad_norm is not None and math.isfinite(float(grad_norm)):
                    metrics["grad_norm"] = float(grad_norm)
                metrics.update(loader.data_metrics() if hasattr(loader, "data_metrics") else {})  # data/skipped...
                tracker.log_metrics(metrics, step)
                bar.set_postfix(loss=f"{metrics['loss/total']:.4f}", lr=f"{lr:.2e}",
                                sps=f"{metrics['samples_per_second']:.1f}")
                if dist.is_main:
                    log.info("%s", step_line(step, train_cfg.total_steps, metrics))
                window, window_start, window_steps, window_wait = {}, time.time(), 0, 0.0
            if dist.is_main and train_cfg.image_every and step % train_cfg.image_every == 0:
                grid = stage.image_grid(engine.module, cfg, batch, dtype, reports[-1])
                tracker.log_image(grid, key="samples", step=step)
            # One collective per step: a stop signal on any rank, and the run folder still there (rank 0 looks).
            stopping, gone = _any_rank_flags([stop.received is not None,
                                              dist.is_main and not _run_dir_intact(run_dir, root)], device)
            if gone:
                raise OutputError(f"the run folder {run_dir} was deleted or moved during training ({CONFIG_FILENAME} or "
                                  f"checkpoints/ is gone) at step {step}; stopping, since nothing more can be saved "
                                  "there (its checkpoints and the default MLflow store went with it). Restore the "
                                  "folder and rerun with --resume auto, or start again in a new run_dir")
            if step % train_cfg.checkpoint_every == 0 or step in (train_cfg.total_steps, stop_at) or stopping:
                save(step)
            if stopping:
                log.warning("stopped by a signal at step %d after a checkpoint; rerun with --resume auto", step)
                result.preempted, status = True, "KILLED"
                break
        result.param_digest = _check_replicas_agree(engine.module)
        if export and not result.preempted and dist.is_main and result.checkpoint is not None:
            named = {"mlflow_run_id": tracker.run_id} if tracker.run_id else None  # its evals link to this run
            result.export = stage.export(cfg, result.checkpoint, run_dir / stage.export_filename, extra_metadata=named)
            log.info("exported %s (fp32) to %s", stage.name, result.export)
    except BaseException:
        status = "FAILED"
        raise
    finally:
        stop.__exit__(None, None, None)
        bar.close()
        tracker.close(status)
        if hasattr(loader, "close"):
            loader.close()
    return result


def _already_finished(cfg: Config, path: Path, meta: dict[str, Any], dist: DistEnv, export: bool,
                      stage: TrainingStage | None = None) -> TrainResult:
    """``--resume`` of a checkpoint already at ``train.total_steps``: train nothing, rewrite nothing (config.yaml,
    the MLflow run); only a missing fp32 export of that final checkpoint is written (a job stopped between its
    last save and the export)."""
    step = int(meta["step"])
    client = meta.get("client_state", {})
    result = TrainResult(start_step=step, step=step, checkpoint=path, run_id=client.get("mlflow_run_id"),
                         already_finished=True)
    stage = stage or F_TRIGEN
    out = Path(cfg.run_dir) / stage.export_filename
    if export and dist.is_main and not out.is_file():
        from g3dr.config import config_from_dict

        saved = config_from_dict(client["config"], source=f"{path}/meta.json") if "config" in client else cfg
        result.export = stage.export(saved, path, out)
        log.info("exported the final checkpoint %s (fp32) to %s", path, result.export)
    log.warning("nothing to train: %s is already at train.total_steps=%d; config.yaml and the MLflow run were left "
                "as they were. To train further, raise train.total_steps (docs/training.md, 'Extending a run')",
                path, step)
    return result


def _fresh_data_position(loader: Any, saved: list[dict[str, Any]]) -> dict[str, Any]:
    """The data position for a resume on another world size: every rank starts the epoch after the newest
    one any saved rank reached, so its resampled shard draws, seeded by (seed, rank, worker, epoch), are ones
    no rank of the saved run consumed. Statistical, not exactly-once: with resampling, which samples come
    next was random anyway; a rank of the new world does not continue the stream of the old rank of that index.
    """
    epochs = [int(s["data"]["epoch"]) for s in saved if s.get("data") is not None]
    position = dict(loader.state_dict())
    position.update(epoch=max(epochs) + 1 if epochs else int(position["epoch"]), batches_done=0, consumed={})
    return position


def _default_loader(cfg: Config, dist: DistEnv) -> Iterable[dict[str, Any]]:
    from g3dr.data import build_train_loader

    if cfg.data.source == "synthetic":
        # Rank 0 writes the synthetic shards once; the other ranks wait instead of racing it.
        from g3dr.data.loader import ensure_synthetic

        if dist.is_main:
            ensure_synthetic(cfg, progress=sys.stderr.isatty())  # no bar in a log file
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    return build_train_loader(cfg, dist)
