"""Video frames (RGB | colourised depth) and the mp4/gif writers: files decode back with the right frame counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from g3dr.assets.video import DEPTH_COLORMAP, colorize_depth, frames_from_images, write_video
from g3dr.errors import ConfigError


def test_colorize_depth_range_and_order():
    depth = torch.tensor([[[[3.0, 4.0, 5.0, 6.0, 7.0]]]])  # (1, 1, 1, 5)
    colour = colorize_depth(depth, 4.0, 6.0)[0, 0].astype(int)
    near, far = np.rint(DEPTH_COLORMAP[-1] * 255), np.rint(DEPTH_COLORMAP[0] * 255)
    assert (colour[0] == near).all() and (colour[1] == near).all()  # clamped below near
    assert (colour[3] == far).all() and (colour[4] == far).all()    # clamped beyond far
    np.testing.assert_allclose(colour[2], np.rint(DEPTH_COLORMAP[2] * 255), atol=1)  # midpoint anchor
    luminance = colorize_depth(np.linspace(6, 4, 50)[None, None], 4.0, 6.0)[0, 0] @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(luminance) >= -1e-9)  # brighter as it gets nearer
    with pytest.raises(ValueError):
        colorize_depth(depth, 6.0, 4.0)


def test_frames_put_rgb_beside_depth():
    rgb = torch.rand(3, 3, 4, 5) * 2 - 1
    depth = torch.full((3, 1, 4, 5), 5.0)
    frames = frames_from_images(rgb, depth, 4.0, 6.0)
    assert frames.shape == (3, 4, 10, 3) and frames.dtype == np.uint8
    expected = np.rint((rgb.numpy() + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(frames[:, :, :5], expected)
    np.testing.assert_array_equal(frames[:, :, 5:], colorize_depth(depth, 4.0, 6.0))


def test_frames_show_smaller_depth_by_pixel_repetition():
    """Super-resolved RGB (2x) beside depth at the geometry's resolution: each depth pixel becomes a 2x2 block."""
    rgb = torch.rand(2, 3, 8, 10) * 2 - 1
    depth = 4.0 + 2.0 * torch.rand(2, 1, 4, 5)
    frames = frames_from_images(rgb, depth, 4.0, 6.0)
    assert frames.shape == (2, 8, 20, 3)
    small = colorize_depth(depth, 4.0, 6.0)
    for dy in (0, 1):
        for dx in (0, 1):
            np.testing.assert_array_equal(frames[:, dy::2, 10 + dx::2], small)
    with pytest.raises(ValueError, match="one whole upscaling factor"):
        frames_from_images(rgb, torch.full((2, 1, 3, 5), 5.0), 4.0, 6.0)


def _distinct_frames(n: int, h: int = 16, w: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(h, w, 3))
    return np.stack([np.roll(base, 3 * i, axis=1) for i in range(n)]).astype(np.uint8)


def test_gif_decodes_back(tmp_path):
    frames = _distinct_frames(7)
    path = write_video(tmp_path / "v.gif", frames, fps=20)
    with Image.open(path) as gif:
        assert gif.n_frames == 7 and gif.size == (32, 16)
        assert gif.info["duration"] == 50 and gif.info.get("loop") == 0
        gif.seek(3)
        # GIF stores a palette per frame: colours are quantised, not exact
        assert np.abs(np.asarray(gif.convert("RGB")).astype(int) - frames[3]).mean() < 12
    assert not list(tmp_path.glob("*.tmp*"))


def test_mp4_decodes_back(tmp_path):
    imageio = pytest.importorskip("imageio.v2", reason="mp4 needs the optional 'video' extra (imageio[ffmpeg])")
    pytest.importorskip("imageio_ffmpeg", reason="mp4 needs the optional 'video' extra (imageio-ffmpeg)")
    frames = np.repeat(np.repeat(_distinct_frames(6, 8, 8), 4, axis=1), 4, axis=2)  # smooth-ish blocks
    path = write_video(tmp_path / "v.mp4", frames, fps=12)
    read = np.stack(imageio.mimread(str(path)))
    assert read.shape == frames.shape
    assert np.abs(read.astype(int) - frames).mean() < 40  # lossy H.264 on random blocks
    reader = imageio.get_reader(str(path))
    assert reader.get_meta_data()["fps"] == 12
    reader.close()


def test_writer_errors(tmp_path):
    frames = _distinct_frames(2)
    with pytest.raises(ConfigError, match="must end in"):
        write_video(tmp_path / "v.avi", frames, 10)
    with pytest.raises(ConfigError, match="fps"):
        write_video(tmp_path / "v.gif", frames, 0)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "v.gif", frames.astype(np.float32), 10)
