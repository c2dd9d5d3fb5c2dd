"""Ray marcher values and gradients, the depth kernel's gradient scaling, median depth."""

from __future__ import annotations


import pytest
import torch

from g3dr.config import DepthKernelConfig
from g3dr.render.marching import (
    ScaleGradient,
    composite_from_samples,
    depth_kernel_from_depths,
    median_depth_from_weights,
)
from g3dr_test_support import load_test_helper


def _reference():
    return load_test_helper("render_reference")


ref = _reference()
F64 = torch.float64


def _samples(batch=2, rays=3, samples=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    colors = torch.rand(batch, rays, samples, 3, generator=gen, dtype=F64)
    raw = torch.randn(batch, rays, samples, 1, generator=gen, dtype=F64) * 2 + 1
    depths = torch.sort(4 + 2 * torch.rand(batch, rays, samples, 1, generator=gen, dtype=F64), dim=2).values
    return colors, raw, depths


def test_values_match_reference():
    colors, raw, depths = _samples()
    for sigma_scale in (1.0, 5.0):
        out = composite_from_samples(colors, raw, depths, sigma_scale=sigma_scale)
        for b in range(2):
            for r in range(3):
                rgb, depth, wsum, w, mids = ref.march(colors[b, r], raw[b, r, :, 0], depths[b, r, :, 0], sigma_scale=sigma_scale)
                torch.testing.assert_close(out.rgb[b, r], rgb, atol=1e-12, rtol=0)
                torch.testing.assert_close(out.depth[b, r, 0], depth, atol=1e-12, rtol=0)
                torch.testing.assert_close(out.weight_sum[b, r, 0], wsum, atol=1e-12, rtol=0)
                torch.testing.assert_close(out.weights[b, r, :, 0], w, atol=1e-12, rtol=0)
                torch.testing.assert_close(out.depths_mid[b, r, :, 0], mids, atol=1e-12, rtol=0)


def test_empty_space_renders_black():
    colors, _, depths = _samples(1, 2, 5)
    out = composite_from_samples(colors, torch.full((1, 2, 5, 1), -60.0, dtype=F64), depths)
    torch.testing.assert_close(out.rgb, -torch.ones(1, 2, 3, dtype=F64), atol=1e-12, rtol=0)
    assert float(out.weight_sum.max()) < 1e-20


def test_gradcheck():
    colors, raw, depths = _samples(1, 2, 5)
    colors.requires_grad_(True)
    raw.requires_grad_(True)
    depths.requires_grad_(True)

    def fn(c, s, t):
        out = composite_from_samples(c, s, t, sigma_scale=2.0)
        return out.rgb, out.depth, out.weight_sum

    assert torch.autograd.gradcheck(fn, (colors, raw, depths))


def _grads(colors, raw, depths, weight_rgb, weight_depth, grad_scale):
    c, s = colors.clone().requires_grad_(True), raw.clone().requires_grad_(True)
    out = composite_from_samples(c, s, depths, grad_scale=grad_scale)
    ((out.rgb * weight_rgb).sum() + (out.depth * weight_depth).sum()).backward()
    return out, c.grad, s.grad


def test_gradient_scale_is_exactly_k_times_unscaled():
    colors, raw, depths = _samples()
    gen = torch.Generator().manual_seed(9)
    g_rgb, g_depth = torch.randn(2, 3, 3, generator=gen, dtype=F64), torch.randn(2, 3, 1, generator=gen, dtype=F64)
    # constant k per ray: every gradient into colours and densities is k x the unscaled one
    k_ray = torch.rand(2, 3, 1, 1, generator=gen, dtype=F64) + 0.05
    plain, gc, gs = _grads(colors, raw, depths, g_rgb, g_depth, None)
    scaled, gc_k, gs_k = _grads(colors, raw, depths, g_rgb, g_depth, k_ray.expand(2, 3, 6, 1))
    assert torch.equal(plain.rgb, scaled.rgb) and torch.equal(plain.depth, scaled.depth)  # forward unchanged
    torch.testing.assert_close(gc_k, gc * k_ray, atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(gs_k, gs * k_ray, atol=1e-14, rtol=1e-12)


def test_per_interval_gradient_scale_matches_hook_reference():
    colors, raw, depths = _samples(1, 2, 6)
    k = torch.rand(1, 2, 5, 1, generator=torch.Generator().manual_seed(3), dtype=F64) * 0.95 + 0.05
    g_rgb = torch.randn(1, 2, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    _, gc, gs = _grads(colors, raw, depths, g_rgb, torch.zeros(1, 2, 1, dtype=F64), k)
    for r in range(2):
        c = colors[0, r].clone().requires_grad_(True)
        s = raw[0, r, :, 0].clone().requires_grad_(True)
        rgb, *_ = ref.march(c, s, depths[0, r, :, 0], grad_scale=k[0, r, :, 0])
        (rgb * g_rgb[0, r]).sum().backward()
        torch.testing.assert_close(gc[0, r], c.grad, atol=1e-12, rtol=0)
        torch.testing.assert_close(gs[0, r, :, 0], s.grad, atol=1e-12, rtol=0)


def test_scale_gradient_function():
    a = torch.randn(2, 4, 1, dtype=F64, requires_grad=True)
    c = torch.randn(2, 4, 3, dtype=F64, requires_grad=True)
    k = torch.rand(2, 4, 1, dtype=F64)
    k2 = torch.rand(2, 4, 1, dtype=F64)
    a2, c2 = ScaleGradient.apply(a, c, k, k2)
    assert torch.equal(a2, a) and torch.equal(c2, c)
    ga, gc = torch.randn_like(a), torch.randn_like(c)
    torch.autograd.backward([a2, c2], [ga, gc])
    torch.testing.assert_close(a.grad, ga * k, atol=0, rtol=0)
    torch.testing.assert_close(c.grad, gc * k2, atol=0, rtol=0)


@pytest.mark.parametrize("scales", [("alpha",), ("colour",)])
def test_depth_kernel_on_one_gradient_only(scales):
    """``depth_kernel.scales`` = alpha or colour alone: the marcher's backward is linear and separable (the
    density gradients flow through alpha only, the colour gradients through the colours only), so the one
    scaled must equal the paper kernel's gradient and the other the gradient without a kernel."""
    colors, raw, depths = _samples(2, 3, 9, seed=8)
    prior = 4.5 + torch.rand(2, 3, 1, generator=torch.Generator().manual_seed(9), dtype=F64)
    mids = (depths[:, :, 1:] + depths[:, :, :-1]) / 2
    paper = depth_kernel_from_depths(mids, prior, DepthKernelConfig())
    split = depth_kernel_from_depths(mids, prior, DepthKernelConfig(scales=scales))
    assert paper.shape[-1] == 1 and split.shape[-1] == 2
    ones = torch.ones_like(paper)
    torch.testing.assert_close(split, torch.cat([paper, ones] if scales == ("alpha",) else [ones, paper], -1),
                               atol=0, rtol=0)
    g_rgb = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(10), dtype=F64)
    g_depth = torch.randn(2, 3, 1, generator=torch.Generator().manual_seed(11), dtype=F64)

    def grads(scale):
        c, s = colors.clone().requires_grad_(True), raw.clone().requires_grad_(True)
        out = composite_from_samples(c, s, depths, grad_scale=scale)
        torch.autograd.backward([out.rgb, out.depth], [g_rgb, g_depth])
        return c.grad, s.grad

    got_colour, got_density = grads(split)
    kernel_colour, kernel_density = grads(paper)
    free_colour, free_density = grads(None)
    want_density, want_colour = ((kernel_density, free_colour) if scales == ("alpha",) else (free_density, kernel_colour))
    torch.testing.assert_close(got_density, want_density, atol=1e-14, rtol=0)
    torch.testing.assert_close(got_colour, want_colour, atol=1e-14, rtol=0)
    assert not torch.allclose(kernel_density, free_density) and not torch.allclose(kernel_colour, free_colour)


def test_depth_kernel_scales_config_is_checked():
    from g3dr.errors import ConfigError

    for bad in ((), ("alpha", "alpha"), ("density",)):
        with pytest.raises((ConfigError, ValueError), match="must name alpha, colour or both"):
            DepthKernelConfig(scales=bad)


def test_depth_kernel_values():
    cfg = DepthKernelConfig()
    mids = torch.tensor([[[[5.0], [5.1], [5.3], [6.0]]]], dtype=F64)
    k = depth_kernel_from_depths(mids, torch.tensor([[[5.0]]], dtype=F64), cfg)
    expected = [min(1.0, max(0.05, 1.25 * torch.exp(torch.tensor(-(t - 5.0) ** 2 / 0.03)).item())) for t in (5.0, 5.1, 5.3, 6.0)]
    torch.testing.assert_close(k[0, 0, :, 0], torch.tensor(expected, dtype=F64))
    assert float(k[0, 0, 0, 0]) == 1.0 and float(k[0, 0, 3, 0]) == 0.05


def test_median_depth_matches_reference():
    colors, raw, depths = _samples(2, 4, 9, seed=5)
    raw[0, 0] = -60.0  # an empty ray: the far end
    out = composite_from_samples(colors, raw, depths)
    median = median_depth_from_weights(out.weights, out.depths_mid)
    assert median.shape == (2, 4, 1)
    for b in range(2):
        for r in range(4):
            assert float(median[b, r, 0]) == ref.median_depth(out.weights[b, r, :, 0], out.depths_mid[b, r, :, 0])
    assert float(median[0, 0, 0]) == float(out.depths_mid[0, 0, -1, 0])
