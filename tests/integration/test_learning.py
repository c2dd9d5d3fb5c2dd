"""It learns 3D: a short real training on synthetic primitives beats its own initialisation against exact
novel views, on colour and on geometry, and breaking the renderer's gradients on purpose makes that fail.

One module-scoped set-up trains three tiny runs (32 px, the reference renderer, critics off: their
weights are 0, so only L1, depth and TV teach) and scores each, and the initialisation, with
``g3dr eval``'s ground-truth view metrics on held-out primitives (other seed) with 2 exact views each.
With the critics off a novel view teaches nothing (no term compares it with anything but TV), so the runs
render the canonical view only (``loss.tau=0``): every step then trains colour and depth, and 300 steps at
batch 2 learn both in the time 150 steps at batch 4 with 40% untaught novel views learned neither
(docs/science.md, "The learning test"). The novel views are never trained: what they show is the 3D.

- ``good``: the method as configured (depth kernel);
- ``flipped``: the depth kernel turned inside out (``c_max + c_min - k``): gradients scaled up away from the
  pseudo-depth and down at it;
- ``no_colour``: the colour gradients cut at the decoder (``rgb.detach()``): colour cannot learn.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

STEPS = 300
OVERRIDES = [
    "data.synthetic_size=64",
    "renderer.impl=reference",
    f"train.total_steps={STEPS}", "train.lr=2e-3", "train.warmup_steps=10", "train.micro_batch_size=2",
    "train.global_batch_size=2", "train.checkpoint_every=100000", "train.image_every=0", "train.log_every=100",
    "loss.canonical.perceptual=0", "loss.novel.perceptual=0", "loss.novel.clip=0",
    "loss.tau=0",
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


def test_a_short_run_beats_its_initialisation_on_exact_novel_views(scores):
    # Measured (2 cores, 300 steps): novel PSNR 16.43 -> 17.45 dB, DA novel 1.54 -> 0.84. The initialisation
    # renders mid-grey, which already scores ~16.4 dB on these scenes (every view painted in the input image's
    # mean colour: 19.0 dB); the study's eval set agrees (16.45 -> 17.50, DA 1.57 -> 0.90).
    good, init = scores["good"], scores["untrained"]
    assert good["psnr_novel/s1"] > init["psnr_novel/s1"] + 0.5, (good, init)
    assert good["da_novel/s1"] < init["da_novel/s1"] - 0.3, (good, init)


def test_cutting_the_colour_gradients_wrecks_the_colours(scores):
    # Measured: canonical PSNR 18.4 (good) vs 10.0 (colour gradients cut), novel 17.5 vs 9.8.
    broken, good = scores["no_colour"], scores["good"]
    assert broken["psnr_canonical/s1"] < good["psnr_canonical/s1"] - 3.0, (broken, good)
    assert broken["psnr_novel/s1"] < good["psnr_novel/s1"] - 3.0, (broken, good)


def test_flipping_the_depth_kernel_fails_the_learning_criterion(scores):
    # Measured: the flipped kernel's novel PSNR 13.7 dB, below the initialisation's 16.4 and the kernel's 17.5
    # (canonical 14.7 vs 18.4). Turned inside out, the kernel gives colour and alpha 5% of their gradient at
    # the pseudo-depth, where the surface is: the novel rays' weight within 0.1 of the exact surface is 0.10
    # (kernel 0.37). Its depth still improves (DA novel 0.73 vs 0.84 with the kernel: the kernel's alpha half
    # is a brake at this scale, docs/science.md), so the failure is in colour, and the criterion the good run
    # passes is the one it fails.
    broken, good, init = scores["flipped"], scores["good"], scores["untrained"]
    assert broken["psnr_novel/s1"] < init["psnr_novel/s1"], (broken, init)
    assert broken["psnr_novel/s1"] < good["psnr_novel/s1"] - 2.0, (broken, good)
