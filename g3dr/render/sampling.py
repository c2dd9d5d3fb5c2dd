"""Where to sample along rays: ray-box limits, stratified, importance and depth-prior depths, merging.

Pure functions on tensors; every depth tensor is ``(B, R, S, 1)`` (batch, rays, samples per ray) and
every per-ray quantity ``(B, R, 1)``. Nothing here is differentiable on purpose: sample depths are
chosen without gradients, exactly as in the EG3D renderer that G3DR builds on (and callers run these
under ``torch.no_grad()``).

Randomness: each function that draws takes ``generator`` (``None``: the global RNG) and draws one tensor
of the documented shape, in the same order as the reference code, so that with the global RNG seeded
identically our samples equal the reference's. ``deterministic=True`` removes every draw.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "ray_limits_from_box",
    "near_far_from_box",
    "depths_from_stratified",
    "smooth_weights_for_importance",
    "depths_from_pdf",
    "depths_from_importance",
    "depths_from_depth_prior",
    "merge_samples",
]


def ray_limits_from_box(
    origins: torch.Tensor, directions: torch.Tensor, box_warp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry and exit distances of rays through the axis-aligned box [-box_warp/2, box_warp/2]^3 (slab test).

    Args:
        origins, directions: (B, R, 3); directions need not be unit length (distances are in units of
            the direction's length).

    Returns:
        near (B, R, 1), far (B, R, 1). Rays that miss the box get near = -1, far = -2 (EG3D's marker).
    """
    shape = origins.shape
    o = origins.detach().reshape(-1, 3)
    d = directions.detach().reshape(-1, 3)
    half = box_warp / 2
    bounds = torch.tensor([[-half] * 3, [half] * 3], dtype=o.dtype, device=o.device)
    inv = 1 / d
    # Per axis the slab bounds hit first and last depend on the direction's sign.
    first = (inv < 0).long()
    t_lo = [(bounds.index_select(0, first[:, a])[:, a] - o[:, a]) * inv[:, a] for a in range(3)]
    t_hi = [(bounds.index_select(0, 1 - first[:, a])[:, a] - o[:, a]) * inv[:, a] for a in range(3)]
    valid = torch.ones(o.shape[0], dtype=torch.bool, device=o.device)
    near, far = t_lo[0], t_hi[0]
    for a in (1, 2):
        valid &= ~torch.logical_or(near > t_hi[a], t_lo[a] > far)
        near = torch.max(near, t_lo[a])
        far = torch.min(far, t_hi[a])
    near = torch.where(valid, near, torch.full_like(near, -1.0))
    far = torch.where(valid, far, torch.full_like(far, -2.0))
    return near.reshape(*shape[:-1], 1), far.reshape(*shape[:-1], 1)


def near_far_from_box(
    origins: torch.Tensor, directions: torch.Tensor, box_warp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray-box near/far with EG3D's handling of rays that miss the box (reproduced on purpose).

    Rays with ``far <= near`` get ``near = min(near of valid rays)`` and ``far = max(near of valid rays)``
    (the max of the *near* values: the quirk), both taken over the whole batch, not per image. If no
    ray hits the box the -1/-2 markers are returned unchanged, as in the reference.

    Returns:
        near (B, R, 1), far (B, R, 1).
    """
    near, far = ray_limits_from_box(origins, directions, box_warp)
    valid = far > near
    if bool(valid.any()):
        near_valid = near[valid]
        near = torch.where(valid, near, near_valid.min())
        far = torch.where(valid, far, near_valid.max())
    return near, far


def depths_from_stratified(
    near: torch.Tensor,
    far: torch.Tensor,
    num_samples: int,
    *,
    jitter: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Stratified depths: ``linspace(near, far, S)`` plus, with ``jitter``, ``U(0, 1) * (far - near) / (S - 1)``.

    The last sample may therefore land up to one step beyond ``far`` (as in EG3D).

    Args:
        near, far: (B, R, 1).

    Returns:
        (B, R, S, 1). Draws one (S, B, R, 1) uniform tensor when ``jitter`` (sample-major).
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples}")
    steps = torch.arange(num_samples, dtype=near.dtype, device=near.device) / (num_samples - 1)
    depths = near[:, :, None, :] + steps[None, None, :, None] * (far - near)[:, :, None, :]
    if jitter:
        step = (far - near) / (num_samples - 1)
        # Drawn sample-major, (S, B, R, 1), then permuted: EG3D draws with rand_like of a permuted
        # linspace, whose memory order is sample-major, so this matches its stream for the same seed.
        batch, rays = near.shape[:2]
        noise = torch.rand((num_samples, batch, rays, 1), generator=generator, dtype=depths.dtype, device=depths.device)
        depths = depths + noise.permute(1, 2, 0, 3) * step[:, :, None, :]
    return depths


def smooth_weights_for_importance(weights: torch.Tensor) -> torch.Tensor:
    """EG3D's smoothing of coarse weights: max-pool (2, stride 1, pad 1), avg-pool (2, stride 1), + 0.01.

    Args:
        weights: (N, S - 1) compositing weights of the coarse intervals.

    Returns:
        (N, S - 1): ``w'_i = (max(w_{i-1}, w_i) + max(w_i, w_{i+1})) / 2 + 0.01`` with the out-of-range
        neighbours ignored.
    """
    pooled = F.max_pool1d(weights.unsqueeze(1), 2, 1, padding=1)
    pooled = F.avg_pool1d(pooled, 2, 1).squeeze(1)
    return pooled + 0.01


def depths_from_pdf(
    bins: torch.Tensor,
    weights: torch.Tensor,
    num_samples: int,
    *,
    deterministic: bool = False,
    generator: torch.Generator | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Inverse-CDF sampling of a piecewise-constant pdf (NeRF/EG3D ``sample_pdf``).

    Args:
        bins: (N, K + 1) bin edges, increasing (only the first K + 1 are used).
        weights: (N, K) unnormalised bin weights (``eps`` is added before normalising).
        deterministic: evenly spaced ``u = linspace(0, 1, num_samples)`` instead of ``U(0, 1)``.

    Returns:
        (N, num_samples) depths. Draws one (N, num_samples) uniform tensor unless deterministic.
        A bin whose cdf step is below ``eps`` maps to its lower edge plus ``(u - cdf) * width``.
    """
    n_rays, n_bins = weights.shape
    if bins.shape[0] != n_rays or bins.shape[1] < n_bins + 1:
        raise ValueError(f"bins {tuple(bins.shape)} must be (N, >= K + 1) for weights {tuple(weights.shape)}")
    weights = weights + eps
    pdf = weights / torch.sum(weights, -1, keepdim=True)
    cdf = torch.cumsum(pdf, -1)
    cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf], -1)  # (N, K + 1)
    if deterministic:
        u = torch.linspace(0, 1, num_samples, dtype=cdf.dtype, device=cdf.device).expand(n_rays, num_samples)
    else:
        u = torch.rand(n_rays, num_samples, generator=generator, dtype=cdf.dtype, device=cdf.device)
    u = u.contiguous()
    idx = torch.searchsorted(cdf, u, right=True)
    below = torch.clamp_min(idx - 1, 0)
    above = torch.clamp_max(idx, n_bins)
    pair = torch.stack([below, above], -1).view(n_rays, 2 * num_samples)
    cdf_pair = torch.gather(cdf, 1, pair).view(n_rays, num_samples, 2)
    bins_pair = torch.gather(bins, 1, pair).view(n_rays, num_samples, 2)
    denom = cdf_pair[..., 1] - cdf_pair[..., 0]
    denom = torch.where(denom < eps, torch.ones_like(denom), denom)
    return bins_pair[..., 0] + (u - cdf_pair[..., 0]) / denom * (bins_pair[..., 1] - bins_pair[..., 0])


