"""The triplane volume renderer: one pipeline (``render_rays_with``), two sets of primitives, a thin module.

:func:`render_rays_with` reproduces the G3DR reference renderer (EG3D's ``ImportanceRenderer`` as
extended by preddy5/G3DR ``train.py``) step by step, for both paths:

1. near/far from the ray-box intersection (EG3D's handling of rays that miss the box);
2. ``num_coarse`` stratified depths (linspace + one-step uniform jitter) and a decoder pass;
3. ``num_fine`` fine depths, either importance-sampled from the coarse weights or, in canonical views
   with a depth prior and with probability ``depth_prior_p``, ``d + linspace(-w, w, num_fine)``;
   a second decoder pass; both sets merged in depth order;
4. the MipNeRF ray marcher with ``sigma_scale`` and, in canonical views, the depth kernel as a
   backward-only scale of the gradients of alpha and colour.

The decoder passes and the marcher calls are the primitives (:class:`RenderPrimitives`, ``decode`` and
``composite``), the only part where the two paths differ (as nerfacc keeps one ``rendering()`` and puts
the speed inside its primitives): :class:`ReferencePrimitives` (plain autograd) and
:class:`g3dr.render.fused.FusedPrimitives` (``renderer.impl: fused``: the same numbers, gradients by
recomputation). :func:`render_rays` checks its arguments, builds the primitives ``renderer.impl`` names
and runs the pipeline.

``cut_quantile`` > 0 renders as 3DGP renders the depth maps of its NFS (an evaluation render, without
gradient): every marcher call of the render - the coarse pass whose weights place the importance
samples, and the final composite - sets the densities below that quantile of the image's densities to 0
(:func:`g3dr.render.marching.composite_from_samples`); ``depth_3dgp`` is then the NFS depth.

The decoder is a callable ``decoder(features (B, N, C), coordinates (B, N, 3), directions (B, N, 3))
-> (rgb (B, N, 3), sigma_raw (B, N, 1))`` where ``features`` are the triplane features averaged over
planes, ``coordinates`` the sample points scaled by ``2 / box_warp`` (in [-1, 1] inside the box) and
``directions`` the unit ray directions.

Randomness and reproducibility: with ``generator=None`` the global torch RNG is used, drawing (a) the
stratified jitter as one (B, R, S, 1) tensor, (b) the depth-prior choice as one scalar (only when a
depth prior is given and 0 < depth_prior_p < 1) and (c) the inverse-CDF ``u`` as one (B * R, num_fine) tensor. With
``renderer.deterministic`` nothing is drawn: no jitter, evenly spaced ``u`` and never the depth-prior
fine samples (importance sampling, the reference's more likely branch; the prior still drives the depth
kernel), so renders are reproducible bit for bit on one machine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from g3dr.config import CameraConfig, RendererConfig
from g3dr.log import get_logger
from g3dr.render.cameras import rays_from_cameras
from g3dr.render.fused import FusedPrimitives, decoder_supports_fused
from g3dr.render.marching import Composite, composite_from_samples, depth_kernel_from_depths, median_depth_from_weights
from g3dr.render.sampling import (
    depths_from_depth_prior,
    depths_from_importance,
    depths_from_stratified,
    merge_samples,
    near_far_from_box,
)
from g3dr.render.triplane import features_from_planes, plane_axes_for_convention, planes_pyramid_from_planes

__all__ = ["Decoder", "RenderResult", "RenderPrimitives", "ReferencePrimitives", "render_rays", "render_rays_with",
           "TriplaneRenderer"]

log = get_logger("g3dr.render")

Decoder = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RenderResult:
    """Per-ray outputs of :func:`render_rays_with` for B images of R rays (S merged samples per ray)."""

    rgb: torch.Tensor
    """(B, R, 3) in [-1, 1]."""
    depth: torch.Tensor
    """(B, R, 1) weighted mean depth ``sum(w t) / (sum(w) + 1e-3)``."""
    weight_sum: torch.Tensor
    """(B, R, 1) accumulated opacity."""
    median_depth: torch.Tensor
    """(B, R, 1) depth where the accumulated weight reaches 0.5 (no gradient)."""
    depth_3dgp: torch.Tensor
    """(B, R, 1) 3DGP's depth ``sum(w t)``, not divided by ``sum(w)`` (no gradient on the fused path)."""
    depths: torch.Tensor | None = None
    """(B, R, S, 1) the sample depths that were composited."""
    weights: torch.Tensor | None = None
    """(B, R, S - 1, 1) per-interval compositing weights."""


