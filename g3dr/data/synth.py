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

Novel views (``--views K``, :class:`ViewSpec`): each sample can also store K views of the same scene from
the renderer's cameras (:mod:`g3dr.render.cameras`), drawn as in training at its end (``sampled``:
``sample_novel_angles`` at progress 1, from a generator seeded by ``(seed, index)`` alone) or K points of
the video path (``video``), each with exact depth and a validity mask: a pixel is valid when its ray hits
a surface inside the renderer's scene box (the wall continues beyond the box, where no model can put
anything). View depth can exceed the release range [4, 6) (up to radius + sqrt(3) for a box point seen
from the side), so views use ``v / 65536 * 4 * h + radius - 2 * h`` (h the box half-size; [3, 7) by
default) with the code 65535 reserved for invalid pixels (:data:`VIEW_INVALID_CODE`).

Known convention mismatch (documented, not fixed): rays here pass through pixel centres, the renderer's
span the pixel corners (``linspace(-1, 1, W)``), so a render of the same camera covers a field of view
wider by a factor W / (W - 1) (3% at 32 px), up to half a pixel at the border.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
from PIL import Image

from g3dr.config import CameraConfig
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


def synth_scene(seed: int, index: int) -> tuple[Primitive, int]:
    """The scene of sample ``index`` of the dataset of ``seed``: its primitive and the wall's texture seed."""
    rng = np.random.default_rng([seed, index])
    prim = random_primitive(rng)
    return prim, int(rng.integers(2**31))


def synth_sample(seed: int, index: int, resolution: int, camera: SynthCamera = SynthCamera()) -> tuple[np.ndarray, np.ndarray, int, Primitive]:
    """Sample ``index`` of the dataset of ``seed``: (rgb uint8 (H, W, 3), depth float64 (H, W), class, primitive)."""
    prim, wall_seed = synth_scene(seed, index)
    rgb, depth = render_primitive(prim, resolution, camera, wall_seed=wall_seed)
    return rgb, depth, prim.kind, prim


# --------------------------------------------------------------------------------------------------
# Novel views with exact depth
# --------------------------------------------------------------------------------------------------

VIEW_INVALID_CODE = 65535
"""Depth code of a view pixel whose ray hits no surface inside the scene box."""
_VIEW_STREAM = 0x76696577  # "view": keeps the view cameras' random stream apart from the scene's


@dataclass(frozen=True)
class ViewSpec:
    """Which novel views each sample stores (``count`` 0: none)."""

    count: int = 0
    cameras: Literal["sampled", "video"] = "sampled"
    """``sampled``: the training distribution at the end of training (yaw range pi / novel_yaw_den_end,
    pitch range novel_pitch_range), seeded per sample; ``video``: the first ``count`` of ``count + 1``
    evenly spaced points of the video path (its last point repeats its first), the same for every sample."""
    camera: CameraConfig = field(default_factory=CameraConfig)
    """The renderer's cameras (angles, radius, field of view) the views are taken with."""
    box_half: float = 1.0
    """Half-size of the renderer's scene box (``renderer.box_warp / 2``): hits outside it are invalid."""

    def __post_init__(self) -> None:
        if self.count < 0:
            raise DataError(f"--views must be >= 0, got {self.count}")
        if self.cameras not in ("sampled", "video"):
            raise DataError(f"--view-cameras must be sampled or video, got {self.cameras!r}")
        if not self.box_half > 0:
            raise DataError(f"the scene box half-size must be > 0, got {self.box_half}")

    @property
    def depth_scale(self) -> float:
        return 4.0 * self.box_half

    @property
    def depth_offset(self) -> float:
        return self.camera.radius - 2.0 * self.box_half

    def depth_mapping(self) -> dict[str, Any]:
        return {"kind": "ray_distance", "encoding": f"v / 65536 * {self.depth_scale:g} + {self.depth_offset:g}",
                "scale": self.depth_scale, "offset": self.depth_offset, "invalid_code": VIEW_INVALID_CODE,
                "valid": f"the ray hits a surface inside the scene box [-{self.box_half:g}, {self.box_half:g}]^3",
                "pixel_rays": "pixel centres (the renderer's span the corners: linspace(-1, 1, W))"}

    def to_json(self) -> dict[str, Any]:
        """What the manifest records (``describe()``), so that a changed view option is a different dataset."""
        return {"views": self.count, "view_cameras": self.cameras, "view_camera": asdict(self.camera),
                "view_box_half": self.box_half, "view_depth_mapping": self.depth_mapping()}


