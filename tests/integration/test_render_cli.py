"""``g3dr render`` end to end on a tiny checkpoint: canonical and novel views, npz/png/mp4 outputs,
bit-identical deterministic renders, sigma scale, depth prior, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from g3dr.launchers.main import main
from g3dr.models import load_f_trigen
from g3dr.models.inference import load_rgbd


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_config_path, helper_module):
    return helper_module("tiny_models").save_perturbed_f_trigen(
        tiny_config_path, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", step=11)


SMALL = 32  # the 48-px test inputs are below prep's default --min-size (64): the tests lower it


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A 48x48 RGB image and its 16-bit release-format depth PNG (a sphere-like bump), made here."""
    folder = tmp_path_factory.mktemp("pair")
    yy, xx = np.mgrid[0:48, 0:48] / 47.0
    rgb = np.stack([xx, yy, 1 - xx * yy], axis=-1)
    Image.fromarray((rgb * 255).astype(np.uint8)).save(folder / "img.png")
    depth = 5.5 - 0.8 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.05)  # in [4, 6]
    codes = np.round((depth - 4) / 2 * 65536).astype(np.uint16)
    Image.fromarray(codes).save(folder / "img_depth.png")
    return folder / "img.png", folder / "img_depth.png", depth


def render(checkpoint, pair, out, *extra):
    image, depth, _ = pair
    return main(["render", "--checkpoint", str(checkpoint), "--image", str(image), "--depth", str(depth),
                 "--device", "cpu", "--min-size", str(SMALL), *extra, "--save-npz", str(out)])


def test_inputs_are_decoded_like_training_data(pair, tmp_path):
    image, depth_png, depth = pair
    rgb, depth_t = load_rgbd(image, depth_png, 48, min_size=SMALL)
    assert rgb.shape == (1, 3, 48, 48) and depth_t.shape == (1, 1, 48, 48)
    assert rgb.min() >= -1 and rgb.max() <= 1
    np.testing.assert_allclose(depth_t[0, 0].numpy(), depth, atol=2 / 65536)
    # Resized: Lanczos on the 8-bit image and on the depth codes as float, as the data pipeline does.
    rgb, depth_t = load_rgbd(image, depth_png, 32, min_size=SMALL)
    expected_rgb = np.asarray(Image.open(image).convert("RGB").resize((32, 32), Image.Resampling.LANCZOS))
    np.testing.assert_allclose(rgb[0].permute(1, 2, 0).numpy(), expected_rgb / 127.5 - 1, atol=1e-6)
    codes = np.asarray(Image.open(depth_png)).astype(np.float32)
    resized = np.asarray(Image.fromarray(codes, mode="F").resize((32, 32), Image.Resampling.LANCZOS))
    np.testing.assert_allclose(depth_t[0, 0].numpy(), np.clip(resized, 0, 65535) / 65536 * 2 + 4, atol=1e-5)
    # A non-square image and depth are cut to their centre square first.
    wide = tmp_path / "wide.png"
    Image.fromarray(np.concatenate([np.zeros((48, 8, 3), np.uint8), np.asarray(Image.open(image)),
                                    np.zeros((48, 8, 3), np.uint8)], axis=1)).save(wide)
    wide_depth = tmp_path / "wide_depth.png"
    raw = np.asarray(Image.open(depth_png))
    Image.fromarray(np.pad(raw, ((0, 0), (8, 8)))).save(wide_depth)
    rgb_w, depth_w = load_rgbd(wide, wide_depth, 48, min_size=SMALL)
    assert torch.equal(rgb_w, load_rgbd(image, depth_png, 48, min_size=SMALL)[0])
    assert torch.equal(depth_w, load_rgbd(image, depth_png, 48, min_size=SMALL)[1])


def test_deterministic_canonical_render_is_bit_identical(checkpoint, pair, tmp_path, capsys):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert render(checkpoint, pair, a, "--deterministic", "--png", str(tmp_path / "a.png")) == 0
    assert render(checkpoint, pair, b, "--deterministic") == 0
    assert "step 11" in capsys.readouterr().out
    ra, rb = np.load(a), np.load(b)
    assert sorted(ra.files) == ["depth", "rgb", "weight_sum"]
    assert ra["rgb"].shape == (3, 32, 32) and ra["depth"].shape == (1, 32, 32) and ra["weight_sum"].shape == (1, 32, 32)
    for key in ra.files:
        assert ra[key].dtype == np.float32
        assert np.array_equal(ra[key], rb[key]), key
    assert ra["rgb"].min() >= -1 and ra["rgb"].max() <= 1
    assert ra["rgb"].std() > 0  # a real render, not a constant
    png = np.asarray(Image.open(tmp_path / "a.png"))
    assert png.shape == (32, 32, 3)
    np.testing.assert_allclose(png / 127.5 - 1, ra["rgb"].transpose(1, 2, 0), atol=0.5 / 127.5 + 1e-6)


