"""``g3dr batch`` and ``g3dr mesh`` end to end on a tiny checkpoint: folders and shards in, renders, videos
and meshes out; bad inputs skipped with counted reasons; depth from a (tiny, random) depth model."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from g3dr.launchers.main import main

trimesh = pytest.importorskip("trimesh", reason="mesh export needs the optional 'mesh' extra")
pytest.importorskip("skimage", reason="mesh export needs the optional 'mesh' extra")

# The random tiny model's density is ~0.1-1 everywhere; 0.3 cuts through it.
THRESHOLD = "0.3"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_config_path, helper_module):
    return helper_module("tiny_models").save_perturbed_f_trigen(
        tiny_config_path, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", step=3)


def _pair(folder, name, seed, depth=True):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{name}.jpg")
    if depth:
        codes = rng.integers(10000, 60000, (40, 48)).astype(np.uint16)
        Image.fromarray(codes).save(folder / f"{name}_depth.png")


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _pair(src, "a", 0)
    _pair(src, "b", 1)
    _pair(src, "nodepth", 2, depth=False)
    (src / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    Image.fromarray(np.zeros((40, 48), np.uint16)).save(src / "broken_depth.png")
    _pair(src, "eightbit", 3)
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(src / "eightbit_depth.png")  # not 16-bit: refused
    (src / "notes.txt").write_text("ignored")
    return src


def batch(checkpoint, out, *extra):
    return main(["batch", "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu", "--no-progress",
                 "--deterministic", "--threshold", THRESHOLD, *extra])


def test_batch_folder_writes_every_output_and_counts_rejections(checkpoint, folder, tmp_path):
    imageio = pytest.importorskip("imageio.v2", reason="mp4 needs the optional 'video' extra")
    out = tmp_path / "out"
    assert batch(checkpoint, out, "--input", str(folder), "--png", "--npz", "--video", "mp4", "--video", "gif",
                 "--mesh", "ply", "--mesh", "glb", "--mesh", "obj", "--frames", "4", "--fps", "8", "--grid", "20") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"] == 5 == summary["written"] + summary["rejected"]
    assert summary["written"] == 2
    assert summary["rejected_by_reason"] == {"missing_depth": 1, "undecodable": 2}
    assert {item["key"] for item in summary["rejected_items"]} == {"nodepth", "broken", "eightbit"}
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{k}.{e}" for k in "ab" for e in ("png", "npz", "mp4", "gif", "ply", "glb", "obj")]
                           + ["summary.json"])
    arrays = np.load(out / "a.npz")
    assert arrays["rgb"].shape == (3, 32, 32) and arrays["depth"].shape == (1, 32, 32)
    assert np.asarray(Image.open(out / "a.png")).shape == (32, 32, 3)
    assert len(imageio.mimread(str(out / "a.mp4"))) == 4
    with Image.open(out / "a.gif") as gif:
        assert gif.n_frames == 4 and gif.size == (64, 32)  # RGB | depth
    for ext in ("ply", "glb", "obj"):
        mesh = trimesh.load(out / f"a.{ext}", force="mesh")
        assert len(mesh.faces) > 0 and mesh.is_watertight  # zero padding closes every level set
        assert np.all(np.abs(mesh.vertices) <= 1 + 2 / 19)  # inside the box (+ the padding step)
        assert np.asarray(mesh.visual.vertex_colors).shape == (len(mesh.vertices), 4)
    # Same checkpoint, same input, deterministic renderer: the canonical render is the same as g3dr render's.
    rendered = tmp_path / "render.npz"
    assert main(["render", "--checkpoint", str(checkpoint), "--image", str(folder / "a.jpg"), "--depth",
                 str(folder / "a_depth.png"), "--device", "cpu", "--deterministic", "--min-size", "32",
                 "--save-npz", str(rendered)]) == 0
    np.testing.assert_allclose(np.load(rendered)["rgb"], arrays["rgb"], atol=1e-5)


def test_batch_from_synthetic_shards(checkpoint, tmp_path):
    shards = tmp_path / "shards"
    assert main(["prep", "synth", "--out", str(shards), "--n", "3", "--resolution", "32", "--no-progress"]) == 0
    out = tmp_path / "out"
    assert batch(checkpoint, out, "--shards", str(shards), "--png") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["written"] == 3 and summary["rejected"] == 0
    assert sorted(p.name for p in out.glob("*.png")) == [f"synth_{i:07d}.png" for i in range(3)]


def test_batch_rejects_everything_when_no_surface(checkpoint, folder, tmp_path):
    out = tmp_path / "out"
    assert main(["batch", "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu", "--no-progress",
                 "--input", str(folder), "--mesh", "ply", "--grid", "8", "--threshold", "1000"]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["written"] == 0 and summary["rejected_by_reason"]["export_failed"] == 2
    assert not list(out.glob("*.ply"))


def test_mesh_cli_and_errors(checkpoint, folder, tmp_path, capsys):
    out = tmp_path / "a.obj"
    args = ["mesh", "--checkpoint", str(checkpoint), "--image", str(folder / "a.jpg"), "--device", "cpu",
            "--grid", "16", "--threshold", THRESHOLD]
    assert main([*args, "--depth", str(folder / "a_depth.png"), "--out", str(out), "--keep-components", "1"]) == 0
    mesh = trimesh.load(out, force="mesh")
    assert mesh.is_watertight and len(mesh.split(only_watertight=False)) == 1
    assert main([*args, "--depth", str(folder / "a_depth.png"), "--out", str(tmp_path / "a.stl")]) != 0
    assert "must end in" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b.ply")]) != 0
    assert "--depth-model" in capsys.readouterr().err
    assert main(["batch", "--checkpoint", str(checkpoint), "--input", str(folder), "--out", str(tmp_path / "x")]) != 0
    assert "nothing to write" in capsys.readouterr().err
    assert main(["batch", "--checkpoint", str(checkpoint), "--input", str(folder), "--out", str(folder), "--png"]) != 0
    assert "overwrite inputs" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_depth_model(tmp_path_factory, helper_module):
    pytest.importorskip("transformers", reason="depth from a model needs the 'depth' extra")
    return helper_module("tiny_models").save_tiny_depth_anything(
        tmp_path_factory.mktemp("models") / "tiny-depth-anything")


def test_depth_from_the_depth_model_when_only_an_image_is_given(checkpoint, folder, tiny_depth_model, tmp_path):
    from g3dr.assets.inputs import DepthFiller, input_from_files, rgbd_from_sample
    from g3dr.data.depth_model import DepthEstimator

    out = tmp_path / "out"
    assert batch(checkpoint, out, "--input", str(folder), "--npz", "--depth-model", str(tiny_depth_model)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["written"] == 3 and summary["rejected_by_reason"] == {"undecodable": 2}  # nodepth now works
    # The depth is exactly the data-prep backend's codes for the centre square, in the release decoding.
    _, depth = rgbd_from_sample(input_from_files(folder / "nodepth.jpg", None), 32, 2.0, 4.0,
                                DepthFiller(str(tiny_depth_model), device="cpu"))
    image = Image.open(folder / "nodepth.jpg").convert("RGB").crop((4, 0, 44, 40))
    (codes,) = DepthEstimator(str(tiny_depth_model), device="cpu").predict_codes([image], 32)
    np.testing.assert_allclose(depth[0, 0].numpy(), codes / 65536 * 2 + 4, atol=1e-6)
    assert depth.std() > 0
    # Images that have a depth PNG keep it: the model is only used for the missing one.
    np.testing.assert_array_equal(np.load(out / "a.npz")["rgb"].shape, (3, 32, 32))
    # g3dr render takes --depth-model too, and lifts the same RGB-D as g3dr batch.
    rendered = tmp_path / "render.npz"
    assert main(["render", "--checkpoint", str(checkpoint), "--image", str(folder / "nodepth.jpg"), "--depth-model",
                 str(tiny_depth_model), "--device", "cpu", "--deterministic", "--save-npz", str(rendered)]) == 0
    np.testing.assert_allclose(np.load(rendered)["rgb"], np.load(out / "nodepth.npz")["rgb"], atol=1e-5)
    assert main(["render", "--checkpoint", str(checkpoint), "--image", str(folder / "nodepth.jpg"), "--device", "cpu",
                 "--save-npz", str(rendered)]) != 0


def test_shards_reader_keeps_samples_together(tmp_path):
    import tarfile

    from g3dr.assets.inputs import inputs_from_shards

    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        members = [("x/k1.32.jpg", b"1"), ("x/k1.32.depth.png", b"2"), ("x/k2.32.jpg", b"3"), ("x/k2.cls", b"4")]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = list(inputs_from_shards([tmp_path]))
    assert [s.key for s in samples] == ["x/k1", "x/k2"]  # WebDataset's keys: the folder is part of it
    assert samples[0].sample == {"__key__": "x/k1", "32.jpg": b"1", "32.depth.png": b"2"}
    assert samples[1].sample == {"__key__": "x/k2", "32.jpg": b"3", "cls": b"4"}


def test_batch_shards_keep_samples_that_differ_only_by_folder(checkpoint, folder, tmp_path):
    """``1/x`` and ``2/x`` in a shard are two samples with two outputs (the folder was dropped, and one of
    them rejected as a duplicate); a key that would write outside --out is rejected and counted."""
    import tarfile

    shard = tmp_path / "shards" / "s.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for prefix, name in (("1/x", "a"), ("2/x", "b"), ("../evil", "a")):
            for ext, src in (("jpg", f"{name}.jpg"), ("depth.png", f"{name}_depth.png")):
                data = (folder / src).read_bytes()
                info = tarfile.TarInfo(f"{prefix}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    assert batch(checkpoint, out, "--shards", str(shard), "--npz") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"] == 3 and summary["written"] == 2
    assert summary["rejected_by_reason"] == {"unsafe_key": 1}
    assert (out / "1" / "x.npz").is_file() and (out / "2" / "x.npz").is_file()
    assert not np.array_equal(np.load(out / "1" / "x.npz")["rgb"], np.load(out / "2" / "x.npz")["rgb"])
    assert not (tmp_path / "evil.npz").exists()


def test_batch_on_the_release_samples(checkpoint, release_samples, tmp_path):
    """Real release photos in class sub-folders (two per folder, linked here), depth beside each, are all
    lifted; the outputs mirror the tree."""
    src = tmp_path / "release"
    images = []
    for folder in sorted(p for p in release_samples.iterdir() if p.is_dir()):
        for image in sorted(folder.glob("*.jpg"))[:2]:
            (src / folder.name).mkdir(parents=True, exist_ok=True)
            for path in (image, image.with_name(f"{image.stem}_depth.png")):
                (src / folder.name / path.name).symlink_to(path)
            images.append(f"{folder.name}/{image.stem}")
    out = tmp_path / "out"
    assert batch(checkpoint, out, "--input", str(src), "--png") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"] == len(images) == summary["written"] >= 2 and summary["rejected"] == 0
    assert sorted(p.relative_to(out).with_suffix("").as_posix() for p in out.rglob("*.png")) == sorted(images)


def test_batch_sheet_is_one_labelled_picture_per_input(checkpoint, folder, tmp_path):
    out = tmp_path / "out"
    assert batch(checkpoint, out, "--input", str(folder), "--sheet", "--resolution", "48", "--grid", "24") == 0
    sheet = np.asarray(Image.open(out / "a.sheet.png"))
    tile = 48 + 2  # 8 tiles with a 2 px gap: input, canonical, 4 novel views, depth, mesh
    assert sheet.shape == (12 + 48, 8 * tile - 2, 3)
    header, body = sheet[:12], sheet[12:].astype(int)
    assert (header == 255).mean() > 0.6 and (header < 128).any()  # labels on white
    from g3dr.assets.inputs import input_from_files, rgbd_from_sample

    # the first column is what the model saw (the input at data.resolution, 32 px), shown at the sheet's size
    rgb, _ = rgbd_from_sample(input_from_files(folder / "a.jpg", folder / "a_depth.png"), 32, 2.0, 4.0)
    seen = ((rgb[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    expected = np.asarray(Image.fromarray(seen).resize((48, 48), Image.Resampling.LANCZOS)).astype(int)
    assert np.abs(body[:, :48] - expected).max() <= 1
    novel = [body[:, (2 + i) * tile:(2 + i) * tile + 48] for i in range(4)]
    assert any(np.abs(novel[0] - v).mean() > 0.5 for v in novel[1:])  # four different cameras
