"""Pinhole cameras on a sphere around the origin, in 3DGP's spherical-angle convention.

Conventions (facts of snap-research/3dgp, reused by the G3DR reference code):

- A camera at ``(yaw, pitch, radius)`` sits at
  ``(r sin(pitch) sin(-yaw), r cos(pitch), r sin(pitch) cos(yaw))`` and looks at the origin with up = +y.
  ``pitch`` is the polar angle from +y (pi/2 = the equator; 0 and pi are degenerate), ``yaw`` turns
  about +y. The canonical view (yaw = pitch = pi/2) sits at (-r, 0, 0) looking along +x.
- Camera-to-world columns are (right, up, back) = (-left, up, -forward): the camera looks along its
  own -z axis, image x grows to the right and image y grows upwards (row 0 is the top of the image).
- Rays: pixel ``(row, col)`` of an ``H x W`` image has NDC ``x = linspace(-1, 1, W)[col]``,
  ``y = linspace(1, -1, H)[row]`` (the pixel grid spans the corners, no half-pixel offset) and camera-space
  direction ``normalize(x, y, -1 / tan(fov / 2))``; rays are flattened row-major (``r = row * W + col``).

Functions return float tensors in the dtype of their inputs (float32 unless float64 is passed) and
never import anything heavier than torch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from g3dr.config import CameraConfig

__all__ = [
    "camera_to_world_from_angles",
    "rays_from_cameras",
    "canonical_angles",
    "sample_novel_angles",
    "video_trajectory",
    "novel_yaw_denominator",
]


def _normalize(x: torch.Tensor) -> torch.Tensor:
    # Plain division by the norm (no eps), as in 3DGP, so results match the reference bit for bit.
    return x / torch.norm(x, dim=-1, keepdim=True)


def _position_from_angles(yaw: torch.Tensor, pitch: torch.Tensor, radius: torch.Tensor | float) -> torch.Tensor:
    """Cartesian position (..., 3) of spherical angles in the 3DGP convention."""
    x = radius * torch.sin(pitch) * torch.sin(-yaw)
    y = radius * torch.cos(pitch)
    z = radius * torch.sin(pitch) * torch.cos(yaw)
    return torch.stack([x, y, z], dim=-1)


def camera_to_world_from_angles(
    yaw: torch.Tensor, pitch: torch.Tensor, radius: torch.Tensor | float
) -> torch.Tensor:
    """Camera-to-world matrices (B, 4, 4) of cameras on a sphere looking at the origin, up = +y.

    Args:
        yaw: (B,) rotation about +y in radians.
        pitch: (B,) polar angle from +y in radians, in (0, pi) (0 and pi put the camera on the up axis,
            where the frame is undefined and the result is NaN).
        radius: (B,) tensor or a float: distance from the origin.

    Returns:
        (B, 4, 4) with columns (right, up, back, position); differentiable in the angles.
    """
    if yaw.ndim != 1 or pitch.shape != yaw.shape:
        raise ValueError(f"yaw and pitch must both be (B,), got {tuple(yaw.shape)} and {tuple(pitch.shape)}")
    if isinstance(radius, torch.Tensor) and radius.numel() != 1 and radius.shape != yaw.shape:
        raise ValueError(f"radius must be a float or (B,) like yaw {tuple(yaw.shape)}, got {tuple(radius.shape)}")
    origins = _position_from_angles(yaw, pitch, radius)  # (B, 3)
    # The reference normalises the forward vector twice; repeating it keeps float32 results identical.
    forward = _normalize(_normalize(-origins))
    up = torch.tensor([0.0, 1.0, 0.0], dtype=origins.dtype, device=origins.device).expand_as(forward)
    left = _normalize(torch.cross(up, forward, dim=-1))
    up = _normalize(torch.cross(forward, left, dim=-1))
    rotation = torch.stack((-left, up, -forward), dim=-1)  # (B, 3, 3), columns
    cam2world = torch.zeros(yaw.shape[0], 4, 4, dtype=origins.dtype, device=origins.device)
    cam2world[:, :3, :3] = rotation
    cam2world[:, :3, 3] = origins
    cam2world[:, 3, 3] = 1.0
    return cam2world


def _resolution_hw(resolution: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(resolution, int):
        return resolution, resolution
    height, width = (int(v) for v in resolution)
    return height, width


def rays_from_cameras(
    cam2world: torch.Tensor,
    fov_degrees: float | torch.Tensor,
    resolution: int | tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """World-space ray origins and unit directions of pinhole cameras.

    Args:
        cam2world: (B, 4, 4) camera-to-world matrices (see :func:`camera_to_world_from_angles`).
        fov_degrees: full field of view in degrees (same vertically and horizontally): a float or (B,).
        resolution: ``H`` (square) or ``(H, W)``.

    Returns:
        origins (B, R, 3) and directions (B, R, 3), R = H * W in row-major pixel order (row 0 = top).
        Differentiable in ``cam2world``.
    """
    if cam2world.ndim != 3 or cam2world.shape[1:] != (4, 4):
        raise ValueError(f"cam2world must be (B, 4, 4), got {tuple(cam2world.shape)}")
    batch = cam2world.shape[0]
    height, width = _resolution_hw(resolution)
    dtype, device = cam2world.dtype, cam2world.device
    x = torch.linspace(-1, 1, width, dtype=dtype, device=device).expand(height, width).reshape(1, -1)
    y = torch.linspace(1, -1, height, dtype=dtype, device=device)[:, None].expand(height, width).reshape(1, -1)
    fov = torch.as_tensor(fov_degrees, dtype=dtype, device=device).reshape(-1, 1)  # (1 or B, 1)
    if fov.shape[0] not in (1, batch):
        raise ValueError(f"fov_degrees must be a float or ({batch},), got shape {tuple(fov.shape)}")
    fov_rad = fov / 360 * 2 * math.pi
    z = -torch.ones(fov.shape[0], height * width, dtype=dtype, device=device) / torch.tan(fov_rad * 0.5)
    x, y = x.expand_as(z), y.expand_as(z)
    directions_cam = _normalize(torch.stack([x, y, z], dim=2)).expand(batch, -1, -1)  # (B, R, 3)
    # Ray geometry stays in the input precision even under autocast (a bf16 bmm would bend the rays).
    with torch.autocast(device_type=device.type, enabled=False):
        directions = torch.bmm(cam2world[:, :3, :3], directions_cam.transpose(1, 2)).transpose(1, 2)
    directions = F.normalize(directions, dim=2)
    origins = cam2world[:, None, :3, 3].expand(batch, height * width, 3)
    return origins, directions


def canonical_angles(batch: int, cam_cfg: CameraConfig, device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(yaw (B,), pitch (B,)) of the canonical (input) view."""
    yaw = torch.full((batch,), cam_cfg.canonical_yaw, dtype=dtype, device=device)
    pitch = torch.full((batch,), cam_cfg.canonical_pitch, dtype=dtype, device=device)
    return yaw, pitch


