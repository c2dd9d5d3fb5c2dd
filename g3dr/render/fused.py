"""The fused primitives (``renderer.impl: fused``): the numbers of the reference path, a fraction of the memory.

:class:`FusedPrimitives` is the ``decode`` and ``composite`` that :func:`g3dr.render.renderer.render_rays_with`
plugs into its one pipeline (sample placement and the depth-kernel decision live there, not here).

The reference path runs triplane sampling, the plane mean, the decoder MLP and the ray marcher as plain
autograd ops, so backward keeps every per-sample intermediate: grid-sample outputs of 9 plane-levels,
the (B, N, C) features, hidden activations, ... (several GiB at the training configuration). Here the
expensive part - for the merged, sorted sample depths - is one custom autograd function,
:class:`FusedTriplaneComposite`:

- forward: decoder outputs of every sample (computed without grad, chunked over rays) and the MipNeRF
  marcher (:func:`composite_from_samples`, so forward values are those of the reference code);
- backward: chunk by chunk over rays, recompute the features, hidden activations and decoder outputs,
  backpropagate the marcher by hand (the same formulas torch's autograd applies, including the depth
  kernel's backward-only scale of the alpha and colour gradients, and the sigma scale), then the MLP,
  then scatter the feature gradients into the planes. Only the inputs are saved; no per-sample tensor
  outlives its chunk.

Triplane sampling is a gather: the three levels are one channels-last table of rows
(``table_from_levels``); each sample reads 3 planes x L levels x 4 bilinear corners (``grid_sample``
semantics: ``align_corners=False``, zero padding), weighted by the bilinear weight / 3 (the plane mean),
with ``F.embedding_bag`` (one fused gather-multiply-sum). Backward is the transposed gather: the base
rows of the lookups are sorted and, per corner, ``embedding_bag`` sums each row's weighted sample
gradients (faster here than ``index_add_``, which materialises a (36 N, C) tensor; see
docs/performance.md, which also has the measured figures).

Two backends compute the per-chunk decode and decoder/sampling backward: plain torch (CPU, and the
fallback; large CPU renders run the per-chunk math through ``torch.compile``) and Triton kernels
(``g3dr.render.fused_triton``; CUDA tensors, or CPU under ``TRITON_INTERPRET=1`` in tests). The
marcher backward is shared torch code. Everything runs in at least float32 with autocast off.

``cut_quantile`` (3DGP's density cut for NFS depth maps) acts in every ``composite`` call (per image, as on
the reference path); cut renders are evaluation renders run without grad (``render_rays``), and the
hand-written backward refuses them. The decoder must expose ``mlp_weights(dtype)``
(:class:`g3dr.models.decoder.TriplaneDecoder`); :func:`decoder_supports_fused` says whether one does
(``render_rays`` falls back to the reference path otherwise). The MLP's activations and their backward
are the decoder module's (``hidden_from_pre``, ``rgb_from_logits``, ...): its functional form is written
there once.

Must not: import training code or the pipeline (``renderer.py`` imports this module); change any number
of the reference path (tests compare both).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from g3dr.config import RendererConfig
from g3dr.log import get_logger
from g3dr.models.decoder import (hidden_from_pre, logits_grad_from_rgb_grad, pre_grad_from_hidden_grad,
                                 rgb_from_logits)
from g3dr.render.marching import Composite, composite_from_samples, split_grad_scale
from g3dr.render.triplane import planes_pyramid_from_planes

__all__ = [
    "SAMPLES_PER_CHUNK",
    "LevelTable",
    "decoder_supports_fused",
    "table_from_levels",
    "rows_from_points",
    "decode_samples",
    "FusedTriplaneComposite",
    "FusedPrimitives",
]

log = get_logger("g3dr.render.fused")

SAMPLES_PER_CHUNK = 131072
"""Samples processed at once (rounded to whole rays): bounds the transient memory of forward and backward."""
COMPILE_MIN_SAMPLES = 2**20
"""On CPU, renders of at least this many samples compile the lookups (``G3DR_FUSED_COMPILE=0``: never)."""
MARCHER_SOFTPLUS_THRESHOLD = 20.0
"""``F.softplus``'s default threshold, which the marcher's density activation uses; its backward here too."""

Backend = Literal["torch", "triton"]


def decoder_supports_fused(decoder: object) -> bool:
    """Whether ``decoder`` exposes the functional MLP (``mlp_weights``) the fused path needs."""
    return callable(getattr(decoder, "mlp_weights", None))


PAD_BEFORE, PAD_AFTER = 1, 2
"""Zero border of every plane in the table: coordinates clamped to [-1, r] then need no bounds checks."""


@dataclass(frozen=True)
class LevelTable:
    """The triplane levels as one channels-last table of feature rows, each plane with a zero border.

    ``table`` is (sum over levels of B * P * q * q, C) with ``q = r + PAD_BEFORE + PAD_AFTER``; level
    ``l`` starts at row ``offsets[l]`` and holds ``(B, P, q, q)`` rows in that order, so texel (x, y) of
    plane p of image b (0 <= x, y < r) is row ``offsets[l] + ((b * P + p) * q + y + 1) * q + x + 1``.
    The border rows are zero and their gradients are dropped (``F.pad``).
    """

    table: torch.Tensor
    offsets: tuple[int, ...]
    resolutions: tuple[int, ...]
    batch: int
    planes: int


def table_from_levels(levels: Sequence[torch.Tensor]) -> LevelTable:
    """Pad and concatenate the pyramid (each (B, P, C, r, r)) into a channels-last :class:`LevelTable` (differentiable)."""
    batch, n_planes, channels = levels[0].shape[:3]
    rows, offsets, resolutions, offset = [], [], [], 0
    for level in levels:
        res = level.shape[-1]
        if level.shape[-2] != res or level.shape[:3] != (batch, n_planes, channels):
            raise ValueError(f"level of shape {tuple(level.shape)} does not match ({batch}, {n_planes}, {channels}, r, r)")
        padded = F.pad(level, (PAD_BEFORE, PAD_AFTER, PAD_BEFORE, PAD_AFTER))
        rows.append(padded.permute(0, 1, 3, 4, 2).reshape(-1, channels))
        offsets.append(offset)
        resolutions.append(res)
        offset += batch * n_planes * padded.shape[-1] ** 2
    return LevelTable(torch.cat(rows, 0), tuple(offsets), tuple(resolutions), batch, n_planes)


def rows_from_points(
    points: torch.Tensor, image_index: torch.Tensor, plane_axes: torch.Tensor, levels: LevelTable, box_warp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Table rows and weights of the bilinear lookups of N points (``grid_sample`` semantics, zero padding).

    Args:
        points: (N, 3) world coordinates.
        image_index: (N,) int64, the image (batch element) of each point.
        plane_axes: (P, 2).
        levels: the table.

    Returns:
        rows (N, P * L * 4) int32 and weights (N, P * L * 4) in the points' dtype: the bilinear weight
        divided by P (the plane mean). The feature of point i is ``sum_k weights[i, k] * table[rows[i, k]]``.
        Pixel coordinates are clamped to [-1, r] first: a corner outside the plane then lands on the
        zero border (or gets weight 0), which is ``grid_sample``'s zero padding.
    """
    n_points, n_planes = points.shape[0], plane_axes.shape[0]
    device = points.device
    res = torch.tensor(levels.resolutions, device=device)  # (L,)
    res_f = res.to(points.dtype)
    side = res + PAD_BEFORE + PAD_AFTER
    unit = (2 / box_warp) * points
    # (N, P, L): grid_sample's unnormalisation ((g + 1) * size - 1) / 2 of the width and height coordinates.
    low = torch.full_like(res_f, -1)
    ix = torch.clamp(((unit[:, plane_axes[:, 0], None] + 1) * res_f - 1) / 2, low, res_f)
    iy = torch.clamp(((unit[:, plane_axes[:, 1], None] + 1) * res_f - 1) / 2, low, res_f)
    x0f, y0f = torch.floor(ix), torch.floor(iy)
    fx, fy = ix - x0f, iy - y0f
    plane = (image_index[:, None] * n_planes + torch.arange(n_planes, device=device)[None, :])[..., None]  # (N, P, 1)
    base = torch.tensor(levels.offsets, device=device) + (plane * side + (y0f.long() + PAD_BEFORE)) * side
    base = (base + (x0f.long() + PAD_BEFORE)).int()
    corner = torch.stack([torch.zeros_like(side), torch.ones_like(side), side, side + 1], -1).int()  # (L, 4)
    rows = base[..., None] + corner  # (N, P, L, 4): (x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)
    wx = torch.stack([1 - fx, fx], -1)
    wy = torch.stack([1 - fy, fy], -1) / n_planes
    weights = wy[..., :, None] * wx[..., None, :]  # (N, P, L, 2 over y, 2 over x)
    return rows.reshape(n_points, -1), weights.reshape(n_points, -1)


