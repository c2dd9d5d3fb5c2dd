"""Inception feature statistics of a dataset, computed once per (dataset, resolution, detector) and cached.

The cache key is a hash of the dataset's *content* (from its shard manifest: every shard's name, sample
count and sha256), the image resolution, the detector file's sha256 and the number of images used, so
re-sharding with different names, a different resolution or different Inception weights never reuses a
stale file, while moving the shards does not invalidate it. Files are ``.npz`` (``mu``, ``sigma``,
``count`` and the key's inputs), written atomically by rank 0.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from g3dr.errors import DataError
from g3dr.log import get_logger
from g3dr.metrics.fid import FeatureMoments, load_moments
from g3dr.metrics.gather import _world, all_ranks_true, all_reduce_moments, shard_range
from g3dr.metrics.inception import FEATURE_DIM, quantize_images

log = get_logger("g3dr.metrics")

MANIFEST_NAME = "manifest.json"


def manifest_content_hash(manifest_path: str | Path) -> str:
    """SHA-256 of a shard manifest's content listing: sorted ``(name, samples, sha256)`` of its shards.

    Falls back to the hash of the file's bytes for a manifest without a ``shards`` list.
    """
    path = Path(manifest_path)
    if not path.is_file():
        raise DataError(f"shard manifest {path} not found; FID statistics are keyed by it "
                        f"(write the shards with `g3dr prep shards`, which writes the manifest last)")
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as err:
        raise DataError(f"shard manifest {path} is not valid JSON ({err}); rerun the shard writer") from None
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not shards:
        return hashlib.sha256(raw).hexdigest()
    listing = sorted((str(s.get("name")), int(s.get("samples", -1)), str(s.get("sha256", ""))) for s in shards)
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


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


def find_manifest(shards: str) -> Path:
    """The ``manifest.json`` beside the shards named by a brace pattern, comma list or directory."""
    first = shards.split(",")[0].strip()
    if first.startswith("pipe:") or "://" in first:
        raise DataError(f"cannot locate the manifest of remote shards {first!r}; pass --data-manifest explicitly")
    base = Path(first)
    directory = base if base.is_dir() else Path(first.split("{")[0]).parent
    return directory / MANIFEST_NAME


def stats_key(dataset_hash: str, resolution: int, detector_sha256: str, max_items: int | None) -> dict[str, Any]:
    """The inputs that identify a statistics file (also stored in it)."""
    return {"dataset": dataset_hash, "resolution": int(resolution), "detector": detector_sha256,
            "max_items": -1 if max_items is None else int(max_items), "protocol": "eg3d-uint8-pool3-v1"}


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
    rank, world = _world()
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


def cached_dataset_stats(cache_dir: str | Path, key: dict[str, Any],
                         compute: Callable[[], FeatureMoments]) -> tuple[np.ndarray, np.ndarray, int, Path]:
    """``(mu, sigma, count, path)`` from the cache file for ``key``, computing and saving it if absent.

    Every rank calls this; all ranks compute when any rank cannot see the file; rank 0 writes it.
    """
    path = stats_path(cache_dir, key)
    if all_ranks_true(path.is_file()):
        mu, sigma, count, meta = load_moments(path)
        stored = {k: meta.get(k) for k in key}
        if stored == {k: str(v) for k, v in key.items()}:
            log.info("FID statistics from cache %s (%d images)", path, count)
            return mu, sigma, count, path
        log.warning("FID statistics cache %s does not match its key (%s vs %s); recomputing", path, stored, key)
    moments = compute()
    rank, _ = _world()
    if rank == 0:
        moments.save(path, **{k: str(v) for k, v in key.items()})
        log.info("FID statistics of %d images written to %s", moments.count, path)
    mu, sigma = moments.mean_cov()
    return mu, sigma, moments.count, path
