"""``gt_views``: PSNR, depth accuracy and weight masses against the stored views of a synthetic set, end to end.

A tiny random f_trigen gives finite scores under the right names that match a direct computation and do not
depend on batching; the render with per-sample weights has the rgb and depth of the ordinary one, its
weights in the images' pixel order; an oracle that renders the stored ground truth scores perfectly, and the
same oracle with its views swapped scores worse (which also checks that each render is paired with its own view);
missing or mismatched views are clear errors, and ``g3dr eval`` leaves the metrics out only when the user
did not name them."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from g3dr.config import RendererConfig, load_config
from g3dr.data import build_eval_loader
from g3dr.data.synth import ViewSpec, write_synthetic_shards
from g3dr.distributed import DistEnv
from g3dr.errors import DataError
from g3dr.eval.evaluate import GT_VIEW_METRICS, EvalSpec, _pixel_samples, cameras, evaluate_model, render_settings
from g3dr.metrics.views import WEIGHT_BAND, masked_depth_accuracy_per_map, psnr_per_image
from g3dr.render.cameras import camera_to_world_from_angles

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
K = 2


@pytest.fixture(scope="module")
def views_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gt_views") / "shards"
    write_synthetic_shards(str(out), 6, (32,), seed=1, shard_size=2, progress=False, views=ViewSpec(count=K))
    return out


@pytest.fixture(scope="module")
def setup(views_dir):
    from g3dr.models.f_trigen import FTrigen

    cfg = load_config(CONFIG, ["data.source=shards", f"data.shards={views_dir}"])
    torch.manual_seed(0)
    model = FTrigen(cfg).eval()
    spec = dataclasses.replace(EvalSpec.from_config(cfg), metrics=("gt_views",), num_samples=5, fid_samples=5)
    batches = list(build_eval_loader(cfg, DistEnv(), batch_size=4, view_resolution=32))
    return cfg, model, spec, batches


def _rebatched(batches, size):
    """The same samples in batches of ``size``."""
    def cat(key):
        return torch.cat([b[key] for b in batches])
    rgb, depth = cat("rgb"), cat("depth")
    views = {name: torch.cat([b["views"][name] for b in batches]) for name in batches[0]["views"]}
    return [{"rgb": rgb[i:i + size], "depth": depth[i:i + size],
             "views": {name: v[i:i + size] for name, v in views.items()}} for i in range(0, rgb.shape[0], size)]


def test_tiny_model_scores_are_finite_named_and_match_a_direct_computation(setup):
    cfg, model, spec, batches = setup
    results, _ = evaluate_model(model, cfg, batches, spec, None, None, batch_size=4, progress=False)
    names = ("psnr_canonical", "psnr_novel", "da_novel", "psnr_novel_flat", "weight_front_novel",
             "weight_surface_novel")
    assert set(GT_VIEW_METRICS) == set(names)
    assert set(results) == {f"{m}/s{s}" for m in names for s in ("1", "50")}
    assert all(np.isfinite(v) for v in results.values())
    again, _ = evaluate_model(model, cfg, _rebatched(batches, 3), spec, None, None, batch_size=2, progress=False)
    for key, value in results.items():
        assert again[key] == pytest.approx(value, rel=1e-5), key
    # direct: the first five samples in one batch, rendered by hand
    data = _rebatched(batches, 5)[0]
    views = data["views"]
    with torch.no_grad(), render_settings(model, 50.0, True):
        planes = model.make_planes(data["rgb"], data["depth"])
        canon = model.renderer(planes, model.decoder, cameras(range(5), "canonical", spec, cfg.camera), 32)
        novel = [model.renderer(planes, model.decoder,
                                camera_to_world_from_angles(views["yaw"][:, k].float(), views["pitch"][:, k].float(), 5.0),
                                32, sample_weights=True) for k in range(K)]
    assert results["psnr_canonical/s50"] == pytest.approx(psnr_per_image(canon["rgb"], data["rgb"]).mean(), rel=1e-6)
    rgb = torch.stack([o["rgb"] for o in novel], 1)
    depth = torch.stack([o["depth"][:, 0] for o in novel], 1)
    assert results["psnr_novel/s50"] == pytest.approx(
        psnr_per_image(rgb, views["rgb"], views["valid"]).mean(), rel=1e-6)
    assert results["da_novel/s50"] == pytest.approx(
        masked_depth_accuracy_per_map(depth, views["depth"], views["valid"]).mean(), rel=1e-6)
    assert results["psnr_novel/s1"] != pytest.approx(results["psnr_novel/s50"], rel=1e-3)  # the scale reaches it
    # the flat baseline, in float64 numpy: the input's mean colour at every valid pixel of each view
    inputs = data["rgb"].double().numpy()
    target = views["rgb"].double().numpy()
    valid = views["valid"].numpy()
    mean = inputs.mean(axis=(-2, -1))[:, None, :, None, None]
    sq = (((mean - target) / 2) ** 2).sum(axis=2)
    mse = np.where(valid, sq, 0).sum(axis=(-2, -1)) / (valid.sum(axis=(-2, -1)) * 3)
    flat = float((10 * np.log10(1 / mse)).mean())
    assert results["psnr_novel_flat/s50"] == pytest.approx(flat, rel=1e-9)
    assert results["psnr_novel_flat/s1"] == results["psnr_novel_flat/s50"]  # no model: no scale
    # the weight masses, in float64 numpy from the direct render: one mean over every valid pixel of every view
    front = near = opacity = 0.0
    for k, o in enumerate(novel):
        w = o["sample_weights"][..., 0].double().numpy().reshape(5, 32, 32, -1)
        t = o["sample_depths"][..., 0].double().numpy().reshape(5, 32, 32, -1)
        mid = (t[..., 1:] + t[..., :-1]) / 2
        d = np.where(valid[:, k], views["depth"][:, k].double().numpy(), 0.0)[..., None]
        front += (w * (mid < d - WEIGHT_BAND))[valid[:, k]].sum()
        near += (w * (np.abs(mid - d) <= WEIGHT_BAND))[valid[:, k]].sum()
        opacity += o["weight_sum"][:, 0].double().numpy()[valid[:, k]].sum()
    pixels = valid.sum()
    assert results["weight_front_novel/s50"] == pytest.approx(front / pixels, rel=1e-6)
    assert results["weight_surface_novel/s50"] == pytest.approx(near / pixels, rel=1e-6)
    assert results["weight_surface_novel/s50"] > 0  # the band holds samples (a vacuous 0 would pass the above)
    for s in ("1", "50"):
        assert 0 <= results[f"weight_front_novel/s{s}"] <= 1 and 0 <= results[f"weight_surface_novel/s{s}"] <= 1
    assert results["weight_front_novel/s50"] + results["weight_surface_novel/s50"] <= opacity / pixels + 1e-9
    assert results["weight_front_novel/s1"] != pytest.approx(results["weight_front_novel/s50"], rel=1e-3)


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_the_render_with_sample_weights_is_the_ordinary_render_with_its_weights_in_pixel_order(setup, impl):
    """gt_views renders with ``sample_weights=True`` (the reference path): the rgb and depth psnr_novel and
    da_novel score are those of the ordinary render (bit for bit on the reference path, to float precision
    against the fused path), and the weights, laid out as the eval reads them, composite that depth map."""
    cfg, model, _, batches = setup
    data = batches[0]
    views = data["views"]
    cams = camera_to_world_from_angles(views["yaw"][:, 0].float(), views["pitch"][:, 0].float(), 5.0)
    with torch.no_grad(), render_settings(model, 5.0, True):
        model.renderer.cfg = dataclasses.replace(model.renderer.cfg, impl=impl)
        planes = model.make_planes(data["rgb"], data["depth"])
        plain = model.renderer(planes, model.decoder, cams, 32)
        weighted = model.renderer(planes, model.decoder, cams, 32, sample_weights=True)
    for key in ("rgb", "depth", "weight_sum"):
        if impl == "reference":
            assert torch.equal(weighted[key], plain[key]), key
        else:
            torch.testing.assert_close(weighted[key], plain[key], rtol=1e-5, atol=1e-6)
    weights, depths = _pixel_samples(weighted, 32)
    mid = (depths[..., 1:] + depths[..., :-1]) / 2
    composited = (weights * mid).sum(-1) / (weights.sum(-1) + 1e-3)  # the renderer's expected depth
    torch.testing.assert_close(composited, weighted["depth"][:, 0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(weighted["depth"][:, 0], weighted["depth"][:, 0].transpose(-1, -2), atol=1e-3)


class _Oracle(torch.nn.Module):
    """A "model" that renders the ground truth: the input at the canonical camera and the stored view k at
    view k's camera (``shift``: view (k + shift) mod K instead, a model with the wrong geometry). Along each
    ray of a view it puts weight 0.8 on an interval whose midpoint is the view's depth and 0.2 one behind it."""

    def __init__(self, data: dict, shift: int = 0):
        super().__init__()
        self.data = data
        self.renderer = _OracleRenderer(data, shift)
        self.decoder = None

    def make_planes(self, rgb, depth):  # the "triplane" is the index of each input sample
        inputs = self.data["rgb"]
        return torch.tensor([next(i for i in range(inputs.shape[0]) if torch.equal(inputs[i], x)) for x in rgb])


