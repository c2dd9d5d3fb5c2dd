"""Geometry metrics on depth maps: the non-flatness score (NFS, from 3DGP) and depth accuracy (DA).

Both take batches of depth maps shaped ``(N, H, W)``, ``(N, 1, H, W)`` or ``(N, P)`` (numpy or torch) and
compute in float64 on the CPU; they are cheap next to rendering.
"""

from __future__ import annotations

import numpy as np


def _maps_as_rows(depth, name: str) -> np.ndarray:
    if hasattr(depth, "detach"):
        depth = depth.detach().to("cpu").double().numpy()
    d = np.asarray(depth, dtype=np.float64)
    if d.ndim == 4:
        if d.shape[1] != 1:
            raise ValueError(f"{name}: expected (N, 1, H, W) depth maps, got {d.shape}")
        d = d[:, 0]
    if d.ndim not in (2, 3) or d.shape[0] < 1:
        raise ValueError(f"{name}: expected depth maps shaped (N, H, W), (N, 1, H, W) or (N, P), got {d.shape}")
    return d.reshape(d.shape[0], -1)


def depth_histograms(depth, near: float, far: float, bins: int = 64) -> np.ndarray:
    """Per-map histograms ``(N, bins)`` of depths clamped to ``[near, far]``, with equal-width bins.

    A value exactly at ``far`` falls into the last bin (as ``torch.histc`` counts it), so every pixel is
    counted once: each row sums to the number of pixels.
    """
    if not far > near:
        raise ValueError(f"need far > near, got near={near}, far={far}")
    d = np.clip(_maps_as_rows(depth, "depth_histograms"), near, far)
    idx = np.floor((d - near) / (far - near) * bins).astype(np.int64)
    idx = np.minimum(idx, bins - 1)
    rows = np.repeat(np.arange(d.shape[0]), d.shape[1])
    hist = np.zeros((d.shape[0], bins), dtype=np.float64)
    np.add.at(hist, (rows, idx.ravel()), 1.0)
    return hist


def non_flatness_score(depth, near: float, far: float, bins: int = 64) -> float:
    """NFS (3DGP): mean over maps of ``exp(H)``, H the entropy (nats) of the map's depth histogram.

    ``depth`` holds N depth maps (the paper uses N = 256 median depths of generated canonical views).
    Values are clamped to ``[near, far]`` and binned into ``bins`` equal bins. A flat map scores 1; a map
    whose pixels spread evenly over all bins scores ``bins``.
    """
    return float(non_flatness_per_map(depth, near, far, bins).mean())


def non_flatness_per_map(depth, near: float, far: float, bins: int = 64) -> np.ndarray:
    """``exp(H)`` of each map's depth histogram, ``(N,)``; NFS is their mean (kept apart for exact gathering)."""
    hist = depth_histograms(depth, near, far, bins)
    p = hist / hist.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return np.exp(entropy)


def normalize_depth(depth, eps: float = 1e-8) -> np.ndarray:
    """Each map minus its mean, divided by its (population) standard deviation; rows ``(N, P)``.

    A constant map (std 0) normalises to zeros rather than dividing by zero.
    """
    d = _maps_as_rows(depth, "normalize_depth")
    mean = d.mean(axis=1, keepdims=True)
    std = d.std(axis=1, keepdims=True)
    return (d - mean) / np.maximum(std, eps)


def depth_accuracy(rendered, target) -> float:
    """DA: mean over maps of the MSE between rendered and pseudo-GT depth, each normalised on its own.

    Invariant to a positive affine change ``a * d + b`` (a > 0) of either input. Shapes must match.
    0 for identical (or affinely related) maps; 2 for uncorrelated ones on average; 4 for inverted ones.
    """
    return float(depth_accuracy_per_map(rendered, target).mean())


def depth_accuracy_per_map(rendered, target) -> np.ndarray:
    """The normalised-depth MSE of each map, ``(N,)``; DA is their mean."""
    r = normalize_depth(rendered)
    t = normalize_depth(target)
    if r.shape != t.shape:
        raise ValueError(f"depth_accuracy: rendered {r.shape} and target {t.shape} differ in shape")
    return ((r - t) ** 2).mean(axis=1)
