"""Frechet Inception Distance: streaming feature moments and the Frechet distance of two Gaussians.

The protocol follows EG3D / StyleGAN metrics (paper S.5): Inception pool features (2048-d) of uint8
images, mean and covariance accumulated in float64, covariance normalised by N (not N - 1), and

    FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

with the matrix square root from :func:`scipy.linalg.sqrtm` (its real part).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.linalg

from g3dr.log import get_logger

log = get_logger("g3dr.metrics")


class FeatureMoments:
    """Running first and second moments of feature vectors, in float64.

    ``update`` takes batches ``(n, D)``; :meth:`mean_cov` returns ``mu (D,)`` and the population covariance
    ``sigma (D, D)`` (divided by N, as the EG3D protocol does). Two accumulators over disjoint samples
    :meth:`merge` into the accumulator of their union.
    """

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"feature dimension must be >= 1, got {dim}")
        self.dim = dim
        self.count = 0
        self.sum = np.zeros(dim, dtype=np.float64)
        self.outer_sum = np.zeros((dim, dim), dtype=np.float64)

    def update(self, features) -> None:
        """Add a batch of features, shape ``(n, dim)`` (numpy or a CPU/GPU torch tensor)."""
        x = _as_float64(features)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (n, {self.dim}), got {tuple(x.shape)}")
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or inf; the detector input is probably broken")
        self.count += x.shape[0]
        self.sum += x.sum(axis=0)
        self.outer_sum += x.T @ x

    def merge(self, other: FeatureMoments) -> None:
        """Fold in the moments of another, disjoint set of samples."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge moments of dimension {other.dim} into {self.dim}")
        self.count += other.count
        self.sum += other.sum
        self.outer_sum += other.outer_sum

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mu (D,), sigma (D, D))``; sigma = E[x x^T] - mu mu^T (population covariance)."""
        if self.count < 1:
            raise ValueError("no features were accumulated")
        mu = self.sum / self.count
        sigma = self.outer_sum / self.count - np.outer(mu, mu)
        return mu, sigma

    def save(self, path: str | Path, **metadata: str) -> None:
        """Write ``count``, ``mu`` and ``sigma`` (and string metadata) to an ``.npz`` file, atomically."""
        mu, sigma = self.mean_cov()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, count=np.int64(self.count), mu=mu, sigma=sigma,
                     **{f"meta_{k}": np.array(str(v)) for k, v in metadata.items()})
        tmp.replace(path)


def load_moments(path: str | Path) -> tuple[np.ndarray, np.ndarray, int, dict[str, str]]:
    """Read a file written by :meth:`FeatureMoments.save`: ``(mu, sigma, count, metadata)``."""
    with np.load(path, allow_pickle=False) as data:
        meta = {k[len("meta_"):]: str(data[k]) for k in data.files if k.startswith("meta_")}
        return data["mu"], data["sigma"], int(data["count"]), meta


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

    ``mu*`` are ``(D,)`` and ``sigma*`` ``(D, D)`` symmetric positive semi-definite. The square root of
    ``sigma1 @ sigma2`` is taken with :func:`scipy.linalg.sqrtm`; a small imaginary part (numerical noise)
    is dropped, a large one is logged. If the product is singular enough for ``sqrtm`` to fail, 1e-6 is
    added to both diagonals (as the original TTUR implementation does) and the offset is logged.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    s1, s2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"means must be vectors of equal length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}), got {s1.shape} and {s2.shape}")
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * 1e-6
        log.warning("FID: sqrtm(S1 S2) is not finite (singular product); adding 1e-6 to the diagonals")
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        largest = float(np.max(np.abs(covmean.imag)))
        if largest > 1e-3 * max(1.0, float(np.max(np.abs(covmean.real)))):
            log.warning("FID: sqrtm(S1 S2) has an imaginary component of %.3g; keeping the real part", largest)
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def _as_float64(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64)
