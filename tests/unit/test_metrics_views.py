"""PSNR and masked depth accuracy against ground-truth views, checked against plain float64 loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from g3dr.metrics.depth import depth_accuracy_per_map
from g3dr.metrics.views import masked_depth_accuracy_per_map, psnr_per_image


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
