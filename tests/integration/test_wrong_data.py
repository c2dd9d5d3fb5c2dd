"""Inputs that used to be accepted silently and give wrong results: each is now an error (or selects what the user
meant), with a message naming the input and the fix."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from g3dr.cli import main


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