def test_cli_render_matches_the_library(checkpoint, pair, tmp_path):
    """The CLI's canonical render equals FTrigen called directly on the decoded inputs."""
    from g3dr.render import camera_to_world_from_angles

    out = tmp_path / "c.npz"
    assert render(checkpoint, pair, out, "--deterministic") == 0
    model, cfg, _ = load_f_trigen(checkpoint, overrides=["renderer.deterministic=true"])
    rgb, depth = load_rgbd(pair[0], pair[1], cfg.data.resolution, min_size=SMALL)
    cam2world = camera_to_world_from_angles(torch.tensor([cfg.camera.canonical_yaw]),
                                            torch.tensor([cfg.camera.canonical_pitch]), cfg.camera.radius)
    with torch.no_grad():
        images = model(rgb, depth, cam2world, canonical=False)
    assert images["planes"].shape == (1, 3, cfg.model.triplane_channels, 32, 32)
    np.testing.assert_array_equal(np.load(out)["rgb"], images["rgb"][0].numpy())


def test_novel_view_sigma_scale_and_depth_prior_change_the_render(checkpoint, pair, tmp_path):
    base, novel, dense, prior = (tmp_path / f"{n}.npz" for n in ("base", "novel", "dense", "prior"))
    assert render(checkpoint, pair, base, "--deterministic") == 0
    assert render(checkpoint, pair, novel, "--deterministic", "--yaw", "1.9", "--pitch", "1.4") == 0
    assert render(checkpoint, pair, dense, "--deterministic", "--sigma-scale", "50") == 0
    assert render(checkpoint, pair, prior, "--depth-prior", "--seed", "3") == 0
    b, n, d = np.load(base), np.load(novel), np.load(dense)
    assert np.abs(b["rgb"] - n["rgb"]).max() > 1e-4
    assert d["weight_sum"].mean() > b["weight_sum"].mean()  # more density, more opacity
    assert np.isfinite(np.load(prior)["depth"]).all()


def test_nondeterministic_render_follows_the_seed(checkpoint, pair, tmp_path):
    a, b, c = (tmp_path / f"{n}.npz" for n in "abc")
    assert render(checkpoint, pair, a, "--seed", "1") == 0
    assert render(checkpoint, pair, b, "--seed", "1") == 0
    assert render(checkpoint, pair, c, "--seed", "2") == 0
    assert np.array_equal(np.load(a)["rgb"], np.load(b)["rgb"])
    assert not np.array_equal(np.load(a)["rgb"], np.load(c)["rgb"])


def test_video(checkpoint, pair, tmp_path):
    imageio = pytest.importorskip("imageio.v2", reason="the optional 'video' extra (imageio[ffmpeg]) is not installed")
    video, frames = tmp_path / "v.mp4", tmp_path / "v.npz"
    assert render(checkpoint, pair, frames, "--video", str(video), "--frames", "5", "--deterministic") == 0
    read = imageio.mimread(str(video))
    assert len(read) == 5 and read[0].shape == (32, 64, 3)
    arrays = np.load(frames)
    assert arrays["rgb"].shape == (5, 3, 32, 32)
    # The trajectory starts and ends at the same camera (s = 0 and s = 1).
    np.testing.assert_allclose(arrays["rgb"][0], arrays["rgb"][-1], atol=1e-5)


def test_real_release_sample(checkpoint, release_samples, tmp_path):
    image = sorted(release_samples.glob("*/*.jpg"))[0]
    depth = image.with_name(image.stem + "_depth.png")
    out = tmp_path / "real.npz"
    assert render(checkpoint, (image, depth, None), out, "--deterministic") == 0
    assert np.isfinite(np.load(out)["rgb"]).all()


def test_user_errors(checkpoint, pair, tmp_path, capsys):
    image, depth, _ = pair
    base = ["render", "--checkpoint", str(checkpoint), "--image", str(image), "--depth", str(depth)]
    assert main(base) == 2
    assert "nothing to write" in capsys.readouterr().err
    assert main([*base[:3], "--image", str(tmp_path / "missing.jpg"), "--depth", str(depth),
                 "--png", str(tmp_path / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*base, "--yaw", "1.0", "--depth-prior", "--png", str(tmp_path / "x.png")]) == 2
    assert "canonical view only" in capsys.readouterr().err
    assert main(["render", "--checkpoint", str(tmp_path / "none.safetensors"), "--image", str(image),
                 "--depth", str(depth), "--png", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "import-official" in err and "Traceback" not in err
