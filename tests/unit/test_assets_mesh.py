"""Mesh export against closed forms: an analytic density gives the right closed surface, in the viewer frame."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("skimage", reason="mesh export needs the optional 'mesh' extra (scikit-image)")
trimesh = pytest.importorskip("trimesh", reason="mesh export needs the optional 'mesh' extra (trimesh)")

from g3dr.assets.mesh import (  # noqa: E402
    VIEWER_FROM_WORLD,
    TriplaneField,
    density_grid_from_field,
    extract_mesh,
    grid_points,
    mesh_from_density_grid,
    write_mesh,
)
from g3dr.errors import ConfigError, DataError  # noqa: E402

CENTRE_WORLD = np.array([0.2, -0.1, 0.1])
RADIUS = 0.5


def sphere_field(points: torch.Tensor):
    """Density 10 + 30 (r - |p - c|): above 10 exactly inside the sphere; colour encodes the world position."""
    p = points.double()
    density = 10.0 + 30.0 * (RADIUS - (p - torch.from_numpy(CENTRE_WORLD)).norm(dim=-1))
    colour = ((p + 1) / 2).clamp(0, 1)
    return colour.float(), density.float()


def test_viewer_frame_is_a_rotation_that_puts_the_canonical_camera_on_plus_z():
    from g3dr.config import CameraConfig
    from g3dr.render import camera_to_world_from_angles, rays_from_cameras

    assert np.allclose(VIEWER_FROM_WORLD @ VIEWER_FROM_WORLD.T, np.eye(3))
    assert np.isclose(np.linalg.det(VIEWER_FROM_WORLD), 1)
    cam = CameraConfig()
    c2w = camera_to_world_from_angles(torch.tensor([cam.canonical_yaw]), torch.tensor([cam.canonical_pitch]),
                                      cam.radius)
    origins, dirs = rays_from_cameras(c2w.double(), cam.fov_degrees, 33)
    origin_v = VIEWER_FROM_WORLD @ origins[0, 0].numpy()
    dirs_v = dirs[0].numpy() @ VIEWER_FROM_WORLD.T
    np.testing.assert_allclose(origin_v, [0, 0, cam.radius], atol=1e-5)
    np.testing.assert_allclose(dirs_v[16 * 33 + 16], [0, 0, -1], atol=1e-6)  # centre pixel looks along -z
    # Row 0 is the top of the image, column 0 its left: the top-left ray goes to -x, +y (no mirroring), as in
    # the synthetic data's camera (g3dr prep synth), whose frame is the viewer frame.
    from g3dr.data.synth import camera_rays

    half = math.tan(math.radians(cam.fov_degrees) / 2)
    expected = np.array([-half, half, -1.0]) / np.linalg.norm([half, half, 1.0])
    np.testing.assert_allclose(dirs_v[0], expected, atol=1e-6)
    _, synth_dirs = camera_rays(33)
    assert np.all(np.sign(synth_dirs[0, 0]) == np.sign(expected))
    np.testing.assert_allclose(synth_dirs[16, 16], [0, 0, -1], atol=1e-9)


def test_sphere_density_gives_a_closed_sphere_in_the_viewer_frame():
    mesh = extract_mesh(sphere_field, resolution=48, threshold=10.0, box_warp=2.0)
    tm = mesh.to_trimesh()
    assert tm.is_watertight and tm.is_winding_consistent
    assert tm.volume > 0  # outward normals
    assert abs(tm.volume / (4 / 3 * math.pi * RADIUS**3) - 1) < 0.01
    centre_viewer = VIEWER_FROM_WORLD @ CENTRE_WORLD
    step = 2.0 / 47
    distances = np.linalg.norm(mesh.vertices - centre_viewer, axis=1)
    assert np.abs(distances - RADIUS).max() < 0.1 * step  # linear interpolation of a linear-in-r density
    # Vertex colours are the field's colour at each vertex (world position mapped to [0, 1]).
    world = mesh.vertices.astype(np.float64) @ VIEWER_FROM_WORLD
    expected = np.rint(np.clip((world + 1) / 2, 0, 1) * 255)
    assert np.abs(mesh.colors.astype(float) - expected).max() <= 1


def test_density_reaching_the_box_is_capped_half_a_step_outside():
    """A constant density above the threshold fills the box: the mesh is the box, closed by the zero padding.

    Between the last grid point (density D) and the pad (0) the crossing is at (D - t) / D of a step outside.
    """
    dense, threshold, n = 20.0, 5.0, 12

    def field(points):
        return torch.full((points.shape[0], 3), 0.5), torch.full((points.shape[0],), dense)

    mesh = extract_mesh(field, resolution=n, threshold=threshold, box_warp=2.0)
    tm = mesh.to_trimesh()
    assert tm.is_watertight and tm.volume > 0
    side = 2.0 + 2 * (2.0 / (n - 1)) * (dense - threshold) / dense
    np.testing.assert_allclose(tm.bounds, [[-side / 2] * 3, [side / 2] * 3], atol=1e-5)
    # marching cubes chamfers the box edges and corners, so the volume is a little below side^3
    assert 0.97 < tm.volume / side**3 <= 1.0


def test_grid_and_errors():
    points = grid_points(5, 2.0)
    assert points.shape == (5, 5, 5, 3)
    np.testing.assert_allclose(points[0, 0, 0], [-1, -1, -1])
    np.testing.assert_allclose(points[4, 2, 1], [1, 0, -0.5])
    grid = density_grid_from_field(sphere_field, 16, 2.0)
    with pytest.raises(DataError, match="lower --threshold"):
        mesh_from_density_grid(grid, 2.0, float(grid.max()) + 1)
    with pytest.raises(ConfigError, match="> 0"):
        mesh_from_density_grid(grid, 2.0, 0.0)
    bad = grid.copy()
    bad[3, 3, 3] = np.nan
    with pytest.raises(DataError, match="non-finite"):
        mesh_from_density_grid(bad, 2.0, 10.0)
    with pytest.raises(ConfigError, match=">= 2"):
        grid_points(1, 2.0)


@pytest.mark.parametrize("suffix", [".ply", ".glb", ".obj"])
def test_writers_decode_back(tmp_path, suffix):
    mesh = extract_mesh(sphere_field, resolution=20, threshold=10.0, box_warp=2.0)
    path = write_mesh(mesh, tmp_path / f"sphere{suffix}")
    loaded = trimesh.load(path, force="mesh", process=False)
    assert len(loaded.faces) == len(mesh.faces)
    merged = trimesh.load(path, force="mesh")  # merges the per-corner vertices some formats store
    assert merged.is_watertight and len(merged.vertices) == len(mesh.vertices)
    np.testing.assert_allclose(np.sort(merged.vertices, axis=0), np.sort(mesh.vertices, axis=0), atol=1e-5)
    colours = np.asarray(merged.visual.vertex_colors)[:, :3]
    assert sorted(map(tuple, colours)) == sorted(map(tuple, mesh.colors))
    with pytest.raises(ConfigError, match="must end in"):
        write_mesh(mesh, tmp_path / "sphere.stl")


def test_triplane_field_is_the_renderers_density(tiny_config_path):
    """The field decodes like the renderer: softplus(raw + density_offset) * sigma_scale, colour in [0, 1]."""
    from g3dr.config import load_config
    from g3dr.models import FTrigen
    from g3dr.render.triplane import features_from_planes, planes_pyramid_from_planes

    cfg = load_config(tiny_config_path, ["renderer.sigma_scale=3.0"])
    torch.manual_seed(0)
    model = FTrigen(cfg)
    channels, res = cfg.model.triplane_channels, cfg.data.resolution
    planes = torch.randn(1, 3, channels, res, res)
    points = torch.rand(50, 3) * 2 - 1
    colour, density = TriplaneField(planes, model.decoder, model.renderer, chunk=7)(points)
    with torch.no_grad():
        levels = planes_pyramid_from_planes(planes, cfg.renderer.plane_resolutions)
        features = features_from_planes(levels, points[None], model.renderer.plane_axes, 2.0)
        rgb, raw = model.decoder(features, points[None], torch.zeros(1, 50, 3))
    expected = torch.log1p(torch.exp(raw[0, :, 0].double() + cfg.renderer.density_offset)) * 3.0
    torch.testing.assert_close(density, expected.float())
    torch.testing.assert_close(colour, rgb[0].clamp(0, 1))


def test_keep_largest_components_drops_floaters():
    """Two separate balls (r 0.5 and a floater of r 0.15): keeping one leaves the big ball, closed and re-indexed."""
    small = np.array([-0.6, 0.6, -0.6])

    def field(points):
        p = points.double()
        big = RADIUS - (p - torch.from_numpy(CENTRE_WORLD)).norm(dim=-1)
        floater = 0.15 - (p - torch.from_numpy(small)).norm(dim=-1)
        return torch.full((len(p), 3), 0.5), (10.0 + 30.0 * torch.maximum(big, floater)).float()

    both = extract_mesh(field, resolution=40, threshold=10.0).to_trimesh()
    assert len(both.split(only_watertight=False)) == 2
    mesh = extract_mesh(field, resolution=40, threshold=10.0, keep_components=1)
    tm = mesh.to_trimesh()
    assert tm.is_watertight and len(tm.split(only_watertight=False)) == 1
    assert abs(tm.volume / (4 / 3 * math.pi * RADIUS**3) - 1) < 0.02
    assert len(mesh.colors) == len(mesh.vertices) and mesh.faces.max() == len(mesh.vertices) - 1
    assert extract_mesh(field, resolution=40, threshold=10.0, keep_components=5).faces.shape == both.faces.shape
    with pytest.raises(ConfigError, match=">= 1"):
        extract_mesh(field, resolution=12, threshold=10.0, keep_components=0)
