"""Frozen critics of the G3DR objective: CLIP image embeddings (open_clip) and VGG16 perceptual features (timm).

Both live outside the DeepSpeed engine: eval mode, ``requires_grad=False`` on every parameter, so the
optimizer never sees them, yet gradients flow through them into the rendered image.

- ``loss.critics: pretrained`` (real runs) loads the weight files named by ``loss.clip_weights`` and
  ``loss.vgg_weights`` through the libraries' own local-file paths (open_clip ``pretrained=<file>``, timm
  ``pretrained_cfg_overlay=dict(file=...)``). A missing or mismatching file is a
  :class:`~g3dr.errors.WeightsError` naming the config key, the file and how to obtain it; a real run never
  falls back to random weights.
- ``loss.critics: random`` (tests, the tiny demo) builds tiny random-weight critics of the same families:
  a ViT CLIP from the same open_clip architecture name with small tower settings, and a timm ``VGG`` with a
  small layer list. Their numbers mean nothing; they exercise the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from g3dr.config import LossConfig
from g3dr.errors import WeightsError
from g3dr.log import get_logger

log = get_logger("g3dr.losses")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORM_EPS = 1e-6  # floor of the squared channel norm in the perceptual distance (features are O(1) and larger)

# Overrides of the open_clip architecture for the random-weight test critic (same model class and code path).
TINY_CLIP_OVERRIDES: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}
# Layer list of the random-weight test VGG (timm ``VGG`` cfg format: channels, "M" = max-pool).
TINY_VGG_LAYERS: list[Any] = [8, "M", 16, "M", 16, 16, "M", 16, 16, "M", 16, 16, "M"]

CLIP_HOWTO = ("obtain the OpenAI CLIP ViT-B/16 weights on a machine with internet with "
              "`g3dr weights fetch clip-vit-b-16-openai --dest FILE` (OpenAI's file, sha256-verified; or "
              "clip-vit-b-16-openai-hf, open_clip's state dict), copy the file there, or set loss.critics=random "
              "for a smoke test")
VGG_HOWTO = ("obtain the VGG16 ImageNet weights on a machine with internet with "
             "`g3dr weights fetch vgg16-torchvision --dest FILE` (or vgg16-timm-hf, model.safetensors of "
             "timm/vgg16.tv_in1k), copy the file there, or set loss.critics=random for a smoke test")


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _require_file(path: str, key: str, howto: str) -> Path:
    file = Path(path)
    if not file.is_file():
        raise WeightsError(f"{key}={path!r}: weight file not found (looked at {file.resolve()}); {howto}")
    return file


class ClipCritic(nn.Module):
    """CLIP image embedding of an image in [-1, 1]: resize (bilinear) -> CLIP normalisation -> ``encode_image``.

    ``forward(image (B, 3, H, W)) -> (B, D)``; differentiable in ``image``, the CLIP weights are frozen.
    """

    def __init__(self, model: nn.Module, resolution: int):
        super().__init__()
        self.model = _freeze(model)
        self.resolution = resolution
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image + 1.0) * 0.5
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        dtype = next(self.model.parameters()).dtype
        return self.model.encode_image(x.to(dtype)).float()

    def train(self, mode: bool = True) -> "ClipCritic":  # frozen: always eval
        return super().train(False)


class VggCritic(nn.Module):
    """VGG perceptual distance (LPIPS-style, without learned layer weights) between images in [-1, 1].

    Features are taken after the last ReLU of every VGG block (relu1_2 ... relu5_3 for VGG16), unit-normalised
    over channels (``f / sqrt(|f|^2 + 1e-6)``); the distance of a layer is the spatial mean of the squared difference summed over
    channels, and ``forward(x, y, layer_weights)`` returns ``sum_l weight_l * distance_l`` averaged over the
    batch. Differentiable in both images; VGG weights are frozen.
    """

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.features = _freeze(features)
        self.taps = [i for i, m in enumerate(features) if isinstance(m, nn.ReLU)
                     and (i + 1 == len(features) or isinstance(features[i + 1], nn.MaxPool2d))]
        if not self.taps:
            raise ValueError("VggCritic: no ReLU before a max-pool found in the VGG features")
        for m in self.features:
            if isinstance(m, nn.ReLU):
                m.inplace = False
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    @property
    def num_layers(self) -> int:
        return len(self.taps)

    def layer_features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The tapped feature maps of ``image`` (B, 3, H, W) in [-1, 1], one per VGG block."""
        dtype = next(self.features.parameters()).dtype
        x = (((image + 1.0) * 0.5 - self.mean) / self.std).to(dtype)
        out = []
        last = self.taps[-1]
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x.float())
            if i == last:
                break
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor, layer_weights: tuple[float, ...] | None = None) -> torch.Tensor:
        weights = layer_weights or (1.0,) * self.num_layers
        if len(weights) != self.num_layers:
            raise ValueError(f"VggCritic: {len(weights)} layer weights for {self.num_layers} layers")
        total = x.new_zeros((), dtype=torch.float32)
        for w, fx, fy in zip(weights, self.layer_features(x), self.layer_features(y)):
            if w == 0:
                continue
            # sqrt(|f|^2 + eps) rather than LPIPS's |f| + 1e-10: where a pixel's features are all (nearly) zero,
            # the direction of f is undefined and its gradient ~1/|f| would amplify float noise without bound.
            nx = fx * torch.rsqrt(fx.pow(2).sum(1, keepdim=True) + NORM_EPS)
            ny = fy * torch.rsqrt(fy.pow(2).sum(1, keepdim=True) + NORM_EPS)
            total = total + w * (nx - ny).pow(2).sum(1).mean()
        return total

    def train(self, mode: bool = True) -> "VggCritic":  # frozen: always eval
        return super().train(False)


