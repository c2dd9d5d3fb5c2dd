"""The fused renderer (renderer.impl=fused) against the reference path and independent checks.

Relative error of a tensor is ``max |fused - reference| / max |reference|``; the issue's bound is 1e-5
in float32. Every test draws fresh random planes, decoder weights (biases included) and rays from its
own seed.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from g3dr.config import DepthKernelConfig, ModelConfig, RendererConfig
from g3dr.models.decoder import TriplaneDecoder
from g3dr.render import camera_to_world_from_angles, rays_from_cameras, render_rays
from g3dr.render import fused
from g3dr.render.marching import composite_from_samples, depth_kernel_from_depths
from g3dr.render.renderer import render_rays_with
from g3dr.render.triplane import plane_axes_for_convention, planes_pyramid_from_planes

REPO = Path(__file__).resolve().parents[2]


def _scene(seed, *, batch=2, channels=8, hidden=16, res=16, image=6, dtype=torch.float32, lr_mul=1.0):
    gen = torch.Generator().manual_seed(seed)
    planes = torch.randn(batch, 3, channels, res, res, generator=gen, dtype=dtype).requires_grad_()
    torch.manual_seed(seed)
    decoder = TriplaneDecoder(ModelConfig(triplane_channels=channels, decoder_hidden=hidden, decoder_lr_mul=lr_mul))
    with torch.no_grad():
        for p in decoder.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    decoder = decoder.to(dtype)
    yaw = math.pi / 2 + (torch.rand(batch, generator=gen, dtype=torch.float64) - 0.5) * 0.6
    pitch = math.pi / 2 + (torch.rand(batch, generator=gen, dtype=torch.float64) - 0.5) * 0.4
    origins, directions = rays_from_cameras(camera_to_world_from_angles(yaw, pitch, 5.0).to(dtype), 18.0, image)
    prior = 4.6 + 0.8 * torch.rand(batch, origins.shape[1], 1, generator=gen, dtype=dtype)
    loss_weights = torch.randn(3, generator=gen, dtype=dtype)
    return planes, decoder, origins, directions, prior, loss_weights


def _render(impl, planes, decoder, origins, directions, cfg_kw, *, seed=1, **kw):
    cfg = RendererConfig(impl=impl, plane_resolutions=(planes.shape[-1], planes.shape[-1] // 2, planes.shape[-1] // 4),
                         **cfg_kw)
    gen = torch.Generator().manual_seed(seed)
    return render_rays(planes, decoder, origins, directions, cfg, generator=gen, **kw)


def _outputs_and_grads(result, planes, decoder, loss_weights):
    loss = (result.rgb * loss_weights).sum() + 0.3 * (result.depth ** 2).sum() + 2 * result.weight_sum.sum()
    grads = torch.autograd.grad(loss, [planes, *decoder.parameters()])
    names = ["rgb", "depth", "weight_sum", "median_depth", "grad.planes"]
    names += [f"grad.{n}" for n, _ in decoder.named_parameters()]
    values = [result.rgb, result.depth, result.weight_sum, result.median_depth, *grads]
    return dict(zip(names, [v.detach() for v in values], strict=True))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _compare(seed, cfg_kw, *, tol=1e-5, dtype=torch.float32, lr_mul=1.0, canonical=False, **render_kw):
    planes, decoder, origins, directions, prior, loss_weights = _scene(seed, dtype=dtype, lr_mul=lr_mul)
    if canonical:
        render_kw = dict(depth_prior=prior, use_depth_kernel=True, **render_kw)
    out = {impl: _outputs_and_grads(_render(impl, planes, decoder, origins, directions, cfg_kw, **render_kw),
                                    planes, decoder, loss_weights)
           for impl in ("fused", "reference")}
    errors = {name: _rel(out["fused"][name], ref) for name, ref in out["reference"].items()}
    assert max(errors.values()) <= tol, errors
    return out


@pytest.mark.parametrize("case", [
    dict(seed=10, cfg=dict()),
    dict(seed=11, cfg=dict(sigma_scale=50.0)),
    dict(seed=12, cfg=dict(), canonical=True),
    dict(seed=13, cfg=dict(sigma_scale=50.0), canonical=True),
    dict(seed=14, cfg=dict(plane_convention="orthogonal", sigma_scale=5.0), lr_mul=0.01),
    dict(seed=15, cfg=dict(depth_prior_p=1.0), canonical=True),
    dict(seed=16, cfg=dict(deterministic=True, num_coarse=5, num_fine=0)),
])
def test_fused_matches_reference_float32(case):
    """Outputs and gradients w.r.t. planes and all decoder parameters, importance or depth-prior fine
    samples, depth kernel on/off, sigma scale 1/5/50, both plane conventions, EG3D lr_mul scaling."""
    cfg = dict(num_coarse=8, num_fine=8)
    cfg.update(case["cfg"])
    _compare(case["seed"], cfg, canonical=case.get("canonical", False), lr_mul=case.get("lr_mul", 1.0))


def test_fused_matches_reference_float64_tightly():
    """In float64 the two paths agree to rounding: the hand-written backward is the same mathematics."""
    _compare(20, dict(num_coarse=8, num_fine=8, sigma_scale=50.0), tol=1e-11, dtype=torch.float64, canonical=True)


@pytest.mark.parametrize("case", [
    dict(seed=40, cfg=dict()),
    dict(seed=41, cfg=dict(sigma_scale=50.0, plane_convention="orthogonal")),
    dict(seed=42, cfg=dict(deterministic=True, sigma_scale=5.0)),
    dict(seed=43, cfg=dict(deterministic=True, num_coarse=5, num_fine=0), cut_quantile=0.3),
])
def test_fused_matches_reference_with_density_cut(case):
    """3DGP's density cut (an evaluation render, no gradient): both paths place the same fine samples and
    give the same outputs, ``depth_3dgp`` included, and the cut changes them."""
    planes, decoder, origins, directions, _, _ = _scene(case["seed"])
    cfg = dict(num_coarse=8, num_fine=8)
    cfg.update(case["cfg"])
    q = case.get("cut_quantile", 0.5)
    out = {impl: _render(impl, planes, decoder, origins, directions, cfg, cut_quantile=q)
           for impl in ("fused", "reference")}
    for name in ("rgb", "depth", "weight_sum", "median_depth", "depth_3dgp", "depths", "weights"):
        fused_value, ref_value = getattr(out["fused"], name), getattr(out["reference"], name)
        assert not fused_value.requires_grad and not ref_value.requires_grad, name
        assert _rel(fused_value, ref_value) <= 1e-5, (name, _rel(fused_value, ref_value))
    plain = _render("fused", planes, decoder, origins, directions, cfg)
    assert _rel(plain.depth_3dgp.detach(), out["fused"].depth_3dgp) > 1e-3


def test_fused_backward_refuses_the_density_cut():
    """``render_rays`` runs cut renders without grad; called directly with grad, the fused core's backward
    (which does not implement the cut) raises instead of returning wrong gradients."""
    planes, decoder, origins, directions, _, _ = _scene(44)
    cfg = RendererConfig(num_coarse=6, num_fine=6, plane_resolutions=(16, 8, 4))
    primitives = fused.FusedPrimitives(planes, decoder, cfg, plane_axes_for_convention("eg3d"))
    result = render_rays_with(primitives, origins, directions, cfg, cut_quantile=0.5)
    with pytest.raises(RuntimeError, match="density cut"):
        result.rgb.sum().backward()


def test_depth_kernel_changes_gradients_but_not_values():
    """The kernel must act in the fused backward (so the matching test above can fail)."""
    planes, decoder, origins, directions, prior, loss_weights = _scene(21)
    cfg = dict(num_coarse=8, num_fine=8)
    plain = _outputs_and_grads(_render("fused", planes, decoder, origins, directions, cfg, depth_prior=prior),
                               planes, decoder, loss_weights)
    kernel = _outputs_and_grads(_render("fused", planes, decoder, origins, directions, cfg, depth_prior=prior,
                                        use_depth_kernel=True), planes, decoder, loss_weights)
    assert torch.equal(plain["rgb"], kernel["rgb"]) and torch.equal(plain["depth"], kernel["depth"])
    assert _rel(kernel["grad.planes"], plain["grad.planes"]) > 1e-2


def test_explicit_depths_outside_the_box_and_chunking():
    """Samples beyond the box (zero padding of every plane) and any chunk size give the reference numbers."""
    planes, decoder, origins, directions, _, loss_weights = _scene(22)
    depths = torch.linspace(3.0, 7.5, 12).expand(*origins.shape[:2], 12)[..., None].contiguous()
    ref = _outputs_and_grads(_render("reference", planes, decoder, origins, directions, {}, sample_depths=depths),
                             planes, decoder, loss_weights)
    axes = plane_axes_for_convention("eg3d")
    cfg = RendererConfig(plane_resolutions=(16, 8, 4))
    for chunk in (5, 12 * 7, 10**6):  # less than a ray, several rays, everything
        primitives = fused.FusedPrimitives(planes, decoder, cfg, axes, samples_per_chunk=chunk)
        result = render_rays_with(primitives, origins, directions, cfg, sample_depths=depths)
        out = _outputs_and_grads(result, planes, decoder, loss_weights)
        for name, value in ref.items():
            assert _rel(out[name], value) <= 1e-5, (chunk, name)


def test_lookups_equal_grid_sample():
    """Table rows and weights reproduce grid_sample (bilinear, zeros, align_corners=False) at every level,
    including points far outside the planes and exactly on texel centres and edges."""
    gen = torch.Generator().manual_seed(23)
    planes = torch.randn(2, 3, 5, 8, 8, generator=gen, dtype=torch.float64)
    levels = planes_pyramid_from_planes(planes, (8, 4, 2))
    table = fused.table_from_levels(levels)
    points = torch.cat([torch.rand(200, 3, generator=gen, dtype=torch.float64) * 3 - 1.5,
                        torch.tensor([[-1.0, 1.0, 0.0], [0.0625, -0.9375, 1.0], [2.0, -2.0, 0.5]], dtype=torch.float64)])
    image = torch.randint(0, 2, (points.shape[0],), generator=gen)
    axes = plane_axes_for_convention("orthogonal")
    rows, weights = fused.rows_from_points(points, image, axes, table, box_warp=2.0)
    features = (table.table[rows.long()] * weights[..., None]).sum(1)
    expected = torch.zeros_like(features)
    for i, (p, b) in enumerate(zip(points, image.tolist(), strict=True)):
        for plane, (a0, a1) in enumerate(axes.tolist()):
            grid = torch.stack([p[a0], p[a1]]).view(1, 1, 1, 2)
            for level in levels:
                expected[i] += F.grid_sample(level[b, plane][None], grid, align_corners=False)[0, :, 0, 0] / 3
    torch.testing.assert_close(features, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("scales", [("alpha", "colour"), ("alpha",), ("colour",)])
def test_composite_backward_equals_autograd(scales):
    """The hand-written marcher backward against torch's autograd of composite_from_samples (float64),
    with the depth kernel (on both gradients, as the paper, or on one: ``depth_kernel.scales``), sigma scale
    and some opaque samples (alpha == 1)."""
    gen = torch.Generator().manual_seed(24)
    n, s = 7, 9
    outputs = torch.randn(n, s, 4, generator=gen, dtype=torch.float64)
    outputs[..., 1:] = torch.sigmoid(outputs[..., 1:])
    outputs[0, 3, 0] = 60.0  # opaque
    depths = torch.sort(4 + 2 * torch.rand(n, s, generator=gen, dtype=torch.float64), 1)[0]
    prior = 5 + torch.rand(1, n, 1, generator=gen, dtype=torch.float64)
    scale = depth_kernel_from_depths(((depths[:, 1:] + depths[:, :-1]) / 2)[None, ..., None], prior,
                                     DepthKernelConfig(scales=scales))
    grads = [torch.randn(n, k, generator=gen, dtype=torch.float64) for k in (3, 1, 1)]
    leaf = outputs.clone().requires_grad_()
    comp = composite_from_samples(leaf[None, ..., 1:], leaf[None, ..., :1], depths[None, ..., None],
                                  density_offset=-1.0, sigma_scale=50.0, grad_scale=scale)
    (expected,) = torch.autograd.grad([comp.rgb[0], comp.depth[0], comp.weight_sum[0]], leaf, grads)
    got = fused._composite_backward(outputs, depths, *grads, scale[0], -1.0, 50.0)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


def test_backward_keeps_no_per_sample_tensors():
    """What autograd saves for the fused path (table, MLP weights, pyramid buffers) does not grow with the
    number of samples; the reference path's does."""
    planes, decoder, origins, directions, _, _ = _scene(25, image=8)
    saved = {}
    for impl in ("fused", "reference"):
        for samples in (8, 32):
            total = 0

            def pack(t):
                nonlocal total
                total += t.numel()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                _render(impl, planes, decoder, origins, directions, dict(num_coarse=samples, num_fine=samples))
            saved[impl, samples] = total
    assert saved["fused", 8] == saved["fused", 32], saved
    assert saved["reference", 32] > saved["reference", 8] + 2 * 64 * 48 * 8, saved  # >= C numbers per extra sample


