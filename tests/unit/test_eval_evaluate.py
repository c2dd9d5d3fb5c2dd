"""The evaluation core on a tiny random f_trigen: exact sample blocks, index-only cameras, scores that match
a direct one-batch computation and do not depend on batching, sigma scale applied, interruption, and NFS on
3DGP's depth maps against the float64 reference of 3DGP's renderer and score."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from g3dr.config import load_config
from g3dr.errors import DataError
from g3dr.eval.evaluate import (EvalInterrupted, EvalSpec, cameras, eval_hash, evaluate_model, novel_angles,
                                render_settings, take_block)
from g3dr.metrics.depth import depth_accuracy, non_flatness_score
from g3dr.metrics.gather import shard_range
from g3dr.metrics.inception import load_inception, quantize_images
from g3dr.metrics.inception_score import inception_score
from g3dr_test_support import load_test_helper


def _helper(name: str):
    return load_test_helper(name)


def _batches(n: int, size: int, res: int = 32, seed: int = 1) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    rgb = torch.rand(n, 3, res, res, generator=gen) * 2 - 1
    depth = 4.5 + torch.rand(n, 1, res, res, generator=gen)
    return [{"rgb": rgb[i:i + size], "depth": depth[i:i + size]} for i in range(0, n, size)]


def test_take_block_partitions_the_stream():
    stream = _batches(10, 3, res=2)
    seen = []
    for rank in range(3):
        block = shard_range(7, rank, 3)
        for indices, batch in take_block(stream, block, 2, 7):
            assert len(indices) <= 2 and batch["rgb"].shape[0] == len(indices)
            assert all(i in block for i in indices)
            seen.extend(indices)
    assert sorted(seen) == list(range(7))
    # the samples are the stream's samples at those indices
    (indices, batch), = list(take_block(stream, range(4, 5), 8, 7))
    assert indices == [4] and torch.equal(batch["rgb"][0], stream[1]["rgb"][1])
    with pytest.raises(DataError, match="holds 10 samples"):
        list(take_block(stream, range(0, 6), 4, 12))


def test_cameras_depend_on_the_sample_index_only(tiny_config_path):
    cfg = load_config(tiny_config_path)
    spec = EvalSpec.from_config(cfg)
    yaw_all, pitch_all = novel_angles(range(8), spec, cfg.camera)
    yaw, pitch = novel_angles([3, 5], spec, cfg.camera)
    assert torch.equal(yaw, yaw_all[[3, 5]]) and torch.equal(pitch, pitch_all[[3, 5]])
    assert len(set(yaw_all.tolist())) == 8
    # end-of-training range: |yaw - pi/2| <= pi / den_end
    assert ((yaw_all - cfg.camera.canonical_yaw).abs() <= np.pi / cfg.camera.novel_yaw_den_end + 1e-6).all()
    other_seed = dataclasses.replace(spec, seed=1)
    assert not torch.equal(novel_angles(range(8), other_seed, cfg.camera)[0], yaw_all)
    video = dataclasses.replace(spec, novel_camera="video")
    vy, _ = novel_angles([0, 2], video, cfg.camera)
    assert vy[0] == pytest.approx(cfg.camera.canonical_yaw)
    canon = cameras([0, 1], "canonical", spec, cfg.camera)
    assert torch.allclose(canon[0], canon[1])
    assert canon[0, :3, 3].norm() == pytest.approx(cfg.camera.radius, rel=1e-6)


def test_eval_hash_changes_with_the_protocol_inputs(tiny_config_path):
    spec = EvalSpec.from_config(load_config(tiny_config_path))
    base = eval_hash(spec, dataset="d", detector="x")
    assert base == eval_hash(spec, dataset="d", detector="x")
    assert base != eval_hash(dataclasses.replace(spec, sigma_scales=(1.0,)), dataset="d", detector="x")
    assert base != eval_hash(spec, dataset="e", detector="x")
    assert base != eval_hash(dataclasses.replace(spec, nfs_depth="median"), dataset="d", detector="x")
    assert base != eval_hash(dataclasses.replace(spec, nfs_cut_quantile=0.25), dataset="d", detector="x")
    assert spec.params()["eval.nfs_depth"] == "3dgp" and spec.params()["eval.nfs_cut_quantile"] == "0.5"


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from g3dr.models.f_trigen import FTrigen

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    torch.manual_seed(0)
    model = FTrigen(cfg).eval()
    detector = load_inception(_helper("tiny_inception").save_tiny_inception(tmp_path_factory.mktemp("inc") / "i.pt"))
    spec = dataclasses.replace(EvalSpec.from_config(cfg), metrics=("is", "nfs", "da"), num_samples=6, fid_samples=6,
                               is_splits=2)
    return cfg, model, detector, spec


def test_scores_match_a_direct_computation_and_ignore_batching(tiny_setup):
    cfg, model, detector, spec = tiny_setup
    stream = _batches(8, 4)
    results, grids = evaluate_model(model, cfg, stream, spec, detector, None, batch_size=4, grid_samples=2,
                                    progress=False)
    again, _ = evaluate_model(model, cfg, _batches(8, 3), spec, detector, None, batch_size=5, progress=False)
    assert set(results) == {"is/s1", "is_std/s1", "is_canonical/s1", "is_std_canonical/s1", "nfs/s1", "da/s1",
                            "is/s50", "is_std/s50", "is_canonical/s50", "is_std_canonical/s50", "nfs/s50", "da/s50"}
    for key, value in results.items():
        assert np.isfinite(value)
        assert again[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    # direct: all six samples in one batch, rendered by hand
    rgb = torch.cat([b["rgb"] for b in stream])[:6]
    depth = torch.cat([b["depth"] for b in stream])[:6]
    with torch.no_grad():
        planes = model.make_planes(rgb, depth)
        for scale in (1.0, 50.0):
            model.renderer.cfg = dataclasses.replace(model.renderer.cfg, sigma_scale=scale, deterministic=True)
            try:
                canon = model.renderer(planes, model.decoder, cameras(range(6), "canonical", spec, cfg.camera), 32,
                                       cut_quantile=0.5)
                novel = model.renderer(planes, model.decoder, cameras(range(6), "novel", spec, cfg.camera), 32)
                plain = model.renderer(planes, model.decoder, cameras(range(6), "canonical", spec, cfg.camera), 32)
            finally:
                model.renderer.cfg = dataclasses.replace(model.renderer.cfg, sigma_scale=1.0, deterministic=False)
            s = "1" if scale == 1.0 else "50"
            assert results[f"nfs/s{s}"] == pytest.approx(
                non_flatness_score(canon["depth_3dgp"], spec.nfs_near, spec.nfs_far, spec.nfs_bins), rel=1e-9)
            assert results[f"da/s{s}"] == pytest.approx(depth_accuracy(plain["depth"], depth), rel=1e-6)
            # the depth grid shows the depth NFS scores
            torch.testing.assert_close(grids[f"depth_canonical_s{s}"], canon["depth_3dgp"][:2], atol=1e-5, rtol=0)
            probs = detector.probabilities(quantize_images(novel["rgb"])).numpy()
            assert results[f"is/s{s}"] == pytest.approx(inception_score(probs, 2, seed=spec.seed)[0], rel=1e-5)
    # the sigma scale reaches the renderer: renders at 50 differ from renders at 1
    assert not torch.allclose(grids["depth_canonical_s1"], grids["depth_canonical_s50"])
    assert grids["rgb_novel_s1"].shape == (2, 3, 32, 32) and grids["depth_canonical_s50"].shape == (2, 1, 32, 32)
    assert model.renderer.cfg.sigma_scale == cfg.renderer.sigma_scale


def test_stop_request_interrupts_and_restores_the_renderer(tiny_setup):
    cfg, model, detector, spec = tiny_setup
    original = model.renderer.cfg
    with pytest.raises(EvalInterrupted):
        evaluate_model(model, cfg, _batches(8, 4), spec, detector, None, should_stop=lambda: True, progress=False)
    assert model.renderer.cfg is original
    with pytest.raises(RuntimeError), render_settings(model, 5.0, True):
        assert model.renderer.cfg.sigma_scale == 5.0
        raise RuntimeError("boom")
    assert model.renderer.cfg is original


def test_renders_at_another_resolution(tiny_setup):
    cfg, model, detector, spec = tiny_setup
    # the median-depth NFS: no second (cut) render, which this test of the resolution does not need
    spec48 = dataclasses.replace(spec, metrics=("nfs", "da"), resolution=48, sigma_scales=(1.0,), nfs_depth="median")
    results, grids = evaluate_model(model, cfg, _batches(8, 4), spec48, None, None, grid_samples=1, progress=False)
    assert set(results) == {"nfs/s1", "da/s1"} and grids["depth_canonical_s1"].shape == (1, 1, 48, 48)
    stream = _batches(8, 4)
    rgb, depth = stream[0]["rgb"], stream[0]["depth"]
    rgb = torch.cat([rgb, stream[1]["rgb"][:2]])
    depth = torch.cat([depth, stream[1]["depth"][:2]])
    with torch.no_grad(), render_settings(model, 1.0, True):
        cams = cameras(range(6), "canonical", spec, cfg.camera)
        out = model.renderer(model.make_planes(rgb, depth), model.decoder, cams, 48)
    target = torch.nn.functional.interpolate(depth, size=(48, 48), mode="bilinear", align_corners=False)
    assert results["da/s1"] == pytest.approx(depth_accuracy(out["depth"], target), rel=1e-6)


def test_fid_and_is_use_their_own_sample_count(tiny_setup):
    """NFS/DA on the first num_samples, IS on the first fid_samples (here more), in one pass."""
    cfg, model, detector, spec = tiny_setup
    split = dataclasses.replace(spec, num_samples=3, fid_samples=7, views=("novel",), sigma_scales=(1.0,))
    results, _ = evaluate_model(model, cfg, _batches(8, 4), split, detector, None, batch_size=4, progress=False)
    stream = _batches(8, 4)
    rgb = torch.cat([b["rgb"] for b in stream])[:7]
    depth = torch.cat([b["depth"] for b in stream])[:7]
    with torch.no_grad(), render_settings(model, 1.0, True):
        planes = model.make_planes(rgb, depth)
        canon = model.renderer(planes, model.decoder, cameras(range(7), "canonical", split, cfg.camera), 32)
        novel = model.renderer(planes, model.decoder, cameras(range(7), "novel", split, cfg.camera), 32)
        cut = model.renderer(planes[:3], model.decoder, cameras(range(3), "canonical", split, cfg.camera), 32,
                             cut_quantile=0.5)
    assert results["nfs/s1"] == pytest.approx(
        non_flatness_score(cut["depth_3dgp"], split.nfs_near, split.nfs_far, split.nfs_bins), rel=1e-9)
    assert results["da/s1"] == pytest.approx(depth_accuracy(canon["depth"][:3], depth[:3]), rel=1e-6)
    probs = detector.probabilities(quantize_images(novel["rgb"])).numpy()
    assert results["is/s1"] == pytest.approx(inception_score(probs, 2, seed=split.seed)[0], rel=1e-5)
    assert inception_score(probs[:3], 2, seed=split.seed)[0] != pytest.approx(results["is/s1"], rel=1e-5)


# ------------------------------------------------------------------ NFS as 3DGP measures it


@pytest.fixture(scope="module")
def float64_setup():
    """The perturbed tiny f_trigen in float64 (its depths then spread over [4, 6] at sigma scales 5 and 10),
    NFS only, canonical views of 8 x 8, two samples per NFS."""
    from g3dr.config import load_config as load

    cfg = load(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    model = _helper("tiny_models").perturbed_f_trigen(cfg).double().eval()
    spec = dataclasses.replace(EvalSpec.from_config(cfg), metrics=("nfs",), views=("canonical",), num_samples=2,
                               fid_samples=2, sigma_scales=(5.0, 10.0), resolution=8)
    gen = torch.Generator().manual_seed(5)
    rgb = torch.rand(3, 3, 32, 32, generator=gen, dtype=torch.float64) * 2 - 1
    depth = 4.5 + torch.rand(3, 1, 32, 32, generator=gen, dtype=torch.float64)
    return cfg, model, spec, [{"rgb": rgb, "depth": depth}]


def test_nfs_end_to_end_matches_3dgp_reference(float64_setup):
    """``g3dr eval``'s NFS (default ``eval.nfs_depth=3dgp``) equals 3DGP's score of 3DGP's depth maps, both
    computed by the float64 reference from its formulas: rays, the cut in the coarse and final marcher,
    depth sum(w t), clamp, 64-bin histograms, entropy, mean exp."""
    nfs_ref = _helper("nfs_reference")
    render_ref = _helper("render_reference")
    from g3dr.render.triplane import PLANE_AXES

    cfg, model, spec, stream = float64_setup
    results, grids = evaluate_model(model, cfg, stream, spec, None, None, batch_size=2, grid_samples=1,
                                    progress=False)
    rc = cfg.renderer
    with torch.no_grad():
        planes = model.make_planes(stream[0]["rgb"][:2], stream[0]["depth"][:2])
    cams = cameras(range(2), "canonical", spec, cfg.camera).to(torch.float64)
    for scale in spec.sigma_scales:
        maps = []
        for b in range(2):
            origins, directions = render_ref.rays(cams[b], cfg.camera.fov_degrees, 8, 8)
            decode = nfs_ref.decoder_on_triplane(planes[b], model.decoder, rc.plane_resolutions,
                                                 PLANE_AXES[rc.plane_convention], rc.box_warp)
            ref = nfs_ref.render_image(decode, origins, directions, num_coarse=rc.num_coarse, num_fine=rc.num_fine,
                                       box_warp=rc.box_warp, density_bias=rc.density_offset, sigma_scale=scale,
                                       cut_quantile=0.5)
            maps.append(ref["depth"].tolist())
        expected = nfs_ref.non_flatness_score(maps, spec.nfs_near, spec.nfs_far, spec.nfs_bins)
        key = f"nfs/s{int(scale)}"
        assert expected > 2.0, expected  # the maps spread over several bins: a score that can be wrong
        assert results[key] == pytest.approx(expected, rel=1e-9), (key, results[key], expected)
        # the depth grid is the first of those maps
        torch.testing.assert_close(grids[f"depth_canonical_s{int(scale)}"][0, 0].double(),
                                   torch.tensor(maps[0], dtype=torch.float64).view(8, 8), atol=1e-6, rtol=0)


def test_nfs_median_depth_is_a_named_option(float64_setup):
    """``eval.nfs_depth=median`` scores the median depth of the ordinary render (the earlier variant), which
    differs from 3DGP's; ``eval.nfs_cut_quantile`` changes the 3DGP score."""
    cfg, model, spec, stream = float64_setup
    median_spec = dataclasses.replace(spec, nfs_depth="median")
    median, grids = evaluate_model(model, cfg, stream, median_spec, None, None, grid_samples=1, progress=False)
    threedgp, _ = evaluate_model(model, cfg, stream, spec, None, None, progress=False)
    other_cut, _ = evaluate_model(model, cfg, stream, dataclasses.replace(spec, nfs_cut_quantile=0.25), None, None,
                                  progress=False)
    with torch.no_grad(), render_settings(model, 5.0, True):
        planes = model.make_planes(stream[0]["rgb"][:2], stream[0]["depth"][:2])
        out = model.renderer(planes, model.decoder, cameras(range(2), "canonical", spec, cfg.camera), 8)
    assert median["nfs/s5"] == pytest.approx(
        non_flatness_score(out["median_depth"], spec.nfs_near, spec.nfs_far, spec.nfs_bins), rel=1e-9)
    torch.testing.assert_close(grids["depth_canonical_s5"], out["median_depth"][:1].float())
    for key in ("nfs/s5", "nfs/s10"):
        assert abs(median[key] - threedgp[key]) > 0.1, key
        assert abs(other_cut[key] - threedgp[key]) > 0.1, key
