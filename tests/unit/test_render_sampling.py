"""Sampling along rays against the slow float64 reference: ray-box, stratified, inverse CDF, merging."""

from __future__ import annotations


import pytest
import torch

from g3dr.render.sampling import (
    depths_from_depth_prior,
    depths_from_importance,
    depths_from_pdf,
    depths_from_stratified,
    merge_samples,
    near_far_from_box,
    ray_limits_from_box,
    smooth_weights_for_importance,
)
from g3dr_test_support import load_test_helper


def _reference():
    return load_test_helper("render_reference")


ref = _reference()
F64 = torch.float64


def _random_rays(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    origins = (torch.rand(1, n, 3, generator=gen, dtype=F64) * 2 - 1) * 4
    targets = (torch.rand(1, n, 3, generator=gen, dtype=F64) * 2 - 1) * 1.5
    directions = torch.nn.functional.normalize(targets - origins, dim=-1)
    return origins, directions


def test_ray_box_limits_match_reference():
    origins, directions = _random_rays(200, 0)
    near, far = ray_limits_from_box(origins, directions, 2.0)
    hits = 0
    for r in range(200):
        n_ref, f_ref, hit = ref.ray_box(origins[0, r], directions[0, r], 1.0)
        hits += hit
        assert float(near[0, r, 0]) == pytest.approx(n_ref, abs=1e-12)
        assert float(far[0, r, 0]) == pytest.approx(f_ref, abs=1e-12)
    assert 20 < hits < 200  # both hits and misses were exercised


def test_ray_box_scales_with_box_warp():
    origins = torch.tensor([[[-5.0, 0.0, 0.0]]], dtype=F64)
    directions = torch.tensor([[[1.0, 0.0, 0.0]]], dtype=F64)
    near, far = ray_limits_from_box(origins, directions, 3.0)
    assert float(near) == 3.5 and float(far) == 6.5


def test_missed_rays_take_eg3d_quirk_limits():
    # three rays hit the box (near 4, 3.5, 4.2); the fourth misses it.
    origins = torch.tensor([[[-5.0, 0, 0], [-4.5, 0, 0], [-5.2, 0.5, 0.5], [-5.0, 3.0, 0]]], dtype=F64)
    directions = torch.tensor([[[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0]]], dtype=F64)
    near, far = near_far_from_box(origins, directions, 2.0)
    torch.testing.assert_close(near[0, :, 0], torch.tensor([4.0, 3.5, 4.2, 3.5], dtype=F64))
    # far of the missing ray is the max of the valid NEAR values (not of the far values)
    torch.testing.assert_close(far[0, :, 0], torch.tensor([6.0, 5.5, 6.2, 4.2], dtype=F64))
    # the min/max run over the whole batch, not per image
    near2, far2 = near_far_from_box(origins.reshape(2, 2, 3), directions.reshape(2, 2, 3), 2.0)
    assert float(near2[1, 1, 0]) == 3.5 and float(far2[1, 1, 0]) == pytest.approx(4.2)


def test_stratified_matches_reference():
    near = torch.tensor([[[3.0], [4.0]], [[4.5], [3.2]]], dtype=F64)
    far = near + torch.tensor([[[2.0], [1.5]], [[1.0], [2.5]]], dtype=F64)
    depths = depths_from_stratified(near, far, 6, generator=torch.Generator().manual_seed(7))
    noise = torch.rand((6, 2, 2, 1), generator=torch.Generator().manual_seed(7), dtype=F64)  # sample-major draw
    plain = depths_from_stratified(near, far, 6, jitter=False)
    for b in range(2):
        for r in range(2):
            n, f = float(near[b, r]), float(far[b, r])
            u = [float(noise[i, b, r, 0]) for i in range(6)]
            torch.testing.assert_close(depths[b, r, :, 0], torch.tensor(ref.stratified(n, f, 6, u), dtype=F64))
            torch.testing.assert_close(plain[b, r, :, 0], torch.tensor(ref.stratified(n, f, 6, None), dtype=F64))
    assert depths.shape == (2, 2, 6, 1)


def test_stratified_uses_global_rng_when_no_generator():
    near, far = torch.full((1, 3, 1), 4.0), torch.full((1, 3, 1), 6.0)
    torch.manual_seed(11)
    a = depths_from_stratified(near, far, 5)
    torch.manual_seed(11)
    b = depths_from_stratified(near, far, 5)
    assert torch.equal(a, b) and not torch.equal(a, depths_from_stratified(near, far, 5, jitter=False))


def test_smoothing_matches_reference():
    w = torch.rand(5, 9, generator=torch.Generator().manual_seed(1), dtype=F64)
    out = smooth_weights_for_importance(w)
    for i in range(5):
        torch.testing.assert_close(out[i], torch.tensor(ref.smooth_weights(w[i].tolist()), dtype=F64))


@pytest.mark.parametrize("deterministic", [False, True])
def test_inverse_cdf_matches_reference(deterministic):
    gen = torch.Generator().manual_seed(2)
    bins = torch.cumsum(torch.rand(4, 8, generator=gen, dtype=F64) + 0.1, dim=1)
    weights = torch.rand(4, 6, generator=gen, dtype=F64)
    weights[1] = 0.0  # degenerate pdf: all mass from eps
    weights[2, 2:4] = 0.0  # empty bins
    samples = depths_from_pdf(bins, weights, 10, deterministic=deterministic, generator=torch.Generator().manual_seed(5))
    if deterministic:
        us = [torch.linspace(0, 1, 10, dtype=F64).tolist()] * 4
    else:
        us = torch.rand(4, 10, generator=torch.Generator().manual_seed(5), dtype=F64).tolist()
    for i in range(4):
        expected = ref.inverse_cdf(bins[i].tolist(), weights[i].tolist(), us[i])
        torch.testing.assert_close(samples[i], torch.tensor(expected, dtype=F64), atol=1e-12, rtol=0)
    # samples stay inside the used bins [bins[0], bins[K]]
    assert (samples >= bins[:, :1] - 1e-12).all() and (samples <= bins[:, 6:7] + 1e-12).all()


def test_inverse_cdf_concentrates_on_heavy_bin():
    bins = torch.arange(6, dtype=F64)[None]
    weights = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]], dtype=F64)
    samples = depths_from_pdf(bins, weights, 100, deterministic=True)
    inside = (samples >= 2) & (samples <= 3)
    # only the end points u = 0 and u = 1 fall outside (they hit the eps-mass of the empty end bins)
    assert inside[0, 1:-1].all() and not inside[0, 0] and not inside[0, -1]


