"""The triplane decoder MLP of f_trigen: sampled triplane features -> colour and raw density.

What the G3DR reference computes (``OSGDecoder_extended`` in preddy5/G3DR ``src/unet.py``), which is
what this module reproduces:

- input: features already averaged over the three planes, (B, N, C);
- EG3D-style fully connected layers C -> hidden -> softplus -> 1 + 3, weights stored ~ N(0, 1) / lr_mul
  and scaled at run time by ``lr_mul / sqrt(fan_in)``, biases scaled by ``lr_mul``;
- colour = sigmoid(x[..., 1:]) * (1 + 2e-3) - 1e-3 (MipNeRF's widened sigmoid), density = x[..., :1] raw.

The activations are module functions (``hidden_from_pre``, ``rgb_from_logits``) with their backward
(``pre_grad_from_hidden_grad``, ``logits_grad_from_rgb_grad``): the fused renderer (``g3dr.render.fused``),
which recomputes the MLP from ``TriplaneDecoder.mlp_weights`` and backpropagates it by hand, takes them
from here, so the decoder's functional form is written once.

The reference config also lists ``add_global_position_as_feature``, ``fourier_n``, ``num_of_layers``,
``zero_outside_triplanes`` and ``lod``, but its decoder never reads them: sample coordinates and ray
directions do not enter the MLP. The renderer passes both anyway (the agreed callable signature); they
are accepted and ignored here. Must not know about rendering or training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from g3dr.config import ModelConfig

COLOR_CHANNELS = 3
COLOR_STRETCH = 1e-3
"""The colour is ``sigmoid(x) * (1 + 2 * COLOR_STRETCH) - COLOR_STRETCH`` (MipNeRF's widened sigmoid)."""
SOFTPLUS_THRESHOLD = 20.0
"""The hidden activation is ``F.softplus`` (beta 1) with this threshold (its default): the identity above it."""


def hidden_from_pre(pre: torch.Tensor) -> torch.Tensor:
    """The hidden activation: softplus of the pre-activations."""
    return F.softplus(pre, beta=1.0, threshold=SOFTPLUS_THRESHOLD)


def pre_grad_from_hidden_grad(grad_hidden: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """Backward of :func:`hidden_from_pre`: dL/dpre from dL/dhidden (torch's own softplus backward)."""
    return torch.ops.aten.softplus_backward(grad_hidden, pre, 1.0, SOFTPLUS_THRESHOLD)


def rgb_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """The colour activation: ``sigmoid(logits) * (1 + 2 * COLOR_STRETCH) - COLOR_STRETCH``, in [-1e-3, 1 + 1e-3]."""
    return torch.sigmoid(logits) * (1 + 2 * COLOR_STRETCH) - COLOR_STRETCH


def logits_grad_from_rgb_grad(grad_rgb: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Backward of :func:`rgb_from_logits`: dL/dlogits from dL/drgb (the formula torch's autograd applies)."""
    return torch.ops.aten.sigmoid_backward(grad_rgb * (1 + 2 * COLOR_STRETCH), torch.sigmoid(logits))


class EqualizedLinear(nn.Module):
    """Linear layer with the learning-rate-equalised parametrisation of StyleGAN/EG3D.

    The stored weight is N(0, 1) / lr_mul; the applied weight is ``weight * lr_mul / sqrt(in_features)``
    and the applied bias ``bias * lr_mul``, so Adam's effective step on the applied weight is scaled by
    ``lr_mul``.
    """

    def __init__(self, in_features: int, out_features: int, lr_mul: float = 1.0, bias_init: float = 0.0):
        super().__init__()
        self.in_features, self.out_features, self.lr_mul = in_features, out_features, lr_mul
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.weight_gain = lr_mul / math.sqrt(in_features)

    def applied_weight_bias(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight (out, in) and bias (out,) actually applied, differentiable in the stored parameters."""
        weight = self.weight.to(dtype) * self.weight_gain
        bias = self.bias.to(dtype)
        if self.lr_mul != 1:
            bias = bias * self.lr_mul
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.applied_weight_bias(x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, lr_mul={self.lr_mul}"


class TriplaneDecoder(nn.Module):
    """The decoder MLP: ``forward(features (B, N, C), coordinates (B, N, 3), directions (B, N, 3))``
    ``-> (rgb (B, N, 3), sigma_raw (B, N, 1))``.

    ``features`` are the triplane features of N sample points, summed over resolution levels and averaged
    over planes. ``rgb`` lies in [-1e-3, 1 + 1e-3]; ``sigma_raw`` is the density before the ray marcher's
    ``softplus(raw - 1)``. ``coordinates`` and ``directions`` are ignored (see the module docstring); they
    may be None. Differentiable with respect to ``features`` and the parameters.

    Example::

        dec = TriplaneDecoder(ModelConfig())
        rgb, sigma = dec(torch.randn(2, 1000, 64), None, None)   # (2, 1000, 3), (2, 1000, 1)
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.in_features = cfg.triplane_channels
        self.hidden = EqualizedLinear(cfg.triplane_channels, cfg.decoder_hidden, lr_mul=cfg.decoder_lr_mul)
        self.out = EqualizedLinear(cfg.decoder_hidden, 1 + COLOR_CHANNELS, lr_mul=cfg.decoder_lr_mul)

    def forward(self, features: torch.Tensor, coordinates: torch.Tensor | None = None,
                directions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if features.dim() != 3 or features.shape[-1] != self.in_features:
            raise ValueError(f"features must be (B, N, {self.in_features}), got {tuple(features.shape)}")
        x = self.out(hidden_from_pre(self.hidden(features)))
        return rgb_from_logits(x[..., 1:]), x[..., :1]

    def mlp_weights(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The MLP in functional form for fused renderers (``g3dr.render.fused``).

        Returns the applied (gain-scaled) ``hidden_weight (hidden, C)``, ``hidden_bias (hidden,)``,
        ``out_weight (1 + 3, hidden)``, ``out_bias (1 + 3,)``, differentiable in the parameters. With them,
        ``forward`` is ``x = hidden_from_pre(f @ hidden_weight.T + hidden_bias) @ out_weight.T + out_bias``,
        ``sigma_raw = x[..., :1]``, ``rgb = rgb_from_logits(x[..., 1:])`` (this module's activations).
        """
        return (*self.hidden.applied_weight_bias(dtype), *self.out.applied_weight_bias(dtype))
