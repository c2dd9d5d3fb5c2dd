"""Sweeping a real (tiny) training run directory: a DeepSpeed step-N checkpoint is exported once and
evaluated, and the eval runs link back to the training run in the training's own MLflow store."""

from __future__ import annotations

import pytest

from g3dr.config import load_config
from g3dr.distributed import DistEnv
from g3dr.eval.runner import EvalOptions, Evaluator, run_sweep


@pytest.mark.slow
def test_sweep_exports_and_evaluates_training_checkpoints(tmp_path, repo_root):
    from mlflow.tracking import MlflowClient

    from g3dr.train.tracking import tracking_uri
    from g3dr.train.trainer import train

    run_dir = tmp_path / "run"
    cfg = load_config(repo_root / "configs" / "tiny.yaml", [
        f"run_dir={run_dir}", f"data.synthetic_dir={tmp_path / 'synth'}", "data.synthetic_size=16",
        "train.total_steps=2", "train.checkpoint_every=2", "train.precision=fp32", "train.image_every=0"])
    result = train(cfg, export=False)
    assert result.run_id

    options = EvalOptions(progress=False, out_dir=run_dir / "eval", tracking_base=run_dir,
                          overrides=("eval.metrics=[nfs, da]", "eval.sigma_scales=[1.0]", "eval.num_samples=4",
                                     f"eval.stats_cache={tmp_path / 'cache'}"))
    report = run_sweep(run_dir, Evaluator(options, DistEnv()))
    assert [(o.status, o.checkpoint.step) for o in report.outcomes] == [("evaluated", 2)]
    exports = sorted(p.name for p in (run_dir / "exports").iterdir())
    assert exports == ["step-2.safetensors"]
    mtimes = {p: p.stat().st_mtime for p in (run_dir / "exports").iterdir()}

    client = MlflowClient(tracking_uri(cfg))  # the training's own store (sqlite in the run directory)
    runs = client.search_runs([client.get_experiment_by_name("g3dr-eval").experiment_id])
    evals = [r for r in runs if r.data.tags.get("g3dr.kind") == "eval"]
    assert len(evals) == 1 and evals[0].info.status == "FINISHED"
    assert {r.data.tags["g3dr.training_run_id"] for r in evals} == {result.run_id}
    assert client.get_run(result.run_id).data.tags.get("mlflow.runName")  # the training run is in the same store

    report = run_sweep(run_dir, Evaluator(options, DistEnv()))
    assert [o.status for o in report.outcomes] == ["skipped"]
    assert {p: p.stat().st_mtime for p in (run_dir / "exports").iterdir()} == mtimes  # exported once
