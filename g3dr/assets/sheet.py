"""Contact sheets: one labelled picture of what a lifted image became (``g3dr batch --sheet``).

Columns: the input image, the canonical render, novel views along the video trajectory, the canonical depth in
the depth colours every g3dr picture uses (:func:`g3dr.assets.video.colorize_depth`), and the mesh drawn with
matplotlib (flat-shaded faces in their vertex colours, seen from the canonical camera's side). A header names
the columns. Everything is uint8 (H, W, 3) numpy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["contact_sheet", "mesh_picture", "with_header"]

HEADER_PX = 12
CHAR_PX = 6
"""Height of the label strip and the width of one character of PIL's default font."""


def with_header(body: np.ndarray, labels: tuple[str, ...], tile: int,
                short: tuple[str, ...] | None = None) -> np.ndarray:
    """``body`` (H, W, 3) uint8 under a white strip with one label per ``tile``-wide column (``short`` labels
    instead when the long ones do not fit a tile)."""
    from PIL import Image, ImageDraw

    header = Image.new("RGB", (body.shape[1], HEADER_PX), "white")
    draw = ImageDraw.Draw(header)
    narrow = max(len(label) for label in labels) * CHAR_PX + 4 > tile
    for i, label in enumerate(short if narrow and short else labels):
        draw.text((i * tile + 2, 1), label, fill="black")
    return np.concatenate([np.asarray(header), body], axis=0)


def mesh_picture(vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray, size: int,
                 max_faces: int = 20000) -> np.ndarray:
    """(size, size, 3) uint8: the mesh from the front-right and slightly above, each face flat-shaded
    (its vertices' mean colour times a Lambert term), on white. Large meshes are drawn from an even subset of
    ``max_faces`` faces."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    if len(faces) > max_faces:
        faces = faces[np.linspace(0, len(faces) - 1, max_faces).astype(int)]
    tri = vertices[faces]  # (F, 3, 3) viewer frame: x right, y up, z towards the camera
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
    light = np.array([0.4, 0.6, 0.7]) / np.linalg.norm([0.4, 0.6, 0.7])
    shade = 0.35 + 0.65 * np.clip(normals @ light, 0, 1)
    face_rgb = colors[faces].mean(axis=1) / 255.0 * shade[:, None]
    dpi = 100
    fig = plt.figure(figsize=(size / dpi, size / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1), projection="3d")
    # matplotlib's z is up: draw (x, -z, y) so the viewer's y is up and the camera looks from -y
    ax.add_collection3d(Poly3DCollection(tri[..., [0, 2, 1]] * np.array([1, -1, 1]), facecolors=face_rgb,
                                         edgecolors="none"))
    lim = float(np.abs(vertices).max()) if len(vertices) else 1.0
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), zlim=(-lim, lim))
    ax.view_init(elev=15, azim=-70)
    ax.set_axis_off()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def contact_sheet(source: np.ndarray, canonical: np.ndarray, novel: list[np.ndarray], depth: np.ndarray,
                  mesh: np.ndarray | None, labels: tuple[str, ...] | None = None) -> np.ndarray:
    """One row of equally sized (R, R, 3) uint8 tiles with a 2 px white gap, under a header. ``mesh`` None: a
    white tile saying there is no surface above the threshold."""
    from PIL import Image, ImageDraw

    size = canonical.shape[0]
    if mesh is None:
        blank = Image.new("RGB", (size, size), "white")
        ImageDraw.Draw(blank).text((2, size // 2 - 6), "no surface", fill="black")
        mesh = np.asarray(blank)
    tiles = [source, canonical, *novel, depth, mesh]
    tiles = [np.asarray(Image.fromarray(t).resize((size, size), Image.Resampling.LANCZOS)) if t.shape[0] != size
             else t for t in tiles]
    gap = np.full((size, 2, 3), 255, np.uint8)
    body = np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1)
    names = labels or ("input", "canonical", *[f"novel {i + 1}" for i in range(len(novel))], "depth", "mesh")
    return with_header(body, names, tile=size + 2)
