"""Pixel-space loss terms of the G3DR objective (paper S.1). All are differentiable in the prediction.

Shapes: images ``(B, C, H, W)``; every term returns a scalar (mean over all elements), as the reference
code's ``F.l1_loss(..., reduction="mean")`` and ``tv_loss`` do.
"""

from __future__ import annotations

import torch


def l1_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error; used for canonical RGB vs the input image (both in [-1, 1])."""
    if prediction.shape != target.shape:
        raise ValueError(f"l1_loss: prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
    return (prediction - target).abs().mean()


def depth_l1_loss(rendered_depth: torch.Tensor, pseudo_depth: torch.Tensor) -> torch.Tensor:
    """Mean absolute error between the canonical rendered depth and the pseudo-depth, both ``(B, 1, H, W)``."""
    if rendered_depth.shape != pseudo_depth.shape:
        raise ValueError(f"depth_l1_loss: rendered {tuple(rendered_depth.shape)} and pseudo-depth "
                         f"{tuple(pseudo_depth.shape)} differ")
    return (rendered_depth - pseudo_depth).abs().mean()


def tv_loss(image: torch.Tensor) -> torch.Tensor:
    """Total variation of ``(B, C, H, W)``: mean squared horizontal plus mean squared vertical difference."""
    if image.dim() != 4 or image.shape[-1] < 2 or image.shape[-2] < 2:
        raise ValueError(f"tv_loss: expected (B, C, H, W) with H, W >= 2, got {tuple(image.shape)}")
    horizontal = (image[..., :, 1:] - image[..., :, :-1]).pow(2).mean()
    vertical = (image[..., 1:, :] - image[..., :-1, :]).pow(2).mean()
    return horizontal + vertical


def weight_sum_loss(weight_sum: torch.Tensor) -> torch.Tensor:
    """Mean of ``1 - sum_i w_i`` over rays (reference code): pushes every ray to be opaque."""
    return (1.0 - weight_sum).mean()


KL_EPS = 1e-5
"""Added to the weights before the log, as DS-NeRF does."""


def kl_depth_loss(weights: torch.Tensor, depths: torch.Tensor, pseudo_depth: torch.Tensor, sigma: float) -> torch.Tensor:
    """DS-NeRF's depth term (Deng et al. 2022; the paper's [2], its Table S1 "KL"), mean over rays.

    Per ray, ``-sum_i log(w_i + 1e-5) * exp(-(t_i - d)^2 / (2 sigma^2)) * delta_i`` over the intervals between
    consecutive samples (``t_i`` the midpoints, ``delta_i`` the lengths, ``w_i`` the compositing weights): the
    KL divergence from a Gaussian of std ``sigma`` at the pseudo-depth ``d`` to the ray's termination
    distribution, up to a constant and the Gaussian's normalisation.

    Args:
        weights: (B, R, S - 1, 1) compositing weights (differentiable).
        depths: (B, R, S, 1) the sorted sample depths they were composited from.
        pseudo_depth: (B, R, 1) per ray.
    """
    if weights.shape[:3] != (depths.shape[0], depths.shape[1], depths.shape[2] - 1):
        raise ValueError(f"kl_depth_loss: weights {tuple(weights.shape)} need depths (B, R, S, 1) with S - 1 "
                         f"intervals, got {tuple(depths.shape)}")
    if pseudo_depth.shape != (depths.shape[0], depths.shape[1], 1):
        raise ValueError(f"kl_depth_loss: pseudo_depth must be (B, R, 1), got {tuple(pseudo_depth.shape)}")
    depths = depths.to(weights.dtype)
    mids = (depths[:, :, 1:] + depths[:, :, :-1]) / 2
    deltas = depths[:, :, 1:] - depths[:, :, :-1]
    target = torch.exp(-((mids - pseudo_depth[:, :, None, :].to(weights.dtype)) ** 2) / (2 * sigma**2))
    return (-torch.log(weights + KL_EPS) * target * deltas).sum(dim=(2, 3)).mean()
