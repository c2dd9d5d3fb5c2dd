"""The synthetic RGB-D set: depth is the exact ray distance of the canonical camera (checked geometrically)."""

from __future__ import annotations

import math

import numpy as np

from g3dr.data.depth_codec import decode_depth_png, encode_depth_png
from g3dr.data.synth import CLASS_NAMES, WALL_Z, random_primitive, synth_sample


def _independent_rays(res: int, fov_deg: float = 18.0, radius: float = 5.0):
    """Camera at (0, 0, radius) looking at the origin, up +y; unit rays through pixel centres, row 0 on top."""
    focal = 0.5 / math.tan(math.radians(fov_deg) / 2)  # in image widths
    j, i = np.meshgrid(np.arange(res), np.arange(res))
    x = ((j + 0.5) / res - 0.5) / focal
    y = -((i + 0.5) / res - 0.5) / focal
    d = np.stack([x, y, -np.ones_like(x)], -1)
    return np.array([0, 0, radius], float), d / np.linalg.norm(d, axis=-1, keepdims=True)


def _find(kind: int, seed: int = 3) -> int:
    for index in range(200):
        if random_primitive(np.random.default_rng([seed, index])).kind == kind:
            return index
    raise AssertionError


def test_sphere_depth_lands_on_the_sphere_and_wall_after_encoding():
    res, seed = 48, 3
    index = _find(0, seed)
    rgb, depth, label, prim = synth_sample(seed, index, res)
    assert label == 0 and rgb.shape == (res, res, 3) and rgb.dtype == np.uint8
    decoded = decode_depth_png(encode_depth_png(depth)).astype(np.float64)
    origin, dirs = _independent_rays(res)
    points = origin + decoded[..., None] * dirs
    on_wall = np.abs(points[..., 2] - WALL_Z) < 1e-3
    on_sphere = ~on_wall
    assert on_sphere.sum() > 50 and on_wall.sum() > 50
    radius = prim.scale[0]
    dist = np.linalg.norm(points[on_sphere] - prim.centre, axis=-1)
    np.testing.assert_allclose(dist, radius, atol=5e-5)  # quantisation step 2/65536 ~ 3e-5
    np.testing.assert_allclose(points[on_wall][:, 2], WALL_Z, atol=5e-5)
    assert 4.0 < decoded.min() and decoded.max() < 6.0


def test_cube_depth_lies_on_a_face():
    res, seed = 40, 5
    index = _find(1, seed)
    _, depth, label, prim = synth_sample(seed, index, res)
    assert label == 1
    origin, dirs = _independent_rays(res)
    points = origin + depth[..., None] * dirs
    hit = np.abs(points[..., 2] - WALL_Z) > 1e-6
    local = (points[hit] - prim.centre) @ prim.rotation / prim.scale  # into the unit cube frame
    assert np.all(np.abs(local) <= 1 + 1e-9)
    np.testing.assert_allclose(np.abs(local).max(axis=-1), 1.0, atol=1e-9)


def test_all_classes_appear_and_samples_are_deterministic():
    kinds = {random_primitive(np.random.default_rng([0, i])).kind for i in range(40)}
    assert kinds == set(range(len(CLASS_NAMES)))
    a = synth_sample(0, 7, 16)
    b = synth_sample(0, 7, 16)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], synth_sample(0, 8, 16)[0])


def test_renderer_cameras_map_onto_the_synthetic_world():
    """A renderer camera seen through synth_pose_from_renderer renders the same scene from that pose:
    the canonical camera reproduces the canonical image exactly, and a sphere's depth from a novel camera
    lands on the sphere (independent float64 ray-sphere check in the synthetic world)."""
    import torch

    from g3dr.data.synth import Primitive, render_primitive, synth_pose_from_renderer
    from g3dr.render.cameras import camera_to_world_from_angles

    c0 = camera_to_world_from_angles(torch.tensor([math.pi / 2], dtype=torch.float64),
                                     torch.tensor([math.pi / 2], dtype=torch.float64), 5.0)[0].numpy()
    pose0 = synth_pose_from_renderer(c0, c0)
    np.testing.assert_allclose(pose0[:3, :3], np.eye(3), atol=1e-12)
    np.testing.assert_allclose(pose0[:3, 3], [0, 0, 5.0], atol=1e-12)

    prim = Primitive(0, np.array([0.1, -0.05, 0.0]), np.eye(3), np.full(3, 0.5), np.array([[0.9, 0.2, 0.1], [0.1, 0.8, 0.3]]), 2.0, 1)
    rgb_a, depth_a = render_primitive(prim, 16)
    rgb_b, depth_b = render_primitive(prim, 16, pose=pose0)
    np.testing.assert_array_equal(rgb_a, rgb_b)
    np.testing.assert_allclose(depth_a, depth_b, atol=1e-12)

    # yaw +0.4 rad: the renderer's camera moves on its sphere; in the synthetic world it must stay at radius 5,
    # look at the origin, and the hit points of its rays must lie on the sphere or the wall.
    c1 = camera_to_world_from_angles(torch.tensor([math.pi / 2 + 0.4], dtype=torch.float64),
                                     torch.tensor([math.pi / 2 - 0.1], dtype=torch.float64), 5.0)[0].numpy()
    pose1 = synth_pose_from_renderer(c1, c0)
    origin = pose1[:3, 3]
    assert abs(np.linalg.norm(origin) - 5.0) < 1e-9
    np.testing.assert_allclose(pose1[:3, 2], origin / 5.0, atol=1e-9)  # "back" points away from the origin
    assert abs(math.acos(origin[2] / 5.0) - math.acos(math.cos(0.4) * math.cos(0.1))) < 1e-9
    _, depth = render_primitive(prim, 16, pose=pose1)
    from g3dr.data.synth import camera_rays
    o, d = camera_rays(16, pose=pose1)
    hits = o + depth[..., None] * d
    on_sphere = np.abs(np.linalg.norm(hits - prim.centre, axis=-1) - 0.5) < 1e-9
    on_wall = np.abs(hits[..., 2] - WALL_Z) < 1e-9
    assert on_sphere.sum() > 20 and (on_sphere | on_wall).all()