class RenderPrimitives(Protocol):
    """The decode-and-composite primitives of :func:`render_rays_with`: all that differs between the paths.

    :class:`ReferencePrimitives` (plain autograd) and :class:`g3dr.render.fused.FusedPrimitives` (the same
    numbers at a fraction of the memory) implement it; both are built for one render from its planes and
    decoder. ``values`` are the decoded samples as a list of (B, R, S, k) tensors, opaque to the caller,
    which reorders them with the depths when sample sets are merged (:func:`merge_samples`).
    """

    geometry_dtype: torch.dtype | None
    """The dtype the rays, depth prior and sample depths are cast to before sampling (None: kept as given)."""

    def decode(self, origins: torch.Tensor, directions: torch.Tensor, depths: torch.Tensor) -> list[torch.Tensor]:
        """Decode the samples at ``origins + depths * directions``; depths (B, R, S, 1), rays (B, R, 3)."""

    def composite(self, origins: torch.Tensor, directions: torch.Tensor, depths: torch.Tensor,
                  values: list[torch.Tensor], *, grad_scale: torch.Tensor | None = None,
                  cut_quantile: float = 0.0) -> Composite:
        """The ray marcher (:func:`composite_from_samples`'s numbers) on decoded samples, differentiable in the
        planes and the decoder's parameters; ``grad_scale`` is the depth kernel (:func:`depth_kernel_from_depths`)."""


class ReferencePrimitives:
    """Plain autograd primitives: ``grid_sample`` lookups in the plane pyramid, the decoder callable and
    :func:`composite_from_samples`. Backward keeps every per-sample intermediate; any decoder callable works."""

    geometry_dtype = None

    def __init__(self, planes: torch.Tensor, decoder: Decoder, cfg: RendererConfig, plane_axes: torch.Tensor):
        self.levels = planes_pyramid_from_planes(planes, cfg.plane_resolutions)
        self.decoder, self.plane_axes, self.cfg = decoder, plane_axes, cfg

    def decode(self, origins: torch.Tensor, directions: torch.Tensor, depths: torch.Tensor) -> list[torch.Tensor]:
        """[colors (B, R, S, 3), sigma_raw (B, R, S, 1)] from the decoder."""
        batch, rays, samples, _ = depths.shape
        with torch.no_grad():
            points = (origins.unsqueeze(-2) + depths * directions.unsqueeze(-2)).reshape(batch, -1, 3)
            sample_dirs = directions.unsqueeze(-2).expand(-1, -1, samples, -1).reshape(batch, -1, 3)
        box_warp = self.cfg.box_warp
        features = features_from_planes(self.levels, points, self.plane_axes, box_warp)
        rgb, sigma = self.decoder(features, (2 / box_warp) * points, sample_dirs)
        if rgb.shape[:2] != (batch, rays * samples) or sigma.shape != (batch, rays * samples, 1):
            raise ValueError(
                f"decoder returned rgb {tuple(rgb.shape)} and sigma {tuple(sigma.shape)}; "
                f"expected ({batch}, {rays * samples}, 3) and ({batch}, {rays * samples}, 1)"
            )
        return [rgb.reshape(batch, rays, samples, rgb.shape[-1]), sigma.reshape(batch, rays, samples, 1)]

    def composite(self, origins: torch.Tensor, directions: torch.Tensor, depths: torch.Tensor,
                  values: list[torch.Tensor], *, grad_scale: torch.Tensor | None = None,
                  cut_quantile: float = 0.0) -> Composite:
        colors, densities = values
        return composite_from_samples(colors, densities, depths, density_offset=self.cfg.density_offset,
                                      sigma_scale=self.cfg.sigma_scale, grad_scale=grad_scale,
                                      cut_quantile=cut_quantile)


_fused_unsupported_logged: set[str] = set()


def _log_fused_unsupported(decoder: Decoder) -> None:
    name = type(decoder).__name__
    if name not in _fused_unsupported_logged:
        _fused_unsupported_logged.add(name)
        log.info("renderer.impl=fused needs a decoder with mlp_weights(); %s has none: using the reference path", name)


_weights_logged: list[bool] = []


def _log_reference_for_weights() -> None:
    if not _weights_logged:
        _weights_logged.append(True)
        log.info("renders that return per-sample weights (loss.depth_supervision=kl, g3dr eval's gt_views weight "
                 "metrics) take the reference path: the fused path's weights carry no gradient")


