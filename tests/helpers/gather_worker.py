"""torchrun worker for the multi-rank gathering test: ``torchrun --nproc-per-node 2 gather_worker.py OUT N...``.

Each rank takes its block of sample indices, computes deterministic per-sample rows, gathers them and
all-reduces their moments, and saves what it ended up with to ``OUT/rank{R}.pt`` for the test to check.
"""

from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as tdist

from g3dr.distributed import all_ranks_true, broadcast_object, resolve_dist_env
from g3dr.metrics.fid import FeatureMoments
from g3dr.metrics.gather import all_reduce_moments, gather_rows, shard_range


def sample_rows(indices: torch.Tensor) -> torch.Tensor:
    """Per-sample "features" that depend only on the sample index (as a seeded render would)."""
    i = indices.double().unsqueeze(1)
    return torch.cat([i, i.square() / 7, torch.sin(i), torch.cos(3 * i), torch.full_like(i, 0.5)], dim=1).float()


def main() -> None:
    out, sizes = sys.argv[1], [int(v) for v in sys.argv[2:]]
    env = resolve_dist_env()
    tdist.init_process_group("gloo", rank=env.rank, world_size=env.world_size, timeout=timedelta(minutes=2))
    results = {"world_size": env.world_size}
    for n in sizes:
        block = shard_range(n)
        idx = torch.tensor(list(block), dtype=torch.int64)
        rows = sample_rows(idx)
        local = FeatureMoments(rows.shape[1])
        if len(block):
            local.update(rows)
        total = all_reduce_moments(local)
        results[n] = {
            "local": idx,
            "indices": gather_rows(idx),
            "rows": gather_rows(rows),
            "count": total.count,
            "sum": torch.from_numpy(total.sum),
            "outer_sum": torch.from_numpy(total.outer_sum),
        }
    results["broadcast"] = broadcast_object({"from": env.rank})
    results["all_true"] = all_ranks_true(True)
    results["one_false"] = all_ranks_true(env.rank != 1)
    torch.save(results, f"{out}/rank{env.rank}.pt")
    tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