def depths_from_importance(
    depths_coarse: torch.Tensor,
    weights: torch.Tensor,
    num_samples: int,
    *,
    deterministic: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fine depths importance-sampled from the coarse pass (EG3D ``sample_importance``).

    The coarse weights are smoothed (:func:`smooth_weights_for_importance`); the bins are the midpoints of
    the coarse samples and the pdf uses the smoothed weights without their first and last entries, so
    the last midpoint bin is never used (the reference's layout, reproduced).

    Args:
        depths_coarse: (B, R, S, 1) sorted coarse depths.
        weights: (B, R, S - 1, 1) coarse compositing weights.

    Returns:
        (B, R, num_samples, 1), detached.
    """
    batch, rays, samples, _ = depths_coarse.shape
    if weights.shape[:3] != (batch, rays, samples - 1):
        raise ValueError(f"weights {tuple(weights.shape)} must be (B, R, S - 1, 1) for depths {tuple(depths_coarse.shape)}")
    with torch.no_grad():
        z = depths_coarse.reshape(batch * rays, samples)
        # At least float32 (the reference casts to float; float64 stays float64 for the tests).
        w = weights.reshape(batch * rays, samples - 1)
        w = smooth_weights_for_importance(w.to(torch.promote_types(w.dtype, torch.float32)))
        mids = 0.5 * (z[:, :-1] + z[:, 1:])
        fine = depths_from_pdf(mids, w[:, 1:-1], num_samples, deterministic=deterministic, generator=generator)
    return fine.detach().reshape(batch, rays, num_samples, 1)


def depths_from_depth_prior(depth_prior: torch.Tensor, num_samples: int, window: float) -> torch.Tensor:
    """Fine depths spread evenly over ``[d - window, d + window]`` around the pixel's pseudo-depth d.

    Args:
        depth_prior: (B, R, 1).

    Returns:
        (B, R, num_samples, 1): ``d + linspace(-window, window, num_samples)``.
    """
    offsets = torch.linspace(-window, window, num_samples, dtype=depth_prior.dtype, device=depth_prior.device)
    return depth_prior[:, :, None, :] + offsets[None, None, :, None]


def merge_samples(
    depths_a: torch.Tensor, values_a: list[torch.Tensor], depths_b: torch.Tensor, values_b: list[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Concatenate two sample sets along the sample axis and sort them by depth.

    Args:
        depths_a: (B, R, Sa, 1); values_a: tensors (B, R, Sa, Ci) that travel with the depths.
        depths_b: (B, R, Sb, 1); values_b: matching tensors (B, R, Sb, Ci).

    Returns:
        depths (B, R, Sa + Sb, 1) sorted ascending and the values gathered in the same order
        (differentiable in the values).
    """
    depths = torch.cat([depths_a, depths_b], dim=-2)
    _, order = torch.sort(depths, dim=-2)
    depths = torch.gather(depths, -2, order)
    merged = []
    for a, b in zip(values_a, values_b, strict=True):
        v = torch.cat([a, b], dim=-2)
        merged.append(torch.gather(v, -2, order.expand(-1, -1, -1, v.shape[-1])))
    return depths, merged
