"""Dataset feature statistics: content-hash keys and a cache that computes once."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from g3dr.errors import DataError
from g3dr.metrics.dataset_stats import (cached_dataset_stats, compute_dataset_moments, dataset_content_hash, stats_key,
                                        stats_path)
from g3dr.metrics.fid import FeatureMoments
from g3dr.metrics.inception import quantize_images


def _manifest(tmp_path, shards, command="g3dr prep shards --out x", name="manifest.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"format": "g3dr-shards/1", "command": command, "shards": shards}))
    return path


SHARDS = [{"name": "train-000000.tar", "samples": 10, "bytes": 5, "sha256": "aa"},
          {"name": "train-000001.tar", "samples": 7, "bytes": 4, "sha256": "bb"}]


def test_dataset_hash_depends_on_content_only(tmp_path):
    """The shards' names, counts and sha256 from the manifest: not its order, nor its other fields."""
    folders = {name: tmp_path / name for name in ("a", "b", "c")}
    for folder in folders.values():
        folder.mkdir()
    _manifest(folders["a"], SHARDS)
    _manifest(folders["b"], SHARDS[::-1], command="other")
    _manifest(folders["c"], [dict(SHARDS[0], sha256="cc"), SHARDS[1]])
    a, b, c = (dataset_content_hash([str(folder / s["name"]) for s in SHARDS]) for folder in folders.values())
    assert a == b
    assert c != a
    with pytest.raises(DataError, match="no manifest.json"):
        dataset_content_hash([str(tmp_path / "missing" / "train-000000.tar")])


def _features(images: torch.Tensor) -> torch.Tensor:
    """A fixed "detector": 2048 features from a deterministic projection of the uint8 pixels."""
    x = images.float().flatten(1) / 255
    proj = torch.linspace(-1, 1, x.shape[1] * 2048).view(x.shape[1], 2048)
    return x @ proj + x.mean(dim=1, keepdim=True) * torch.arange(2048.0)


def _batches(n, size=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rgb = torch.rand(n, 3, 4, 4, generator=gen) * 2 - 1
    return [{"rgb": rgb[i:i + size]} for i in range(0, n, size)], rgb


def test_compute_dataset_moments_counts_exactly():
    batches, rgb = _batches(10)
    moments = compute_dataset_moments(batches, _features, max_items=8, progress=False)
    ref = FeatureMoments(2048)
    ref.update(_features(quantize_images(rgb[:8])))
    assert moments.count == 8
    np.testing.assert_allclose(moments.sum, ref.sum, rtol=1e-5)  # float32 features, batched differently
    assert compute_dataset_moments(batches, _features, progress=False).count == 10
    with pytest.raises(DataError, match="10 images"):
        compute_dataset_moments(batches, _features, max_items=11, progress=False)


def test_stats_are_cached_by_key(tmp_path):
    batches, _ = _batches(6)
    calls = []

    def compute():
        calls.append(1)
        return compute_dataset_moments(batches, _features, progress=False)

    key = stats_key("dataset-hash", 32, "detector-sha", None)
    mu, sigma, count, path = cached_dataset_stats(tmp_path, key, compute)
    assert path == stats_path(tmp_path, key) and path.is_file() and count == 6 and len(calls) == 1
    mu2, sigma2, count2, _ = cached_dataset_stats(tmp_path, key, compute)
    assert len(calls) == 1 and count2 == 6
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    # any change of dataset content, resolution, detector or N is a different file
    for other in (stats_key("other", 32, "detector-sha", None), stats_key("dataset-hash", 64, "detector-sha", None),
                  stats_key("dataset-hash", 32, "other", None), stats_key("dataset-hash", 32, "detector-sha", 5)):
        assert stats_path(tmp_path, other) != path
    cached_dataset_stats(tmp_path, stats_key("dataset-hash", 64, "detector-sha", None), compute)
    assert len(calls) == 2


def test_dataset_content_hash_of_shard_urls(tmp_path):
    from g3dr.metrics.dataset_stats import dataset_content_hash

    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        _manifest(folder, SHARDS)
    urls = [str(a / "train-000000.tar"), str(a / "train-000001.tar")]
    whole = dataset_content_hash(urls)
    assert dataset_content_hash([str(b / "train-000001.tar"), str(b / "train-000000.tar")]) == whole  # moved copy
    assert dataset_content_hash(urls[:1]) != whole  # a subset
    with pytest.raises(DataError, match="does not list"):
        dataset_content_hash([str(a / "train-000009.tar")])
    with pytest.raises(DataError, match="no manifest.json"):
        dataset_content_hash([str(tmp_path / "elsewhere" / "x.tar")])
