"""The super-resolution stage as a training stage: ``g3dr train-sr`` (docs/training.md, "Super-resolution").

The RCAN of :mod:`g3dr.models.sr` learns to upscale f_trigen's renders by ``sr.scale``. Per micro-batch:

- the frozen f_trigen (``sr.generator``, eval mode, no gradients) renders the canonical view of the input
  at ``data.resolution`` with its pseudo-depth, as training renders canonical views (depth-prior fine
  samples, stratified jitter from the global RNG, which the trainer seeds per rank and checkpoints);
- the SR network upsamples the render (without the output clamp, whose gradient is zero outside [-1, 1]);
- the loss compares the result with the input image at ``sr.scale x data.resolution`` (``rgb_target``,
  decoded from a stored image at least that large, never upsampled): ``sr.loss.l1`` x L1 +
  ``sr.loss.perceptual`` x LPIPS-VGG (the paper's second VGG weight, 0.5, "super-resolution output"), with the
  critics :func:`g3dr.losses.build_critics` builds for images of the target size.

Novel views get no term: they have no image to compare with at any size (docs/training.md says why a
perceptual or CLIP term against the input was not used either).

Everything else (DeepSpeed, checkpoints, exact resume, signals, MLflow) is :func:`g3dr.train.trainer.train`'s,
run with :data:`SR_STAGE` (a :class:`~g3dr.train.stage.TrainingStage`). The export is the fp32 RCAN
(:func:`g3dr.models.sr.save_sr`, ``source = train``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from g3dr.config import Config
from g3dr.distributed import DistEnv
from g3dr.errors import ConfigError, WeightsError
from g3dr.log import get_logger
from g3dr.train.stage import Loader, TrainingStage, checkpoint_fp32_state, default_loader

log = get_logger("g3dr.train.sr")

SR_EXPORT_FILENAME = "sr.safetensors"
GRID_COLUMNS = ("input", "render", "bicubic", "super-resolved", "target")
"""The columns of the super-resolution training grid: input and render at ``data.resolution`` (shown by pixel
repetition), the render upsampled bicubically, the SR output and the target at the higher resolution."""
_GRID_SHORT = ("input", "render", "bicub", "sr", "target")
# How the frozen f_trigen computes, taken from this run's config; everything else of its renderer (sample
# counts, depth prior, sigma scale, ...) is the stored config it was trained with.
_RENDER_SETTINGS = ("renderer.impl", "renderer.deterministic")


def target_resolution(cfg: Config) -> int:
    """The size of the SR output and of its target: ``sr.scale x data.resolution``."""
    return cfg.sr.scale * cfg.data.resolution


def check_sr_config(cfg: Config) -> None:
    """Clear errors before anything starts: ``sr.generator`` names a readable f_trigen file trained at our
    ``data.resolution``, and the loss has a term."""
    from g3dr.models.checkpoint_io import read_f_trigen_metadata

    path = cfg.sr.generator
    if not path:
        raise ConfigError("sr.generator is empty: g3dr train-sr needs the frozen f_trigen whose renders it learns to "
                          "upscale, e.g. sr.generator=outputs/run/f_trigen.safetensors (g3dr train's export)")
    try:
        meta = read_f_trigen_metadata(path)
    except WeightsError as err:
        raise WeightsError(f"sr.generator: {err}") from None
    stored = meta["config"].get("data", {}).get("resolution", 128) if isinstance(meta["config"], dict) else None
    if stored != cfg.data.resolution:
        raise ConfigError(f"sr.generator {path} renders at data.resolution={stored}, but this run has "
                          f"data.resolution={cfg.data.resolution}: set data.resolution={stored} (the SR input size; "
                          f"the target is sr.scale x that)")
    if cfg.sr.loss.l1.always_zero and cfg.sr.loss.perceptual.always_zero:
        raise ConfigError("sr.loss.l1 and sr.loss.perceptual are both 0 at every step: nothing to train")


def load_generator(cfg: Config, device: torch.device) -> tuple[nn.Module, Config]:
    """The frozen f_trigen of ``sr.generator`` on ``device`` (eval mode, ``requires_grad`` off) and its config,
    with this run's :data:`_RENDER_SETTINGS`."""
    from g3dr.config import flatten_config
    from g3dr.models.checkpoint_io import load_f_trigen

    ours = flatten_config(cfg)
    overrides = [f"{key}={str(ours[key]).lower() if isinstance(ours[key], bool) else ours[key]}"
                 for key in _RENDER_SETTINGS]
    try:
        generator, g_cfg, _ = load_f_trigen(cfg.sr.generator, device, overrides)
    except WeightsError as err:
        raise WeightsError(f"sr.generator: {err}") from None
    generator.requires_grad_(False)
    return generator.eval(), g_cfg


