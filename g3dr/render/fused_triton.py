"""Triton kernels of the fused renderer (``g3dr.render.fused``, backend ``triton``).

Two kernels over blocks of samples, each given the table rows and bilinear weights of every sample's
lookups (``rows_from_points``: N x K, K = 3 planes x 3 levels x 4 corners):

- ``_decode_kernel``: feature = sum_k weight * table[row] (channels-last rows, so each lookup is one
  contiguous C-vector load), then the decoder MLP (``tl.dot`` in IEEE fp32, softplus, 4 output dot
  products) -> the raw decoder output x (N, 4). Nothing else is written.
- ``_backward_kernel``: recomputes feature and hidden activations, takes dL/dx (N, 4) (from the
  marcher's backward, torch code shared with the CPU path), backpropagates the MLP and scatters
  ``weight * dL/dfeature`` into the table gradient with atomic adds; the MLP weight gradients are
  reduced per block and added atomically.

Runs on CUDA tensors; on the CPU only under ``TRITON_INTERPRET=1`` (the tests do this at small sizes).
Must not: hold state, or differ in numbers from the torch backend beyond float rounding.
"""

from __future__ import annotations

import os

import torch

from g3dr.models.decoder import SOFTPLUS_THRESHOLD

__all__ = ["triton_available", "decode_triton", "backward_triton"]

try:  # triton ships with CUDA builds of torch; CPU-only installs may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None


def triton_available() -> bool:
    """Whether the Triton backend can run here: triton importable, and CUDA or the interpreter."""
    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


BLOCK_N = 64
"""Samples per program."""


def _block(n: int) -> int:
    """Power of two >= max(n, 16) (``tl.dot`` needs dimensions of at least 16)."""
    return max(16, triton.next_power_of_2(n))


