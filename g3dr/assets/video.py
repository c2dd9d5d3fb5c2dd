"""Video frames and writers: RGB beside colourised depth, as mp4 (H.264 via imageio-ffmpeg) or gif (Pillow).

Depth is colourised over a fixed range ``[near, far]`` for every frame (no per-frame normalisation, so
frames stay comparable): near is bright yellow, far is dark purple (:func:`colorize_depth`). ``g3dr render
--video`` and ``g3dr batch --video`` both write through :func:`write_video`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from g3dr.errors import ConfigError

__all__ = ["VIDEO_FORMATS", "DEPTH_COLORMAP", "colorize_depth", "frames_from_images", "write_video"]

VIDEO_FORMATS = (".mp4", ".gif")

DEPTH_COLORMAP = np.array([
    [0.05, 0.03, 0.20],  # far
    [0.35, 0.07, 0.50],
    [0.75, 0.20, 0.40],
    [0.98, 0.55, 0.15],
    [0.99, 0.95, 0.55],  # near
])
"""Anchor colours (RGB in [0, 1]) from far to near, linearly interpolated; luminance rises monotonically."""


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def colorize_depth(depth, near: float, far: float) -> np.ndarray:
    """(N, 1, H, W) or (N, H, W) depth -> (N, H, W, 3) uint8; clamped to [near, far], near bright."""
    d = _as_numpy(depth)
    if d.ndim == 4:
        d = d[:, 0]
    if not far > near:
        raise ValueError(f"far ({far}) must exceed near ({near})")
    closeness = (far - np.clip(d, near, far)) / (far - near)  # 0 = far, 1 = near
    position = closeness * (len(DEPTH_COLORMAP) - 1)
    low = np.clip(np.floor(position).astype(int), 0, len(DEPTH_COLORMAP) - 2)
    frac = (position - low)[..., None]
    colour = DEPTH_COLORMAP[low] * (1 - frac) + DEPTH_COLORMAP[low + 1] * frac
    return np.clip(np.rint(colour * 255), 0, 255).astype(np.uint8)


def frames_from_images(rgb, depth, near: float, far: float) -> np.ndarray:
    """RGB (N, 3, H, W) in [-1, 1] and depth (N, 1, h, w) -> (N, H, 2W, 3) uint8 frames: RGB | depth.

    Depth smaller than the RGB by a whole factor (the RGB of a super-resolution stage, the depth at the geometry's
    resolution) is shown at the RGB's size by pixel repetition, so it keeps its own resolution visibly.
    """
    colour = _as_numpy(rgb)
    colour = np.rint((np.clip(colour, -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
    tiles = colorize_depth(depth, near, far)
    (h, w), (dh, dw) = colour.shape[1:3], tiles.shape[1:3]
    if (h, w) != (dh, dw):
        if h % dh or w % dw or h // dh != w // dw:
            raise ValueError(f"depth {dh}x{dw} cannot be shown beside RGB {h}x{w}: not one whole upscaling factor")
        tiles = tiles.repeat(h // dh, axis=1).repeat(w // dw, axis=2)
    return np.concatenate([colour, tiles], axis=2)


def write_video(path: str | Path, frames: np.ndarray, fps: int) -> Path:
    """Write (N, H, W, 3) uint8 frames to ``.mp4`` (H.264, needs the ``video`` extra) or ``.gif`` (looping).

    GIF frame times are stored in 1/100 s, so a gif plays at ``100 / round(100 / fps)`` fps.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_FORMATS:
        raise ConfigError(f"video file {path} must end in {' or '.join(VIDEO_FORMATS)}")
    if fps < 1:
        raise ConfigError(f"fps must be >= 1, got {fps}")
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be (N >= 1, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + suffix)  # the writers pick the format from the suffix
    if suffix == ".gif":
        from PIL import Image

        images = [Image.fromarray(frame) for frame in frames]
        images[0].save(tmp, save_all=True, append_images=images[1:], duration=10 * max(1, round(100 / fps)),
                       loop=0, optimize=False, disposal=1)
    else:
        try:
            import imageio.v2 as imageio
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise ConfigError("mp4 videos need imageio with ffmpeg: pip install 'g3dr-scale[video]' "
                              "(or write a .gif, which needs nothing extra)") from None
        imageio.mimwrite(str(tmp), list(frames), fps=fps, quality=8, macro_block_size=1)
    tmp.replace(path)
    return path
