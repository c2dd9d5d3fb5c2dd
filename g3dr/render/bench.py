"""``g3dr bench renderer``: forward + backward of the fused and reference renderers in one run (one JSON line).

Each path runs in its own child process (``python -m g3dr.render.bench --child ...``) on identical
random inputs (planes, decoder weights, cameras and sampling draws all come from ``--seed``), so that
each measures its own peak memory:

- CPU: the peak resident set size of the child (``ru_maxrss``, over warm-up and timed runs) minus its
  RSS right before the first render (inputs allocated, nothing rendered yet). ``tracemalloc`` cannot be used: it only sees
  Python-level allocations, not tensor storage.
- CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the first render.

Times are wall-clock seconds of ``render_rays`` + ``backward`` (the best of ``--repeats`` after
``--warmup`` untimed runs), and the process CPU seconds of the same runs (all threads; steadier than
wall time on a shared machine). The error is ``max |fused - reference| / max |reference|`` over the rendered
rgb/depth/weight_sum and the gradients w.r.t. the planes and every decoder parameter (the worst one).
Registering stays cheap: no torch import at module top.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from g3dr.bench import rss_bytes, run_child


def register_bench(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser(
        "renderer", help="fused vs reference renderer, forward + backward (time, peak memory, error)",
        description="Render random triplanes with both renderer paths and print one JSON line. Defaults are "
                    "the training configuration (batch 2, 128x128 rays, 32+32 samples, C=64).")
    _add_arguments(parser)
    parser.set_defaults(handler=_run)


_ARGUMENTS = ("batch", "resolution", "num_coarse", "num_fine", "channels", "hidden", "plane_resolution", "device",
              "repeats", "warmup", "canonical", "seed")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=128, help="rendered image side (rays = side^2)")
    parser.add_argument("--num-coarse", type=int, default=32)
    parser.add_argument("--num-fine", type=int, default=32)
    parser.add_argument("--channels", type=int, default=64, help="triplane channels C")
    parser.add_argument("--hidden", type=int, default=64, help="decoder hidden width")
    parser.add_argument("--plane-resolution", type=int, default=128, help="planes are this, /2, /4")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per path (the best is reported)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed runs per path before timing (the fused path compiles its lookups in the first)")
    parser.add_argument("--canonical", action="store_true",
                        help="canonical view with a depth prior: depth-prior samples and the depth kernel")
    parser.add_argument("--seed", type=int, default=0)


def _run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="g3dr-bench-renderer-") as tmp:
        results = {}
        for impl in ("fused", "reference"):
            out = Path(tmp) / f"{impl}.pt"
            cmd = [impl, "--out", str(out)]
            for key in _ARGUMENTS:
                value = getattr(args, key)
                flag = "--" + key.replace("_", "-")
                if isinstance(value, bool):
                    cmd += [flag] if value else []
                else:
                    cmd += [flag, str(value)]
            run_child("g3dr.render.bench", cmd, f"bench child for {impl}")
            results[impl] = out
        import torch

        fused = torch.load(results["fused"], weights_only=True)
        ref = torch.load(results["reference"], weights_only=True)
    errors = {name: float((fused["tensors"][name] - t).abs().max() / t.abs().max().clamp_min(1e-30))
              for name, t in ref["tensors"].items()}
    worst = max(errors, key=errors.get)
    line = {
        "bench": "renderer",
        "device": fused["device"],
        "threads": fused["threads"],
        "config": {k: getattr(args, k) for k in ("batch", "resolution", "num_coarse", "num_fine", "channels",
                                                 "hidden", "plane_resolution", "canonical", "repeats", "warmup")},
        "fused_s": round(fused["seconds"], 4),
        "reference_s": round(ref["seconds"], 4),
        "speedup": round(ref["seconds"] / fused["seconds"], 3),
        "fused_cpu_s": round(fused["cpu_seconds"], 4),
        "reference_cpu_s": round(ref["cpu_seconds"], 4),
        "cpu_time_ratio": round(fused["cpu_seconds"] / ref["cpu_seconds"], 3),
        "fused_peak_mib": round(fused["peak_bytes"] / 2**20, 1),
        "reference_peak_mib": round(ref["peak_bytes"] / 2**20, 1),
        "memory_ratio": round(fused["peak_bytes"] / max(ref["peak_bytes"], 1), 4),
        "memory_measure": fused["memory_measure"],
        "max_rel_error": errors[worst],
        "max_rel_error_of": worst,
    }
    print(json.dumps(line))
    return 0


def _child(args: argparse.Namespace) -> None:
    import math
    import resource
    import time

    import torch

    from g3dr.config import ModelConfig, RendererConfig
    from g3dr.models.decoder import TriplaneDecoder
    from g3dr.render import camera_to_world_from_angles, rays_from_cameras, render_rays

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    res = args.plane_resolution
    planes = (torch.randn(args.batch, 3, args.channels, res, res, generator=gen)).to(device).requires_grad_()
    decoder = TriplaneDecoder(ModelConfig(triplane_channels=args.channels, decoder_hidden=args.hidden)).to(device)
    yaw = math.pi / 2 + (torch.rand(args.batch, generator=gen, dtype=torch.float64) - 0.5) * 0.5
    pitch = math.pi / 2 + (torch.rand(args.batch, generator=gen, dtype=torch.float64) - 0.5) * 0.3
    if args.canonical:
        yaw, pitch = torch.full_like(yaw, math.pi / 2), torch.full_like(pitch, math.pi / 2)
    cam2world = camera_to_world_from_angles(yaw, pitch, 5.0).float().to(device)
    origins, directions = rays_from_cameras(cam2world, 18.0, args.resolution)
    prior = None
    if args.canonical:
        prior = (5.0 + 0.4 * (torch.rand(args.batch, origins.shape[1], 1, generator=gen) - 0.5)).to(device)
    cfg = RendererConfig(impl=args.child, num_coarse=args.num_coarse, num_fine=args.num_fine,
                         plane_resolutions=(res, res // 2, res // 4))
    weights_rgb = torch.randn(3, generator=gen).to(device)
    params = [planes, *decoder.parameters()]

    def step():
        sample_gen = torch.Generator(device=device).manual_seed(args.seed + 1)
        result = render_rays(planes, decoder, origins, directions, cfg, depth_prior=prior,
                             use_depth_kernel=prior is not None, generator=sample_gen)
        loss = (result.rgb * weights_rgb).sum() + 0.1 * (result.depth ** 2).sum() + result.weight_sum.sum()
        grads = torch.autograd.grad(loss, params)
        return result, grads

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    base = rss_bytes()  # CPU: before any render (warm-up included in the peak; freed heap stays resident)
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    best, best_cpu = math.inf, math.inf
    result = grads = None
    for _ in range(max(1, args.repeats)):
        result = grads = None  # free the previous run's outputs before the next
        start, start_cpu = time.perf_counter(), time.process_time()
        result, grads = step()
        sync()
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    if device.type == "cuda":
        peak, measure = torch.cuda.max_memory_allocated() - base, "cuda max_memory_allocated delta"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        measure = "peak RSS (ru_maxrss) minus RSS before the first render"
    names = ["planes"] + [f"decoder.{n}" for n, _ in decoder.named_parameters()]
    tensors = {"rgb": result.rgb, "depth": result.depth, "weight_sum": result.weight_sum}
    tensors.update({f"grad.{n}": g for n, g in zip(names, grads, strict=True)})
    torch.save({"seconds": best, "cpu_seconds": best_cpu, "peak_bytes": peak, "memory_measure": measure, "device": str(device),
                "threads": torch.get_num_threads(),
                "tensors": {k: v.detach().cpu() for k, v in tensors.items()}}, args.out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="child process of g3dr bench renderer")
    _add_arguments(parser)
    parser.add_argument("--child", choices=("fused", "reference"), required=True)
    parser.add_argument("--out", required=True)
    _child(parser.parse_args(argv))


if __name__ == "__main__":
    main()