def render_canonical(generator: nn.Module, g_cfg: Config, rgb: torch.Tensor, depth: torch.Tensor,
                     generator_rng: torch.Generator | None = None) -> torch.Tensor:
    """f_trigen's canonical render (B, 3, R, R) in [-1, 1] of the inputs ``rgb`` (B, 3, R, R) and ``depth``
    (B, 1, R, R), with the pseudo-depth as in training; no gradients. The renderer's random choices come from
    ``generator_rng`` (the global RNG when None; none with ``renderer.deterministic``)."""
    from g3dr.render.cameras import camera_to_world_from_angles, canonical_angles

    with torch.no_grad():
        yaw, pitch = canonical_angles(rgb.shape[0], g_cfg.camera, device=rgb.device)
        cam2world = camera_to_world_from_angles(yaw, pitch, g_cfg.camera.radius)
        out = generator(rgb.float(), depth.float(), cam2world.float(), True, generator=generator_rng)
    return out["rgb"].float()


class SRTask:
    """``__call__(model, batch, step) -> (loss, report)`` of the super-resolution stage (see the module docstring).

    ``model`` is the SR network or its engine; ``batch`` holds ``rgb``, ``depth`` and ``rgb_target``.
    """

    def __init__(self, cfg: Config, generator: nn.Module, generator_cfg: Config, critics: Any,
                 model_dtype: torch.dtype = torch.float32):
        self.cfg = cfg
        self.generator = generator
        self.generator_cfg = generator_cfg
        self.critics = critics
        self.model_dtype = model_dtype  # the SR input's dtype; the render and the losses stay float32
        layers = cfg.sr.loss.perceptual.layers
        if len(layers) != critics.vgg.num_layers and not cfg.sr.loss.perceptual.always_zero:
            raise ConfigError(f"sr.loss.perceptual.layers has {len(layers)} block weights, the perceptual critic has "
                              f"{critics.vgg.num_layers} blocks")

    def weights_at(self, step: int) -> dict[str, float]:
        total = self.cfg.train.total_steps
        return {name: getattr(self.cfg.sr.loss, name).at(step, total) for name in ("l1", "perceptual")}

    def __call__(self, model: Any, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Forward ``model`` on one micro-batch at optimizer step ``step``: the weighted loss and a report of the
        computed terms (``loss/sr/<term>``), their weights (``weight/sr/<term>``), ``loss/total`` and ``images``."""
        from g3dr.losses import l1_loss

        rgb, depth = batch["rgb"], batch["depth"]
        if "rgb_target" not in batch:
            raise ValueError("the super-resolution stage needs batches with rgb_target (build_train_loader with "
                             "target_resolution)")
        target = batch["rgb_target"].float()
        render = render_canonical(self.generator, self.generator_cfg, rgb, depth)
        out = model(render.to(self.model_dtype), clamp=False).float()
        if out.shape != target.shape:
            raise ValueError(f"the SR output {tuple(out.shape)} and its target {tuple(target.shape)} differ: "
                             "sr.scale x data.resolution must be the target size")
        weights = {k: w for k, w in self.weights_at(step).items() if w > 0}
        terms: dict[str, torch.Tensor] = {}
        for name in weights:
            match name:
                case "l1":
                    terms[name] = l1_loss(out, target)
                case "perceptual":
                    terms[name] = self.critics.vgg(out, target, self.cfg.sr.loss.perceptual.layers)
        total = sum(weights[k] * terms[k] for k in terms) if terms else out.sum() * 0.0
        report: dict[str, Any] = {f"loss/sr/{k}": float(v.detach()) for k, v in terms.items()}
        report.update({f"weight/sr/{k}": float(w) for k, w in weights.items()})
        report["loss/total"] = float(total.detach())
        report["images"] = {"input": rgb.detach(), "render": render.detach(), "sr": out.detach().clamp(-1, 1),
                            "target": target.detach()}
        return total, report


def sr_image_grid(images: dict[str, torch.Tensor], n: int = 4) -> Any:
    """uint8 (H, W, 3) grid under a header (:data:`GRID_COLUMNS`), one row per sample, every tile at the target
    size: input and render by pixel repetition, the render upsampled bicubically, the SR output, the target."""
    import numpy as np
    import torch.nn.functional as F
    from torchvision.utils import make_grid

    from g3dr.assets.sheet import with_header

    target = images["target"][:n].float().cpu()
    size = target.shape[-1]
    render = images["render"][:n].float().cpu()
    scale = size // render.shape[-1]
    tiles = [images["input"][:n].float().cpu().repeat_interleave(scale, -1).repeat_interleave(scale, -2),
             render.repeat_interleave(scale, -1).repeat_interleave(scale, -2),
             F.interpolate(render, size=(size, size), mode="bicubic", align_corners=False),
             images["sr"][:n].float().cpu(), target]
    rows = torch.stack(tiles, dim=1).flatten(0, 1)
    grid = make_grid((rows.clamp(-1, 1) + 1) / 2, nrow=len(tiles), padding=1)
    body = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return with_header(body, GRID_COLUMNS, tile=size + 1, short=_GRID_SHORT)


def export_sr(cfg: Config, checkpoint: Path, out: Path, extra_metadata: dict[str, str] | None = None) -> Path:
    """The fp32 SR network of the complete checkpoint ``checkpoint`` as one ``.safetensors``
    (:func:`g3dr.models.sr.save_sr`, ``source = train``, with the step, the generator and ``extra_metadata``)."""
    from g3dr.models.sr import build_sr
    from g3dr.train.checkpoint import step_of

    step = step_of(checkpoint)
    model = build_sr(cfg.sr)
    state = checkpoint_fp32_state(cfg, checkpoint)
    # zero_to_fp32 rebuilds the trained parameters only; the frozen ones (RCAN's mean shift) are constants of the
    # architecture and keep build_sr's values, which are the ones the run started and ended with.
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    missing = set(model.state_dict()) - set(state)
    if not missing <= frozen:
        raise WeightsError(f"checkpoint {checkpoint} lacks the trained SR tensors {sorted(missing - frozen)[:4]}; "
                           "it was written by another model (check sr.* against the run's config.yaml)")
    model.load_state_dict(state, strict=not missing)
    return _save(model, cfg, out, step, extra_metadata)


def _save(model: nn.Module, cfg: Config, out: Path, step: int, extra_metadata: dict[str, str] | None) -> Path:
    from g3dr.config import dump_config
    from g3dr.models.sr import save_sr

    meta = {"source": "train", "step": str(step), "generator": cfg.sr.generator, "config": dump_config(cfg),
            **(extra_metadata or {})}
    return save_sr(model, out, meta)


class SRStage(TrainingStage):
    """``g3dr train-sr``: the RCAN of ``cfg.sr`` on the frozen f_trigen's canonical renders (module docstring)."""

    name = "sr"
    export_filename = SR_EXPORT_FILENAME

    def check(self, cfg: Config) -> None:
        check_sr_config(cfg)

    def build_model(self, cfg: Config) -> nn.Module:
        from g3dr.models.sr import build_sr, describe_architecture

        model = build_sr(cfg.sr)
        log.info("super-resolution stage: %s, %d trainable parameters, %d -> %d px", describe_architecture(
            model.architecture), sum(p.numel() for p in model.parameters() if p.requires_grad), cfg.data.resolution,
            target_resolution(cfg))
        return model

    def build_task(self, cfg: Config, device: torch.device, dtype: torch.dtype) -> SRTask:
        from g3dr.losses import build_critics

        generator, g_cfg = load_generator(cfg, device)
        critics_dtype = dtype if device.type == "cuda" else torch.float32
        # The critics see SR outputs and targets, so they are built for that size (loss.critics=synthetic trains
        # its tiny critics on images of it); LPIPS-VGG itself is convolutional and takes any size >= 16 px.
        critics = build_critics(cfg.loss, device, critics_dtype, target_resolution(cfg))
        return SRTask(cfg, generator, g_cfg, critics, model_dtype=dtype)

    def build_loader(self, cfg: Config, dist: DistEnv) -> Loader:
        return default_loader(cfg, dist, target_resolution=target_resolution(cfg))

    def image_grid(self, module: nn.Module, cfg: Config, batch: dict[str, Any], dtype: torch.dtype,
                   report: dict[str, Any]) -> Any:
        return sr_image_grid(report["images"])

    def export(self, cfg: Config, checkpoint: Path, out: Path, extra_metadata: dict[str, str] | None = None) -> Path:
        return export_sr(cfg, checkpoint, out, extra_metadata)

    def export_initial(self, cfg: Config, state: dict[str, torch.Tensor], run_dir: Path, run_id: str | None) -> Path:
        from g3dr.models.sr import build_sr

        model = build_sr(cfg.sr)
        model.load_state_dict(state, strict=True)
        out = _save(model, cfg, run_dir / "exports" / "step-0.safetensors", 0,
                    {"mlflow_run_id": run_id} if run_id else None)
        log.info("train.export_initial: wrote the initial weights to %s", out)
        return out


SR_STAGE = SRStage()
"""The stage ``g3dr train-sr`` runs."""
