"""FID, IS, NFS and DA against closed forms, hand-computed values and independent slow computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from g3dr.metrics.depth import depth_accuracy, depth_histograms, non_flatness_score, normalize_depth
from g3dr.metrics.fid import FeatureMoments, frechet_distance, load_moments
from g3dr.metrics.inception_score import inception_score, softmax

# ------------------------------------------------------------------------------------------------
# FID
# ------------------------------------------------------------------------------------------------


def _frechet_by_eigh(mu1, s1, mu2, s2) -> float:
    """Independent reference: Tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))), all symmetric."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    tr_covmean = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _random_gaussian_features(rng, n, d, shift=0.0, scale=1.0):
    mix = rng.normal(size=(d, d)) / math.sqrt(d)
    return (rng.normal(size=(n, d)) @ mix) * scale + shift


def test_frechet_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    x = _random_gaussian_features(rng, 500, 16)
    m = FeatureMoments(16)
    m.update(x)
    mu, sigma = m.mean_cov()
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_closed_form_diagonal_and_1d():
    # diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    expected = 1.0 + 9.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 0.5) ** 2
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert frechet_distance([2.0], [[9.0]], [-1.0], [[1.0]]) == pytest.approx(9.0 + 4.0, rel=1e-10)


def test_frechet_matches_eigendecomposition_on_random_gaussian_features():
    rng = np.random.default_rng(1)
    d = 48
    m1, m2 = FeatureMoments(d), FeatureMoments(d)
    m1.update(_random_gaussian_features(rng, 400, d))
    m2.update(_random_gaussian_features(rng, 300, d, shift=0.3, scale=1.5))
    mu1, s1 = m1.mean_cov()
    mu2, s2 = m2.mean_cov()
    ours = frechet_distance(mu1, s1, mu2, s2)
    ref = _frechet_by_eigh(mu1, s1, mu2, s2)
    assert ours > 1.0
    assert ours == pytest.approx(ref, rel=1e-8)
    # symmetric in its arguments
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ours, rel=1e-8)


def test_frechet_rank_deficient_covariances_stay_finite():
    # fewer samples than dimensions: singular covariances, as with small N in tests
    rng = np.random.default_rng(2)
    m1, m2 = FeatureMoments(32), FeatureMoments(32)
    m1.update(rng.normal(size=(8, 32)))
    m2.update(rng.normal(size=(8, 32)) + 0.5)
    value = frechet_distance(*m1.mean_cov(), *m2.mean_cov())
    assert math.isfinite(value)
    assert value == pytest.approx(_frechet_by_eigh(*m1.mean_cov(), *m2.mean_cov()), rel=1e-4)


def test_feature_moments_match_numpy_and_merge(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(101, 7)).astype(np.float32) * 3 + 1
    whole = FeatureMoments(7)
    whole.update(torch.from_numpy(x))  # torch input is accepted
    parts = FeatureMoments(7)
    for chunk in np.array_split(x, 4):
        part = FeatureMoments(7)
        part.update(chunk)
        parts.merge(part)
    mu, sigma = whole.mean_cov()
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False, bias=True), rtol=1e-9, atol=1e-12)
    mu2, sigma2 = parts.mean_cov()
    assert parts.count == whole.count == 101
    np.testing.assert_allclose(mu2, mu, rtol=1e-12)
    np.testing.assert_allclose(sigma2, sigma, rtol=1e-9, atol=1e-12)
    whole.save(tmp_path / "s.npz", dataset="abc")
    mu3, sigma3, count, meta = load_moments(tmp_path / "s.npz")
    assert count == 101 and meta == {"dataset": "abc"}
    np.testing.assert_array_equal(mu3, mu)
    np.testing.assert_array_equal(sigma3, sigma)


def test_feature_moments_reject_bad_input():
    m = FeatureMoments(4)
    with pytest.raises(ValueError, match="shape"):
        m.update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        m.update(np.full((2, 4), np.nan))
    with pytest.raises(ValueError, match="no features"):
        m.mean_cov()


# ------------------------------------------------------------------------------------------------
# IS
# ------------------------------------------------------------------------------------------------


