"""The perceptual critic is LPIPS-VGG: equal to ``lpips.LPIPS(net='vgg')`` itself on the same random VGG16
backbone (values per layer and per layer set, gradients), wired with LPIPS's shipped weights, and clear errors
when the weight file is missing, altered or the package absent.

The random VGG16 is built once per module (``pnet_rand=True``: no torchvision download); the comparisons use a
few small images, as the full VGG16 is heavy on CPU.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings

import lpips  # a dependency (pyproject.toml); the library itself only reads its weight file
import pytest
import torch

import g3dr.losses.build as build_mod
import g3dr.losses.critics as critics_mod
from g3dr.config import load_config
from g3dr.errors import ConfigError, WeightsError
from g3dr.losses import build_critics
from g3dr.losses.critics import (LPIPS_VGG_CHANNELS, VggCritic, build_vgg_critic, build_vgg_features,
                                 load_lpips_vgg_weights, lpips_vgg_weights_file)

LAYER_SETS = [(1.0, 1.0, 1.0, 1.0, 1.0), (0.0, 0.0, 0.0, 1.0, 1.0)]  # reference canonical / novel view


@pytest.fixture(scope="module")
def lpips_pair():
    """(LPIPS's own module, our VGG16 features holding the same random backbone weights)."""
    from timm.models.vgg import VGG, cfgs

    torch.manual_seed(0)
    with warnings.catch_warnings():  # torchvision's note on the legacy ``pretrained=False`` that lpips passes
        warnings.simplefilter("ignore")
        ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    # timm's VGG16 features (the layout of loss.vgg_weights) without timm's large classifier head.
    features = VGG(cfgs["vgg16"], num_classes=0, mlp_ratio=1 / 512).features
    slices = [ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4, ref.net.slice5]
    copied = 0
    for part in slices:
        for index, module in part.named_children():  # LPIPS keeps torchvision's indices of vgg16().features
            features[int(index)].load_state_dict(module.state_dict())
            copied += sum(1 for _ in module.parameters())
    assert copied == 26  # 13 convolutions, weight and bias
    return ref, features


# Gradients for both layer sets at 64 px; at 128 px (the training size) for the novel-view set only, to keep the
# test to a few seconds of CPU (each VGG16 backward at 128 px costs about a second on one core).
@pytest.mark.parametrize("size,batch,grad_sets", [(64, 2, LAYER_SETS), (128, 1, LAYER_SETS[1:])])
def test_vgg_critic_is_lpips(lpips_pair, size, batch, grad_sets):
    ref, features = lpips_pair
    ours = build_vgg_critic(features, "lpips")
    gen = torch.Generator().manual_seed(size)
    x = torch.rand(batch, 3, size, size, generator=gen) * 2 - 1
    y = torch.rand(batch, 3, size, size, generator=gen) * 2 - 1
    x_ref = x.clone().requires_grad_(True)

    _, per_layer = ref(x_ref, y, retPerLayer=True)  # five (B, 1, 1, 1)
    want = torch.cat([d.reshape(batch, 1) for d in per_layer], dim=1)
    with torch.no_grad():
        got = ours.layer_distances(x, y)
    torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=0.0)

    for weights in LAYER_SETS:
        # The reference train.py: sum_l weight_l * retPerLayer[l].mean() (canonical: the plain LPIPS mean).
        want_total = sum(w * want[:, k].mean() for k, w in enumerate(weights))
        x_ours = x.clone().requires_grad_(weights in grad_sets)
        got_total = ours(x_ours, y, weights)
        torch.testing.assert_close(got_total.detach(), want_total.detach(), rtol=1e-6, atol=0.0)
        if weights in grad_sets:
            (grad_want,) = torch.autograd.grad(want_total, x_ref, retain_graph=True)
            (grad_got,) = torch.autograd.grad(got_total, x_ours)
            assert grad_want.abs().max() > 0
            torch.testing.assert_close(grad_got, grad_want, rtol=1e-5, atol=1e-6 * grad_want.abs().max().item())


