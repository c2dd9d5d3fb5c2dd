"""Loss terms against hand-computed values; frozen critics against independent slow references; weight loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from g3dr.config import load_config
from g3dr.errors import WeightsError
from g3dr.losses import build_critics, depth_l1_loss, l1_loss, tv_loss, weight_sum_loss
from g3dr.losses.critics import (CLIP_MEAN, CLIP_STD, TINY_CLIP_OVERRIDES, ClipCritic, VggCritic,
                                 build_clip_model, build_vgg_features)


def test_pixel_terms_hand_computed():
    img = torch.tensor([[[[0.0, 1.0], [3.0, 5.0]]]])
    # horizontal diffs 1, 2 -> mean sq (1 + 4) / 2 = 2.5; vertical diffs 3, 4 -> (9 + 16) / 2 = 12.5
    assert tv_loss(img).item() == pytest.approx(15.0)
    assert l1_loss(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0])).item() == pytest.approx(1.5)
    assert depth_l1_loss(torch.full((1, 1, 2, 2), 5.0), torch.full((1, 1, 2, 2), 4.5)).item() == pytest.approx(0.5)
    assert weight_sum_loss(torch.tensor([1.0, 0.5, 0.0])).item() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        l1_loss(torch.zeros(2), torch.zeros(3))


@pytest.fixture(scope="module")
def tiny_critics():
    cfg = load_config("configs/tiny.yaml")
    return build_critics(cfg.loss)


def _vgg_reference(features, channel_weights, x, y, weights):
    """Independent slow float64 reference of the LPIPS distance (lpips 0.1.4's formulas): per sample, per pixel."""
    feats = features.double()
    taps = [i for i, m in enumerate(feats) if isinstance(m, torch.nn.ReLU)
            and (i + 1 == len(feats) or isinstance(feats[i + 1], torch.nn.MaxPool2d))]
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)

    def run(img):
        h = (img.double() - shift) / scale
        out = []
        for i, layer in enumerate(feats):
            h = F.relu(h) if isinstance(layer, torch.nn.ReLU) else layer(h)
            if i in taps:
                out.append(h)
        return out

    total = 0.0
    for w, lin, fx, fy in zip(weights, channel_weights, run(x), run(y)):
        b, c, hh, ww = fx.shape
        acc = 0.0
        for n in range(b):
            for i in range(hh):
                for j in range(ww):
                    u, v = fx[n, :, i, j], fy[n, :, i, j]
                    u = u / (u.pow(2).sum().sqrt() + 1e-10)
                    v = v / (v.pow(2).sum().sqrt() + 1e-10)
                    acc += float((lin.double() * (u - v) ** 2).sum())
        total += w * acc / (b * hh * ww)
    return total


@pytest.mark.parametrize("feature_scale", [1.0, 1e-4])
def test_vgg_critic_matches_slow_reference(tiny_critics, feature_scale):
    """Learned channel weights and LPIPS's normalisation, also where every feature is ~1e-4 of its usual size
    (|f|^2 ~ 1e-8: a floor on |f|^2 such as the former sqrt(|f|^2 + 1e-6) changes the distance there)."""
    import copy

    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    features = copy.deepcopy(tiny_critics.vgg.features)
    assert all(m.bias.abs().max() == 0 for m in features if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        features[0].weight.mul_(feature_scale)  # zero biases: every tapped feature map scales by feature_scale
    lin = [torch.rand(tiny_critics.vgg.channel_weight(k).shape[1]) + 0.1 for k in range(tiny_critics.vgg.num_layers)]
    critic = VggCritic(features, lin)
    weights = (1.0, 0.5, 0.0, 1.0, 2.0)
    got = critic(x, y, weights).item()
    want = _vgg_reference(features, lin, x, y, weights)
    assert got == pytest.approx(want, rel=1e-4)
    assert tiny_critics.vgg(x, x).item() == pytest.approx(0.0, abs=1e-10)


def test_critics_are_frozen_but_pass_gradients(tiny_critics):
    x = (torch.rand(1, 3, 32, 32) * 2 - 1).requires_grad_(True)
    loss = tiny_critics.vgg(x, torch.zeros_like(x)) + tiny_critics.clip(x).abs().mean()
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for module in (tiny_critics.clip, tiny_critics.vgg):
        assert not module.training
        module.train()
        assert not module.training
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())


def test_clip_critic_resizes_and_normalises(tiny_critics):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    want_in = F.interpolate((x + 1) / 2, size=(32, 32), mode="bilinear", align_corners=False)
    want_in = (want_in - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    want = tiny_critics.clip.model.encode_image(want_in)
    torch.testing.assert_close(tiny_critics.clip(x), want)


def test_pretrained_mode_refuses_to_start_without_files(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["loss.critics=pretrained", f"loss.clip_weights={tmp_path}/clip.bin",
                                            f"loss.vgg_weights={tmp_path}/vgg.safetensors"])
    with pytest.raises(WeightsError, match=r"loss\.clip_weights=.*clip\.bin.*not found.*open_clip"):
        build_critics(cfg.loss)
    (tmp_path / "clip.bin").write_bytes(b"x")
    with pytest.raises(WeightsError, match=r"loss\.vgg_weights=.*vgg\.safetensors.*not found.*timm/vgg16"):
        build_critics(cfg.loss)


def test_clip_loads_a_local_weight_file(tmp_path):
    name = "ViT-B-16-quickgelu"
    source = build_clip_model(name, None, TINY_CLIP_OVERRIDES)
    path = tmp_path / "clip.bin"
    torch.save(source.state_dict(), path)
    loaded = build_clip_model(name, str(path), TINY_CLIP_OVERRIDES)
    for (k, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    # A file of another architecture is a WeightsError naming the key, not a silent random init.
    other = dict(TINY_CLIP_OVERRIDES, embed_dim=16)
    with pytest.raises(WeightsError, match=r"loss\.clip_weights"):
        build_clip_model(name, str(path), other)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(ClipCritic(loaded, 32)(x), ClipCritic(source, 32)(x))


def test_vgg_loads_a_local_weight_file(tmp_path):
    # vgg11 keeps the file small (features only, 37 MB); vgg16 takes the same path.
    from safetensors.torch import save_file

    source = build_vgg_features("vgg11", None)
    state = {f"features.{k}": v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / "vgg11.safetensors"
    save_file(state, str(path))
    loaded = build_vgg_features("vgg11", str(path))
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, source.state_dict()[k], msg=k)
    x, y = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    assert VggCritic(loaded)(x, y).item() == pytest.approx(VggCritic(source)(x, y).item(), rel=1e-6)
    del state["features.0.weight"]
    save_file(state, str(path))
    with pytest.raises(WeightsError, match=r"loss\.vgg_weights=.*features\.0\.weight"):
        build_vgg_features("vgg11", str(path))
