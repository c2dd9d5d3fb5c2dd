"""Inputs that used to be accepted silently and give wrong results: each is now an error (or selects what the user
meant), with a message naming the input and the fix."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from g3dr.launchers.main import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_config_path, helper_module):
    return helper_module("tiny_models").save_perturbed_f_trigen(
        tiny_config_path, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", step=5)


def _image(path, w, h, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _depth(path, w, h, seed=1):
    Image.fromarray(np.random.default_rng(seed).integers(0, 65535, (h, w)).astype(np.uint16)).save(path)
    return path


def test_render_applies_the_checks_of_prep(checkpoint, tmp_path, capsys):
    """A 1x1 image and a depth map of another aspect ratio are rejected by prep; render refuses them the same way."""
    cases = {
        "tiny": (_image(tmp_path / "tiny.png", 1, 1), _depth(tmp_path / "tiny_depth.png", 1, 1),
                 r"1x1 is below --min-size 64 \(too_small\)"),
        "aspect": (_image(tmp_path / "wide.png", 128, 64), _depth(tmp_path / "wide_depth.png", 64, 64),
                   r"depth 64x64 vs image 128x64 \(depth_size_mismatch\)"),
    }
    for name, (image, depth, pattern) in cases.items():
        code = main(["render", "--checkpoint", str(checkpoint), "--image", str(image), "--depth", str(depth),
                     "--device", "cpu", "--png", str(tmp_path / f"{name}-out.png")])
        err = capsys.readouterr().err
        assert code == 2, err
        line = [x for x in err.splitlines() if x.startswith("g3dr render: error: ")]
        assert len(line) == 1 and re.search(rf"{image} \+ {depth}: {pattern}; 'g3dr prep shards' "
                                            r"rejects this input too", line[0]), err
        assert not (tmp_path / f"{name}-out.png").exists()
    # prep rejects the same two inputs for the same reasons
    src = tmp_path / "src"
    src.mkdir()
    for name in ("tiny", "wide"):
        for suffix in (".png", "_depth.png"):
            (src / f"{name}{suffix}").write_bytes((tmp_path / f"{name}{suffix}").read_bytes())
    _image(src / "good.png", 64, 64)
    _depth(src / "good_depth.png", 64, 64)
    assert main(["prep", "shards", "--src", str(src), "--layout", "release", "--out", str(tmp_path / "shards"),
                 "--resolution", "64", "--no-progress"]) == 0
    rejects = [json.loads(line) for line in (tmp_path / "shards" / "rejects.jsonl").read_text().splitlines()]
    assert {r["key"]: r["reason"] for r in rejects} == {"tiny": "too_small", "wide": "depth_size_mismatch"}
    # The same rule lowered on purpose: --min-size 1 lets the 1x1 image through render.
    assert main(["render", "--checkpoint", str(checkpoint), "--image", str(cases["tiny"][0]), "--depth",
                 str(cases["tiny"][1]), "--device", "cpu", "--min-size", "1", "--png", str(tmp_path / "ok.png")]) == 0


def test_shards_without_data_source_is_an_error_naming_it(tmp_path, capsys, checkpoint):
    from g3dr.config import load_config
    from g3dr.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.source: is 'synthetic' but data.shards is set .*add "
                                          r"data.source=shards to train on those shards"):
        load_config("configs/tiny.yaml", ["data.shards=/data/mine/train-{000000..000003}.tar"])
    assert load_config("configs/tiny.yaml", ["data.source=shards", "data.shards=/data/mine"]).data.source == "shards"
    # g3dr train stops before anything starts, with the key to set
    assert main(["train", "--config", "configs/tiny.yaml", f"run_dir={tmp_path / 'run'}",
                 f"data.shards={tmp_path}/train-000000.tar"]) == 2
    assert "add data.source=shards" in capsys.readouterr().err and not (tmp_path / "run").exists()
    # A checkpoint saved before the check, whose stored config names unused shards, still loads (the shards were
    # never used: it trained on the synthetic set).
    import yaml
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from g3dr.models import load_f_trigen

    with safe_open(str(checkpoint), framework="pt") as f:
        metadata = dict(f.metadata())
    stored = yaml.safe_load(metadata["config"])
    stored["data"]["shards"] = "/data/mine/train-{000000..000003}.tar"
    metadata["config"] = yaml.safe_dump(stored)
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(checkpoint)), str(old), metadata=metadata)
    _, cfg, _ = load_f_trigen(old)
    assert cfg.data.source == "synthetic" and cfg.data.shards == ""


def test_prep_refuses_to_overwrite_a_shard_it_did_not_write(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        _image(src / f"p{i}.png", 64, 64, seed=i)
        _depth(src / f"p{i}_depth.png", 64, 64, seed=10 + i)
    out = tmp_path / "out"
    out.mkdir()
    foreign = out / "train-000000.tar"
    foreign.write_bytes(b"another dataset's shard")
    code = main(["prep", "shards", "--src", str(src), "--layout", "release", "--out", str(out), "--resolution", "64",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{foreign} exists but has no record in {out / '_records'}" in err and "mix two datasets" in err
    assert foreign.read_bytes() == b"another dataset's shard"  # untouched
    assert not (out / "manifest.json").exists()


def test_an_empty_dataset_is_an_error_in_prep_and_in_validate(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):  # all below prep's default --min-size 64
        _image(src / f"p{i}.png", 32, 32, seed=i)
        _depth(src / f"p{i}_depth.png", 32, 32, seed=10 + i)
    out = tmp_path / "out"
    code = main(["prep", "shards", "--src", str(src), "--layout", "release", "--out", str(out), "--resolution", "64",
                 "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2
    assert re.search(rf"g3dr prep: error: {out} holds no samples: all 3 inputs were rejected \(too_small: 3\); see "
                     rf"{out / 'rejects.jsonl'}", captured.err), captured.err
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 0  # the record of what happened
    assert main(["prep", "validate", str(out), "--no-progress"]) == 1
    assert "holds no samples" in capsys.readouterr().err
