"""Triplane feature lookup: plane projection conventions and multi-resolution bilinear sampling.

A triplane is ``(B, 3, C, H, W)``. A point ``p`` in the scene box is first scaled to ``[-1, 1]^3`` by
``2 / box_warp`` and then projected onto each plane by picking two of its coordinates, which become the
``grid_sample`` coordinates (first = width axis, second = height axis; bilinear, zero padding,
``align_corners=False``). Conventions (``renderer.plane_convention``):

- ``eg3d`` (default; the reference code and its checkpoints): planes (x, y), (x, z), (z, x). The third
  plane is the second one transposed and y-z is never seen (EG3D quirk, NVlabs/eg3d#67). EG3D computes
  these with an inverse of 0/1 permutation matrices, which is exact, so picking coordinates is identical.
- ``orthogonal``: planes (x, y), (x, z), (y, z).

Multi-resolution sampling (G3DR "lod"): the planes at full resolution plus antialiased bilinear
downsamples to each further entry of ``plane_resolutions`` (128 -> 64, 32) are sampled at the same
points; the levels are summed per plane and the three planes are averaged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "PLANE_AXES",
    "plane_axes_for_convention",
    "plane_coordinates_from_points",
    "planes_pyramid_from_planes",
    "features_from_planes",
]

PLANE_AXES: dict[str, tuple[tuple[int, int], ...]] = {
    "eg3d": ((0, 1), (0, 2), (2, 0)),
    "orthogonal": ((0, 1), (0, 2), (1, 2)),
}


def plane_axes_for_convention(convention: str, device: torch.device | str | None = None) -> torch.Tensor:
    """(3, 2) int64: for each plane, which point coordinates become its (width, height) grid coordinates."""
    if convention not in PLANE_AXES:
        raise ValueError(f"unknown plane convention {convention!r}; expected one of {sorted(PLANE_AXES)}")
    return torch.tensor(PLANE_AXES[convention], dtype=torch.long, device=device)


def plane_coordinates_from_points(points: torch.Tensor, plane_axes: torch.Tensor) -> torch.Tensor:
    """Project points onto the planes.

    Args:
        points: (B, N, 3) already in plane units ([-1, 1] inside the box).
        plane_axes: (P, 2) from :func:`plane_axes_for_convention`.

    Returns:
        (B * P, 1, N, 2) ``grid_sample`` grids, plane-major within each batch element.
    """
    batch, n, _ = points.shape
    n_planes = plane_axes.shape[0]
    coords = points[:, None, :, :].expand(batch, n_planes, n, 3)
    index = plane_axes.to(points.device)[None, :, None, :].expand(batch, n_planes, n, 2)
    return torch.gather(coords, 3, index).reshape(batch * n_planes, 1, n, 2)


def planes_pyramid_from_planes(planes: torch.Tensor, resolutions: Sequence[int]) -> list[torch.Tensor]:
    """The multi-resolution levels: ``planes`` itself, then antialiased bilinear downsamples.

    Args:
        planes: (B, P, C, H, W) with ``H == W == resolutions[0]``.
        resolutions: decreasing, e.g. (128, 64, 32).

    Returns:
        list of (B, P, C, r, r), differentiable in ``planes``.
    """
    batch, n_planes, channels, height, width = planes.shape
    if height != width or height != resolutions[0]:
        raise ValueError(
            f"planes are {height}x{width} but renderer.plane_resolutions starts at {resolutions[0]}; "
            f"set renderer.plane_resolutions to start at the generator's output resolution"
        )
    # Filtered in at least float32 (the antialiased kernel has no bf16 CPU implementation), returned
    # in the planes' dtype.
    flat = planes.reshape(batch, n_planes * channels, height, width)
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
    levels = [planes]
    for res in resolutions[1:]:
        # size=(r, r) gives the same kernel scale (H / r) as the reference's scale_factor=r/H.
        down = F.interpolate(flat, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
        levels.append(down.reshape(batch, n_planes, channels, res, res).to(planes.dtype))
    return levels


def features_from_planes(
    levels: Sequence[torch.Tensor],
    points: torch.Tensor,
    plane_axes: torch.Tensor,
    box_warp: float,
) -> torch.Tensor:
    """Triplane features of 3D points: bilinear lookups in every level, summed over levels, averaged over planes.

    Args:
        levels: the pyramid from :func:`planes_pyramid_from_planes`, each (B, P, C, r, r) (a single-level
            list samples the planes alone).
        points: (B, N, 3) world coordinates (the box is [-box_warp/2, box_warp/2]^3).
        plane_axes: (P, 2), see :func:`plane_axes_for_convention`.

    Returns:
        (B, N, C), differentiable in the levels (the lookup positions are treated as constants).
    """
    batch, n_planes, channels = levels[0].shape[:3]
    n = points.shape[1]
    # Lookups run in at least float32 (as grid_sample does under autocast in the reference): bf16 grid
    # coordinates would be off by a quarter pixel. Features are returned in the planes' dtype.
    dtype = torch.promote_types(levels[0].dtype, torch.float32)
    with torch.no_grad():
        grid = plane_coordinates_from_points((2 / box_warp) * points, plane_axes).to(dtype)
    total = None
    for level in levels:
        flat = level.reshape(batch * n_planes, channels, level.shape[-2], level.shape[-1]).to(dtype)
        sampled = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        total = sampled if total is None else total + sampled
    # (B * P, C, 1, N) -> (B, P, N, C) -> mean over planes
    features = total.permute(0, 3, 2, 1).reshape(batch, n_planes, n, channels)
    return features.mean(1).to(levels[0].dtype)
