"""Compositing samples along rays: the MipNeRF-style ray marcher, the depth kernel, median depth.

All functions take per-sample tensors ``(B, R, S, C)`` sorted by depth along ``S`` and work on the
``S - 1`` intervals between consecutive samples, with values at interval midpoints (MipNeRF / EG3D
``MipRayMarcher2``): ``density = softplus(mid(raw) + density_offset) * sigma_scale``,
``alpha = 1 - exp(-density * delta)``, ``w_i = alpha_i * prod_{j<i}(1 - alpha_j + 1e-10)``,
``rgb = 2 * sum(w c) - 1`` (colour in [0, 1] in, [-1, 1] out; black background),
``depth = sum(w t) / (sum(w) + 1e-3)``.

3DGP's density cut (``cut_quantile`` q > 0, an evaluation option: 3DGP renders its NFS depth maps with
q = 0.5): after the sigma scale, every density below the q-quantile of the image's densities (all rays
and intervals of one image; ``torch.quantile``'s linear interpolation) is set to 0 before alpha. 3DGP
takes the quantile over a whole rendering chunk; per image makes it independent of the batch size.
3DGP's depth is ``sum(w t)``, not divided by ``sum(w)`` (:attr:`Composite.depth_3dgp`).

The depth kernel (paper S.1/S.8, the reference's "gradient scaler") is applied as a backward-only
scale: forward values are bit-identical with and without it; the gradients reaching alpha and the
midpoint colours are multiplied by ``k(t)`` per interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from g3dr.config import DepthKernelConfig

__all__ = [
    "ScaleGradient",
    "split_grad_scale",
    "depth_kernel_from_depths",
    "quantile_per_image",
    "Composite",
    "composite_from_samples",
    "median_depth_from_weights",
]


class ScaleGradient(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradients of alpha by ``alpha_scale`` and those of
    the colours by ``colors_scale``.

    ``alpha, colors = ScaleGradient.apply(alpha, colors, alpha_scale, colors_scale)``: each scale broadcasts
    against its tensor (e.g. (B, R, S-1, 1) against (B, R, S-1, 1) and (B, R, S-1, 3)) and receives no gradient.
    """

    @staticmethod
    def forward(ctx, alpha: torch.Tensor, colors: torch.Tensor, alpha_scale: torch.Tensor,  # noqa: D102
                colors_scale: torch.Tensor):
        ctx.save_for_backward(alpha_scale, colors_scale)
        return alpha.view_as(alpha), colors.view_as(colors)

    @staticmethod
    def backward(ctx, grad_alpha: torch.Tensor, grad_colors: torch.Tensor):  # noqa: D102
        alpha_scale, colors_scale = ctx.saved_tensors
        grad_alpha = None if grad_alpha is None else grad_alpha * alpha_scale
        grad_colors = None if grad_colors is None else grad_colors * colors_scale
        return grad_alpha, grad_colors, None, None


def depth_kernel_from_depths(depths_mid: torch.Tensor, depth_prior: torch.Tensor, cfg: DepthKernelConfig) -> torch.Tensor:
    """``k(t) = clamp(s1 * exp(-(t - d)^2 / s2), c_min, c_max)`` per interval midpoint, as gradient scales.

    Args:
        depths_mid: (B, R, S - 1, 1) interval midpoints t.
        depth_prior: (B, R, 1) the pixel's pseudo-depth d.

    Returns:
        (B, R, S - 1, 1) when the kernel scales both alpha and colour (``cfg.scales``, the paper), else
        (B, R, S - 1, 2): the scale of alpha's gradients and of the colours', 1 for the one left alone
        (:func:`split_grad_scale`). No gradient.
    """
    with torch.no_grad():
        k = cfg.s1 * torch.exp(-((depths_mid - depth_prior[:, :, None, :]) ** 2) / cfg.s2)
        k = k.clamp(cfg.c_min, cfg.c_max)
        if set(cfg.scales) == {"alpha", "colour"}:
            return k
        ones = torch.ones_like(k)
        return torch.cat([k if "alpha" in cfg.scales else ones, k if "colour" in cfg.scales else ones], dim=-1)


def split_grad_scale(grad_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha_scale, colour_scale)``, each (..., 1), of a :func:`depth_kernel_from_depths` result (..., 1 or 2):
    the same tensor twice when its last dimension is 1 (both scaled), else its two channels."""
    if grad_scale.shape[-1] == 1:
        return grad_scale, grad_scale
    return grad_scale[..., :1], grad_scale[..., 1:]


def quantile_per_image(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-quantile of each batch element's values, as ``torch.quantile`` computes it (linear).

    Position ``q * (n - 1)`` in the sorted values, interpolated linearly between its two neighbours
    (``torch.lerp``). Written with ``kthvalue`` because ``torch.quantile`` refuses inputs of more than
    2^24 values (an image of 512^2 rays and 64 intervals has more).

    Args:
        values: (B, ...) with at least one value per batch element.
        q: in [0, 1].

    Returns:
        (B,) in the dtype of ``values``, no gradient.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be in [0, 1], got {q}")
    with torch.no_grad():
        flat = values.reshape(values.shape[0], -1)
        position = q * (flat.shape[1] - 1)
        below = math.floor(position)
        above = min(below + 1, flat.shape[1] - 1)
        low = torch.kthvalue(flat, below + 1, dim=1).values
        high = low if above == below else torch.kthvalue(flat, above + 1, dim=1).values
        return torch.lerp(low, high, position - below)


@dataclass
class Composite:
    """What the ray marcher returns; shapes for B images of R rays and S samples per ray."""

    rgb: torch.Tensor
    """(B, R, 3) in [-1, 1] (black background)."""
    depth: torch.Tensor
    """(B, R, 1) ``sum(w t) / (sum(w) + 1e-3)``."""
    depth_3dgp: torch.Tensor
    """(B, R, 1) ``sum(w t)``, not divided by ``sum(w)``: 3DGP's depth (rays through empty space tend to 0)."""
    weights: torch.Tensor
    """(B, R, S - 1, 1) per-interval compositing weights."""
    weight_sum: torch.Tensor
    """(B, R, 1) accumulated opacity ``sum(w)``."""
    depths_mid: torch.Tensor
    """(B, R, S - 1, 1) interval midpoints."""