# ------------------------------------------------------------------ novel views with exact depth


def _renderer_rays(yaw: float, pitch: float, res: int, fov_deg: float = 18.0, radius: float = 5.0):
    """In the renderer's world, independently of g3dr: camera at 3DGP's spherical position looking at the
    origin (up +y), unit rays through pixel centres (as the synthetic set takes them), row 0 on top."""
    eye = radius * np.array([math.sin(pitch) * math.sin(-yaw), math.cos(pitch), math.sin(pitch) * math.cos(yaw)])
    forward = -eye / np.linalg.norm(eye)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    half = math.tan(math.radians(fov_deg) / 2)
    c = ((np.arange(res) + 0.5) / res * 2 - 1) * half
    d = c[None, :, None] * right + (-c)[:, None, None] * up + forward
    return eye, d / np.linalg.norm(d, axis=-1, keepdims=True)


def test_novel_view_depth_lands_on_the_primitive_and_invalid_pixels_lie_outside_the_box():
    """Views stored and decoded as the eval reads them: hit points (independent rays in the renderer's world,
    where a synthetic point (x, y, z) sits at (-z, y, x)) lie on the sphere or the wall inside the scene box;
    the pixels marked invalid see the wall outside the box."""
    from g3dr.data.pipeline import decode_views
    from g3dr.data.synth import ViewSpec, SyntheticSource
    from g3dr.data.shard_writer import Item, StoreOptions

    res, seed = 24, 3
    index = _find(0, seed)
    views = ViewSpec(count=2)
    source = SyntheticSource(n=index + 1, options=StoreOptions(resolutions=(res,), image_format="jpg"), seed=seed,
                             views=views)
    (prepared,) = source.prepare_batch([Item(key="k", index=index)])
    decoded = decode_views({"__key__": "k", **prepared.files}, res)
    assert (~decoded["valid"]).any() and decoded["valid"].float().mean() > 0.9  # some wall beyond the box
    _, _, _, prim = synth_sample(seed, index, res)
    centre = np.array([-prim.centre[2], prim.centre[1], prim.centre[0]])
    radius = prim.scale[0]
    for k in range(2):
        yaw, pitch = float(decoded["yaw"][k]), float(decoded["pitch"][k])
        assert abs(yaw - math.pi / 2) <= math.pi / 6 + 1e-12 and abs(pitch - math.pi / 2) <= math.pi / 18 + 1e-12
        eye, dirs = _renderer_rays(yaw, pitch, res)
        depth = decoded["depth"][k].double().numpy()
        valid = decoded["valid"][k].numpy()
        points = eye + np.where(valid, depth, 0)[..., None] * dirs
        on_sphere = np.abs(np.linalg.norm(points - centre, axis=-1) - radius) < 1e-4  # quantisation 4/65536
        on_wall = np.abs(points[..., 0] - (-WALL_Z)) < 1e-4
        assert on_sphere[valid].sum() > 20 and (on_sphere | on_wall)[valid].all()
        assert (np.abs(points[valid]) <= 1 + 1e-4).all()
        assert np.isinf(depth[~valid]).all()
        # invalid pixels: the ray meets the wall plane outside the box
        t_wall = (-WALL_Z - eye[0]) / dirs[..., 0]
        wall = eye + t_wall[..., None] * dirs
        assert (np.abs(wall[~valid]).max(axis=-1) > 1 - 1e-9).all()
    # the decoded images are the lossless renders
    from g3dr.data.synth import synth_views

    direct = synth_views(seed, index, res, views)
    np.testing.assert_array_equal(decoded["rgb"].permute(0, 2, 3, 1).numpy(), direct["rgb"])
    np.testing.assert_array_equal(decoded["valid"].numpy(), direct["valid"])
    np.testing.assert_allclose(decoded["depth"].numpy()[direct["valid"]], direct["depth"][direct["valid"]], atol=4e-5)


