"""TriplaneGenerator and TriplaneDecoder: shapes, the paper's parameter count, and equality with an
independent functional evaluation of the reference network (tests/helpers/reference_unet.py)."""

from __future__ import annotations

import math

import pytest
import torch

from g3dr.config import load_config
from g3dr.models.decoder import (SOFTPLUS_THRESHOLD, TriplaneDecoder, hidden_from_pre, logits_grad_from_rgb_grad,
                                 pre_grad_from_hidden_grad, rgb_from_logits)
from g3dr.models.reference_import import convert_reference_state_dict, reference_key_to_ours
from g3dr.models.unet import TriplaneGenerator
from g3dr_test_support import load_test_helper


def load_helper(name: str):
    return load_test_helper(name)


ref = load_helper("reference_unet")

# The reference network with the tiny widths, the reference's two ResNet blocks per level, at 16x16.
SMALL = ["model.num_res_blocks=2"]
RES = 16


def small_cfg(tiny_config_path, extra=()):
    return load_config(tiny_config_path, [*SMALL, *extra])


def small_layout(cfg):
    m = cfg.model
    return ref.reference_layout(dim=m.base_width, dim_mults=m.channel_mults, image_size=RES,
                                pos_channels=m.pos_emb_channels, feature_dim=m.triplane_channels,
                                heads=m.attn_heads, dim_head=m.attn_head_dim, decoder_hidden=m.decoder_hidden)


def our_state(cfg, resolution=RES):
    gen = TriplaneGenerator(cfg.model, resolution=resolution)
    dec = TriplaneDecoder(cfg.model)
    state = {f"generator.{k}": v for k, v in gen.state_dict().items()}
    state.update({f"decoder.{k}": v for k, v in dec.state_dict().items()})
    return gen, dec, state


def test_tiny_generator_output_shape(tiny_config_path):
    cfg = load_config(tiny_config_path)
    gen = TriplaneGenerator(cfg.model, resolution=cfg.data.resolution)
    planes = gen(torch.randn(2, 4, 32, 32))
    assert planes.shape == (2, 3, cfg.model.triplane_channels, 32, 32)
    assert torch.isfinite(planes).all()
    planes.square().mean().backward()
    assert all(p.grad is not None for p in gen.parameters())


def test_generator_rejects_wrong_input(tiny_config_path):
    cfg = load_config(tiny_config_path)
    gen = TriplaneGenerator(cfg.model, resolution=32)
    with pytest.raises(ValueError, match="positional embedding"):
        gen(torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 4, 32, 32\)"):
        gen(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="divisible"):
        TriplaneGenerator(cfg.model, resolution=33)


def test_paper_configuration_shapes_and_parameter_count():
    cfg = load_config(None)  # built-in defaults = the paper configuration
    assert (cfg.model.base_width, tuple(cfg.model.channel_mults), cfg.data.resolution) == (128, (1, 2, 4, 8), 128)
    with torch.device("meta"):
        gen = TriplaneGenerator(cfg.model, resolution=128)
        dec = TriplaneDecoder(cfg.model)
        planes = gen(torch.empty(2, 4, 128, 128))
    assert planes.shape == (2, 3, 64, 128, 128)
    layout = ref.reference_layout()  # the reference's own defaults: dim 128, mults (1,2,4,8), 256 pos channels
    expected = sum(math.prod(s) for s in layout.values())
    ours = sum(p.numel() for p in gen.parameters()) + sum(p.numel() for p in dec.parameters())
    assert ours == expected
    assert expected == 147_406_212  # 147,401,792 in the U-Net + 4,420 in the decoder MLP


def test_paper_configuration_names_map_one_to_one():
    cfg = load_config(None)
    with torch.device("meta"):
        _, _, state = our_state(cfg, resolution=128)
    layout = ref.reference_layout()
    mapped = {}
    for name, shape in layout.items():
        ours = reference_key_to_ours(name)
        assert ours in state, f"{name} -> {ours}"
        assert tuple(state[ours].shape) == shape, name
        mapped[ours] = name
    assert set(mapped) == set(state)  # bijective: nothing of ours is left without a reference tensor


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_generator_equals_reference_network(tiny_config_path, dtype, tol):
    cfg = small_cfg(tiny_config_path)
    gen, _, state = our_state(cfg)
    reference = ref.random_reference_state(small_layout(cfg), seed=1, dtype=dtype)
    # A wrapper prefix, as the reference's accelerate-wrapped model saves it.
    converted = convert_reference_state_dict({f"module.{k}": v for k, v in reference.items()}, state)
    gen.to(dtype).load_state_dict({k[len("generator."):]: v for k, v in converted.items()
                                   if k.startswith("generator.")})
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2), dtype=dtype)
    x[:, 3] = 4 + 2 * torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(3), dtype=dtype)
    with torch.no_grad():
        ours = gen(x)
        expected = ref.reference_unet_forward(reference, x, cfg.model.channel_mults, heads=cfg.model.attn_heads,
                                              groups=cfg.model.norm_groups)
    assert ours.shape == expected.shape == (2, 3, cfg.model.triplane_channels, 16, 16)
    assert expected.std() > 0.1  # the comparison is not between near-constants
    torch.testing.assert_close(ours, expected, rtol=0, atol=tol * max(1.0, expected.abs().max().item()))


