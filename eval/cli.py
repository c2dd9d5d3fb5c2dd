"""``g3dr eval``: score one checkpoint, or sweep a training directory, and record it in MLflow.

    g3dr eval --checkpoint RUN/f_trigen.safetensors [--data SHARDS] [--metrics fid,is,nfs,da,gt_views]
              [--sigma-scales 1,5,10,50] [--num-samples N] [--views canonical,novel]
              [--mlflow-uri URI] [--experiment NAME] [KEY=VALUE ...]
    g3dr eval --checkpoint CK --sr weights/g3dr-sr-x2.safetensors     # FID/IS on 128 -> 256 px SR images
    g3dr eval --sweep RUN_DIR [--watch [--poll-seconds 60]] ...
    g3dr eval --score-images DIR [--stats FILE.npz] [--inception PATH] [--is-splits 10] [--seed 0]

The config of each checkpoint is the one stored in it, with the flags and ``KEY=VALUE`` overrides applied
on top (``eval.*``, ``data.*``, render settings). Multi-rank: run it under torchrun/srun; samples are split
across ranks and gathered exactly.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from g3dr.models.render_cli import add_sr_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="FID, IS, NFS and depth accuracy of checkpoints at every sigma scale, logged to MLflow",
        description="Evaluate f_trigen checkpoints (paper S.5) and log one MLflow run per checkpoint and "
                    "eval config.")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--checkpoint", metavar="PATH", help="an f_trigen .safetensors file")
    target.add_argument("--sweep", metavar="DIR",
                        help="evaluate every checkpoint under DIR without a finished run for this eval config, "
                             "newest first")
    target.add_argument("--score-images", metavar="DIR",
                        help="score a folder of uint8 PNGs (as --save-images writes): FID against --stats, IS; "
                             "prints one JSON line, logs nothing")
    parser.add_argument("--stats", metavar="FILE",
                        help="with --score-images: reference statistics (an eval.stats_cache .npz) for FID")
    parser.add_argument("--is-splits", type=int, metavar="N",
                        help="IS splits (eval.is_splits; with --score-images 0 means no IS; default 10)")
    parser.add_argument("--seed", type=int, metavar="S",
                        help="eval.seed: novel-view cameras and the IS shuffle (default 0)")
    parser.add_argument("--watch", action="store_true",
                        help="with --sweep: keep polling for new checkpoints until SIGTERM")
    parser.add_argument("--poll-seconds", type=float, default=60.0, metavar="S",
                        help="with --watch: seconds between polls")
    parser.add_argument("--no-export", action="store_true",
                        help="with --sweep: do not export DeepSpeed checkpoints (DIR/checkpoints/step-N) "
                             "to DIR/exports first")
    parser.add_argument("--data", metavar="SHARDS", help="eval input shards (brace pattern, comma list or folder); "
                        "default: the checkpoint's data config")
    parser.add_argument("--metrics", metavar="LIST",
                        help="comma list of fid,is,nfs,da,gt_views (default: all; gt_views - PSNR and DA against the "
                             "stored views of a synthetic set - only where the data stores views, and an error "
                             "when named here without them)")
    parser.add_argument("--sigma-scales", metavar="LIST", help="comma list of density scale factors, e.g. 1,5,10,50")
    parser.add_argument("--num-samples", type=int, metavar="N", help="samples behind NFS and DA (default 256)")
    parser.add_argument("--fid-samples", type=int, metavar="N",
                        help="samples behind FID and IS (default 50000; 0: --num-samples)")
    parser.add_argument("--views", metavar="LIST", help="comma list of canonical,novel")
    parser.add_argument("--novel-camera", choices=["sampled", "video"],
                        help="novel views as in training, or the video path")
    parser.add_argument("--inception", metavar="PATH", help="the Inception-v3 2015-12-05 file (eval.inception_weights)")
    add_sr_arguments(parser, "super-resolution weights (sr.checkpoint; default: the checkpoint config's): FID and IS "
                             "score the network's output on the renders at data.resolution (e.g. 128 -> 256 px), "
                             "against statistics of the data's images at that size; NFS, DA and ground-truth views "
                             "stay on the renders. The file's sha256 enters the eval hash")
    parser.add_argument("--mlflow-uri", default="", metavar="URI",
                        help="tracking URI (sqlite:///x.db or http://host:port); default: the checkpoint's "
                             "logging.mlflow_uri, else a sqlite store in the sweep dir / beside the checkpoint")
    parser.add_argument("--experiment", default="g3dr-eval", metavar="NAME",
                        help="MLflow experiment (default g3dr-eval)")
    parser.add_argument("--out", metavar="DIR",
                        help="eval output folder (default: eval/ beside the checkpoint or in the sweep dir)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--retries", type=int, default=3, metavar="N", help="attempts per MLflow call before failing")
    parser.add_argument("--save-images", metavar="DIR",
                        help="also write the uint8 images scored by FID/IS as PNGs to DIR/<checkpoint>-<eval hash>/"
                             "<view>_s<scale>/NNNNNN.png (scoring them again gives the same FID/IS)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides of the checkpoint's stored config, e.g. eval.batch_size=32")
    parser.set_defaults(handler=run)


def _list(text: str) -> str:
    items = [t.strip() for t in text.split(",") if t.strip()]
    return "[" + ", ".join(items) + "]"


def overrides_from_args(args: argparse.Namespace) -> tuple[str, ...]:
    """The flags as dotted config overrides (applied before the trailing KEY=VALUE ones)."""
    out = []
    if args.data:
        out += ["data.source=shards", f"data.shards={args.data}"]
    if args.metrics:
        out.append(f"eval.metrics={_list(args.metrics)}")
    if args.sigma_scales:
        out.append(f"eval.sigma_scales={_list(args.sigma_scales)}")
    if args.num_samples is not None:
        out.append(f"eval.num_samples={args.num_samples}")
    if args.fid_samples is not None:
        out.append(f"eval.fid_samples={args.fid_samples}")
    if args.views:
        out.append(f"eval.views={_list(args.views)}")
    if args.novel_camera:
        out.append(f"eval.novel_camera={args.novel_camera}")
    if args.inception:
        out.append(f"eval.inception_weights={args.inception}")
    if args.is_splits is not None:
        out.append(f"eval.is_splits={args.is_splits}")
    if args.seed is not None:
        out.append(f"eval.seed={args.seed}")
    if getattr(args, "sr", None):
        out.append(f"sr.checkpoint={args.sr}")
    if getattr(args, "no_sr", False):
        out.append("sr.checkpoint=")
    return (*out, *args.overrides)


@dataclass(frozen=True)
class EvalRequest:
    """One ``g3dr eval --checkpoint``/``--sweep`` run, typed: what the command parses, and what a launched eval job
    (``g3dr submit eval``) carries and runs with :func:`run_request`. Picklable."""

    checkpoint: str | None = None
    sweep: str | None = None
    watch: bool = False
    poll_s: float = 60.0
    export: bool = True
    """With ``sweep``: export DeepSpeed checkpoints to ``exports/`` first."""
    overrides: tuple[str, ...] = ()
    """The flags as dotted overrides, then the user's ``KEY=VALUE`` (:func:`overrides_from_args`)."""
    out: str | None = None
    mlflow_uri: str = ""
    experiment: str = "g3dr-eval"
    device: str = "auto"
    retries: int = 3
    save_images: str | None = None
    progress: bool = True


