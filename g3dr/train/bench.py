"""``g3dr bench step``: time and peak memory of ONE training step, per config x renderer impl (one JSON line).

A training step here is the trainer's own :func:`g3dr.train.trainer.train_step` with one micro-batch: the
:class:`~g3dr.train.task.G3DRTask` forward (Eq. 1 view, render, the full weighted objective through the
frozen critics), ``backward``, gradient clipping at ``train.grad_clip`` and an Adam step with the trainer's
hyperparameters (``train.lr``, ``betas``, ``eps``, ``weight_decay``; DeepSpeed's CPU path is plain
``torch.optim.Adam`` too). No DeepSpeed engine: :class:`PlainEngine` steps the model with a plain torch
optimizer, so the figures exclude DeepSpeed's bookkeeping and any ZeRO communication.

Both views are measured, because they cost differently: ``canonical`` (L1, depth L1, VGG on all blocks;
the depth prior drives the fine samples and the depth kernel) and ``novel`` (CLIP on the render and the
input, TV, VGG on the deepest blocks). The view is forced through Eq. 1 itself, not by a copy of the task:
the child sets ``loss.tau=1`` and runs the canonical steps at step 0 (threshold ``min(1, 0) = 0``) and the
novel ones at step ``total_steps // 2`` (threshold ``min(1, 1) = 1``); the task's report is checked to
confirm the view. ``tau`` only enters the view choice, so nothing else changes.

Each (config, impl) case runs in a fresh child process (``python -m g3dr.train.bench --child ...``), so
memory figures do not mix:

- CPU: ``peak_mib`` is the child's peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``,
  over warm-up and timed steps of both views) minus its RSS right before the first step (model, critics,
  optimizer object and inputs built; Adam state, activations and gradients not yet allocated).
  ``peak_rss_mib`` is the absolute high-water mark (includes the Python/torch runtime and the weights).
  ``tracemalloc`` is not used: it does not see tensor storage.
- CUDA: ``torch.cuda.max_memory_allocated`` minus the allocated memory before the first step.

Times: wall seconds per step (mean over ``--steps`` timed steps after ``--warmup`` untimed ones, per view)
and the process CPU seconds of the same steps (all threads; steadier on a shared machine).

Critics: ``loss.critics=random`` everywhere (no weight files needed). For the tiny config that is the
config's own tiny random critics. For the paper config the random critics of :func:`build_critics` are
tiny too (the config has no switch for full-size random critics), so the child builds the PAPER
architectures (``loss.clip_model``, e.g. ViT-B-16 at ``loss.clip_resolution``; timm ``loss.vgg_model``)
with random weights through the same builders (``--paper-critics tiny`` to use the tiny ones instead).
Random weights cost the same as pretrained ones.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from g3dr.bench import add_config_arguments, comma_list, rss_bytes, run_child

CONFIG_NAMES = ("tiny", "paper")
IMPLS = ("reference", "fused")
VIEWS = ("canonical", "novel")


def register_bench(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser(
        "step", help="one training step (task forward + backward + Adam), tiny vs paper config, fused vs reference",
        description="Time one training step (the trainer's task and loss, both views) and measure its peak "
                    "memory, for each config x renderer impl in a fresh process; print one JSON line.")
    add_config_arguments(parser, CONFIG_NAMES)
    parser.add_argument("--impls", default="reference,fused", help="comma list of: reference, fused")
    parser.add_argument("--batch", type=int, default=1, help="micro-batch size of the step (default 1)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per view")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per view before timing")
    parser.add_argument("--paper-critics", choices=("full", "tiny"), default="full",
                        help="paper config: random-weight critics of the paper architectures (full) or the tiny ones")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=_run)


def _ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else float("nan")


def _run(args: argparse.Namespace) -> int:
    configs = comma_list(args.configs, CONFIG_NAMES, "--configs")
    impls = comma_list(args.impls, IMPLS, "--impls")
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        from g3dr.errors import ConfigError

        raise ConfigError("--steps and --batch must be >= 1 and --warmup >= 0")
    cases: dict[str, Any] = {}
    common: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="g3dr-bench-step-") as tmp:
        for name in configs:
            cases[name] = {}
            for impl in impls:
                out = Path(tmp) / f"{name}-{impl}.json"
                critics = "config" if name == "tiny" or args.paper_critics == "tiny" else "paper"
                run_child("g3dr.train.bench",
                          ["--config", getattr(args, f"{name}_config"), "--impl", impl, "--critics", critics,
                           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
                           "--device", args.device, "--seed", str(args.seed), "--out", str(out)],
                          f"bench step child ({name}, {impl})")
                result = json.loads(out.read_text())
                for key in ("device", "threads", "memory_measure"):
                    common[key] = result.pop(key)
                cases[name][impl] = result
            if "fused" in cases[name] and "reference" in cases[name]:
                f, r = cases[name]["fused"], cases[name]["reference"]
                cases[name]["fused_over_reference"] = {
                    **{f"s_per_step_{v}": _ratio(f["s_per_step"][v], r["s_per_step"][v]) for v in (*VIEWS, "mean")},
                    **{f"cpu_s_per_step_{v}": _ratio(f["cpu_s_per_step"][v], r["cpu_s_per_step"][v])
                       for v in (*VIEWS, "mean")},
                    "peak_mib": _ratio(f["peak_mib"], r["peak_mib"]),
                }
    line = {"bench": "step", **common, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
            "cases": cases}
    print(json.dumps(line))
    return 0


class PlainEngine:
    """The engine :func:`g3dr.train.trainer.train_step` steps, without DeepSpeed: the module's forward,
    ``loss.backward()``, then gradient clipping at ``grad_clip``, the optimizer's step and ``zero_grad``."""

    def __init__(self, module: Any, optimizer: Any, grad_clip: float):
        self.module, self.optimizer, self.grad_clip = module, optimizer, grad_clip

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def backward(self, loss: Any) -> None:
        loss.backward()

    def step(self) -> None:
        import torch

        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.grad is not None], self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def bench_step(case: dict[str, Any], step: int) -> dict[str, Any]:
    """One optimizer step of a bench case as the trainer takes it (:func:`g3dr.train.trainer.train_step` with one
    micro-batch: task forward, backward, clip, Adam); returns the task's report. A non-finite loss raises."""
    import itertools

    from g3dr.train.trainer import NonFiniteGuard, train_step

    device = case["device"]
    out = train_step(case["engine"], case["task"], itertools.repeat(case["batch"]), step, 1, device,
                     NonFiniteGuard(1, device))
    return out.reports[0]


