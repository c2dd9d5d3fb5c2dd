"""``g3dr bench loader`` runs end to end and prints one complete JSON line."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from g3dr.launchers.main import main
from g3dr.data.depth_codec import u16_from_depth
from g3dr.data.synth import synth_sample


def test_bench_loader_prints_one_json_line(tmp_path, capsys, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the bench's work folder goes here
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        rgb, depth, _, _ = synth_sample(0, i, 64)
        Image.fromarray(rgb).save(src / f"p{i}.jpg")
        Image.fromarray(u16_from_depth(depth)).save(src / f"p{i}_depth.png")
    assert main(["bench", "loader", "--src", str(src), "--n", "24", "--resolution", "32", "--workers", "0",
                 "--batch", "4"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["bench"] == "loader" and result["n"] == 24 and result["workers"] == 0
    for key in ("folder_samples_per_s", "shards_samples_per_s", "prep_images_per_s_1_worker", "prep_images_per_s_2_workers"):
        assert result[key] > 0
    assert np.isclose(result["speedup"], result["shards_samples_per_s"] / result["folder_samples_per_s"], rtol=0.02)
    assert result["prep_scaling_1_to_2"] > 0 and isinstance(result["meets_goal"], bool)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # the work folder was removed
