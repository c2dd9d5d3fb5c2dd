"""The super-resolution stage where pictures leave the system: ``g3dr render`` and ``g3dr batch`` with ``--sr``
(or the checkpoint config's ``sr.checkpoint``) on a tiny checkpoint and a tiny random RCAN: RGB pictures at
twice the render resolution, equal to the SR network applied to the render; depth at the geometry's size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from g3dr.launchers.main import main
from g3dr.config import load_config
from g3dr.models import load_f_trigen, save_f_trigen
from g3dr.models.sr import load_sr

SMALL = "32"  # the 48-px test inputs are below prep's default --min-size (64)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_config_path, helper_module):
    """(f_trigen checkpoint, SR weights, f_trigen checkpoint whose config names the SR weights as sr.checkpoint)."""
    tiny = helper_module("tiny_models")
    folder = tmp_path_factory.mktemp("models")
    sr = tiny.save_tiny_sr(folder / "sr.safetensors")
    plain = tiny.save_perturbed_f_trigen(tiny_config_path, folder / "tiny.safetensors", step=5)
    model, _, _ = load_f_trigen(plain)
    cfg = load_config(tiny_config_path, [f"sr.checkpoint={sr}"])
    with_sr = save_f_trigen(model, cfg, folder / "tiny-with-sr.safetensors", step=5)
    return plain, sr, with_sr


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder with one 48x48 RGB image and its 16-bit release-format depth PNG."""
    folder = tmp_path_factory.mktemp("in")
    yy, xx = np.mgrid[0:48, 0:48] / 47.0
    Image.fromarray((np.stack([xx, yy, 1 - xx * yy], axis=-1) * 255).astype(np.uint8)).save(folder / "img.png")
    depth = 5.5 - 0.8 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.05)
    Image.fromarray(np.round((depth - 4) / 2 * 65536).astype(np.uint16)).save(folder / "img_depth.png")
    return folder


def render(checkpoint, inputs, *extra):
    return main(["render", "--checkpoint", str(checkpoint), "--image", str(inputs / "img.png"), "--depth",
                 str(inputs / "img_depth.png"), "--device", "cpu", "--min-size", SMALL, "--deterministic", *extra])


def test_render_with_sr_upscales_rgb_only(models, inputs, tmp_path, capsys):
    plain, sr_path, _ = models
    npz, png = tmp_path / "sr.npz", tmp_path / "sr.png"
    assert render(plain, inputs, "--sr", str(sr_path), "--save-npz", str(npz), "--png", str(png)) == 0
    out = capsys.readouterr().out
    assert "RGB upscaled 32x32 -> 64x64 by super-resolution" in out and "depth and weight_sum stay at the geometry's " \
        "32x32" in out
    arrays = np.load(npz)
    assert arrays["rgb"].shape == (3, 64, 64) and arrays["rgb_render"].shape == (3, 32, 32)
    assert arrays["depth"].shape == (1, 32, 32) and arrays["weight_sum"].shape == (1, 32, 32)
    assert np.asarray(Image.open(png)).shape == (64, 64, 3)
    # The picture is the SR network applied to the render, and the render is the render without --sr.
    sr = load_sr(sr_path)
    with torch.no_grad():
        expected = sr(torch.from_numpy(arrays["rgb_render"])[None])[0].numpy()
    np.testing.assert_allclose(arrays["rgb"], expected, atol=1e-6)
    base = tmp_path / "base.npz"
    assert render(plain, inputs, "--save-npz", str(base)) == 0
    assert sorted(np.load(base).files) == ["depth", "rgb", "weight_sum"]
    np.testing.assert_array_equal(np.load(base)["rgb"], arrays["rgb_render"])


