"""A procedural RGB-D dataset: one textured primitive per image, with exact depth.

Each sample is a sphere, cube, cylinder or cone (the class is the primitive type) with a procedural
texture, placed inside the scene box [-1, 1]^3 in front of a textured back wall (z = -0.8) and seen
from G3DR's canonical camera: position (0, 0, radius) looking at the origin, up +y, field of view 18
degrees (full angle), rays through pixel centres, row 0 at the top. Depth is the distance along the
unit ray direction (the quantity the volume renderer's expected depth estimates), computed
analytically in float64 and stored in the release encoding (uint16, ``v / 65536 * 2 + 4``), so it is
exact up to the 2 / 65536 quantisation step. Colour is supersampled 2x2 per pixel.

Everything is derived from ``(seed, index)``, so any worker can render any sample and the dataset is
identical however it is split. ``g3dr prep synth`` and the loaders (``data.source: synthetic``) write it
with :func:`write_synthetic_shards`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from g3dr.data.depth_codec import encode_u16_png, u16_from_depth
from g3dr.data.shard_writer import Item, JobSpec, Prepared, Rejected, StoreOptions, encode_image, run_shard_job
from g3dr.errors import DataError

CLASS_NAMES: tuple[str, ...] = ("sphere", "cube", "cylinder", "cone")
WALL_Z = -0.8
"""The back wall; far enough in that every depth stays below 6 (the top of the release encoding)."""
MAX_EXTENT = 0.7
"""Every primitive fits in a ball of this radius around its centre, so it stays inside the box."""


@dataclass(frozen=True)
class SynthCamera:
    fov_degrees: float = 18.0
    radius: float = 5.0


def camera_rays(resolution: int, camera: SynthCamera = SynthCamera(), supersample: int = 1,
                pose: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Origin (3,) and unit directions (H*s, W*s, 3) through (sub)pixel centres.

    ``pose`` is a camera-to-world matrix (4, 4) in this module's world frame (columns right, up, back,
    position; the camera looks along its -z); None is the canonical camera, ``(0, 0, radius)`` looking at
    the origin (:func:`synth_pose_from_renderer` maps the renderer's cameras here).
    """
    n = resolution * supersample
    half = math.tan(math.radians(camera.fov_degrees) / 2)
    centres = (np.arange(n, dtype=np.float64) + 0.5) / n * 2 - 1
    x = centres[None, :] * half
    y = -centres[:, None] * half
    dirs = np.stack(np.broadcast_arrays(x, y, -np.ones((n, n))), axis=-1)
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    if pose is None:
        return np.array([0.0, 0.0, camera.radius]), dirs
    pose = np.asarray(pose, dtype=np.float64)
    dirs = dirs @ pose[:3, :3].T
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    return pose[:3, 3].copy(), dirs


def synth_pose_from_renderer(cam2world: np.ndarray, canonical_cam2world: np.ndarray) -> np.ndarray:
    """A renderer camera (4, 4) expressed in this module's world frame.

    The renderer's canonical camera sits at (-r, 0, 0) looking along +x (3DGP's convention,
    :mod:`g3dr.render.cameras`); this module's sits at (0, 0, r) looking along -z. Both look at the
    origin, so one rotation about the origin, ``M = R0^T`` with ``R0`` the canonical camera's rotation,
    maps the renderer's world to this one: ``pose = M @ cam2world`` (rotation and position alike). The
    canonical camera maps to the identity rotation at (0, 0, r).
    """
    m = np.eye(4)
    m[:3, :3] = np.asarray(canonical_cam2world, dtype=np.float64)[:3, :3].T
    return m @ np.asarray(cam2world, dtype=np.float64)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


@dataclass(frozen=True)
class Primitive:
    """A unit primitive mapped to the world by ``p_world = rotation @ (scale * p_local) + centre``."""

    kind: int
    centre: np.ndarray
    rotation: np.ndarray
    scale: np.ndarray
    colours: np.ndarray  # (2, 3) in [0, 1]
    frequency: float
    pattern: int  # 0 checker, 1 stripes, 2 rings


