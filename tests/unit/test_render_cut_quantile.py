"""3DGP's density cut (``cut_quantile``) and depth ``sum(w t)``: the marcher and whole renders of a tiny f_trigen
against the float64 reference of 3DGP's formulas (tests/helpers/nfs_reference.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from g3dr.config import load_config
from g3dr.render import camera_to_world_from_angles, rays_from_cameras, render_rays
from g3dr.render.marching import composite_from_samples, quantile_per_image
from g3dr.render.triplane import PLANE_AXES
from g3dr_test_support import load_test_helper

nfs_ref = load_test_helper("nfs_reference")
F64 = torch.float64


def _samples(batch=2, rays=5, samples=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    colors = torch.rand(batch, rays, samples, 3, generator=gen, dtype=F64)
    raw = torch.randn(batch, rays, samples, 1, generator=gen, dtype=F64) * 2 + 1
    raw[1] += 3.0  # the second image is much denser: a quantile over the batch would cut it differently
    depths = torch.sort(4 + 2 * torch.rand(batch, rays, samples, 1, generator=gen, dtype=F64), dim=2).values
    return colors, raw, depths


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_quantile_per_image_is_torch_quantile(dtype):
    gen = torch.Generator().manual_seed(1)
    for n in (1, 2, 7, 64, 1000):
        values = torch.randn(3, n, generator=gen, dtype=F64).to(dtype)
        for q in (0.0, 0.5, 0.25, 0.9, 1.0):
            got = quantile_per_image(values, q)
            expected = torch.stack([torch.quantile(v, q) for v in values])
            if q in (0.0, 0.5, 1.0):  # interpolation weights 0 or 1/2: exactly torch's numbers
                assert torch.equal(got, expected), (n, q)
            else:  # torch computes the position q (n - 1) in the values' dtype
                torch.testing.assert_close(got, expected, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    # (B, R, S, 1) input: one quantile per batch element over everything else
    x = torch.randn(2, 4, 5, 1, generator=gen, dtype=dtype)
    assert torch.equal(quantile_per_image(x, 0.5), torch.stack([torch.quantile(x[b].flatten(), 0.5) for b in range(2)]))
    with pytest.raises(ValueError, match="q must be in"):
        quantile_per_image(x, 1.5)


@pytest.mark.parametrize("cut_quantile,sigma_scale", [(0.5, 1.0), (0.5, 5.0), (0.3, 1.0), (0.0, 5.0)])
def test_composite_matches_3dgp_marcher(cut_quantile, sigma_scale):
    colors, raw, depths = _samples()
    out = composite_from_samples(colors, raw, depths, sigma_scale=sigma_scale, cut_quantile=cut_quantile)
    for b in range(2):
        ref = nfs_ref.march_image(colors[b], raw[b, ..., 0], depths[b, ..., 0], density_bias=-1.0,
                                  sigma_scale=sigma_scale, cut_quantile=cut_quantile)
        if cut_quantile > 0:  # the cut zeroes about that fraction of the image's densities
            zeroed = int((ref["sigma"] == 0).sum())
            assert abs(zeroed - cut_quantile * ref["sigma"].numel()) <= 1, zeroed
        torch.testing.assert_close(out.depth_3dgp[b, :, 0], ref["depth"], atol=1e-12, rtol=0)
        torch.testing.assert_close(out.weights[b, ..., 0], ref["weights"], atol=1e-12, rtol=0)
        torch.testing.assert_close(out.weight_sum[b, :, 0], ref["weight_sum"], atol=1e-12, rtol=0)
        torch.testing.assert_close(out.rgb[b], ref["rgb"], atol=1e-12, rtol=0)
    # ``depth`` keeps its meaning: the same weights, divided by their sum
    torch.testing.assert_close(out.depth, out.depth_3dgp / (out.weight_sum + 1e-3), atol=1e-14, rtol=0)
    if cut_quantile > 0:  # the cut changes the render (so the comparison above can fail without it)
        plain = composite_from_samples(colors, raw, depths, sigma_scale=sigma_scale)
        assert not torch.allclose(plain.depth_3dgp, out.depth_3dgp, atol=1e-3)


def test_cut_off_is_the_plain_marcher_and_bad_quantiles_are_errors():
    colors, raw, depths = _samples()
    plain = composite_from_samples(colors, raw, depths)
    off = composite_from_samples(colors, raw, depths, cut_quantile=0.0)
    for field in dataclasses.fields(plain):
        assert torch.equal(getattr(plain, field.name), getattr(off, field.name)), field.name
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="cut_quantile"):
            composite_from_samples(colors, raw, depths, cut_quantile=bad)


# ------------------------------------------------------------------ whole renders of a tiny f_trigen


@pytest.fixture(scope="module")
def tiny_f_trigen(repo_root):
    """The perturbed tiny f_trigen in float64, its triplanes of two random RGB-D inputs, and rays of a
    canonical and a novel 6 x 6 view."""
    cfg = load_config(repo_root / "configs" / "tiny.yaml")
    model = load_test_helper("tiny_models").perturbed_f_trigen(cfg).double().eval()
    gen = torch.Generator().manual_seed(3)
    rgb = torch.rand(2, 3, 32, 32, generator=gen, dtype=F64) * 2 - 1
    depth = 4.5 + torch.rand(2, 1, 32, 32, generator=gen, dtype=F64)
    with torch.no_grad():
        planes = model.make_planes(rgb, depth)
    c2w = camera_to_world_from_angles(torch.tensor([math.pi / 2, math.pi / 2 + 0.3], dtype=F64),
                                      torch.tensor([math.pi / 2, math.pi / 2 - 0.1], dtype=F64), cfg.camera.radius)
    origins, directions = rays_from_cameras(c2w, cfg.camera.fov_degrees, 6)
    return cfg, model, planes, origins, directions


def _reference_render(cfg, model, planes, origins, directions, sigma_scale, cut_quantile):
    """nfs_reference.render_image per image, decoding with the reference's bilinear triplane lookups."""
    rc = cfg.renderer
    return [nfs_ref.render_image(nfs_ref.decoder_on_triplane(planes[b], model.decoder, rc.plane_resolutions,
                                                             PLANE_AXES[rc.plane_convention], rc.box_warp),
                                 origins[b], directions[b], num_coarse=rc.num_coarse, num_fine=rc.num_fine,
                                 box_warp=rc.box_warp, density_bias=rc.density_offset, sigma_scale=sigma_scale,
                                 cut_quantile=cut_quantile)
            for b in range(planes.shape[0])]


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_cut_render_of_tiny_f_trigen_matches_3dgp_reference(tiny_f_trigen, impl):
    """Deterministic render with the cut: the coarse pass with the cut places the fine samples, the final pass
    cuts again; sample depths, 3DGP depth, rgb and opacity equal the float64 reference."""
    cfg, model, planes, origins, directions = tiny_f_trigen
    sigma_scale, q = 5.0, 0.5
    rcfg = dataclasses.replace(cfg.renderer, impl=impl, deterministic=True, sigma_scale=sigma_scale)
    planes = planes.clone().requires_grad_(True)
    got = render_rays(planes, model.decoder, origins, directions, rcfg, cut_quantile=q)
    assert not got.depth_3dgp.requires_grad and not got.rgb.requires_grad  # an evaluation render
    refs = _reference_render(cfg, model, planes.detach(), origins, directions, sigma_scale, q)
    for b, ref in enumerate(refs):
        torch.testing.assert_close(got.depths[b, :, :, 0], ref["depths"], atol=1e-9, rtol=0)
        torch.testing.assert_close(got.depth_3dgp[b, :, 0], ref["depth"], atol=1e-9, rtol=0)
        torch.testing.assert_close(got.rgb[b], ref["rgb"], atol=1e-9, rtol=0)
        torch.testing.assert_close(got.weight_sum[b, :, 0], ref["weight_sum"], atol=1e-9, rtol=0)
    # the scene is one where the cut matters: without it the fine samples and the depth differ
    plain = render_rays(planes.detach(), model.decoder, origins, directions, rcfg)
    assert (plain.depths - got.depths).abs().max() > 1e-2
    assert (plain.depth_3dgp - got.depth_3dgp).abs().max() > 1e-2


