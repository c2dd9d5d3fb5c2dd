"""Exact multi-rank evaluation: split N samples across ranks, gather results with none lost or repeated.

Unlike the EG3D/StyleGAN metric loop (which pads every rank to the same count by wrapping around the
dataset and keeps the first N gathered items, so some samples count twice), each rank here owns a
contiguous block of sample indices, :func:`gather_rows` concatenates the blocks in rank order (padding
only for the collective, then trimming), and :func:`all_reduce_moments` sums float64 moments. The result
equals the single-process computation exactly, for any N and world size.

Works with or without an initialised ``torch.distributed`` process group (gloo on CPU, NCCL on GPU);
without one (or with one rank) every function is the identity. The generic collectives (``broadcast_object``,
``all_ranks_true``) and the process group itself are :mod:`g3dr.distributed`'s.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

from g3dr.distributed import collective_device, rank_and_world_size
from g3dr.metrics.fid import FeatureMoments


def shard_range(num_samples: int, rank: int | None = None, world_size: int | None = None) -> range:
    """The contiguous block of sample indices owned by ``rank``: ``[rank N // W, (rank + 1) N // W)``.

    Blocks of all ranks partition ``range(num_samples)``; sizes differ by at most one. Defaults to the
    current process group's rank and size.
    """
    if rank is None or world_size is None:
        rank, world_size = rank_and_world_size()
    if num_samples < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad shard request: {num_samples} samples, rank {rank}, world size {world_size}")
    return range(rank * num_samples // world_size, (rank + 1) * num_samples // world_size)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` ``(n_rank, ...)`` along dim 0, in rank order, on every rank.

    Ranks may hold different numbers of rows (uneven shards give ranks different batch counts), including
    zero; a rank with no rows may pass any empty tensor (``torch.zeros(0)``): it takes the trailing shape
    and dtype of the ranks that have rows. Ranks with rows must agree on both, else every rank raises the
    same ValueError (no rank is left waiting in a collective). Returns a CPU tensor with exactly
    ``sum(n_rank)`` rows.
    """
    rank, world = rank_and_world_size()
    if world == 1:
        return x.detach().cpu()
    device = collective_device()
    local = x.detach()
    # One small object gather: rows, trailing shape and dtype of every rank (the collective shapes below
    # must match on all ranks, or gloo/NCCL would fail or wait).
    metas: list[Any] = [None] * world
    tdist.all_gather_object(metas, (int(local.shape[0]) if local.dim() else 0, tuple(local.shape[1:]),
                                    str(local.dtype).removeprefix("torch.")))
    sizes = [m[0] for m in metas]
    layouts = {(m[1], m[2]) for m in metas if m[0] > 0}
    if len(layouts) > 1:
        raise ValueError(f"gather_rows: ranks hold rows of different shapes or dtypes: {metas}")
    if not layouts:
        return local.reshape(0, *local.shape[1:]).cpu() if local.dim() else local.reshape(0).cpu()
    trailing, dtype_name = layouts.pop()
    dtype = getattr(torch, dtype_name)
    local = local.to(device=device, dtype=dtype).reshape(sizes[rank], *trailing).contiguous()
    width = max(sizes)
    padded = torch.zeros((width, *trailing), dtype=dtype, device=device)
    padded[: sizes[rank]] = local
    buffers = [torch.empty_like(padded) for _ in range(world)]
    tdist.all_gather(buffers, padded)
    return torch.cat([b[:n] for b, n in zip(buffers, sizes)], dim=0).cpu()


def all_reduce_moments(moments: FeatureMoments) -> FeatureMoments:
    """Sum the float64 moments of all ranks (each over its own samples); returns a new accumulator."""
    rank, world = rank_and_world_size()
    out = FeatureMoments(moments.dim)
    if world == 1:
        out.merge(moments)
        return out
    device = collective_device()
    flat = torch.cat([
        torch.tensor([float(moments.count)], dtype=torch.float64),
        torch.from_numpy(moments.sum),
        torch.from_numpy(moments.outer_sum).flatten(),
    ]).to(device)
    tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
    flat = flat.cpu().numpy()
    out.count = int(round(flat[0]))
    out.sum = flat[1:1 + moments.dim].copy()
    out.outer_sum = flat[1 + moments.dim:].reshape(moments.dim, moments.dim).copy()
    return out


def as_numpy(x: torch.Tensor) -> np.ndarray:
    """CPU float64 numpy copy of a tensor (metrics compute in float64)."""
    return x.detach().cpu().double().numpy()