def test_importance_matches_reference_pipeline():
    gen = torch.Generator().manual_seed(4)
    depths = torch.sort(4 + 2 * torch.rand(1, 3, 8, 1, generator=gen, dtype=F64), dim=2).values
    weights = torch.rand(1, 3, 7, 1, generator=gen, dtype=F64)
    fine = depths_from_importance(depths, weights, 5, deterministic=True)
    assert fine.shape == (1, 3, 5, 1)
    for r in range(3):
        z = depths[0, r, :, 0].tolist()
        mids = [(a + b) / 2 for a, b in zip(z[:-1], z[1:])]
        smooth = ref.smooth_weights(weights[0, r, :, 0].tolist())
        expected = ref.inverse_cdf(mids, smooth[1:-1], torch.linspace(0, 1, 5, dtype=F64).tolist())
        torch.testing.assert_close(fine[0, r, :, 0], torch.tensor(expected, dtype=F64), atol=1e-12, rtol=0)


def test_depth_prior_samples_and_merge():
    prior = torch.tensor([[[5.0], [4.2]]], dtype=F64)
    fine = depths_from_depth_prior(prior, 5, 0.05)
    torch.testing.assert_close(fine[0, 0, :, 0], torch.tensor([4.95, 4.975, 5.0, 5.025, 5.05], dtype=F64))
    coarse = torch.tensor([[[[4.0], [5.01], [6.0]], [[4.0], [4.5], [5.0]]]], dtype=F64)
    values_coarse = torch.arange(6, dtype=F64).reshape(1, 2, 3, 1).expand(1, 2, 3, 2)
    values_fine = 100 + torch.arange(10, dtype=F64).reshape(1, 2, 5, 1).expand(1, 2, 5, 2)
    depths, (values,) = merge_samples(coarse, [values_coarse], fine, [values_fine])
    assert (depths[:, :, 1:] >= depths[:, :, :-1]).all()
    assert depths.shape == (1, 2, 8, 1) and values.shape == (1, 2, 8, 2)
    # every value travelled with its depth
    table = {**{float(d): float(v) for d, v in zip(coarse.flatten()[:3], values_coarse[0, 0, :, 0])},
             **{float(d): float(v) for d, v in zip(fine[0, 0, :, 0], values_fine[0, 0, :, 0])}}
    for d, v in zip(depths[0, 0, :, 0].tolist(), values[0, 0, :, 0].tolist()):
        assert table[d] == v
