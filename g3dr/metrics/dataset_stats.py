"""Inception feature statistics of a dataset (the FID reference), computed once per key and cached.

The key (:func:`stats_key`) holds everything the statistics depend on: the dataset's *content* hash (from
its shard manifest: every shard's name, sample count and sha256), the image resolution, the detector
file's sha256, the number of images used, and the recipe (:data:`REFERENCE_RECIPE`: crop, resize filter,
uint8 quantisation, feature layer, and :data:`STATS_RECIPE_VERSION`, the code version of the recipe).
Re-sharding, another resolution, other Inception weights, another N or a changed recipe never reuse a
file, while moving the shards does not invalidate it.

Files are ``.npz`` (``mu``, ``sigma``, ``count`` and the key), named by a digest of the key and written
atomically by rank 0. Before use a file is checked: its stored key must equal the wanted key field by
field, ``count`` must equal the requested N, and ``mu``/``sigma`` must be finite with the right shapes
(``sigma`` symmetric). A file that fails any check is never used: it is recomputed and overwritten, and
the reason is logged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from g3dr.distributed import all_ranks_true, rank_and_world_size
from g3dr.errors import DataError
from g3dr.log import get_logger
from g3dr.metrics.fid import FeatureMoments, load_moments
from g3dr.metrics.gather import all_reduce_moments, shard_range
from g3dr.metrics.inception import FEATURE_DIM, quantize_images

log = get_logger("g3dr.metrics")

MANIFEST_NAME = "manifest.json"

STATS_RECIPE_VERSION = "g3dr-fid-ref/2"
"""Code version of the reference-statistics recipe: bump it when any step that turns dataset bytes into
``mu``/``sigma`` changes (decoding, crop, resize, quantisation, features, moments); every cached file then
misses and is recomputed."""

REFERENCE_RECIPE: dict[str, str] = {
    "crop": "centre square",  # g3dr.data.pipeline: the largest centred square of the stored image
    "resize": "PIL Lanczos from the smallest stored resolution >= R",  # pipeline decode_sample
    "quantize": "uint8 = trunc(clamp(x * 127.5 + 128, 0, 255)) of x = v / 127.5 - 1",  # quantize_images
    "features": "Inception-v3 2015-12-05 pool3 (2048), float64 moments, covariance / N",
    "version": STATS_RECIPE_VERSION,
}
"""How reference images are made and measured; stored in every statistics file and part of its key.
``tests/unit/test_metrics_repro.py`` checks that the data pipeline still decodes this way."""


def dataset_content_hash(urls: list[str]) -> str:
    """SHA-256 of the content of the shards ``urls``: their ``(name, samples, sha256)`` from the manifests
    beside them (so a subset of a folder hashes differently from the whole, and moving shards changes nothing).
    """
    by_folder: dict[Path, set[str]] = {}
    for url in urls:
        if url.startswith("pipe:") or "://" in url:
            raise DataError(f"cannot hash remote shards ({url}); evaluate from local shards with a manifest.json")
        by_folder.setdefault(Path(url).parent, set()).add(Path(url).name)
    listing = []
    for folder, names in sorted(by_folder.items()):
        path = folder / MANIFEST_NAME
        if not path.is_file():
            raise DataError(f"no {MANIFEST_NAME} beside the shards in {folder}; FID statistics and eval runs are "
                            f"keyed by it (write shards with 'g3dr prep shards', which writes the manifest last)")
        entries = {str(s.get("name")): s for s in json.loads(path.read_text()).get("shards", [])}
        missing = sorted(names - entries.keys())
        if missing:
            raise DataError(f"{path} does not list the shards {missing[:3]}; the folder changed after it was written")
        listing += [(n, int(entries[n].get("samples", -1)), str(entries[n].get("sha256", ""))) for n in names]
    return hashlib.sha256(json.dumps(sorted(listing)).encode()).hexdigest()


def stats_key(dataset_hash: str, resolution: int, detector_sha256: str, max_items: int | None,
              recipe: dict[str, str] | None = None) -> dict[str, Any]:
    """The inputs that identify a statistics file (also stored in it, and checked field by field on load):
    ``dataset`` (content hash of the shards), ``resolution``, ``detector`` (Inception file sha256),
    ``max_items`` (-1: all) and the ``recipe.*`` fields (default :data:`REFERENCE_RECIPE`)."""
    key: dict[str, Any] = {"dataset": dataset_hash, "resolution": int(resolution), "detector": detector_sha256,
                           "max_items": -1 if max_items is None else int(max_items)}
    key.update({f"recipe.{k}": str(v) for k, v in sorted((recipe or REFERENCE_RECIPE).items())})
    return key


def stats_path(cache_dir: str | Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"inception-stats-{key['resolution']}px-{digest}.npz"


def compute_dataset_moments(batches: Iterable[dict], features_fn: Callable[[torch.Tensor], torch.Tensor],
                            max_items: int | None = None, progress: bool = True) -> FeatureMoments:
    """Feature moments over this rank's ``batches`` (dicts with ``rgb`` in [-1, 1]), all-reduced over ranks.

    Each rank contributes at most its share of ``max_items`` (``shard_range``), so the total is exactly
    ``max_items`` when every rank's loader holds enough samples. ``features_fn`` maps uint8 images to
    ``(n, 2048)`` features (:meth:`InceptionDetector.features`).
    """
    rank, world = rank_and_world_size()
    limit = None if max_items is None else len(shard_range(max_items, rank, world))
    moments = FeatureMoments(FEATURE_DIM)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=limit, desc="dataset features", unit="img", leave=False)
    for batch in batches:
        rgb = batch["rgb"]
        if limit is not None:
            rgb = rgb[: max(0, limit - moments.count)]
        if rgb.shape[0] == 0:
            break
        moments.update(features_fn(quantize_images(rgb)))
        if bar is not None:
            bar.update(rgb.shape[0])
        if limit is not None and moments.count >= limit:
            break
    if bar is not None:
        bar.close()
    total = all_reduce_moments(moments)
    if max_items is not None and total.count != max_items:
        raise DataError(f"the dataset gave {total.count} images for FID statistics, {max_items} were requested; "
                        f"lower --num-real or use a larger split")
    return total


def check_stats_file(path: str | Path, key: dict[str, Any],
                     dim: int = FEATURE_DIM) -> tuple[tuple[np.ndarray, np.ndarray, int] | None, str]:
    """``((mu, sigma, count), "")`` when the file at ``path`` holds valid statistics for ``key``, else
    ``(None, reason)``: unreadable, a key field that differs (each named, stored vs wanted), a count other
    than ``key["max_items"]``, or ``mu``/``sigma`` of the wrong shape, not finite or not symmetric."""
    try:
        mu, sigma, count, meta = load_moments(path)
    except Exception as err:  # truncated, not an npz, missing arrays: recompute rather than crash
        return None, f"unreadable ({type(err).__name__}: {err})"
    wanted = {k: str(v) for k, v in key.items()}
    differ = [f"{k}: {meta.get(k)!r} != {v!r}" for k, v in wanted.items() if meta.get(k) != v]
    if differ:
        return None, "key differs: " + "; ".join(differ)
    if int(key["max_items"]) >= 0 and count != int(key["max_items"]):
        return None, f"holds {count} images, {key['max_items']} requested"
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        return None, f"shapes {mu.shape} / {sigma.shape}, expected ({dim},) / ({dim}, {dim})"
    if mu.dtype != np.float64 or sigma.dtype != np.float64:
        return None, f"dtypes {mu.dtype} / {sigma.dtype}, expected float64"
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        return None, "mu or sigma is not finite"
    if not np.allclose(sigma, sigma.T, rtol=0, atol=1e-9 * max(1.0, float(np.abs(sigma).max()))):
        return None, "sigma is not symmetric"
    return (mu, sigma, count), ""


def cached_dataset_stats(cache_dir: str | Path, key: dict[str, Any], compute: Callable[[], FeatureMoments],
                         dim: int = FEATURE_DIM) -> tuple[np.ndarray, np.ndarray, int, Path]:
    """``(mu, sigma, count, path)`` from the cache file for ``key`` when it passes
    :func:`check_stats_file` (features of ``dim``); otherwise computed and saved (over a failing file, with
    the reason logged).

    Every rank calls this; all ranks compute unless every rank finds a valid file; rank 0 writes it.
    """
    path = stats_path(cache_dir, key)
    cached, reason = check_stats_file(path, key, dim) if path.is_file() else (None, "")
    if reason:
        log.warning("FID statistics cache %s cannot be used (%s); recomputing", path, reason)
    if all_ranks_true(cached is not None):
        mu, sigma, count = cached
        log.info("FID statistics from cache %s (%d images)", path, count)
        return mu, sigma, count, path
    moments = compute()
    rank, _ = rank_and_world_size()
    if rank == 0:
        moments.save(path, **{k: str(v) for k, v in key.items()})
        log.info("FID statistics of %d images written to %s", moments.count, path)
    mu, sigma = moments.mean_cov()
    return mu, sigma, moments.count, path
