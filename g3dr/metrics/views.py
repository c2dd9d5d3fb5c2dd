"""Metrics against ground-truth views: PSNR of renders and depth accuracy (DA) on valid pixels.

The synthetic set can store novel views of each scene with exact depth and a validity mask
(``g3dr prep synth --views K``); ``g3dr eval`` scores the model's renders at those cameras with these
functions (``gt_views`` metrics). Everything is computed per image in float64 on the CPU and returned
per image, so that the eval can gather exact per-sample values across ranks and average once.

- PSNR: images in the model's [-1, 1] convention, the render clamped to [-1, 1]; both mapped to [0, 1]
  (peak 1); MSE over the valid pixels and the three channels; ``10 log10(1 / MSE)``. +inf for identical
  images, NaN for an image without a valid pixel.
- DA: the definition of :func:`g3dr.metrics.depth.depth_accuracy` (each map minus its mean, divided by its
  population standard deviation, then the MSE between the two), with the means, deviations and MSE taken
  over the valid pixels only. NaN for a map with fewer than two valid pixels.
"""

from __future__ import annotations

import numpy as np


def _as_float64(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64)


def _as_mask(valid, shape: tuple[int, ...], name: str) -> np.ndarray:
    if valid is None:
        return np.ones(shape, dtype=bool)
    if hasattr(valid, "detach"):
        valid = valid.detach().to("cpu").numpy()
    mask = np.asarray(valid, dtype=bool)
    if mask.shape != shape:
        raise ValueError(f"{name}: valid mask {mask.shape} does not match the maps {shape}")
    return mask


def psnr_per_image(rendered, target, valid=None) -> np.ndarray:
    """PSNR (dB) of each image, shape ``(...)``.

    Args:
        rendered: ``(..., 3, H, W)`` in [-1, 1] (values outside are clamped, as when the render is saved).
        target: ``(..., 3, H, W)`` in [-1, 1], same shape.
        valid: ``(..., H, W)`` bool, or None for every pixel.
    """
    r = np.clip(_as_float64(rendered), -1.0, 1.0)
    t = _as_float64(target)
    if r.shape != t.shape or r.ndim < 3 or r.shape[-3] != 3:
        raise ValueError(f"psnr_per_image: expected two (..., 3, H, W) batches of one shape, got {r.shape} and {t.shape}")
    mask = _as_mask(valid, r.shape[:-3] + r.shape[-2:], "psnr_per_image")
    sq = (((r - t) / 2.0) ** 2).sum(axis=-3)  # [0, 1] units, summed over the channels
    count = mask.sum(axis=(-2, -1)) * 3
    total = np.where(mask, sq, 0.0).sum(axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        mse = total / count
        return np.where(count > 0, 10.0 * np.log10(1.0 / mse), np.nan)


def masked_depth_accuracy_per_map(rendered, target, valid=None, eps: float = 1e-8) -> np.ndarray:
    """DA of each depth map on its valid pixels, shape ``(...)``.

    Args:
        rendered: ``(..., H, W)`` depth maps.
        target: ``(..., H, W)`` exact depth; values at invalid pixels are ignored (may be inf).
        valid: ``(..., H, W)`` bool, or None for every pixel.

    Each map is normalised over its valid pixels (population std, floored at ``eps`` as
    :func:`g3dr.metrics.depth.normalize_depth`). Invariant to a positive affine change of either input; 0
    for identical maps, 2 on average for uncorrelated ones.
    """
    r = _as_float64(rendered)
    t = _as_float64(target)
    if r.shape != t.shape or r.ndim < 2:
        raise ValueError(f"masked_depth_accuracy_per_map: expected two (..., H, W) batches of one shape, "
                         f"got {r.shape} and {t.shape}")
    mask = _as_mask(valid, r.shape, "masked_depth_accuracy_per_map")
    count = mask.sum(axis=(-2, -1))

    def normalised(d: np.ndarray) -> np.ndarray:
        d = np.where(mask, d, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = d.sum(axis=(-2, -1)) / count
            centred = np.where(mask, d - mean[..., None, None], 0.0)
            std = np.sqrt((centred ** 2).sum(axis=(-2, -1)) / count)
        return centred / np.maximum(std, eps)[..., None, None]

    diff = np.where(mask, normalised(r) - normalised(t), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count >= 2, (diff ** 2).sum(axis=(-2, -1)) / count, np.nan)