def is_torchscript_archive(path: str | Path) -> bool:
    """True for a TorchScript archive (a zip holding ``constants.pkl``), the format of OpenAI's CLIP files."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def build_clip_model(model_name: str, weights: str | None, overrides: dict[str, Any] | None = None) -> nn.Module:
    """An open_clip model ``model_name``; weights from the local file ``weights`` (strict) or random if None.

    ``weights`` may be an open_clip state dict or OpenAI's original TorchScript file (``ViT-B-16.pt``), which
    ``torch.load(weights_only=True)`` refuses; open_clip then reads its state dict through ``torch.jit.load``
    (TorchScript, not arbitrary pickled Python; ``g3dr weights verify`` checks the file's published sha256).
    """
    import warnings

    import open_clip

    kwargs = dict(overrides or {})
    if weights is not None and is_torchscript_archive(weights):
        kwargs["weights_only"] = False
    try:
        with warnings.catch_warnings():  # torch.load's "dispatching to torch.jit.load" note on TorchScript files
            warnings.filterwarnings("ignore", message=".*TorchScript archive.*")
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated.*", category=FutureWarning)
            return open_clip.create_model(model_name, pretrained=weights, **kwargs)
    except RuntimeError as err:
        if weights is None:
            raise
        raise WeightsError(f"loss.clip_weights={weights!r}: does not load into open_clip {model_name!r} ({err}); "
                           f"{CLIP_HOWTO}") from None


def _file_tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    return {k: tuple(v.shape) for k, v in state.items()}


def build_vgg_features(model_name: str, weights: str | None, layers: list[Any] | None = None) -> nn.Sequential:
    """The ``features`` of a timm VGG: ``model_name`` with weights from the local file ``weights``, or a random
    VGG with the layer list ``layers`` (timm ``VGG`` cfg) when ``weights`` is None.

    Only the convolutional features are used, so a weight file needs the ``features.*`` tensors; they are
    checked (names and shapes) before timm loads the file, and the classifier tensors may be absent.
    """
    import timm
    from timm.models.vgg import VGG

    if weights is None:
        if layers is None:
            return timm.create_model(model_name, pretrained=False).features
        return VGG(layers, num_classes=0, mlp_ratio=1 / 512).features
    path = Path(weights)
    reference = timm.create_model(model_name, pretrained=False)
    expected = {f"features.{k}": tuple(v.shape) for k, v in reference.features.state_dict().items()}
    try:
        found = _file_tensor_shapes(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise WeightsError(f"loss.vgg_weights={weights!r}: cannot read the file ({err}); {VGG_HOWTO}") from None
    bad = [k for k, shape in expected.items() if found.get(k) != shape]
    if bad:
        raise WeightsError(f"loss.vgg_weights={weights!r}: {len(bad)} VGG feature tensors missing or of the wrong "
                           f"shape for timm {model_name!r} (first: {bad[0]}); {VGG_HOWTO}")
    model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                              pretrained_strict=False)
    return model.features


@dataclass
class Critics:
    """The two frozen critics, built once per process."""

    clip: ClipCritic
    vgg: VggCritic

    def to(self, device: torch.device | str) -> "Critics":
        self.clip.to(device)
        self.vgg.to(device)
        return self


def build_critics(loss_cfg: LossConfig, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> Critics:
    """Build the CLIP and VGG critics of ``loss_cfg`` (frozen, eval mode) on ``device`` in ``dtype``."""
    if loss_cfg.critics == "pretrained":
        clip_file = _require_file(loss_cfg.clip_weights, "loss.clip_weights", CLIP_HOWTO)
        vgg_file = _require_file(loss_cfg.vgg_weights, "loss.vgg_weights", VGG_HOWTO)
        clip_model = build_clip_model(loss_cfg.clip_model, str(clip_file))
        vgg_features = build_vgg_features(loss_cfg.vgg_model, str(vgg_file))
        log.info("critics: CLIP %s from %s, VGG %s from %s", loss_cfg.clip_model, clip_file,
                 loss_cfg.vgg_model, vgg_file)
    else:
        clip_model = build_clip_model(loss_cfg.clip_model, None, TINY_CLIP_OVERRIDES)
        vgg_features = build_vgg_features(loss_cfg.vgg_model, None, TINY_VGG_LAYERS)
        log.info("critics: tiny random-weight CLIP and VGG (loss.critics=random; not for real training)")
    critics = Critics(clip=ClipCritic(clip_model, loss_cfg.clip_resolution), vgg=VggCritic(vgg_features))
    critics.clip.to(device=device, dtype=dtype)
    critics.vgg.to(device=device, dtype=dtype)
    # Buffers used for normalisation stay fp32 for accuracy; inputs are cast to the weight dtype after it.
    critics.clip.mean, critics.clip.std = critics.clip.mean.float(), critics.clip.std.float()
    critics.vgg.mean, critics.vgg.std = critics.vgg.mean.float(), critics.vgg.std.float()
    return critics
