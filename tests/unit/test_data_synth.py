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
