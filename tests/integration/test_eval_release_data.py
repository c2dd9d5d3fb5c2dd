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
    # NFS and DA recomputed here from the checkpoint's own renders of the first 10 samples (the eval renders
    # deterministically by default): the eval's batching, sample order and reduction must give the same numbers.
    nfs, da = _nfs_and_da_of_renders(ck, shards, 10)
    assert metrics["nfs/s1"] == pytest.approx(nfs, rel=1e-6)
    assert metrics["da/s1"] == pytest.approx(da, rel=1e-5)


def _nfs_and_da_of_renders(checkpoint, shards, n: int) -> tuple[float, float]:
    """NFS (3DGP's depth sum(w t) of canonical renders with the density cut at each image's median, clamped to
    [4, 6], 64 bins) and DA (canonical render depth vs the input's pseudo-depth) of the first ``n`` shard samples,
    straight from the metric definitions (``g3dr.metrics.depth``) and one batched render."""
    import itertools

    import torch

    from g3dr.assets.inputs import inputs_from_shards, rgbd_from_sample
    from g3dr.metrics.depth import depth_accuracy, non_flatness_score
    from g3dr.models.checkpoint_io import load_f_trigen
    from g3dr.render.cameras import camera_to_world_from_angles, canonical_angles

    model, cfg, _ = load_f_trigen(checkpoint, device=torch.device("cpu"), overrides=["renderer.deterministic=true"])
    pairs = [rgbd_from_sample(raw, cfg.data.resolution, cfg.data.depth_scale, cfg.data.depth_offset)
             for raw in itertools.islice(inputs_from_shards([shards]), n)]
    rgb, depth = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    cams = camera_to_world_from_angles(*canonical_angles(n, cfg.camera), cfg.camera.radius)
    with torch.no_grad():
        planes = model.make_planes(rgb, depth)
        rendered = model.renderer(planes, model.decoder, cams, cfg.data.resolution, depth=None, canonical=True)
        cut = model.renderer(planes, model.decoder, cams, cfg.data.resolution, depth=None, canonical=True,
                             cut_quantile=0.5)
    return non_flatness_score(cut["depth_3dgp"], 4.0, 6.0, 64), depth_accuracy(rendered["depth"], depth)
