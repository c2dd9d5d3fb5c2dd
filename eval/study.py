"""``g3dr study table-s1``: the paper's Table S1 on the synthetic set, where novel views have ground truth.

Table S1 of the paper compares three geometry supervisions (the depth kernel, the accumulated depth without
gradient regularisation, DS-NeRF's KL term) by how gracefully each degrades as the density is scaled by
sigma = 1, 5, 10, 50 at test time. ImageNet has no ground truth for novel views; the procedural primitives
(:mod:`g3dr.data.synth`) do. The study:

1. writes a training set (``data.synthetic_dir`` under the study folder, as training always does) and a
   held-out eval set of other primitives (seed ``train.seed + EVAL_SEED_OFFSET``) with
   ``--views`` exact novel views per sample (cameras as at the end of training);
2. saves the initialisation every variant starts from (``untrained``: ``train.seed``, as the trainer);
3. trains one run per supervision (``loss.depth_supervision``) with ``g3dr train`` in a child process,
   resuming an interrupted run (``--resume auto``) and skipping a finished one;
4. evaluates each (and the initialisation) with ``g3dr eval``'s evaluator on the held-out set: novel-view
   PSNR and depth accuracy against the exact views, NFS, canonical PSNR, per sigma scale, beside the
   no-model baseline ``psnr_novel_flat`` (each view in the input's mean colour); each eval is an
   MLflow run, a child of one parent run of the study;
5. writes Table S1's layout (rows sigma, column groups the variants) as ``table-s1.md``, ``table-s1.csv``
   and a plot ``table-s1.png`` under ``OUT/report/``, and logs them to the parent run.

Nothing is tuned per variant: every variant gets the same resolved config but for the one key.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from g3dr.errors import ConfigError

VARIANTS = ("kernel", "accumulated", "kl")
BASELINE = "untrained"
EVAL_SEED_OFFSET = 1_000_003
"""Seed of the held-out eval primitives relative to ``train.seed`` (the training set's seed): disjoint sets."""
STUDY_METRICS = ("psnr_novel", "da_novel", "nfs", "psnr_canonical")
"""Table S1's metrics here, in column order: novel-view PSNR and DA against the exact views, NFS, canonical PSNR."""
LOWER_IS_BETTER = {"psnr_novel": False, "da_novel": True, "nfs": False, "psnr_canonical": False}
FLAT = "psnr_novel_flat"
"""The no-model baseline (each view in the input's mean colour): one column, the same for every variant."""
HEADERS = {"psnr_novel": "PSNR novel ↑", "da_novel": "DA novel ↓", "nfs": "NFS ↑",
           "psnr_canonical": "PSNR canon. ↑",
           FLAT: "flat colour: PSNR novel"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "study", help="reproducible studies of the method on synthetic data with ground truth",
        description="Studies that train several variants and compare them against ground truth.")
    studies = parser.add_subparsers(dest="study", metavar="STUDY", required=True)
    s1 = studies.add_parser(
        "table-s1", help="Table S1: the three geometry supervisions against sigma scale, with exact novel views",
        description="Train loss.depth_supervision = kernel | accumulated | kl on the synthetic primitives with one "
                    "config, evaluate each (and the shared initialisation) on held-out primitives with exact novel "
                    "views at every sigma scale, and write Table S1's layout (markdown, CSV, plot) and one MLflow "
                    "parent run with a child per variant. Rerunning resumes: finished variants and evals are skipped.",
        epilog="Example: g3dr study table-s1 --out outputs/study-s1 (docs/science.md has the numbers of a full run)")
    s1.add_argument("--config", default="configs/study.yaml", metavar="FILE",
                    help="the study's config (default: configs/study.yaml)")
    s1.add_argument("--out", default="outputs/study-s1", metavar="DIR", help="study folder (default: outputs/study-s1)")
    s1.add_argument("--variants", default=",".join(VARIANTS), metavar="LIST",
                    help=f"comma list of loss.depth_supervision values (default: {','.join(VARIANTS)})")
    s1.add_argument("--steps", type=int, metavar="N", help="train.total_steps of every variant (default: the config's)")
    s1.add_argument("--views", type=int, default=4, metavar="K", help="exact novel views per eval sample (default 4)")
    s1.add_argument("--eval-samples", type=int, metavar="N", help="held-out eval samples (default: eval.num_samples)")
    s1.add_argument("--sigma-scales", default="1,5,10,50", metavar="LIST", help="comma list (default 1,5,10,50)")
    s1.add_argument("--mlflow-uri", default="", metavar="URI",
                    help="tracking URI (default: the config's logging.mlflow_uri, else sqlite OUT/mlflow.db)")
    s1.add_argument("--experiment", default="g3dr-study", metavar="NAME", help="MLflow experiment (default g3dr-study)")
    s1.add_argument("--no-progress", action="store_true", help="no progress bars")
    s1.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the study config")
    s1.set_defaults(handler=run_table_s1)


@dataclass
class VariantResult:
    name: str
    metrics: dict[str, float] = field(default_factory=dict)
    train_s: float | None = None
    checkpoint: str = ""
    eval_run_id: str | None = None


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def study_config(config: str, overrides: Sequence[str], out: Path, steps: int | None):
    """The resolved config every variant shares (its own run_dir and supervision are added per variant)."""
    from g3dr.config import load_config

    extra = [f"data.synthetic_dir={out / 'data-train'}", "data.source=synthetic"]
    if steps is not None:
        extra.append(f"train.total_steps={steps}")
    return load_config(config, [*overrides, *extra])


def _changed_keys(stored_file: Path, cfg) -> list[str]:
    """Dotted keys whose resolved values differ between a stored study config and ``cfg``. The stored file
    is read with today's defaults, so a key added to the config since it was written is not a change."""
    from g3dr.config import flatten_config, load_config

    old, new = flatten_config(load_config(stored_file)), flatten_config(cfg)
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def write_eval_set(cfg, out: Path, n: int, views: int, progress: bool) -> Path:
    """The held-out primitives with ``views`` exact novel views each (written once; reused when it matches)."""
    from g3dr.data.synth import ViewSpec, write_synthetic_shards

    folder = out / "data-eval"
    record = folder / "study-eval-set.json"
    want = {"seed": cfg.train.seed + EVAL_SEED_OFFSET, "n": n, "views": views, "resolution": cfg.data.resolution}
    if record.is_file():
        have = json.loads(record.read_text())
        if have != want:
            raise ConfigError(f"{folder} holds another eval set ({have}, wanted {want}); "
                              "use another --out or delete it")
        return folder
    spec = ViewSpec(count=views, cameras="sampled", camera=cfg.camera, box_half=cfg.renderer.box_warp / 2)
    write_synthetic_shards(str(folder), n, (cfg.data.resolution,), seed=want["seed"], shard_size=max(n, 1),
                           progress=progress, command="g3dr study table-s1", views=spec)
    record.write_text(json.dumps(want))
    return folder


def save_initialisation(cfg, path: Path) -> Path:
    """The weights every variant starts from (the trainer's init: everything seeded from ``train.seed``)."""
    from g3dr.models.checkpoint_io import save_f_trigen
    from g3dr.models.f_trigen import FTrigen
    from g3dr.train.checkpoint import seed_everything

    if path.is_file():
        return path
    seed_everything(cfg.train.seed)
    return save_f_trigen(FTrigen(cfg), cfg, path, step=0, source="untrained")


def train_variant(config_file: Path, run_dir: Path, variant: str, progress: bool) -> float | None:
    """Train one variant in a child process (resuming an interrupted run); seconds it took, None if already done."""
    export = run_dir / "f_trigen.safetensors"
    record = run_dir / "study.json"
    if export.is_file() and record.is_file():
        return json.loads(record.read_text()).get("train_s")
    cmd = [sys.executable, "-m", "g3dr.launchers.main", "train", "--config", str(config_file),
           f"run_dir={run_dir}", f"loss.depth_supervision={variant}", *([] if progress else ["--no-progress"])]
    if (run_dir / "checkpoints").is_dir():
        cmd += ["--resume", "auto"]
    env = dict(os.environ)
    if not progress:
        env["TQDM_DISABLE"] = "1"
    from g3dr.log import get_logger

    get_logger("g3dr.study").info("training %s: %s", variant, " ".join(cmd))
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        raise ConfigError(f"training variant {variant!r} failed (rc {proc.returncode}); its log is above, its run "
                          f"folder {run_dir}; rerun the study to resume it")
    if not export.is_file():
        raise ConfigError(f"training variant {variant!r} finished without writing {export}")
    record.write_text(json.dumps({"variant": variant, "train_s": elapsed}, indent=2))
    return elapsed


def table_rows(results: Mapping[str, Mapping[str, float]], scales: Sequence[float],
               variants: Sequence[str]) -> list[dict[str, object]]:
    """Long-form rows ``{sigma_scale, variant, metric..}`` (the CSV), one per (scale, variant)."""
    from g3dr.eval.report import format_scale

    rows = []
    for scale in scales:
        for variant in variants:
            row: dict[str, object] = {"sigma_scale": format_scale(scale), "variant": variant}
            for metric in (*STUDY_METRICS, FLAT):
                row[metric] = results.get(variant, {}).get(f"{metric}/s{format_scale(scale)}", math.nan)
            rows.append(row)
    return rows


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.2f}" if abs(value) >= 10 else f"{value:.3f}"
    return str(value)


