"""`g3dr eval` on real data: the 24 release photos with 16-bit pseudo-depth, sharded by `g3dr prep`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from g3dr.launchers.main import main
from g3dr.metrics.depth import non_flatness_score
from g3dr_test_support import load_test_helper

fx = load_test_helper("eval_fixtures")


def test_release_pseudo_depth_nfs(release_samples):
    """The pseudo-depth of real photos is far from flat: NFS of the 24 release maps (256 px) in [4, 6]."""
    paths = sorted(release_samples.rglob("*_depth.png"))
    maps = [np.array(Image.open(p)).astype(np.float64) / 65536 * 2 + 4 for p in paths]
    assert len(maps) == 24
    nfs = non_flatness_score(np.stack(maps), 4.0, 6.0, 64)
    assert nfs == pytest.approx(44.97, abs=0.01)


def test_eval_on_release_shards(release_samples, tmp_path, capsys):
    shards = tmp_path / "shards"
    assert main(["prep", "shards", "--src", str(release_samples), "--layout", "release", "--out", str(shards),
                 "--resolution", "32", "--shard-size", "8", "--no-progress"]) == 0
    cfg = fx.tiny_config(tmp_path)
    fx.make_inception(cfg)
    ck = fx.make_checkpoint(cfg, tmp_path / "run" / "f_trigen.safetensors", step=3)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(ck), "--data", str(shards), "--metrics", "is,nfs,da",
                 "--sigma-scales", "1", "--num-samples", "10", "--no-progress",
                 "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "eval.is_splits=2"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("evaluated\t")
    saved = json.loads(next((tmp_path / "run" / "eval").glob("*/results.json")).read_text())
    assert saved["complete"] and saved["params"]["data.shards"] == str(shards)
    metrics = saved["metrics"]
    assert set(metrics) == {"is/s1", "is_std/s1", "is_canonical/s1", "is_std_canonical/s1", "nfs/s1", "da/s1"}
    assert all(math.isfinite(v) for v in metrics.values())
    assert 1.0 <= metrics["nfs/s1"] <= 64.0 and 0.0 <= metrics["da/s1"] <= 4.0