def _primitives_for(planes: torch.Tensor, decoder: Decoder, cfg: RendererConfig, plane_axes: torch.Tensor,
                    differentiable_weights: bool) -> RenderPrimitives:
    """The primitives ``cfg.impl`` names; the reference ones where the fused path cannot serve (logged once)."""
    if cfg.impl == "fused":
        if differentiable_weights:
            _log_reference_for_weights()
        elif not decoder_supports_fused(decoder):
            _log_fused_unsupported(decoder)
        else:
            return FusedPrimitives(planes, decoder, cfg, plane_axes)
    return ReferencePrimitives(planes, decoder, cfg, plane_axes)


def render_rays(
    planes: torch.Tensor,
    decoder: Decoder,
    origins: torch.Tensor,
    directions: torch.Tensor,
    cfg: RendererConfig,
    *,
    depth_prior: torch.Tensor | None = None,
    use_depth_kernel: bool = False,
    sample_depths: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    plane_axes: torch.Tensor | None = None,
    differentiable_weights: bool = False,
    cut_quantile: float = 0.0,
) -> RenderResult:
    """Volume-render a triplane along rays: :func:`render_rays_with` the primitives ``cfg.impl`` names.

    Args:
        planes: (B, 3, C, H, W) triplane, ``H == cfg.plane_resolutions[0]``.
        decoder: ``decoder(features (B, N, C), coordinates (B, N, 3), directions (B, N, 3)) ->
            (rgb (B, N, 3) in [0, 1], sigma_raw (B, N, 1))``.
        origins, directions: (B, R, 3) world-space rays (unit directions).
        cfg: the renderer section of the config.
        depth_prior: (B, R, 1) pseudo-depth per ray (canonical views only): enables the depth-prior
            fine samples (probability ``cfg.depth_prior_p``) and is the centre of the depth kernel.
        use_depth_kernel: apply the depth kernel (needs ``depth_prior``).
        sample_depths: (B, R, S, 1) explicit sorted depths: skips all sampling (one decoder pass).
        generator: RNG for jitter, depth-prior choice and inverse-CDF draws (None: the global RNG).
        plane_axes: (3, 2) projection (default: from ``cfg.plane_convention``).
        differentiable_weights: ``RenderResult.weights`` must carry gradients (a loss on the per-sample
            weights, e.g. ``loss.depth_supervision: kl``). The fused path's weights carry none, so such
            renders take the reference path (logged once).
        cut_quantile: 3DGP's density cut in [0, 1) for every marcher call of this render (coarse pass
            included); 0 (the default) is off. A cut render is an evaluation render: it runs under
            ``torch.no_grad`` on both paths (the fused backward does not implement the cut).

    Returns:
        :class:`RenderResult`; ``rgb``, ``depth`` and ``weight_sum`` are differentiable in ``planes``
        and the decoder's parameters (unless ``cut_quantile`` > 0).
    """
    if not 0.0 <= cut_quantile < 1.0:
        raise ValueError(f"cut_quantile must be in [0, 1), got {cut_quantile}")
    if planes.ndim != 5 or planes.shape[1] != 3:
        raise ValueError(f"planes must be (B, 3, C, H, W), got {tuple(planes.shape)}")
    batch = planes.shape[0]
    if origins.shape != directions.shape or origins.ndim != 3 or origins.shape[0] != batch or origins.shape[2] != 3:
        raise ValueError(f"origins {tuple(origins.shape)} and directions {tuple(directions.shape)} must be ({batch}, R, 3)")
    if plane_axes is None:
        plane_axes = plane_axes_for_convention(cfg.plane_convention, planes.device)
    with torch.no_grad() if cut_quantile > 0.0 else contextlib.nullcontext():
        primitives = _primitives_for(planes, decoder, cfg, plane_axes, differentiable_weights)
        return render_rays_with(primitives, origins, directions, cfg, depth_prior=depth_prior,
                                use_depth_kernel=use_depth_kernel, sample_depths=sample_depths, generator=generator,
                                cut_quantile=cut_quantile)


