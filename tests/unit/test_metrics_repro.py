"""Metric reproducibility (issue #10 item 9): float64 feature statistics, reference statistics that are never
used stale, the same FID/IS from memory and from saved uint8 PNGs, a seeded IS split, FID(x, x) ~ 0."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from g3dr.errors import DataError
from g3dr.metrics.dataset_stats import (REFERENCE_RECIPE, STATS_RECIPE_VERSION, cached_dataset_stats,
                                        check_stats_file, stats_key, stats_path)
from g3dr.metrics.fid import FeatureMoments, frechet_distance, load_moments
from g3dr.metrics.gather import all_reduce_moments
from g3dr.metrics.inception_score import inception_score, softmax
from g3dr_test_support import load_test_helper



def _helper(name: str):
    return load_test_helper(name)


def _relu_features(rng, n: int, d: int, offset: float = 0.0) -> np.ndarray:
    """Non-negative float32 features with a decaying spectrum (as pool features after ReLU), plus ``offset``."""
    mix = rng.normal(size=(d, d)) * np.exp(-np.arange(d) / 8.0)
    return (np.maximum(rng.normal(size=(n, d)) @ mix, 0.0) + offset).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Feature statistics in float64
# ------------------------------------------------------------------------------------------------


def test_moments_accumulate_in_float64_so_a_large_mean_does_not_cancel_the_covariance():
    rng = np.random.default_rng(0)
    x = _relu_features(rng, 3000, 32, offset=3000.0)  # float32 input, as the detector returns
    moments = FeatureMoments(32)
    for i in range(0, len(x), 64):
        moments.update(torch.from_numpy(x[i:i + 64]))
    assert moments.sum.dtype == np.float64 and moments.outer_sum.dtype == np.float64
    mu, sigma = moments.mean_cov()
    ref = np.cov(x.astype(np.float64), rowvar=False, bias=True)  # two-pass, float64: independent reference
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    # the same one-pass formula in float32 is wrong by far more than that: the test can tell them apart
    x32 = x.astype(np.float32)
    mu32 = x32.mean(axis=0)
    sigma32 = (x32.T @ x32) / np.float32(len(x32)) - np.outer(mu32, mu32)
    assert np.abs(sigma32 - ref).max() > 100 * 1e-6 * np.abs(ref).max()
    # the multi-rank reduction and the cache file keep float64, bit for bit
    total = all_reduce_moments(moments)
    assert total.outer_sum.dtype == np.float64 and np.array_equal(total.outer_sum, moments.outer_sum)


def test_saved_statistics_round_trip_bit_for_bit(tmp_path):
    moments = FeatureMoments(16)
    moments.update(_relu_features(np.random.default_rng(1), 50, 16))
    moments.save(tmp_path / "m.npz", recipe="r")
    mu, sigma, count, meta = load_moments(tmp_path / "m.npz")
    ref_mu, ref_sigma = moments.mean_cov()
    assert mu.dtype == sigma.dtype == np.float64 and count == 50 and meta == {"recipe": "r"}
    assert np.array_equal(mu, ref_mu) and np.array_equal(sigma, ref_sigma)


# ------------------------------------------------------------------------------------------------
# FID of a set against itself
# ------------------------------------------------------------------------------------------------


def test_fid_of_a_set_against_itself_is_zero_however_it_was_accumulated(tmp_path):
    rng = np.random.default_rng(2)
    x = _relu_features(rng, 2000, 64)  # N >> D: full-rank covariance
    whole = FeatureMoments(64)
    whole.update(x)
    batched = FeatureMoments(64)  # other batch sizes, two "ranks" merged, through a file
    for i in range(0, 1200, 7):
        batched.update(x[i:min(i + 7, 1200)])
    rank1 = FeatureMoments(64)
    for i in range(1200, 2000, 33):
        rank1.update(x[i:min(i + 33, 2000)])
    batched.merge(rank1)
    batched.save(tmp_path / "ref.npz")
    mu_ref, sigma_ref, _, _ = load_moments(tmp_path / "ref.npz")
    mu, sigma = whole.mean_cov()
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    assert abs(frechet_distance(mu, sigma, mu_ref, sigma_ref)) < 1e-6
    # a different set of the same distribution is clearly not 0: the distance is not degenerate
    other = FeatureMoments(64)
    other.update(_relu_features(np.random.default_rng(3), 2000, 64))
    assert frechet_distance(mu, sigma, *other.mean_cov()) > 1e-2


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_fid_of_a_set_against_itself_with_fewer_samples_than_dimensions():
    """Known limit: with N < D the covariance is singular and sqrtm's error grows (measured ~3e-6 at N=6,
    D=64); still far below any FID difference that matters. Real FID uses N = 50k >> D = 2048."""
    x = _relu_features(np.random.default_rng(4), 6, 64)
    m = FeatureMoments(64)
    m.update(x)
    mu, sigma = m.mean_cov()
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-4


# ------------------------------------------------------------------------------------------------
# IS: seeded shuffle, splits and std
# ------------------------------------------------------------------------------------------------


def _class_sorted_probs(n_per_class: int = 20, k: int = 10) -> np.ndarray:
    """Confident predictions sorted by class, as samples read from class-sorted shards."""
    logits = np.full((n_per_class * k, k), -20.0)
    logits[np.arange(n_per_class * k), np.repeat(np.arange(k), n_per_class)] = 20.0
    return softmax(logits)


def test_inception_score_shuffle_is_seeded():
    probs = softmax(np.random.default_rng(5).normal(scale=3.0, size=(60, 12)))
    a = inception_score(probs, splits=4, seed=7)
    assert inception_score(probs, splits=4, seed=7) == a  # same seed: identical, bit for bit
    assert inception_score(probs[::-1].copy(), splits=4, seed=7) != a  # the seed fixes parts by position
    scores = {inception_score(probs, splits=4, seed=s) for s in range(5)}
    assert len(scores) > 1  # another seed may give another score (the mean over all rows is the same data)
    perm = np.random.default_rng(7).permutation(60)
    assert a == inception_score(probs[perm], splits=4)  # the documented permutation, then consecutive parts
    # one split: the shuffle cannot matter
    assert inception_score(probs, 1, seed=1)[0] == pytest.approx(inception_score(probs, 1)[0], rel=1e-12)


def test_shuffle_matters_for_class_sorted_samples():
    probs = _class_sorted_probs()
    sorted_mean, _ = inception_score(probs, splits=10)  # each part holds one class: IS = 1
    shuffled_mean, shuffled_std = inception_score(probs, splits=10, seed=0)
    assert sorted_mean == pytest.approx(1.0, abs=1e-6)
    assert shuffled_mean > 5.0 and shuffled_std > 0.0


# ------------------------------------------------------------------------------------------------
# Reference statistics: keyed by manifest content and recipe, checked before use
# ------------------------------------------------------------------------------------------------


DIM = 16  # small statistics files: the checks do not depend on the feature dimension


def _moments(seed: int = 0, n: int = 12) -> FeatureMoments:
    m = FeatureMoments(DIM)
    m.update(np.random.default_rng(seed).random((n, DIM)))
    return m


def test_every_key_field_invalidates_the_statistics(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return _moments(len(calls))

    base = stats_key("manifest-hash", 32, "inception-sha", 12)
    assert base["recipe.version"] == STATS_RECIPE_VERSION and set(REFERENCE_RECIPE) >= {"crop", "resize", "quantize"}
    cached_dataset_stats(tmp_path, base, compute, DIM)
    cached_dataset_stats(tmp_path, base, compute, DIM)
    assert len(calls) == 1
    variants = {"dataset": stats_key("other-manifest", 32, "inception-sha", 12),
                "resolution": stats_key("manifest-hash", 64, "inception-sha", 12),
                "detector": stats_key("manifest-hash", 32, "other-inception", 12),
                "max_items": stats_key("manifest-hash", 32, "inception-sha", 13)}
    for field in REFERENCE_RECIPE:
        variants[f"recipe.{field}"] = stats_key("manifest-hash", 32, "inception-sha", 12,
                                                recipe={**REFERENCE_RECIPE, field: REFERENCE_RECIPE[field] + "'"})
    for field, key in variants.items():
        before = len(calls)
        cached_dataset_stats(tmp_path, key, compute, DIM)
        assert len(calls) == before + 1, f"changing {field} did not recompute"
        assert key[field] != base[field]


def test_a_file_that_does_not_match_its_key_is_recomputed_not_used(tmp_path):
    """A file at the right name but written for another key (an older recipe, a hand-copied file), with a
    wrong count, wrong shapes, NaNs or garbage bytes: never used, recomputed and overwritten."""
    key = stats_key("manifest-hash", 32, "inception-sha", 12)
    path = stats_path(tmp_path, key)
    good = _moments(0)
    stale = {k: str(v) for k, v in key.items()}
    stale["recipe.version"] = "g3dr-fid-ref/1"
    bad_files = {
        "key differs: recipe.version": lambda: _moments(9).save(path, **stale),
        "holds 11 images": lambda: _moments(9, n=11).save(path, **{k: str(v) for k, v in key.items()}),
        "unreadable": lambda: path.write_bytes(b"not an npz"),
        "not finite": lambda: _save_raw(path, key, np.full(DIM, np.nan), np.eye(DIM)),
        "shapes": lambda: _save_raw(path, key, np.zeros(DIM + 1), np.eye(DIM + 1)),
        "not symmetric": lambda: _save_raw(path, key, np.zeros(DIM), np.triu(np.ones((DIM, DIM)))),
        "dtypes": lambda: _save_raw(path, key, np.zeros(DIM, np.float32), np.eye(DIM, dtype=np.float32)),
    }
    for reason, write in bad_files.items():
        write()
        assert reason in check_stats_file(path, key, DIM)[1]
        mu, sigma, count, _ = cached_dataset_stats(tmp_path, key, lambda: good, DIM)
        assert np.array_equal(mu, good.mean_cov()[0]) and count == 12, reason
        assert check_stats_file(path, key, DIM)[0] is not None  # overwritten with valid statistics


def _save_raw(path: Path, key: dict, mu: np.ndarray, sigma: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.savez(f, count=np.int64(12), mu=mu, sigma=sigma, **{f"meta_{k}": np.array(str(v)) for k, v in key.items()})


def test_the_data_pipeline_still_decodes_reference_images_as_the_recipe_says():
    """REFERENCE_RECIPE names the crop and resize of reference images; if the pipeline changes, this fails:
    bump STATS_RECIPE_VERSION (so cached statistics are recomputed) and update the recipe text."""
    from PIL import Image

    from g3dr.data.depth_codec import encode_u16_png
    from g3dr.data.pipeline import decode_sample

    rng = np.random.default_rng(6)
    photo = Image.fromarray(rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8))  # 80 x 60, not square
    buf = io.BytesIO()
    photo.save(buf, format="PNG")
    sample = {"__key__": "k", "png": buf.getvalue(), "depth.png": encode_u16_png(np.zeros((60, 80), np.uint16))}
    got = decode_sample(sample, 32)["rgb"]
    assert REFERENCE_RECIPE["crop"] == "centre square" and REFERENCE_RECIPE["resize"].startswith("PIL Lanczos")
    expected = photo.crop((10, 0, 70, 60)).resize((32, 32), Image.Resampling.LANCZOS)
    assert torch.equal(got, torch.from_numpy(np.array(expected)).permute(2, 0, 1))


def test_reference_statistics_follow_the_manifest_and_the_detector(tmp_path, monkeypatch):
    """End to end through the evaluator: a changed shard manifest, N, resolution or Inception file each
    recompute; an unchanged setup reads the cache (tiny synthetic shards, tiny Inception)."""
    import g3dr.metrics.dataset_stats as dataset_stats
    from g3dr.distributed import DistEnv
    from g3dr.eval.evaluate import EvalSpec
    from g3dr.eval.runner import EvalOptions, Evaluator

    fx = _helper("eval_fixtures")
    computed = []
    real_compute = dataset_stats.compute_dataset_moments

    def counting(*args, **kwargs):
        computed.append(1)
        return real_compute(*args, **kwargs)

    monkeypatch.setattr(dataset_stats, "compute_dataset_moments", counting)

    def stats(*overrides):
        cfg = fx.tiny_config(tmp_path, "eval.metrics=[fid]", *overrides)
        evaluator = Evaluator(EvalOptions(progress=False), DistEnv())
        ident = evaluator.identity(cfg, EvalSpec.from_config(cfg))
        return evaluator.real_stats(cfg, ident)

    cfg = fx.tiny_config(tmp_path)
    fx.make_inception(cfg)
    first = stats()
    assert len(computed) == 1
    again = stats()
    assert len(computed) == 1 and np.array_equal(first[1], again[1])
    stats("eval.num_real=8")
    assert len(computed) == 2
    stats("eval.render_resolution=16")
    assert len(computed) == 3
    _helper("tiny_inception").save_tiny_inception(cfg.eval.inception_weights, seed=1)  # other weights
    stats()
    assert len(computed) == 4
    manifest_path = Path(cfg.data.synthetic_dir) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][0]["sha256"] = "0" * 64  # a shard was rewritten
    manifest_path.write_text(json.dumps(manifest))
    stats()
    assert len(computed) == 5
    assert len(list(Path(cfg.eval.stats_cache).glob("*.npz"))) == 5


# ------------------------------------------------------------------------------------------------
# The in-memory path and the saved uint8 PNGs give the same FID and IS
# ------------------------------------------------------------------------------------------------


def test_png_folder_round_trip_and_errors(tmp_path):
    from g3dr.metrics.image_folder import iter_png_batches, write_png_batch

    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    write_png_batch(images[:3], [0, 1, 2], tmp_path / "a")
    write_png_batch(images[3:], [3, 4], tmp_path / "a")  # another rank's block
    back = torch.cat(list(iter_png_batches(tmp_path / "a", batch_size=2)))
    assert torch.equal(back, images)
    with pytest.raises(ValueError, match="uint8"):
        write_png_batch(images.float(), range(5), tmp_path / "b")
    with pytest.raises(DataError, match="not found"):
        list(iter_png_batches(tmp_path / "missing", 2))
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a" / "000005.png")  # greyscale
    with pytest.raises(DataError, match="mode L"):
        list(iter_png_batches(tmp_path / "a", 8))


@pytest.mark.slow
def test_fid_and_is_from_saved_pngs_equal_the_in_memory_scores(tmp_path):
    """The tiny f_trigen's novel renders scored in memory by evaluate_model vs the PNGs it wrote, read back
    and scored again: identical uint8 pixels, FID and IS equal to 1e-6. (Two 2048 x 2048 sqrtm: slow.)"""
    from g3dr.config import load_config
    from g3dr.eval.evaluate import EvalSpec, evaluate_model
    from g3dr.metrics.image_folder import folder_moments, folder_probabilities, iter_png_batches
    from g3dr.metrics.inception import load_inception, quantize_images
    from g3dr.models.f_trigen import FTrigen

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    torch.manual_seed(0)
    model = FTrigen(cfg).eval()
    detector = load_inception(_helper("tiny_inception").save_tiny_inception(tmp_path / "inception.pt"))
    spec = dataclasses.replace(EvalSpec.from_config(cfg), metrics=("fid", "is"), num_samples=7, fid_samples=7,
                               is_splits=2, views=("novel",), sigma_scales=(1.0,))
    gen = torch.Generator().manual_seed(3)
    rgb = torch.rand(8, 3, 32, 32, generator=gen) * 2 - 1
    depth = 4.5 + torch.rand(8, 1, 32, 32, generator=gen)
    batches = [{"rgb": rgb[i:i + 3], "depth": depth[i:i + 3]} for i in range(0, 8, 3)]
    real = FeatureMoments(2048)
    real.update(detector.features(quantize_images(rgb)))
    real_stats = real.mean_cov()
    results, grids = evaluate_model(model, cfg, batches, spec, detector, real_stats, batch_size=3, grid_samples=7,
                                    progress=False, image_dir=tmp_path / "images")
    folder = tmp_path / "images" / "novel_s1"
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:06d}.png" for i in range(7)]
    saved = torch.cat(list(iter_png_batches(folder, batch_size=4)))
    assert torch.equal(saved, quantize_images(grids["rgb_novel_s1"]))  # exactly what the detector was given
    fid_png = frechet_distance(*folder_moments(folder, detector, batch_size=3).mean_cov(), *real_stats)
    assert fid_png == pytest.approx(results["fid/s1"], rel=1e-6, abs=1e-6)
    is_png, is_std_png = inception_score(folder_probabilities(folder, detector), spec.is_splits, seed=spec.seed)
    assert is_png == pytest.approx(results["is/s1"], rel=1e-6)
    # The std is a difference of per-split scores ~1 that carry float32 noise of ~1e-7 from the detector's batch
    # shapes (3 vs 4 here), so it is compared on the scale of the scores, not relative to its own small value.
    assert is_std_png == pytest.approx(results["is_std/s1"], rel=1e-6, abs=1e-6)


@pytest.mark.slow
def test_cli_saves_the_scored_images_and_reports_is_splits_and_std(tmp_path, capsys):
    """`g3dr eval --save-images`: the PNGs re-score to the logged IS (in Python and with
    `g3dr eval --score-images`); the number of splits and the std are in MLflow (param eval.is_splits,
    metric is_std/s1) and in the report (table.md, table.csv)."""
    from mlflow.tracking import MlflowClient

    from g3dr.launchers.main import main
    from g3dr.metrics.image_folder import folder_probabilities
    from g3dr.metrics.inception import load_inception

    fx = _helper("eval_fixtures")
    cfg = fx.tiny_config(tmp_path)
    fx.make_inception(cfg)
    ckpt = fx.make_checkpoint(cfg, tmp_path / "ck" / "step-3.safetensors", step=3)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["eval", "--checkpoint", str(ckpt), "--metrics", "is", "--views", "novel", "--sigma-scales", "1",
            "--num-samples", "6", "--mlflow-uri", uri, "--experiment", "repro", "--out", str(tmp_path / "out"),
            "--save-images", str(tmp_path / "images"), "--no-progress", "--is-splits", "3", "--seed", "11"]
    assert main(args) == 0
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("repro").experiment_id])[0]
    assert run.data.params["eval.is_splits"] == "3" and run.data.params["eval.seed"] == "11"
    assert {"is/s1", "is_std/s1"} <= set(run.data.metrics) and run.data.metrics["is_std/s1"] > 0
    (folder,) = (tmp_path / "images").glob("step-3-step3-*/novel_s1")
    assert len(list(folder.glob("*.png"))) == 6
    probs = folder_probabilities(folder, load_inception(cfg.eval.inception_weights))
    mean, std = inception_score(probs, 3, seed=11)
    assert mean == pytest.approx(run.data.metrics["is/s1"], rel=1e-6)
    assert std == pytest.approx(run.data.metrics["is_std/s1"], rel=1e-6, abs=1e-6)  # see the in-memory test
    (report,) = (tmp_path / "out").glob("*/table.md")
    assert "over 3 splits" in report.read_text() and "eval.seed = 11" in report.read_text()
    assert "is_std" in next((tmp_path / "out").glob("*/table.csv")).read_text().splitlines()[0]
    assert not list((tmp_path / "out").rglob("000000.png"))  # the saved images are not eval artifacts
    capsys.readouterr()
    assert main(["eval", "--score-images", str(folder), "--inception", cfg.eval.inception_weights,
                 "--is-splits", "3", "--seed", "11", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["count"] == 6 and printed["is_splits"] == 3 and "fid" not in printed
    assert printed["is"] == pytest.approx(run.data.metrics["is/s1"], rel=1e-6)


def test_score_folder_refuses_statistics_of_another_detector_or_size(tmp_path):
    from g3dr.metrics.image_folder import score_folder, write_png_batch
    from g3dr.metrics.inception import load_inception

    tiny = _helper("tiny_inception")
    detector = load_inception(tiny.save_tiny_inception(tmp_path / "inception.pt"))
    other = load_inception(tiny.save_tiny_inception(tmp_path / "other.pt", seed=1))
    write_png_batch(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8), range(4), tmp_path / "png")
    ref = FeatureMoments(2048)
    ref.update(np.random.default_rng(0).random((4, 2048)))
    ref.save(tmp_path / "stats.npz", **stats_key("d", 32, detector.sha256, None))
    with pytest.raises(DataError, match="same file"):
        score_folder(tmp_path / "png", other, tmp_path / "stats.npz")
    with pytest.raises(DataError, match="16 px images"):
        score_folder(tmp_path / "png", detector, tmp_path / "stats.npz")
    (tmp_path / "bad.npz").write_bytes(b"x")
    with pytest.raises(DataError, match="cannot read"):
        score_folder(tmp_path / "png", detector, tmp_path / "bad.npz")
    scores = score_folder(tmp_path / "png", detector, None, is_splits=2, seed=0)  # IS only: no sqrtm
    assert scores["count"] == 4 and scores["is"] >= 1.0 and "fid" not in scores
