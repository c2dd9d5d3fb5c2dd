"""What the trainer trains: :class:`TrainingStage` (the model, its task, its loader, its image grid and its fp32
export) and :data:`F_TRIGEN`, G3DR's f_trigen, the default stage; and :class:`Loader`, the typed protocol of the
training batches every stage's loader satisfies (stateful or not).

A stage holds no state and knows nothing of DeepSpeed, checkpoints or MLflow: the loop
(:mod:`g3dr.train.trainer`) and the checkpoint manager (:mod:`g3dr.train.checkpointer`) use it. The
super-resolution stage (:mod:`g3dr.train.sr`) subclasses it; this module must not import it.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, runtime_checkable

import torch

from g3dr.config import Config
from g3dr.distributed import DistEnv
from g3dr.log import get_logger

log = get_logger("g3dr.train")

EXPORT_FILENAME = "f_trigen.safetensors"
Batch = dict[str, Any]


@runtime_checkable
class Loader(Protocol):
    """Training batches with a position that survives a restart (:class:`g3dr.data.loader.TrainLoader`).

    ``state_dict()`` is saved per rank with every checkpoint (None: the loader has no position to save) and
    handed back to ``load_state_dict`` on an exact resume; ``data_metrics()`` joins each logging window.
    """

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any] | None: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def data_metrics(self) -> dict[str, float]: ...

    def close(self) -> None: ...


class StatelessLoader:
    """A :class:`Loader` over a plain iterable of batches (test loaders): no position, no metrics."""

    def __init__(self, batches: Iterable[Batch]):
        self.batches = batches

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def data_metrics(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


def as_loader(batches: Iterable[Batch]) -> Loader:
    """``batches`` as a :class:`Loader`: itself when it is one, else wrapped in a :class:`StatelessLoader`."""
    return batches if isinstance(batches, Loader) else StatelessLoader(batches)


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


def default_loader(cfg: Config, dist: DistEnv, target_resolution: int = 0) -> Loader:
    """This rank's :func:`g3dr.data.build_train_loader` (with ``rgb_target`` at ``target_resolution`` when > 0).
    With ``data.source=synthetic`` rank 0 writes the set once (at both sizes) while the other ranks wait."""
    from g3dr.data import build_train_loader

    if cfg.data.source == "synthetic":
        from g3dr.data.loader import ensure_synthetic

        if dist.is_main:
            ensure_synthetic(cfg, progress=sys.stderr.isatty(), target_resolution=target_resolution)  # no bar in a log
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    return build_train_loader(cfg, dist, target_resolution=target_resolution)


class TrainingStage:
    """What :func:`g3dr.train.trainer.train` trains: the model, its task (forward + loss), the loader, the image
    grid and the export.

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

    def build_loader(self, cfg: Config, dist: DistEnv) -> Iterable[Batch]:
        """This rank's training batches: a :class:`Loader` (its position is checkpointed) or a plain iterable."""
        return default_loader(cfg, dist)

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
"""G3DR's f_trigen: the stage :func:`g3dr.train.trainer.train` runs by default (``g3dr train``)."""