def render_rays_with(primitives: RenderPrimitives, origins: torch.Tensor, directions: torch.Tensor, cfg: RendererConfig,
                     *, depth_prior: torch.Tensor | None = None, use_depth_kernel: bool = False,
                     sample_depths: torch.Tensor | None = None, generator: torch.Generator | None = None,
                     cut_quantile: float = 0.0) -> RenderResult:
    """Place the samples and decide the depth kernel; ``primitives`` decode and composite.

    The one implementation of the steps in the module docstring, for both paths: near/far, stratified
    coarse depths, the fine depths (depth prior or importance sampling from the coarse weights), the
    merge, the depth kernel. The other arguments are :func:`render_rays`'s; ``origins`` and ``directions``
    must be (B, R, 3) with the B of the planes the primitives were built from (:func:`render_rays` checks
    that; this function checks the depth prior and explicit depths). Unlike :func:`render_rays`, a cut
    render is not wrapped in ``torch.no_grad`` here. Example (a test of the Triton kernels)::

        primitives = FusedPrimitives(planes, decoder, cfg, plane_axes, backend="triton")
        result = render_rays_with(primitives, origins, directions, cfg, generator=torch.Generator().manual_seed(1))
    """
    batch, rays = origins.shape[:2]
    if depth_prior is not None and depth_prior.shape != (batch, rays, 1):
        raise ValueError(f"depth_prior must be ({batch}, {rays}, 1), got {tuple(depth_prior.shape)}")
    if use_depth_kernel and depth_prior is None:
        raise ValueError("use_depth_kernel=True needs depth_prior (the pixel pseudo-depth)")
    dtype = primitives.geometry_dtype
    if dtype is not None:
        origins, directions = origins.to(dtype), directions.to(dtype)
        depth_prior = None if depth_prior is None else depth_prior.to(dtype)
        sample_depths = None if sample_depths is None else sample_depths.to(dtype)

    def decode(depths: torch.Tensor) -> list[torch.Tensor]:
        return primitives.decode(origins, directions, depths)

    if sample_depths is not None:
        if sample_depths.ndim != 4 or sample_depths.shape[:2] != (batch, rays) or sample_depths.shape[3] != 1:
            raise ValueError(f"sample_depths must be ({batch}, {rays}, S, 1), got {tuple(sample_depths.shape)}")
        if bool((sample_depths[:, :, 1:] < sample_depths[:, :, :-1]).any()):
            raise ValueError("sample_depths must be sorted ascending along the sample axis")
        depths = sample_depths.detach()
        values = decode(depths)
    else:
        with torch.no_grad():
            near, far = near_far_from_box(origins, directions, cfg.box_warp)
            depths = depths_from_stratified(near, far, cfg.num_coarse, jitter=not cfg.deterministic, generator=generator)
        values = decode(depths)
        if cfg.num_fine > 0:
            with torch.no_grad():
                if _draw_depth_prior_samples(cfg, depth_prior, generator, origins.device):
                    depths_fine = depths_from_depth_prior(depth_prior, cfg.num_fine, cfg.depth_prior_window)
                else:
                    coarse = primitives.composite(origins, directions, depths, values, cut_quantile=cut_quantile)
                    depths_fine = depths_from_importance(
                        depths, coarse.weights, cfg.num_fine, deterministic=cfg.deterministic, generator=generator
                    )
            depths, values = merge_samples(depths, values, depths_fine, decode(depths_fine))
    grad_scale = None
    if use_depth_kernel:
        depths_mid = (depths[:, :, :-1] + depths[:, :, 1:]) / 2
        grad_scale = depth_kernel_from_depths(depths_mid, depth_prior, cfg.depth_kernel)
    out = primitives.composite(origins, directions, depths, values, grad_scale=grad_scale, cut_quantile=cut_quantile)
    return RenderResult(
        rgb=out.rgb,
        depth=out.depth,
        weight_sum=out.weight_sum,
        median_depth=median_depth_from_weights(out.weights, out.depths_mid),
        depth_3dgp=out.depth_3dgp,
        depths=depths,
        weights=out.weights,
    )


def _draw_depth_prior_samples(cfg: RendererConfig, depth_prior: torch.Tensor | None,
                              generator: torch.Generator | None, device: torch.device) -> bool:
    """Whether the fine samples come from the depth prior: with probability ``cfg.depth_prior_p`` (one scalar
    drawn, only when 0 < p < 1), never without a prior or in ``cfg.deterministic`` mode."""
    if depth_prior is None or cfg.deterministic or cfg.depth_prior_p <= 0.0:
        return False
    if cfg.depth_prior_p >= 1.0:
        return True
    device = device if generator is None else generator.device
    return bool(torch.rand((), generator=generator, device=device) < cfg.depth_prior_p)