def test_decoder_without_mlp_weights_uses_reference(caplog):
    planes, decoder, origins, directions, _, _ = _scene(26)

    def plain_decoder(features, coordinates, dirs):
        return decoder(features, coordinates, dirs)

    logger = logging.getLogger("g3dr")
    old = logger.propagate
    logger.propagate = True
    try:
        with caplog.at_level(logging.INFO, logger="g3dr.render"):
            a = _render("fused", planes, plain_decoder, origins, directions, dict(num_coarse=6, num_fine=4))
    finally:
        logger.propagate = old
    b = _render("reference", planes, decoder, origins, directions, dict(num_coarse=6, num_fine=4))
    assert torch.equal(a.rgb, b.rgb)
    assert any("mlp_weights" in r.message for r in caplog.records)


def test_compiled_path_matches_reference(monkeypatch):
    """The torch.compile'd per-chunk math (used for large CPU renders) keeps the reference numbers."""
    monkeypatch.setattr(fused, "COMPILE_MIN_SAMPLES", 0)
    monkeypatch.setenv("G3DR_FUSED_COMPILE", "1")
    _compare(27, dict(num_coarse=8, num_fine=8, sigma_scale=50.0), canonical=True)
    assert not fused._compile_failed, "torch.compile failed here (see the warning log)"
    assert fused._compiled, "nothing was compiled"


