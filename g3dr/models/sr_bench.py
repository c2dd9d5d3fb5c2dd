"""``g3dr bench sr``: the super-resolution forward pass (inference, no grad), per architecture (one JSON line).

The architectures are the ``sr`` sections of two configs: ``paper`` (``configs/imagenet128.yaml``: RCAN's
published 10 groups x 20 blocks, 64 features) and ``tiny`` (``configs/tiny.yaml``). Each runs in a fresh child
process (``python -m g3dr.models.sr_bench --child ...``) on random weights (inference costs the same as with
trained ones) and random RGB of ``--batch`` x ``--resolution`` px, upscaled by the config's ``sr.scale``, exactly
as ``g3dr render --sr`` runs it (:class:`~g3dr.models.sr.SuperResolution` in eval mode under ``torch.no_grad``):

- time: wall seconds per batch, mean (and best) of ``--repeats`` timed runs after ``--warmup`` untimed ones,
  and the process CPU seconds of the same runs (all threads; steadier on a shared machine); ``images_per_s`` is
  ``batch`` over the mean wall time;
- memory on CPU: ``peak_mib`` is the child's peak resident set size (``ru_maxrss``, warm-up included) minus its
  RSS right before the first forward (network and input built), i.e. what the forward pass adds;
  ``peak_rss_mib`` is the absolute high-water mark; on CUDA ``torch.cuda.max_memory_allocated`` minus the
  memory allocated before the first forward.

Registering stays cheap: no torch import at module top.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from g3dr.bench import add_config_arguments, comma_list, rss_bytes, run_child

CONFIG_NAMES = ("paper", "tiny")


def register_bench(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser(
        "sr", help="super-resolution forward pass (images/s, peak memory), paper vs tiny architecture",
        description="Upscale random RGB with the sr architecture of each config (random weights, no grad, eval "
                    "mode), each in a fresh process, and print one JSON line. Default: 128 -> 256 px, batch 1.")
    add_config_arguments(parser, CONFIG_NAMES)
    parser.add_argument("--batch", type=int, default=1, help="images per forward pass (default 1)")
    parser.add_argument("--resolution", type=int, default=128, help="input side in px (default 128: the render)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward passes (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forward passes before timing (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from g3dr.errors import ConfigError

    names = comma_list(args.configs, CONFIG_NAMES, "--configs")
    if args.batch < 1 or args.resolution < 1 or args.repeats < 1 or args.warmup < 0:
        raise ConfigError("--batch, --resolution and --repeats must be >= 1 and --warmup >= 0")
    cases: dict[str, Any] = {}
    common: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="g3dr-bench-sr-") as tmp:
        for name in names:
            out = Path(tmp) / f"{name}.json"
            run_child("g3dr.models.sr_bench",
                      ["--config", getattr(args, f"{name}_config"), "--batch", str(args.batch), "--resolution",
                       str(args.resolution), "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--device",
                       args.device, "--seed", str(args.seed), "--out", str(out)],
                      f"bench sr child ({name})")
            result = json.loads(out.read_text())
            for key in ("device", "threads", "memory_measure"):
                common[key] = result.pop(key)
            cases[name] = result
    line = {"bench": "sr", **common, "batch": args.batch, "input_resolution": args.resolution,
            "repeats": args.repeats, "warmup": args.warmup, "cases": cases}
    print(json.dumps(line))
    return 0


def _child(args: argparse.Namespace) -> None:
    import math
    import resource
    import time

    import torch

    from g3dr.config import load_config
    from g3dr.models.sr import build_sr

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cfg = load_config(args.config)
    torch.manual_seed(args.seed)
    model = build_sr(cfg.sr).to(device).eval()
    gen = torch.Generator().manual_seed(args.seed)
    rgb = (torch.rand(args.batch, 3, args.resolution, args.resolution, generator=gen) * 2 - 1).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    base = rss_bytes()
    with torch.no_grad():
        for _ in range(args.warmup):
            out = model(rgb)
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times, cpu_times = [], []
        for _ in range(args.repeats):
            out = None  # free the previous output before the next run
            start, start_cpu = time.perf_counter(), time.process_time()
            out = model(rgb)
            sync()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - start_cpu)
    if device.type == "cuda":
        absolute = torch.cuda.max_memory_allocated()
        peak, measure = absolute - base, "cuda max_memory_allocated minus allocated before the first forward"
    else:
        absolute = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = absolute - base
        measure = ("peak RSS (getrusage ru_maxrss) of a fresh process per case minus its RSS right before the "
                   "first forward (network and input built)")
    if not bool(torch.isfinite(out).all()) or tuple(out.shape[-2:]) != (args.resolution * model.scale,) * 2:
        raise RuntimeError(f"bad super-resolution output {tuple(out.shape)}")
    mean = sum(times) / len(times)
    result = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "memory_measure": measure,
        "config": args.config,
        "architecture": model.architecture,
        "params": sum(p.numel() for p in model.parameters()),
        "output_resolution": args.resolution * model.scale,
        "s_per_batch": round(mean, 4),
        "s_per_batch_best": round(min(times), 4),
        "cpu_s_per_batch": round(sum(cpu_times) / len(cpu_times), 4),
        "images_per_s": round(args.batch / mean, 4) if mean > 0 else math.inf,
        "peak_mib": round(peak / 2**20, 1),
        "peak_rss_mib": round(absolute / 2**20, 1),
    }
    Path(args.out).write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="child process of g3dr bench sr")
    parser.add_argument("--child", action="store_true", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--resolution", type=int, required=True)
    parser.add_argument("--repeats", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    _child(parser.parse_args(argv))


if __name__ == "__main__":
    main()
