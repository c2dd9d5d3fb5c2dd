"""PSNR, masked depth accuracy and weight masses against ground-truth views, checked against plain float64 loops
and a hand-computed case."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from g3dr.metrics.depth import depth_accuracy_per_map
from g3dr.metrics.views import WEIGHT_BAND, masked_depth_accuracy_per_map, psnr_per_image, weight_mass_per_view


def _psnr_reference(rendered, target, valid) -> float:
    """One image: pixel by pixel in Python floats."""
    total, count = 0.0, 0
    for c in range(3):
        for i in range(rendered.shape[1]):
            for j in range(rendered.shape[2]):
                if valid[i, j]:
                    r = min(max(float(rendered[c, i, j]), -1.0), 1.0)
                    total += ((r + 1) / 2 - (float(target[c, i, j]) + 1) / 2) ** 2
                    count += 1
    if count == 0:
        return math.nan
    return math.inf if total == 0 else 10 * math.log10(count / total)


def _da_reference(rendered, target, valid) -> float:
    r = [float(rendered[i, j]) for i in range(rendered.shape[0]) for j in range(rendered.shape[1]) if valid[i, j]]
    t = [float(target[i, j]) for i in range(target.shape[0]) for j in range(target.shape[1]) if valid[i, j]]
    if len(r) < 2:
        return math.nan

    def norm(xs):
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
        return [(x - mean) / max(std, 1e-8) for x in xs]

    return sum((a - b) ** 2 for a, b in zip(norm(r), norm(t))) / len(r)


def test_psnr_matches_the_float64_loop_with_masks_and_clamping():
    gen = torch.Generator().manual_seed(0)
    rendered = torch.rand(2, 3, 3, 6, 5, generator=gen, dtype=torch.float64) * 2.4 - 1.2  # some outside [-1, 1]
    target = torch.rand(2, 3, 3, 6, 5, generator=gen, dtype=torch.float64) * 2 - 1
    valid = torch.rand(2, 3, 6, 5, generator=gen) > 0.3
    valid[1, 2] = False  # no valid pixel: NaN
    got = psnr_per_image(rendered, target, valid)
    assert got.shape == (2, 3)
    for b in range(2):
        for k in range(3):
            expected = _psnr_reference(rendered[b, k], target[b, k], valid[b, k])
            if math.isnan(expected):
                assert math.isnan(got[b, k])
            else:
                assert got[b, k] == pytest.approx(expected, rel=1e-12)
    # no mask: every pixel
    assert psnr_per_image(rendered[0], target[0])[1] == pytest.approx(
        _psnr_reference(rendered[0, 1], target[0, 1], np.ones((6, 5), bool)), rel=1e-12)
    # identical: inf; one channel off by 2/255 everywhere: 20 log10(255) + 10 log10(3)
    assert psnr_per_image(target, target).tolist() == [[math.inf] * 3] * 2
    grey = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    shifted = grey.clone()
    shifted[:, 0] += 2 / 255  # one uint8 step in [0, 1] units, on one channel of three
    assert psnr_per_image(shifted, grey)[0] == pytest.approx(20 * math.log10(255) + 10 * math.log10(3), rel=1e-12)
    with pytest.raises(ValueError, match="valid mask"):
        psnr_per_image(rendered, target, valid[:, :2])


def test_masked_depth_accuracy_matches_the_float64_loop_and_ignores_invalid_pixels():
    gen = torch.Generator().manual_seed(1)
    rendered = 4 + torch.rand(3, 2, 7, 6, generator=gen, dtype=torch.float64)
    target = 4 + torch.rand(3, 2, 7, 6, generator=gen, dtype=torch.float64)
    valid = torch.rand(3, 2, 7, 6, generator=gen) > 0.4
    valid[2, 1] = False
    valid[2, 1, 0, 0] = True  # one valid pixel: NaN
    target_with_inf = torch.where(valid, target, torch.full_like(target, math.inf))
    got = masked_depth_accuracy_per_map(rendered, target_with_inf, valid)
    assert got.shape == (3, 2)
    for b in range(3):
        for k in range(2):
            expected = _da_reference(rendered[b, k], target[b, k], valid[b, k])
            if math.isnan(expected):
                assert math.isnan(got[b, k])
            else:
                assert got[b, k] == pytest.approx(expected, rel=1e-10)
    # every pixel valid: the canonical DA of g3dr.metrics.depth
    np.testing.assert_allclose(masked_depth_accuracy_per_map(rendered[:, 0], target[:, 0]),
                               depth_accuracy_per_map(rendered[:, 0], target[:, 0]), rtol=1e-12)
    # invariant to a positive affine change; 0 against itself; 4 against its inversion
    np.testing.assert_allclose(masked_depth_accuracy_per_map(3 * rendered + 1, target_with_inf, valid)[:2],
                               got[:2], rtol=1e-9)
    assert np.nanmax(masked_depth_accuracy_per_map(target, target_with_inf, valid)) < 1e-20
    np.testing.assert_allclose(masked_depth_accuracy_per_map(-target, target_with_inf, valid)[:2], 4.0, rtol=1e-12)


def _weight_mass_reference(weights, depths, target, valid, band) -> tuple[float, float, int]:
    """One view: pixel by pixel, interval by interval, in Python floats."""
    front = near = 0.0
    count = 0
    for i in range(weights.shape[0]):
        for j in range(weights.shape[1]):
            if not valid[i, j]:
                continue
            count += 1
            d = float(target[i, j])
            for s in range(weights.shape[2]):
                mid = (float(depths[i, j, s]) + float(depths[i, j, s + 1])) / 2
                if mid < d - band:
                    front += float(weights[i, j, s])
                if abs(mid - d) <= band:
                    near += float(weights[i, j, s])
    return front, near, count


def test_weight_mass_of_a_hand_made_view_counts_the_band_edges_and_skips_invalid_pixels():
    """One view of 1 x 3 pixels, 4 samples (3 intervals) per ray, band 0.25 (exact in binary, so the edges are
    exact): a midpoint at D - band or D + band is at the surface, not in front; the invalid pixel (inf depth,
    all its weight in front of anything) is left out."""
    depths = torch.tensor([[[4.5, 5.0, 5.5, 6.0],      # midpoints 4.75 (edge), 5.25 (edge), 5.75 (behind)
                            [4.0, 4.5, 5.0, 5.5],      # midpoints 4.25, 4.75 (in front), 5.25 (edge)
                            [4.0, 4.5, 5.0, 5.5]]])
    weights = torch.tensor([[[0.2, 0.3, 0.4],
                             [0.1, 0.2, 0.6],
                             [0.5, 0.5, 0.0]]], dtype=torch.float32)
    target = torch.tensor([[5.0, 5.5, math.inf]])
    valid = torch.tensor([[True, True, False]])
    front, near, count = weight_mass_per_view(weights, depths, target, valid, band=0.25)
    assert front.shape == near.shape == count.shape == ()
    w = weights.double()
    assert float(front) == pytest.approx(float(w[0, 1, 0] + w[0, 1, 1]), rel=1e-15)  # 0.1 + 0.2 (f32 values)
    assert float(near) == pytest.approx(float(w[0, 0, 0] + w[0, 0, 1] + w[0, 1, 2]), rel=1e-15)  # 0.2 + 0.3 + 0.6
    assert float(count) == 2
    # just inside the front edge: a midpoint of 4.75 - 2^-20 is in front of the first pixel, not at its surface
    nudged = depths.clone().double()
    nudged[0, 0, 0] -= 2 * 2.0 ** -20
    front, near, _ = weight_mass_per_view(weights, nudged, target, valid, band=0.25)
    assert float(front) == pytest.approx(float(w[0, 0, 0] + w[0, 1, 0] + w[0, 1, 1]), rel=1e-15)
    assert float(near) == pytest.approx(float(w[0, 0, 1] + w[0, 1, 2]), rel=1e-15)
    # every pixel valid: the third pixel's D is inf, so all its weight is in front
    front, _, count = weight_mass_per_view(weights, depths, target)
    assert float(count) == 3 and float(front) > 1.0


def test_weight_mass_matches_the_float64_loop():
    gen = torch.Generator().manual_seed(2)
    n, k, h, w, s = 2, 3, 5, 4, 7
    depths = 4 + 2 * torch.sort(torch.rand(n, k, h, w, s, generator=gen), dim=-1).values
    alpha = torch.rand(n, k, h, w, s - 1, generator=gen)
    weights = alpha / alpha.sum(-1, keepdim=True) * torch.rand(n, k, h, w, 1, generator=gen)  # opacity < 1
    target = 4 + 2 * torch.rand(n, k, h, w, generator=gen, dtype=torch.float64)
    target[0, 0, 0, :2] = (depths[0, 0, 0, :2, 2] + depths[0, 0, 0, :2, 3]).double() / 2 + WEIGHT_BAND  # at the edge
    valid = torch.rand(n, k, h, w, generator=gen) > 0.3
    valid[1, 2] = False  # no valid pixel: zero sums, zero count
    target = torch.where(valid, target, torch.full_like(target, math.inf))
    front, near, count = weight_mass_per_view(weights, depths, target, valid)
    assert front.shape == near.shape == count.shape == (n, k)
    for b in range(n):
        for v in range(k):
            want = _weight_mass_reference(weights[b, v], depths[b, v], target[b, v], valid[b, v], WEIGHT_BAND)
            assert front[b, v] == pytest.approx(want[0], rel=1e-12, abs=1e-15)
            assert near[b, v] == pytest.approx(want[1], rel=1e-12, abs=1e-15)
            assert count[b, v] == want[2]
    assert front[1, 2] == near[1, 2] == count[1, 2] == 0
    opacity = torch.where(valid, weights.double().sum(-1), 0.0).sum(dim=(-2, -1)).numpy()
    assert (front + near <= opacity + 1e-12).all() and (near > 0).any() and (front > 0).any()
    with pytest.raises(ValueError, match="depths"):
        weight_mass_per_view(weights, depths[..., :-1], target, valid)
    with pytest.raises(ValueError, match="target"):
        weight_mass_per_view(weights, depths, target[..., :-1], valid[..., :-1])
    with pytest.raises(ValueError, match="band"):
        weight_mass_per_view(weights, depths, target, valid, band=0.0)