class TriplaneRenderer(nn.Module):
    """Renders images of a triplane from camera matrices; holds the config and the plane axes.

    ``renderer.impl`` selects the primitives inside :func:`render_rays`: ``reference`` (plain autograd) or
    ``fused`` (:mod:`g3dr.render.fused`, same numbers; logged once). The plane axes are a
    non-persistent buffer, so they never appear in checkpoints (the convention is saved in the config).
    """

    _fused_fallback_logged = False

    def __init__(self, renderer_cfg: RendererConfig, camera_cfg: CameraConfig):
        super().__init__()
        self.cfg = renderer_cfg
        self.camera_cfg = camera_cfg
        self.register_buffer("plane_axes", plane_axes_for_convention(renderer_cfg.plane_convention), persistent=False)
        if renderer_cfg.impl == "fused" and not TriplaneRenderer._fused_fallback_logged:
            log.info("renderer.impl=fused: fused triplane sampling, decoder and compositing (g3dr.render.fused)")
            TriplaneRenderer._fused_fallback_logged = True

    def forward(
        self,
        planes: torch.Tensor,
        decoder: Decoder,
        cam2world: torch.Tensor,
        resolution: int | tuple[int, int],
        depth: torch.Tensor | None = None,
        canonical: bool = False,
        generator: torch.Generator | None = None,
        use_depth_kernel: bool = True,
        sample_weights: bool = False,
        cut_quantile: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """Render (B, ...) images.

        Args:
            planes: (B, 3, C, Hp, Wp).
            decoder: see :func:`render_rays`.
            cam2world: (B, 4, 4).
            resolution: ``H`` or ``(H, W)`` of the rendered images.
            depth: (B, 1, H, W) pseudo-depth of the input image; used only when ``canonical`` (depth-prior
                fine samples and the depth kernel, as in training). Pass ``None`` for evaluation renders
                (the reference renders without it).
            canonical: whether the cameras are the canonical (input) view.
            generator: see :func:`render_rays`.
            use_depth_kernel: with a depth prior (canonical view and ``depth``), scale the gradients by the
                depth kernel (``loss.depth_supervision: kernel``); forward values do not depend on it.
            sample_weights: also return the per-sample compositing weights with gradients, ray-major
                (``sample_weights`` (B, H * W, S - 1, 1)), and the sample depths (``sample_depths``
                (B, H * W, S, 1)); such renders take the reference path.
            cut_quantile: 3DGP's density cut for NFS depth maps (see :func:`render_rays`; 0: off).

        Returns:
            dict with ``rgb`` (B, 3, H, W) in [-1, 1], ``depth``, ``weight_sum``, ``median_depth`` and
            ``depth_3dgp`` (B, 1, H, W) (and the two sample tensors with ``sample_weights``).
        """
        batch = planes.shape[0]
        height, width = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        if cam2world.shape[0] != batch:
            raise ValueError(f"cam2world has {cam2world.shape[0]} cameras for {batch} triplanes")
        # Ray geometry in at least float32 even for bf16 planes (depths near 5 need the mantissa).
        geometry = torch.promote_types(planes.dtype, torch.float32)
        origins, directions = rays_from_cameras(cam2world.to(geometry), self.camera_cfg.fov_degrees, (height, width))
        depth_prior = None
        if canonical and depth is not None:
            if depth.shape != (batch, 1, height, width):
                raise ValueError(f"depth must be ({batch}, 1, {height}, {width}), got {tuple(depth.shape)}")
            depth_prior = depth.permute(0, 2, 3, 1).reshape(batch, -1, 1).to(geometry)
        result = render_rays(
            planes,
            decoder,
            origins,
            directions,
            self.cfg,
            depth_prior=depth_prior,
            use_depth_kernel=depth_prior is not None and use_depth_kernel,
            generator=generator,
            plane_axes=self.plane_axes,
            differentiable_weights=sample_weights,
            cut_quantile=cut_quantile,
        )

        def image(x: torch.Tensor) -> torch.Tensor:
            return x.permute(0, 2, 1).reshape(batch, x.shape[-1], height, width)

        out = {
            "rgb": image(result.rgb),
            "depth": image(result.depth),
            "weight_sum": image(result.weight_sum),
            "median_depth": image(result.median_depth),
            "depth_3dgp": image(result.depth_3dgp),
        }
        if sample_weights:
            out["sample_weights"], out["sample_depths"] = result.weights, result.depths
        return out
