"""Cameras: matrices against known poses and the slow reference, rays, samplers, the video path."""

from __future__ import annotations

import math

import pytest
import torch

from g3dr.config import CameraConfig
from g3dr.render.cameras import (
    camera_to_world_from_angles,
    canonical_angles,
    novel_yaw_denominator,
    rays_from_cameras,
    sample_novel_angles,
    video_trajectory,
)
from g3dr_test_support import load_test_helper


def _reference():
    return load_test_helper("render_reference")


ref = _reference()
F64 = torch.float64


def test_known_poses():
    # yaw 0, pitch pi/2: on +z looking down -z, identity rotation (the usual camera frame).
    c2w = camera_to_world_from_angles(torch.tensor([0.0], dtype=F64), torch.tensor([math.pi / 2], dtype=F64), 5.0)[0]
    expected = torch.eye(4, dtype=F64)
    expected[2, 3] = 5.0
    torch.testing.assert_close(c2w, expected, atol=1e-12, rtol=0)
    # canonical view (pi/2, pi/2): at (-5, 0, 0) looking along +x; image right = +z, image up = +y.
    c2w = camera_to_world_from_angles(torch.tensor([math.pi / 2], dtype=F64), torch.tensor([math.pi / 2], dtype=F64), 5.0)[0]
    expected = torch.tensor([[0, 0, -1, -5], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=F64)
    torch.testing.assert_close(c2w, expected, atol=1e-12, rtol=0)
    # yaw pi/2 + pi/2 = pi: behind, at (0, 0, -5) looking along +z, right = -x.
    c2w = camera_to_world_from_angles(torch.tensor([math.pi], dtype=F64), torch.tensor([math.pi / 2], dtype=F64), 5.0)[0]
    expected = torch.tensor([[-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, -5], [0, 0, 0, 1]], dtype=F64)
    torch.testing.assert_close(c2w, expected, atol=1e-12, rtol=0)


def test_matrices_match_reference_and_are_rigid():
    gen = torch.Generator().manual_seed(0)
    yaw = torch.rand(16, generator=gen, dtype=F64) * 2 * math.pi
    pitch = 0.2 + torch.rand(16, generator=gen, dtype=F64) * (math.pi - 0.4)
    radius = 1 + torch.rand(16, generator=gen, dtype=F64) * 5
    c2w = camera_to_world_from_angles(yaw, pitch, radius)
    for i in range(16):
        torch.testing.assert_close(c2w[i], ref.camera_to_world(float(yaw[i]), float(pitch[i]), float(radius[i])),
                                   atol=1e-12, rtol=0)
    rot = c2w[:, :3, :3]
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(3, dtype=F64).expand(16, 3, 3), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(16, dtype=F64), atol=1e-12, rtol=0)
    # the camera looks at the origin: -z axis (column 2 negated) is parallel to -position
    back = c2w[:, :3, 2]
    torch.testing.assert_close(back * radius[:, None], c2w[:, :3, 3], atol=1e-12, rtol=0)


def test_rays_match_reference():
    yaw = torch.tensor([math.pi / 2, 1.2], dtype=F64)
    pitch = torch.tensor([math.pi / 2, 1.4], dtype=F64)
    c2w = camera_to_world_from_angles(yaw, pitch, 5.0)
    origins, directions = rays_from_cameras(c2w, 18.0, (3, 5))
    assert origins.shape == directions.shape == (2, 15, 3)
    for b in range(2):
        o_ref, d_ref = ref.rays(c2w[b], 18.0, 3, 5)
        torch.testing.assert_close(origins[b], o_ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(directions[b], d_ref, atol=1e-12, rtol=0)


def test_canonical_rays_geometry():
    cfg = CameraConfig()
    yaw, pitch = canonical_angles(1, cfg, dtype=F64)
    origins, directions = rays_from_cameras(camera_to_world_from_angles(yaw, pitch, cfg.radius), cfg.fov_degrees, 5)
    # centre pixel looks straight at the origin (+x)
    torch.testing.assert_close(directions[0, 12], torch.tensor([1.0, 0, 0], dtype=F64), atol=1e-12, rtol=0)
    # top-left corner: up (+y) and to the image left (-z); its angle to the axis is the half-diagonal fov
    corner = directions[0, 0]
    assert corner[1] > 0 and corner[2] < 0
    half = math.radians(cfg.fov_degrees) / 2
    assert math.isclose(math.acos(float(corner[0])), math.atan(math.tan(half) * math.sqrt(2)), rel_tol=1e-12)
    torch.testing.assert_close(directions.norm(dim=-1), torch.ones(1, 25, dtype=F64), atol=1e-12, rtol=0)


def test_novel_schedule_and_ranges():
    cfg = CameraConfig()
    assert novel_yaw_denominator(0.0, cfg) == 24.0
    assert math.isclose(novel_yaw_denominator(1 / 6, cfg), 15.0)
    assert novel_yaw_denominator(1 / 3, cfg) == pytest.approx(6.0)
    assert novel_yaw_denominator(0.9, cfg) == 6.0
    gen = torch.Generator().manual_seed(3)
    yaw, pitch = sample_novel_angles(4096, 0.0, cfg, generator=gen)
    assert (yaw - math.pi / 2).abs().max() <= math.pi / 24 + 1e-6
    assert (yaw - math.pi / 2).abs().max() > 0.9 * math.pi / 24
    assert (pitch - math.pi / 2).abs().max() <= math.pi / 18 + 1e-6
    yaw_late, _ = sample_novel_angles(4096, 0.5, cfg, generator=gen)
    assert (yaw_late - math.pi / 2).abs().max() > 0.9 * math.pi / 6
    # the same generator seed gives the same views
    a = sample_novel_angles(8, 0.2, cfg, generator=torch.Generator().manual_seed(1))
    b = sample_novel_angles(8, 0.2, cfg, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_video_trajectory():
    cfg = CameraConfig()
    yaw, pitch = video_trajectory(5, cfg, dtype=F64)
    s = torch.linspace(0, 1, 5, dtype=F64)
    torch.testing.assert_close(yaw, math.pi / 2 + 0.35 * torch.sin(2 * math.pi * s))
    torch.testing.assert_close(pitch, math.pi / 2 + 0.15 * torch.cos(2 * math.pi * s))
    assert float(yaw[1]) == pytest.approx(math.pi / 2 + 0.35)
    with pytest.raises(ValueError):
        video_trajectory(0, cfg)


def test_rays_keep_precision_under_autocast():
    c2w = camera_to_world_from_angles(torch.tensor([1.0]), torch.tensor([1.5]), 5.0)
    plain = rays_from_cameras(c2w, 18.0, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = rays_from_cameras(c2w, 18.0, 8)
    assert mixed[1].dtype == torch.float32
    assert torch.equal(plain[0], mixed[0]) and torch.equal(plain[1], mixed[1])
