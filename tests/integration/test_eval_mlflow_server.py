"""The full `g3dr eval --sweep` against a real `mlflow server` (sqlite backend, loopback): FID, IS, NFS and
DA of tiny checkpoints with a tiny random-weight Inception, read back through the MLflow client."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest

from g3dr.launchers.main import main
from g3dr_test_support import load_test_helper



def _load(name: str):
    return load_test_helper(name)


fx = _load("eval_fixtures")
server = _load("mlflow_server")


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    with server.running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as uri:
        yield uri


@pytest.mark.slow
def test_sweep_logs_everything_to_a_real_server(tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    cfg = fx.tiny_config(tmp_path)
    fx.make_inception(cfg)
    run = tmp_path / "run"
    fx.make_checkpoint(cfg, run / "exports" / "step-5.safetensors", step=5, seed=5, training_run_id="train-abc")
    args = ["eval", "--sweep", str(run), "--mlflow-uri", mlflow_uri, "--experiment", "server-test",
            "--metrics", "fid,is,nfs,da", "--sigma-scales", "1,5", "--views", "novel", "--num-samples", "6",
            "--no-progress", "eval.is_splits=2"]
    assert main(args) == 0

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("server-test")
    runs = client.search_runs([exp.experiment_id])
    sweep = [r for r in runs if r.data.tags.get("g3dr.kind") == "sweep"]
    evals = [r for r in runs if r.data.tags.get("g3dr.kind") == "eval"]
    assert len(sweep) == 1 and len(evals) == 1
    run_ = evals[0]
    assert run_.info.status == "FINISHED" and sweep[0].info.status == "FINISHED"
    assert run_.data.tags["mlflow.parentRunId"] == sweep[0].info.run_id
    assert run_.data.tags["g3dr.training_run_id"] == "train-abc"
    params = run_.data.params
    assert params["checkpoint_step"] == "5" and params["checkpoint"].endswith("step-5.safetensors")
    assert len(params["dataset_manifest_hash"]) == 64 and len(params["detector_sha256"]) == 64
    assert params["eval.metrics"] == "fid,is,nfs,da" and params["eval.sigma_scales"] == "1.0,5.0"
    metrics = run_.data.metrics
    assert set(metrics) == {f"{m}/s{s}" for m in ("fid", "is", "is_std", "nfs", "da") for s in (1, 5)}
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["fid/s1"] > 0 and metrics["is/s1"] >= 1.0
    history = client.get_metric_history(run_.info.run_id, "fid/s5")
    assert [m.step for m in history] == [5]

    artifacts = {a.path for a in client.list_artifacts(run_.info.run_id)}
    assert {"results.json", "table.csv", "table.md", "metrics_vs_sigma_scale.png", "grids"} <= artifacts
    grids = {a.path for a in client.list_artifacts(run_.info.run_id, "grids")}
    assert {"grids/rgb_novel_s1.png", "grids/depth_canonical_s5.png"} <= grids
    local = Path(client.download_artifacts(run_.info.run_id, "table.csv", str(tmp_path / "dl")))
    rows = list(csv.DictReader(io.StringIO(local.read_text())))
    assert [r["sigma_scale"] for r in rows] == ["1", "5"]
    assert float(rows[1]["fid"]) == pytest.approx(metrics["fid/s5"]) and rows[1]["paper_fid"] == "12.98"
    saved = json.loads(next((run / "eval").glob("*/results.json")).read_text())
    assert saved["complete"] and saved["run_id"] == run_.info.run_id
    # every number the server holds is the one the eval computed (NFS, DA, FID, IS at both scales), bit for bit
    assert metrics == {name: saved["metrics"][name] for name in metrics}

    # the dataset statistics were cached once, keyed by the manifest content hash
    assert len(list(Path(cfg.eval.stats_cache).glob("inception-stats-32px-*.npz"))) == 1

    # idempotent: a second sweep with the same eval config creates nothing (new checkpoints, interrupted
    # runs and failed uploads are covered on a sqlite store in test_eval_sweep.py)
    assert main(args) == 0
    assert len(client.search_runs([exp.experiment_id])) == 2