def build_paper_critics(loss_cfg: Any, device: Any) -> Any:
    """Random-weight critics of the paper architectures (``loss.clip_model``, ``loss.vgg_model``; the VGG with
    the ``loss.perceptual_weights`` channel weights, LPIPS's real ones by default), frozen."""
    from g3dr.losses.critics import ClipCritic, Critics, build_clip_model, build_vgg_critic, build_vgg_features

    critics = Critics(clip=ClipCritic(build_clip_model(loss_cfg.clip_model, None), loss_cfg.clip_resolution),
                      vgg=build_vgg_critic(build_vgg_features(loss_cfg.vgg_model, None), loss_cfg.perceptual_weights))
    return critics.to(device)


def random_batch(batch: int, resolution: int, gen: Any, device: Any) -> dict[str, Any]:
    """A batch shaped like the loader's: rgb (B, 3, R, R) in [-1, 1], smooth depth (B, 1, R, R) in [4, 6]."""
    import torch
    import torch.nn.functional as F

    rgb = torch.rand(batch, 3, resolution, resolution, generator=gen) * 2 - 1
    coarse = torch.rand(batch, 1, max(2, resolution // 8), max(2, resolution // 8), generator=gen)
    depth = 4.0 + 2.0 * F.interpolate(coarse, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return {"rgb": rgb.to(device), "depth": depth.to(device)}


def build_case(config: str, impl: str, critics: str, batch: int, device_name: str, seed: int,
               extra_overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Model, task, optimizer, engine and inputs of one bench case (built exactly as the trainer builds them)."""
    import torch

    from g3dr.config import load_config
    from g3dr.losses import build_critics
    from g3dr.models.f_trigen import FTrigen
    from g3dr.train.task import G3DRTask

    device = torch.device("cuda" if device_name == "auto" and torch.cuda.is_available() else
                          ("cpu" if device_name == "auto" else device_name))
    overrides = [f"renderer.impl={impl}", "loss.critics=random", "loss.tau=1.0", "train.precision=fp32",
                 f"train.micro_batch_size={batch}", f"train.global_batch_size={batch}", *extra_overrides]
    cfg = load_config(config, overrides)
    torch.manual_seed(seed)
    model = FTrigen(cfg).to(device)
    built = build_paper_critics(cfg.loss, device) if critics == "paper" else build_critics(cfg.loss, device)
    task = G3DRTask(cfg, built)
    t = cfg.train
    optimizer = torch.optim.Adam(model.parameters(), lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                                 weight_decay=t.weight_decay)
    inputs = random_batch(batch, cfg.data.resolution, torch.Generator().manual_seed(seed), device)
    return {"cfg": cfg, "device": device, "model": model, "task": task, "optimizer": optimizer, "batch": inputs,
            "engine": PlainEngine(model, optimizer, t.grad_clip)}


def view_step(cfg: Any, view: str) -> int:
    """The step at which Eq. 1 picks ``view`` when ``loss.tau == 1`` (see the module docstring)."""
    return 0 if view == "canonical" else max(1, cfg.train.total_steps // 2)


def _child(args: argparse.Namespace) -> None:
    import resource
    import time

    import torch

    from g3dr.train.trainer import parameter_digest

    case = build_case(args.config, args.impl, args.critics, args.batch, args.device, args.seed)
    cfg, device, model = case["cfg"], case["device"], case["model"]
    torch.manual_seed(args.seed + 1)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    params_before = [p.detach().clone() for p in model.parameters()]
    digest_before = parameter_digest(model)
    sync()
    base = rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    losses: dict[str, float] = {}
    for view in VIEWS:
        step = view_step(cfg, view)
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                sync()
                start, start_cpu = time.perf_counter(), time.process_time()
            report = bench_step(case, step)
            if report["canonical"] != (view == "canonical"):
                raise RuntimeError(f"Eq. 1 chose the wrong view at step {step} (r={report['view_r']})")
        sync()
        wall[view] = (time.perf_counter() - start) / args.steps
        cpu[view] = (time.process_time() - start_cpu) / args.steps
        losses[view] = report["loss/total"]
    if device.type == "cuda":
        peak, absolute = torch.cuda.max_memory_allocated() - base, torch.cuda.max_memory_allocated()
        measure = "cuda max_memory_allocated minus allocated before the first step"
    else:
        absolute = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = absolute - base
        measure = ("peak RSS (getrusage ru_maxrss) of a fresh process per case minus its RSS right before the "
                   "first step (model, critics, inputs built)")
    changed = sum(int(not torch.equal(a, p.detach())) for a, p in zip(params_before, model.parameters(), strict=True))
    wall["mean"] = sum(wall[v] for v in VIEWS) / len(VIEWS)
    cpu["mean"] = sum(cpu[v] for v in VIEWS) / len(VIEWS)
    if args.critics == "paper":
        critic_desc = (f"random-weight paper architectures: CLIP {cfg.loss.clip_model} at "
                       f"{cfg.loss.clip_resolution}px, {cfg.loss.vgg_model}")
    else:
        critic_desc = "loss.critics=random (tiny random critics)"
    result = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "memory_measure": measure,
        "config": args.config,
        "resolution": cfg.data.resolution,
        "samples": f"{cfg.renderer.num_coarse}+{cfg.renderer.num_fine}",
        "critics": critic_desc,
        "s_per_step": {k: round(v, 4) for k, v in wall.items()},
        "cpu_s_per_step": {k: round(v, 4) for k, v in cpu.items()},
        "samples_per_s": {k: round(args.batch / v, 4) for k, v in wall.items()},
        "peak_mib": round(peak / 2**20, 1),
        "peak_rss_mib": round(absolute / 2**20, 1),
        "loss": losses,
        "model_params": sum(p.numel() for p in model.parameters()),
        "param_tensors": len(params_before),
        "param_tensors_updated": changed,
        "params_digest_changed": parameter_digest(model) != digest_before,
    }
    Path(args.out).write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="child process of g3dr bench step")
    parser.add_argument("--child", action="store_true", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--impl", choices=IMPLS, required=True)
    parser.add_argument("--critics", choices=("config", "paper"), required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    _child(parser.parse_args(argv))


if __name__ == "__main__":
    main()