def random_primitive(rng: np.random.Generator) -> Primitive:
    kind = int(rng.integers(len(CLASS_NAMES)))
    if kind == 0:
        scale = np.full(3, rng.uniform(0.35, MAX_EXTENT))
    elif kind == 1:
        scale = np.full(3, rng.uniform(0.28, MAX_EXTENT / math.sqrt(3)))
    else:
        radius = rng.uniform(0.25, 0.45)
        half_height = rng.uniform(0.25, math.sqrt(MAX_EXTENT**2 - radius**2))
        scale = np.array([radius, half_height, radius])
    centre = np.array([rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2), rng.uniform(-0.05, 0.05)])
    colours = rng.uniform(0.1, 1.0, size=(2, 3))
    return Primitive(kind, centre, _random_rotation(rng), scale, colours,
                     float(rng.uniform(1.5, 4.0)), int(rng.integers(3)))


def _solve_quadratic(a, b, c):
    """Both roots (t0 <= t1) of a t^2 + b t + c = 0 elementwise; NaN where there is no real root."""
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore", divide="ignore"):
        sq = np.sqrt(np.where(disc >= 0, disc, np.nan))
        t0 = (-b - sq) / (2 * a)
        t1 = (-b + sq) / (2 * a)
    return np.minimum(t0, t1), np.maximum(t0, t1)


def _nearest(candidates: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Smallest positive valid t over candidate (t, normal) pairs; t = inf where nothing is hit."""
    best_t = np.full(candidates[0][0].shape, np.inf)
    best_n = np.zeros(candidates[0][0].shape + (3,))
    for t, n in candidates:
        ok = np.isfinite(t) & (t > 1e-9) & (t < best_t)
        best_t = np.where(ok, t, best_t)
        best_n = np.where(ok[..., None], n, best_n)
    return best_t, best_n


def intersect_local(kind: int, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ray parameter t and local normal of the first hit of rays ``o + t d`` (o (3,), d (..., 3)) with a unit primitive.

    Unit primitives: sphere |p| = 1; cube [-1, 1]^3; cylinder x^2 + z^2 <= 1, |y| <= 1; cone with apex
    (0, 1, 0) and base radius 1 at y = -1. ``t = inf`` where the ray misses.
    """
    ox, oy, oz = o
    dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]

    def point(t):
        return np.stack([ox + t * dx, oy + t * dy, oz + t * dz], axis=-1)

    cands = []
    if kind == 0:
        t0, _ = _solve_quadratic((d * d).sum(-1), 2 * (d @ o), o @ o - 1)
        cands.append((t0, point(np.nan_to_num(t0))))
    elif kind == 1:
        for axis in range(3):
            for side in (-1.0, 1.0):
                with np.errstate(divide="ignore", invalid="ignore"):
                    t = (side - o[axis]) / d[..., axis]
                p = point(np.nan_to_num(t, posinf=0, neginf=0))
                others = [a for a in range(3) if a != axis]
                inside = (np.abs(p[..., others[0]]) <= 1) & (np.abs(p[..., others[1]]) <= 1)
                normal = np.zeros(p.shape)
                normal[..., axis] = side
                cands.append((np.where(inside, t, np.nan), normal))
    else:
        if kind == 2:
            t0, t1 = _solve_quadratic(dx * dx + dz * dz, 2 * (ox * dx + oz * dz), ox * ox + oz * oz - 1)
            caps = (-1.0, 1.0)
        else:
            # x^2 + z^2 = ((1 - y) / 2)^2
            k = 0.25
            a = dx * dx + dz * dz - k * dy * dy
            b = 2 * (ox * dx + oz * dz) + 2 * k * (1 - oy) * dy
            c = ox * ox + oz * oz - k * (1 - oy) ** 2
            t0, t1 = _solve_quadratic(a, b, c)
            caps = (-1.0,)
        for t in (t0, t1):
            p = point(np.nan_to_num(t))
            valid = np.abs(p[..., 1]) <= 1
            if kind == 2:
                normal = np.stack([p[..., 0], np.zeros_like(p[..., 1]), p[..., 2]], axis=-1)
            else:
                normal = np.stack([p[..., 0], 0.25 * (1 - p[..., 1]), p[..., 2]], axis=-1)
            cands.append((np.where(valid, t, np.nan), normal))
        for side in caps:
            with np.errstate(divide="ignore", invalid="ignore"):
                t = (side - oy) / dy
            p = point(np.nan_to_num(t, posinf=0, neginf=0))
            radius = 1.0 if kind == 2 else (1 - side) / 2
            inside = p[..., 0] ** 2 + p[..., 2] ** 2 <= radius**2
            normal = np.zeros(p.shape)
            normal[..., 1] = side
            cands.append((np.where(inside, t, np.nan), normal))
    return _nearest(cands)


