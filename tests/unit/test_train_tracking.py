"""MLflow tracking: params/metrics/images read back through the client; dead stores never raise."""

from __future__ import annotations

import time

import numpy as np
import pytest

from g3dr.config import load_config
from g3dr.tracking import MlflowTracker, NullTracker, build_tracker, tracking_uri


def test_run_contents_read_back(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = load_config("configs/tiny.yaml", [f"run_dir={tmp_path}/run"])
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path}/run/mlflow.db"
    tracker = build_tracker(cfg, is_main=True)
    assert tracker.active
    tracker.log_metrics({"loss/total": 1.5, "lr": 1e-4}, step=3)
    tracker.log_metrics({"loss/total": 1.25}, step=4)
    tracker.log_image(np.zeros((8, 8, 3), dtype=np.uint8), key="samples", step=4)
    tracker.close()
    client = MlflowClient(tracking_uri(cfg))
    run = client.get_run(tracker.run_id)
    assert run.data.params["train.lr"] == "0.0001"
    assert run.data.params["model.channel_mults"] == "[1, 2]"
    history = client.get_metric_history(tracker.run_id, "loss/total")
    assert [(m.step, m.value) for m in history] == [(3, 1.5), (4, 1.25)]
    assert run.info.status == "FINISHED"
    # an image logged by key and step (MLflow's image panel with a step slider) lives under images/
    artifacts = [a.path for a in client.list_artifacts(tracker.run_id, "images")]
    assert len(artifacts) >= 1 and all(a.startswith("images/samples+step+4+") for a in artifacts), artifacts
    assert (tmp_path / "run" / "mlartifacts").is_dir()
    # Resume: the same run is reopened, params are not logged twice.
    again = build_tracker(cfg, is_main=True, run_id=tracker.run_id)
    assert again.run_id == tracker.run_id
    again.log_metrics({"loss/total": 1.0}, step=5)
    again.close()
    assert len(client.get_metric_history(tracker.run_id, "loss/total")) == 3


def test_other_ranks_get_a_null_tracker(tmp_path):
    cfg = load_config("configs/tiny.yaml", [f"run_dir={tmp_path}/run"])
    tracker = build_tracker(cfg, is_main=False)
    assert type(tracker) is NullTracker
    tracker.log_metrics({"a": 1.0}, 1)
    assert not (tmp_path / "run" / "mlflow.db").exists()


@pytest.mark.parametrize("kind", ["http", "sqlite"])
def test_dead_tracking_uri_never_raises(kind, tmp_path, caplog):
    (tmp_path / "a-file").write_text("not a directory")
    uri = "http://127.0.0.1:9" if kind == "http" else f"sqlite:///{tmp_path}/a-file/mlflow.db"
    started = time.time()
    tracker = MlflowTracker(uri, "exp", "run", retry_wait_s=0.01)
    assert not tracker.active
    for step in range(50):
        tracker.log_metrics({"loss": 1.0}, step)
    tracker.log_params({"a": 1})
    tracker.close()
    assert time.time() - started < 60
    assert "unavailable" in caplog.text


def test_a_slow_store_never_stalls_logging_and_loses_nothing(tmp_path):
    """Metrics go through a background queue: log_metrics returns while the store is still busy with the
    first batch (it is held until the test releases it), and close() delivers every batch in order."""
    import threading

    from mlflow.tracking import MlflowClient

    cfg = load_config("configs/tiny.yaml", [f"run_dir={tmp_path}/run"])
    tracker = build_tracker(cfg, is_main=True)
    release = threading.Event()
    real = tracker.client.log_batch

    def slow_log_batch(run_id, metrics=(), **kw):
        if metrics:
            assert release.wait(timeout=60), "the test never released the store"
        return real(run_id, metrics=metrics, **kw)

    tracker.client.log_batch = slow_log_batch
    for step in range(1, 6):
        tracker.log_metrics({"loss/total": 1.0 / step}, step=step)  # would block forever if synchronous
    assert not release.is_set()
    release.set()
    tracker.close()
    history = MlflowClient(tracking_uri(cfg)).get_metric_history(tracker.run_id, "loss/total")
    assert [(m.step, m.value) for m in history] == [(s, 1.0 / s) for s in range(1, 6)]
