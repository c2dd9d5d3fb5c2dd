"""Metrics against ground-truth views: PSNR of renders, depth accuracy (DA) and where the rendering weight
lies along each ray, on valid pixels.

The synthetic set can store novel views of each scene with exact depth and a validity mask
(``g3dr prep synth --views K``); ``g3dr eval`` scores the model's renders at those cameras with these
functions (``gt_views`` metrics). Everything is computed per image in float64 and returned per image, so
that the eval can gather exact per-sample values across ranks and average once (PSNR and DA on the CPU; the
weight masses on the device of the render's per-sample weights, so those never leave it).

- PSNR: images in the model's [-1, 1] convention, the render clamped to [-1, 1]; both mapped to [0, 1]
  (peak 1); MSE over the valid pixels and the three channels; ``10 log10(1 / MSE)``. +inf for identical
  images, NaN for an image without a valid pixel.
- DA: the definition of :func:`g3dr.metrics.depth.depth_accuracy` (each map minus its mean, divided by its
  population standard deviation, then the MSE between the two), with the means, deviations and MSE taken
  over the valid pixels only. NaN for a map with fewer than two valid pixels.
- Weight masses (:func:`weight_mass_per_view`): per valid pixel, the compositing weight of the intervals
  whose midpoint lies in front of the exact depth by more than :data:`WEIGHT_BAND` (``front``: fog and
  floaters that occlude the surface) and within :data:`WEIGHT_BAND` of it (``near``: the surface itself);
  summed over the valid pixels of each view, with the count of those pixels, so that the eval can take one
  mean over all valid pixels of all views.
"""

from __future__ import annotations

import numpy as np
import torch

WEIGHT_BAND = 0.1
"""Half-width (scene units, along the ray) of the band around the exact depth whose weight counts as "at the
surface" in :func:`weight_mass_per_view`. 0.1 is where the depth kernel (``k = clamp(1.25 exp(-(t - d)^2 / 0.03),
0.05, 1)``) still passes 0.9 of the gradient (it is 1 within ~0.08 and 0.33 at 0.2): the band is the region the
kernel concentrates its supervision on, and twice the depth-prior fine-sample window (0.05). With few samples
per ray (the tiny config's 8 coarse over [4, 6], spacing 0.25) a ray can have no midpoint in it."""


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


def weight_mass_per_view(weights: torch.Tensor, depths: torch.Tensor, target: torch.Tensor,
                         valid: torch.Tensor | None = None, band: float = WEIGHT_BAND,
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rendering weight in front of and at the exact surface, summed over each view's valid pixels.

    Args:
        weights: ``(..., H, W, S - 1)`` compositing weights of the intervals of each pixel's ray.
        depths: ``(..., H, W, S)`` the sample depths (distance along the unit ray, sorted); interval i has
            midpoint ``(t[i] + t[i + 1]) / 2``.
        target: ``(..., H, W)`` exact depth (ray distance); values at invalid pixels are ignored (may be inf).
        valid: ``(..., H, W)`` bool, or None for every pixel.
        band: half-width of the surface band (> 0).

    Returns:
        ``(front, near, count)``, each ``(...)`` float64: ``front`` the sum over valid pixels of the weight of
        intervals with midpoint ``< D - band``, ``near`` of those with ``|midpoint - D| <= band`` (the two sets
        are disjoint, so per pixel ``front + near <= sum(w)``, the opacity), ``count`` the number of valid
        pixels. Computed in float64 on the inputs' device (no gradient).
    """
    if not band > 0:
        raise ValueError(f"weight_mass_per_view: band must be > 0, got {band}")
    if weights.ndim < 3 or depths.shape[:-1] != weights.shape[:-1] or depths.shape[-1] != weights.shape[-1] + 1:
        raise ValueError(f"weight_mass_per_view: expected weights (..., H, W, S - 1) and depths (..., H, W, S), "
                         f"got {tuple(weights.shape)} and {tuple(depths.shape)}")
    if tuple(target.shape) != tuple(weights.shape[:-1]):
        raise ValueError(f"weight_mass_per_view: target {tuple(target.shape)} does not match the rays "
                         f"{tuple(weights.shape[:-1])}")
    device = weights.device
    mask = _as_mask(valid, tuple(target.shape), "weight_mass_per_view")
    with torch.no_grad():
        w = weights.detach().to(torch.float64)
        t = depths.detach().to(device=device, dtype=torch.float64)
        mid = (t[..., 1:] + t[..., :-1]) / 2
        d = target.detach().to(device=device, dtype=torch.float64)[..., None]
        keep = torch.from_numpy(mask).to(device)
        zero = torch.zeros((), dtype=torch.float64, device=device)

        def mass(where: torch.Tensor) -> np.ndarray:
            per_pixel = torch.where(where, w, zero).sum(dim=-1)  # masked, not multiplied: D may be inf
            return torch.where(keep, per_pixel, zero).sum(dim=(-2, -1)).cpu().numpy()

        front = mass(mid < d - band)
        near = mass((mid - d).abs() <= band)
    return front, near, mask.sum(axis=(-2, -1)).astype(np.float64)