def novel_yaw_denominator(progress: float, cam_cfg: CameraConfig) -> float:
    """``den`` of the novel-yaw range pi / den: linear from start to end over the decay fraction, then flat."""
    start, end = cam_cfg.novel_yaw_den_start, cam_cfg.novel_yaw_den_end
    frac = min(max(progress, 0.0) / cam_cfg.novel_yaw_decay_fraction, 1.0)
    return start + (end - start) * frac


def sample_novel_angles(
    batch: int,
    progress: float,
    cam_cfg: CameraConfig,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random novel views for training: (yaw (B,), pitch (B,)).

    ``yaw = canonical_yaw + U(-1, 1) * pi / den(progress)``, ``pitch = canonical_pitch + U(-1, 1) *
    novel_pitch_range`` with ``progress = step / total_steps`` (see :func:`novel_yaw_denominator`).
    Yaw noise is drawn before pitch noise, each as one (B,) draw from ``generator`` (the global RNG if None).
    """
    den = novel_yaw_denominator(progress, cam_cfg)
    u_yaw = torch.rand(batch, generator=generator, dtype=dtype, device=device) * 2 - 1
    u_pitch = torch.rand(batch, generator=generator, dtype=dtype, device=device) * 2 - 1
    yaw = cam_cfg.canonical_yaw + u_yaw * math.pi / den
    pitch = cam_cfg.canonical_pitch + u_pitch * cam_cfg.novel_pitch_range
    return yaw, pitch


def video_trajectory(n_frames: int, cam_cfg: CameraConfig, device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The circular video path (paper S.6): (yaw (N,), pitch (N,)).

    ``s = linspace(0, 1, N)``; ``yaw = canonical + video_yaw * sin(2 pi s)``,
    ``pitch = canonical + video_pitch * cos(2 pi s)``. As in 3DGP's ``front_circle`` the first and last
    frames coincide (s = 0 and s = 1).
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    steps = torch.linspace(0, 1, n_frames, dtype=dtype, device=device)
    yaw = cam_cfg.canonical_yaw + cam_cfg.video_yaw * torch.sin(steps * 2 * math.pi)
    pitch = cam_cfg.canonical_pitch + cam_cfg.video_pitch * torch.cos(steps * 2 * math.pi)
    return yaw, pitch