class _OracleRenderer:
    def __init__(self, data: dict, shift: int):
        self.data, self.shift = data, shift
        self.cfg = RendererConfig()

    def __call__(self, planes, decoder, cam2world, resolution, depth=None, canonical=False, **_):
        rgb, out_depth = [], []
        views = self.data["views"]
        if canonical:
            assert not _.get("sample_weights")
        for i, cam in zip(planes.tolist(), cam2world):
            if canonical:
                rgb.append(self.data["rgb"][i])
                out_depth.append(self.data["depth"][i, 0])
                continue
            cams = camera_to_world_from_angles(views["yaw"][i].float(), views["pitch"][i].float(), 5.0)
            (k,) = [k for k in range(K) if torch.allclose(cams[k], cam)]
            k = (k + self.shift) % K
            rgb.append(views["rgb"][i, k])
            out_depth.append(torch.where(views["valid"][i, k], views["depth"][i, k], 5.0))
        depth_maps = torch.stack(out_depth)[:, None]
        out = {"rgb": torch.stack(rgb), "depth": depth_maps, "depth_3dgp": depth_maps}
        if _.get("sample_weights"):  # ray-major, rays in row-major pixel order, as the renderer's
            rays = depth_maps.reshape(depth_maps.shape[0], -1, 1, 1)
            out["sample_depths"] = torch.cat([rays - 0.5, rays + 0.5, rays + 1.0], dim=2)  # midpoints d, d + 0.75
            out["sample_weights"] = torch.tensor([0.8, 0.2]).view(1, 1, 2, 1).expand(rays.shape[0], rays.shape[1], 2, 1)
        return out


