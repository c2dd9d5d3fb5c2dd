"""FTrigen: the module the engine wraps - outputs, gradients, canonical/novel handling of the depth."""

from __future__ import annotations

import pytest
import torch

from g3dr.config import load_config
from g3dr.models import FTrigen
from g3dr.render import camera_to_world_from_angles


def inputs(batch=2, res=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rgb = torch.rand(batch, 3, res, res, generator=gen) * 2 - 1
    depth = 4 + 2 * torch.rand(batch, 1, res, res, generator=gen)
    cam2world = camera_to_world_from_angles(torch.full((batch,), 1.6), torch.full((batch,), 1.5), 5.0)
    return rgb, depth, cam2world


@pytest.fixture
def model(tiny_config_path):
    torch.manual_seed(0)
    return FTrigen(load_config(tiny_config_path, ["renderer.deterministic=true"]))


def test_outputs_and_gradients(model):
    rgb, depth, cam2world = inputs(batch=1)
    out = model(rgb, depth, cam2world, canonical=True)
    c = model.cfg.model.triplane_channels
    assert out["planes"].shape == (1, 3, c, 32, 32)
    assert out["rgb"].shape == (1, 3, 32, 32)
    for key in ("depth", "weight_sum", "median_depth"):
        assert out[key].shape == (1, 1, 32, 32), key
    assert out["rgb"].min() >= -1 and out["rgb"].max() <= 1
    (out["rgb"].square().mean() + out["depth"].mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert all(n.startswith(("generator.", "decoder.")) for n, _ in model.named_parameters())


def test_render_resolution_and_generator(model, tiny_config_path):
    rgb, depth, cam2world = inputs(batch=1)
    with torch.no_grad():
        out = model(rgb, depth, cam2world, canonical=False, resolution=16)
    assert out["rgb"].shape == (1, 3, 16, 16) and out["planes"].shape[-1] == 32
    stochastic = FTrigen(load_config(tiny_config_path))  # renderer.deterministic is false
    with torch.no_grad():
        a = stochastic(rgb, depth, cam2world, canonical=False, generator=torch.Generator().manual_seed(5))
        b = stochastic(rgb, depth, cam2world, canonical=False, generator=torch.Generator().manual_seed(5))
        c = stochastic(rgb, depth, cam2world, canonical=False, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a["rgb"], b["rgb"]) and not torch.equal(a["rgb"], c["rgb"])


def test_depth_reaches_the_renderer_only_in_canonical_views(model):
    """Deterministic mode: the depth prior acts through the depth kernel, which scales gradients only."""
    rgb, depth, cam2world = inputs(batch=1)
    grads, values = {}, {}
    for canonical in (True, False):
        model.zero_grad()
        out = model(rgb, depth, cam2world, canonical=canonical)
        out["rgb"].mean().backward()
        grads[canonical] = model.decoder.hidden.weight.grad.clone()
        values[canonical] = out["rgb"].detach()
    assert torch.equal(values[True], values[False])  # forward values unchanged by the kernel
    assert not torch.allclose(grads[True], grads[False])  # the kernel scaled the canonical gradients


def test_input_validation(model):
    rgb, depth, cam2world = inputs(batch=1)
    with pytest.raises(ValueError, match=r"rgb \(B, 3, H, W\) and depth \(B, 1, H, W\)"):
        model(torch.cat([rgb, depth], 1), depth, cam2world, canonical=False)