def table_markdown(results: Mapping[str, Mapping[str, float]], scales: Sequence[float], variants: Sequence[str]) -> str:
    """Table S1's layout: one row per sigma scale; a column group per variant with every study metric."""
    from g3dr.eval.report import format_scale

    header = ["sigma", HEADERS[FLAT]] + [f"{v}: {HEADERS[m]}" for v in variants for m in STUDY_METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for scale in scales:
        key = f"/s{format_scale(scale)}"
        flat = [results.get(v, {}).get(FLAT + key, math.nan) for v in variants]
        cells = [format_scale(scale), _fmt(next((x for x in flat if not math.isnan(x)), math.nan))]
        for variant in variants:
            for metric in STUDY_METRICS:
                value = results.get(variant, {}).get(metric + key, math.nan)
                cells.append(_fmt(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_csv(rows: Sequence[Mapping[str, object]]) -> str:
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return out.getvalue()


def plot(results: Mapping[str, Mapping[str, float]], scales: Sequence[float], variants: Sequence[str],
         path: Path) -> Path:
    """One panel per metric against sigma scale (log axis), a line per variant; the initialisation dashed."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from g3dr.eval.report import format_scale

    fig, axes = plt.subplots(1, len(STUDY_METRICS), figsize=(4 * len(STUDY_METRICS), 3.4))
    for ax, metric in zip(axes, STUDY_METRICS):
        for variant in variants:
            ys = [results.get(variant, {}).get(f"{metric}/s{format_scale(s)}", math.nan) for s in scales]
            ax.plot(scales, ys, "--" if variant == BASELINE else "-o", label=variant,
                    color="grey" if variant == BASELINE else None)
        if metric == "psnr_novel":
            flat = [results.get(BASELINE, {}).get(f"{FLAT}/s{format_scale(s)}", math.nan) for s in scales]
            ax.plot(scales, flat, ":", color="black", label="flat colour (no model)")
        ax.set_xscale("log")
        ax.set_xticks(list(scales), [format_scale(s) for s in scales])
        ax.set_xlabel("sigma scale")
        ax.set_title(HEADERS[metric])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_table_s1(args: argparse.Namespace) -> int:
    from g3dr.config import dump_config
    from g3dr.distributed import resolve_dist_env
    from g3dr.eval.runner import EvalOptions, Evaluator, checkpoint_ref
    from g3dr.tracking import EvalTracker, resolve_tracking
    from g3dr.log import get_logger

    log = get_logger("g3dr.study")
    variants = _csv_list(args.variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ConfigError(f"--variants: unknown {unknown or 'empty list'}; choose from {', '.join(VARIANTS)}")
    scales = [float(s) for s in _csv_list(args.sigma_scales)]
    if args.views < 1:
        raise ConfigError(f"--views must be >= 1, got {args.views}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = study_config(args.config, args.overrides, out, args.steps)
    config_file = out / "config.yaml"
    text = dump_config(cfg)
    if config_file.is_file():
        changed = _changed_keys(config_file, cfg)
        if changed:
            raise ConfigError(f"{out} holds a study with another config ({config_file}: {', '.join(changed[:8])}"
                              f"{' ...' if len(changed) > 8 else ''} differ); use another --out or delete it")
    config_file.write_text(text)  # the same values (a key added since, at its default, is written out)
    progress = not args.no_progress
    n_eval = args.eval_samples or cfg.eval.num_samples

    started = time.monotonic()
    eval_data = write_eval_set(cfg, out, n_eval, args.views, progress)
    ckpts = {BASELINE: save_initialisation(cfg, out / BASELINE / "f_trigen.safetensors")}
    results = {name: VariantResult(name) for name in (BASELINE, *variants)}
    for variant in variants:
        run_dir = out / variant
        results[variant].train_s = train_variant(config_file, run_dir, variant, progress)
        ckpts[variant] = run_dir / "f_trigen.safetensors"
        log.info("%s trained in %.0f s", variant, results[variant].train_s or 0.0)

    uri, artifacts = resolve_tracking(args.mlflow_uri or cfg.logging.mlflow_uri or None, out)
    tracker = EvalTracker(uri, args.experiment, artifact_location=artifacts)
    parent_file = out / "parent_run.json"
    if parent_file.is_file():  # a rerun (after an interruption) keeps its children under one parent
        parent = json.loads(parent_file.read_text())["run_id"]
    else:
        parent = tracker.start_run("table-s1", {"g3dr.study": "table-s1"}, None)
        parent_file.write_text(json.dumps({"run_id": parent, "uri": uri}))
    tracker.log_params(parent, {"variants": ",".join(variants), "sigma_scales": args.sigma_scales,
                                "views": str(args.views), "eval_samples": str(n_eval),
                                "total_steps": str(cfg.train.total_steps), "config": str(config_file)})
    overrides = ("data.source=shards", f"data.shards={eval_data}", "eval.metrics=[nfs, da, gt_views]",
                 f"eval.sigma_scales=[{', '.join(map(str, scales))}]", f"eval.num_samples={n_eval}",
                 "eval.fid_samples=0")
    evaluator = Evaluator(EvalOptions(overrides=overrides, out_dir=out / "eval", mlflow_uri=uri,
                                      experiment=args.experiment, progress=progress), resolve_dist_env())
    try:
        for name, path in ckpts.items():
            outcome = evaluator.evaluate(checkpoint_ref(path), parent_run_id=parent)
            metrics = outcome.results or tracker.run_metrics(outcome.run_id)  # skipped: its finished run
            results[name].metrics = dict(metrics)
            results[name].checkpoint = str(path)
            results[name].eval_run_id = outcome.run_id
        names = [BASELINE, *variants]
        metric_table = {name: results[name].metrics for name in names}
        report = out / "report"
        report.mkdir(exist_ok=True)
        (report / "table-s1.md").write_text(table_markdown(metric_table, scales, names))
        (report / "table-s1.csv").write_text(table_csv(table_rows(metric_table, scales, names)))
        plot(metric_table, scales, names, report / "table-s1.png")
        summary = {"wall_s": time.monotonic() - started, "config": str(config_file), "variants": {
            name: {"train_s": r.train_s, "checkpoint": r.checkpoint, "eval_run_id": r.eval_run_id, "metrics": r.metrics}
            for name, r in results.items()}}
        (report / "study.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        (report / "config.yaml").write_text(text)
        tracker.log_metrics(parent, {f"train_s/{n}": results[n].train_s for n in variants
                                     if results[n].train_s is not None}, step=0)
        tracker.log_artifacts(parent, report)
        tracker.end_run(parent, "FINISHED")
    except BaseException:
        tracker.end_run_quietly(parent, "FAILED")
        raise
    print((report / "table-s1.md").read_text(), end="")
    print(f"study: {report}/table-s1.md, .csv, .png; MLflow {uri} experiment {args.experiment} run {parent}")
    return 0
