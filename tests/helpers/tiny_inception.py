"""A tiny random-weight stand-in for the Inception-v3 (2015-12-05) TorchScript file, for tests only.

Same call interface as the real file (see ``g3dr/metrics/inception.py``): uint8 ``(N, 3, H, W)`` in,
``return_features=True`` -> ``(N, 2048)`` features, otherwise softmax over 1008 classes, with
``no_output_bias`` dropping the output layer's bias. Import by path (tests use ``--import-mode=importlib``):

    helper = load_helper("tiny_inception"); helper.save_tiny_inception(tmp_path / "inception.pt")
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F


class TinyInception(torch.nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(16 * 4 * 4, 2048)
        self.output = torch.nn.Linear(2048, 1008)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        x = (img.to(torch.float32) - 128) / 128
        x = F.relu(self.conv(x))
        x = F.adaptive_avg_pool2d(x, [4, 4]).flatten(1)
        features = F.relu(self.fc(x))
        if return_features:
            return features
        if no_output_bias:
            logits = F.linear(features, self.output.weight)
        else:
            logits = self.output(features)
        return torch.softmax(logits, dim=1)


class RandomInceptionV3(torch.nn.Module):
    """The Inception-v3 architecture (torchvision's layers) with random weights behind the real file's
    interface: uint8 in, resized to 299 x 299 (bilinear), ``(x - 128) / 128``, 2048-d pool features, and a
    1008-way output layer. Slow on a CPU (about 6 GFLOP per image): use a few images only."""

    def __init__(self, seed: int = 0):
        super().__init__()
        from torchvision.models import inception_v3

        torch.manual_seed(seed)
        net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
        names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                 "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                 "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"]
        self.layers = torch.nn.Sequential(*[getattr(net, n) for n in names])
        self.output = torch.nn.Linear(2048, 1008)

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        x = img.to(torch.float32)
        if x.shape[2] != 299 or x.shape[3] != 299:
            x = F.interpolate(x, size=[299, 299], mode="bilinear", align_corners=False)
        x = (x - 128) / 128
        features = self.layers(x).reshape(-1, 2048)
        if return_features:
            return features
        if no_output_bias:
            logits = F.linear(features, self.output.weight)
        else:
            logits = self.output(features)
        return torch.softmax(logits, dim=1)


def save_random_inception_v3(path: str | Path, seed: int = 0) -> Path:
    """Script :class:`RandomInceptionV3` and save it with ``torch.jit.save``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(RandomInceptionV3(seed).eval()), str(path))
    return path


class WrongShapeNetwork(torch.nn.Module):
    """Same call interface, wrong output sizes: the loader must refuse to use it."""

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        return torch.softmax(img.float().flatten(1)[:, :10], dim=1)


def save_tiny_inception(path: str | Path, seed: int = 0) -> Path:
    """Script the tiny network and save it with ``torch.jit.save`` (``.pt``) or pickle it (``.pkl``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = TinyInception(seed).eval()
    if path.suffix == ".pkl":
        with open(path, "wb") as f:
            pickle.dump(module, f)
        return path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated but still what the real file is
        torch.jit.save(torch.jit.script(module), str(path))
    return path