def test_the_ground_truth_scores_perfectly_and_a_swapped_view_worse(setup):
    cfg, _, spec, batches = setup
    data = _rebatched(batches, 6)[0]
    perfect, _ = evaluate_model(_Oracle(data), cfg, batches, spec, None, None, progress=False)
    swapped, _ = evaluate_model(_Oracle(data, shift=1), cfg, batches, spec, None, None, progress=False)
    for s in ("1", "50"):
        assert perfect[f"psnr_canonical/s{s}"] == math.inf and perfect[f"psnr_novel/s{s}"] == math.inf
        assert perfect[f"da_novel/s{s}"] < 1e-10
        assert swapped[f"psnr_canonical/s{s}"] == math.inf
        assert 5 < swapped[f"psnr_novel/s{s}"] < 40
        assert swapped[f"da_novel/s{s}"] > 0.05
        assert perfect[f"psnr_novel_flat/s{s}"] == swapped[f"psnr_novel_flat/s{s}"] < perfect[f"psnr_novel/s{s}"]
        assert perfect[f"weight_front_novel/s{s}"] == 0 and perfect[f"weight_surface_novel/s{s}"] == pytest.approx(0.8)
        assert swapped[f"weight_front_novel/s{s}"] > 0.05 and swapped[f"weight_surface_novel/s{s}"] < 0.75


def test_missing_or_mismatched_views_are_clear_errors(setup):
    cfg, model, spec, batches = setup
    without = [{"rgb": b["rgb"], "depth": b["depth"]} for b in batches]
    with pytest.raises(DataError, match="stores no ground-truth views"):
        evaluate_model(model, cfg, without, spec, None, None, progress=False)
    with pytest.raises(DataError, match="renders at 48 px"):
        evaluate_model(model, cfg, batches, dataclasses.replace(spec, resolution=48), None, None, progress=False)
    other = load_config(CONFIG, ["camera.radius=4.5"])
    with pytest.raises(DataError, match="camera.radius=4.5"):
        evaluate_model(model, other, batches, spec, None, None, progress=False)


def test_g3dr_eval_leaves_gt_views_out_only_when_not_named(views_dir, tmp_path):
    from g3dr.eval.runner import EvalOptions, Evaluator

    plain = tmp_path / "plain"
    write_synthetic_shards(str(plain), 2, (32,), progress=False)

    def resolved(folder, *overrides):
        cfg = load_config(CONFIG, ["data.source=shards", f"data.shards={folder}", *overrides])
        return Evaluator(EvalOptions(overrides=overrides), DistEnv()).resolve_gt_views(cfg).eval.metrics

    assert "gt_views" in load_config(CONFIG).eval.metrics  # the default selection
    assert resolved(views_dir) == ("fid", "is", "nfs", "da", "gt_views")
    assert resolved(plain) == ("fid", "is", "nfs", "da")
    assert resolved(plain, "eval.metrics=[nfs]") == ("nfs",)
    with pytest.raises(DataError, match="stores no ground-truth views"):
        resolved(plain, "eval.metrics=[nfs, gt_views]")
    with pytest.raises(DataError, match="at \\[32\\] px but the eval renders at 64 px"):
        resolved(views_dir, "eval.render_resolution=64")

