"""Using a trained f_trigen outside training: load it for rendering, decode an input pair, render views.

What ``g3dr render``, ``g3dr batch``, ``g3dr mesh``, ``g3dr generate`` and the eval jobs share, as typed functions
(the commands turn their flags into these arguments; nothing here reads an ``argparse.Namespace``). Imports of
torch happen inside the functions.
"""

from __future__ import annotations

from pathlib import Path

from g3dr.errors import ConfigError, DataError


def resolve_device(device: str = "auto"):
    """``"auto"`` (CUDA when available, else the CPU), ``"cpu"`` or ``"cuda"`` as a :class:`torch.device`; a
    :class:`ConfigError` when ``"cuda"`` is asked for and there is none."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA device is available")
    return torch.device(device)


def load_model(checkpoint: str | Path, *, deterministic: bool = False, sigma_scale: float | None = None,
               device: str = "auto"):
    """(model, cfg, meta, device): the f_trigen of ``checkpoint`` in eval mode on ``device`` (:func:`resolve_device`),
    with the render-time overrides ``deterministic`` (``renderer.deterministic=true``) and ``sigma_scale``
    (``renderer.sigma_scale``, when given)."""
    from g3dr.models.checkpoint_io import load_f_trigen

    overrides = []
    if deterministic:
        overrides.append("renderer.deterministic=true")
    if sigma_scale is not None:
        overrides.append(f"renderer.sigma_scale={sigma_scale!r}")
    resolved = resolve_device(device)
    model, cfg, meta = load_f_trigen(checkpoint, device=resolved, overrides=overrides)  # in eval mode
    return model, cfg, meta, resolved


def load_sr_option(cfg, device, *, sr: str | None = None, no_sr: bool = False):
    """The super-resolution network of the file ``sr``, else of ``cfg.sr.checkpoint``; None with ``no_sr`` or when
    neither names one (the meaning of the commands' ``--sr FILE`` / ``--no-sr``)."""
    from g3dr.errors import WeightsError
    from g3dr.models.sr import load_sr

    if no_sr:
        return None
    path = sr or cfg.sr.checkpoint
    if not path:
        return None
    try:
        return load_sr(path, device=device)
    except WeightsError as err:
        if sr:
            raise
        raise WeightsError(f"{err} (named by the checkpoint's config, sr.checkpoint; --sr FILE names another, "
                           "--no-sr renders without super-resolution)") from None


def describe_sizes(sr, resolution: int) -> str:
    """Which size each written picture has, for logs and summaries."""
    if sr is None:
        return f"RGB and depth at {resolution}x{resolution} (no super-resolution)"
    big = resolution * sr.scale
    return (f"RGB upscaled {resolution}x{resolution} -> {big}x{big} by super-resolution {sr.path} (RCAN x{sr.scale}); "
            f"depth and weight_sum stay at the geometry's {resolution}x{resolution}")


def load_rgbd(image_path: str | Path, depth_path: str | Path, resolution: int, depth_scale: float = 2.0,
              depth_offset: float = 4.0, min_size: int | None = None):
    """``(rgb (1, 3, R, R) in [-1, 1], depth (1, 1, R, R))`` float32 tensors of one image + depth PNG pair.

    The same checks as ``g3dr prep shards`` (:func:`g3dr.data.shard_writer.input_problem`: shorter side at least
    ``min_size``, default prep's 64; a depth map of the image's aspect ratio), then the same steps as the training
    decoder: centre square, Lanczos resize to R (depth resized as float, never through an 8-bit mode, clamped to
    the range of the 16-bit codes against Lanczos overshoot), depth decoded from the release PNG by
    :func:`g3dr.data.decode_depth_png`. A pair prep would reject is a :class:`DataError` naming the file.
    """
    import numpy as np
    import torch
    from PIL import Image

    from g3dr.data import decode_depth_png
    from g3dr.data.shard_writer import MIN_INPUT_SIZE, image_error_detail, input_problem

    for path, what in ((image_path, "image"), (depth_path, "depth PNG")):
        if not Path(path).is_file():
            raise DataError(f"{what} {path} does not exist")

    def square(array: np.ndarray) -> np.ndarray:
        h, w = array.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return array[top:top + side, left:left + side]

    # PIL and the depth codec raise many types for unreadable files: each becomes a DataError naming the file.
    try:
        with Image.open(image_path) as image:
            full_rgb = np.asarray(image.convert("RGB"))
    except Exception as err:  # noqa: BLE001
        raise DataError(f"--image {image_path}: {image_error_detail(err)}; give an RGB image (jpg, png)") from None
    try:
        full_depth = decode_depth_png(Path(depth_path).read_bytes())  # release decoding: v / 65536 * 2 + 4
    except Exception as err:  # noqa: BLE001
        raise DataError(f"--depth {depth_path}: {image_error_detail(err)}; give a 16-bit release-format depth "
                        "PNG") from None
    min_size = MIN_INPUT_SIZE if min_size is None else min_size
    problem = input_problem(full_rgb.shape[1::-1], full_depth.shape[::-1], min_size)
    if problem:
        raise DataError(f"{image_path} + {depth_path}: {problem[1]} ({problem[0]}); 'g3dr prep shards' rejects this "
                        "input too. Use a larger image (--min-size lowers the limit) with a depth map of its shape")
    rgb, depth = square(full_rgb), square(full_depth)
    if rgb.shape[0] != resolution:
        rgb = np.asarray(Image.fromarray(rgb).resize((resolution, resolution), Image.Resampling.LANCZOS))
    if depth.shape[0] != resolution:
        low, high = 4.0, 4.0 + 2.0 * 65535 / 65536
        depth = np.clip(np.asarray(Image.fromarray(depth.astype(np.float32), mode="F")
                                   .resize((resolution, resolution), Image.Resampling.LANCZOS)), low, high)
    depth = (depth.astype(np.float32) - 4.0) / 2.0 * depth_scale + depth_offset  # a config's own decoding
    rgb_t = torch.from_numpy(np.array(rgb, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    return rgb_t[None], torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32))[None, None]


def render_angles(model, planes, yaw, pitch, *, resolution: int, depth=None, generator=None, progress=False,
                  sr=None):
    """Render ``planes`` (1, 3, C, H, W) from every (yaw[i], pitch[i]); returns dict of (N, ...) CPU tensors.

    ``depth`` (1, 1, R, R), when given, is used as the depth prior (canonical renders as in training).
    ``sr``, a :class:`~g3dr.models.sr.SuperResolution` on the model's device: ``rgb`` is the upscaled picture
    (N, 3, sR, sR) and ``rgb_render`` the render it was made from (N, 3, R, R); depth and the rest stay at R.
    """
    import torch
    from tqdm import tqdm

    from g3dr.render import camera_to_world_from_angles

    outputs: dict[str, list] = {}
    frames = range(yaw.shape[0])
    for i in tqdm(frames, desc="render", unit="frame", disable=not progress or len(frames) == 1):
        cam2world = camera_to_world_from_angles(yaw[i:i + 1], pitch[i:i + 1], model.cfg.camera.radius)
        with torch.no_grad():
            images = model.render(planes, cam2world.to(planes.device), canonical=depth is not None, depth=depth,
                                  resolution=resolution, generator=generator)
            if sr is not None:
                images = {**images, "rgb_render": images["rgb"], "rgb": sr(images["rgb"].float())}
        for key, value in images.items():
            outputs.setdefault(key, []).append(value.float().cpu())
    return {key: torch.cat(values) for key, values in outputs.items()}


def uint8_rgb(rgb):
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, as every saved picture is written."""
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def write_video(path: str | Path, rgb, depth, fps: int, near: float, far: float) -> None:
    """Write frames (N, 3, H, W) RGB in [-1, 1] beside their colourised depth (N, 1, H, W) as .mp4 or .gif.

    Depth is colourised over the fixed range [near, far] (near bright); see :mod:`g3dr.assets.video`.
    """
    from g3dr.assets.video import frames_from_images
    from g3dr.assets.video import write_video as write_frames

    write_frames(path, frames_from_images(rgb, depth, near, far), fps)