_compiled: dict[str, object] = {}
_compile_failed = False


def _use_compile(device: torch.device, total_samples: int) -> bool:
    """Compile the per-chunk math on CPU for renders of at least :data:`COMPILE_MIN_SAMPLES` samples,
    unless ``G3DR_FUSED_COMPILE=0`` (small renders, e.g. tests, skip the one-time compile cost)."""
    return (device.type == "cpu" and total_samples >= COMPILE_MIN_SAMPLES and not _compile_failed
            and os.environ.get("G3DR_FUSED_COMPILE", "1") != "0")


def _call(fn, compiled: bool, *args):
    """``fn(*args)``, through ``torch.compile`` when ``compiled`` (on CPU: fused loops instead of dozens of
    passes over per-sample tensors; same numbers up to float rounding). A compiler failure logs once
    and falls back to eager for the rest of the process."""
    global _compile_failed
    if compiled and not _compile_failed:
        if fn.__name__ not in _compiled:
            _compiled[fn.__name__] = torch.compile(fn, dynamic=True)
        try:
            return _compiled[fn.__name__](*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: use the eager function
            _compile_failed = True
            log.warning("torch.compile in the fused renderer failed (%s: %s); using eager torch (slower)",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    return fn(*args)


@dataclass(frozen=True)
class _Mlp:
    hidden_weight: torch.Tensor
    hidden_bias: torch.Tensor
    out_weight: torch.Tensor
    out_bias: torch.Tensor


def _mlp_tensors(mlp) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden_weight, hidden_bias, out_weight, out_bias) of an ``_Mlp`` or ``_Grads``."""
    return mlp.hidden_weight, mlp.hidden_bias, mlp.out_weight, mlp.out_bias


def _outputs_from_x(x: torch.Tensor) -> torch.Tensor:
    """(n, 4) raw decoder output -> (n, 4) = (sigma_raw, r, g, b) with the decoder's colour activation."""
    return torch.cat([x[:, :1], rgb_from_logits(x[:, 1:])], 1)


def _torch_decode(table, hidden_weight, hidden_bias, out_weight, out_bias, rows, weights):
    """Features, pre-activations, hidden activations and raw outputs x (n, 4) of one chunk (plain torch)."""
    features = F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")
    pre = torch.addmm(hidden_bias, features, hidden_weight.t())
    hidden = hidden_from_pre(pre)
    x = torch.addmm(out_bias, hidden, out_weight.t())
    return features, pre, hidden, x


def _torch_decode_outputs(table, hidden_weight, hidden_bias, out_weight, out_bias, rows, weights):
    """(n, 4) = (sigma_raw, colour) of one chunk."""
    return _outputs_from_x(_torch_decode(table, hidden_weight, hidden_bias, out_weight, out_bias, rows, weights)[3])


def _grad_x_from_x(x, depths, grad_rgb, grad_depth, grad_weight_sum, scale, density_offset, sigma_scale):
    """dL/dx (n * S, 4) for the raw decoder outputs x (n * S, 4) of n whole rays (marcher backward, then
    the output activation)."""
    n_rays, samples = depths.shape
    grad_outputs = _composite_backward(_outputs_from_x(x).view(n_rays, samples, 4), depths, grad_rgb, grad_depth,
                                       grad_weight_sum, scale, density_offset, sigma_scale).view(-1, 4)
    return torch.cat([grad_outputs[:, :1], logits_grad_from_rgb_grad(grad_outputs[:, 1:], x[:, 1:])], 1)


def _torch_chunk_backward(table, hidden_weight, hidden_bias, out_weight, out_bias, rows, weights, depths, grad_rgb,
                          grad_depth, grad_weight_sum, scale, density_offset, sigma_scale):
    """Recompute one chunk and backpropagate: (dL/dfeatures (n * S, C), dW_hidden, db_hidden, dW_out, db_out)."""
    features, pre, hidden, x = _torch_decode(table, hidden_weight, hidden_bias, out_weight, out_bias, rows, weights)
    grad_x = _grad_x_from_x(x, depths, grad_rgb, grad_depth, grad_weight_sum, scale, density_offset, sigma_scale)
    grad_pre = pre_grad_from_hidden_grad(grad_x @ out_weight, pre)
    return grad_pre @ hidden_weight, grad_pre.t() @ features, grad_pre.sum(0), grad_x.t() @ hidden, grad_x.sum(0)


def _scatter_rows(grad_table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, grad_features: torch.Tensor) -> None:
    """``grad_table[rows[i, k]] += weights[i, k] * grad_features[i]`` (the transposed gather).

    The four corners of one bilinear lookup are rows ``base + (0, 1, q, q + 1)`` (:func:`rows_from_points`),
    so only the N x P x L base rows are sorted; per corner, ``embedding_bag`` sums the weighted sample
    gradients of each distinct base row and one ``index_add_`` adds them at the shifted rows. Sorting a
    quarter of the keys is what makes this faster than sorting all of them or than ``index_add_`` of
    (36 N, C) products.
    """
    n = rows.shape[0]
    rows4 = rows.view(n, -1, 4)
    weights4 = weights.view(n, -1, 4)
    base = rows4[..., 0].reshape(-1)
    sorted_base, order = torch.sort(base)
    unique_rows, counts = torch.unique_consecutive(sorted_base, return_counts=True)
    offsets = torch.zeros_like(counts)
    offsets[1:] = torch.cumsum(counts, 0)[:-1]
    samples = torch.div(order, rows4.shape[1], rounding_mode="floor")
    first = order[offsets]  # one lookup per distinct base row: its corner offsets hold for the whole group
    for corner in range(4):
        summed = F.embedding_bag(samples, grad_features, offsets, mode="sum",
                                 per_sample_weights=weights4[..., corner].reshape(-1)[order])
        shift = 0 if corner == 0 else (rows4[..., corner] - rows4[..., 0]).reshape(-1)[first]
        grad_table.index_add_(0, unique_rows + shift, summed)


@dataclass
class _Rays:
    """Flattened rays of one render: ``origins``, ``directions`` (B * R, 3), ``depths`` (B * R, S)."""

    origins: torch.Tensor
    directions: torch.Tensor
    depths: torch.Tensor
    rays_per_image: int

    def chunks(self, samples_per_chunk: int):
        n_rays, samples = self.depths.shape
        step = max(1, samples_per_chunk // samples)
        for start in range(0, n_rays, step):
            yield start, min(n_rays, start + step)

    def points(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n * S, 3) sample points of rays [start, stop) and their (n * S,) image index."""
        depths = self.depths[start:stop, :, None]
        # Same op order as the reference (origins + depths * directions) for identical lookups.
        points = self.origins[start:stop, None, :] + depths * self.directions[start:stop, None, :]
        ray = torch.arange(start, stop, device=depths.device)
        image = torch.div(ray, self.rays_per_image, rounding_mode="floor")
        return points.reshape(-1, 3), image[:, None].expand(-1, depths.shape[1]).reshape(-1)


def decode_samples(
    levels: LevelTable,
    mlp: _Mlp,
    rays: _Rays,
    plane_axes: torch.Tensor,
    box_warp: float,
    backend: Backend = "torch",
    samples_per_chunk: int = SAMPLES_PER_CHUNK,
) -> torch.Tensor:
    """Decoder outputs at every sample, without grad: (B * R, S, 4) = (sigma_raw, r, g, b)."""
    n_rays, samples = rays.depths.shape
    out = rays.depths.new_empty(n_rays, samples, 4)
    table = levels.table.detach()
    mlp = _Mlp(*(t.detach() for t in (mlp.hidden_weight, mlp.hidden_bias, mlp.out_weight, mlp.out_bias)))
    compiled = backend == "torch" and _use_compile(table.device, rays.depths.numel())
    with torch.no_grad():
        for start, stop in rays.chunks(samples_per_chunk):
            points, image = rays.points(start, stop)
            rows, weights = _call(rows_from_points, compiled, points, image, plane_axes, levels, box_warp)
            if backend == "triton":
                from g3dr.render.fused_triton import decode_triton

                outputs = _outputs_from_x(decode_triton(table, mlp, rows, weights))
            else:
                outputs = _call(_torch_decode_outputs, compiled, table, *_mlp_tensors(mlp), rows, weights)
            out[start:stop] = outputs.view(stop - start, samples, 4)
    return out


def _composite_backward(
    outputs: torch.Tensor,
    depths: torch.Tensor,
    grad_rgb: torch.Tensor,
    grad_depth: torch.Tensor,
    grad_weight_sum: torch.Tensor,
    grad_scale: torch.Tensor | None,
    density_offset: float,
    sigma_scale: float,
) -> torch.Tensor:
    """Gradient of the marcher's loss w.r.t. the per-sample decoder outputs, by hand.

    Args:
        outputs: (n, S, 4) (sigma_raw, colour) of n rays; depths: (n, S).
        grad_rgb (n, 3), grad_depth (n, 1), grad_weight_sum (n, 1): gradients of the marcher's outputs.
        grad_scale: (n, S - 1, 1) depth kernel, (n, S - 1, 2) its alpha and colour scales
            (:func:`split_grad_scale`), or None.

    Returns:
        (n, S, 4) gradient w.r.t. (sigma_raw, colour) - the formulas torch's autograd applies to
        :func:`composite_from_samples` (cumprod backward as a reversed cumulative sum over the samples).
    """
    raw, colors = outputs[..., 0], outputs[..., 1:]
    deltas = depths[:, 1:] - depths[:, :-1]
    colors_mid = (colors[:, :-1] + colors[:, 1:]) / 2
    raw_mid = (raw[:, :-1] + raw[:, 1:]) / 2 + density_offset
    depths_mid = (depths[:, :-1] + depths[:, 1:]) / 2
    density = F.softplus(raw_mid)
    if sigma_scale != 1.0:
        density = density * sigma_scale
    decay = torch.exp(-(density * deltas))
    alpha = 1 - decay
    keep = 1 - alpha + 1e-10
    transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), keep], 1), 1)[:, :-1]
    weights = alpha * transmittance
    weight_sum = weights.sum(1, keepdim=True)
    denom = weight_sum + 0.001
    depth = torch.sum(weights * depths_mid, 1, keepdim=True) / denom
    # rgb_out = 2 sum(w c) - 1; depth = sum(w t) / (W + 1e-3); W = sum(w).
    grad_weights = (
        2 * (grad_rgb[:, None, :] * colors_mid).sum(-1) + grad_weight_sum + grad_depth * (depths_mid - depth) / denom
    )
    grad_colors_mid = (2 * grad_rgb)[:, None, :] * weights[..., None]
    # w_m = alpha_m * prod_{j<m} keep_j: d/d alpha_i = g_i T_i - sum_{m>i} g_m w_m / keep_i.
    gw = grad_weights * weights
    later = torch.flip(torch.cumsum(torch.flip(gw, [1]), 1), [1]) - gw
    grad_alpha = grad_weights * transmittance - later / keep
    if grad_scale is not None:
        alpha_scale, colour_scale = split_grad_scale(grad_scale)
        grad_alpha = grad_alpha * alpha_scale[..., 0]
        grad_colors_mid = grad_colors_mid * colour_scale
    grad_density = grad_alpha * decay * deltas
    if sigma_scale != 1.0:
        grad_density = grad_density * sigma_scale
    grad_raw_mid = torch.ops.aten.softplus_backward(grad_density, raw_mid, 1.0, MARCHER_SOFTPLUS_THRESHOLD)
    grad = outputs.new_zeros(outputs.shape)
    grad_mid = torch.cat([grad_raw_mid[..., None], grad_colors_mid], -1) / 2
    grad[:, :-1] += grad_mid
    grad[:, 1:] += grad_mid
    return grad


class FusedTriplaneComposite(torch.autograd.Function):
    """Decode and composite the merged samples; backward recomputes per chunk (nothing per-sample is saved).

    ``rgb, depth, weight_sum, weights = FusedTriplaneComposite.apply(table, hidden_weight, hidden_bias,
    out_weight, out_bias, outputs, state)`` where ``table`` is ``LevelTable.table`` (differentiable,
    e.g. built from the planes), the four MLP tensors come from ``decoder.mlp_weights``, ``outputs``
    (B * R, S, 4) are the decoder outputs at the samples computed without grad by
    :func:`decode_samples` from the same inputs, and ``state`` is a :class:`_FusedState`.
    Returns rgb (B * R, 3), depth and weight_sum (B * R, 1) (differentiable in the table and the MLP
    tensors) and the compositing weights (B * R, S - 1, 1) (not differentiable).
    """

    @staticmethod
    def forward(ctx, table, hidden_weight, hidden_bias, out_weight, out_bias, outputs, state):  # noqa: D102
        rays = state.rays
        # (B, R, ...) so that the density cut takes its quantile per image, as on the reference path.
        images = outputs.view(-1, rays.rays_per_image, *outputs.shape[1:])
        comp = composite_from_samples(
            images[..., 1:], images[..., :1], rays.depths.view(*images.shape[:3], 1),
            density_offset=state.density_offset, sigma_scale=state.sigma_scale, cut_quantile=state.cut_quantile,
        )
        ctx.save_for_backward(table, hidden_weight, hidden_bias, out_weight, out_bias)
        ctx.state = state
        weights = comp.weights.flatten(0, 1)
        ctx.mark_non_differentiable(weights)
        return comp.rgb.flatten(0, 1), comp.depth.flatten(0, 1), comp.weight_sum.flatten(0, 1), weights

    @staticmethod
    def backward(ctx, grad_rgb, grad_depth, grad_weight_sum, _grad_weights):  # noqa: D102
        # Backward may run inside the caller's autocast region: the math stays in the inputs' dtype.
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            return FusedTriplaneComposite._backward(ctx, grad_rgb, grad_depth, grad_weight_sum)

    @staticmethod
    def _backward(ctx, grad_rgb, grad_depth, grad_weight_sum):
        table, hidden_weight, hidden_bias, out_weight, out_bias = ctx.saved_tensors
        state: _FusedState = ctx.state
        if state.cut_quantile > 0.0:
            raise RuntimeError("the fused backward does not implement the density cut (cut_quantile > 0): "
                               "cut renders are evaluation renders (render_rays runs them without grad)")
        rays, levels = state.rays, state.levels
        levels = LevelTable(table, levels.offsets, levels.resolutions, levels.batch, levels.planes)
        mlp = _Mlp(hidden_weight, hidden_bias, out_weight, out_bias)
        n_rays, samples = rays.depths.shape
        zeros = rays.depths.new_zeros(n_rays, 1)
        grad_rgb = rays.depths.new_zeros(n_rays, 3) if grad_rgb is None else grad_rgb
        grad_depth = zeros if grad_depth is None else grad_depth
        grad_weight_sum = zeros if grad_weight_sum is None else grad_weight_sum
        grads = _Grads.zeros_like(table, mlp)
        compiled = state.backend == "torch" and _use_compile(table.device, rays.depths.numel())
        for start, stop in rays.chunks(state.samples_per_chunk):
            points, image = rays.points(start, stop)
            rows, weights = _call(rows_from_points, compiled, points, image, state.plane_axes, levels, state.box_warp)
            scale = None if state.grad_scale is None else state.grad_scale[start:stop]
            ray_grads = (rays.depths[start:stop], grad_rgb[start:stop], grad_depth[start:stop],
                         grad_weight_sum[start:stop], scale, state.density_offset, state.sigma_scale)
            if state.backend == "triton":
                from g3dr.render.fused_triton import backward_triton, decode_triton

                grad_x = _grad_x_from_x(decode_triton(table, mlp, rows, weights), *ray_grads)
                backward_triton(table, mlp, rows, weights, grad_x, grads)
                continue
            grad_features, *grad_mlp = _call(_torch_chunk_backward, compiled, table, *_mlp_tensors(mlp), rows,
                                             weights, *ray_grads)
            for total, part in zip(_mlp_tensors(grads), grad_mlp, strict=True):
                total += part
            _scatter_rows(grads.table, rows, weights, grad_features)
        return grads.table, grads.hidden_weight, grads.hidden_bias, grads.out_weight, grads.out_bias, None, None


@dataclass
class _Grads:
    table: torch.Tensor
    hidden_weight: torch.Tensor
    hidden_bias: torch.Tensor
    out_weight: torch.Tensor
    out_bias: torch.Tensor

    @staticmethod
    def zeros_like(table: torch.Tensor, mlp: _Mlp) -> _Grads:
        return _Grads(torch.zeros_like(table), torch.zeros_like(mlp.hidden_weight), torch.zeros_like(mlp.hidden_bias),
                      torch.zeros_like(mlp.out_weight), torch.zeros_like(mlp.out_bias))


@dataclass
class _FusedState:
    """Non-tensor-argument state of :class:`FusedTriplaneComposite` (none of it receives gradients)."""

    rays: _Rays
    levels: LevelTable
    plane_axes: torch.Tensor
    box_warp: float
    density_offset: float
    sigma_scale: float
    grad_scale: torch.Tensor | None
    """(B * R, S - 1, 1) depth kernel, (B * R, S - 1, 2) its alpha and colour scales (``depth_kernel.scales``), or None."""
    backend: Backend
    samples_per_chunk: int
    cut_quantile: float = 0.0
    """3DGP's density cut (forward only)."""


def _default_backend(planes: torch.Tensor) -> Backend:
    """Triton for CUDA tensors when importable, else torch; ``G3DR_FUSED_BACKEND=torch|triton`` overrides."""
    forced = os.environ.get("G3DR_FUSED_BACKEND")
    if forced is not None:
        if forced not in ("torch", "triton"):
            raise ValueError(f"G3DR_FUSED_BACKEND must be 'torch' or 'triton', got {forced!r}")
        return forced
    if planes.is_cuda:
        from g3dr.render.fused_triton import triton_available

        if triton_available():
            return "triton"
    return "torch"


class FusedPrimitives:
    """The fused ``decode`` and ``composite`` (:class:`g3dr.render.renderer.RenderPrimitives`) of one render.

    Built from the planes and a decoder with ``mlp_weights`` (:func:`decoder_supports_fused`): the plane
    pyramid as one :class:`LevelTable` and the MLP's applied weights, in ``geometry_dtype`` = at least
    float32 (bf16 planes or decoders are cast; the casts are differentiable, so gradients reach them in
    their own dtype; the reference runs its decoder in the features' dtype, so bf16 results differ by bf16
    rounding). ``decode`` returns the decoder outputs without grad, chunked over rays; ``composite`` is
    :class:`FusedTriplaneComposite`, whose ``weights`` carry no gradient. Autocast is off in all of it.
    ``backend`` defaults to Triton for CUDA tensors (when importable) and torch otherwise;
    ``samples_per_chunk`` bounds the transient memory.
    """

    def __init__(self, planes: torch.Tensor, decoder, cfg: RendererConfig, plane_axes: torch.Tensor, *,
                 backend: Backend | None = None, samples_per_chunk: int = SAMPLES_PER_CHUNK):
        self.backend = backend or _default_backend(planes)
        self.geometry_dtype = torch.promote_types(planes.dtype, torch.float32)
        with torch.autocast(planes.device.type, enabled=False):
            pyramid = planes_pyramid_from_planes(planes, cfg.plane_resolutions)
            self.levels = table_from_levels([level.to(self.geometry_dtype) for level in pyramid])
            self.mlp = _Mlp(*decoder.mlp_weights(self.geometry_dtype))
        self.plane_axes = plane_axes.to(planes.device)
        self.samples_per_chunk = samples_per_chunk
        self.box_warp, self.density_offset, self.sigma_scale = cfg.box_warp, cfg.density_offset, cfg.sigma_scale

    def decode(self, origins: torch.Tensor, directions: torch.Tensor, depths: torch.Tensor) -> list[torch.Tensor]:
        """[(B, R, S, 4) = (sigma_raw, r, g, b)] at ``depths`` (B, R, S, 1), without grad."""
        with torch.autocast(origins.device.type, enabled=False):
            out = decode_samples(self.levels, self.mlp, _rays_from(origins, directions, depths), self.plane_axes,
                                 self.box_warp, self.backend, self.samples_per_chunk)
        return [out.view(*depths.shape[:2], -1, 4)]

    def composite(self, origins: torch.Tensor, directions: torch.Tensor, depths: torch.Tensor,
                  values: list[torch.Tensor], *, grad_scale: torch.Tensor | None = None,
                  cut_quantile: float = 0.0) -> Composite:
        """The marcher on ``decode``'s values; ``grad_scale`` (B, R, S - 1, 1 or 2) acts in the backward."""
        (outputs,) = values
        batch, rays_per_image, samples = depths.shape[:3]
        if grad_scale is not None:
            grad_scale = grad_scale.reshape(batch * rays_per_image, samples - 1, -1)
        state = _FusedState(
            rays=_rays_from(origins, directions, depths), levels=self.levels, plane_axes=self.plane_axes,
            box_warp=self.box_warp, density_offset=self.density_offset, sigma_scale=self.sigma_scale,
            grad_scale=grad_scale, backend=self.backend, samples_per_chunk=self.samples_per_chunk,
            cut_quantile=cut_quantile,
        )
        with torch.autocast(origins.device.type, enabled=False):
            rgb, depth, weight_sum, weights = FusedTriplaneComposite.apply(
                self.levels.table, *_mlp_tensors(self.mlp), outputs.reshape(-1, samples, 4), state
            )
        weights = weights.view(batch, rays_per_image, samples - 1, 1)
        depths_mid = (depths[:, :, :-1] + depths[:, :, 1:]) / 2
        return Composite(
            rgb=rgb.view(batch, rays_per_image, 3),
            depth=depth.view(batch, rays_per_image, 1),
            depth_3dgp=torch.sum(weights * depths_mid, -2),  # the marcher's formula (no gradient here)
            weights=weights,
            weight_sum=weight_sum.view(batch, rays_per_image, 1),
            depths_mid=depths_mid,
        )


def _rays_from(origins: torch.Tensor, directions: torch.Tensor, depths: torch.Tensor) -> _Rays:
    """The flattened rays (B * R) of (B, R, 3) origins and directions and (B, R, S, 1) depths."""
    batch, rays_per_image = depths.shape[:2]
    return _Rays(origins.detach().reshape(-1, 3), directions.detach().reshape(-1, 3),
                 depths.reshape(batch * rays_per_image, -1), rays_per_image)
