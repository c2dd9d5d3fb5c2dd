"""Mesh export: the triplane's density on a grid inside the scene box -> marching cubes -> coloured mesh.

Frames. The renderer's world has the canonical camera at ``(-radius, 0, 0)`` looking along +x with
image right = +z and up = +y (``docs/renderer.md``). Meshes are written in the **viewer frame**, the
convention of glTF/OBJ viewers: the canonical camera sits on +z looking along -z, right = +x, up = +y,
i.e. ``viewer = (z, y, -x)`` of the world (a proper rotation, :data:`VIEWER_FROM_WORLD`). The input photo
therefore faces the default camera of any viewer. (This is also the frame of ``g3dr prep synth``.)

Density. The same quantity the ray marcher composites: ``softplus(sigma_raw + density_offset) *
sigma_scale`` (per unit length). The default iso-level 5 is the density at which a layer 0.2 thick
(a tenth of the box) has opacity ``1 - exp(-1) = 0.63``: a surface the renderer sees as solid.

Watertightness. The grid covers the box including its faces and is padded by one sample of zero density
on every side before marching cubes, so every level set is closed: where the density reaches the box
boundary the mesh is capped there. Marching cubes (Lewiner, scikit-image) then gives a closed 2-manifold.

Vertex colours are the decoder's colour at each vertex (``sigmoid`` output in [0, 1], as composited).
This module needs the ``mesh`` extra (scikit-image, trimesh); it never trains or changes the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from g3dr.errors import ConfigError, DataError

__all__ = [
    "VIEWER_FROM_WORLD",
    "Mesh",
    "TriplaneField",
    "grid_points",
    "density_grid_from_field",
    "mesh_from_density_grid",
    "extract_mesh",
    "keep_largest_components",
    "write_mesh",
    "MESH_FORMATS",
]

VIEWER_FROM_WORLD = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
"""``p_viewer = VIEWER_FROM_WORLD @ p_world``: canonical camera from (-r, 0, 0) in the world to (0, 0, r)."""

MESH_FORMATS = (".ply", ".glb", ".obj")

Field = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``field(points_world (N, 3)) -> (rgb (N, 3) in [0, 1], density (N,))``."""


def _require_mesh_extra():
    try:
        import skimage.measure  # noqa: F401
        import trimesh  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"mesh export needs scikit-image and trimesh ({err}): "
                          "pip install 'g3dr-scale[mesh]'") from None


@dataclass
class Mesh:
    """A triangle mesh in the viewer frame."""

    vertices: np.ndarray
    """(V, 3) float32 positions (scene units; the box is [-box_warp/2, box_warp/2]^3)."""
    faces: np.ndarray
    """(F, 3) int64 vertex indices, counter-clockwise seen from outside (normals point to lower density)."""
    colors: np.ndarray
    """(V, 3) uint8 vertex colours."""

    def to_trimesh(self):
        import trimesh

        rgba = np.concatenate([self.colors, np.full((len(self.colors), 1), 255, np.uint8)], axis=1)
        return trimesh.Trimesh(vertices=self.vertices, faces=self.faces, vertex_colors=rgba, process=False)


class TriplaneField:
    """Colour and density of one triplane at arbitrary world points, as the renderer computes them.

    ``planes``: (1, 3, C, H, W); ``decoder``: the f_trigen decoder; ``renderer``: a
    :class:`~g3dr.render.TriplaneRenderer` (its config and plane axes). Calls are chunked and run
    without gradients. ``directions`` default to the canonical camera's viewing direction (+x); the
    reference decoder ignores them.
    """

    def __init__(self, planes: torch.Tensor, decoder, renderer, chunk: int = 2**18):
        from g3dr.render.triplane import planes_pyramid_from_planes

        if planes.dim() != 5 or planes.shape[0] != 1:
            raise ValueError(f"planes must be (1, 3, C, H, W), got {tuple(planes.shape)}")
        self.cfg = renderer.cfg
        self.decoder = decoder
        self.plane_axes = renderer.plane_axes
        self.chunk = chunk
        with torch.no_grad():
            self.levels = planes_pyramid_from_planes(planes, self.cfg.plane_resolutions)

    @torch.no_grad()
    def __call__(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from g3dr.render.triplane import features_from_planes

        dtype, device = self.levels[0].dtype, self.levels[0].device
        box_warp = self.cfg.box_warp
        rgbs, densities = [], []
        for start in range(0, points.shape[0], self.chunk):
            p = points[start:start + self.chunk].to(device=device, dtype=dtype)[None]
            directions = torch.zeros_like(p)
            directions[..., 0] = 1.0
            features = features_from_planes(self.levels, p, self.plane_axes, box_warp)
            rgb, sigma_raw = self.decoder(features, (2 / box_warp) * p, directions)
            density = F.softplus(sigma_raw[0, :, 0].float() + self.cfg.density_offset) * self.cfg.sigma_scale
            rgbs.append(rgb[0].float().clamp(0, 1).cpu())
            densities.append(density.cpu())
        return torch.cat(rgbs), torch.cat(densities)


def grid_points(resolution: int, box_warp: float) -> np.ndarray:
    """(N, N, N, 3) float64 viewer-frame positions of a grid covering the box, faces included.

    Index ``[i, j, k]`` is the point ``(x_i, y_j, z_k)`` with ``x_i = -h + i * 2h / (N - 1)``, h = box_warp / 2.
    """
    if resolution < 2:
        raise ConfigError(f"mesh grid resolution must be >= 2, got {resolution}")
    half = box_warp / 2
    axis = np.linspace(-half, half, resolution)
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1)


