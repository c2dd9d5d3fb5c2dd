"""Loading the Inception network from a local file: the real call interface on a tiny random-weight module."""

from __future__ import annotations

import pickle

import pytest
import torch

from g3dr.errors import WeightsError
from g3dr.metrics.inception import INCEPTION_URL_PT, load_inception, quantize_images
from g3dr_test_support import load_test_helper


def _helper(name: str):
    return load_test_helper(name)


@pytest.mark.parametrize("suffix", [".pt", ".pkl"])
def test_load_tiny_inception_features_and_probabilities(tmp_path, suffix):
    path = _helper("tiny_inception").save_tiny_inception(tmp_path / f"inception-2015-12-05{suffix}", seed=3)
    detector = load_inception(path, "cpu")
    images = torch.randint(0, 256, (5, 3, 20, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    feats = detector.features(images)
    probs = detector.probabilities(images)
    assert feats.shape == (5, 2048) and feats.dtype == torch.float32
    assert probs.shape == (5, 1008)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(5))
    # the same numbers as calling the saved module directly with the real interface
    reference = _helper("tiny_inception").TinyInception(seed=3).eval()
    with torch.no_grad():
        torch.testing.assert_close(feats, reference(images, return_features=True))
        torch.testing.assert_close(probs, reference(images, no_output_bias=True))
        # and the IS path really drops the output bias
        assert not torch.allclose(probs, reference(images))
    assert len(detector.sha256) == 64
    assert not any(p.requires_grad for p in detector.module.parameters())


def test_random_weight_inception_v3_architecture_behind_the_real_interface(tmp_path):
    """The real network's architecture (random weights), scripted and saved as the real file would be."""
    path = _helper("tiny_inception").save_random_inception_v3(tmp_path / "inception-2015-12-05.pt")
    detector = load_inception(path)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    feats = detector.features(images)
    probs = detector.probabilities(images)
    assert feats.shape == (2, 2048) and (feats >= 0).all()  # pool features follow a ReLU
    assert probs.shape == (2, 1008)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))
    # the input is resized inside: a 299 x 299 upsampling of the same images gives the same features
    big = torch.nn.functional.interpolate(images.float(), size=[299, 299], mode="bilinear", align_corners=False)
    resized = big.round().clamp(0, 255).to(torch.uint8)
    torch.testing.assert_close(detector.features(resized), feats, rtol=0.05, atol=0.05)


def test_detector_rejects_float_images(tmp_path):
    detector = load_inception(_helper("tiny_inception").save_tiny_inception(tmp_path / "i.pt"))
    with pytest.raises(ValueError, match="uint8"):
        detector.features(torch.zeros(2, 3, 8, 8))


def test_missing_file_names_the_file_and_the_url(tmp_path):
    missing = tmp_path / "weights" / "inception-2015-12-05.pt"
    with pytest.raises(WeightsError) as info:
        load_inception(missing)
    assert str(missing) in str(info.value) and INCEPTION_URL_PT in str(info.value)


def test_corrupt_file_is_a_weights_error(tmp_path):
    bad = tmp_path / "inception-2015-12-05.pt"
    bad.write_bytes(b"not a torchscript archive")
    with pytest.raises(WeightsError, match="cannot load"):
        load_inception(bad)


def test_wrong_network_is_a_weights_error(tmp_path):
    path = tmp_path / "wrong.pkl"
    with open(path, "wb") as f:
        pickle.dump(_helper("tiny_inception").WrongShapeNetwork(), f)
    detector = load_inception(path)
    with pytest.raises(WeightsError, match="2048"):
        detector.features(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(WeightsError, match="1008"):
        detector.probabilities(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def test_quantize_images_follows_the_protocol():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 1.5, -3.0]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    q = quantize_images(x)
    assert q.dtype == torch.uint8
    # x * 127.5 + 128, clamped, truncated
    assert q[0, 0, 0].tolist() == [0, 64, 128, 255, 255, 255, 0]
    # uint8 images decoded as v / 127.5 - 1 come back unchanged
    v = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    assert torch.equal(quantize_images(v.float() / 127.5 - 1), v)
    # greyscale is repeated to three channels
    assert quantize_images(torch.zeros(2, 1, 4, 4)).shape == (2, 3, 4, 4)
