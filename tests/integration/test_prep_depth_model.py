"""The depth-model backend on a tiny random-weight Depth Anything saved to a local folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from g3dr.launchers.main import main
from g3dr.data.depth_codec import decode_u16_png
from g3dr.data.depth_model import codes_from_prediction
from g3dr.data.synth import synth_sample
from g3dr.data_prep.validate import read_tar_samples


def test_prediction_mapping_is_affine_and_oriented():
    disparity = np.linspace(0.0, 10.0, 101).reshape(1, 101)  # large disparity = near
    codes, degenerate = codes_from_prediction(disparity, inverse=True, percentiles=(0, 100))
    assert not degenerate
    assert codes[0, -1] == 0 and codes[0, 0] == 65535  # nearest -> depth 4, farthest -> depth 6
    assert codes[0, 50] == round(0.5 * 65535)
    depth_codes, _ = codes_from_prediction(disparity, inverse=False, percentiles=(0, 100))
    assert np.abs(depth_codes.astype(int) - (65535 - codes.astype(int))).max() <= 1  # round-half ties
    clipped, _ = codes_from_prediction(disparity, inverse=True)  # 1st/99th percentiles: the ends clip
    assert clipped[0, 0] == 65535 and clipped[0, -1] == 0
    constant, degenerate = codes_from_prediction(np.ones((4, 4)), inverse=True)
    assert degenerate and np.all(constant == 32768)


@pytest.fixture(scope="module")
def tiny_depth_model(tmp_path_factory, helper_module) -> Path:
    pytest.importorskip("transformers", reason="the depth backend needs the 'depth' extra (transformers)")
    return helper_module("tiny_models").save_tiny_depth_anything(
        tmp_path_factory.mktemp("models") / "tiny-depth-anything")


def test_prep_with_depth_model(tiny_depth_model, tmp_path):
    import io

    from PIL import Image

    from g3dr.data.depth_model import DepthEstimator

    src = tmp_path / "imagenet" / "train" / "n01440764"
    src.mkdir(parents=True)
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(synth_sample(2, i, 48)[0]).save(buf, format="JPEG")
        (src / f"n01440764_{i}.JPEG").write_bytes(buf.getvalue())
    (src / "n01440764_9.JPEG").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "shards"
    assert main(["prep", "shards", "--src", str(tmp_path / "imagenet"), "--layout", "imagenet", "--depth-model",
                 str(tiny_depth_model), "--device", "cpu", "--depth-batch", "2", "--out", str(out),
                 "--resolution", "32", "--min-size", "32", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 3 and manifest["rejected_by_reason"] == {"corrupt_image": 1}
    samples = dict(read_tar_samples(out / "train-000000.tar"))
    meta = json.loads(samples["n01440764_1"]["json"])
    assert meta["depth_source"] == "model:depth_anything:tiny-depth-anything"
    assert meta["depth_mapping"]["prediction"] == "inverse_depth" and meta["depth_mapping"]["percentiles"] == [1.0, 99.0]

    # stored codes are exactly the documented mapping of the model's (resized) prediction
    estimator = DepthEstimator(str(tiny_depth_model), device="cpu")
    image = Image.open(io.BytesIO((src / "n01440764_1.JPEG").read_bytes())).convert("RGB")
    prediction = estimator.predict([image], 32)[0]
    assert prediction.std() > 0
    expected, degenerate = codes_from_prediction(prediction, inverse=True)
    assert not degenerate
    stored = decode_u16_png(samples["n01440764_1"]["32.depth.png"]).astype(int)
    assert np.abs(stored - expected).max() <= 1  # batched vs single inference differ in the last float bits
    assert stored.min() == 0 and stored.max() == 65535


def test_missing_model_folder_is_a_weights_error(tmp_path, capsys):
    (tmp_path / "in" / "n0").mkdir(parents=True)
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "in" / "n0" / "a.JPEG")
    rc = main(["prep", "shards", "--src", str(tmp_path / "in"), "--layout", "imagenet", "--depth-model",
               str(tmp_path / "nope"), "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 2 and "no depth model at" in capsys.readouterr().err
