"""The eval report: metric names, the Table S1 table (CSV and markdown), the metric-vs-scale plot, grids.

Pure formatting of finished results; no MLflow, no model. Results are a flat ``{key: value}`` mapping
with the MLflow metric names:

- ``fid/s5``, ``is/s5``, ``is_std/s5``: FID and IS (mean, std over splits) at sigma scale 5 on the
  *table view* (novel views when they are evaluated, as FID/IS in EG3D and 3DGP use random cameras;
  otherwise canonical views); ``fid_canonical/s5`` etc. for the other view;
- ``nfs/s5``, ``da/s5``: NFS and depth accuracy, always on canonical views (3DGP measures NFS in the
  frontal view; DA compares with the input's pseudo-depth, which only the canonical view sees);
- ``psnr_canonical/s5``, ``psnr_novel/s5``, ``da_novel/s5``: against stored ground-truth views
  (``gt_views``): PSNR of the canonical render against the input, PSNR and DA at the stored view cameras;
  ``psnr_novel_flat/s5``: the no-model baseline (each view painted in the input's mean colour);
  ``weight_front_novel/s5``, ``weight_surface_novel/s5``: the mean rendering weight in front of the exact
  surface, and at it, per valid pixel of the stored views;
  with super-resolution and views stored at its size, ``psnr_canonical_sr/s5``, ``psnr_novel_sr/s5`` (the
  upscaled renders) and ``psnr_canonical_bicubic/s5``, ``psnr_novel_bicubic/s5`` (bicubic upsampling of the
  same renders) against the input and the views at that size.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

METRIC_ORDER = ("fid", "is", "is_std", "nfs", "da", "psnr_canonical", "psnr_novel", "da_novel", "psnr_novel_flat",
                "weight_front_novel", "weight_surface_novel", "psnr_canonical_sr", "psnr_canonical_bicubic",
                "psnr_novel_sr", "psnr_novel_bicubic")
LOWER_IS_BETTER = {"fid": True, "is": False, "is_std": True, "nfs": False, "da": True, "psnr": False,
                   "weight_front_novel": True, "weight_surface_novel": False}
"""By metric name, else by its first word (``psnr_novel`` -> ``psnr``)."""

PAPER_TABLE_S1: dict[float, dict[str, float]] = {
    1.0: {"fid": 13.12, "is": 151.72, "nfs": 36.51},
    5.0: {"fid": 12.98, "is": 146.30, "nfs": 35.24},
    10.0: {"fid": 14.42, "is": 131.95, "nfs": 35.01},
    50.0: {"fid": 21.37, "is": 99.59, "nfs": 34.54},
}
"""G3DR's own rows of Table S1 (ImageNet 256, generated RGB-D inputs), by sigma scale."""

PAPER_IMAGENET_INPUTS: dict[str, float] = {"fid": 11.25, "is": 168.6, "nfs": 36.7, "da": 0.33}
"""G3DR with ImageNet images as inputs (scale 1); the setting closest to ``g3dr eval`` on dataset images."""


def format_scale(scale: float) -> str:
    """``5.0`` -> ``"5"``, ``2.5`` -> ``"2.5"``: the scale as it appears in metric names."""
    return str(int(scale)) if float(scale).is_integer() else repr(float(scale))


def table_view(views: Sequence[str]) -> str:
    """The view whose FID/IS fill the table: ``novel`` when evaluated, else ``canonical``."""
    return "novel" if "novel" in views else "canonical"


def metric_key(metric: str, scale: float, view: str | None = None, views: Sequence[str] = ("novel",)) -> str:
    """MLflow name of ``metric`` at ``scale``; FID/IS on a view other than the table view get a suffix."""
    if metric in ("fid", "is", "is_std") and view is not None and view != table_view(views):
        metric = f"{metric}_{view}"
    return f"{metric}/s{format_scale(scale)}"


def table_rows(results: Mapping[str, float], scales: Sequence[float]) -> list[dict[str, object]]:
    """One row per sigma scale: our metrics (all keys present for that scale) and the paper's Table S1."""
    rows = []
    for scale in scales:
        suffix = f"/s{format_scale(scale)}"
        row: dict[str, object] = {"sigma_scale": format_scale(scale)}
        names = sorted({k[: -len(suffix)] for k in results if k.endswith(suffix)},
                       key=lambda m: (METRIC_ORDER.index(m) if m in METRIC_ORDER else len(METRIC_ORDER), m))
        for name in names:
            row[name] = results[name + suffix]
        paper = PAPER_TABLE_S1.get(float(scale), {})
        for name in ("fid", "is", "nfs"):
            row[f"paper_{name}"] = paper.get(name, math.nan)
        rows.append(row)
    return rows


