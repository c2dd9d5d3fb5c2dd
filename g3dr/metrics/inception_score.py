"""Inception Score (Salimans et al. 2016) as EG3D / StyleGAN metrics compute it.

The inputs are the class probabilities of the Inception-v3 (2015-12-05) network, computed *without*
the bias of its output layer (``no_output_bias=True``, matching the original TensorFlow implementation).
The N samples are cut into ``splits`` consecutive parts (part i is rows ``[i N // s, (i + 1) N // s)``),
after a seeded shuffle of the rows when a ``seed`` is given; each part scores
``exp(mean_x KL(p(y|x) || p(y)))`` with ``p(y)`` the part's mean; the score is the mean over parts and the
spread their (population) standard deviation.

Why the shuffle: EG3D / StyleGAN score generated images of random latents, so their order is already
random. Our samples come from the eval data in shard order, which may be sorted by class; consecutive
parts would then each hold a few classes and score a meaningless low IS. ``g3dr eval`` always shuffles,
with ``eval.seed``; the same seed gives the same parts, hence the same score.
"""

from __future__ import annotations

import numpy as np


def inception_score(probs, splits: int = 10, seed: int | None = None) -> tuple[float, float]:
    """``(mean, std)`` of the Inception Score over ``splits`` parts of ``probs`` ``(N, K)`` (rows sum to 1).

    With ``seed``, the rows are permuted by ``numpy.random.default_rng(seed).permutation(N)`` before the
    split (the result then depends on the seed, not on the row order); without, parts are consecutive rows.
    Computed in float64. Zero probabilities contribute 0 to the KL sum (the limit of p log p).
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"expected probabilities of shape (N, K), got {p.shape}")
    n = p.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(f"need at least one sample per split: {n} samples, {splits} splits")
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("rows must be probability vectors (non-negative, summing to 1); pass softmax outputs")
    if seed is not None:
        p = p[np.random.default_rng(seed).permutation(n)]
    scores = []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(terms.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def softmax(logits, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float64 (for callers that hold logits)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)
