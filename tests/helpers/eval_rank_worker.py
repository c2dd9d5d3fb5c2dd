"""torchrun worker: ``torchrun --nproc-per-node 2 eval_rank_worker.py OUT INCEPTION`` evaluates the tiny
model of :func:`setup` on its block of samples and saves the gathered scores to ``OUT/rank{R}.json`` (and the
scored images of its samples to ``OUT/images/<view>_s<scale>/``)."""

from __future__ import annotations

import dataclasses
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as tdist

REPO = Path(__file__).resolve().parents[2]
NUM_SAMPLES = 7  # odd: the ranks hold 3 and 4 samples


def setup(inception: str):
    """The model, config, input stream and spec shared by the workers and the single-process reference."""
    from g3dr.config import load_config
    from g3dr.eval.evaluate import EvalSpec
    from g3dr.metrics.inception import load_inception
    from g3dr.models.f_trigen import FTrigen

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    torch.manual_seed(0)
    model = FTrigen(cfg).eval()
    gen = torch.Generator().manual_seed(3)
    rgb = torch.rand(9, 3, 32, 32, generator=gen) * 2 - 1
    depth = 4.5 + torch.rand(9, 1, 32, 32, generator=gen)
    # two stored ground-truth views per sample (random pixels, cameras in the training range, some invalid pixels)
    views = {"rgb": torch.rand(9, 2, 3, 32, 32, generator=gen) * 2 - 1,
             "depth": 4.5 + torch.rand(9, 2, 32, 32, generator=gen),
             "valid": torch.rand(9, 2, 32, 32, generator=gen) > 0.2,
             "yaw": 1.5708 + (torch.rand(9, 2, generator=gen, dtype=torch.float64) - 0.5),
             "pitch": 1.5708 + (torch.rand(9, 2, generator=gen, dtype=torch.float64) - 0.5) * 0.3,
             "radius": torch.full((9,), 5.0, dtype=torch.float64),
             "fov_degrees": torch.full((9,), 18.0, dtype=torch.float64)}
    stream = [{"rgb": rgb[i:i + 4], "depth": depth[i:i + 4], "views": {k: v[i:i + 4] for k, v in views.items()}}
              for i in range(0, 9, 4)]
    spec = dataclasses.replace(EvalSpec.from_config(cfg), metrics=("is", "nfs", "da", "gt_views"),
                               num_samples=NUM_SAMPLES, fid_samples=NUM_SAMPLES, is_splits=2)
    return cfg, model, stream, spec, load_inception(inception)


def main() -> None:
    from g3dr.distributed import resolve_dist_env
    from g3dr.eval.evaluate import evaluate_model

    out, inception = sys.argv[1], sys.argv[2]
    env = resolve_dist_env()
    tdist.init_process_group("gloo", rank=env.rank, world_size=env.world_size, timeout=timedelta(minutes=3))
    cfg, model, stream, spec, detector = setup(inception)
    results, _ = evaluate_model(model, cfg, stream, spec, detector, None, batch_size=2, progress=False,
                                image_dir=Path(out) / "images")  # each rank writes the PNGs of its samples
    Path(out, f"rank{env.rank}.json").write_text(json.dumps(results))
    tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