def test_a_view_at_the_canonical_camera_is_the_canonical_image():
    from g3dr.data.synth import ViewSpec, synth_views

    rgb, depth, _, _ = synth_sample(2, 5, 20)
    views = synth_views(2, 5, 20, ViewSpec(count=1), angles=([math.pi / 2], [math.pi / 2]))
    np.testing.assert_array_equal(views["rgb"][0], rgb)
    np.testing.assert_allclose(views["depth"][0], depth, atol=1e-12)
    assert views["valid"].all()  # the canonical camera sees only the scene box


def test_view_cameras_are_seeded_per_sample_and_video_follows_the_path():
    import torch

    from g3dr.config import CameraConfig
    from g3dr.data.synth import ViewSpec, view_angles
    from g3dr.render.cameras import video_trajectory

    spec = ViewSpec(count=5)
    yaw, pitch = view_angles(0, 7, spec)
    again = view_angles(0, 7, spec)
    np.testing.assert_array_equal(yaw, again[0])
    np.testing.assert_array_equal(pitch, again[1])
    assert not np.array_equal(yaw, view_angles(0, 8, spec)[0]) and not np.array_equal(yaw, view_angles(1, 7, spec)[0])
    assert len(set(yaw.tolist())) == 5
    cam = CameraConfig()
    assert (np.abs(yaw - cam.canonical_yaw) <= math.pi / cam.novel_yaw_den_end).all()
    assert (np.abs(pitch - cam.canonical_pitch) <= cam.novel_pitch_range).all()
    vy, vp = view_angles(0, 7, ViewSpec(count=4, cameras="video"))
    ty, tp = video_trajectory(5, cam, dtype=torch.float64)
    np.testing.assert_allclose(vy, ty[:4].numpy())
    np.testing.assert_allclose(vp, tp[:4].numpy())
    np.testing.assert_array_equal(vy, view_angles(3, 1, ViewSpec(count=4, cameras="video"))[0])


def _stored_views(folder):
    from g3dr.data.pipeline import decode_views, expand_shard_urls
    from g3dr.data.tar_reader import iter_samples

    out = {}
    for url in expand_shard_urls(str(folder)):
        with open(url, "rb") as stream:
            for raw in iter_samples(stream, url):
                out[raw["__key__"]] = (decode_views(raw, 16), {k: v for k, v in raw.items() if k.startswith("view")})
    return out


def test_prep_synth_views_do_not_depend_on_sharding_or_workers(tmp_path):
    import json

    from g3dr.launchers.main import main
    from g3dr.data.synth import ViewSpec, write_synthetic_shards

    assert main(["prep", "synth", "--out", str(tmp_path / "a"), "--n", "5", "--resolution", "16", "--views", "2",
                 "--shard-size", "2", "--no-progress"]) == 0
    write_synthetic_shards(str(tmp_path / "b"), 5, (16,), shard_size=3, workers=2, progress=False,
                           views=ViewSpec(count=2))
    a, b = _stored_views(tmp_path / "a"), _stored_views(tmp_path / "b")
    assert sorted(a) == sorted(b) == [f"synth_{i:07d}" for i in range(5)]
    for key in a:
        assert a[key][1] == b[key][1] and sorted(a[key][1]) == [
            "view0.16.depth.png", "view0.16.png", "view1.16.depth.png", "view1.16.png"]
        assert a[key][0]["yaw"].shape == (2,)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["source"]["views"] == 2 and manifest["source"]["view_cameras"] == "sampled"
    assert manifest["source"]["view_depth_mapping"]["encoding"] == "v / 65536 * 4 + 3"
    # g3dr prep validate decodes the views; a truncated view PNG is a problem
    from g3dr.data_prep.validate import check_sample, validate_folder

    assert validate_folder(tmp_path / "a", progress=False)[0] == []
    with open(next((tmp_path / "b").glob("synth-000001.tar")), "rb") as stream:
        from g3dr.data.tar_reader import iter_samples

        raw = next(r for r in iter_samples(stream) if r["__key__"] == "synth_0000003")
    files = {k: v for k, v in raw.items() if not k.startswith("__")}
    assert check_sample("synth_0000003", files, [16]) == []
    files["view1.16.png"] = files["view1.16.png"][:60]
    (problem,) = check_sample("synth_0000003", files, [16])
    assert "stored views at 16 px do not decode" in problem
    # a set without views records none and stores no view members
    write_synthetic_shards(str(tmp_path / "c"), 2, (16,), progress=False)
    assert "views" not in json.loads((tmp_path / "c" / "manifest.json").read_text())["source"]
    assert all(v == (None, {}) for v in _stored_views(tmp_path / "c").values())