def _view_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index, _VIEW_STREAM]).generate_state(1, np.uint64)[0] >> 1)


def view_angles(seed: int, index: int, views: ViewSpec) -> tuple[np.ndarray, np.ndarray]:
    """(yaw (K,), pitch (K,)) float64 of the novel views of sample ``index``, a function of (seed, index) alone."""
    import torch

    from g3dr.render.cameras import sample_novel_angles, video_trajectory

    if views.count == 0:
        return np.zeros(0), np.zeros(0)
    if views.cameras == "video":
        yaw, pitch = video_trajectory(views.count + 1, views.camera, dtype=torch.float64)
        return yaw[:views.count].numpy(), pitch[:views.count].numpy()
    generator = torch.Generator().manual_seed(_view_seed(seed, index))
    yaw, pitch = sample_novel_angles(views.count, 1.0, views.camera, generator=generator, dtype=torch.float64)
    return yaw.numpy(), pitch.numpy()


def view_poses(yaw: np.ndarray, pitch: np.ndarray, camera: CameraConfig) -> tuple[np.ndarray, np.ndarray]:
    """Renderer cameras of the angles in this module's world: poses (K, 4, 4) for :func:`render_primitive`,
    and the rotation (3, 3) that takes this world back to the renderer's (``p_renderer = R @ p_synth``)."""
    import torch

    from g3dr.render.cameras import camera_to_world_from_angles

    f64 = torch.float64
    canonical = camera_to_world_from_angles(torch.tensor([camera.canonical_yaw], dtype=f64),
                                            torch.tensor([camera.canonical_pitch], dtype=f64), camera.radius)[0].numpy()
    cams = camera_to_world_from_angles(torch.as_tensor(np.asarray(yaw, dtype=np.float64)),
                                       torch.as_tensor(np.asarray(pitch, dtype=np.float64)), camera.radius).numpy()
    poses = np.stack([synth_pose_from_renderer(c, canonical) for c in cams]) if len(cams) else np.zeros((0, 4, 4))
    return poses, canonical[:3, :3].copy()


