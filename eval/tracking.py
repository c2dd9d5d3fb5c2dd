"""MLflow bookkeeping of evaluations: one run per (checkpoint, eval config), nested under a sweep run.

Unlike training (which must never stop because tracking is down), an evaluation exists to be recorded:
every MLflow call is retried a few times and then fails the job with a :class:`TrackingError`. The
results are also in the eval directory as JSON, so a failed upload loses nothing and the next sweep
uploads them without recomputing.

Several eval jobs may log to one store at once (a ``g3dr submit eval`` array). With an ``mlflow server``
in front of the database nothing more is needed (the recommended setup on a cluster, see docs/eval.md).
With a shared sqlite file, the store is created once under a file lock
(:func:`g3dr.train.tracking.prepare_tracking_store`) and SQLite's "database is locked" is retried with
jittered exponential back-off for up to ``lock_wait_s`` seconds, on top of (and not counted as) the
ordinary attempts.

A run counts as done only with status ``FINISHED``; it is marked so after its metrics and artifacts are
logged. An interrupted or failed evaluation ends its run as ``KILLED`` / ``FAILED``, which sweeps redo.

Tags on every eval run: ``g3dr.kind=eval``, ``g3dr.checkpoint`` (path), ``g3dr.checkpoint_id`` (hash of the
resolved path and step), ``g3dr.step``, ``g3dr.eval_hash``, ``g3dr.training_run_id`` (when the checkpoint
names its training run) and ``mlflow.parentRunId`` (the sweep run).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from g3dr.errors import G3DRError
from g3dr.log import get_logger
from g3dr.train.tracking import get_or_create_experiment, is_lock_error, prepare_tracking_store

log = get_logger("g3dr.eval")

T = TypeVar("T")
_PARAM_MAX = 6000


class TrackingError(G3DRError):
    """The MLflow tracking store could not be reached or refused a write (after retries)."""


def resolve_tracking(uri: str | None, base_dir: str | Path) -> tuple[str, str | None]:
    """``(tracking_uri, artifact_location)``: ``uri`` as given, else ``$MLFLOW_TRACKING_URI``, else a sqlite
    store ``base_dir/mlflow.db`` with artifacts in ``base_dir/mlartifacts`` (the training run's own store when
    ``base_dir`` is its run directory). MLflow 3 refuses ``file:`` stores.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri:
        if uri.startswith("file:"):
            raise TrackingError(f"MLflow 3 does not accept file: stores ({uri}); "
                                "use sqlite:///PATH.db or http://HOST:PORT")
        return uri, None
    base = Path(base_dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / 'mlflow.db'}", (base / "mlartifacts").as_uri()