def density_grid_from_field(field: Field, resolution: int, box_warp: float, progress: bool = False) -> np.ndarray:
    """(N, N, N) float32 density at :func:`grid_points` (viewer frame), evaluated slab by slab along x."""
    from tqdm import tqdm

    points_viewer = grid_points(resolution, box_warp)
    grid = np.empty((resolution,) * 3, dtype=np.float32)
    for i in tqdm(range(resolution), desc="density grid", unit="slab", disable=not progress):
        world = points_viewer[i].reshape(-1, 3) @ VIEWER_FROM_WORLD  # row vectors: p_world = R^T p_viewer
        _, density = field(torch.from_numpy(world))
        grid[i] = density.numpy().reshape(resolution, resolution)
    return grid


def mesh_from_density_grid(grid: np.ndarray, box_warp: float, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Closed iso-surface ``density = threshold`` of a grid from :func:`density_grid_from_field`.

    Returns ``(vertices (V, 3) float32 viewer frame, faces (F, 3) int64)`` with outward normals
    (pointing to lower density). Raises :class:`DataError` when no sample exceeds the threshold.
    """
    _require_mesh_extra()
    from skimage.measure import marching_cubes

    if not threshold > 0:
        raise ConfigError(f"density threshold must be > 0 (the padding is 0), got {threshold}")
    n = grid.shape[0]
    if grid.shape != (n, n, n):
        raise ValueError(f"density grid must be cubic, got {grid.shape}")
    if not np.isfinite(grid).all():
        raise DataError("the density grid has non-finite values (a diverged checkpoint?)")
    peak = float(grid.max())
    if peak <= threshold:
        raise DataError(f"no density above the threshold {threshold} (max {peak:.4g}): lower --threshold")
    padded = np.pad(grid, 1, mode="constant", constant_values=0.0)
    step = box_warp / (n - 1)
    vertices, faces, _, _ = marching_cubes(padded, level=threshold, spacing=(step, step, step),
                                           gradient_direction="ascent", allow_degenerate=False)
    vertices = vertices - (box_warp / 2 + step)  # undo the padding and move the origin to the box centre
    return vertices.astype(np.float32), faces.astype(np.int64)


def keep_largest_components(vertices: np.ndarray, faces: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``keep`` connected components with the most faces (floaters dropped); vertices re-indexed.

    Components are sets of faces joined by shared vertices. Each kept component stays closed.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if keep < 1:
        raise ConfigError(f"the number of components to keep must be >= 1, got {keep}")
    n = len(vertices)
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    count, labels = connected_components(graph, directed=False)
    if count <= keep:
        return vertices, faces
    face_labels = labels[faces[:, 0]]
    sizes = np.bincount(face_labels, minlength=count)
    kept = np.argsort(-sizes, kind="stable")[:keep]
    face_mask = np.isin(face_labels, kept)
    used = np.zeros(n, dtype=bool)
    used[faces[face_mask].ravel()] = True
    new_index = np.cumsum(used) - 1
    return vertices[used], new_index[faces[face_mask]].astype(np.int64)


def extract_mesh(field: Field, *, resolution: int = 128, threshold: float = 5.0, box_warp: float = 2.0,
                 keep_components: int | None = None, progress: bool = False) -> Mesh:
    """Density grid -> marching cubes -> (largest components) -> vertex colours from the field, viewer frame."""
    grid = density_grid_from_field(field, resolution, box_warp, progress=progress)
    vertices, faces = mesh_from_density_grid(grid, box_warp, threshold)
    if keep_components is not None:
        vertices, faces = keep_largest_components(vertices, faces, keep_components)
    rgb, _ = field(torch.from_numpy(vertices.astype(np.float64) @ VIEWER_FROM_WORLD))
    colors = (rgb.numpy() * 255).round().clip(0, 255).astype(np.uint8)
    return Mesh(vertices=vertices, faces=faces, colors=colors)


def write_mesh(mesh: Mesh, path: str | Path) -> Path:
    """Write ``.ply`` (binary, vertex colours), ``.glb`` (glTF 2.0, COLOR_0) or ``.obj`` (``v x y z r g b``)."""
    _require_mesh_extra()
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MESH_FORMATS:
        raise ConfigError(f"mesh file {path} must end in one of {', '.join(MESH_FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tri = mesh.to_trimesh()
    data = tri.export(file_type=suffix[1:], **({"include_normals": False} if suffix == ".obj" else {}))
    if isinstance(data, str):
        data = data.encode()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path