def test_uncut_render_depth_3dgp_matches_reference(tiny_f_trigen):
    """Without the cut, ``depth_3dgp`` is 3DGP's plain marcher depth ``sum(w t)`` of the ordinary render."""
    cfg, model, planes, origins, directions = tiny_f_trigen
    rcfg = dataclasses.replace(cfg.renderer, deterministic=True)
    got = render_rays(planes, model.decoder, origins, directions, rcfg)
    refs = _reference_render(cfg, model, planes, origins, directions, 1.0, 0.0)
    for b, ref in enumerate(refs):
        torch.testing.assert_close(got.depth_3dgp[b, :, 0], ref["depth"], atol=1e-9, rtol=0)
        torch.testing.assert_close(got.depths[b, :, :, 0], ref["depths"], atol=1e-9, rtol=0)


def test_cut_is_per_image_and_render_rejects_bad_quantiles(tiny_f_trigen):
    """An image's cut render does not depend on the other images of the batch."""
    cfg, model, planes, origins, directions = tiny_f_trigen
    rcfg = dataclasses.replace(cfg.renderer, deterministic=True, sigma_scale=5.0)
    both = render_rays(planes, model.decoder, origins, directions, rcfg, cut_quantile=0.5)
    for b in range(2):
        alone = render_rays(planes[b:b + 1], model.decoder, origins[b:b + 1], directions[b:b + 1], rcfg, cut_quantile=0.5)
        torch.testing.assert_close(alone.depth_3dgp[0], both.depth_3dgp[b], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="cut_quantile"):
        render_rays(planes, model.decoder, origins, directions, rcfg, cut_quantile=1.0)
