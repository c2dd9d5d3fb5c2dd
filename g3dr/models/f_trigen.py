"""FTrigen: the whole differentiable model of G3DR - U-Net, triplane decoder and renderer in one module.

This is the one ``nn.Module`` the training engine (DeepSpeed) wraps and the checkpoint holds. It owns no
losses, critics or optimisers; it never imports deepspeed, mlflow or submitit.
"""

from __future__ import annotations

import torch
from torch import nn

from g3dr.config import Config
from g3dr.models.decoder import TriplaneDecoder
from g3dr.models.unet import TriplaneGenerator


class FTrigen(nn.Module):
    """f_trigen plus its renderer: ``.generator`` (U-Net), ``.decoder`` (MLP), ``.renderer`` (TriplaneRenderer).

    ``forward(rgb (B, 3, H, W) in [-1, 1], depth (B, 1, H, W), cam2world (B, 4, 4), canonical, resolution=None)``
    returns ``{"planes": (B, 3, C, H, W), "rgb": (B, 3, R, R), "depth", "weight_sum", "median_depth",
    "depth_3dgp": (B, 1, R, R)}``
    with R = ``resolution`` (default ``cfg.data.resolution``). In canonical views the pseudo-depth is handed
    to the renderer (depth-prior fine samples and, with ``loss.depth_supervision: kernel``, the depth
    kernel); novel views render without it. The U-Net input takes the model's dtype; the pseudo-depth and
    the cameras reach the renderer as given (keep them float32: in bf16 a depth of 4.99 reads 5.0).
    ``sample_weights=True`` adds the per-sample weights and depths (see ``TriplaneRenderer.forward``).
    Differentiable with respect to all parameters (the renderer's sampling positions are not).
    """

    def __init__(self, cfg: Config):
        super().__init__()
        from g3dr.render import TriplaneRenderer  # the renderer package is built in parallel to this one

        self.cfg = cfg
        self.generator = TriplaneGenerator(cfg.model, resolution=cfg.data.resolution)
        self.decoder = TriplaneDecoder(cfg.model)
        self.renderer = TriplaneRenderer(cfg.renderer, cfg.camera)

    def make_planes(self, rgb: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """Triplane (B, 3, C, H, W) of an RGB-D batch: rgb (B, 3, H, W) in [-1, 1], depth (B, 1, H, W)."""
        if rgb.dim() != 4 or rgb.shape[1] != 3 or depth.dim() != 4 or depth.shape[1] != 1:
            raise ValueError(f"expected rgb (B, 3, H, W) and depth (B, 1, H, W), "
                             f"got {tuple(rgb.shape)} and {tuple(depth.shape)}")
        return self.generator(torch.cat([rgb, depth.to(rgb.dtype)], dim=1))

    def render(self, planes: torch.Tensor, cam2world: torch.Tensor, *, canonical: bool,
               depth: torch.Tensor | None = None, resolution: int | None = None,
               generator: torch.Generator | None = None, sample_weights: bool = False) -> dict[str, torch.Tensor]:
        """Render triplanes from cameras ``cam2world`` (B, 4, 4); ``depth`` is used only when ``canonical``.

        ``generator`` drives the renderer's random choices (global RNG when None; unused when
        ``renderer.deterministic``).
        """
        resolution = resolution or self.cfg.data.resolution
        return self.renderer(planes, self.decoder, cam2world, resolution,
                             depth=depth if canonical else None, canonical=canonical, generator=generator,
                             use_depth_kernel=self.cfg.loss.depth_supervision == "kernel",
                             sample_weights=sample_weights)

    def forward(self, rgb: torch.Tensor, depth: torch.Tensor, cam2world: torch.Tensor, canonical: bool,
                resolution: int | None = None, generator: torch.Generator | None = None,
                sample_weights: bool = False) -> dict[str, torch.Tensor]:
        planes = self.make_planes(rgb, depth)
        images = self.render(planes, cam2world, canonical=canonical, depth=depth, resolution=resolution,
                             generator=generator, sample_weights=sample_weights)
        return {"planes": planes, **images}
