"""Everything one lifted image can be written as: canonical render (png/npz), circular video, mesh.

:func:`export_assets` takes the triplane of one RGB-D input and writes the requested files under one
stem; all renders go through :func:`g3dr.models.inference.render_angles` (the ``g3dr render`` path),
videos through :mod:`g3dr.assets.video`, meshes through :mod:`g3dr.assets.mesh`. An optional
super-resolution network (:mod:`g3dr.models.sr`) upscales every RGB picture; depth keeps the geometry's
resolution. Results are computed in memory first and written at the end, so a failing input leaves no
partial files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from g3dr.errors import ConfigError

__all__ = ["AssetOptions", "export_assets"]


@dataclass
class AssetOptions:
    """What to write for each input (suffixes select the formats)."""

    png: bool = False
    """The canonical render as an 8-bit PNG."""
    npz: bool = False
    """float32 ``rgb`` (3, R, R), ``depth``, ``weight_sum`` (1, R, R) of the canonical render."""
    video: list[str] = field(default_factory=list)
    """Video suffixes (``.mp4``, ``.gif``) of the circular trajectory (paper S.6): RGB | colourised depth."""
    mesh: list[str] = field(default_factory=list)
    """Mesh suffixes (``.ply``, ``.glb``, ``.obj``)."""
    frames: int = 128
    fps: int = 40
    resolution: int | None = None
    """Render resolution (default ``data.resolution``)."""
    grid: int = 128
    """Mesh grid samples per axis (the grid covers the scene box, faces included)."""
    threshold: float = 5.0
    """Mesh iso-level on the activated density (see :mod:`g3dr.assets.mesh`)."""
    keep_components: int | None = None
    """Keep only this many largest connected mesh components (drops floaters); None keeps all."""
    sheet: bool = False
    """A labelled contact sheet ``NAME.sheet.png``: input, canonical render, 4 novel views, depth, mesh."""
    seed: int = 0

    def check(self) -> None:
        from g3dr.assets.mesh import MESH_FORMATS
        from g3dr.assets.video import VIDEO_FORMATS

        if not (self.png or self.npz or self.video or self.mesh or self.sheet):
            raise ConfigError("nothing to write: ask for at least one of --png, --npz, --video, --mesh, --sheet")
        for suffix in self.video:
            if suffix not in VIDEO_FORMATS:
                raise ConfigError(f"--video format {suffix} is not one of {', '.join(VIDEO_FORMATS)}")
        for suffix in self.mesh:
            if suffix not in MESH_FORMATS:
                raise ConfigError(f"--mesh format {suffix} is not one of {', '.join(MESH_FORMATS)}")
        if self.frames < 1 or self.fps < 1:
            raise ConfigError(f"--frames and --fps must be >= 1, got {self.frames} and {self.fps}")
        if self.keep_components is not None and self.keep_components < 1:
            raise ConfigError(f"--keep-components must be >= 1, got {self.keep_components}")
        if self.grid < 2 or not self.threshold > 0:
            raise ConfigError(f"--grid must be >= 2 and --threshold > 0, got {self.grid} and {self.threshold}")


def export_assets(model, planes: torch.Tensor, out_stem: str | Path, options: AssetOptions,
                  progress: bool = False, source: torch.Tensor | None = None, sr=None) -> list[Path]:
    """Write the requested assets of ``planes`` (1, 3, C, H, W) to ``out_stem`` + suffix; returns the paths.
    ``source``: the input image (1, 3, R, R) in [-1, 1], the first column of the contact sheet.
    ``sr``: a :class:`~g3dr.models.sr.SuperResolution` (on the model's device) that upscales every RGB picture
    (png, npz ``rgb`` with the render kept as ``rgb_render``, videos, the sheet's renders); depth stays at R.

    Raises :class:`~g3dr.errors.DataError` (e.g. no density above the mesh threshold) before writing anything.
    """
    from PIL import Image

    from g3dr.assets.mesh import TriplaneField, extract_mesh, write_mesh
    from g3dr.assets.video import frames_from_images, write_video
    from g3dr.models.inference import render_angles, uint8_rgb
    from g3dr.render import video_trajectory

    cfg = model.cfg
    cam = cfg.camera
    resolution = options.resolution or cfg.data.resolution
    device = planes.device
    generator = torch.Generator(device=device).manual_seed(options.seed)
    pending: list[tuple[str, object]] = []

    view = mesh = None
    if options.png or options.npz or options.sheet:
        yaw, pitch = torch.tensor([cam.canonical_yaw]), torch.tensor([cam.canonical_pitch])
        view = render_angles(model, planes, yaw, pitch, resolution=resolution, generator=generator, sr=sr)
        if options.png:
            pending.append((".png", uint8_rgb(view["rgb"])[0]))
        if options.npz:
            keys = [k for k in ("rgb", "depth", "weight_sum", "rgb_render") if k in view]
            pending.append((".npz", {k: view[k][0].numpy().astype(np.float32) for k in keys}))
    if options.video:
        yaw, pitch = video_trajectory(options.frames, cam)
        images = render_angles(model, planes, yaw, pitch, resolution=resolution, generator=generator,
                               progress=progress, sr=sr)
        half = cfg.renderer.box_warp / 2
        frames = frames_from_images(images["rgb"], images["depth"], cam.radius - half, cam.radius + half)
        pending += [(suffix, frames) for suffix in options.video]
    if options.mesh:
        field_ = TriplaneField(planes, model.decoder, model.renderer)
        mesh = extract_mesh(field_, resolution=options.grid, threshold=options.threshold,
                            box_warp=cfg.renderer.box_warp, keep_components=options.keep_components,
                            progress=progress)
        pending += [(suffix, mesh) for suffix in options.mesh]
    if options.sheet:
        pending.append((".sheet.png", _sheet(model, planes, options, resolution, generator, source, view, mesh, sr)))

    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, value in pending:
        path = out_stem.with_name(out_stem.name + suffix)
        if suffix in (".png", ".sheet.png"):
            Image.fromarray(value).save(path)
        elif suffix == ".npz":
            np.savez(path, **value)
        elif suffix in (".mp4", ".gif"):
            write_video(path, value, options.fps)
        else:
            write_mesh(value, path)
        written.append(path)
    return written


def _sheet(model, planes: torch.Tensor, options: AssetOptions, resolution: int, generator: torch.Generator,
           source: torch.Tensor | None, canonical: dict[str, torch.Tensor], mesh=None, sr=None) -> np.ndarray:
    """The contact sheet (:mod:`g3dr.assets.sheet`) from the canonical render (and the mesh, when one was
    extracted for ``--mesh``): 4 novel views evenly along the video trajectory; the mesh tile says "no surface"
    when nothing is above the threshold (a sheet is a picture, not a mesh export; logged). With ``sr`` the renders
    are upscaled and the depth tile shows the geometry's depth by pixel repetition."""
    from g3dr.assets.mesh import TriplaneField, extract_mesh
    from g3dr.assets.sheet import contact_sheet, mesh_picture
    from g3dr.assets.video import colorize_depth
    from g3dr.errors import DataError
    from g3dr.log import get_logger
    from g3dr.models.inference import render_angles, uint8_rgb
    from g3dr.render import video_trajectory

    cfg = model.cfg
    cam = cfg.camera
    yaw, pitch = video_trajectory(8, cam)
    novel = render_angles(model, planes, yaw[1::2], pitch[1::2], resolution=resolution, generator=generator, sr=sr)
    half = cfg.renderer.box_warp / 2
    depth = colorize_depth(canonical["depth"], cam.radius - half, cam.radius + half)[0]
    if sr is not None:
        depth = depth.repeat(sr.scale, axis=0).repeat(sr.scale, axis=1)
    if mesh is None:
        try:
            mesh = extract_mesh(TriplaneField(planes, model.decoder, model.renderer), resolution=min(options.grid, 96),
                                threshold=options.threshold, box_warp=cfg.renderer.box_warp,
                                keep_components=options.keep_components)
        except DataError as err:
            get_logger("g3dr.assets").info("contact sheet: no mesh tile (%s)", err)
    size = resolution * (sr.scale if sr is not None else 1)
    mesh_tile = mesh_picture(mesh.vertices, mesh.faces, mesh.colors, size=max(size, 96)) if mesh else None
    canonical_rgb = uint8_rgb(canonical["rgb"])[0]
    source_tile = uint8_rgb(source.cpu())[0] if source is not None else np.full_like(canonical_rgb, 255)
    return contact_sheet(source_tile, canonical_rgb, list(uint8_rgb(novel["rgb"])), depth, mesh_tile)
