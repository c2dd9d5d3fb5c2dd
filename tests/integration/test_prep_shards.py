"""``g3dr prep shards`` / ``validate`` / ``synth`` end to end on real, synthetic and broken inputs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from g3dr.launchers.main import main
from g3dr.data.depth_codec import decode_u16_png, encode_u16_png
from g3dr.data.synth import synth_sample
from g3dr.data_prep.validate import read_tar_samples, validate_folder
from g3dr.errors import DataError


def _jpeg(array: np.ndarray, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(array)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _depth(shape, value=30000) -> bytes:
    return encode_u16_png(np.full(shape, value, dtype=np.uint16))


def make_broken_release_folder(root: Path) -> dict[str, str]:
    """A release-layout folder: 4 good, CMYK, grayscale, non-square, half-size depth (all written), and 6 broken inputs.

    Returns {stem: expected reject reason} for the broken ones.
    """
    root.mkdir(parents=True)
    for i in range(4):
        rgb, depth, _, _ = synth_sample(0, i, 64)
        (root / f"good{i}.jpg").write_bytes(_jpeg(rgb))
        (root / f"good{i}_depth.png").write_bytes(encode_u16_png(np.rint((depth - 4) / 2 * 65536).astype(np.uint16)))
    rgb = synth_sample(0, 9, 64)[0]
    (root / "cmyk.jpg").write_bytes(_jpeg(rgb, "CMYK"))
    (root / "cmyk_depth.png").write_bytes(_depth((64, 64)))
    (root / "gray.jpg").write_bytes(_jpeg(rgb, "L"))
    (root / "gray_depth.png").write_bytes(_depth((64, 64)))
    (root / "halfdepth.jpg").write_bytes(_jpeg(rgb))  # depth at half size, same aspect: resized, kept
    (root / "halfdepth_depth.png").write_bytes(_depth((32, 32), 12345))
    wide = np.concatenate([rgb, rgb[:, :16]], axis=1)  # 80x64
    (root / "wide.jpg").write_bytes(_jpeg(wide))
    (root / "wide_depth.png").write_bytes(_depth((64, 80)))

    full = _jpeg(rgb)
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "truncated_depth.png").write_bytes(_depth((64, 64)))
    (root / "nodepth.jpg").write_bytes(full)
    (root / "eightbit.jpg").write_bytes(full)
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64), 100, np.uint8)).save(buf, format="PNG")
    (root / "eightbit_depth.png").write_bytes(buf.getvalue())
    (root / "tiny.jpg").write_bytes(_jpeg(rgb[:32, :32]))
    (root / "tiny_depth.png").write_bytes(_depth((32, 32)))
    (root / "mismatch.jpg").write_bytes(full)
    (root / "mismatch_depth.png").write_bytes(_depth((64, 32)))
    (root / "baddepth.jpg").write_bytes(full)
    (root / "baddepth_depth.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return {"truncated": "corrupt_image", "nodepth": "missing_depth", "eightbit": "depth_not_16bit",
            "tiny": "too_small", "mismatch": "depth_size_mismatch", "baddepth": "corrupt_depth"}


def test_broken_inputs_are_rejected_counted_and_reconciled(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    expected = make_broken_release_folder(src)
    rc = main(["prep", "shards", "--src", str(src), "--layout", "release", "--out", str(out), "--resolution", "32", "64",
               "--shard-size", "5", "--workers", "2", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_inputs"] == 14
    assert manifest["num_samples"] == 8 and summary["total_samples"] == 8
    assert manifest["num_rejected"] == 6
    assert manifest["num_samples"] + manifest["num_rejected"] == manifest["num_inputs"]
    assert manifest["rejected_by_reason"] == {r: 1 for r in expected.values()}
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {r["key"]: r["reason"] for r in rejects} == expected
    assert manifest["num_shards"] == 3 and sum(s["samples"] for s in manifest["shards"]) == 8

    samples = {key: files for shard in manifest["shards"] for key, files in read_tar_samples(out / shard["name"])}
    assert set(samples) == {"good0", "good1", "good2", "good3", "cmyk", "gray", "wide", "halfdepth"}
    np.testing.assert_array_equal(decode_u16_png(samples["halfdepth"]["64.depth.png"]), 12345)
    for key in ("cmyk", "gray"):
        meta = json.loads(samples[key]["json"])
        assert meta["converted_to_rgb"] and meta["orig_mode"] in ("CMYK", "L")
        assert Image.open(io.BytesIO(samples[key]["64.jpg"])).mode == "RGB"
    wide = json.loads(samples["wide"]["json"])
    assert wide["orig_size"] == [80, 64] and wide["crop"] == [8, 0, 72, 64]
    assert Image.open(io.BytesIO(samples["wide"]["32.jpg"])).size == (32, 32)
    assert decode_u16_png(samples["wide"]["32.depth.png"]).shape == (32, 32)

    problems, _ = validate_folder(out, progress=False)
    assert problems == []


def test_release_samples_pass_through_exactly_and_validate(release_samples, tmp_path):
    out = tmp_path / "shards"
    assert main(["prep", "shards", "--src", str(release_samples), "--layout", "release", "--out", str(out),
                 "--resolution", "256", "--shard-size", "10", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_inputs"] == 24 and manifest["num_samples"] == 24 and manifest["num_rejected"] == 0
    samples = dict(kv for shard in manifest["shards"] for kv in read_tar_samples(out / shard["name"]))
    for key in ("1/1551", "2/n02085620_8590"):
        # stored at the source resolution: the JPEG bytes are the original ones, the depth codes identical
        assert samples[key]["256.jpg"] == (release_samples / f"{key}.jpg").read_bytes()
        original = np.array(Image.open(release_samples / f"{key}_depth.png"))
        np.testing.assert_array_equal(decode_u16_png(samples[key]["256.depth.png"]), original)
    assert main(["prep", "validate", str(out), "--no-progress"]) == 0


def test_resume_slurm_split_and_determinism(tmp_path):
    out = tmp_path / "syn"
    args = ["prep", "synth", "--out", str(out), "--n", "9", "--resolution", "16", "--shard-size", "2", "--no-progress"]
    from g3dr.data.shard_writer import JobSpec, run_shard_job
    from g3dr.data.shard_writer import StoreOptions
    from g3dr.data.synth import SyntheticSource

    source = SyntheticSource(n=9, options=StoreOptions(resolutions=(16,)))
    # job 0 of 2 writes shards 0, 2, 4: no manifest yet
    first = run_shard_job(source, JobSpec(out=str(out), shard_size=2, prefix="synth", shard_index=0, num_jobs=2), progress=False)
    assert first.written_shards == 3 and first.manifest is None and not (out / "manifest.json").exists()
    second = run_shard_job(source, JobSpec(out=str(out), shard_size=2, prefix="synth", shard_index=1, num_jobs=2), progress=False)
    assert second.written_shards == 2 and second.manifest is not None
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 9 and manifest["num_shards"] == 5

    # a rerun skips everything; a deleted shard is rewritten with identical bytes (deterministic)
    (out / "synth-000003.tar").unlink()
    (out / ".synth-000001.tar.tmp-999").write_bytes(b"partial")  # a killed run's leftover is ignored
    assert main(args) == 0
    sha = {s["name"]: s["sha256"] for s in json.loads((out / "manifest.json").read_text())["shards"]}
    assert sha == {s["name"]: s["sha256"] for s in manifest["shards"]}
    assert validate_folder(out, progress=False)[0] == []

    # other options on the same folder: refused, not mixed - also when the job's own shards are new
    assert main(["prep", "synth", "--out", str(out), "--n", "9", "--resolution", "32", "--shard-size", "2", "--no-progress"]) == 2
    other = SyntheticSource(n=9, options=StoreOptions(resolutions=(16,)), seed=5)
    (out / "synth-000001.tar").unlink()
    with pytest.raises(DataError, match="different plan"):
        run_shard_job(other, JobSpec(out=str(out), shard_size=2, prefix="synth", shard_index=1, num_jobs=5), progress=False)


def test_validate_reports_corruption(tmp_path):
    out = tmp_path / "syn"
    assert main(["prep", "synth", "--out", str(out), "--n", "4", "--resolution", "16", "--shard-size", "2", "--no-progress"]) == 0
    shard = out / "synth-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the first member's payload
    shard.write_bytes(bytes(data))
    problems, summary = validate_folder(out, progress=False)
    assert any("sha256" in p for p in problems)
    assert main(["prep", "validate", str(out), "--no-progress"]) == 1

    # a member that is not a decodable image is reported as such
    with tarfile.open(shard, "w") as tar:
        for name, payload in (("synth_0000002.16.jpg", b"not a jpeg"), ("synth_0000002.16.depth.png", b"x"),
                              ("synth_0000002.cls", b"1"), ("synth_0000002.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    (out / "synth-000099.tar").write_bytes(b"")
    problems, _ = validate_folder(out, progress=False)
    assert any("does not decode" in p for p in problems)
    assert any("synth-000099.tar: in the folder but not in the manifest" in p for p in problems)
    assert any("1 samples, manifest says 2" in p for p in problems)


def test_no_inputs_is_a_clear_error(tmp_path, capsys):
    rc = main(["prep", "shards", "--src", str(tmp_path), "--layout", "release", "--out", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2 and "no input images" in capsys.readouterr().err


def test_imagenet_layout_with_depth_src(tmp_path):
    src, depth_src, out = tmp_path / "in", tmp_path / "depth", tmp_path / "out"
    wnids = ["n01440764", "n01443537"]
    for c, wnid in enumerate(wnids):
        (src / "train" / wnid).mkdir(parents=True)
        (depth_src / wnid).mkdir(parents=True)
        for i in range(2):
            rgb = synth_sample(1, c * 2 + i, 64)[0]
            (src / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(_jpeg(rgb))
            if not (c == 1 and i == 1):
                (depth_src / wnid / f"{wnid}_{i}.png").write_bytes(_depth((64, 64), 1000 * (c + 1)))
    assert main(["prep", "shards", "--src", str(src), "--layout", "imagenet", "--depth-src", str(depth_src),
                 "--out", str(out), "--resolution", "32", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 3 and manifest["rejected_by_reason"] == {"missing_depth": 1}
    assert manifest["source"]["synsets"] == wnids
    samples = dict(read_tar_samples(out / "train-000000.tar"))
    assert int(samples["n01443537_0"]["cls"]) == 1 and int(samples["n01440764_1"]["cls"]) == 0
    assert json.loads(samples["n01443537_0"]["json"])["synset"] == "n01443537"
    np.testing.assert_array_equal(decode_u16_png(samples["n01443537_0"]["32.depth.png"]), 2000)


def test_shards_are_identical_whatever_the_worker_count(tmp_path):
    manifests = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        assert main(["prep", "synth", "--out", str(out), "--n", "6", "--resolution", "32", "--shard-size", "2",
                     "--workers", str(workers), "--no-progress"]) == 0
        manifests.append(json.loads((out / "manifest.json").read_text()))
    assert [s["sha256"] for s in manifests[0]["shards"]] == [s["sha256"] for s in manifests[1]["shards"]]
    assert manifests[0]["fingerprint"] == manifests[1]["fingerprint"]


def test_release_labels_from_a_synset_list(release_samples, tmp_path):
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("n01440764 tench\nn02085620 Chihuahua\nn02086079 Pekinese\n")
    out = tmp_path / "shards"
    assert main(["prep", "shards", "--src", str(release_samples / "2"), "--layout", "release", "--out", str(out),
                 "--synsets", str(synsets), "--resolution", "64", "--no-progress"]) == 0
    samples = dict(read_tar_samples(out / "train-000000.tar"))
    assert int(samples["n02085620_8590"]["cls"]) == 1 and int(samples["n02086079_3346"]["cls"]) == 2
    assert int(samples["11543"]["cls"]) == -1  # no synset in the name: unknown
    assert int(samples["n02089867_8842"]["cls"]) == -1  # synset not in the list
    assert json.loads(samples["n02089867_8842"]["json"])["synset"] == "n02089867"


def test_stock_webdataset_reads_our_shards(tmp_path):
    import webdataset as wds

    out = tmp_path / "syn"
    assert main(["prep", "synth", "--out", str(out), "--n", "5", "--resolution", "32", "--shard-size", "3", "--no-progress"]) == 0
    dataset = wds.WebDataset(str(out / "synth-{000000..000001}.tar"), shardshuffle=False)
    samples = list(dataset)
    assert [s["__key__"] for s in samples] == [f"synth_{i:07d}" for i in range(5)]
    assert {k for k in samples[0] if not k.startswith("__")} == {"32.jpg", "32.depth.png", "cls", "json"}
    np.testing.assert_array_equal(decode_u16_png(samples[0]["32.depth.png"]).shape, (32, 32))


def test_webp_storage_validates_and_loads(tmp_path):
    from g3dr.data.pipeline import ShardStream, expand_shard_urls

    out = tmp_path / "webp"
    assert main(["prep", "synth", "--out", str(out), "--n", "3", "--resolution", "64", "32", "--format", "webp",
                 "--no-progress"]) == 0
    assert validate_folder(out, progress=False)[0] == []
    assert {k for _, files in read_tar_samples(out / "synth-000000.tar") for k in files} >= {"64.webp", "32.webp"}
    batch = next(iter(ShardStream(urls=expand_shard_urls(str(out)), mode="eval", resolution=32, batch_size=3)))
    assert batch["rgb"].shape == (3, 3, 32, 32) and batch["depth"].shape == (3, 1, 32, 32)