class EvalTracker:
    """Rank-0 MLflow client for evaluation runs, with bounded retries on every call."""

    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None,
                 attempts: int = 3, retry_wait_s: float = 1.0, lock_wait_s: float = 120.0):
        # Bound MLflow's own HTTP back-off so that "down" costs seconds, then our retries decide.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.attempts = max(1, attempts)
        self.retry_wait_s = retry_wait_s
        self.lock_wait_s = lock_wait_s
        self.lock_retries = 0
        """How many times a call met "database is locked" and was retried (for tests and logs)."""

        def open_store():
            prepare_tracking_store(uri, lock_timeout_s=max(lock_wait_s, 1.0))
            return MlflowClient(tracking_uri=uri)

        self.client = self._call(open_store, "open the tracking store")
        self.experiment_id = self._call(lambda: get_or_create_experiment(self.client, experiment, artifact_location),
                                        f"open experiment {experiment!r}")

    def _call(self, fn: Callable[[], T], what: str) -> T:
        attempt = 1
        lock_deadline = time.monotonic() + self.lock_wait_s
        lock_wait = 0.2
        while True:
            try:
                return fn()
            except Exception as err:  # MLflow raises many types (MlflowException, requests, sqlalchemy)
                if is_lock_error(err) and time.monotonic() < lock_deadline:
                    # Another job holds the sqlite write lock (beyond its busy timeout): wait, with jitter so
                    # the waiting jobs do not all retry at the same instant; not counted as a failed attempt.
                    self.lock_retries += 1
                    if self.lock_retries in (1, 10) or self.lock_retries % 100 == 0:
                        log.warning("MLflow: %s: the sqlite store is locked by another job (%d lock retries so "
                                    "far); retrying", what, self.lock_retries)
                    time.sleep(min(lock_wait, max(0.0, lock_deadline - time.monotonic())) * random.uniform(0.5, 1.5))
                    lock_wait = min(lock_wait * 2, 5.0)
                    continue
                if attempt >= self.attempts:
                    raise TrackingError(f"MLflow at {self.uri}: {what} failed after {self.attempts} attempts "
                                        f"({type(err).__name__}: {str(err)[:300]}); check that the tracking server "
                                        f"is up (results stay in the eval directory as JSON)") from None
                log.warning("MLflow: %s failed (attempt %d/%d: %s); retrying", what, attempt, self.attempts,
                            type(err).__name__)
                time.sleep(self.retry_wait_s * attempt)
                attempt += 1

    # -- queries ----------------------------------------------------------------------------------

    def find_finished(self, checkpoint_id: str, eval_hash: str) -> str | None:
        """Run id of a FINISHED eval run of this checkpoint with this eval config, or None."""
        query = (f"tags.`g3dr.checkpoint_id` = '{checkpoint_id}' and tags.`g3dr.eval_hash` = '{eval_hash}' "
                 f"and attributes.status = 'FINISHED'")
        runs = self._call(lambda: self.client.search_runs([self.experiment_id], filter_string=query, max_results=1),
                          "search finished eval runs")
        return runs[0].info.run_id if runs else None

    def run_metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of every metric of ``run_id`` (a skipped eval's results, read back)."""
        run = self._call(lambda: self.client.get_run(run_id), f"read run {run_id}")
        return dict(run.data.metrics)

    def log_to_training_run(self, training_run_id: str, metrics: Mapping[str, float], step: int,
                            prefix: str = "eval/") -> bool:
        """Also record ``metrics`` in the training run they came from, at the checkpoint's ``step`` (as
        ``eval/<name>``), so FID, NFS... against step is one chart of that run. False (nothing logged) when
        this store does not hold the run (the training logged elsewhere)."""
        try:
            self.client.get_run(training_run_id)
        except Exception as err:  # noqa: BLE001 - not in this store: the eval runs alone carry the numbers
            log.info("training run %s is not in %s (%s); its eval metrics stay in the eval runs", training_run_id,
                     self.uri, type(err).__name__)
            return False
        self.log_metrics(training_run_id, {f"{prefix}{k}": v for k, v in metrics.items()}, step=step)
        return True

    # -- runs -------------------------------------------------------------------------------------

    def start_run(self, name: str, tags: Mapping[str, str], parent_run_id: str | None = None) -> str:
        all_tags = dict(tags)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self._call(lambda: self.client.create_run(self.experiment_id, run_name=name, tags=all_tags),
                         f"create run {name!r}")
        return run.info.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_PARAM_MAX]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow's batch limit on params
            chunk = items[i:i + 100]
            self._call(lambda: self.client.log_batch(run_id, params=chunk), "log params")

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in sorted(metrics.items())]
        for i in range(0, len(items), 1000):
            chunk = items[i:i + 1000]
            self._call(lambda: self.client.log_batch(run_id, metrics=chunk), "log metrics")

    def log_artifacts(self, run_id: str, directory: str | Path, artifact_path: str | None = None) -> None:
        self._call(lambda: self.client.log_artifacts(run_id, str(directory), artifact_path), "upload artifacts")

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self._call(lambda: self.client.set_tag(run_id, key, value), f"set tag {key}")

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._call(lambda: self.client.set_terminated(run_id, status), f"end run as {status}")

    def end_run_quietly(self, run_id: str | None, status: str) -> None:
        """Best-effort end of a run on the failure path (never raises; the original error matters more)."""
        if run_id is None:
            return
        try:
            self.client.set_terminated(run_id, status)
        except Exception as err:  # the store may be the thing that failed
            log.warning("MLflow: could not mark run %s as %s (%s)", run_id, status, type(err).__name__)