TRITON_CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from g3dr.render.fused_triton import triton_available
    assert triton_available(), "interpreter not active"
    import importlib.util
    spec = importlib.util.spec_from_file_location("fused_test_child", {this!r})
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    mod.triton_check()
    print("TRITON-OK")
""")


def triton_check():
    """Run in a TRITON_INTERPRET=1 child: the Triton backend against the reference path."""
    from g3dr.render import fused as fused_module
    from g3dr.render.renderer import render_rays_with

    for seed, cfg_kw, canonical in ((30, dict(sigma_scale=50.0), True), (31, dict(plane_convention="orthogonal"), False)):
        planes, decoder, origins, directions, prior, loss_weights = _scene(seed, image=4, res=8)
        kw = dict(depth_prior=prior, use_depth_kernel=True) if canonical else {}
        cfg = RendererConfig(impl="fused", num_coarse=6, num_fine=6, plane_resolutions=(8, 4, 2), **cfg_kw)
        axes = plane_axes_for_convention(cfg.plane_convention)
        primitives = fused_module.FusedPrimitives(planes, decoder, cfg, axes, backend="triton", samples_per_chunk=40)
        triton_result = render_rays_with(primitives, origins, directions, cfg,
                                         generator=torch.Generator().manual_seed(1), **kw)
        got = _outputs_and_grads(triton_result, planes, decoder, loss_weights)
        ref = _outputs_and_grads(_render("reference", planes, decoder, origins, directions,
                                         dict(num_coarse=6, num_fine=6, **cfg_kw), **kw), planes, decoder, loss_weights)
        for name, value in ref.items():
            assert _rel(got[name], value) <= 1e-5, (seed, name, _rel(got[name], value))


def test_triton_kernels_in_interpreter():
    """The CUDA kernels run on the CPU under TRITON_INTERPRET=1 (a child process: the flag is read when
    triton compiles the kernels) and match the reference path."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", G3DR_FUSED_COMPILE="0")
    code = TRITON_CHILD.format(tests=str(REPO / "tests"), this=str(Path(__file__).resolve()))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "TRITON-OK" in proc.stdout, proc.stderr[-3000:]


