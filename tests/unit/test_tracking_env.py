"""A team's MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME apply where the config leaves them empty."""

from g3dr.config import load_config
from g3dr.tracking import artifact_location, experiment_name, resolve_tracking, tracking_uri


def test_environment_fills_what_the_config_leaves_empty(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    empty = load_config(None, [f"run_dir={tmp_path / 'run'}"])
    assert tracking_uri(empty) == f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    assert experiment_name(empty) == "g3dr" and artifact_location(empty).endswith("/run/mlartifacts")
    assert resolve_tracking(None, tmp_path / "sweep")[0] == f"sqlite:///{tmp_path / 'sweep' / 'mlflow.db'}"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.team:5000")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team-g3dr")
    assert tracking_uri(empty) == "http://mlflow.team:5000" and experiment_name(empty) == "team-g3dr"
    assert artifact_location(empty) is None  # the server decides
    assert resolve_tracking(None, tmp_path / "sweep") == ("http://mlflow.team:5000", None)

    named = load_config(None, ["logging.mlflow_uri=sqlite:///x.db", "logging.experiment=mine"])
    assert tracking_uri(named) == "sqlite:///x.db" and experiment_name(named) == "mine"  # the config wins
