"""f_trigen's backbone: the U-Net that lifts an RGB-D image to a triplane.

The architecture follows the denoising-diffusion U-Net as used by the G3DR reference (preddy5/G3DR
``src/unet.py``), so that its released weights load into this module (see
:mod:`g3dr.models.reference_import` for the name mapping):

- a learned positional embedding (``pos_emb_channels`` x H x W, initialised to ones) concatenated to
  the 4-channel input, then a 7x7 convolution to ``base_width`` channels;
- a time embedding evaluated at the constant t = 1 (sinusoidal features -> Linear -> GELU -> Linear);
  it only provides a learned per-channel scale and shift to the first conv block of every ResNet block;
- per level: ``num_res_blocks`` (2) ResNet blocks (weight-standardised 3x3 conv, GroupNorm, SiLU), a
  pre-normed residual linear attention after the last, and a downsample (pixel-unshuffle + 1x1 conv;
  a plain 3x3 conv on the last level);
- middle: ResNet block, pre-normed residual full attention, ResNet block;
- the mirrored decoder with skip connections (nearest x2 upsample + 3x3 conv; a plain 3x3 conv last);
- the 7x7-conv features are concatenated once more, then a ResNet block and a 1x1 conv to 3 x C.

Differentiable end to end. Must not know about rendering or training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from g3dr.config import ModelConfig


def _norm_eps(x: torch.Tensor) -> float:
    # The reference uses a larger epsilon in reduced precision (bf16/fp16) to stay stable.
    return 1e-5 if x.dtype == torch.float32 else 1e-3


class ChannelLayerNorm(nn.Module):
    """Normalises over the channel axis of (B, C, H, W) with a learned per-channel gain, no bias."""

    def __init__(self, channels: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + _norm_eps(x)) * self.gain


class StandardizedConv2d(nn.Conv2d):
    """Conv2d whose kernel is standardised per output channel (zero mean, unit variance) at run time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        var, mean = torch.var_mean(w, dim=(1, 2, 3), unbiased=False, keepdim=True)
        w = (w - mean) * torch.rsqrt(var + _norm_eps(x))
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ConvBlock(nn.Module):
    """Standardised 3x3 conv -> GroupNorm -> optional (1 + scale, shift) -> SiLU."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.conv = StandardizedConv2d(in_channels, out_channels, 3, padding=1)
        self.norm = nn.GroupNorm(groups, out_channels)

    def forward(self, x: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = self.norm(self.conv(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return F.silu(x)


class ResBlock(nn.Module):
    """Two conv blocks with a residual connection; the time embedding scales and shifts the first."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, groups: int):
        super().__init__()
        self.time_proj = nn.Linear(time_dim, 2 * out_channels)
        self.block1 = ConvBlock(in_channels, out_channels, groups)
        self.block2 = ConvBlock(out_channels, out_channels, groups)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.time_proj(F.silu(time_emb))[:, :, None, None].chunk(2, dim=1)
        h = self.block2(self.block1(x, (scale, shift)))
        return h + (x if self.skip is None else self.skip(x))


