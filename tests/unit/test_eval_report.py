"""The Table S1 report: metric names, CSV and markdown layout, the plot and the grids."""

from __future__ import annotations

import csv
import io

import torch
from PIL import Image

from g3dr.eval.report import (PAPER_TABLE_S1, format_scale, metric_key, plot_metrics, save_grid, table_csv,
                              table_markdown, table_rows)

RESULTS = {"fid/s1": 20.5, "is/s1": 30.25, "is_std/s1": 1.5, "nfs/s1": 12.0, "da/s1": 0.4,
           "fid_canonical/s1": 18.0, "fid/s5": 21.0, "is/s5": 29.0, "is_std/s5": 1.0, "nfs/s5": 11.0,
           "da/s5": 0.5, "fid_canonical/s5": 19.0}


def test_metric_names():
    assert format_scale(5.0) == "5" and format_scale(2.5) == "2.5"
    views = ("canonical", "novel")
    assert metric_key("fid", 5.0, "novel", views) == "fid/s5"
    assert metric_key("fid", 5.0, "canonical", views) == "fid_canonical/s5"
    assert metric_key("fid", 50.0, "canonical", ("canonical",)) == "fid/s50"
    assert metric_key("nfs", 10.0, "canonical", views) == "nfs/s10"
    assert metric_key("da", 1.0) == "da/s1"


def test_table_rows_csv_and_markdown():
    rows = table_rows(RESULTS, [1.0, 5.0])
    assert rows[0]["sigma_scale"] == "1" and rows[0]["fid"] == 20.5 and rows[0]["fid_canonical"] == 18.0
    assert rows[1]["paper_fid"] == PAPER_TABLE_S1[5.0]["fid"] == 12.98
    parsed = list(csv.DictReader(io.StringIO(table_csv(rows))))
    assert [r["sigma_scale"] for r in parsed] == ["1", "5"]
    assert float(parsed[1]["is"]) == 29.0 and float(parsed[0]["paper_nfs"]) == 36.51
    assert list(parsed[0])[:6] == ["sigma_scale", "fid", "is", "is_std", "nfs", "da"]
    md = table_markdown(rows, title="step 10")
    assert "| sigma scale | FID ↓ | IS ↑ |" in md
    assert "| 5 | 21.00 | 29.00 | 1.00 | 11.00 | 0.500 |" in md
    assert "12.98" in md and "146.30" in md
    # a scale the paper did not report gets empty paper cells
    rows = table_rows({"fid/s2.5": 3.0}, [2.5])
    assert table_csv(rows).splitlines()[1].startswith("2.5,3.0,,,")


def test_plot_and_grids(tmp_path):
    plot = plot_metrics(RESULTS, [1.0, 5.0], tmp_path / "plot.png")
    assert Image.open(plot).size[0] > 300
    rgb = torch.linspace(-1, 1, 4 * 3 * 8 * 8).view(4, 3, 8, 8)
    grid = Image.open(save_grid(rgb, tmp_path / "g.png", nrow=2))
    assert grid.size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)
    from g3dr.assets.video import colorize_depth

    depth = torch.full((2, 1, 8, 8), 6.0)
    depth[1] = 4.0
    coloured = Image.open(save_grid(depth, tmp_path / "d.png", value_range=(4.0, 6.0)))
    # the depth colours of the videos: far dark purple, near bright yellow
    far, near = (tuple(int(c) for c in colorize_depth(torch.full((1, 1, 1), v), 4.0, 6.0)[0, 0, 0]) for v in (6.0, 4.0))
    assert coloured.getpixel((5, 5)) == far and coloured.getpixel((8 + 2 + 5, 5)) == near and sum(near) > sum(far)