def render_view(prim: Primitive, wall_seed: int, resolution: int, pose: np.ndarray, to_renderer: np.ndarray,
                views: ViewSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One view of a scene: RGB uint8 (H, W, 3), depth float64 (H, W) (inf where nothing is hit) and the
    validity mask (H, W) (a surface hit inside the scene box, checked in the renderer's world)."""
    camera = SynthCamera(views.camera.fov_degrees, views.camera.radius)
    rgb, depth = render_primitive(prim, resolution, camera, wall_seed=wall_seed, pose=pose)
    origin, dirs = camera_rays(resolution, camera, 1, pose)
    finite = np.isfinite(depth)
    points = origin + np.where(finite, depth, 0.0)[..., None] * dirs
    inside = np.abs(points @ np.asarray(to_renderer).T).max(axis=-1) <= views.box_half + 1e-9
    return rgb, depth, finite & inside


def synth_views(seed: int, index: int, resolution: int, views: ViewSpec,
                angles: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The novel views of sample ``index``: ``rgb`` uint8 (K, H, W, 3), ``depth`` float64 (K, H, W),
    ``valid`` bool (K, H, W), ``yaw`` and ``pitch`` (K,). ``angles`` overrides the cameras (tests)."""
    prim, wall_seed = synth_scene(seed, index)
    yaw, pitch = view_angles(seed, index, views) if angles is None else (np.asarray(a, dtype=np.float64) for a in angles)
    poses, to_renderer = view_poses(yaw, pitch, views.camera)
    out = [render_view(prim, wall_seed, resolution, pose, to_renderer, views) for pose in poses]
    empty = np.zeros((0, resolution, resolution))
    return {"rgb": np.stack([o[0] for o in out]) if out else empty[..., None].repeat(3, -1).astype(np.uint8),
            "depth": np.stack([o[1] for o in out]) if out else empty,
            "valid": np.stack([o[2] for o in out]) if out else empty.astype(bool),
            "yaw": yaw, "pitch": pitch}


def view_depth_codes(depth: np.ndarray, valid: np.ndarray, views: ViewSpec) -> np.ndarray:
    """uint16 codes of view depth: ``rint((d - offset) / scale * 65536)`` where valid, 65535 elsewhere."""
    codes = np.rint((np.where(valid, depth, views.depth_offset) - views.depth_offset) / views.depth_scale * 65536.0)
    if (codes[valid] < 0).any() or (codes[valid] >= VIEW_INVALID_CODE).any():
        raise DataError(f"view depth outside the view encoding's range [{views.depth_offset}, "
                        f"{views.depth_offset + views.depth_scale}); this is a bug of the scene bounds")
    return np.where(valid, codes, VIEW_INVALID_CODE).astype(np.uint16)


def _encode_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class SyntheticSource:
    """Procedural primitives with exact depth (this module)."""

    n: int
    options: StoreOptions
    seed: int = 0
    views: ViewSpec = field(default_factory=ViewSpec)

    def describe(self) -> dict[str, Any]:
        # View keys only when views are stored, so sets written before views existed keep their fingerprint.
        extra = self.views.to_json() if self.views.count else {}
        return {"layout": "synthetic", "n": self.n, "seed": self.seed, "classes": list(CLASS_NAMES),
                **self.options.to_json(), **extra}

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
            if self.views.count:
                meta["views"] = self._store_views(item.index, files)
            files["cls"] = str(label).encode()
            files["json"] = json.dumps(meta, sort_keys=True).encode()
            out.append(Prepared(item.key, files))
        return out

    def _store_views(self, index: int, files: dict[str, bytes]) -> dict[str, Any]:
        """Add ``view{k}.{R}.png`` (lossless RGB) and ``view{k}.{R}.depth.png`` to ``files``; returns the
        json entry (cameras and the depth mapping)."""
        views = self.views
        yaw, pitch = view_angles(self.seed, index, views)
        for res in self.options.resolutions:
            rendered = synth_views(self.seed, index, res, views, angles=(yaw, pitch))
            codes = view_depth_codes(rendered["depth"], rendered["valid"], views)
            for k in range(views.count):
                files[f"view{k}.{res}.png"] = _encode_png(rendered["rgb"][k])
                files[f"view{k}.{res}.depth.png"] = encode_u16_png(codes[k], self.options.depth_png_level)
        return {"count": views.count, "cameras": views.cameras, "yaw": [float(v) for v in yaw],
                "pitch": [float(v) for v in pitch], "radius": views.camera.radius,
                "fov_degrees": views.camera.fov_degrees, "depth_mapping": views.depth_mapping()}


def write_synthetic_shards(out: str, n: int, resolutions: tuple[int, ...] = (128,), seed: int = 0,
                           shard_size: int = 256, workers: int = 1, image_format: str = "jpg",
                           quality: int = 95, depth_png_level: int = 0, progress: bool = True, command: str = "",
                           views: ViewSpec = ViewSpec()):
    """Render ``n`` samples into WebDataset shards under ``out`` (what ``g3dr prep synth`` runs), with
    ``views.count`` novel views each (default none).

    Returns the :class:`~g3dr.data.shard_writer.JobResult`; its ``manifest`` is complete.
    """

    options = StoreOptions(resolutions=tuple(resolutions), image_format=image_format, quality=quality,  # type: ignore[arg-type]
                           depth_png_level=depth_png_level)
    source = SyntheticSource(n=n, options=options, seed=seed, views=views)
    spec = JobSpec(out=out, shard_size=shard_size, prefix="synth", workers=workers)
    config = {"seed": seed, "n": n, "views": views.count, "view_cameras": views.cameras}
    return run_shard_job(source, spec, command=command, config=config, progress=progress)


def stored_views(manifest: dict[str, Any] | None) -> tuple[int, str]:
    """(views per sample, camera kind) a shard manifest records; (0, "") for sets without views."""
    source = (manifest or {}).get("source", {})
    count = int(source.get("views", 0))
    return count, str(source.get("view_cameras", "")) if count else ""
