"""Frozen critics of the G3DR objective: CLIP image embeddings (open_clip) and the LPIPS-VGG perceptual distance.

Both live outside the DeepSpeed engine: eval mode, ``requires_grad=False`` on every parameter, so the
optimizer never sees them, yet gradients flow through them into the rendered image.

- ``loss.critics: pretrained`` (real runs) loads the weight files named by ``loss.clip_weights`` and
  ``loss.vgg_weights`` through the libraries' own local-file paths (open_clip ``pretrained=<file>``, timm
  ``pretrained_cfg_overlay=dict(file=...)``). A missing or mismatching file is a
  :class:`~g3dr.errors.WeightsError` naming the config key, the file and how to obtain it; a real run never
  falls back to random weights. The perceptual critic is LPIPS-VGG (``lpips.LPIPS(net='vgg')``, as the
  reference ``train.py``): the VGG16 backbone from ``loss.vgg_weights`` and LPIPS v0.1's learned per-channel
  weights from the file the ``lpips`` wheel ships (``loss.perceptual_weights: lpips``, sha256-checked).
- ``loss.critics: synthetic`` (small-scale studies) trains the same tiny architectures once on procedural
  primitives and caches them (:mod:`g3dr.losses.synthetic_critics`); unit channel weights, as ``random``.
- ``loss.critics: random`` (tests, the tiny demo) builds tiny random-weight critics of the same families:
  a ViT CLIP from the same open_clip architecture name with small tower settings, and a timm ``VGG`` with a
  small layer list (other channel counts than VGG16's, so unit channel weights). Their numbers mean nothing;
  they exercise the same code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from g3dr.errors import WeightsError
from g3dr.log import get_logger

log = get_logger("g3dr.losses")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# LPIPS v0.1 (lpips 0.1.4, lpips/lpips.py): ScalingLayer on images in [-1, 1], x -> (x - shift) / scale; the
# unit normalisation f / (|f| + eps) of normalize_tensor; the channel counts of VGG16's relu1_2 ... relu5_3.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_EPS = 1e-10
LPIPS_VGG_CHANNELS = (64, 128, 256, 512, 512)
LPIPS_VGG_FILE = "weights/v0.1/vgg.pth"
"""The learned linear weights of LPIPS-VGG v0.1, relative to the installed ``lpips`` package."""
LPIPS_REGISTRY_NAME = "lpips-vgg-v0.1"
"""The weights-registry entry that records the file's sha256 (``g3dr/weights/registry.yaml``)."""

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
LPIPS_HOWTO = ("(re)install the lpips package, a dependency of g3dr-scale whose wheel ships the file: "
               "`pip install --force-reinstall 'lpips==0.1.4'`; or set loss.perceptual_weights=uniform to sum "
               "the channels unweighted (not the reference's loss)")


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def require_weight_file(path: str, key: str, howto: str) -> Path:
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
    """LPIPS perceptual distance between images in [-1, 1] on a VGG backbone (``lpips.LPIPS(net='vgg')``).

    As LPIPS v0.1 computes it (lpips 0.1.4): the images are scaled by LPIPS's ScalingLayer,
    ``(x - LPIPS_SHIFT) / LPIPS_SCALE``; features are taken after the last ReLU of every VGG block (relu1_2 ...
    relu5_3 for VGG16); each pixel's feature vector is unit-normalised, ``f / (|f| + 1e-10)``; the distance of
    layer l is the spatial mean of ``sum_c w_lc * (fx_c - fy_c)^2`` with the per-channel non-negative weights
    ``w_l`` (LPIPS's learned 1x1 linear layers; unit weights sum the channels unweighted).

    ``layer_distances(x, y) -> (B, L)`` is LPIPS's ``retPerLayer`` output per sample; ``forward(x, y,
    layer_weights) -> ()`` is ``sum_l layer_weight_l * mean_b distance_bl`` (the reference's canonical loss with
    all weights 1, its novel-view loss with ``(0, 0, 0, 1, 1)``). Differentiable in both images; VGG and
    channel weights are frozen.

    No deviation from LPIPS, including its eps: a pixel whose features are tiny but not zero gets a unit
    direction with a gradient ~1 / |f|, as in the loss the reference trains with (an earlier version floored
    ``|f|^2`` at 1e-6, which changes the distance wherever features are small). ``|f|`` comes from
    ``torch.linalg.vector_norm``, equal in value to LPIPS's ``sqrt(sum f^2)``; where a pixel's features are all
    exactly 0 its gradient is finite instead of sqrt's NaN, and the ReLU in front of the tap zeroes that pixel's
    gradient in both.

    ``channel_weights``: one non-negative tensor (C_l,) per tapped layer (:func:`load_lpips_vgg_weights` for
    VGG16), or None for unit weights.
    """

    def __init__(self, features: nn.Sequential, channel_weights: Sequence[torch.Tensor] | None = None):
        super().__init__()
        self.features = _freeze(features)
        self.taps = [i for i, m in enumerate(features) if isinstance(m, nn.ReLU)
                     and (i + 1 == len(features) or isinstance(features[i + 1], nn.MaxPool2d))]
        if not self.taps:
            raise ValueError("VggCritic: no ReLU before a max-pool found in the VGG features")
        channels = []
        for tap in self.taps:
            convs = [m for m in list(features)[:tap] if isinstance(m, nn.Conv2d)]
            if not convs:
                raise ValueError(f"VggCritic: no convolution before the ReLU at features[{tap}]")
            channels.append(convs[-1].out_channels)
        if channel_weights is None:
            channel_weights = [torch.ones(c) for c in channels]
        if len(channel_weights) != len(channels):
            raise ValueError(f"VggCritic: {len(channel_weights)} channel-weight tensors for {len(channels)} layers")
        for k, (w, c) in enumerate(zip(channel_weights, channels)):
            if w.numel() != c:
                raise ValueError(f"VggCritic: channel weights of layer {k} have {w.numel()} entries, the layer has "
                                 f"{c} channels (LPIPS's weights fit VGG16 only)")
            if bool((w < 0).any()):
                raise ValueError(f"VggCritic: channel weights of layer {k} are negative somewhere; LPIPS's are >= 0")
            # A (1, C, 1, 1) 1x1-convolution kernel, LPIPS's NetLinLayer; fp32 whatever the backbone's dtype.
            self.register_buffer(f"channel_weight{k}", w.detach().float().reshape(1, c, 1, 1).clone(),
                                 persistent=False)
        for m in self.features:
            if isinstance(m, nn.ReLU):
                m.inplace = False
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.eval()

    @property
    def num_layers(self) -> int:
        return len(self.taps)

    def channel_weight(self, layer: int) -> torch.Tensor:
        """The (1, C, 1, 1) fp32 channel weights of tapped layer ``layer``."""
        return getattr(self, f"channel_weight{layer}").float()

    def layer_features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The tapped feature maps of ``image`` (B, 3, H, W) in [-1, 1], one per VGG block, in at least fp32."""
        dtype = next(self.features.parameters()).dtype
        x = ((image - self.shift.float()) / self.scale.float()).to(dtype)
        out = []
        last = self.taps[-1]
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x.to(torch.promote_types(x.dtype, torch.float32)))
            if i == last:
                break
        return out

    def _distance(self, fx: torch.Tensor, fy: torch.Tensor, layer: int) -> torch.Tensor:
        """(B,) LPIPS distance of one layer from its feature maps (B, C, h, w)."""
        nx = fx / (torch.linalg.vector_norm(fx, dim=1, keepdim=True) + LPIPS_EPS)
        ny = fy / (torch.linalg.vector_norm(fy, dim=1, keepdim=True) + LPIPS_EPS)
        weight = self.channel_weight(layer).to(nx.dtype)
        return F.conv2d((nx - ny).pow(2), weight).mean(dim=(1, 2, 3))

    def layer_distances(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, L) LPIPS distance of every layer for every sample (LPIPS's ``retPerLayer``)."""
        pairs = zip(self.layer_features(x), self.layer_features(y))
        return torch.stack([self._distance(fx, fy, k) for k, (fx, fy) in enumerate(pairs)], dim=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor, layer_weights: tuple[float, ...] | None = None) -> torch.Tensor:
        weights = layer_weights or (1.0,) * self.num_layers
        if len(weights) != self.num_layers:
            raise ValueError(f"VggCritic: {len(weights)} layer weights for {self.num_layers} layers")
        total = x.new_zeros((), dtype=torch.float32)
        for k, (w, fx, fy) in enumerate(zip(weights, self.layer_features(x), self.layer_features(y))):
            if w != 0:
                total = total + w * self._distance(fx, fy, k).mean()
        return total

    def train(self, mode: bool = True) -> "VggCritic":  # frozen: always eval
        return super().train(False)


