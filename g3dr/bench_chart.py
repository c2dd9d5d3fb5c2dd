"""``g3dr bench chart FILE... --out PNG``: the JSON lines ``g3dr bench renderer`` / ``step`` printed, as a chart.

One panel pair per benchmark kind: time and peak memory of the fused path next to the reference path, one pair
of bars per benchmarked case (a renderer line is one case, labelled by its size; a step line holds one case per
config), each fused bar annotated with its ratio to the reference. The figures are read from the files as they
are (save a benchmark's output with ``g3dr bench renderer ... | tee renderer.jsonl``); nothing is typed in.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register_bench(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser(
        "chart", help="chart the JSON lines of g3dr bench renderer / step (fused vs reference: time, memory)",
        description="Read JSON lines printed by `g3dr bench renderer` and `g3dr bench step` and draw the fused "
                    "and reference paths' time and peak memory side by side as one PNG.")
    parser.add_argument("files", nargs="+", metavar="FILE", help="files of benchmark JSON lines")
    parser.add_argument("--out", required=True, metavar="PNG", help="the chart to write")
    parser.set_defaults(handler=run)


def cases(lines: list[dict]) -> list[dict]:
    """``{label, time_fused, time_reference, mem_fused, mem_reference, time_unit}`` per benchmarked case."""
    out = []
    for line in lines:
        if line.get("bench") == "renderer":
            c = line["config"]
            label = (f"renderer {c['resolution']}px {c['num_coarse']}+{c['num_fine']} C{c['channels']}"
                     f"{' canonical' if c.get('canonical') else ''} ({line['device']})")
            out.append({"label": label, "time_fused": line["fused_s"], "time_reference": line["reference_s"],
                        "mem_fused": line["fused_peak_mib"], "mem_reference": line["reference_peak_mib"],
                        "time_unit": "s (forward + backward)"})
        elif line.get("bench") == "step":
            for config, impls in line["cases"].items():
                if "fused" not in impls or "reference" not in impls:
                    continue
                out.append({"label": f"step {config} ({line['device']})",
                            "time_fused": impls["fused"]["s_per_step"]["mean"],
                            "time_reference": impls["reference"]["s_per_step"]["mean"],
                            "mem_fused": impls["fused"]["peak_mib"], "mem_reference": impls["reference"]["peak_mib"],
                            "time_unit": "s per training step"})
    return out


def run(args: argparse.Namespace) -> int:
    from g3dr.errors import ConfigError

    lines = []
    for name in args.files:
        for text in Path(name).read_text().splitlines():
            if text.strip().startswith("{"):
                lines.append(json.loads(text))
    rows = cases(lines)
    if not rows:
        raise ConfigError(f"no `g3dr bench renderer` or `step` line with both paths in {', '.join(args.files)}")
    draw(rows, Path(args.out))
    print(f"wrote {args.out} ({len(rows)} case(s))")
    return 0


def draw(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 0.9 * len(rows) + 1.6))
    y = np.arange(len(rows))
    for ax, key, title in ((axes[0], "time", "time"), (axes[1], "mem", "peak memory (MiB)")):
        ref = np.array([r[f"{key}_reference"] for r in rows], dtype=float)
        fused = np.array([r[f"{key}_fused"] for r in rows], dtype=float)
        ax.barh(y + 0.2, ref, height=0.38, color="#bbbbbb", label="reference")
        ax.barh(y - 0.2, fused, height=0.38, color="#d9822b", label="fused")
        for i, (f, r) in enumerate(zip(fused, ref)):
            ax.text(f, i - 0.2, f"  {f / r:.2f}x", va="center", fontsize=8)
        ax.set_yticks(y, [r["label"] for r in rows] if key == "time" else [""] * len(rows), fontsize=8)
        ax.invert_yaxis()
        units = sorted({r["time_unit"] for r in rows})
        ax.set_title(title if key == "mem" else f"time ({'; '.join(units)})", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