class FullAttention(nn.Module):
    """Residual, pre-normed softmax attention over all H*W positions (used at the lowest resolution)."""

    def __init__(self, channels: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        hidden = heads * head_dim
        self.norm = ChannelLayerNorm(channels)
        self.to_qkv = nn.Conv2d(channels, 3 * hidden, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, channels, 1)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of the normed ``x``, each (b, heads, head_dim, H*W)."""
        b, _, h, w = x.shape
        return self.to_qkv(self.norm(x)).reshape(b, 3, self.heads, self.head_dim, h * w).unbind(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = self.qkv(x)
        q = q * self.head_dim ** -0.5
        attn = torch.matmul(q.transpose(2, 3), k).softmax(dim=-1)  # (b, heads, n_query, n_key)
        out = torch.matmul(attn, v.transpose(2, 3))  # (b, heads, n, d)
        out = out.transpose(2, 3).reshape(b, self.heads * self.head_dim, h, w)
        return x + self.to_out(out)


class LinearAttention(FullAttention):
    """Residual, pre-normed linear attention (softmax over channels for q, over positions for k).

    ``forward(x) = x + out_norm(to_out(attn(norm(x))))``, cost linear in H*W. The same projections as
    :class:`FullAttention` plus ``out_norm``.
    """

    def __init__(self, channels: int, heads: int, head_dim: int):
        super().__init__(channels, heads, head_dim)
        self.out_norm = ChannelLayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = self.qkv(x)
        q = q.softmax(dim=2) * self.head_dim ** -0.5
        k = k.softmax(dim=3)
        v = v / (h * w)
        context = torch.matmul(k, v.transpose(2, 3))  # (b, heads, d_k, d_v)
        out = torch.matmul(context.transpose(2, 3), q)  # (b, heads, d_v, n)
        out = out.reshape(b, self.heads * self.head_dim, h, w)
        return x + self.out_norm(self.to_out(out))


class Resample(nn.Module):
    """Change resolution by 2 (pixel-unshuffle + 1x1 conv down, nearest + 3x3 conv up) or keep it (3x3 conv)."""

    def __init__(self, in_channels: int, out_channels: int, mode: str):
        super().__init__()
        if mode not in ("down", "up", "same"):
            raise ValueError(f"mode must be down, up or same, got {mode!r}")
        self.mode = mode
        if mode == "down":
            self.conv = nn.Conv2d(4 * in_channels, out_channels, 1)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "down":
            x = F.pixel_unshuffle(x, 2)  # channel index c * 4 + 2 * dy + dx
        elif self.mode == "up":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x)


class Level(nn.Module):
    """One U-Net level: ``num_res_blocks`` ResNet blocks, linear attention after the last, resampling."""

    def __init__(self, blocks: list[ResBlock], attn: LinearAttention, resample: Resample):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn, self.resample = attn, resample


class MiddleBlock(nn.Module):
    def __init__(self, channels: int, time_dim: int, cfg: ModelConfig):
        super().__init__()
        self.res1 = ResBlock(channels, channels, time_dim, cfg.norm_groups)
        self.attn = FullAttention(channels, cfg.attn_heads, cfg.attn_head_dim)
        self.res2 = ResBlock(channels, channels, time_dim, cfg.norm_groups)

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x, time_emb)), time_emb)


class TimeEmbedding(nn.Module):
    """Sinusoidal features of a scalar time -> Linear -> GELU -> Linear; G3DR always evaluates it at t = 1."""

    def __init__(self, base_width: int):
        super().__init__()
        if base_width < 4 or base_width % 2:
            raise ValueError(f"base_width must be even and >= 4 for the time embedding, got {base_width}")
        self.base_width = base_width
        self.fc1 = nn.Linear(base_width, 4 * base_width)
        self.fc2 = nn.Linear(4 * base_width, 4 * base_width)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.base_width // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
        args = t.float()[:, None] * freqs[None, :]
        features = torch.cat([args.sin(), args.cos()], dim=1).to(self.fc1.weight.dtype)
        return self.fc2(F.gelu(self.fc1(features)))


class TriplaneGenerator(nn.Module):
    """The U-Net f_trigen: ``forward(rgbd (B, 4, H, W)) -> planes (B, 3, C, H, W)``.

    ``rgbd`` is RGB in [-1, 1] concatenated with depth (release decoding, about [4, 6]); H and W must
    equal ``resolution`` (the learned positional embedding is defined at that size) and be divisible by
    ``2 ** (len(channel_mults) - 1)``. Plane ``i`` of the output holds channels ``i*C .. (i+1)*C - 1`` of
    the final convolution.

    Example::

        gen = TriplaneGenerator(ModelConfig(), resolution=128)
        planes = gen(torch.randn(2, 4, 128, 128))      # (2, 3, 64, 128, 128)
    """

    def __init__(self, cfg: ModelConfig, resolution: int = 128):
        super().__init__()
        self.cfg, self.resolution = cfg, resolution
        down = 2 ** (len(cfg.channel_mults) - 1)
        if resolution % down:
            raise ValueError(f"resolution {resolution} is not divisible by {down} (2^(levels - 1))")
        base, groups, heads, head_dim = cfg.base_width, cfg.norm_groups, cfg.attn_heads, cfg.attn_head_dim
        time_dim = 4 * base

        self.pos_embed = nn.Parameter(torch.ones(1, cfg.pos_emb_channels, resolution, resolution))
        self.init_conv = nn.Conv2d(cfg.in_channels + cfg.pos_emb_channels, base, 7, padding=3)
        self.time_embed = TimeEmbedding(base)

        widths = [base] + [base * m for m in cfg.channel_mults]
        pairs = list(zip(widths[:-1], widths[1:]))
        self.down = nn.ModuleList()
        for i, (w_in, w_out) in enumerate(pairs):
            last = i == len(pairs) - 1
            self.down.append(Level(
                [ResBlock(w_in, w_in, time_dim, groups) for _ in range(cfg.num_res_blocks)],
                LinearAttention(w_in, heads, head_dim),
                Resample(w_in, w_out, "same" if last else "down"),
            ))
        self.mid = MiddleBlock(widths[-1], time_dim, cfg)
        self.up = nn.ModuleList()
        for i, (w_in, w_out) in enumerate(reversed(pairs)):
            last = i == len(pairs) - 1
            self.up.append(Level(
                [ResBlock(w_out + w_in, w_out, time_dim, groups) for _ in range(cfg.num_res_blocks)],
                LinearAttention(w_out, heads, head_dim),
                Resample(w_out, w_in, "same" if last else "up"),
            ))
        self.final_block = ResBlock(2 * base, 2 * base, time_dim, groups)
        self.final_conv = nn.Conv2d(2 * base, 3 * cfg.triplane_channels, 1)

    def forward(self, rgbd: torch.Tensor) -> torch.Tensor:
        b, c, h, w = rgbd.shape
        if c != self.cfg.in_channels or (h, w) != (self.resolution, self.resolution):
            raise ValueError(
                f"TriplaneGenerator expects (B, {self.cfg.in_channels}, {self.resolution}, {self.resolution}) "
                f"(RGB + depth at the resolution of its positional embedding), got {tuple(rgbd.shape)}")
        x = torch.cat([rgbd, self.pos_embed.expand(b, -1, -1, -1).to(rgbd.dtype)], dim=1)
        x = self.init_conv(x)
        first = x
        time_emb = self.time_embed(torch.ones(b, device=rgbd.device))

        # Every ResNet block of the way down leaves a skip (the last one after the level's attention);
        # the way up consumes them in reverse order, one per block.
        skips = []
        for level in self.down:
            for j, block in enumerate(level.blocks):
                x = block(x, time_emb)
                if j == len(level.blocks) - 1:
                    x = level.attn(x)
                skips.append(x)
            x = level.resample(x)
        x = self.mid(x, time_emb)
        for level in self.up:
            for block in level.blocks:
                x = block(torch.cat([x, skips.pop()], dim=1), time_emb)
            x = level.resample(level.attn(x))
        x = self.final_block(torch.cat([x, first], dim=1), time_emb)
        planes = self.final_conv(x)
        return planes.reshape(b, 3, self.cfg.triplane_channels, h, w)
