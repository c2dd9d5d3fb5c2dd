"""A training run and a sweep of it against a real ``mlflow server``, as a team uses one: the server and the
experiment come from MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME, and everything is read back through the
client: tags, the config artifact, the image grid by key and step, and the eval results in the training run."""

from __future__ import annotations

import pytest

from g3dr_test_support import load_test_helper

server = load_test_helper("mlflow_server")


@pytest.mark.slow
def test_training_and_its_sweep_on_a_real_server(tmp_path, monkeypatch, repo_root):
    from mlflow.tracking import MlflowClient

    from g3dr.launchers.main import main
    from g3dr.config import load_config
    from g3dr.train.trainer import train

    with server.running_mlflow_server(tmp_path / "server") as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team-g3dr")
        run_dir = tmp_path / "run"
        cfg = load_config(repo_root / "configs" / "tiny.yaml", [
            f"run_dir={run_dir}", f"data.synthetic_dir={tmp_path / 'synth'}", "data.synthetic_size=8",
            "train.total_steps=2", "train.checkpoint_every=2", "train.image_every=1", "train.export_initial=true",
            "logging.mlflow_uri=", "logging.experiment="])
        result = train(cfg)
        assert main(["eval", "--sweep", str(run_dir), "--no-export", "--no-progress", "--metrics", "nfs,da",
                     "--sigma-scales", "1", "--num-samples", "4", f"eval.stats_cache={tmp_path / 'cache'}"]) == 0

        client = MlflowClient(uri)
        training = client.get_run(result.run_id)
        assert client.get_experiment(training.info.experiment_id).name == "team-g3dr"
        tags = training.data.tags
        assert tags["g3dr.world_size"] == "1" and len(tags["g3dr.config_hash"]) == 16
        assert tags["g3dr.dataset_hash"] not in ("", "unknown")
        assert "config.yaml" in [a.path for a in client.list_artifacts(result.run_id)]
        images = [a.path for a in client.list_artifacts(result.run_id, "images")]
        assert any(p.startswith("images/samples+step+1+") for p in images), images
        assert any(p.startswith("images/samples+step+2+") for p in images), images
        history = {m.step for m in client.get_metric_history(result.run_id, "eval/nfs/s1")}
        assert history == {0, 2}  # the initial weights and the final export, at their steps