def composite_from_samples(
    colors: torch.Tensor,
    densities_raw: torch.Tensor,
    depths: torch.Tensor,
    *,
    density_offset: float = -1.0,
    sigma_scale: float = 1.0,
    grad_scale: torch.Tensor | None = None,
    cut_quantile: float = 0.0,
) -> Composite:
    """The MipNeRF ray marcher (see the module docstring for the formulas).

    Args:
        colors: (B, R, S, 3) decoder colours in [0, 1] (approximately; the sigmoid is stretched by 1e-3).
        densities_raw: (B, R, S, 1) raw decoder densities.
        depths: (B, R, S, 1) sorted sample depths.
        density_offset: added to the midpoint raw density before softplus (-1 in G3DR).
        sigma_scale: multiplies the activated density (paper S.3 sweep).
        grad_scale: optional backward-only scale of the gradients of alpha and the midpoint colours
            (:class:`ScaleGradient`): (B, R, S - 1, 1) for both, or (B, R, S - 1, 2) for each on its own
            (:func:`depth_kernel_from_depths`).
        cut_quantile: 3DGP's density cut, in [0, 1): densities (after ``sigma_scale``) below this
            quantile of each batch element's (R x (S - 1)) densities are set to 0 before alpha; 0 is off
            (bit-identical to no cut). The cut's mask carries no gradient.

    Returns:
        :class:`Composite` in at least float32, differentiable in ``colors``, ``densities_raw`` and ``depths``.
    """
    if colors.shape[:3] != densities_raw.shape[:3] or depths.shape[:3] != colors.shape[:3]:
        raise ValueError(
            f"colors {tuple(colors.shape)}, densities {tuple(densities_raw.shape)} and depths "
            f"{tuple(depths.shape)} must share (B, R, S)"
        )
    # Compositing runs in at least float32 whatever the decoder's precision (cumprod and exp in bf16
    # would visibly band the weights); float64 stays float64.
    dtype = torch.promote_types(torch.promote_types(colors.dtype, densities_raw.dtype), torch.float32)
    colors, densities_raw, depths = colors.to(dtype), densities_raw.to(dtype), depths.to(dtype)
    deltas = depths[:, :, 1:] - depths[:, :, :-1]
    colors_mid = (colors[:, :, :-1] + colors[:, :, 1:]) / 2
    densities_mid = (densities_raw[:, :, :-1] + densities_raw[:, :, 1:]) / 2
    depths_mid = (depths[:, :, :-1] + depths[:, :, 1:]) / 2
    densities_mid = F.softplus(densities_mid + density_offset)
    if sigma_scale != 1.0:
        densities_mid = densities_mid * sigma_scale
    if cut_quantile != 0.0:
        if not 0.0 < cut_quantile < 1.0:
            raise ValueError(f"cut_quantile must be in [0, 1), got {cut_quantile}")
        # After the sigma scale (a positive factor: the same densities are cut, up to rounding).
        threshold = quantile_per_image(densities_mid, cut_quantile).view(-1, 1, 1, 1)
        densities_mid = torch.where(densities_mid < threshold, torch.zeros_like(densities_mid), densities_mid)
    alpha = 1 - torch.exp(-(densities_mid * deltas))
    if grad_scale is not None:
        alpha, colors_mid = ScaleGradient.apply(alpha, colors_mid, *split_grad_scale(grad_scale))
    transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :, :1]), 1 - alpha + 1e-10], -2), -2)
    weights = alpha * transmittance[:, :, :-1]
    rgb = torch.sum(weights * colors_mid, -2)
    weight_sum = weights.sum(2)
    depth_3dgp = torch.sum(weights * depths_mid, -2)
    depth = depth_3dgp / (weight_sum + 0.001)
    return Composite(rgb=rgb * 2 - 1, depth=depth, depth_3dgp=depth_3dgp, weights=weights, weight_sum=weight_sum,
                     depths_mid=depths_mid)


def median_depth_from_weights(weights: torch.Tensor, depths_mid: torch.Tensor) -> torch.Tensor:
    """Depth of the first interval where the accumulated weight reaches 0.5 (3DGP's depth for NFS).

    Rays whose total weight stays below 0.5 get the last midpoint (the far end).

    Args:
        weights: (B, R, S - 1, 1); depths_mid: (B, R, S - 1, 1).

    Returns:
        (B, R, 1), not differentiable.
    """
    with torch.no_grad():
        accumulated = torch.cumsum(weights, dim=-2)
        index = (accumulated < 0.5).sum(dim=-2, keepdim=True).clamp_max(weights.shape[-2] - 1)
        return torch.gather(depths_mid, -2, index).squeeze(-2)
