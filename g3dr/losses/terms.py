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
