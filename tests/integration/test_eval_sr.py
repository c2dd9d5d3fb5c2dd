"""``g3dr eval`` through the super-resolution stage, end to end on a sqlite MLflow store (tiny config, 32 -> 64 px,
random-weight tiny RCANs): the FID reference statistics are those of the 64 px images the shards store (checked
against statistics computed straight from the tar files), the SR file's sha256 is part of the eval's identity
(output folder, eval hash, params, tags, results.json), NFS and DA do not change with it, and the errors are clear."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from g3dr.launchers.main import main
from g3dr.data.synth import write_synthetic_shards
from g3dr.distributed import DistEnv
from g3dr.errors import ConfigError, DataError
from g3dr.eval import evaluate as evaluate_module
from g3dr.eval.evaluate import EvalSpec
from g3dr.eval.runner import EvalOptions, Evaluator, checkpoint_ref
from g3dr.metrics.inception import load_inception
from g3dr_test_support import load_test_helper

fx = load_test_helper("eval_fixtures")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Shards stored at 32 and 64 px, shards at 32 px only, two tiny RCAN x2 files, a tiny f_trigen checkpoint and the
    same weights saved with a config that names the first RCAN as sr.checkpoint."""
    root = tmp_path_factory.mktemp("eval_sr")
    both, small = root / "both", root / "small"
    write_synthetic_shards(str(both), 8, (32, 64), seed=3, shard_size=4, progress=False)
    write_synthetic_shards(str(small), 8, (32,), seed=3, shard_size=4, progress=False)
    cfg = fx.tiny_config(root, "data.source=shards", f"data.shards={both}")
    fx.make_inception(cfg)
    ck = fx.make_checkpoint(cfg, root / "run" / "f_trigen.safetensors", step=7)
    tiny = load_test_helper("tiny_models")
    sr_a = tiny.save_tiny_sr(root / "sr-a.safetensors", seed=0)
    sr_b = tiny.save_tiny_sr(root / "sr-b.safetensors", seed=1)
    with_sr = fx.tiny_config(root, "data.source=shards", f"data.shards={both}", f"sr.checkpoint={sr_a}")
    ck_sr = fx.make_checkpoint(with_sr, root / "run-sr" / "f_trigen.safetensors", step=7)
    return {"root": root, "both": both, "small": small, "cfg": cfg, "ck": ck, "ck_sr": ck_sr, "sr_a": sr_a,
            "sr_b": sr_b}


def _options(s: dict, *overrides: str) -> EvalOptions:
    return EvalOptions(out_dir=s["root"] / "eval", mlflow_uri=f"sqlite:///{s['root'] / 'mlflow.db'}",
                       experiment="eval-sr", tracking_base=s["root"], progress=False, retry_wait_s=0.05,
                       overrides=("eval.sigma_scales=[1.0]", "eval.views=[novel]", "eval.num_samples=6",
                                  "eval.fid_samples=6", "eval.is_splits=2", *overrides))


def _stored_images(folder: Path, size: int) -> torch.Tensor:
    """Every ``<key>.<size>.jpg`` in the tar shards of ``folder``, decoded by PIL alone (no data pipeline)."""
    images = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(f".{size}.jpg"):
                    with Image.open(io.BytesIO(tar.extractfile(member).read())) as image:
                        assert image.size == (size, size)
                        images.append(torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1))
    return torch.stack(images)


def test_reference_statistics_are_those_of_the_stored_sr_size_images(setup):
    evaluator = Evaluator(_options(setup, f"sr.checkpoint={setup['sr_a']}", "eval.metrics=[fid]"), DistEnv())
    cfg = evaluator.config_for(checkpoint_ref(setup["ck"]))
    spec = EvalSpec.from_config(cfg)
    ident = evaluator.identity(cfg, spec)
    mu, sigma = evaluator.real_stats(cfg, ident, 64)
    mu32, _ = evaluator.real_stats(cfg, ident, 32)

    detector = load_inception(cfg.eval.inception_weights)
    stored = _stored_images(setup["both"], 64)
    assert stored.shape == (8, 3, 64, 64)
    features = detector.features(stored).double().numpy()
    assert np.allclose(mu, features.mean(0), rtol=0, atol=1e-6)
    assert np.allclose(sigma, np.cov(features, rowvar=False, bias=True), rtol=0, atol=1e-6)
    small = detector.features(_stored_images(setup["both"], 32)).double().numpy()
    assert np.allclose(mu32, small.mean(0), rtol=0, atol=1e-6) and not np.allclose(mu32, mu, rtol=0, atol=1e-3)
    # one cache file per resolution, never mixed
    files = sorted(p.name.split("-")[2] for p in Path(cfg.eval.stats_cache).glob("inception-stats-*.npz"))
    assert files == ["32px", "64px"]


