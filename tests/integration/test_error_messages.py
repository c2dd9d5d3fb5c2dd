"""Errors that used to mislead (a missing manifest for a pattern that matches nothing, "does not exist" for a
folder that exists, a KeyError traceback for a text file, ``<_io.BytesIO object at 0x...>`` for a file name): each
is one line naming the input and the fix."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from g3dr.launchers.main import main


def _error_line(err: str, command: str) -> str:
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith(f"g3dr {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("pattern", ["train-{000000..000003}.tar", "train-*.tar", "nowhere/train-{0..3}.tar"])
def test_a_shard_pattern_that_matches_nothing_says_so(tmp_path, pattern):
    from g3dr.config import load_config
    from g3dr.data import build_train_loader
    from g3dr.distributed import DistEnv
    from g3dr.errors import DataError

    (tmp_path / "other-000000.tar").write_bytes(b"")  # the folder exists and holds something else
    spec = f"{tmp_path}/{pattern}"
    cfg = load_config("configs/tiny.yaml", ["data.source=shards", f"data.shards={spec}"])
    with pytest.raises(DataError, match=r"shard pattern .* \(data.shards / --data\) matches no file") as err:
        build_train_loader(cfg, DistEnv())
    assert "manifest.json beside the shards" not in str(err.value)  # the old, wrong diagnosis
    assert spec in str(err.value)


def test_a_glob_selects_the_shards_it_matches(tmp_path):
    from g3dr.data.pipeline import expand_existing_shard_urls

    for name in ("train-000001.tar", "train-000000.tar", "val-000000.tar"):
        (tmp_path / name).write_bytes(b"")
    assert expand_existing_shard_urls(f"{tmp_path}/train-*.tar") == [f"{tmp_path}/train-00000{i}.tar" for i in (0, 1)]
    # some missing names of a pattern are left to the readers (skipped and counted as a lost shard)
    assert len(expand_existing_shard_urls(f"{tmp_path}/train-{{000000..000002}}.tar")) == 3


def test_eval_data_pattern_that_matches_nothing(tmp_path, tiny_config_path, helper_module, capsys):
    checkpoint = helper_module("tiny_models").save_perturbed_f_trigen(tiny_config_path, tmp_path / "t.safetensors", 1)
    code = main(["eval", "--checkpoint", str(checkpoint), "--data", f"{tmp_path}/shards-*.tar", "--metrics", "nfs",
                 "--out", str(tmp_path / "eval"), "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}", "--no-progress"])
    line = _error_line(capsys.readouterr().err, "eval")
    assert code == 2 and "matches no file" in line and "shards-*.tar" in line


def test_a_training_checkpoint_folder_given_as_checkpoint_names_the_export_command(tmp_path, capsys):
    from g3dr.config import load_config
    from g3dr.models import load_f_trigen
    from g3dr.train.trainer import train

    run = tmp_path / "run"
    train(load_config("configs/tiny.yaml", [f"run_dir={run}", f"data.synthetic_dir={tmp_path / 'syn'}",
                                            "train.total_steps=1", "train.image_every=0"]), export=False)
    step = run / "checkpoints" / "step-1"
    image = tmp_path / "i.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    Image.fromarray(np.full((64, 64), 30000, np.uint16)).save(tmp_path / "d.png")
    code = main(["render", "--checkpoint", str(step), "--image", str(image), "--depth", str(tmp_path / "d.png"),
                 "--device", "cpu", "--png", str(tmp_path / "o.png")])
    line = _error_line(capsys.readouterr().err, "render")
    export = run / "exports" / "step-1.safetensors"
    assert code == 2 and "does not exist" not in line
    assert f"{step} is a training checkpoint folder (DeepSpeed), not an f_trigen .safetensors file; export it " \
           f"first: g3dr export {step} {export}" in line
    # The command it names works, and its output is what render, eval and the asset commands read.
    assert main(["export", str(step)]) == 0
    model, cfg, meta = load_f_trigen(export)
    assert meta["step"] == 1 and meta["source"] == "train" and meta.get("mlflow_run_id")


def test_import_official_of_text_or_random_bytes_is_one_line(tmp_path, capsys, tiny_config_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello, this is not a checkpoint\n")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    junk_pt = tmp_path / "junk.pt"
    junk_pt.write_bytes(b"\x80\x02" + junk.read_bytes()[:100])  # looks like a pickle, is not one
    expected = {text: rf"{text} is a text file, not a torch checkpoint; expected the G3DR release's "
                      r"checkpoint_generic.pt",
                junk: rf"{junk} is not a torch checkpoint \(first bytes [0-9a-f]{{16}}\); expected",
                junk_pt: rf"{junk_pt} is a torch/pickle file that cannot be read as a checkpoint \(.*\); if it comes "
                         r"from a trusted source, --allow-pickle"}
    for src, pattern in expected.items():
        code = main(["import-official", "--config", str(tiny_config_path), str(src), str(tmp_path / "out.safetensors")])
        line = _error_line(capsys.readouterr().err, "import-official")
        assert code == 2 and re.search(pattern, line), line
    assert not (tmp_path / "out.safetensors").exists()


def test_a_rejected_non_image_is_named_not_its_buffer(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.jpg").write_text("not an image")
    Image.fromarray(np.full((64, 64), 30000, np.uint16)).save(src / "notes_depth.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(src / "ok.png")
    Image.fromarray(np.full((64, 64), 30000, np.uint16)).save(src / "ok_depth.png")
    assert main(["prep", "shards", "--src", str(src), "--layout", "release", "--out", str(tmp_path / "out"),
                 "--resolution", "64", "--no-progress"]) == 0
    (reject,) = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert reject["reason"] == "corrupt_image" and "BytesIO" not in reject["detail"]
    assert reject["detail"].startswith("notes.jpg: not an image file PIL can read")