def test_generator_single_change_is_detected(tiny_config_path):
    """The reference comparison is sensitive: perturbing one reference tensor after conversion breaks it."""
    cfg = small_cfg(tiny_config_path)
    gen, _, state = our_state(cfg)
    reference = ref.random_reference_state(small_layout(cfg), seed=1)
    converted = convert_reference_state_dict(reference, state)
    gen.double().load_state_dict({k[len("generator."):]: v for k, v in converted.items() if k.startswith("generator.")})
    x = torch.randn(1, 4, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    reference["ups.0.2.fn.fn.to_out.1.g"] = reference["ups.0.2.fn.fn.to_out.1.g"] * 1.01
    with torch.no_grad():
        diff = (gen(x) - ref.reference_unet_forward(reference, x, cfg.model.channel_mults,
                                                     heads=cfg.model.attn_heads, groups=cfg.model.norm_groups)).abs()
    assert diff.max() > 1e-4


def test_decoder_equals_reference(tiny_config_path):
    for lr_mul in (1.0, 0.25):
        cfg = load_config(tiny_config_path, [f"model.decoder_lr_mul={lr_mul}"])
        dec = TriplaneDecoder(cfg.model).double()
        layout = small_layout(cfg)
        reference = ref.random_reference_state({k: v for k, v in layout.items() if k.startswith("decoder.")}, seed=5)
        dec.load_state_dict({"hidden.weight": reference["decoder.net.0.weight"],
                             "hidden.bias": reference["decoder.net.0.bias"],
                             "out.weight": reference["decoder.net.2.weight"],
                             "out.bias": reference["decoder.net.2.bias"]})
        feats = 2 * torch.randn(2, 50, cfg.model.triplane_channels, dtype=torch.float64)
        rgb, sigma = dec(feats, torch.rand(2, 50, 3), torch.rand(2, 50, 3))
        rgb_ref, sigma_ref = ref.reference_decoder_forward(reference, feats, lr_mul=lr_mul)
        torch.testing.assert_close(rgb, rgb_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(sigma, sigma_ref, rtol=0, atol=1e-12)
        assert rgb.shape == (2, 50, 3) and sigma.shape == (2, 50, 1)
        assert rgb.min() >= -1e-3 and rgb.max() <= 1 + 1e-3


def test_decoder_ignores_coordinates_and_directions(tiny_config_path):
    cfg = load_config(tiny_config_path)
    dec = TriplaneDecoder(cfg.model)
    feats = torch.randn(1, 7, cfg.model.triplane_channels)
    a = dec(feats, torch.rand(1, 7, 3), torch.rand(1, 7, 3))
    b = dec(feats, None, None)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="features must be"):
        dec(torch.randn(7, cfg.model.triplane_channels))


def test_decoder_activation_backwards_equal_autograd():
    """The hand-written backward of the activations (used by the fused renderer) is autograd's, in float64,
    on both sides of softplus's threshold."""
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([6 * torch.randn(200, generator=gen, dtype=torch.float64),
                   torch.tensor([SOFTPLUS_THRESHOLD - 0.5, SOFTPLUS_THRESHOLD + 0.5, 40.0], dtype=torch.float64)])
    grad = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    for forward, backward in ((hidden_from_pre, pre_grad_from_hidden_grad), (rgb_from_logits, logits_grad_from_rgb_grad)):
        leaf = x.clone().requires_grad_()
        (expected,) = torch.autograd.grad(forward(leaf), leaf, grad)
        torch.testing.assert_close(backward(grad, x), expected, rtol=1e-14, atol=0)
    assert torch.equal(hidden_from_pre(x), torch.nn.functional.softplus(x))


def test_decoder_init_follows_eg3d(tiny_config_path):
    cfg = load_config(None, ["model.decoder_lr_mul=0.5"])
    torch.manual_seed(0)
    dec = TriplaneDecoder(cfg.model)
    # stored weights ~ N(0, 1) / lr_mul, biases zero
    assert abs(dec.hidden.weight.std().item() * 0.5 - 1.0) < 0.05
    assert torch.count_nonzero(dec.hidden.bias) == 0 and torch.count_nonzero(dec.out.bias) == 0
