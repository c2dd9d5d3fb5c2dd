"""The synthetic RGB-D set: depth is the exact ray distance of the canonical camera (checked geometrically)."""

from __future__ import annotations

import math

import numpy as np

from g3dr.data.depth_codec import decode_depth_png, encode_depth_png
from g3dr.data.synth import CLASS_NAMES, WALL_Z, random_primitive, synth_sample


def _independent_rays(res: int, fov_deg: float = 18.0, radius: float = 5.0):
    """Camera at (0, 0, radius) looking at the origin, up +y; unit rays through pixel centres, row 0 on top."""
    focal = 0.5 / math.tan(math.radians(fov_deg) / 2)  # in image widths
    j, i = np.meshgrid(np.arange(res), np.arange(res))
    x = ((j + 0.5) / res - 0.5) / focal
    y = -((i + 0.5) / res - 0.5) / focal
    d = np.stack([x, y, -np.ones_like(x)], -1)
    return np.array([0, 0, radius], float), d / np.linalg.norm(d, axis=-1, keepdims=True)


def _find(kind: int, seed: int = 3) -> int:
    for index in range(200):
        if random_primitive(np.random.default_rng([seed, index])).kind == kind:
            return index
    raise AssertionError


def test_sphere_depth_lands_on_the_sphere_and_wall_after_encoding():
    res, seed = 48, 3
    index = _find(0, seed)
    rgb, depth, label, prim = synth_sample(seed, index, res)
    assert label == 0 and rgb.shape == (res, res, 3) and rgb.dtype == np.uint8
    decoded = decode_depth_png(encode_depth_png(depth)).astype(np.float64)
    origin, dirs = _independent_rays(res)
    points = origin + decoded[..., None] * dirs
    on_wall = np.abs(points[..., 2] - WALL_Z) < 1e-3
    on_sphere = ~on_wall
    assert on_sphere.sum() > 50 and on_wall.sum() > 50
    radius = prim.scale[0]
    dist = np.linalg.norm(points[on_sphere] - prim.centre, axis=-1)
    np.testing.assert_allclose(dist, radius, atol=5e-5)  # quantisation step 2/65536 ~ 3e-5
    np.testing.assert_allclose(points[on_wall][:, 2], WALL_Z, atol=5e-5)
    assert 4.0 < decoded.min() and decoded.max() < 6.0


def test_cube_depth_lies_on_a_face():
    res, seed = 40, 5
    index = _find(1, seed)
    _, depth, label, prim = synth_sample(seed, index, res)
    assert label == 1
    origin, dirs = _independent_rays(res)
    points = origin + depth[..., None] * dirs
    hit = np.abs(points[..., 2] - WALL_Z) > 1e-6
    local = (points[hit] - prim.centre) @ prim.rotation / prim.scale  # into the unit cube frame
    assert np.all(np.abs(local) <= 1 + 1e-9)
    np.testing.assert_allclose(np.abs(local).max(axis=-1), 1.0, atol=1e-9)


def test_all_classes_appear_and_samples_are_deterministic():
    kinds = {random_primitive(np.random.default_rng([0, i])).kind for i in range(40)}
    assert kinds == set(range(len(CLASS_NAMES)))
    a = synth_sample(0, 7, 16)
    b = synth_sample(0, 7, 16)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], synth_sample(0, 8, 16)[0])


def test_renderer_cameras_map_onto_the_synthetic_world():
    """A renderer camera seen through synth_pose_from_renderer renders the same scene from that pose:
    the canonical camera reproduces the canonical image exactly, and a sphere's depth from a novel camera
    lands on the sphere (independent float64 ray-sphere check in the synthetic world)."""
    import torch

    from g3dr.data.synth import Primitive, render_primitive, synth_pose_from_renderer
    from g3dr.render.cameras import camera_to_world_from_angles

    c0 = camera_to_world_from_angles(torch.tensor([math.pi / 2], dtype=torch.float64),
                                     torch.tensor([math.pi / 2], dtype=torch.float64), 5.0)[0].numpy()
    pose0 = synth_pose_from_renderer(c0, c0)
    np.testing.assert_allclose(pose0[:3, :3], np.eye(3), atol=1e-12)
    np.testing.assert_allclose(pose0[:3, 3], [0, 0, 5.0], atol=1e-12)

    prim = Primitive(0, np.array([0.1, -0.05, 0.0]), np.eye(3), np.full(3, 0.5), np.array([[0.9, 0.2, 0.1], [0.1, 0.8, 0.3]]), 2.0, 1)
    rgb_a, depth_a = render_primitive(prim, 16)
    rgb_b, depth_b = render_primitive(prim, 16, pose=pose0)
    np.testing.assert_array_equal(rgb_a, rgb_b)
    np.testing.assert_allclose(depth_a, depth_b, atol=1e-12)

    # yaw +0.4 rad: the renderer's camera moves on its sphere; in the synthetic world it must stay at radius 5,
    # look at the origin, and the hit points of its rays must lie on the sphere or the wall.
    c1 = camera_to_world_from_angles(torch.tensor([math.pi / 2 + 0.4], dtype=torch.float64),
                                     torch.tensor([math.pi / 2 - 0.1], dtype=torch.float64), 5.0)[0].numpy()
    pose1 = synth_pose_from_renderer(c1, c0)
    origin = pose1[:3, 3]
    assert abs(np.linalg.norm(origin) - 5.0) < 1e-9
    np.testing.assert_allclose(pose1[:3, 2], origin / 5.0, atol=1e-9)  # "back" points away from the origin
    assert abs(math.acos(origin[2] / 5.0) - math.acos(math.cos(0.4) * math.cos(0.1))) < 1e-9
    _, depth = render_primitive(prim, 16, pose=pose1)
    from g3dr.data.synth import camera_rays
    o, d = camera_rays(16, pose=pose1)
    hits = o + depth[..., None] * d
    on_sphere = np.abs(np.linalg.norm(hits - prim.centre, axis=-1) - 0.5) < 1e-9
    on_wall = np.abs(hits[..., 2] - WALL_Z) < 1e-9
    assert on_sphere.sum() > 20 and (on_sphere | on_wall).all()