def test_build_critics_wires_lpips_weights_and_keeps_them_fp32(lpips_pair, monkeypatch):
    """``loss.critics=pretrained`` builds the VGG critic with LPIPS's weights (fp32 even when the backbone is bf16);
    ``loss.perceptual_weights=uniform`` with unit weights. The weight files are replaced by in-memory models."""
    ref, features = lpips_pair
    tiny_clip = build_critics(load_config("configs/tiny.yaml").loss).clip.model
    monkeypatch.setattr(build_mod, "require_weight_file", lambda path, key, howto: path)
    monkeypatch.setattr(build_mod, "build_clip_model", lambda name, weights, overrides=None: copy.deepcopy(tiny_clip))
    monkeypatch.setattr(build_mod, "build_vgg_features", lambda name, weights, layers=None: copy.deepcopy(features))
    cfg = load_config("configs/tiny.yaml", ["loss.critics=pretrained"])
    assert cfg.loss.perceptual_weights == "lpips"  # the default
    vgg = build_critics(cfg.loss, dtype=torch.bfloat16).vgg
    assert next(vgg.features.parameters()).dtype == torch.bfloat16
    for k, lin in enumerate(ref.lins):
        assert vgg.channel_weight(k).dtype == torch.float32
        assert torch.equal(vgg.channel_weight(k), lin.model[-1].weight)
    assert torch.equal(vgg.shift, ref.scaling_layer.shift) and torch.equal(vgg.scale, ref.scaling_layer.scale)
    uniform = build_critics(load_config("configs/tiny.yaml", ["loss.critics=pretrained",
                                                               "loss.perceptual_weights=uniform"]).loss).vgg
    assert all(torch.equal(uniform.channel_weight(k), torch.ones(1, c, 1, 1))
               for k, c in enumerate(LPIPS_VGG_CHANNELS))
    # The tiny random critic has no LPIPS weights (other channel counts): unit weights.
    tiny = build_critics(load_config("configs/tiny.yaml").loss).vgg
    assert all(torch.equal(tiny.channel_weight(k), torch.ones_like(tiny.channel_weight(k)))
               for k in range(tiny.num_layers))


def test_lpips_weight_file_errors(tmp_path, monkeypatch):
    shipped = lpips_vgg_weights_file()
    weights = load_lpips_vgg_weights()
    assert [tuple(w.shape) for w in weights] == [(c,) for c in LPIPS_VGG_CHANNELS]
    assert all(bool((w >= 0).all()) and w.max() > 0 for w in weights)

    with pytest.raises(WeightsError, match=r"LPIPS VGG weights .*nope\.pth: cannot read.*pip install"):
        load_lpips_vgg_weights(tmp_path / "nope.pth")
    state = torch.load(shipped, map_location="cpu", weights_only=True)
    del state["lin4.model.1.weight"]
    torch.save(state, tmp_path / "vgg.pth")
    with pytest.raises(WeightsError, match=r"vgg\.pth: sha256 [0-9a-f]{64} is not that of LPIPS v0\.1.*lpips-vgg-v0\.1"):
        load_lpips_vgg_weights(tmp_path / "vgg.pth")

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lpips" else real_find_spec(name, *a))
    with pytest.raises(WeightsError, match=r"lpips package is not installed.*weights/v0\.1/vgg\.pth.*pip install"):
        build_vgg_critic(torch.nn.Sequential(), "lpips")


def test_lpips_weights_fit_vgg16_only():
    tiny = build_vgg_features("vgg16", None, critics_mod.TINY_VGG_LAYERS)
    with pytest.raises(ValueError, match=r"layer 0 have 64 entries, the layer has 8 channels"):
        VggCritic(tiny, load_lpips_vgg_weights())
    with pytest.raises(ValueError, match=r"negative"):
        VggCritic(tiny, [-torch.ones(c) for c in (8, 16, 16, 16, 16)])
    with pytest.raises(ConfigError, match=r"perceptual_weights.*vgg_model=vgg16.*'vgg11'"):
        load_config("configs/tiny.yaml", ["loss.vgg_model=vgg11"])
    assert load_config("configs/tiny.yaml", ["loss.vgg_model=vgg11", "loss.perceptual_weights=uniform"])

