"""render_rays and TriplaneRenderer end to end: against the slow reference, determinism, options."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from g3dr.config import CameraConfig, RendererConfig
from g3dr.render import TriplaneRenderer, camera_to_world_from_angles, rays_from_cameras, render_rays
from g3dr.render.triplane import PLANE_AXES
from g3dr_test_support import load_test_helper


def _reference():
    return load_test_helper("render_reference")


ref = _reference()
F64 = torch.float64
C = 4


class TinyDecoder:
    """A small random linear map with the TriplaneDecoder call signature (uses all three inputs)."""

    def __init__(self, dtype=F64, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.w = torch.randn(C, 4, generator=gen, dtype=dtype)
        self.v = torch.randn(3, 1, generator=gen, dtype=dtype) * 0.5
        self.u = torch.randn(3, 3, generator=gen, dtype=dtype) * 0.1

    def __call__(self, features, coordinates, directions):
        x = features @ self.w
        rgb = torch.sigmoid(x[..., 1:] + directions @ self.u) * (1 + 2e-3) - 1e-3
        sigma = 2 * x[..., :1] + coordinates @ self.v + 2
        return rgb, sigma


def _scene(batch=2, res=3, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    planes = torch.randn(batch, 3, C, 8, 8, generator=gen, dtype=dtype)
    yaw = math.pi / 2 + torch.tensor([0.0, 0.2, -0.1, 0.05][:batch], dtype=dtype)
    pitch = math.pi / 2 + torch.tensor([0.0, -0.1, 0.05, 0.1][:batch], dtype=dtype)
    c2w = camera_to_world_from_angles(yaw, pitch, 5.0)
    origins, directions = rays_from_cameras(c2w, 18.0, res)
    return planes, c2w, origins, directions


def _cfg(**kw):
    base = dict(num_coarse=6, num_fine=5, plane_resolutions=(8, 4, 2), deterministic=True, impl="reference")
    base.update(kw)
    return RendererConfig(**base)


def _reference_render(planes, decoder, origins, directions, cfg):
    """Deterministic render of every ray with the slow reference."""
    axes = PLANE_AXES[cfg.plane_convention]
    levels = [planes] + [torch.nn.functional.interpolate(planes.flatten(1, 2), size=(r, r), mode="bilinear",
                                                         antialias=True).view(*planes.shape[:3], r, r)
                         for r in cfg.plane_resolutions[1:]]
    out = []
    for b in range(planes.shape[0]):
        lv = [lvl[b] for lvl in levels]

        def decode(o, d, ts):
            pts = torch.stack([o + t * d for t in ts])
            unit = pts * (2 / cfg.box_warp)
            feats = torch.stack([ref.triplane_features(lv, p, axes) for p in unit])
            rgb, sigma = decoder(feats[None], unit[None], d.expand(len(ts), 3)[None])
            return rgb[0], sigma[0, :, 0]

        for r in range(origins.shape[1]):
            o, d = origins[b, r], directions[b, r]
            near, far, hit = ref.ray_box(o, d, cfg.box_warp / 2)
            assert hit
            coarse = ref.stratified(near, far, cfg.num_coarse, None)
            c_col, c_raw = decode(o, d, coarse)
            _, _, _, w, _ = ref.march(c_col, c_raw, torch.tensor(coarse, dtype=F64), sigma_scale=cfg.sigma_scale)
            mids = [(a + b_) / 2 for a, b_ in zip(coarse[:-1], coarse[1:])]
            smooth = ref.smooth_weights(w.tolist())
            fine = ref.inverse_cdf(mids, smooth[1:-1], torch.linspace(0, 1, cfg.num_fine, dtype=F64).tolist())
            f_col, f_raw = decode(o, d, fine)
            ts = torch.tensor(coarse + fine, dtype=F64)
            order = torch.argsort(ts)
            cols, raws = torch.cat([c_col, f_col])[order], torch.cat([c_raw, f_raw])[order]
            rgb, depth, wsum, w, mid = ref.march(cols, raws, ts[order], sigma_scale=cfg.sigma_scale)
            out.append((b, r, rgb, depth, wsum, ref.median_depth(w, mid)))
    return out


@pytest.mark.parametrize("convention,sigma_scale", [("eg3d", 1.0), ("orthogonal", 5.0)])
def test_deterministic_render_matches_reference(convention, sigma_scale):
    planes, _, origins, directions = _scene()
    decoder = TinyDecoder()
    cfg = _cfg(plane_convention=convention, sigma_scale=sigma_scale)
    result = render_rays(planes, decoder, origins, directions, cfg)
    assert result.rgb.shape == (2, 9, 3) and result.depth.shape == result.weight_sum.shape == (2, 9, 1)
    assert result.depths.shape == (2, 9, 11, 1)
    for b, r, rgb, depth, wsum, median in _reference_render(planes, decoder, origins, directions, cfg):
        torch.testing.assert_close(result.rgb[b, r], rgb, atol=1e-10, rtol=0)
        torch.testing.assert_close(result.depth[b, r, 0], depth, atol=1e-10, rtol=0)
        torch.testing.assert_close(result.weight_sum[b, r, 0], wsum, atol=1e-10, rtol=0)
        assert float(result.median_depth[b, r, 0]) == pytest.approx(median, abs=1e-10)


def test_conventions_differ():
    planes, _, origins, directions = _scene()
    a = render_rays(planes, TinyDecoder(), origins, directions, _cfg(plane_convention="eg3d"))
    b = render_rays(planes, TinyDecoder(), origins, directions, _cfg(plane_convention="orthogonal"))
    assert not torch.allclose(a.rgb, b.rgb)


def test_deterministic_renders_identical_across_runs():
    planes, c2w, _, _ = _scene(dtype=torch.float32)
    planes = planes.float()
    decoder = TinyDecoder(dtype=torch.float32)
    renderer = TriplaneRenderer(_cfg(), CameraConfig())
    depth = torch.full((2, 1, 4, 4), 5.0)
    first = renderer(planes, decoder, c2w.float(), 4, depth=depth, canonical=True)
    torch.manual_seed(123)  # the global RNG state must not matter
    second = renderer(planes, decoder, c2w.float(), 4, depth=depth, canonical=True)
    for key in ("rgb", "depth", "weight_sum", "median_depth"):
        assert first[key].shape == ((2, 3, 4, 4) if key == "rgb" else (2, 1, 4, 4))
        assert torch.equal(first[key], second[key]), key


def test_random_renders_reproducible_with_generator():
    planes, _, origins, directions = _scene()
    cfg = _cfg(deterministic=False)
    prior = torch.full((2, 9, 1), 5.0, dtype=F64)
    runs = [render_rays(planes, TinyDecoder(), origins, directions, cfg, depth_prior=prior, use_depth_kernel=True,
                        generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(runs[0].rgb, runs[1].rgb) and torch.equal(runs[0].depths, runs[1].depths)
    assert not torch.equal(runs[0].depths, runs[2].depths)


def test_depth_prior_fine_samples():
    planes, _, origins, directions = _scene()
    prior = 4.6 + torch.rand(2, 9, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    always = render_rays(planes, TinyDecoder(), origins, directions, _cfg(deterministic=False, depth_prior_p=1.0),
                         depth_prior=prior, generator=torch.Generator().manual_seed(0))
    window = prior[:, :, None, :] + torch.linspace(-0.05, 0.05, 5, dtype=F64)[None, None, :, None]
    for b in range(2):
        for r in range(9):
            got = always.depths[b, r, :, 0].tolist()
            for t in window[b, r, :, 0].tolist():
                assert any(abs(t - g) < 1e-12 for g in got)
    # deterministic mode never takes the depth-prior branch
    det = render_rays(planes, TinyDecoder(), origins, directions, _cfg(depth_prior_p=1.0), depth_prior=prior)
    plain = render_rays(planes, TinyDecoder(), origins, directions, _cfg())
    assert torch.equal(det.depths, plain.depths)


def test_depth_kernel_scales_plane_gradients_only():
    planes, _, origins, directions = _scene()
    prior = torch.full((2, 9, 1), 5.0, dtype=F64)
    grads, outs = [], []
    for kernel in (False, True):
        p = planes.clone().requires_grad_(True)
        out = render_rays(p, TinyDecoder(), origins, directions, _cfg(), depth_prior=prior, use_depth_kernel=kernel)
        (out.rgb.sum() + out.depth.sum()).backward()
        grads.append(p.grad)
        outs.append(out)
    assert torch.equal(outs[0].rgb, outs[1].rgb)
    assert not torch.allclose(grads[0], grads[1])
    # the kernel is <= 1 everywhere, so it can only shrink the total gradient mass here
    assert float(grads[1].abs().sum()) < float(grads[0].abs().sum())


def test_explicit_sample_depths():
    planes, _, origins, directions = _scene()
    depths = torch.linspace(4.0, 6.0, 7, dtype=F64).expand(2, 9, 7)[..., None].contiguous()
    out = render_rays(planes, TinyDecoder(), origins, directions, _cfg(), sample_depths=depths)
    assert torch.equal(out.depths, depths)
    for b, r in ((0, 0), (1, 4)):
        o, d = origins[b, r], directions[b, r]
        pts = torch.stack([o + t * d for t in depths[b, r, :, 0]])
        levels = [planes[b]] + [torch.nn.functional.interpolate(planes[b:b + 1].flatten(1, 2), size=(s, s), mode="bilinear",
                                                                antialias=True).view(3, C, s, s) for s in (4, 2)]
        feats = torch.stack([ref.triplane_features(levels, p, PLANE_AXES["eg3d"]) for p in pts])
        rgb, sigma = TinyDecoder()(feats[None], pts[None], d.expand(7, 3)[None])
        exp_rgb, exp_depth, *_ = ref.march(rgb[0], sigma[0, :, 0], depths[b, r, :, 0])
        torch.testing.assert_close(out.rgb[b, r], exp_rgb, atol=1e-10, rtol=0)
        torch.testing.assert_close(out.depth[b, r, 0], exp_depth, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="sorted"):
        render_rays(planes, TinyDecoder(), origins, directions, _cfg(), sample_depths=depths.flip(2))


def test_bad_inputs_are_clear_errors():
    planes, _, origins, directions = _scene()
    with pytest.raises(ValueError, match="depth_prior"):
        render_rays(planes, TinyDecoder(), origins, directions, _cfg(), use_depth_kernel=True)
    with pytest.raises(ValueError, match="plane_resolutions"):
        render_rays(planes, TinyDecoder(), origins, directions, _cfg(plane_resolutions=(16, 8)))
    with pytest.raises(ValueError, match="decoder returned"):
        render_rays(planes, lambda f, x, d: (f[..., :3], f[..., :2]), origins, directions, _cfg())


def test_module_buffers_and_fused_fallback():
    # A handler of its own on the renderer's logger: independent of how other tests left the g3dr
    # logger tree (handlers, propagation) and of pytest's log capture.
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("g3dr.render")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    TriplaneRenderer._fused_fallback_logged = False
    try:
        renderer = TriplaneRenderer(_cfg(impl="fused"), CameraConfig())
        TriplaneRenderer(_cfg(impl="fused"), CameraConfig())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert sum("fused" in r.getMessage() for r in records) == 1
    assert "plane_axes" not in renderer.state_dict()
    assert renderer.plane_axes.tolist() == [[0, 1], [0, 2], [2, 0]]


def test_render_gradcheck_with_fixed_depths():
    # with explicit depths the sample positions are constants, so autograd's gradient is the true one
    planes, _, origins, directions = _scene(batch=1, res=2)
    planes = planes[:, :, :, :4, :4].contiguous().requires_grad_(True)
    depths = torch.linspace(4.2, 5.8, 5, dtype=F64).expand(1, 4, 5)[..., None].contiguous()
    prior = torch.full((1, 4, 1), 5.0, dtype=F64)
    cfg = _cfg(plane_resolutions=(4, 2))

    def fn(p):
        out = render_rays(p, TinyDecoder(), origins, directions, cfg, sample_depths=depths, depth_prior=prior)
        return out.rgb, out.depth, out.weight_sum

    assert torch.autograd.gradcheck(fn, (planes,))


def test_bf16_planes_render_in_float32_geometry():
    planes, c2w, _, _ = _scene(batch=1, dtype=torch.float32)
    planes, c2w = planes.float(), c2w.float()
    decoder = TinyDecoder(dtype=torch.float32)

    def bf16_decoder(features, coordinates, directions):
        rgb, sigma = decoder(features.float(), coordinates, directions)
        return rgb.to(features.dtype), sigma.to(features.dtype)

    renderer = TriplaneRenderer(_cfg(), CameraConfig())
    full = renderer(planes, decoder, c2w, 6)
    low_planes = planes.bfloat16().requires_grad_(True)
    low = renderer(low_planes, bf16_decoder, c2w, 6)
    low["rgb"].sum().backward()
    assert low_planes.grad.dtype == torch.bfloat16
    for key in ("rgb", "depth", "weight_sum"):
        assert low[key].dtype == torch.float32  # compositing is never done in bf16
        # bf16 rounding of planes and decoder outputs only (ray geometry and lookups stay float32)
        torch.testing.assert_close(low[key], full[key], atol=3e-2, rtol=0)