def _columns(rows: Sequence[Mapping[str, object]]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        cols.extend(c for c in row if c not in cols)
    paper = [c for c in cols if c.startswith("paper_")]
    return [c for c in cols if not c.startswith("paper_")] + paper


def table_csv(rows: Sequence[Mapping[str, object]]) -> str:
    """The table as CSV (empty cells where a metric was not computed)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=_columns(rows), restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(v, csv_mode=True) for k, v in row.items()})
    return out.getvalue()


def _fmt(value: object, csv_mode: bool = False) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "" if csv_mode else "-"
        return repr(value) if csv_mode else f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"
    return str(value)


_HEADERS = {"sigma_scale": "sigma scale", "fid": "FID ↓", "is": "IS ↑", "is_std": "IS std", "nfs": "NFS ↑",
            "da": "DA ↓", "psnr_canonical": "PSNR canonical ↑", "psnr_novel": "PSNR novel ↑",
            "da_novel": "DA novel ↓", "psnr_novel_flat": "PSNR novel, flat colour",
            "weight_front_novel": "weight in front, novel ↓", "weight_surface_novel": "weight at surface, novel ↑",
            "psnr_canonical_sr": "PSNR canonical, SR ↑", "psnr_canonical_bicubic": "PSNR canonical, bicubic",
            "psnr_novel_sr": "PSNR novel, SR ↑", "psnr_novel_bicubic": "PSNR novel, bicubic",
            "paper_fid": "paper FID",
            "paper_is": "paper IS", "paper_nfs": "paper NFS"}


def table_markdown(rows: Sequence[Mapping[str, object]], title: str = "", is_splits: int | None = None,
                   seed: int | None = None, note: str = "") -> str:
    """The table in the layout of the paper's Table S1 (one row per scale), the paper's rows beside ours.
    With ``is_splits``, a note says how IS and its std were computed (splits, shuffle seed); ``note`` adds a
    paragraph (the eval states the image sizes and the super-resolution file there)."""
    cols = _columns(rows)
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(_HEADERS.get(c, c) for c in cols) + " |")
    lines.append("|" + "|".join(" ---: " for _ in cols) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, math.nan)) for c in cols) + " |")
    paper = PAPER_IMAGENET_INPUTS
    lines += ["", "Paper columns: G3DR's rows of Table S1 (ImageNet 256, generated RGB-D inputs). With ImageNet "
              f"images as inputs the paper reports, at scale 1, FID {paper['fid']}, IS {paper['is']}, "
              f"NFS {paper['nfs']}, DA {paper['da']}. FID/IS depend on N and on the reference set; compare "
              "runs with equal eval configs only.", ""]
    if is_splits is not None:
        lines += [f"IS: mean and population std over {is_splits} splits of the samples, after a shuffle "
                  f"seeded by eval.seed = {seed}.", ""]
    if note:
        lines += [note, ""]
    return "\n".join(lines)


def by_step_markdown(columns: Sequence[tuple[str, Mapping[str, float]]]) -> str:
    """Metrics side by side, one column per checkpoint (``(header, metrics)`` in the given order), one row
    per metric any of them has: what a sweep over a run's step-0 baseline and its checkpoints prints."""
    keys = sorted({k for _, metrics in columns for k in metrics})
    lines = ["| metric | " + " | ".join(h for h, _ in columns) + " |",
             "|---|" + "|".join(" ---: " for _ in columns) + "|"]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(_fmt(float(m.get(key, math.nan))) for _, m in columns) + " |")
    return "\n".join(lines) + "\n"


def plot_metrics(results: Mapping[str, float], scales: Sequence[float], path: str | Path) -> Path:
    """One panel per metric: our value against sigma scale (log axis), with the paper's Table S1 values."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = table_rows(results, scales)
    metrics = [m for m in _columns(rows) if m not in ("sigma_scale",) and not m.startswith("paper_")
               and not m.startswith("is_std")]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(3.2 * max(1, len(metrics)), 3.0), squeeze=False)
    xs = np.array([float(s) for s in scales])
    for ax, metric in zip(axes[0], metrics):
        ys = np.array([float(r.get(metric, math.nan)) for r in rows])
        ax.plot(xs, ys, "o-", label="this run")
        paper_col = f"paper_{metric}"
        if any(paper_col in r and not math.isnan(float(r[paper_col])) for r in rows):
            ax.plot(xs, [float(r.get(paper_col, math.nan)) for r in rows], "s--", color="grey", label="paper")
        ax.set_xscale("log")
        ax.set_xticks(xs, [format_scale(s) for s in scales])
        ax.set_xlabel("sigma scale")
        arrow = "↓" if LOWER_IS_BETTER.get(metric, LOWER_IS_BETTER.get(metric.split("_")[0], False)) else "↑"
        ax.set_title(f"{metric} {arrow}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_grid(images, path: str | Path, value_range: tuple[float, float] = (-1.0, 1.0), nrow: int = 8) -> Path:
    """Save ``images`` ``(K, C, H, W)`` (a torch tensor) as a PNG grid: C = 3 colour mapped from ``value_range``;
    C = 1 depth over ``value_range = (near, far)`` in the depth colours used everywhere (near bright,
    :func:`g3dr.assets.video.colorize_depth`)."""
    import torch
    from PIL import Image
    from torchvision.utils import make_grid

    lo, hi = value_range
    if images.shape[1] == 1:
        from g3dr.assets.video import colorize_depth

        x = torch.from_numpy(colorize_depth(images, lo, hi)).permute(0, 3, 1, 2).float() / 255
    else:
        x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    grid = make_grid(x, nrow=min(nrow, x.shape[0]), padding=2, pad_value=1.0)
    arr = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path