def test_the_sr_file_is_part_of_the_eval_identity(setup, monkeypatch):
    from mlflow.tracking import MlflowClient

    # FID from the real moments; a cheap stand-in for the 2048-d sqrtm, which takes a minute on the test machine
    monkeypatch.setattr(evaluate_module, "frechet_distance", lambda m1, s1, m2, s2: float(((m1 - m2) ** 2).sum()))
    ref = checkpoint_ref(setup["ck"])
    metrics = "eval.metrics=[fid, is, nfs, da]"
    first = Evaluator(_options(setup, f"sr.checkpoint={setup['sr_a']}", metrics), DistEnv()).evaluate(ref)
    again = Evaluator(_options(setup, f"sr.checkpoint={setup['sr_a']}", metrics), DistEnv()).evaluate(ref)
    other = Evaluator(_options(setup, f"sr.checkpoint={setup['sr_b']}", metrics), DistEnv()).evaluate(ref)
    plain = Evaluator(_options(setup, metrics), DistEnv()).evaluate(ref)
    assert [o.status for o in (first, again, other, plain)] == ["evaluated", "skipped", "evaluated", "evaluated"]
    assert again.eval_dir == first.eval_dir and again.run_id == first.run_id
    assert len({first.eval_dir, other.eval_dir, plain.eval_dir}) == 3
    assert len({first.eval_hash, other.eval_hash, plain.eval_hash}) == 3
    # the geometry is the same with either SR file and without; the scored images are not
    for key in ("nfs/s1", "da/s1"):
        assert first.results[key] == other.results[key] == plain.results[key]
    assert first.results["fid/s1"] != other.results["fid/s1"] != plain.results["fid/s1"]

    sha_a = hashlib.sha256(setup["sr_a"].read_bytes()).hexdigest()
    saved = json.loads((first.eval_dir / "results.json").read_text())
    assert saved["complete"] and saved["image_resolution"] == 64
    assert saved["super_resolution"] == {"checkpoint": str(setup["sr_a"]), "sha256": sha_a, "scale": 2}
    plain_saved = json.loads((plain.eval_dir / "results.json").read_text())
    assert plain_saved["image_resolution"] == 32 and plain_saved["super_resolution"] is None
    assert "64 px images: super-resolution x2 of the 32 px renders" in (first.eval_dir / "table.md").read_text()

    client = MlflowClient(f"sqlite:///{setup['root'] / 'mlflow.db'}")
    run = client.get_run(first.run_id).data
    assert run.tags["g3dr.sr_sha256"] == sha_a
    assert run.params["sr.sha256"] == sha_a and run.params["sr.checkpoint"] == str(setup["sr_a"])
    assert run.params["eval.image_resolution"] == "64" and run.params["sr.scale"] == "2"
    assert json.loads(run.params["sr.architecture"])["n_feats"] == 8
    plain_run = client.get_run(plain.run_id).data
    assert plain_run.params["eval.image_resolution"] == "32" and "g3dr.sr_sha256" not in plain_run.tags
    assert "sr.sha256" not in plain_run.params


def test_cli_sr_flags_and_clear_errors(setup, capsys):
    common = ["--mlflow-uri", f"sqlite:///{setup['root'] / 'cli.db'}", "--experiment", "eval-sr-cli", "--no-progress",
              "--out", str(setup["root"] / "cli-eval"), "--sigma-scales", "1", "--views", "novel", "--num-samples", "6",
              "--fid-samples", "6", "--is-splits", "2"]
    ck = str(setup["ck"])
    # FID with SR needs the data's images at the SR size: named, with the command that writes them
    code = main(["eval", "--checkpoint", ck, "--sr", str(setup["sr_a"]), "--data", str(setup["small"]),
                 "--metrics", "fid,nfs", *common])
    err = capsys.readouterr().err
    assert code == 2 and "stores images at [32] px only" in err and "--resolution 32 64" in err
    # direct rendering at 64 and SR at once is ambiguous
    assert main(["eval", "--checkpoint", ck, "--sr", str(setup["sr_a"]), *common, "eval.render_resolution=64"]) == 2
    assert "eval.render_resolution=64 with super-resolution" in capsys.readouterr().err
    missing = setup["root"] / "missing-sr.safetensors"
    assert main(["eval", "--checkpoint", ck, "--sr", str(missing), "--metrics", "nfs", *common]) == 2
    assert str(missing) in capsys.readouterr().err
    # IS alone needs no reference images: the 32 px-only data is fine, and the IS is of 64 px SR images
    assert main(["eval", "--checkpoint", ck, "--sr", str(setup["sr_a"]), "--data", str(setup["small"]),
                 "--metrics", "is", *common]) == 0
    out = capsys.readouterr().out
    assert out.startswith("evaluated") and "is/s1=" in out
    (saved,) = [json.loads(p.read_text()) for p in (setup["root"] / "cli-eval").glob("f_trigen-step7-*/results.json")]
    assert saved["image_resolution"] == 64 and saved["super_resolution"]["checkpoint"] == str(setup["sr_a"])
    # a checkpoint whose config names sr.checkpoint evaluates through it by default; --no-sr turns that off
    sizes, ck_id = [], checkpoint_ref(setup["ck_sr"]).id[:8]
    for flags in ([], ["--no-sr"]):
        assert main(["eval", "--checkpoint", str(setup["ck_sr"]), *flags, "--data", str(setup["small"]),
                     "--metrics", "is", *common]) == 0
        eval_hash = capsys.readouterr().out.split("eval_hash=")[1].split()[0]
        (path,) = (setup["root"] / "cli-eval").glob(f"f_trigen-step7-{ck_id}-{eval_hash}/results.json")
        sizes.append(json.loads(path.read_text())["image_resolution"])
    assert sizes == [64, 32]


def test_library_errors(setup):
    evaluator = Evaluator(_options(setup, f"sr.checkpoint={setup['sr_a']}", "eval.metrics=[fid]",
                                   f"data.shards={setup['small']}"), DistEnv())
    ref = checkpoint_ref(setup["ck"])
    with pytest.raises(DataError, match="need the dataset's images at 64 px"):
        evaluator.evaluate(ref)
    with pytest.raises(ConfigError, match="set eval.render_resolution=0"):
        Evaluator(_options(setup, f"sr.checkpoint={setup['sr_a']}", "eval.render_resolution=64"),
                  DistEnv()).evaluate(ref)