if triton is not None:

    @triton.jit
    def _features(table_ptr, rows_ptr, weights_ptr, offs_n, mask_n, offs_c, mask_c, C, K,
                  BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """(BLOCK_N, BLOCK_C) features: sum over the K lookups of weight * table row."""
        feat = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for k in range(K):
            row = tl.load(rows_ptr + offs_n * K + k, mask=mask_n, other=0).to(tl.int64)
            w = tl.load(weights_ptr + offs_n * K + k, mask=mask_n, other=0.0)
            vals = tl.load(table_ptr + row[:, None] * C + offs_c[None, :],
                           mask=mask_n[:, None] & mask_c[None, :], other=0.0)
            feat += w[:, None] * vals
        return feat

    @triton.jit
    def _hidden_pre(feat, w1_ptr, b1_ptr, offs_c, mask_c, offs_h, mask_h, C):
        """Pre-activations feat @ W1^T + b1; W1 is (H, C) row-major."""
        w1t = tl.load(w1_ptr + offs_h[None, :] * C + offs_c[:, None], mask=mask_c[:, None] & mask_h[None, :], other=0.0)
        b1 = tl.load(b1_ptr + offs_h, mask=mask_h, other=0.0)
        return tl.dot(feat, w1t, input_precision="ieee") + b1[None, :]

    @triton.jit
    def _softplus(x, THRESHOLD: tl.constexpr):
        # max(x, 0) + log(1 + exp(-|x|)): stable; identity above the threshold as F.softplus.
        soft = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
        return tl.where(x > THRESHOLD, x, soft)

    @triton.jit
    def _program_forward(table_ptr, rows_ptr, weights_ptr, w1_ptr, b1_ptr, N, C, H, K, BLOCK_N: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, THRESHOLD: tl.constexpr):
        """This program's sample, channel and hidden offsets with their masks, and its samples' features,
        hidden pre-activations and hidden activations (0 in the padding columns)."""
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_c = tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        offs_h = tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        feat = _features(table_ptr, rows_ptr, weights_ptr, offs_n, mask_n, offs_c, mask_c, C, K, BLOCK_N, BLOCK_C)
        pre = _hidden_pre(feat, w1_ptr, b1_ptr, offs_c, mask_c, offs_h, mask_h, C)
        hidden = tl.where(mask_h[None, :], _softplus(pre, THRESHOLD), 0.0)
        return offs_n, mask_n, offs_c, mask_c, offs_h, mask_h, feat, pre, hidden

    @triton.jit
    def _decode_kernel(table_ptr, rows_ptr, weights_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
                       N, C, H, K, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                       THRESHOLD: tl.constexpr):
        offs_n, mask_n, _, _, offs_h, mask_h, _, _, hidden = _program_forward(
            table_ptr, rows_ptr, weights_ptr, w1_ptr, b1_ptr, N, C, H, K, BLOCK_N, BLOCK_C, BLOCK_H, THRESHOLD)
        for j in range(4):
            w2 = tl.load(w2_ptr + j * H + offs_h, mask=mask_h, other=0.0)
            x = tl.sum(hidden * w2[None, :], axis=1) + tl.load(b2_ptr + j)
            tl.store(out_ptr + offs_n * 4 + j, x, mask=mask_n)

    @triton.jit
    def _backward_kernel(table_ptr, rows_ptr, weights_ptr, w1_ptr, b1_ptr, w2_ptr, grad_x_ptr,
                         grad_table_ptr, grad_w1_ptr, grad_b1_ptr, grad_w2_ptr,
                         N, C, H, K, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                         THRESHOLD: tl.constexpr):
        offs_n, mask_n, offs_c, mask_c, offs_h, mask_h, feat, pre, hidden = _program_forward(
            table_ptr, rows_ptr, weights_ptr, w1_ptr, b1_ptr, N, C, H, K, BLOCK_N, BLOCK_C, BLOCK_H, THRESHOLD)
        grad_hidden = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
        for j in range(4):
            gx = tl.load(grad_x_ptr + offs_n * 4 + j, mask=mask_n, other=0.0)
            w2 = tl.load(w2_ptr + j * H + offs_h, mask=mask_h, other=0.0)
            grad_hidden += gx[:, None] * w2[None, :]
            tl.atomic_add(grad_w2_ptr + j * H + offs_h, tl.sum(gx[:, None] * hidden, axis=0), mask=mask_h)
        # softplus backward (torch's): above the threshold the gradient passes unchanged.
        z = tl.exp(tl.minimum(pre, THRESHOLD))
        grad_pre = tl.where(pre > THRESHOLD, grad_hidden, grad_hidden * z / (z + 1.0))
        grad_pre = tl.where(mask_n[:, None] & mask_h[None, :], grad_pre, 0.0)
        tl.atomic_add(grad_b1_ptr + offs_h, tl.sum(grad_pre, axis=0), mask=mask_h)
        grad_w1 = tl.dot(tl.trans(grad_pre), feat, input_precision="ieee")  # (BLOCK_H, BLOCK_C)
        tl.atomic_add(grad_w1_ptr + offs_h[:, None] * C + offs_c[None, :], grad_w1,
                      mask=mask_h[:, None] & mask_c[None, :])
        w1 = tl.load(w1_ptr + offs_h[:, None] * C + offs_c[None, :], mask=mask_h[:, None] & mask_c[None, :], other=0.0)
        grad_feat = tl.dot(grad_pre, w1, input_precision="ieee")  # (BLOCK_N, BLOCK_C)
        for k in range(K):
            row = tl.load(rows_ptr + offs_n * K + k, mask=mask_n, other=0).to(tl.int64)
            w = tl.load(weights_ptr + offs_n * K + k, mask=mask_n, other=0.0)
            tl.atomic_add(grad_table_ptr + row[:, None] * C + offs_c[None, :], w[:, None] * grad_feat,
                          mask=mask_n[:, None] & mask_c[None, :])


def _check(table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> None:
    if not triton_available():
        raise RuntimeError("the Triton backend needs triton and a CUDA device (or TRITON_INTERPRET=1)")
    if table.dtype != torch.float32:
        raise TypeError(f"the Triton backend computes in float32, got a {table.dtype} table; use the torch backend")
    if rows.shape != weights.shape:
        raise ValueError(f"rows {tuple(rows.shape)} and weights {tuple(weights.shape)} differ")


def decode_triton(table: torch.Tensor, mlp, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Raw decoder outputs x (N, 4) of the samples whose lookups are ``rows``/``weights`` (N, K)."""
    _check(table, rows, weights)
    n, k = rows.shape
    hidden, channels = mlp.hidden_weight.shape
    out = torch.empty(n, 4, dtype=table.dtype, device=table.device)
    grid = (triton.cdiv(n, BLOCK_N),)
    _decode_kernel[grid](
        table.contiguous(), rows.contiguous(), weights.contiguous(), mlp.hidden_weight.detach().contiguous(),
        mlp.hidden_bias.detach().contiguous(), mlp.out_weight.detach().contiguous(), mlp.out_bias.detach().contiguous(),
        out, n, channels, hidden, k, BLOCK_N=BLOCK_N, BLOCK_C=_block(channels), BLOCK_H=_block(hidden),
        THRESHOLD=SOFTPLUS_THRESHOLD,
    )
    return out


def backward_triton(table: torch.Tensor, mlp, rows: torch.Tensor, weights: torch.Tensor, grad_x: torch.Tensor,
                    grads) -> None:
    """Accumulate into ``grads`` (table, hidden_weight, hidden_bias, out_weight, out_bias) the gradients
    of the samples' raw outputs x, given dL/dx (N, 4)."""
    _check(table, rows, weights)
    n, k = rows.shape
    hidden, channels = mlp.hidden_weight.shape
    grid = (triton.cdiv(n, BLOCK_N),)
    _backward_kernel[grid](
        table.detach().contiguous(), rows.contiguous(), weights.contiguous(), mlp.hidden_weight.detach().contiguous(),
        mlp.hidden_bias.detach().contiguous(), mlp.out_weight.detach().contiguous(), grad_x.contiguous(),
        grads.table, grads.hidden_weight, grads.hidden_bias, grads.out_weight,
        n, channels, hidden, k, BLOCK_N=BLOCK_N, BLOCK_C=_block(channels), BLOCK_H=_block(hidden),
        THRESHOLD=SOFTPLUS_THRESHOLD,
    )
    grads.out_bias += grad_x.sum(0)
