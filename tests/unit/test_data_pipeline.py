"""The shard reading pipeline: URLs, exact eval split, seeded training stream, resume, corrupt samples, flip."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from g3dr.config import load_config
from g3dr.data import build_eval_loader, build_train_loader
from g3dr.data.pipeline import ShardStream, expand_shard_urls
from g3dr.data.synth import write_synthetic_shards
from g3dr.distributed import DistEnv
from g3dr.errors import DataError

N = 24


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "shards"
    write_synthetic_shards(str(out), N, (32,), seed=1, shard_size=3, progress=False)  # 8 shards of 3
    return out


def _cfg(synth_dir: Path, *overrides: str):
    return load_config(None, ["data.source=shards", f"data.shards={synth_dir}", "data.resolution=32",
                              "renderer.plane_resolutions=[32,16]", "model.channel_mults=[1,2]",
                              "train.micro_batch_size=2", "train.global_batch_size=2", "data.shuffle_buffer=8",
                              "data.num_workers=0", *overrides])


def test_expand_urls(tmp_path, synth_dir):
    assert expand_shard_urls("/d/s-{000..002}.tar") == ["/d/s-000.tar", "/d/s-001.tar", "/d/s-002.tar"]
    assert expand_shard_urls("/a/{x,y}.tar,/b/z.tar") == ["/a/x.tar", "/a/y.tar", "/b/z.tar"]
    assert expand_shard_urls("/a/x.tar::/b/{0..1}.tar") == ["/a/x.tar", "/b/0.tar", "/b/1.tar"]
    assert expand_shard_urls(["/a/x.tar", "/b/y.tar"]) == ["/a/x.tar", "/b/y.tar"]
    assert expand_shard_urls("pipe:cat /d/s-{0..1}.tar") == ["pipe:cat /d/s-0.tar", "pipe:cat /d/s-1.tar"]
    folder = expand_shard_urls(str(synth_dir))
    assert len(folder) == 8 and folder[0].endswith("synth-000000.tar")
    with pytest.raises(DataError, match="twice"):
        expand_shard_urls("/a/x.tar,/a/x.tar")
    with pytest.raises(DataError, match="manifest"):
        expand_shard_urls(str(tmp_path))


def _eval_keys(urls, rank, world, workers, few_shards="error") -> list[str]:
    stream = ShardStream(urls=expand_shard_urls(urls), mode="eval", resolution=32, batch_size=2, rank=rank,
                         world_size=world, few_shards=few_shards)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    return [key for batch in loader for key in batch["key"]]


# split by shard (8 >= 2 ranks x 2 workers) and, opted in, by sample (3 < 4: every reader reads all shards)
@pytest.mark.parametrize("num_shards,few_shards", [(8, "error"), (3, "read_all")])
def test_two_ranks_two_workers_see_every_sample_once(synth_dir, num_shards, few_shards):
    urls = expand_shard_urls(str(synth_dir))[:num_shards]
    expected = {f"synth_{i:07d}" for i in range(num_shards * 3)}
    seen = [_eval_keys(urls, rank, 2, 2, few_shards) for rank in range(2)]
    assert not set(seen[0]) & set(seen[1])
    all_keys = seen[0] + seen[1]
    assert len(all_keys) == len(set(all_keys)) == len(expected) and set(all_keys) == expected
    assert all(seen)  # both ranks got work


def test_eval_loader_single_pass_via_config(synth_dir):
    batches = list(build_eval_loader(_cfg(synth_dir), DistEnv()))
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == [f"synth_{i:07d}" for i in range(N)]
    b = batches[0]
    assert b["rgb"].shape == (2, 3, 32, 32) and b["rgb"].dtype == torch.float32
    assert b["depth"].shape == (2, 1, 32, 32) and b["label"].dtype == torch.int64
    assert -1 <= b["rgb"].min() and b["rgb"].max() <= 1 and 4 < b["depth"].min() and b["depth"].max() < 6


def _take(loader, n):
    it = iter(loader)
    batches = [next(it) for _ in range(n)]
    if hasattr(loader, "close"):
        loader.close()
    return batches


def test_train_stream_is_seeded_and_epoch_length_fixed(synth_dir):
    cfg = _cfg(synth_dir)
    loader = build_train_loader(cfg, DistEnv())
    assert len(loader) == N // 2  # manifest samples / world / micro-batch
    assert len(build_train_loader(cfg, DistEnv(rank=1, world_size=2))) == N // 4
    a = _take(loader, 5)
    b = _take(build_train_loader(cfg, DistEnv()), 5)
    for x, y in zip(a, b):
        assert x["key"] == y["key"] and torch.equal(x["rgb"], y["rgb"]) and torch.equal(x["depth"], y["depth"])
    c = _take(build_train_loader(_cfg(synth_dir, "train.seed=7"), DistEnv()), 5)
    assert [x["key"] for x in a] != [x["key"] for x in c]
    other_rank = _take(build_train_loader(cfg, DistEnv(rank=1, world_size=2)), 5)
    assert [x["key"] for x in a] != [x["key"] for x in other_rank]
    assert set().union(*[x.keys() for x in a]) == {"rgb", "depth", "label", "key"}


def test_resume_position_is_exact_across_workers_and_epochs(synth_dir):
    cfg = _cfg(synth_dir, "data.num_workers=2", "data.epoch_length=10")  # 5 batches per epoch
    reference = _take(build_train_loader(cfg, DistEnv()), 9)
    first = build_train_loader(cfg, DistEnv())
    it = iter(first)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = build_train_loader(cfg, DistEnv())
    resumed.load_state_dict(state)
    rest = _take(resumed, 6)  # 2 more of epoch 0, then 4 of epoch 1
    for x, y in zip(reference[3:], rest):
        assert x["key"] == y["key"] and torch.equal(x["rgb"], y["rgb"])
    assert resumed.epoch == 1


def test_joint_flip_flips_image_and_depth_together(synth_dir):
    urls = expand_shard_urls(str(synth_dir))
    plain = ShardStream(urls=urls, mode="train", resolution=32, batch_size=4, seed=3, flip_p=0.0, batches_per_epoch=1)
    flipped = ShardStream(urls=urls, mode="train", resolution=32, batch_size=4, seed=3, flip_p=1.0, batches_per_epoch=1)
    a, b = next(iter(plain)), next(iter(flipped))
    assert a["key"] == b["key"]
    assert torch.equal(b["rgb"], a["rgb"].flip(-1)) and torch.equal(b["depth"], a["depth"].flip(-1))
    assert not torch.equal(a["rgb"], b["rgb"])
    half = ShardStream(urls=urls, mode="train", resolution=32, batch_size=24, seed=3, flip_p=0.5, batches_per_epoch=1)
    c = next(iter(half))
    plain24 = next(iter(ShardStream(urls=urls, mode="train", resolution=32, batch_size=24, seed=3, flip_p=0.0, batches_per_epoch=1)))
    n_flipped = sum(not torch.equal(x, y) for x, y in zip(c["rgb"], plain24["rgb"]))
    assert 4 <= n_flipped <= 20


def _member(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def test_corrupt_samples_are_skipped_counted_and_logged(synth_dir, tmp_path, caplog):
    good = next(iter(ShardStream(urls=[str(synth_dir / "synth-000000.tar")], mode="eval", resolution=32, batch_size=1)))
    assert good["key"] == ["synth_0000000"]
    src = tarfile.open(synth_dir / "synth-000000.tar")
    members = {m.name: src.extractfile(m).read() for m in src}
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for name, payload in members.items():
            _member(tar, name, payload)
        _member(tar, "broken_jpeg.32.jpg", members["synth_0000000.32.jpg"][:100])
        _member(tar, "broken_jpeg.32.depth.png", members["synth_0000000.32.depth.png"])
        _member(tar, "no_depth.32.jpg", members["synth_0000000.32.jpg"])
        buf = io.BytesIO()
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(buf, format="PNG")
        _member(tar, "eight_bit.32.jpg", members["synth_0000000.32.jpg"])
        _member(tar, "eight_bit.32.depth.png", buf.getvalue())
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(bad.read_bytes()[: bad.stat().st_size * 3 // 5])  # a stream cut mid-way
    stream = ShardStream(urls=[str(bad), str(truncated)], mode="eval", resolution=32, batch_size=2)
    with caplog.at_level("WARNING", logger="g3dr.data"):
        keys = [k for batch in stream for k in batch["key"]]
    assert keys[:3] == ["synth_0000000", "synth_0000001", "synth_0000002"]
    assert stream.skipped["undecodable_sample"] >= 3
    assert stream.counts.shard_errors == {"truncated_shard": 1} and stream.skipped["incomplete_sample"] == 1
    assert "data problem (undecodable_sample)" in caplog.text


def test_depth_is_exact_at_the_stored_resolution(synth_dir):
    import tarfile as tf

    from g3dr.data.depth_codec import decode_u16_png

    with tf.open(synth_dir / "synth-000001.tar") as tar:
        codes = {m.name.split(".")[0]: decode_u16_png(tar.extractfile(m).read()) for m in tar if m.name.endswith("depth.png")}
    batch = next(iter(ShardStream(urls=[str(synth_dir / "synth-000001.tar")], mode="eval", resolution=32, batch_size=3)))
    for key, depth in zip(batch["key"], batch["depth"]):
        expected = (codes[key].astype(np.float64) / 65536 * 2 + 4).astype(np.float32)
        np.testing.assert_array_equal(depth[0].numpy(), expected)


def test_lanczos_resize_matches_pil_on_release_data(release_samples, tmp_path):
    from g3dr.launchers.main import main

    out = tmp_path / "rel"
    assert main(["prep", "shards", "--src", str(release_samples / "1"), "--layout", "release", "--out", str(out),
                 "--resolution", "256", "--no-progress"]) == 0
    batch = next(iter(ShardStream(urls=expand_shard_urls(str(out)), mode="eval", resolution=128, batch_size=2)))
    for key, rgb, depth in zip(batch["key"], batch["rgb"], batch["depth"]):
        image = Image.open(release_samples / "1" / f"{key}.jpg").convert("RGB").resize((128, 128), Image.Resampling.LANCZOS)
        np.testing.assert_allclose(rgb.numpy(), np.asarray(image, np.float32).transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)
        codes = np.array(Image.open(release_samples / "1" / f"{key}_depth.png")).astype(np.float32)
        ref = np.asarray(Image.fromarray(codes, mode="F").resize((128, 128), Image.Resampling.LANCZOS), np.float64)
        np.testing.assert_allclose(depth[0].numpy(), np.clip(ref, 0, 65535) / 65536 * 2 + 4, atol=1e-5)
        assert 4 <= depth.min() and depth.max() <= 6


def test_synthetic_source_is_created_on_first_use(tmp_path, tiny_config_path):
    folder = tmp_path / "syn"
    cfg = load_config(tiny_config_path, [f"data.synthetic_dir={folder}", "data.synthetic_size=8"])
    loader = build_train_loader(cfg, DistEnv())
    batch = next(iter(loader))
    assert (folder / "manifest.json").is_file() and len(loader) == 4
    assert batch["rgb"].shape == (2, 3, cfg.data.resolution, cfg.data.resolution)
    assert sorted(k for b in build_eval_loader(cfg, DistEnv()) for k in b["key"]) == [f"synth_{i:07d}" for i in range(8)]
    with pytest.raises(DataError, match="synthetic_size"):
        build_train_loader(load_config(tiny_config_path, [f"data.synthetic_dir={folder}", "data.synthetic_size=9"]), DistEnv())


def test_pipe_urls_read_like_local_paths(synth_dir):
    keys = _eval_keys(f"pipe:cat {synth_dir}/synth-00000{{0..1}}.tar", 0, 1, 0)
    assert keys == [f"synth_{i:07d}" for i in range(6)]
    stream = ShardStream(urls=["pipe:cat /nonexistent/x.tar"], mode="eval", resolution=32, batch_size=2)
    assert list(stream) == [] and stream.counts.shard_errors == {"unreadable_shard": 1} and not stream.skipped


def test_close_stops_the_worker_processes(synth_dir):
    import multiprocessing

    others = set(multiprocessing.active_children())
    loader = build_train_loader(_cfg(synth_dir, "data.num_workers=2"), DistEnv())
    it = iter(loader)
    next(it)
    assert len(set(multiprocessing.active_children()) - others) == 2
    before = loader.state_dict()
    loader.close()
    assert not set(multiprocessing.active_children()) - others
    assert loader.state_dict() == before  # closing does not move the position


def test_eval_loader_with_workers_finishes_compact_batches(synth_dir):
    batches = list(build_eval_loader(_cfg(synth_dir), DistEnv(), num_workers=2, batch_size=5))
    assert sorted(k for b in batches for k in b["key"]) == [f"synth_{i:07d}" for i in range(N)]
    for b in batches:
        assert set(b) == {"rgb", "depth", "label", "key"}
        assert b["rgb"].dtype == torch.float32 and -1 <= b["rgb"].min() and b["rgb"].max() <= 1
        assert b["depth"].dtype == torch.float32 and 4 <= b["depth"].min() and b["depth"].max() < 6


def test_decode_sample_public_api(synth_dir):
    from g3dr.data.pipeline import decode_sample
    from g3dr.data.tar_reader import iter_samples

    with open(synth_dir / "synth-000000.tar", "rb") as f:
        raw = next(iter_samples(f))
    out = decode_sample(raw, 32, depth_scale=1.0, depth_offset=0.0)
    assert out["rgb"].dtype == torch.uint8 and out["rgb"].shape == (3, 32, 32)
    assert out["depth"].shape == (1, 32, 32) and 0 <= out["depth"].min() and out["depth"].max() < 1
    assert out["key"] == "synth_0000000" and isinstance(out["label"], int)


# ------------------------------------------------------------------ stored novel views


@pytest.fixture(scope="module")
def views_dir(tmp_path_factory) -> Path:
    from g3dr.data.synth import ViewSpec

    out = tmp_path_factory.mktemp("synth_views") / "shards"
    write_synthetic_shards(str(out), 6, (32,), seed=2, shard_size=2, progress=False, views=ViewSpec(count=2))
    return out


def _views_cfg(folder: Path, *overrides: str):
    return _cfg(folder, *overrides)


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_loader_carries_the_stored_views(views_dir, workers, caplog):
    from g3dr.data.synth import ViewSpec, synth_views

    batches = list(build_eval_loader(_views_cfg(views_dir), DistEnv(), batch_size=4, num_workers=workers,
                                     view_resolution=32))
    by_key = {}
    for b in batches:
        v = b["views"]
        n = len(b["key"])
        assert v["rgb"].shape == (n, 2, 3, 32, 32) and v["rgb"].dtype == torch.float32
        assert v["depth"].shape == v["valid"].shape == (n, 2, 32, 32) and v["valid"].dtype == torch.bool
        assert v["yaw"].shape == v["pitch"].shape == (n, 2) and v["yaw"].dtype == torch.float64
        assert v["radius"].tolist() == [5.0] * n and v["fov_degrees"].tolist() == [18.0] * n
        for j, key in enumerate(b["key"]):
            by_key[key] = {name: value[j] for name, value in v.items()}
    assert sorted(by_key) == [f"synth_{i:07d}" for i in range(6)]
    direct = synth_views(2, 4, 32, ViewSpec(count=2))
    got = by_key["synth_0000004"]
    torch.testing.assert_close(got["rgb"], torch.from_numpy(direct["rgb"]).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert torch.equal(got["valid"], torch.from_numpy(direct["valid"]))
    np.testing.assert_allclose(got["depth"].numpy()[direct["valid"]], direct["depth"][direct["valid"]], atol=4e-5)
    assert torch.isinf(got["depth"][~got["valid"]]).all()
    np.testing.assert_array_equal(got["yaw"].numpy(), direct["yaw"])
    # without view_resolution the eval batches carry no views; at a size that is not stored, the sample is
    # skipped with a reason that names the stored sizes (g3dr eval checks the manifest before that)
    assert all("views" not in b for b in build_eval_loader(_views_cfg(views_dir), DistEnv()))
    with pytest.raises(DataError, match="undecodable_sample"):
        list(build_eval_loader(_views_cfg(views_dir, "data.max_skip_fraction=0.1", "data.skip_check_min_samples=1"),
                               DistEnv(), num_workers=0, view_resolution=64))
    assert "stores its views at [32] px, not at 64 px" in caplog.text


def test_training_never_decodes_the_views(views_dir, monkeypatch):
    import g3dr.data.pipeline as pipeline

    def boom(*_):
        raise AssertionError("the training stream decoded the stored views")

    monkeypatch.setattr(pipeline, "decode_views", boom)
    batch = _take(build_train_loader(_views_cfg(views_dir), DistEnv()), 1)[0]
    assert "views" not in batch and batch["rgb"].shape == (2, 3, 32, 32)
    stream = ShardStream(urls=expand_shard_urls(str(views_dir)), mode="train", resolution=32, batch_size=2,
                         batches_per_epoch=1, view_resolution=32)  # ignored outside eval mode
    assert "views" not in next(iter(stream))


def test_synthetic_auto_prep_writes_views_and_checks_them_on_reuse(tmp_path, tiny_config_path):
    import json

    folder = tmp_path / "syn"
    base = [f"data.synthetic_dir={folder}", "data.synthetic_size=8"]
    cfg = load_config(tiny_config_path, [*base, "data.synthetic_views=2", "data.synthetic_view_cameras=video"])
    batches = list(build_eval_loader(cfg, DistEnv(), view_resolution=32))
    assert sum(len(b["key"]) for b in batches) == 8 and batches[0]["views"]["rgb"].shape[1] == 2
    source = json.loads((folder / "manifest.json").read_text())["source"]
    assert source["views"] == 2 and source["view_cameras"] == "video"
    build_eval_loader(cfg, DistEnv())  # same settings: reused
    for other in (["data.synthetic_views=0"], ["data.synthetic_views=3", "data.synthetic_view_cameras=video"],
                  ["data.synthetic_views=2"], ["data.synthetic_views=2", "data.synthetic_view_cameras=video",
                                               "camera.video_yaw=0.5"]):
        with pytest.raises(DataError, match="synthetic_dir"):
            build_eval_loader(load_config(tiny_config_path, [*base, *other]), DistEnv())
    with pytest.raises(Exception, match="synthetic_views"):
        load_config(tiny_config_path, [*base, "data.synthetic_views=-1"])
