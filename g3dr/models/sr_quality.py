"""``g3dr bench sr-psnr``: does a super-resolution network beat bicubic upsampling of the same render? (one JSON line)

For every sample of a shard set that stores the input size R (the generator's ``data.resolution``) and the target
size T = ``scale`` x R, the frozen f_trigen renders the canonical view of the stored R px input with its
pseudo-depth (deterministic renderer, as the eval renders: no jitter, the same picture on every run; or, with
``--jitter-seed S``, the stochastic renderer training uses, its draws from a generator seeded with S), and that
render is upsampled to
T twice: by the SR network (clamped, as ``g3dr render --sr`` runs it) and bicubically (``F.interpolate``,
``align_corners=False``, clamped). Both are scored by PSNR against the image at T: for a synthetic set (its
manifest says ``layout: synthetic``) the scene rendered again at T by :func:`g3dr.data.synth.synth_sample`, exactly
the pixels the shard writer encoded (the stored copy is a JPEG); otherwise, or with ``--stored-target``, the
stored image at T (never upsampled). Context rows: the render vs the stored input at R, and the bicubic / SR
upsampling of the stored input itself (what each does from a perfect R px image).

PSNR per image on [0, 1] RGB (``10 log10(1 / MSE)``, float64), averaged over images; the SR - bicubic
difference is paired per image, with its standard error and the fraction of images where SR wins.
Registering stays cheap: no torch import at module top.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def register_bench(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser(
        "sr-psnr", help="PSNR of a super-resolution network vs bicubic upsampling of the same f_trigen renders",
        description="Render every sample's canonical view with the frozen f_trigen, upsample it with the SR network "
                    "and bicubically, and print one JSON line of PSNRs against the image at the target size "
                    "(docs/science.md, 'Super-resolution stage').")
    parser.add_argument("--generator", required=True, metavar="F_TRIGEN", help="f_trigen .safetensors")
    parser.add_argument("--sr", required=True, metavar="SR", help="super-resolution weights (load_sr)")
    parser.add_argument("--data", required=True, metavar="SHARDS",
                        help="held-out shards storing the input size and the target size (a folder or pattern)")
    parser.add_argument("--samples", type=int, default=0, help="score the first N samples (default 0: all)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--stored-target", action="store_true",
                        help="score against the stored image at the target size even for a synthetic set")
    parser.add_argument("--jitter-seed", type=int, default=None, metavar="S",
                        help="render stochastically as training does (jitter, depth-prior draws) from a generator "
                             "seeded with S (default: the deterministic renderer of the eval)")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    result = measure(args.generator, args.sr, args.data, samples=args.samples, batch=args.batch, device=args.device,
                     exact_synthetic=not args.stored_target, jitter_seed=args.jitter_seed)
    print(json.dumps(result))
    return 0


def psnr(x: Any, y: Any) -> Any:
    """(B,) float64 PSNR of images ``x``, ``y`` (B, 3, H, W) in [-1, 1], on the [0, 1] scale."""
    import torch

    mse = ((x.double() - y.double()) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-20))


def measure(generator: str | Path, sr: str | Path, data: str, samples: int = 0, batch: int = 16,
            device: str = "cpu", exact_synthetic: bool = True, jitter_seed: int | None = None) -> dict[str, Any]:
    """The JSON-able result of ``g3dr bench sr-psnr`` (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    from g3dr.data.pipeline import ShardStream, expand_existing_shard_urls, read_manifest
    from g3dr.errors import ConfigError, DataError
    from g3dr.models.checkpoint_io import load_f_trigen
    from g3dr.models.sr import load_sr
    from g3dr.train.sr import render_canonical

    if batch < 1 or samples < 0:
        raise ConfigError("--batch must be >= 1 and --samples >= 0")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    start = time.perf_counter()
    gen, g_cfg, _ = load_f_trigen(generator, dev, [f"renderer.deterministic={str(jitter_seed is None).lower()}"])
    rng = None if jitter_seed is None else torch.Generator(dev).manual_seed(jitter_seed)
    net = load_sr(sr, dev)
    low = g_cfg.data.resolution
    high = net.scale * low
    urls = expand_existing_shard_urls(data)
    source = (read_manifest(Path(urls[0]).parent) or {}).get("source", {})
    exact = exact_synthetic and source.get("layout") == "synthetic"
    stream = ShardStream(urls=urls, mode="eval", resolution=low, batch_size=batch, shuffle_buffer=0, flip_p=0.0,
                         depth_scale=g_cfg.data.depth_scale, depth_offset=g_cfg.data.depth_offset,
                         target_resolution=high)
    rows: dict[str, list[Any]] = {k: [] for k in ("sr", "bicubic", "render_vs_input", "bicubic_of_input",
                                                  "sr_of_input")}
    count = 0
    with torch.no_grad():
        for b in stream:
            if samples:
                keep = min(len(b["key"]), samples - count)
                b = {k: v[:keep] for k, v in b.items()}
            rgb, depth = b["rgb"].to(dev), b["depth"].to(dev)
            target = _exact_targets(source, b["key"], high).to(dev) if exact else b["rgb_target"].to(dev)
            render = render_canonical(gen, g_cfg, rgb, depth, generator_rng=rng)

            def bicubic(x: torch.Tensor) -> torch.Tensor:
                return F.interpolate(x, size=(high, high), mode="bicubic", align_corners=False).clamp(-1, 1)

            rows["sr"].append(psnr(net(render), target))
            rows["bicubic"].append(psnr(bicubic(render), target))
            rows["render_vs_input"].append(psnr(render.clamp(-1, 1), rgb))
            rows["bicubic_of_input"].append(psnr(bicubic(rgb), target))
            rows["sr_of_input"].append(psnr(net(rgb), target))
            count += len(b["key"])
            if samples and count >= samples:
                break
    if count == 0:
        raise DataError(f"no samples in {data}")
    per = {k: torch.cat(v).cpu() for k, v in rows.items()}
    gain = per["sr"] - per["bicubic"]
    return {
        "bench": "sr-psnr", "generator": str(generator), "sr": str(sr), "sr_architecture": net.architecture,
        "data": str(data), "samples": count, "input_resolution": low, "target_resolution": high,
        "target": "exact synthetic render (synth_sample)" if exact else "stored image",
        "render": "deterministic" if jitter_seed is None else f"stochastic, seed {jitter_seed}",
        "device": str(dev),
        "psnr_db": {k: round(float(v.mean()), 3) for k, v in per.items()},
        "sr_minus_bicubic_db": round(float(gain.mean()), 3),
        "sr_minus_bicubic_stderr_db": round(float(gain.std() / count ** 0.5), 3) if count > 1 else None,
        "sr_wins_fraction": round(float((gain > 0).double().mean()), 3),
        "seconds": round(time.perf_counter() - start, 1),
    }


def _exact_targets(source: dict[str, Any], keys: list[str], resolution: int) -> Any:
    """The synthetic scenes of ``keys`` (``synth_NNNNNNN``) rendered at ``resolution``: (B, 3, R, R) in [-1, 1]."""
    import numpy as np
    import torch

    from g3dr.data.synth import synth_sample

    images = [synth_sample(int(source["seed"]), int(key.rsplit("_", 1)[1]), resolution)[0] for key in keys]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
