"""The super-resolution target in the training pipeline (``build_train_loader(target_resolution=T)``): decoded
from the stored larger image (exactly the stored pixels at T, Lanczos from a larger one), flipped with the input,
never upsampled (a DataError naming the command that writes the size, from the manifest and sample by sample)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from g3dr.config import load_config
from g3dr.data import build_train_loader
from g3dr.data.pipeline import ShardStream, TargetSizeError
from g3dr.data.synth import write_synthetic_shards
from g3dr.distributed import DistEnv
from g3dr.errors import DataError

N = 8


def _write(root: Path, name: str, sizes: tuple[int, ...]) -> Path:
    out = root / name
    write_synthetic_shards(str(out), N, sizes, seed=3, shard_size=2, progress=False)
    return out


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sr-target")
    return {"32+64": _write(root, "both", (32, 64)), "32+128": _write(root, "large", (32, 128)),
            "32": _write(root, "small", (32,))}


def _cfg(shards: Path, *overrides: str):
    return load_config("configs/tiny.yaml", ["data.source=shards", f"data.shards={shards}", "data.shuffle_buffer=4",
                                             "train.micro_batch_size=2", "train.global_batch_size=2", *overrides])


def _stored(shards: Path) -> dict[str, dict[str, np.ndarray]]:
    """key -> extension -> the stored image decoded with PIL (independently of the pipeline), uint8 (H, W, 3)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext.endswith("jpg"):
                    image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                    out.setdefault(key, {})[ext] = image
    return out


def _as_float(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1


def _batches(cfg, target: int, n: int = 6) -> list[dict]:
    loader = build_train_loader(cfg, DistEnv(), target_resolution=target)
    it = iter(loader)
    try:
        return [next(it) for _ in range(n)]
    finally:
        loader.close()


def _flipped_or_not(got: torch.Tensor, want: torch.Tensor, atol: float = 0.0) -> bool | None:
    """True when ``got`` equals ``want`` flipped, False when it equals it as is, None when neither."""
    if torch.allclose(got, want, atol=atol, rtol=0):
        return False
    if torch.allclose(got, want.flip(-1), atol=atol, rtol=0):
        return True
    return None


@pytest.mark.parametrize("name,resample", [("32+64", False), ("32+128", True)])
def test_target_is_the_stored_larger_image_flipped_with_the_input(sets, name, resample):
    stored = _stored(sets[name])
    flips = []
    for batch in _batches(_cfg(sets[name]), 64):
        assert batch["rgb"].shape == (2, 3, 32, 32) and batch["rgb_target"].shape == (2, 3, 64, 64)
        assert batch["rgb_target"].dtype == torch.float32
        for i, key in enumerate(batch["key"]):
            large = stored[key]["128.jpg" if resample else "64.jpg"]
            # From a larger image: PIL's Lanczos to 64 (the same resize the input gets); else the stored pixels.
            want = _as_float(large.resize((64, 64), Image.Resampling.LANCZOS) if resample else large)
            target_flip = _flipped_or_not(batch["rgb_target"][i], want)
            input_flip = _flipped_or_not(batch["rgb"][i], _as_float(stored[key]["32.jpg"]))
            assert target_flip is not None and target_flip == input_flip, key
            flips.append(target_flip)
    assert True in flips and False in flips  # both cases were seen (flip_p 0.5, 12 samples)


def test_no_target_unless_asked(sets):
    loader = build_train_loader(_cfg(sets["32+64"]), DistEnv())
    try:
        assert "rgb_target" not in next(iter(loader))
    finally:
        loader.close()


def test_shards_without_the_target_size_fail_from_the_manifest(sets):
    with pytest.raises(TargetSizeError, match=r"stores images at 32 px.*64 px.*never upsampled.*"
                                              r"g3dr prep shards \.\.\. --resolution 32 64"):
        build_train_loader(_cfg(sets["32"]), DistEnv(), target_resolution=64)


def test_shards_without_the_target_size_fail_sample_by_sample_without_a_manifest(sets, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for tar_path in sets["32"].glob("*.tar"):
        shutil.copy(tar_path, bare / tar_path.name)
    cfg = _cfg(bare / "synth-*.tar", f"data.epoch_length={N}")
    loader = build_train_loader(cfg, DistEnv(), target_resolution=64)  # no manifest: nothing to check up front
    try:
        with pytest.raises(DataError, match=r"sample synth_\d+ stores images at 32 px.*--resolution 32 64"):
            next(iter(loader))
    finally:
        loader.close()


def test_an_unsized_image_is_used_only_when_large_enough(tmp_path):
    def shard(side: int) -> Path:
        path = tmp_path / f"unsized-{side}.tar"
        rng = np.random.default_rng(side)
        image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        depth = Image.fromarray(np.full((32, 32), 30000, dtype=np.uint16))
        files = {}
        for ext, pil, fmt in (("png", image, "PNG"), ("depth.png", depth, "PNG")):
            buf = io.BytesIO()
            pil.save(buf, format=fmt)
            files[ext] = buf.getvalue()
        with tarfile.open(path, "w") as tar:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"s0.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path

    def first(side: int) -> dict:
        stream = ShardStream(urls=[str(shard(side))], mode="eval", resolution=32, batch_size=1, target_resolution=64)
        return next(iter(stream))

    assert first(96)["rgb_target"].shape == (1, 3, 64, 64)
    with pytest.raises(TargetSizeError, match="48 px, smaller than the super-resolution target of 64 px"):
        first(48)


def test_the_synthetic_set_is_written_at_both_sizes_and_an_old_one_is_refused(tmp_path):
    from g3dr.data.loader import ensure_synthetic

    cfg = load_config("configs/tiny.yaml", [f"data.synthetic_dir={tmp_path / 'synth'}", "data.synthetic_size=4"])
    folder = Path(ensure_synthetic(cfg, target_resolution=64))
    assert json.loads((folder / "manifest.json").read_text())["source"]["resolutions"] == [32, 64]
    old = load_config("configs/tiny.yaml", [f"data.synthetic_dir={tmp_path / 'old'}", "data.synthetic_size=4"])
    ensure_synthetic(old)  # what g3dr train writes: data.resolution only
    with pytest.raises(TargetSizeError, match=r"synthetic set .*old stores images at 32 px.*delete the old folder"):
        ensure_synthetic(old, target_resolution=64)