def _texture(u: np.ndarray, pattern: int, frequency: float) -> np.ndarray:
    """Blend factor in [0, 1] from local coordinates u (..., 3)."""
    f = frequency * math.pi
    if pattern == 0:
        s = np.sin(f * u[..., 0]) * np.sin(f * u[..., 1]) * np.sin(f * u[..., 2])
        return (s > 0).astype(np.float64)
    if pattern == 1:
        return 0.5 + 0.5 * np.sin(2 * f * u[..., 1])
    return 0.5 + 0.5 * np.cos(2 * f * np.linalg.norm(u, axis=-1))


def render_primitive(prim: Primitive, resolution: int, camera: SynthCamera = SynthCamera(),
                     supersample: int = 2, wall_seed: int = 0,
                     pose: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 (H, W, 3) and float64 depth (H, W) of one primitive in front of the back wall.

    Depth is the ray distance at each pixel centre (independent of ``supersample``). ``pose``: the camera
    (see :func:`camera_rays`; None = canonical). The back wall is the plane z = WALL_Z; rays of a
    novel camera that pass beside it see nothing (depth inf, black), which the scene box of the
    renderer's cameras never reaches at the training and video camera ranges.
    """
    rgb = _shade(prim, resolution, camera, supersample, wall_seed, pose)
    origin, dirs = camera_rays(resolution, camera, 1, pose)
    t_obj, _ = _hit(prim, origin, dirs)
    return rgb, np.minimum(t_obj, _wall_t(origin, dirs))


def _wall_t(origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (WALL_Z - origin[2]) / dirs[..., 2]
    return np.where(np.isfinite(t) & (t > 0), t, np.inf)


def _hit(prim: Primitive, origin: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    to_local = prim.rotation.T / prim.scale[:, None]  # p_local = S^-1 R^T (p - c)
    o_local = to_local @ (origin - prim.centre)
    d_local = dirs @ to_local.T
    return intersect_local(prim.kind, o_local, d_local)


def _shade(prim: Primitive, resolution: int, camera: SynthCamera, supersample: int, wall_seed: int,
           pose: np.ndarray | None = None) -> np.ndarray:
    origin, dirs = camera_rays(resolution, camera, supersample, pose)
    t_obj, n_local = _hit(prim, origin, dirs)
    t_wall = _wall_t(origin, dirs)
    hit_obj = t_obj < t_wall

    light = np.array([-0.4, 0.6, 0.7])
    light /= np.linalg.norm(light)
    normal = n_local @ (prim.rotation / prim.scale[None, :]).T  # R S^-1 n_local
    normal /= np.maximum(np.linalg.norm(normal, axis=-1, keepdims=True), 1e-12)
    normal = np.where((normal * dirs).sum(-1, keepdims=True) > 0, -normal, normal)
    shade = 0.25 + 0.75 * np.clip(normal @ light, 0, None)
    p_obj = origin + np.where(np.isfinite(t_obj), t_obj, 0)[..., None] * dirs
    u = (p_obj - prim.centre) @ prim.rotation / prim.scale
    blend = _texture(u, prim.pattern, prim.frequency)[..., None]
    colour_obj = (prim.colours[0] * (1 - blend) + prim.colours[1] * blend) * shade[..., None]

    wall_rng = np.random.default_rng(wall_seed)
    wall_colours = wall_rng.uniform(0.2, 0.8, size=(2, 3))
    wall_freq = wall_rng.uniform(2.0, 6.0)
    p_wall = origin + np.where(np.isfinite(t_wall), t_wall, 0)[..., None] * dirs
    wall_blend = (0.5 + 0.5 * np.sin(wall_freq * math.pi * p_wall[..., 0])
                  * np.cos(wall_freq * math.pi * p_wall[..., 1]))[..., None]
    colour_wall = (wall_colours[0] * (1 - wall_blend) + wall_colours[1] * wall_blend) * 0.8

    colour = np.where(hit_obj[..., None], colour_obj, np.where(np.isfinite(t_wall)[..., None], colour_wall, 0.0))
    s = supersample
    colour = colour.reshape(resolution, s, resolution, s, 3).mean(axis=(1, 3))
    return np.clip(np.rint(colour * 255), 0, 255).astype(np.uint8)


def synth_sample(seed: int, index: int, resolution: int, camera: SynthCamera = SynthCamera()) -> tuple[np.ndarray, np.ndarray, int, Primitive]:
    """Sample ``index`` of the dataset of ``seed``: (rgb uint8 (H, W, 3), depth float64 (H, W), class, primitive)."""
    rng = np.random.default_rng([seed, index])
    prim = random_primitive(rng)
    rgb, depth = render_primitive(prim, resolution, camera, wall_seed=int(rng.integers(2**31)))
    return rgb, depth, prim.kind, prim


@dataclass
class SyntheticSource:
    """Procedural primitives with exact depth (this module)."""

    n: int
    options: StoreOptions
    seed: int = 0

    def describe(self) -> dict[str, Any]:
        return {"layout": "synthetic", "n": self.n, "seed": self.seed, "classes": list(CLASS_NAMES), **self.options.to_json()}

    def list_items(self) -> list[Item]:
        if self.n < 1:
            raise DataError(f"--n must be >= 1, got {self.n}")
        return [Item(key=f"synth_{i:07d}", index=i) for i in range(self.n)]

    def prepare_batch(self, items: Sequence[Item]) -> list[Prepared | Rejected]:
        out: list[Prepared | Rejected] = []
        for item in items:
            files: dict[str, bytes] = {}
            label = -1
            for res in self.options.resolutions:
                rgb, depth, label, _ = synth_sample(self.seed, item.index, res)
                # Lossless PNG-free storage would be larger; JPEG/WebP at high quality is the dataset format.
                files[f"{res}.{self.options.image_format}"] = encode_image(Image.fromarray(rgb), self.options)
                files[f"{res}.depth.png"] = encode_u16_png(u16_from_depth(depth), self.options.depth_png_level)
            meta = {"key": item.key, "source": f"synthetic:{self.seed}:{item.index}", "synset": CLASS_NAMES[label],
                    "label": label, "depth_source": "synthetic-exact",
                    "depth_mapping": {"kind": "ray_distance", "encoding": "v / 65536 * 2 + 4"}}
            files["cls"] = str(label).encode()
            files["json"] = json.dumps(meta, sort_keys=True).encode()
            out.append(Prepared(item.key, files))
        return out


def write_synthetic_shards(out: str, n: int, resolutions: tuple[int, ...] = (128,), seed: int = 0,
                           shard_size: int = 256, workers: int = 1, image_format: str = "jpg",
                           quality: int = 95, depth_png_level: int = 0, progress: bool = True, command: str = ""):
    """Render ``n`` samples into WebDataset shards under ``out`` (what ``g3dr prep synth`` runs).

    Returns the :class:`~g3dr.data.shard_writer.JobResult`; its ``manifest`` is complete.
    """

    options = StoreOptions(resolutions=tuple(resolutions), image_format=image_format, quality=quality,  # type: ignore[arg-type]
                           depth_png_level=depth_png_level)
    source = SyntheticSource(n=n, options=options, seed=seed)
    spec = JobSpec(out=out, shard_size=shard_size, prefix="synth", workers=workers)
    return run_shard_job(source, spec, command=command, config={"seed": seed, "n": n}, progress=progress)