def test_render_default_is_the_checkpoint_config(models, inputs, tmp_path, capsys):
    _, _, with_sr = models
    on, off = tmp_path / "on.npz", tmp_path / "off.npz"
    assert render(with_sr, inputs, "--save-npz", str(on)) == 0
    assert render(with_sr, inputs, "--no-sr", "--save-npz", str(off)) == 0
    assert np.load(on)["rgb"].shape == (3, 64, 64) and np.load(off)["rgb"].shape == (3, 32, 32)
    capsys.readouterr()
    # A config naming a file that is not there: a clear error that says where the name came from and how to go on.
    model, cfg, _ = load_f_trigen(with_sr)
    cfg.sr.checkpoint = str(tmp_path / "gone.safetensors")
    stale = save_f_trigen(model, cfg, tmp_path / "stale.safetensors")
    assert render(stale, inputs, "--save-npz", str(tmp_path / "x.npz")) == 2
    err = capsys.readouterr().err
    assert "gone.safetensors do not exist" in err and "sr.checkpoint" in err and "--no-sr" in err
    assert "Traceback" not in err


def test_render_video_with_sr(models, inputs, tmp_path):
    plain, sr_path, _ = models
    video, frames = tmp_path / "v.gif", tmp_path / "v.npz"
    assert render(plain, inputs, "--sr", str(sr_path), "--video", str(video), "--frames", "3",
                  "--save-npz", str(frames)) == 0
    with Image.open(video) as gif:
        assert gif.n_frames == 3 and gif.size == (128, 64)  # RGB 64 | depth 32 shown by pixel repetition
        gif.seek(0)
        first = np.asarray(gif.convert("RGB"))
    depth_tile = first[:, 64:]
    assert np.array_equal(depth_tile[0::2, 0::2], depth_tile[1::2, 1::2])  # 2x2 blocks of one colour
    arrays = np.load(frames)
    assert arrays["rgb"].shape == (3, 3, 64, 64) and arrays["depth"].shape == (3, 1, 32, 32)


def test_batch_with_sr(models, inputs, tmp_path):
    plain, sr_path, _ = models
    out = tmp_path / "out"
    assert main(["batch", "--checkpoint", str(plain), "--input", str(inputs), "--out", str(out), "--device", "cpu",
                 "--no-progress", "--deterministic", "--sr", str(sr_path), "--png", "--npz", "--video", "gif",
                 "--frames", "2", "--sheet", "--grid", "16", "--threshold", "0.3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["written"] == 1 and summary["rgb_resolution"] == 64 and summary["depth_resolution"] == 32
    assert summary["super_resolution"]["weights"] == str(sr_path)
    assert summary["super_resolution"]["architecture"]["n_feats"] == 8
    assert np.asarray(Image.open(out / "img.png")).shape == (64, 64, 3)
    arrays = np.load(out / "img.npz")
    assert arrays["rgb"].shape == (3, 64, 64) and arrays["rgb_render"].shape == (3, 32, 32)
    assert arrays["depth"].shape == (1, 32, 32)
    with Image.open(out / "img.gif") as gif:
        assert gif.size == (128, 64)
    sheet = np.asarray(Image.open(out / "img.sheet.png"))
    assert sheet.shape == (12 + 64, 8 * (64 + 2) - 2, 3)  # 8 tiles at the upscaled size
    # Same input and renderer: batch's canonical picture is render's.
    single = tmp_path / "single.npz"
    assert render(plain, inputs, "--sr", str(sr_path), "--save-npz", str(single)) == 0
    np.testing.assert_allclose(np.load(single)["rgb"], arrays["rgb"], atol=1e-5)
    # Without --sr: nothing changes.
    plain_out = tmp_path / "plain"
    assert main(["batch", "--checkpoint", str(plain), "--input", str(inputs), "--out", str(plain_out), "--device",
                 "cpu", "--no-progress", "--png"]) == 0
    summary = json.loads((plain_out / "summary.json").read_text())
    assert summary["super_resolution"] is None and summary["rgb_resolution"] == summary["depth_resolution"] == 32
    assert np.asarray(Image.open(plain_out / "img.png")).shape == (32, 32, 3)


def test_generate_sr_needs_a_checkpoint(models, tmp_path, capsys):
    _, sr_path, _ = models
    assert main(["generate", "--pipeline", str(tmp_path / "none"), "--prompt", "a cat", "--out", str(tmp_path / "g"),
                 "--sr", str(sr_path)]) == 2
    assert "--sr need --checkpoint" in capsys.readouterr().err
