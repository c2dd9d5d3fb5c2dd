"""Triplane lookup against hand-computed bilinear lookups and an explicit antialiasing filter."""

from __future__ import annotations


import pytest
import torch

from g3dr.render.triplane import (
    features_from_planes,
    plane_axes_for_convention,
    plane_coordinates_from_points,
    planes_pyramid_from_planes,
)
from g3dr_test_support import load_test_helper


def _reference():
    return load_test_helper("render_reference")


ref = _reference()
F64 = torch.float64


def test_plane_conventions():
    p = torch.tensor([[[0.1, 0.2, 0.3]]])
    eg3d = plane_coordinates_from_points(p, plane_axes_for_convention("eg3d"))
    torch.testing.assert_close(eg3d[:, 0, 0], torch.tensor([[0.1, 0.2], [0.1, 0.3], [0.3, 0.1]]))
    ortho = plane_coordinates_from_points(p, plane_axes_for_convention("orthogonal"))
    torch.testing.assert_close(ortho[:, 0, 0], torch.tensor([[0.1, 0.2], [0.1, 0.3], [0.2, 0.3]]))
    with pytest.raises(ValueError, match="unknown plane convention"):
        plane_axes_for_convention("zyx")


def test_hand_computed_bilinear_lookup():
    # 1 channel, 4x4 plane with values 10 * row + col; point exactly between pixels (1,1),(1,2),(2,1),(2,2)
    plane = (10 * torch.arange(4, dtype=F64)[:, None] + torch.arange(4, dtype=F64)[None, :])[None]
    planes = torch.zeros(1, 3, 1, 4, 4, dtype=F64)
    planes[0, 0] = plane
    # pixel centres sit at (2i + 1) / 4 - 1 in grid units: x = 0 is between columns 1 and 2
    points = torch.tensor([[[0.0, 0.0, 0.0], [-0.75, -0.75, 5.0], [-1.0, -1.0, 5.0]]], dtype=F64)
    feats = features_from_planes([planes], points, plane_axes_for_convention("eg3d"), 2.0)
    # plane 0 only (the others are zero), averaged over 3 planes
    assert float(feats[0, 0, 0]) == pytest.approx((11 + 12 + 21 + 22) / 4 / 3)
    assert float(feats[0, 1, 0]) == pytest.approx(0.0 / 3)  # pixel (0, 0) centre exactly: value 0
    # shift all values by 1: at the very corner (-1, -1) only a quarter of pixel (0, 0) contributes
    # (the other three taps fall outside and read zero padding)
    planes[0, 0] = plane + 1
    feats = features_from_planes([planes], points, plane_axes_for_convention("eg3d"), 2.0)
    assert float(feats[0, 1, 0]) == pytest.approx(1 / 3)
    assert float(feats[0, 2, 0]) == pytest.approx(0.25 * 1 / 3)


def test_features_match_reference_lookups():
    gen = torch.Generator().manual_seed(0)
    planes = torch.randn(2, 3, 4, 8, 8, generator=gen, dtype=F64)
    points = (torch.rand(2, 20, 3, generator=gen, dtype=F64) * 2 - 1) * 1.2  # some outside the box
    for convention in ("eg3d", "orthogonal"):
        axes = plane_axes_for_convention(convention)
        levels = planes_pyramid_from_planes(planes, (8, 4, 2))
        feats = features_from_planes(levels, points * 1.5, axes, 3.0)  # box_warp 3: same plane units
        for b in range(2):
            ref_levels = [lvl[b] for lvl in levels]
            for n in range(20):
                expected = ref.triplane_features(ref_levels, points[b, n], axes.tolist())
                torch.testing.assert_close(feats[b, n], expected, atol=1e-12, rtol=0)


def test_pyramid_is_antialiased_bilinear():
    planes = torch.randn(1, 3, 2, 16, 16, generator=torch.Generator().manual_seed(1), dtype=F64)
    levels = planes_pyramid_from_planes(planes, (16, 8, 4))
    assert [tuple(lvl.shape[-2:]) for lvl in levels] == [(16, 16), (8, 8), (4, 4)]
    assert levels[0] is planes
    for lvl in levels[1:]:
        for p in range(3):
            expected = ref.antialias_downsample(planes[0, p], lvl.shape[-1])
            torch.testing.assert_close(lvl[0, p], expected, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="plane_resolutions"):
        planes_pyramid_from_planes(planes, (32, 16))


def test_features_gradcheck():
    gen = torch.Generator().manual_seed(2)
    planes = torch.randn(1, 3, 2, 4, 4, generator=gen, dtype=F64, requires_grad=True)
    points = torch.rand(1, 5, 3, generator=gen, dtype=F64) * 1.6 - 0.8
    axes = plane_axes_for_convention("eg3d")

    def fn(p):
        return features_from_planes(planes_pyramid_from_planes(p, (4, 2, 1)), points, axes, 2.0)

    assert torch.autograd.gradcheck(fn, (planes,))