def _is_by_loops(probs: np.ndarray, splits: int) -> tuple[float, float]:
    """Slow reference: explicit loops over samples and classes with math.log."""
    n, k = probs.shape
    scores = []
    for s in range(splits):
        rows = range(s * n // splits, (s + 1) * n // splits)
        marginal = [sum(probs[i, c] for i in rows) / len(rows) for c in range(k)]
        kl = 0.0
        for i in rows:
            kl += sum(probs[i, c] * (math.log(probs[i, c]) - math.log(marginal[c]))
                      for c in range(k) if probs[i, c] > 0)
        scores.append(math.exp(kl / len(rows)))
    mean = sum(scores) / splits
    return mean, math.sqrt(sum((v - mean) ** 2 for v in scores) / splits)


def test_inception_score_hand_computed_two_samples():
    # marginal (0.75, 0.25): KL_1 = log(4/3), KL_2 = 0.5 log(2/3) + 0.5 log 2
    kl = (math.log(4 / 3) + 0.5 * math.log(2 / 3) + 0.5 * math.log(2)) / 2
    mean, std = inception_score([[1.0, 0.0], [0.5, 0.5]], splits=1)
    assert mean == pytest.approx(math.exp(kl), rel=1e-12)
    assert mean == pytest.approx(1.2408, abs=1e-4)
    assert std == 0.0


def test_inception_score_extremes_from_logits():
    k = 10
    # confident and spread over all K classes in every split: IS = K
    logits = np.full((100, k), -50.0)
    logits[np.arange(100), np.arange(100) % k] = 50.0
    mean, std = inception_score(softmax(logits), splits=10)
    assert mean == pytest.approx(k, rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)
    # every sample predicts the same distribution: IS = 1
    same = softmax(np.tile(np.linspace(-2, 2, k), (50, 1)))
    assert inception_score(same, splits=10)[0] == pytest.approx(1.0, abs=1e-12)


def test_inception_score_matches_loops_on_random_logits():
    rng = np.random.default_rng(4)
    probs = softmax(rng.normal(scale=3.0, size=(53, 12)))  # 53 does not divide into 10 equal splits
    mean, std = inception_score(probs, splits=10)
    ref_mean, ref_std = _is_by_loops(probs, 10)
    assert mean == pytest.approx(ref_mean, rel=1e-10)
    assert std == pytest.approx(ref_std, rel=1e-8)
    assert std > 0


def test_inception_score_rejects_logits_and_too_few_samples():
    with pytest.raises(ValueError, match="probability"):
        inception_score(np.random.default_rng(0).normal(size=(20, 5)), splits=2)
    with pytest.raises(ValueError, match="splits"):
        inception_score(np.full((5, 2), 0.5), splits=10)


# ------------------------------------------------------------------------------------------------
# NFS
# ------------------------------------------------------------------------------------------------


def test_nfs_flat_map_scores_one_and_uniform_ramp_scores_bins():
    near, far = 4.0, 6.0
    flat = np.full((3, 16, 16), 5.1)
    assert non_flatness_score(flat, near, far, bins=64) == pytest.approx(1.0, abs=1e-12)
    # 64 x 64 = 4096 pixels at the centres of 4096 equal cells: exactly 64 per bin
    ramp = near + (np.arange(64 * 64) + 0.5) / 4096 * (far - near)
    ramp = np.random.default_rng(5).permutation(ramp).reshape(1, 1, 64, 64)
    assert non_flatness_score(ramp, near, far, bins=64) == pytest.approx(64.0, rel=1e-12)
    # mean over maps: (1 + 64) / 2
    both = np.concatenate([flat[:1, None, :, :].repeat(4, axis=2).repeat(4, axis=3), ramp], axis=0)
    assert non_flatness_score(both, near, far, bins=64) == pytest.approx(32.5, rel=1e-12)


def test_nfs_clamps_to_bounds_and_counts_far_in_last_bin():
    near, far = 4.0, 6.0
    # everything out of range clamps onto the bounds: half at near, half at far -> two bins -> exp(log 2)
    d = np.array([[1.0, 3.9, 4.0, 6.0, 6.5, 100.0]])
    hist = depth_histograms(d, near, far, bins=64)
    assert hist[0, 0] == 3 and hist[0, 63] == 3 and hist.sum() == 6
    assert non_flatness_score(d, near, far) == pytest.approx(2.0, rel=1e-12)
    # three equally filled bins and one twice as full: exp(H) by hand
    d = np.array([[4.01, 4.51, 5.01, 5.51, 5.52]])
    p = np.array([1, 1, 1, 2]) / 5
    assert non_flatness_score(d, near, far, bins=4) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-12)


def test_nfs_histograms_match_torch_histc():
    rng = np.random.default_rng(6)
    d = rng.uniform(3.5, 6.5, size=(5, 1, 12, 12))
    ours = depth_histograms(torch.from_numpy(d), 4.0, 6.0, bins=64)
    ref = torch.stack([torch.histc(torch.from_numpy(m).clamp(4.0, 6.0).flatten(), bins=64, min=4.0, max=6.0)
                       for m in d[:, 0]]).double().numpy()
    np.testing.assert_array_equal(ours, ref)


# ------------------------------------------------------------------------------------------------
# Depth accuracy
# ------------------------------------------------------------------------------------------------


def test_depth_accuracy_hand_computed():
    r = np.array([[0.0, 0.0, 1.0, 1.0]])
    t = np.array([[0.0, 1.0, 0.0, 1.0]])
    # normalised: (-1, -1, 1, 1) vs (-1, 1, -1, 1) -> squared differences (0, 4, 4, 0)
    assert depth_accuracy(r, t) == pytest.approx(2.0, rel=1e-12)
    assert depth_accuracy(r, r) == pytest.approx(0.0, abs=1e-12)
    assert depth_accuracy(r, 1.0 - r) == pytest.approx(4.0, rel=1e-12)
    # a flat render against any target: normalised render is 0, target has unit variance -> 1
    assert depth_accuracy(np.full((1, 4), 5.0), t) == pytest.approx(1.0, rel=1e-12)


def test_depth_accuracy_is_invariant_to_positive_affine_changes():
    rng = np.random.default_rng(7)
    rendered = rng.uniform(4, 6, size=(6, 1, 8, 8))
    target = rendered + rng.normal(scale=0.2, size=rendered.shape)
    base = depth_accuracy(rendered, target)
    assert 0 < base < 2
    assert depth_accuracy(3.0 * rendered - 7.0, target) == pytest.approx(base, rel=1e-10)
    assert depth_accuracy(rendered, 0.5 * target + 2.0) == pytest.approx(base, rel=1e-10)
    # per map: each map may carry its own affine change
    scales = rng.uniform(0.5, 2.0, size=(6, 1, 1, 1))
    assert depth_accuracy(torch.from_numpy(rendered * scales + scales), target) == pytest.approx(base, rel=1e-10)
    # normalisation is per map: rows have mean 0 and std 1
    z = normalize_depth(rendered)
    np.testing.assert_allclose(z.mean(axis=1), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(axis=1), 1, rtol=1e-12)


def test_depth_accuracy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        depth_accuracy(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
