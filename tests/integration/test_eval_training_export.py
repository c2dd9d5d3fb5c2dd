"""Sweeping a real (tiny) training run directory: a DeepSpeed step-N checkpoint is exported once and
evaluated beside the initial weights (``train.export_initial``), the eval runs link back to the training run
in the training's own MLflow store, and the CLI prints the steps side by side."""

from __future__ import annotations

import pytest

from g3dr.config import load_config
from g3dr.distributed import DistEnv
from g3dr.eval.runner import EvalOptions, Evaluator, run_sweep


@pytest.mark.slow
def test_sweep_exports_and_evaluates_training_checkpoints(tmp_path, repo_root, capsys):
    from mlflow.tracking import MlflowClient

    from g3dr.tracking import tracking_uri
    from g3dr.train.trainer import train

    run_dir = tmp_path / "run"
    cfg = load_config(repo_root / "configs" / "tiny.yaml", [
        f"run_dir={run_dir}", f"data.synthetic_dir={tmp_path / 'synth'}", "data.synthetic_size=16",
        "train.total_steps=2", "train.checkpoint_every=2", "train.precision=fp32", "train.image_every=0",
        "train.export_initial=true"])
    result = train(cfg, export=False)
    assert result.run_id

    options = EvalOptions(progress=False, out_dir=run_dir / "eval", tracking_base=run_dir,
                          overrides=("eval.metrics=[nfs, da]", "eval.sigma_scales=[1.0]", "eval.num_samples=4",
                                     f"eval.stats_cache={tmp_path / 'cache'}"))
    # the initial weights: exactly the seeded model training started from
    import torch
    from safetensors.torch import load_file

    from g3dr.models.f_trigen import FTrigen
    from g3dr.train.checkpoint import seed_everything

    seed_everything(cfg.train.seed)
    init = FTrigen(cfg).state_dict()
    saved = load_file(str(run_dir / "exports" / "step-0.safetensors"))
    assert set(saved) == set(init) and all(torch.equal(saved[k], init[k]) for k in init)

    report = run_sweep(run_dir, Evaluator(options, DistEnv()))
    assert [(o.status, o.checkpoint.step) for o in report.outcomes] == [("evaluated", 2), ("evaluated", 0)]
    assert report.outcomes[0].results != report.outcomes[1].results
    exports = sorted(p.name for p in (run_dir / "exports").iterdir())
    assert exports == ["step-0.safetensors", "step-2.safetensors"]
    mtimes = {p: p.stat().st_mtime for p in (run_dir / "exports").iterdir()}

    client = MlflowClient(tracking_uri(cfg))  # the training's own store (sqlite in the run directory)
    runs = client.search_runs([client.get_experiment_by_name("g3dr-eval").experiment_id])
    evals = [r for r in runs if r.data.tags.get("g3dr.kind") == "eval"]
    assert len(evals) == 2 and {r.info.status for r in evals} == {"FINISHED"}
    assert {r.data.tags["g3dr.training_run_id"] for r in evals} == {result.run_id}
    training = client.get_run(result.run_id)
    assert training.data.tags.get("mlflow.runName")  # the training run is in the same store
    # traceable: code, job, data (the same content hash the eval keyed its runs by) and config
    tags = training.data.tags
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["g3dr.git_dirty"] in ("true", "false")
    assert tags["g3dr.world_size"] == "1" and tags["g3dr.host"] and tags["g3dr.version"]
    assert {tags["g3dr.dataset_hash"]} == {r.data.params["dataset_manifest_hash"] for r in evals}
    assert len(tags["g3dr.config_hash"]) == 16
    assert "config.yaml" in [a.path for a in client.list_artifacts(result.run_id)]
    # the eval results also land in the training run at each checkpoint's step: metric against step is one chart
    history = {m.step: m.value for m in client.get_metric_history(result.run_id, "eval/nfs/s1")}
    assert history == {o.checkpoint.step: o.results["nfs/s1"] for o in report.outcomes}

    from g3dr.launchers.main import main

    capsys.readouterr()
    assert main(["eval", "--sweep", str(run_dir), "--no-progress", "--metrics", "nfs,da", "--sigma-scales", "1",
                 "--num-samples", "4", f"eval.stats_cache={tmp_path / 'cache'}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in out[:2]] == ["skipped", "skipped"]
    # step 0 beside step 2, the numbers read back from the finished runs
    assert out[2] == "| metric | step 0 (step-0.safetensors) | step 2 (step-2.safetensors) |"
    row = next(line for line in out if line.startswith("| nfs/s1 |"))
    by_step = {o.checkpoint.step: o.results for o in report.outcomes}
    assert row == f"| nfs/s1 | {by_step[0]['nfs/s1']:.2f} | {by_step[2]['nfs/s1']:.2f} |"
    assert {p: p.stat().st_mtime for p in (run_dir / "exports").iterdir()} == mtimes  # exported once