def lpips_vgg_weights_file() -> Path:
    """Where the installed ``lpips`` package keeps LPIPS v0.1's VGG linear weights (found without importing it)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"loss.perceptual_weights=lpips: the lpips package is not installed, so LPIPS's weight "
                           f"file lpips/{LPIPS_VGG_FILE} is missing; {LPIPS_HOWTO}")
    return Path(next(iter(spec.submodule_search_locations))) / LPIPS_VGG_FILE


def _lpips_sha256() -> str:
    # The built-in registry, not a lab's $G3DR_WEIGHTS_REGISTRY: the hash is a fact about the lpips wheel.
    from g3dr.weights.registry import default_registry_path, load_registry

    registry = load_registry(default_registry_path())
    sha = registry.get(LPIPS_REGISTRY_NAME).files[0].sha256
    if sha is None:
        raise WeightsError(f"weights registry {registry.source}: entry {LPIPS_REGISTRY_NAME} has no sha256; "
                           "restore the file from the g3dr-scale sources")
    return sha


def load_lpips_vgg_weights(path: str | Path | None = None) -> list[torch.Tensor]:
    """LPIPS v0.1's learned per-channel weights for VGG16's relu1_2 ... relu5_3: five fp32 tensors (C,), C = 64,
    128, 256, 512, 512, all >= 0 (LPIPS clamps them while training).

    Read from ``path``, by default the file the ``lpips`` wheel installs (``lpips/weights/v0.1/vgg.pth``, the
    ``lin{k}.model.1.weight`` tensors of ``lpips.LPIPS(net='vgg')``). Its sha256 must be the one the weights
    registry records (entry ``lpips-vgg-v0.1``); a missing, unreadable or different file is a
    :class:`~g3dr.errors.WeightsError` naming the file and the fix.
    """
    file = Path(path) if path is not None else lpips_vgg_weights_file()
    try:
        data = file.read_bytes()
    except OSError as err:
        raise WeightsError(f"LPIPS VGG weights {file}: cannot read the file ({err.strerror or err}); "
                           f"{LPIPS_HOWTO}") from None
    digest, expected = hashlib.sha256(data).hexdigest(), _lpips_sha256()
    if digest != expected:
        raise WeightsError(f"LPIPS VGG weights {file}: sha256 {digest} is not that of LPIPS v0.1's VGG weights "
                           f"({expected}, weights registry entry {LPIPS_REGISTRY_NAME}); {LPIPS_HOWTO}")
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return [state[f"lin{k}.model.1.weight"].reshape(c).float() for k, c in enumerate(LPIPS_VGG_CHANNELS)]


def build_vgg_critic(features: nn.Sequential, perceptual_weights: str) -> VggCritic:
    """The perceptual critic on ``features`` with the channel weights ``loss.perceptual_weights`` names:
    ``lpips`` (LPIPS v0.1's learned weights; ``features`` must be a VGG16's) or ``uniform`` (unit weights)."""
    match perceptual_weights:
        case "lpips":
            return VggCritic(features, load_lpips_vgg_weights())
        case "uniform":
            return VggCritic(features)
        case _:
            raise ValueError(f"perceptual_weights must be 'lpips' or 'uniform', got {perceptual_weights!r}")


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
