"""The evaluation through the super-resolution stage (32 -> 64 px on the tiny config, a random-weight tiny RCAN):
FID and IS score the network's output on the renders (checked against a direct computation), the saved images and
grids are those pictures, NFS and DA are the same numbers with and without super-resolution, the ground-truth views
are also scored at the SR size when stored there (against a direct computation, with the bicubic baseline), and the
ambiguous or inconsistent inputs are clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from g3dr.config import load_config
from g3dr.data import build_eval_loader
from g3dr.data.synth import ViewSpec, write_synthetic_shards
from g3dr.distributed import DistEnv
from g3dr.errors import ConfigError, DataError
from g3dr.eval import evaluate as evaluate_module
from g3dr.eval.evaluate import (SR_VIEW_METRICS, EvalSpec, attach_sr_views, cameras, evaluate_model, image_resolution,
                                render_settings)
from g3dr.metrics.image_folder import iter_png_batches
from g3dr.metrics.inception import load_inception, quantize_images
from g3dr.metrics.inception_score import inception_score
from g3dr.metrics.views import psnr_per_image
from g3dr.models.sr import load_sr
from g3dr.render.cameras import camera_to_world_from_angles
from g3dr_test_support import load_test_helper

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
K = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Synthetic shards stored at 32 and 64 px with K views at both sizes, a tiny f_trigen, a tiny RCAN x2 and a
    tiny Inception; the eval stream at 32 px with the 64 px input and views attached."""
    from g3dr.models.f_trigen import FTrigen

    folder = tmp_path_factory.mktemp("eval_sr")
    shards = folder / "shards"
    write_synthetic_shards(str(shards), 6, (32, 64), seed=1, shard_size=3, progress=False, views=ViewSpec(count=K))
    cfg = load_config(CONFIG, ["data.source=shards", f"data.shards={shards}"])
    torch.manual_seed(0)
    model = FTrigen(cfg).eval()
    sr = load_sr(load_test_helper("tiny_models").save_tiny_sr(folder / "sr.safetensors"))
    detector = load_inception(load_test_helper("tiny_inception").save_tiny_inception(folder / "inception.pt"))
    plain = list(build_eval_loader(cfg, DistEnv(), batch_size=4, view_resolution=32))
    with_sr = list(attach_sr_views(plain, build_eval_loader(cfg, DistEnv(), batch_size=4, resolution=64,
                                                            view_resolution=64)))
    return cfg, model, sr, detector, plain, with_sr


def _first(batches, n: int) -> dict:
    """The first ``n`` samples of the stream in one batch."""
    out = {}
    for name in ("rgb", "depth", "sr_rgb"):
        if name in batches[0]:
            out[name] = torch.cat([b[name] for b in batches])[:n]
    for name in ("views", "sr_views"):
        if name in batches[0]:
            out[name] = {k: torch.cat([b[name][k] for b in batches])[:n] for k in batches[0][name]}
    return out


def test_fid_and_is_score_the_super_resolved_renders(setup, monkeypatch, tmp_path):
    cfg, model, sr, detector, batches, _ = setup
    spec = dataclasses.replace(EvalSpec.from_config(cfg), metrics=("fid", "is", "nfs", "da"),
                               views=("canonical", "novel"), sigma_scales=(1.0,), num_samples=5, fid_samples=5,
                               is_splits=1)
    assert image_resolution(spec, sr) == 64 and image_resolution(spec, None) == 32
    fid_inputs = []

    def recording_fid(mu1, sigma1, mu2, sigma2):  # what FID is computed from (the 2048-d sqrtm is slow here)
        fid_inputs.append((mu1, sigma1, mu2, sigma2))
        return 0.0

    monkeypatch.setattr(evaluate_module, "frechet_distance", recording_fid)
    reference = (np.full(2048, 0.5), np.eye(2048))
    with_sr, grids = evaluate_model(model, cfg, batches, spec, detector, reference, batch_size=2, grid_samples=3,
                                    progress=False, image_dir=tmp_path / "images", sr=sr)
    without, plain_grids = evaluate_model(model, cfg, batches, spec, detector, reference, batch_size=2,
                                          grid_samples=3, progress=False)

    # direct: the first five samples in one batch, rendered by hand, upscaled by the network; the saved PNGs are the
    # images FID/IS scored (up to one uint8 step on a few pixels: renders depend on the batch size at float noise)
    data = _first(batches, 5)
    with torch.no_grad(), render_settings(model, 1.0, True):
        planes = model.make_planes(data["rgb"], data["depth"])
        for view in ("canonical", "novel"):
            render = model.renderer(planes, model.decoder, cameras(range(5), view, spec, cfg.camera), 32,
                                    canonical=view == "canonical")["rgb"]
            direct = quantize_images(sr(render))
            saved = torch.cat(list(iter_png_batches(tmp_path / "images" / f"{view}_s1", batch_size=8)))
            assert saved.shape == direct.shape == (5, 3, 64, 64)
            step = (saved.int() - direct.int()).abs()
            assert step.max() <= 1 and (step > 0).float().mean() < 0.01, view
    scored = {view: torch.cat(list(iter_png_batches(tmp_path / "images" / f"{view}_s1", batch_size=8)))
              for view in ("canonical", "novel")}
    for (mu, sigma, mu_ref, sigma_ref), view in zip(fid_inputs[:2], ("canonical", "novel")):  # sorted (view, scale)
        features = detector.features(scored[view]).double().numpy()  # float32 features: batching moves them ~1e-8
        assert np.allclose(mu, features.mean(0), rtol=0, atol=1e-6)
        assert np.allclose(sigma, np.cov(features, rowvar=False, bias=True), rtol=0, atol=1e-6)
        assert mu_ref is reference[0] and sigma_ref is reference[1]
    probs = detector.probabilities(scored["novel"]).double().numpy()
    assert with_sr["is/s1"] == pytest.approx(inception_score(probs, 1, seed=spec.seed)[0], rel=1e-6)
    # the grids show the same pictures, depth at the render size
    assert grids["rgb_novel_s1"].shape == (3, 3, 64, 64) and grids["depth_novel_s1"].shape == (3, 1, 32, 32)
    assert torch.equal(quantize_images(grids["rgb_novel_s1"]), scored["novel"][:3])

    # without SR the same renders are scored at 32 px; NFS and DA (the geometry) are the same numbers
    assert not np.allclose(fid_inputs[2][0], fid_inputs[0][0])
    assert plain_grids["rgb_novel_s1"].shape == (3, 3, 32, 32)
    assert torch.equal(plain_grids["depth_canonical_s1"], grids["depth_canonical_s1"])
    for key in ("nfs/s1", "da/s1"):
        assert with_sr[key] == without[key], key
    assert with_sr["is/s1"] != without["is/s1"]


