"""An independent, slow description of the G3DR reference network (preddy5/G3DR ``src/unet.py``), for tests only.

Written from the reference definition, sharing no code with ``g3dr.models``:

- :func:`reference_layout` lists every tensor name and shape of the reference ``Unet`` state dict (with
  its ``OSGDecoder_extended`` under ``decoder.``) for a given configuration;
- :func:`reference_unet_forward` and :func:`reference_decoder_forward` evaluate the reference network
  directly from such a state dict with plain functional ops and ``einsum``.

Import by path (tests use ``--import-mode=importlib``)::

    ref = load_helper("reference_unet")
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F


def _resnet_block(out: dict, prefix: str, din: int, dout: int, time_dim: int) -> None:
    out[f"{prefix}.mlp.1.weight"] = (2 * dout, time_dim)
    out[f"{prefix}.mlp.1.bias"] = (2 * dout,)
    out[f"{prefix}.block1.proj.weight"] = (dout, din, 3, 3)
    out[f"{prefix}.block1.proj.bias"] = (dout,)
    out[f"{prefix}.block1.norm.weight"] = (dout,)
    out[f"{prefix}.block1.norm.bias"] = (dout,)
    out[f"{prefix}.block2.proj.weight"] = (dout, dout, 3, 3)
    out[f"{prefix}.block2.proj.bias"] = (dout,)
    out[f"{prefix}.block2.norm.weight"] = (dout,)
    out[f"{prefix}.block2.norm.bias"] = (dout,)
    if din != dout:
        out[f"{prefix}.res_conv.weight"] = (dout, din, 1, 1)
        out[f"{prefix}.res_conv.bias"] = (dout,)


def _linear_attention(out: dict, prefix: str, d: int, hidden: int) -> None:
    out[f"{prefix}.fn.norm.g"] = (1, d, 1, 1)
    out[f"{prefix}.fn.fn.to_qkv.weight"] = (3 * hidden, d, 1, 1)
    out[f"{prefix}.fn.fn.to_out.0.weight"] = (d, hidden, 1, 1)
    out[f"{prefix}.fn.fn.to_out.0.bias"] = (d,)
    out[f"{prefix}.fn.fn.to_out.1.g"] = (1, d, 1, 1)


def reference_layout(dim: int = 128, dim_mults=(1, 2, 4, 8), channels: int = 4, image_size: int = 128,
                     pos_channels: int = 256, feature_dim: int = 64, heads: int = 4, dim_head: int = 32,
                     decoder_hidden: int = 64) -> "OrderedDict[str, tuple[int, ...]]":
    """Name -> shape of every tensor of the reference ``Unet(channels=4, out_dim=3*feature_dim, ...)``."""
    out: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    hidden = heads * dim_head
    time_dim = 4 * dim
    out["pos_embed"] = (1, pos_channels, image_size, image_size)
    out["init_conv.weight"] = (dim, channels + pos_channels, 7, 7)
    out["init_conv.bias"] = (dim,)
    out["time_mlp.1.weight"] = (time_dim, dim)
    out["time_mlp.1.bias"] = (time_dim,)
    out["time_mlp.3.weight"] = (time_dim, time_dim)
    out["time_mlp.3.bias"] = (time_dim,)
    dims = [dim] + [dim * m for m in dim_mults]
    in_out = list(zip(dims[:-1], dims[1:]))
    for i, (din, dout) in enumerate(in_out):
        last = i == len(in_out) - 1
        _resnet_block(out, f"downs.{i}.0", din, din, time_dim)
        _resnet_block(out, f"downs.{i}.1", din, din, time_dim)
        _linear_attention(out, f"downs.{i}.2", din, hidden)
        if last:
            out[f"downs.{i}.3.weight"] = (dout, din, 3, 3)
            out[f"downs.{i}.3.bias"] = (dout,)
        else:
            out[f"downs.{i}.3.1.weight"] = (dout, 4 * din, 1, 1)
            out[f"downs.{i}.3.1.bias"] = (dout,)
    mid = dims[-1]
    _resnet_block(out, "mid_block1", mid, mid, time_dim)
    out["mid_attn.fn.norm.g"] = (1, mid, 1, 1)
    out["mid_attn.fn.fn.to_qkv.weight"] = (3 * hidden, mid, 1, 1)
    out["mid_attn.fn.fn.to_out.weight"] = (mid, hidden, 1, 1)
    out["mid_attn.fn.fn.to_out.bias"] = (mid,)
    _resnet_block(out, "mid_block2", mid, mid, time_dim)
    for i, (din, dout) in enumerate(reversed(in_out)):
        last = i == len(in_out) - 1
        _resnet_block(out, f"ups.{i}.0", dout + din, dout, time_dim)
        _resnet_block(out, f"ups.{i}.1", dout + din, dout, time_dim)
        _linear_attention(out, f"ups.{i}.2", dout, hidden)
        if last:
            out[f"ups.{i}.3.weight"] = (din, dout, 3, 3)
        else:
            out[f"ups.{i}.3.1.weight"] = (din, dout, 3, 3)
        out[f"ups.{i}.3{'' if last else '.1'}.bias"] = (din,)
    _resnet_block(out, "final_res_block", 2 * dim, 2 * dim, time_dim)
    out["final_conv.weight"] = (3 * feature_dim, 2 * dim, 1, 1)
    out["final_conv.bias"] = (3 * feature_dim,)
    out["decoder.net.0.weight"] = (decoder_hidden, feature_dim)
    out["decoder.net.0.bias"] = (decoder_hidden,)
    out["decoder.net.2.weight"] = (4, decoder_hidden)
    out["decoder.net.2.bias"] = (4,)
    return out


def random_reference_state(layout, seed: int = 0, dtype=torch.float64) -> "OrderedDict[str, torch.Tensor]":
    """Random values for every tensor of ``layout``; scaled so activations stay O(1) through the network."""
    gen = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for name, shape in layout.items():
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
        if name.endswith((".g", "norm.weight")):
            t = 1.0 + 0.2 * t  # gains near one, but not one: a swapped gain must change the output
        elif name.endswith("bias") or name == "pos_embed":
            t = 0.1 * t
        elif not name.startswith("decoder.") and len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            t = t / math.sqrt(fan_in)
        state[name] = t.to(dtype)
    return state


# ----------------------------------------------------------------------------------------- forward


def _eps(x):
    return 1e-5 if x.dtype == torch.float32 else 1e-3


def _layer_norm(x, g):
    mean = x.mean(dim=1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=1, keepdim=True)
    return (x - mean) / torch.sqrt(var + _eps(x)) * g


def _ws_conv(x, w, b):
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = ((w - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    return F.conv2d(x, (w - mean) / torch.sqrt(var + _eps(x)), b, padding=1)


def _conv(x, sd, name, padding=0):
    return F.conv2d(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"), padding=padding)


def _resnet(sd, p, x, t, groups):
    emb = F.linear(F.silu(t), sd[f"{p}.mlp.1.weight"], sd[f"{p}.mlp.1.bias"])
    c = emb.shape[1] // 2
    scale, shift = emb[:, :c, None, None], emb[:, c:, None, None]
    h = _ws_conv(x, sd[f"{p}.block1.proj.weight"], sd[f"{p}.block1.proj.bias"])
    h = F.group_norm(h, groups, sd[f"{p}.block1.norm.weight"], sd[f"{p}.block1.norm.bias"], eps=1e-5)
    h = F.silu(h * (scale + 1) + shift)
    h = _ws_conv(h, sd[f"{p}.block2.proj.weight"], sd[f"{p}.block2.proj.bias"])
    h = F.silu(F.group_norm(h, groups, sd[f"{p}.block2.norm.weight"], sd[f"{p}.block2.norm.bias"], eps=1e-5))
    skip = _conv(x, sd, f"{p}.res_conv") if f"{p}.res_conv.weight" in sd else x
    return h + skip


def _split_heads(t, heads):
    b, c, hh, ww = t.shape
    return t.reshape(b, heads, c // heads, hh * ww)


def _linear_attn(sd, p, x, heads):
    b, _, hh, ww = x.shape
    y = _layer_norm(x, sd[f"{p}.fn.norm.g"])
    q, k, v = (_split_heads(t, heads) for t in _conv(y, sd, f"{p}.fn.fn.to_qkv").chunk(3, dim=1))
    d = q.shape[2]
    q = torch.softmax(q, dim=2) * d ** -0.5
    k = torch.softmax(k, dim=3)
    v = v / (hh * ww)
    context = torch.einsum("bhdn,bhen->bhde", k, v)
    out = torch.einsum("bhde,bhdn->bhen", context, q).reshape(b, -1, hh, ww)
    out = _layer_norm(_conv(out, sd, f"{p}.fn.fn.to_out.0"), sd[f"{p}.fn.fn.to_out.1.g"])
    return out + x


def _full_attn(sd, p, x, heads):
    b, _, hh, ww = x.shape
    y = _layer_norm(x, sd[f"{p}.fn.norm.g"])
    q, k, v = (_split_heads(t, heads) for t in _conv(y, sd, f"{p}.fn.fn.to_qkv").chunk(3, dim=1))
    q = q * q.shape[2] ** -0.5
    attn = torch.softmax(torch.einsum("bhdi,bhdj->bhij", q, k), dim=-1)
    out = torch.einsum("bhij,bhdj->bhid", attn, v)  # (b, heads, n, d)
    out = out.permute(0, 1, 3, 2).reshape(b, -1, hh, ww)
    return _conv(out, sd, f"{p}.fn.fn.to_out") + x


def _space_to_depth(x):
    # 'b c (h p1) (w p2) -> b (c p1 p2) h w', written with explicit indexing.
    b, c, h, w = x.shape
    out = x.new_empty(b, c * 4, h // 2, w // 2)
    for p1 in range(2):
        for p2 in range(2):
            out[:, p1 * 2 + p2::4] = x[:, :, p1::2, p2::2]
    return out


def reference_unet_forward(sd, x, dim_mults, heads: int = 4, groups: int = 8):
    """Planes (B, 3, C, H, W) of the reference ``Unet`` with state dict ``sd`` for input ``x`` (B, 4, H, W)."""
    b = x.shape[0]
    x = torch.cat([x, sd["pos_embed"].expand(b, -1, -1, -1)], dim=1)
    x = _conv(x, sd, "init_conv", padding=3)
    r = x.clone()
    dim = sd["time_mlp.1.weight"].shape[1]
    half = dim // 2
    # The reference evaluates the sinusoid in the default dtype (float32): t = ones(B), arange * -float.
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    t = torch.ones(b, dtype=torch.float32)[:, None] * freqs[None]
    t = torch.cat([t.sin(), t.cos()], dim=-1).to(x.dtype)
    t = F.linear(t, sd["time_mlp.1.weight"], sd["time_mlp.1.bias"])
    t = F.linear(F.gelu(t), sd["time_mlp.3.weight"], sd["time_mlp.3.bias"])
    n = len(dim_mults)
    hs = []
    for i in range(n):
        x = _resnet(sd, f"downs.{i}.0", x, t, groups)
        hs.append(x)
        x = _resnet(sd, f"downs.{i}.1", x, t, groups)
        x = _linear_attn(sd, f"downs.{i}.2", x, heads)
        hs.append(x)
        if i < n - 1:
            x = _conv(_space_to_depth(x), sd, f"downs.{i}.3.1")
        else:
            x = _conv(x, sd, f"downs.{i}.3", padding=1)
    x = _resnet(sd, "mid_block1", x, t, groups)
    x = _full_attn(sd, "mid_attn", x, heads)
    x = _resnet(sd, "mid_block2", x, t, groups)
    for i in range(n):
        x = _resnet(sd, f"ups.{i}.0", torch.cat([x, hs.pop()], dim=1), t, groups)
        x = _resnet(sd, f"ups.{i}.1", torch.cat([x, hs.pop()], dim=1), t, groups)
        x = _linear_attn(sd, f"ups.{i}.2", x, heads)
        if i < n - 1:
            x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
            x = _conv(x, sd, f"ups.{i}.3.1", padding=1)
        else:
            x = _conv(x, sd, f"ups.{i}.3", padding=1)
    x = torch.cat([x, r], dim=1)
    x = _resnet(sd, "final_res_block", x, t, groups)
    planes = _conv(x, sd, "final_conv")
    return planes.view(b, 3, -1, planes.shape[-2], planes.shape[-1])


def reference_decoder_forward(sd, features, lr_mul: float = 1.0):
    """(rgb, sigma) of ``OSGDecoder_extended`` for features (N, M, C) already averaged over planes."""
    n, m, c = features.shape
    x = features.reshape(n * m, c)
    w0, b0 = sd["decoder.net.0.weight"], sd["decoder.net.0.bias"]
    w2, b2 = sd["decoder.net.2.weight"], sd["decoder.net.2.bias"]
    x = x @ (w0 * (lr_mul / math.sqrt(w0.shape[1]))).T + b0 * lr_mul
    x = torch.log1p(torch.exp(x))
    x = x @ (w2 * (lr_mul / math.sqrt(w2.shape[1]))).T + b2 * lr_mul
    x = x.reshape(n, m, -1)
    rgb = 1 / (1 + torch.exp(-x[..., 1:])) * (1 + 2 * 0.001) - 0.001
    return rgb, x[..., :1]
