"""``g3dr bench gpu-check`` (``make gpu-check``): everything a first GPU session should measure, in one call.

A GPU machine may be lent for minutes, so this is one prepared script with a time budget (default 8 minutes)
that prints one JSON line and writes ``OUT/report.json`` and ``OUT/report.md``. Each step runs in its own
child process with what is left of the budget; a failing or timed-out step is recorded and the next one runs:

1. ``renderer``: ``g3dr bench renderer`` on the device: the fused (Triton on CUDA) path against the reference
   path, forward + backward: the worst relative error, the speed ratio and the peak-memory ratio (goal: >= 3x
   faster, <= 0.3x memory on CUDA).
2. ``ceilings``: a measured ``torch.mm`` (bf16 on CUDA) FLOP/s and a device-to-device copy's bytes/s.
3. ``kernel_rates``: the fused renderer's achieved FLOP/s and bytes/s from an analytic count
   (:func:`renderer_work`) over its measured forward + backward time, as fractions of the two ceilings.
4. ``train_tiny`` and ``train_paper``: ``g3dr train`` under ``torchrun`` (world size 1; NCCL on CUDA) for a few
   bf16 steps (fp32 on the CPU, which has no bf16 renderer kernels) of ``configs/tiny.yaml`` and of
   ``configs/imagenet128.yaml`` (synthetic 128 px data; critics
   ``random``, since no weight files are here: the step cost of the real CLIP / VGG is ``g3dr bench step``'s):
   steps/s, samples/s and peak memory from the run's MLflow metrics.
5. ``eval``: ``g3dr eval`` of the tiny run's export on the device (NFS and DA): wall seconds.

Without a CUDA device it says so and exits with status 1 at once (before importing torch). ``--allow-cpu`` runs
the same steps on the CPU at toy sizes: that is how the script itself is tested where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RENDERER_SIZES = {
    "cuda": {"batch": 4, "resolution": 128, "num_coarse": 48, "num_fine": 48, "channels": 32, "hidden": 64,
             "plane_resolution": 256},
    "cpu": {"batch": 1, "resolution": 16, "num_coarse": 8, "num_fine": 8, "channels": 8, "hidden": 16,
            "plane_resolution": 16},
}
"""``g3dr bench renderer`` sizes: on CUDA the paper's renderer (128 px, 48 + 48 samples, 32-channel 256 px
planes); on the CPU a toy size that only exercises the script."""


def register_bench(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser(
        "gpu-check", help="the first run on a GPU machine: kernels vs reference, speed, memory, training, eval",
        description="Run every GPU measurement in one call within a time budget; print one JSON line and write "
                    "OUT/report.json and OUT/report.md. Exits 1 at once without a CUDA device.")
    parser.add_argument("--out", default="outputs/gpu-check", metavar="DIR", help="report folder")
    parser.add_argument("--budget-s", type=float, default=480.0, help="total time budget in seconds")
    parser.add_argument("--train-steps", type=int, default=20, help="training steps per config")
    parser.add_argument("--skip", default="", metavar="LIST", help="comma list of steps to leave out")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run on the CPU at toy sizes when there is no GPU (tests the script itself)")
    parser.set_defaults(handler=run)


def cuda_present() -> bool:
    """A cheap look for an NVIDIA driver (no torch import): the device nodes or ``nvidia-smi``."""
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


def renderer_work(batch: int, resolution: int, num_coarse: int, num_fine: int, channels: int,
                  hidden: int, levels: int = 3) -> dict[str, float]:
    """Analytic work of one fused forward + backward, per ``docs/performance.md``'s accounting (the counts
    ``kernel_rates`` divides by the measured time). Per sample, L = 3 planes x ``levels`` x 4 bilinear taps
    (36 lookups), C channels, H hidden:

    - decode: L x C x 4 bytes of feature reads plus L x 8 bytes of rows/weights; 2 (L C + C H + 4 H) FLOPs;
    - backward: the same reads and FLOPs again (recompute), plus 2 (4 H + 2 C H) FLOPs for the MLP backward
      and L x C atomic adds (4 bytes written each) into the table gradient.

    Samples: ``batch x resolution^2 x (num_coarse + num_fine)``. Coarse-pass work (it only places the fine
    samples) is counted like the rest; compositing is left out (small next to the decode).
    """
    samples = batch * resolution ** 2 * (num_coarse + num_fine)
    lookups = 3 * levels * 4
    decode_flops = 2 * (lookups * channels + channels * hidden + 4 * hidden)
    flops = 2 * decode_flops + 2 * (4 * hidden + 2 * channels * hidden) + lookups * channels
    reads = lookups * channels * 4 + lookups * 8
    bytes_ = 2 * reads + lookups * channels * 4
    return {"samples": float(samples), "flops": float(samples * flops), "bytes": float(samples * bytes_)}


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("TQDM_DISABLE", "1")
    return env


class _Steps:
    """Runs the steps in order within the budget; each result (or its failure) goes into ``results``."""

    def __init__(self, budget_s: float, skip: set[str]):
        self.deadline = time.monotonic() + budget_s
        self.skip = skip
        self.results: dict[str, dict] = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, fn) -> dict | None:
        if name in self.skip:
            self.results[name] = {"status": "skipped"}
            return None
        if self.left() < 10:
            self.results[name] = {"status": "no time left"}
            return None
        start = time.monotonic()
        try:
            value = fn()
            self.results[name] = {"status": "ok", "wall_s": round(time.monotonic() - start, 2), **value}
            return value
        except Exception as err:  # noqa: BLE001 - one failing step must not cost the others their figures
            self.results[name] = {"status": "failed", "wall_s": round(time.monotonic() - start, 2),
                                  "error": f"{type(err).__name__}: {str(err)[-2000:]}"}
            return None

    def command(self, cmd: list[str], log: Path) -> subprocess.CompletedProcess:
        timeout = max(self.left() - 5, 5)
        with log.open("w") as f:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, timeout=timeout, env=_child_env())
        if proc.returncode != 0:
            text = log.read_text(errors="replace")
            said = [line for line in text.splitlines() if "error:" in line or "Error:" in line]
            raise RuntimeError(f"`{' '.join(cmd[:6])} ...` exited {proc.returncode} (log {log}): "
                               + (" | ".join(said[:3]) or text[-1500:]))
        return proc


def _last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON line in: {text[-500:]}")


def _ceilings(device: str) -> dict:
    import torch

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    n = 8192 if dev.type == "cuda" else 256

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(2):
        a @ b
    sync()
    reps = 10 if dev.type == "cuda" else 3
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    mm_s = (time.perf_counter() - start) / reps
    x = torch.empty(2**28 if dev.type == "cuda" else 2**22, device=dev, dtype=torch.float32)
    y = torch.empty_like(x)
    y.copy_(x)
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    sync()
    copy_s = (time.perf_counter() - start) / reps
    return {"mm_dtype": str(dtype).replace("torch.", ""), "mm_n": n, "mm_flops_per_s": 2 * n ** 3 / mm_s,
            "copy_bytes_per_s": 2 * x.numel() * 4 / copy_s}


def _train(steps: _Steps, out: Path, name: str, config: Path, device: str, overrides: list[str], n: int) -> dict:
    run_dir = out / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "1",
           "-m", "g3dr.launchers.main", "train", "--config", str(config), f"run_dir={run_dir}", f"device={device}",
           f"train.total_steps={n}", f"train.log_every={max(1, n // 2)}", "train.checkpoint_every=100000",
           "train.image_every=0", f"train.precision={'bf16' if device == 'cuda' else 'fp32'}",
           f"data.synthetic_dir={out / ('synth-' + name)}",
           f"distributed.backend={'nccl' if device == 'cuda' else 'gloo'}", *overrides,
           # its own store, read below (not a team's $MLFLOW_TRACKING_URI, nor the preset's)
           f"logging.mlflow_uri=sqlite:///{run_dir / 'mlflow.db'}", "--no-progress"]
    start = time.monotonic()
    steps.command(cmd, out / f"{name}.log")
    wall = time.monotonic() - start
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    metrics = runs[0].data.metrics  # the latest value of each: the second logging window (warm)
    return {"steps": n, "wall_s_total": round(wall, 2), "steps_per_s": round(1 / metrics["seconds_per_step"], 3),
            "samples_per_s": round(metrics["samples_per_second"], 2),
            "peak_memory_mb": round(metrics["peak_memory_mb"], 1), "export": str(run_dir / "f_trigen.safetensors")}


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    if not cuda_present() and not args.allow_cpu:
        print(json.dumps({"gpu_check": "no CUDA device", "detail": "no /dev/nvidiactl and no nvidia-smi; run this on "
                          "a GPU machine (or --allow-cpu to exercise the script on the CPU)"}), flush=True)
        return 1
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.allow_cpu:
        print(json.dumps({"gpu_check": "no CUDA device", "detail": "an NVIDIA driver is present but torch sees no "
                          f"CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda})"}), flush=True)
        return 1
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    steps = _Steps(args.budget_s, skip)
    g3dr = [sys.executable, "-m", "g3dr.launchers.main"]
    sizes = RENDERER_SIZES[device]

    def renderer() -> dict:
        repeats, warmup = ("3", "2") if device == "cuda" else ("1", "1")  # CPU: the script, not the figures
        cmd = [*g3dr, "bench", "renderer", "--device", device, "--repeats", repeats, "--warmup", warmup,
               *[x for k, v in sizes.items() for x in (f"--{k.replace('_', '-')}", str(v))]]
        line = _last_json(steps.command(cmd, out / "renderer.log").stdout)
        keys = ("fused_s", "reference_s", "speedup", "fused_peak_mib", "reference_peak_mib", "memory_ratio",
                "max_rel_error", "max_rel_error_of", "config")
        return {k: line[k] for k in keys}

    bench = steps.run("renderer", renderer)
    ceilings = steps.run("ceilings", lambda: _ceilings(device))
    if bench and ceilings:
        def rates() -> dict:
            work = renderer_work(**{k: sizes[k] for k in ("batch", "resolution", "num_coarse", "num_fine",
                                                             "channels", "hidden")})
            flops, bytes_ = work["flops"] / bench["fused_s"], work["bytes"] / bench["fused_s"]
            return {"flops_per_s": flops, "bytes_per_s": bytes_,
                    "fraction_of_mm": round(flops / ceilings["mm_flops_per_s"], 4),
                    "fraction_of_copy": round(bytes_ / ceilings["copy_bytes_per_s"], 4), "count": work}
        steps.run("kernel_rates", rates)
    n = args.train_steps
    tiny = steps.run("train_tiny", lambda: _train(steps, out, "train_tiny", REPO_CONFIGS / "tiny.yaml", device, [], n))
    paper_overrides = ["data.source=synthetic", "data.shards=", "data.synthetic_size=64", "loss.critics=random",
                       "data.num_workers=2",
                       "train.micro_batch_size=8", "train.global_batch_size=8"]
    if device == "cpu":  # toy size: the script, not the figures
        paper_overrides += ["data.resolution=32", "renderer.plane_resolutions=[32, 16, 8]", "renderer.num_coarse=8",
                            "renderer.num_fine=8", "model.base_width=16", "model.channel_mults=[1, 2]",
                            "train.micro_batch_size=2", "train.global_batch_size=2", "data.synthetic_size=8",
                            "data.num_workers=0"]
    steps.run("train_paper", lambda: _train(steps, out, "train_paper", REPO_CONFIGS / "imagenet128.yaml", device,
                                            paper_overrides, n))
    if tiny:
        def evaluate() -> dict:
            cmd = [*g3dr, "eval", "--checkpoint", tiny["export"], "--device", device, "--metrics", "nfs,da",
                   "--num-samples", "16", "--fid-samples", "0", "--no-progress", "--out", str(out / "eval"),
                   "--mlflow-uri", f"sqlite:///{out / 'eval.db'}"]
            start = time.monotonic()
            line = steps.command(cmd, out / "eval.log").stdout.strip().splitlines()[-1]
            return {"eval_wall_s": round(time.monotonic() - start, 2), "line": line[:400]}
        steps.run("eval", evaluate)

    import torch

    summary = {"gpu_check": "ok" if all(r["status"] in ("ok", "skipped") for r in steps.results.values()) else
               "failed", "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
               "torch": torch.__version__, "cuda": torch.version.cuda, "wall_s": round(time.monotonic() - started, 1),
               "budget_s": args.budget_s, "steps": steps.results}
    (out / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "report.md").write_text(report_markdown(summary))
    print(json.dumps(summary, default=str), flush=True)
    return 0 if summary["gpu_check"] == "ok" else 1


def report_markdown(summary: dict) -> str:
    """The report as a short markdown page (what ``docs/performance.md`` quotes)."""
    lines = [f"# gpu-check on {summary['device']}", "",
             f"torch {summary['torch']}, CUDA {summary['cuda']}; {summary['wall_s']} s of a {summary['budget_s']} s "
             f"budget; overall: **{summary['gpu_check']}**", "", "| step | status | figures |", "|---|---|---|"]
    for name, result in summary["steps"].items():
        figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in result.items() if k not in ("status", "config", "count", "export", "line"))
        lines.append(f"| {name} | {result['status']} | {figures[:600]} |")
    return "\n".join(lines) + "\n"