def test_bfloat16_planes_and_decoder():
    """bf16 planes/decoder: the fused path computes in float32 (autocast off) and returns gradients in
    bf16; it stays within bf16 rounding of the reference path (whose decoder runs in bf16)."""
    planes, decoder, origins, directions, prior, loss_weights = _scene(28)
    planes = planes.detach().bfloat16().requires_grad_()
    decoder = decoder.bfloat16()
    cfg = dict(num_coarse=8, num_fine=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = {impl: _outputs_and_grads(_render(impl, planes, decoder, origins, directions, cfg, depth_prior=prior,
                                                use_depth_kernel=True), planes, decoder, loss_weights)
               for impl in ("fused", "reference")}
    assert out["fused"]["grad.planes"].dtype == torch.bfloat16
    assert out["fused"]["rgb"].dtype == torch.float32
    for name, ref in out["reference"].items():
        assert torch.isfinite(out["fused"][name]).all(), name
        assert _rel(out["fused"][name].float(), ref.float()) < 0.05, name


def test_backend_override(monkeypatch):
    monkeypatch.delenv("G3DR_FUSED_BACKEND", raising=False)
    planes = torch.zeros(1, 3, 2, 4, 4)
    assert fused._default_backend(planes) == "torch"  # CPU tensors
    monkeypatch.setenv("G3DR_FUSED_BACKEND", "triton")
    assert fused._default_backend(planes) == "triton"
    monkeypatch.setenv("G3DR_FUSED_BACKEND", "cuda")
    with pytest.raises(ValueError, match="G3DR_FUSED_BACKEND"):
        fused._default_backend(planes)
