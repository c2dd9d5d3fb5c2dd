"""``g3dr bench sr-psnr`` (``g3dr/models/sr_quality.py``): its PSNRs against an independent float64 recomputation
(exact synthetic targets rendered again, numpy PSNR), the stored-target mode, and the CLI's JSON line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from g3dr.config import load_config

N = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    from g3dr.data.synth import write_synthetic_shards
    from g3dr.models.checkpoint_io import save_f_trigen
    from g3dr.models.f_trigen import FTrigen
    from g3dr.models.sr import build_sr, save_sr

    root = tmp_path_factory.mktemp("sr-psnr")
    cfg = load_config("configs/tiny.yaml")
    torch.manual_seed(0)
    generator = save_f_trigen(FTrigen(cfg), cfg, root / "f_trigen.safetensors", source="test")
    sr = save_sr(build_sr(cfg.sr), root / "sr.safetensors")
    data = root / "data"
    write_synthetic_shards(str(data), N, (32, 64), seed=77, shard_size=4, progress=False)
    return {"generator": generator, "sr": sr, "data": data}


def _psnr_np(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-image PSNR of uint8-range float64 images (B, H, W, 3) in [0, 255]."""
    mse = (((x - y) / 255.0) ** 2).reshape(len(x), -1).mean(1)
    return 10 * np.log10(1 / mse)


def test_psnrs_match_an_independent_float64_recomputation(setup):
    import torch.nn.functional as F

    from g3dr.data.synth import synth_sample
    from g3dr.models.checkpoint_io import load_f_trigen
    from g3dr.models.sr import load_sr
    from g3dr.models.sr_quality import measure
    from g3dr.render.cameras import camera_to_world_from_angles

    result = measure(setup["generator"], setup["sr"], str(setup["data"]), batch=4)
    assert result["samples"] == N and result["target"].startswith("exact synthetic render")
    assert (result["input_resolution"], result["target_resolution"]) == (32, 64)

    # Independently: the stored 32 px inputs through the deterministic generator, bicubic and SR by hand,
    # the exact 64 px scenes from synth_sample, PSNR in numpy float64.
    from g3dr.data import build_eval_loader
    from g3dr.distributed import DistEnv

    cfg = load_config("configs/tiny.yaml", ["data.source=shards", f"data.shards={setup['data']}", "data.num_workers=0"])
    batches = list(build_eval_loader(cfg, DistEnv(), batch_size=N))
    rgb, depth, keys = batches[0]["rgb"], batches[0]["depth"], batches[0]["key"]
    gen, g_cfg, _ = load_f_trigen(setup["generator"], "cpu", ["renderer.deterministic=true"])
    net = load_sr(setup["sr"])
    with torch.no_grad():
        yaw = torch.full((N,), g_cfg.camera.canonical_yaw)
        pitch = torch.full((N,), g_cfg.camera.canonical_pitch)
        render = gen(rgb, depth, camera_to_world_from_angles(yaw, pitch, g_cfg.camera.radius), True)["rgb"]
        up = {"bicubic": F.interpolate(render, size=(64, 64), mode="bicubic", align_corners=False).clamp(-1, 1),
              "sr": net(render)}
    exact = np.stack([synth_sample(77, int(k.rsplit("_", 1)[1]), 64)[0] for k in keys]).astype(np.float64)

    def as_255(x: torch.Tensor) -> np.ndarray:
        return ((x.double().permute(0, 2, 3, 1).numpy() + 1) * 127.5)

    for name, image in up.items():
        assert result["psnr_db"][name] == pytest.approx(_psnr_np(as_255(image), exact).mean(), abs=2e-3), name
    gain = _psnr_np(as_255(up["sr"]), exact) - _psnr_np(as_255(up["bicubic"]), exact)
    assert result["sr_minus_bicubic_db"] == pytest.approx(gain.mean(), abs=2e-3)
    assert result["sr_wins_fraction"] == pytest.approx((gain > 0).mean(), abs=1e-3)
    assert result["psnr_db"]["render_vs_input"] == pytest.approx(
        _psnr_np(as_255(render.clamp(-1, 1)), as_255(rgb)).mean(), abs=2e-3)


def test_stored_targets_are_the_jpeg_and_differ_slightly(setup):
    from g3dr.models.sr_quality import measure

    exact = measure(setup["generator"], setup["sr"], str(setup["data"]), samples=4)
    stored = measure(setup["generator"], setup["sr"], str(setup["data"]), samples=4, exact_synthetic=False)
    assert exact["samples"] == stored["samples"] == 4 and stored["target"] == "stored image"
    assert stored["psnr_db"]["bicubic"] != exact["psnr_db"]["bicubic"]
    assert stored["psnr_db"]["bicubic"] == pytest.approx(exact["psnr_db"]["bicubic"], abs=0.5)  # JPEG q95 at 64 px


def test_cli_prints_one_json_line(setup, capsys):
    from g3dr.launchers.main import main

    assert main(["bench", "sr-psnr", "--generator", str(setup["generator"]), "--sr", str(setup["sr"]),
                 "--data", str(setup["data"]), "--samples", "2"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["bench"] == "sr-psnr" and line["samples"] == 2 and set(line["psnr_db"]) == {
        "sr", "bicubic", "render_vs_input", "bicubic_of_input", "sr_of_input"}


def test_stochastic_renders_are_seeded(setup):
    from g3dr.models.sr_quality import measure

    a = measure(setup["generator"], setup["sr"], str(setup["data"]), samples=4, jitter_seed=5)
    b = measure(setup["generator"], setup["sr"], str(setup["data"]), samples=4, jitter_seed=5)
    c = measure(setup["generator"], setup["sr"], str(setup["data"]), samples=4)
    assert a["render"] == "stochastic, seed 5" and c["render"] == "deterministic"
    assert a["psnr_db"] == b["psnr_db"] and a["psnr_db"]["render_vs_input"] != c["psnr_db"]["render_vs_input"]
