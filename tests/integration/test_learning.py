"""It learns 3D: a short real training on synthetic primitives beats its own initialisation against exact
novel views, and breaking the renderer's gradients on purpose makes that fail.

One module-scoped set-up trains three tiny runs (32 px, the reference renderer, critics off: their
weights are 0, so only L1, depth and TV teach) and scores each, and the initialisation, with
``g3dr eval``'s ground-truth view metrics on held-out primitives (other seed) with 2 exact views each:

- ``good``: the method as configured (depth kernel);
- ``flipped``: the depth kernel turned inside out (``c_max + c_min - k``): gradients scaled up away from the
  pseudo-depth and down at it (it learns geometry *faster* at this scale: see docs/science.md);
- ``no_colour``: the colour gradients cut at the decoder (``rgb.detach()``): colour cannot learn.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

STEPS = 150
OVERRIDES = [
    "data.synthetic_size=64",
    "renderer.impl=reference",
    f"train.total_steps={STEPS}", "train.lr=1e-3", "train.warmup_steps=10", "train.micro_batch_size=4",
    "train.global_batch_size=4", "train.checkpoint_every=100000", "train.image_every=0", "train.log_every=100",
    "loss.canonical.perceptual=0", "loss.novel.perceptual=0", "loss.novel.clip=0",
]


def _train(root: Path, name: str) -> Path:
    from g3dr.config import load_config
    from g3dr.train.trainer import train

    cfg = load_config("configs/tiny.yaml", [f"run_dir={root / name}", f"data.synthetic_dir={root / 'train-data'}",
                                            f"logging.mlflow_uri=sqlite:///{root / 'mlflow.db'}", *OVERRIDES])
    train(cfg)
    return root / name / "f_trigen.safetensors"


def _score(root: Path, checkpoint: Path, eval_data: Path) -> dict[str, float]:
    from g3dr.launchers.main import main

    out = root / "eval" / checkpoint.parent.name
    rc = main(["eval", "--checkpoint", str(checkpoint), "--data", str(eval_data), "--metrics", "gt_views",
               "--sigma-scales", "1", "--num-samples", "16", "--fid-samples", "0", "--out", str(out),
               "--mlflow-uri", f"sqlite:///{root / 'mlflow.db'}", "--no-progress", "--device", "cpu"])
    assert rc == 0
    (results,) = list(out.glob("*/results.json"))
    return json.loads(results.read_text())["metrics"]


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    import torch

    import g3dr.render.renderer as renderer
    from g3dr.config import load_config
    from g3dr.data.synth import ViewSpec, write_synthetic_shards
    from g3dr.models.checkpoint_io import save_f_trigen
    from g3dr.models.f_trigen import FTrigen
    from g3dr.train.checkpoint import seed_everything

    root = tmp_path_factory.mktemp("learning")
    cfg = load_config("configs/tiny.yaml", OVERRIDES)
    eval_data = root / "eval-data"
    write_synthetic_shards(str(eval_data), 16, (32,), seed=777, shard_size=16, progress=False,
                           views=ViewSpec(count=2, camera=cfg.camera, box_half=cfg.renderer.box_warp / 2))
    seed_everything(cfg.train.seed)
    init = save_f_trigen(FTrigen(cfg), cfg, root / "untrained" / "f_trigen.safetensors", source="untrained")

    checkpoints = {"untrained": init, "good": _train(root, "good")}
    mp = pytest.MonkeyPatch()
    try:
        kernel = renderer.depth_kernel_from_depths

        def flipped(depths_mid, depth_prior, kcfg):
            return (kcfg.c_max + kcfg.c_min) - kernel(depths_mid, depth_prior, kcfg)

        mp.setattr(renderer, "depth_kernel_from_depths", flipped)  # render_rays_with decides the kernel for both paths
        checkpoints["flipped"] = _train(root, "flipped")
        mp.undo()

        decode = renderer.ReferencePrimitives.decode

        def no_colour_grad(*args, **kwargs):
            rgb, sigma = decode(*args, **kwargs)
            return [rgb.detach(), sigma]

        mp.setattr(renderer.ReferencePrimitives, "decode", no_colour_grad)
        checkpoints["no_colour"] = _train(root, "no_colour")
    finally:
        mp.undo()
    result = {name: _score(root, path, eval_data) for name, path in checkpoints.items()}
    for name, metrics in result.items():
        print(name, {k: round(v, 3) for k, v in sorted(metrics.items())})
    assert all(math.isfinite(v) for m in result.values() for v in m.values())
    del torch
    return result


def test_a_short_run_beats_its_initialisation_on_exact_novel_view_geometry(scores):
    # Measured (2 cores, 150 steps): DA novel 1.54 -> 1.08; novel PSNR 16.4 -> 15.9 dB. The initialisation
    # renders mid-grey, which already scores ~16.4 dB on these scenes; 150 steps do not beat it on colour
    # (docs/science.md: neither do 800 steps of the study), so colour is held to "not collapsed" only.
    good, init = scores["good"], scores["untrained"]
    assert good["da_novel/s1"] < init["da_novel/s1"] - 0.3, (good, init)
    assert good["psnr_novel/s1"] > init["psnr_novel/s1"] - 1.5, (good, init)


def test_cutting_the_colour_gradients_wrecks_the_colours(scores):
    # Measured: canonical PSNR 16.3 (good) vs 9.9 (colour gradients cut), novel 15.9 vs 9.7.
    broken, good = scores["no_colour"], scores["good"]
    assert broken["psnr_canonical/s1"] < good["psnr_canonical/s1"] - 3.0, (broken, good)
    assert broken["psnr_novel/s1"] < good["psnr_novel/s1"] - 3.0, (broken, good)


def test_the_depth_kernel_shapes_the_geometry_that_is_learned(scores):
    # A flipped kernel does NOT fail to learn: measured DA novel 0.76 flipped vs 1.08 with the kernel (it
    # learns geometry faster; docs/science.md). What this pins is that the kernel reaches the gradients:
    # turning it inside out changes the learned geometry by a wide margin.
    broken, good = scores["flipped"], scores["good"]
    assert abs(broken["da_novel/s1"] - good["da_novel/s1"]) > 0.1, (broken, good)