def test_ground_truth_views_also_at_the_sr_size(setup):
    cfg, model, sr, _, plain, with_sr = setup
    spec = dataclasses.replace(EvalSpec.from_config(cfg), metrics=("gt_views", "nfs"), sigma_scales=(1.0,),
                               num_samples=5, fid_samples=5)
    scores, _ = evaluate_model(model, cfg, with_sr, spec, None, None, batch_size=3, progress=False, sr=sr,
                               sr_views=True)
    render_size, _ = evaluate_model(model, cfg, plain, spec, None, None, batch_size=3, progress=False)
    assert set(scores) == set(render_size) | {f"{m}/s1" for m in SR_VIEW_METRICS}
    for key, value in render_size.items():  # the render-size metrics do not change with SR
        assert scores[key] == value, key
    # without views at the SR size, SR changes nothing in gt_views
    no_sr_views, _ = evaluate_model(model, cfg, plain, spec, None, None, batch_size=3, progress=False, sr=sr)
    assert no_sr_views == render_size

    # direct: the stored 64 px input and views against the upscaled (and bicubic) 32 px renders
    data = _first(with_sr, 5)
    views, big = data["views"], data["sr_views"]
    assert big["rgb"].shape[-1] == 64 and data["sr_rgb"].shape[-1] == 64
    with torch.no_grad(), render_settings(model, 1.0, True):
        planes = model.make_planes(data["rgb"], data["depth"])
        canon = model.renderer(planes, model.decoder, cameras(range(5), "canonical", spec, cfg.camera), 32,
                               canonical=True)["rgb"]
        novel = torch.stack([model.renderer(planes, model.decoder, camera_to_world_from_angles(
            views["yaw"][:, k].float(), views["pitch"][:, k].float(), cfg.camera.radius), 32)["rgb"]
            for k in range(K)], 1)
        novel_sr = torch.stack([sr(novel[:, k]) for k in range(K)], 1)
    bicubic = torch.nn.functional.interpolate(canon, size=(64, 64), mode="bicubic", align_corners=False)
    assert scores["psnr_canonical_sr/s1"] == pytest.approx(psnr_per_image(sr(canon), data["sr_rgb"]).mean(), rel=1e-6)
    assert scores["psnr_canonical_bicubic/s1"] == pytest.approx(psnr_per_image(bicubic, data["sr_rgb"]).mean(),
                                                                rel=1e-6)
    assert scores["psnr_novel_sr/s1"] == pytest.approx(
        np.nanmean(psnr_per_image(novel_sr, big["rgb"], big["valid"])), rel=1e-6)
    assert scores["psnr_canonical_sr/s1"] != pytest.approx(scores["psnr_canonical_bicubic/s1"], rel=1e-3)


def test_ambiguous_or_inconsistent_inputs_are_clear_errors(setup):
    cfg, model, sr, detector, plain, with_sr = setup
    spec = dataclasses.replace(EvalSpec.from_config(cfg), metrics=("is",), sigma_scales=(1.0,), num_samples=4,
                               fid_samples=4, is_splits=1)
    direct_64 = load_config(CONFIG, ["eval.render_resolution=64"])
    with pytest.raises(ConfigError, match="eval.render_resolution=64 with super-resolution"):
        evaluate_model(model, direct_64, plain, EvalSpec.from_config(direct_64), detector, None, progress=False, sr=sr)
    gt = dataclasses.replace(spec, metrics=("gt_views",))
    with pytest.raises(DataError, match="no input images and views at the super-resolution size"):
        evaluate_model(model, cfg, plain, gt, None, None, progress=False, sr=sr, sr_views=True)
    with pytest.raises(ValueError, match="sr_views needs"):
        evaluate_model(model, cfg, with_sr, gt, None, None, progress=False, sr_views=True)
    # two decodes that do not hold the same samples (e.g. one skipped at one size) are not paired silently
    shifted = [dict(b, key=list(reversed(b["key"]))) for b in with_sr]
    with pytest.raises(DataError, match="does not hold the same samples"):
        list(attach_sr_views(plain, shifted))
    with pytest.raises(DataError, match="no ground-truth views at the super-resolution size"):
        list(attach_sr_views(plain, [{k: v for k, v in b.items() if k != "views"} for b in plain]))
