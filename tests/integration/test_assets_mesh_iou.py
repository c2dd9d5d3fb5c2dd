"""The mesh of a synthetic primitive, reconstructed by a tiny f_trigen overfit to that one sample, overlaps the
primitive's true visible shape.

What is compared. One view determines only the visible surface, so the *visible shape* of a scene is the set of
points of the box behind its visible surface as seen from the input camera (in front of the synthetic back
wall, which is excluded). Both volumes are voxelised on the same 32^3 grid of the box (voxels inside the
camera's frustum): the truth from the exact ray-primitive intersection of ``g3dr prep synth``, the prediction
from the **written mesh file** (read back, z-buffered from points sampled on its surface). The mesh is in the
viewer frame, which is the synthetic data's frame, so no alignment is fitted.

The bound, IoU > 0.5, and why. The tiny model sees a 32x32 image, renders 16+16 samples per ray and is trained
for 150 Adam steps on CPU (20-40 s), reaching a mean depth error of ~0.13 and a silhouette blurred by about a
pixel; its mesh (default threshold 5) measured IoU 0.59 on this sample (0.65 at threshold 10). The same mesh
scores at most 0.33 against four other primitives of the dataset (so a wrong shape stays below the bound, and
the test asserts that too), and the mesh of the exact primitive (an analytic density through the same marching
cubes, file and measure) scores 0.92 (what the measure itself loses to the 48^3 grid, the 64x64 z-buffer and
the 32^3 voxels). 0.5 sits between, with margin on both sides.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

trimesh = pytest.importorskip("trimesh", reason="mesh export needs the optional 'mesh' extra")
pytest.importorskip("skimage", reason="mesh export needs the optional 'mesh' extra")

from g3dr.assets.mesh import VIEWER_FROM_WORLD, TriplaneField, extract_mesh, write_mesh  # noqa: E402
from g3dr.data.synth import WALL_Z, SynthCamera, _hit, camera_rays, synth_sample  # noqa: E402

SAMPLE = 9  # seed 0: a rotated cube (half-size 0.4), off-centre - not mirror-symmetric in the image
IOU_BOUND = 0.5


def _zbuffer(origin, points, image, half):
    rel = points - origin
    px, py = rel[:, 0] / -rel[:, 2] / half, rel[:, 1] / -rel[:, 2] / half
    ok = (np.abs(px) < 1) & (np.abs(py) < 1)
    col, row = ((px[ok] + 1) / 2 * image).astype(int), ((1 - py[ok]) / 2 * image).astype(int)
    buffer = np.full(image * image, np.inf)
    np.minimum.at(buffer, row * image + col, np.linalg.norm(rel[ok], axis=-1))
    return buffer


def visible_shape_iou(primitive, surface_points: np.ndarray, image: int = 64, voxels: int = 32,
                      wall_margin: float = 0.1) -> tuple[float, int, int]:
    """IoU of the voxelised visible shapes of ``primitive`` (exact) and of a surface given by points on it."""
    camera = SynthCamera()
    half = math.tan(math.radians(camera.fov_degrees) / 2)
    origin, dirs = camera_rays(image, camera)
    t_true, _ = _hit(primitive, origin, dirs.reshape(-1, 3))
    t_mesh = _zbuffer(origin, surface_points, image, half)
    centres = (np.arange(voxels) + 0.5) / voxels * 2 - 1
    p = np.stack(np.meshgrid(centres, centres, centres, indexing="ij"), -1).reshape(-1, 3)
    rel = p - origin
    dist = np.linalg.norm(rel, axis=-1)
    px, py = rel[:, 0] / -rel[:, 2] / half, rel[:, 1] / -rel[:, 2] / half
    inside = (np.abs(px) < 1) & (np.abs(py) < 1) & (p[:, 2] > WALL_Z + wall_margin)
    pixel = (np.clip(((1 - py) / 2 * image).astype(int), 0, image - 1) * image
             + np.clip(((px + 1) / 2 * image).astype(int), 0, image - 1))
    truth, pred = inside & (dist >= t_true[pixel]), inside & (dist >= t_mesh[pixel])
    return float((truth & pred).sum() / max((truth | pred).sum(), 1)), int(truth.sum()), int(pred.sum())


def _surface_points(path) -> np.ndarray:
    mesh = trimesh.load(path, force="mesh")
    points, _ = trimesh.sample.sample_surface(mesh, 400_000, seed=0)
    return np.asarray(points)


def test_measure_scores_the_exact_primitive_high(tmp_path):
    _, _, _, primitive = synth_sample(0, SAMPLE, 32)
    to_local = primitive.rotation.T / primitive.scale[:, None]

    def exact_field(points_world):  # the primitive (a cube) as a density, in the viewer (= synthetic) frame
        local = (points_world.double().numpy() @ VIEWER_FROM_WORLD.T - primitive.centre) @ to_local.T
        inside = np.abs(local).max(axis=1) <= 1
        return torch.full((len(local), 3), 0.5), torch.from_numpy(np.where(inside, 20.0, 0.0)).float()

    path = write_mesh(extract_mesh(exact_field, resolution=48, threshold=5.0), tmp_path / "exact.ply")
    iou, truth, _ = visible_shape_iou(primitive, _surface_points(path))
    assert truth > 1000 and iou > 0.85


@pytest.mark.slow
def test_overfit_tiny_model_mesh_overlaps_the_true_visible_shape(tmp_path, tiny_config_path):
    from g3dr.assets.inputs import inputs_from_shards, rgbd_from_sample
    from g3dr.launchers.main import main
    from g3dr.config import load_config
    from g3dr.models import FTrigen
    from g3dr.render import camera_to_world_from_angles

    shards = tmp_path / "synth"
    assert main(["prep", "synth", "--out", str(shards), "--n", str(SAMPLE + 1), "--resolution", "32",
                 "--no-progress"]) == 0
    raw = [item for item in inputs_from_shards([shards]) if item.key == f"synth_{SAMPLE:07d}"][0]
    cfg = load_config(tiny_config_path, ["renderer.num_coarse=16", "renderer.num_fine=16",
                                         "renderer.deterministic=true",
                                         "renderer.impl=reference"])
    rgb, depth = rgbd_from_sample(raw, cfg.data.resolution, cfg.data.depth_scale, cfg.data.depth_offset)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the busy 2-core test machine runs these small ops fastest single-threaded
    try:
        torch.manual_seed(0)
        model = FTrigen(cfg)
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.9, 0.99))
        cam2world = camera_to_world_from_angles(torch.tensor([cfg.camera.canonical_yaw]),
                                                torch.tensor([cfg.camera.canonical_pitch]), cfg.camera.radius)
        for _ in range(150):
            out = model(rgb, depth, cam2world, canonical=True)
            loss = ((out["rgb"] - rgb).abs().mean() + 2 * (out["depth"] - depth).abs().mean()
                    + (1 - out["weight_sum"]).abs().mean())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        depth_error = (out["depth"] - depth).abs().mean().item()
        with torch.no_grad():
            planes = model.make_planes(rgb, depth)
        mesh = extract_mesh(TriplaneField(planes, model.decoder, model.renderer), resolution=48)  # default threshold
    finally:
        torch.set_num_threads(threads)
    assert depth_error < 0.25, f"the overfit did not converge (mean depth error {depth_error:.3f})"
    path = write_mesh(mesh, tmp_path / "reconstruction.glb")
    points = _surface_points(path)
    assert trimesh.load(path, force="mesh").is_watertight

    _, _, _, primitive = synth_sample(0, SAMPLE, 32)
    iou, truth, pred = visible_shape_iou(primitive, points)
    print(f"visible-shape IoU {iou:.3f} (true {truth} voxels, mesh {pred}), depth error {depth_error:.3f}")
    assert iou > IOU_BOUND
    controls = [visible_shape_iou(synth_sample(0, other, 8)[3], points)[0] for other in (10, 11, 12, 13)]
    print("other primitives:", [round(c, 3) for c in controls])
    assert max(controls) < IOU_BOUND and max(controls) < iou - 0.1