def request_from_args(args: argparse.Namespace) -> EvalRequest:
    """The :class:`EvalRequest` of parsed ``g3dr eval`` arguments."""
    return EvalRequest(checkpoint=args.checkpoint, sweep=args.sweep, watch=args.watch, poll_s=args.poll_seconds,
                       export=not args.no_export, overrides=overrides_from_args(args), out=args.out,
                       mlflow_uri=args.mlflow_uri, experiment=args.experiment, device=args.device, retries=args.retries,
                       save_images=args.save_images, progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    if args.score_images:
        return _score_images(args)
    return run_request(request_from_args(args))


def run_request(request: EvalRequest) -> int:
    """Evaluate one checkpoint or sweep a folder, on this rank of the job (joining the process group when there are
    several); prints one line per checkpoint on rank 0. The exit status: 1 when a sweep had failures."""
    from pathlib import Path

    from g3dr.distributed import init_process_group, resolve_dist_env, shutdown_process_group
    from g3dr.errors import ConfigError
    from g3dr.eval.runner import EvalOptions, Evaluator, checkpoint_ref, run_sweep, stop_signal
    from g3dr.log import get_logger

    log = get_logger("g3dr.eval")
    if request.watch and not request.sweep:
        raise ConfigError("--watch needs --sweep DIR")
    check_eval_outputs(request)
    dist = resolve_dist_env()
    import torch

    owns_group = init_process_group(dist, "cuda" if torch.cuda.is_available() else "cpu",
                                    launch_hint="torchrun or `g3dr submit eval`")
    stop = stop_signal().install()
    try:
        sweep_dir = Path(request.sweep) if request.sweep else None
        if sweep_dir is not None and not sweep_dir.is_dir():
            raise ConfigError(f"--sweep {sweep_dir}: not a directory")
        out = Path(request.out) if request.out else (sweep_dir / "eval" if sweep_dir else None)
        options = EvalOptions(
            overrides=request.overrides, out_dir=out, mlflow_uri=request.mlflow_uri, experiment=request.experiment,
            tracking_base=sweep_dir or Path(request.checkpoint).parent, device=request.device,
            attempts=max(1, request.retries), progress=request.progress,
            save_images=Path(request.save_images) if request.save_images else None)
        evaluator = Evaluator(options, dist, stop)
        if sweep_dir is None:
            outcome = evaluator.evaluate(checkpoint_ref(request.checkpoint))
            if dist.is_main:
                _print_outcome(outcome)
            return 0
        report = run_sweep(sweep_dir, evaluator, watch=request.watch, poll_s=request.poll_s, export=request.export)
        if dist.is_main:
            for outcome in report.outcomes:
                _print_outcome(outcome)
            _print_by_step(report.outcomes, evaluator)
            log.info("sweep: %d evaluated, %d uploaded, %d skipped, %d failed%s", report.count("evaluated"),
                     report.count("uploaded"), report.count("skipped"), report.count("failed"),
                     " (stopped)" if stop() else "")
        return 1 if report.count("failed") else 0
    finally:
        stop.uninstall()
        if owns_group:
            shutdown_process_group(barrier=False)


def check_eval_outputs(request: EvalRequest) -> None:
    """Before any model or data is loaded: the folders eval writes can be written (an OutputError naming the flag,
    the folder and the cause otherwise: read-only, full, a file where a folder should be). Nothing is created:
    a job that stops later (missing weights) leaves no empty folders behind."""
    from pathlib import Path

    from g3dr.errors import ConfigError
    from g3dr.outputs import check_writable_dir

    if request.sweep:
        sweep_dir = Path(request.sweep)
        if not sweep_dir.is_dir():
            raise ConfigError(f"--sweep {sweep_dir}: not a directory")
        check_writable_dir(Path(request.out) if request.out else sweep_dir / "eval",
                           "--out" if request.out else "eval folder", "pass --out DIR on a writable disk", create=False)
        if request.export and (sweep_dir / "checkpoints").is_dir():
            check_writable_dir(sweep_dir / "exports", "the exports folder of --sweep",
                               "pass --no-export, or make the run folder writable", create=False)
    elif request.out:
        check_writable_dir(request.out, "--out", create=False)
    elif Path(request.checkpoint).is_file():  # the default beside it (the checkpoint reader reports a wrong path)
        check_writable_dir(Path(request.checkpoint).parent / "eval", "eval folder", "pass --out DIR on a writable disk",
                           create=False)
    if request.save_images:
        check_writable_dir(request.save_images, "--save-images", create=False)


def _score_images(args: argparse.Namespace) -> int:
    """``--score-images``: FID/IS of a PNG folder, one JSON line on stdout (no MLflow, one process)."""
    import json

    import torch

    from g3dr.config import EvalConfig
    from g3dr.metrics.image_folder import score_folder
    from g3dr.metrics.inception import load_inception

    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    detector = load_inception(args.inception or EvalConfig().inception_weights, device)
    defaults = EvalConfig()
    splits = defaults.is_splits if args.is_splits is None else args.is_splits
    seed = defaults.seed if args.seed is None else args.seed
    scores = score_folder(args.score_images, detector, args.stats, is_splits=splits, seed=seed)
    print(json.dumps({"folder": str(args.score_images), **scores, "is_splits": splits, "seed": seed,
                      "detector_sha256": detector.sha256}, sort_keys=True), flush=True)
    return 0


def _print_outcome(outcome) -> None:
    metrics = outcome.error or " ".join(f"{k}={v:.4g}" for k, v in sorted(outcome.results.items()))
    print(f"{outcome.status}\t{outcome.checkpoint.path}\tstep={outcome.checkpoint.step}\t"
          f"eval_hash={outcome.eval_hash}\trun={outcome.run_id or '-'}\t{metrics}", flush=True)


def _print_by_step(outcomes, evaluator) -> None:
    """After a sweep of two or more checkpoints: their metrics side by side, by step (a skipped checkpoint's
    numbers are read back from its finished MLflow run)."""
    from g3dr.eval.report import by_step_markdown

    columns = []
    for o in sorted(outcomes, key=lambda o: (o.checkpoint.step, str(o.checkpoint.path))):
        if o.status == "failed":
            continue
        metrics = o.results or (evaluator.tracker.run_metrics(o.run_id) if o.run_id and evaluator.tracker else {})
        if metrics:
            columns.append((f"step {o.checkpoint.step} ({o.checkpoint.path.name})", metrics))
    if len(columns) >= 2:
        print(by_step_markdown(columns), end="", flush=True)
