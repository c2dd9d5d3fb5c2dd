"""``g3dr bench chart``: benchmark JSON lines become one chart; the figures are the lines' own."""

import json

from PIL import Image

from g3dr.bench_chart import cases
from g3dr.launchers.main import main

RENDERER = {"bench": "renderer", "device": "cpu", "config": {"resolution": 64, "num_coarse": 16, "num_fine": 16,
            "channels": 32, "canonical": False}, "fused_s": 1.5, "reference_s": 3.0, "fused_peak_mib": 100.0,
            "reference_peak_mib": 400.0}
STEP = {"bench": "step", "device": "cpu", "cases": {"tiny": {
    "reference": {"s_per_step": {"mean": 0.1}, "peak_mib": 50.0},
    "fused": {"s_per_step": {"mean": 0.2}, "peak_mib": 60.0}}}}

def test_cases_read_both_kinds_of_line():
    rows = cases([RENDERER, STEP, {"bench": "loader"}])
    assert [(r["label"], r["time_fused"], r["mem_reference"]) for r in rows] == [
        ("renderer 64px 16+16 C32 (cpu)", 1.5, 400.0), ("step tiny (cpu)", 0.2, 50.0)]

def test_chart_is_written_and_empty_input_is_an_error(tmp_path, capsys):
    src = tmp_path / "bench.jsonl"
    src.write_text("log line\n" + json.dumps(RENDERER) + "\n" + json.dumps(STEP) + "\n")
    assert main(["bench", "chart", str(src), "--out", str(tmp_path / "c.png")]) == 0
    assert Image.open(tmp_path / "c.png").size[0] > 800 and "2 case(s)" in capsys.readouterr().out
    (tmp_path / "empty.jsonl").write_text("nothing\n")
    assert main(["bench", "chart", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "d.png")]) == 2
    assert "no `g3dr bench renderer`" in capsys.readouterr().err
