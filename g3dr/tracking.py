"""Experiment tracking with MLflow, for training and evaluation: one store default, one retry loop, two policies.

- Where: :func:`resolve_store` -- an explicit URI, else ``$MLFLOW_TRACKING_URI``, else a sqlite store
  ``<base>/mlflow.db`` with artifacts in ``<base>/mlartifacts`` (training: ``base`` is ``run_dir``; eval: the
  sweep folder or the checkpoint's). MLflow 3 refuses the old ``file:`` store.
- How: every MLflow call goes through :func:`call_with_retries` (a few attempts; SQLite's transient "database is
  locked" retried with jittered back-off without using them up, where the policy allows waiting).
- Training is best effort (:class:`MlflowTracker`, rank 0; other ranks get a :class:`NullTracker`): a store that
  is down or broken never stops training; a failed call is dropped with a (rate-limited) warning, and after
  repeated failures calls are attempted only now and then. One run per training job; params are the resolved
  config flattened to dotted keys; the run id goes into every checkpoint and a resumed job reopens the run.
- Evaluation must succeed (:class:`EvalTracker`): an evaluation exists to be recorded, so a call that still fails
  after its retries raises :class:`~g3dr.errors.TrackingError` and fails the job (its results stay on disk as
  JSON, and the next sweep uploads them without recomputing).

Several jobs may share one store: :func:`prepare_tracking_store` creates or upgrades a sqlite store once under a
file lock (MLflow's own table creation races when several processes open a new database together) and
:func:`get_or_create_experiment` tolerates another process creating the experiment first. With an ``mlflow
server`` in front of the database nothing more is needed (the recommended setup on a cluster, docs/eval.md).
"""

from __future__ import annotations

import os
import queue
import random
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, TypeVar

from g3dr.config import Config, flatten_config
from g3dr.errors import TrackingError
from g3dr.log import get_logger

log = get_logger("g3dr.tracking")

T = TypeVar("T")

_PARAM_MAX = 6000  # MLflow's limit on a param value's length


_LOCK_MESSAGES = ("database is locked", "database table is locked", "database schema has changed")


def sqlite_db_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` tracking URI (None for other schemes and in-memory stores)."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    if not database or database == ":memory:":
        return None
    return Path(database).resolve()


def prepare_tracking_store(uri: str, lock_timeout_s: float = 120.0) -> None:
    """Create (or upgrade) the MLflow store behind a ``sqlite:`` ``uri`` once, under a file lock beside the
    database (``<db>.lock``); a no-op for other stores (an ``mlflow server`` creates its own tables once).

    MLflow creates the tables of a new sqlite database when a client first opens it, without a lock
    across processes: several jobs opening a new store together fail with "table ... already exists",
    alembic version mismatches or "database is locked", and can leave the schema half-migrated. Under the
    lock the first process creates and migrates; the others find a complete schema. The lock is an
    ``fcntl`` lock (the ``filelock`` package): it holds across nodes only where the shared file system
    supports POSIX locks (NFSv4, Lustre with ``flock``); otherwise use an ``mlflow server``.
    Raises ``filelock.Timeout`` after ``lock_timeout_s`` seconds, and whatever MLflow raises.
    """
    path = sqlite_db_path(uri)
    if path is None:
        return
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock", timeout=lock_timeout_s):
        MlflowClient(tracking_uri=uri)  # building the client opens the store: tables created and migrated here


def get_or_create_experiment(client: Any, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created if absent; another process creating it at the same moment
    (the loser's create fails with RESOURCE_ALREADY_EXISTS / a unique-constraint error) is not an error."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def is_lock_error(err: BaseException) -> bool:
    """True for SQLite's transient lock errors ("database is locked"...), however MLflow wrapped them."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).lower()
        if any(m in text for m in _LOCK_MESSAGES):
            return True
        current = current.__cause__ or current.__context__
    return False


DEFAULT_EXPERIMENT = "g3dr"


def resolve_store(uri: str | None, base_dir: str | Path) -> tuple[str, str | None]:
    """``(tracking_uri, artifact_location)``: ``uri`` as given, else ``$MLFLOW_TRACKING_URI`` (what a team sets for
    all its tools), else a sqlite store ``base_dir/mlflow.db`` with artifacts in ``base_dir/mlartifacts``
    (artifact location None: the store's own default)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri:
        return uri, None
    base = Path(base_dir).resolve()
    return f"sqlite:///{base / 'mlflow.db'}", (base / "mlartifacts").as_uri()


def tracking_uri(cfg: Config) -> str:
    """The MLflow tracking URI of a training run (:func:`resolve_store` of ``logging.mlflow_uri`` and ``run_dir``)."""
    return resolve_store(cfg.logging.mlflow_uri, cfg.run_dir)[0]


def experiment_name(cfg: Config) -> str:
    """``logging.experiment``, else ``$MLFLOW_EXPERIMENT_NAME``, else ``g3dr``."""
    return cfg.logging.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def artifact_location(cfg: Config) -> str | None:
    """Where a new experiment of a training run stores artifacts when the store is the default local sqlite one."""
    return resolve_store(cfg.logging.mlflow_uri, cfg.run_dir)[1]


def resolve_tracking(uri: str | None, base_dir: str | Path) -> tuple[str, str | None]:
    """:func:`resolve_store` where tracking must succeed (evaluation): a ``file:`` store is a
    :class:`~g3dr.errors.TrackingError` now, and the default store's folder is created."""
    uri, artifacts = resolve_store(uri, base_dir)
    if uri.startswith("file:"):
        raise TrackingError(f"MLflow 3 does not accept file: stores ({uri}); use sqlite:///PATH.db or http://HOST:PORT")
    if artifacts is not None:
        Path(base_dir).resolve().mkdir(parents=True, exist_ok=True)
    return uri, artifacts


def call_with_retries(fn: Callable[[], T], attempts: int, retry_wait_s: float, lock_wait_s: float = 0.0,
                      on_lock: Callable[[], None] | None = None,
                      on_retry: Callable[[int, Exception], None] | None = None) -> T:
    """``fn()``, tried up to ``attempts`` times (waiting ``retry_wait_s`` x the attempt number before each retry);
    raises the last error. SQLite's transient "database is locked" (another job holds the write lock beyond its
    busy timeout) is retried with jittered exponential back-off for up to ``lock_wait_s`` seconds on top, without
    using up attempts (``on_lock()`` is called for each such retry); 0 (training) waits for no lock.
    ``on_retry(attempt, error)`` is called before each ordinary retry."""
    attempt = 1
    lock_deadline = time.monotonic() + lock_wait_s
    lock_wait = 0.2
    while True:
        try:
            return fn()
        except Exception as err:  # MLflow raises many types (MlflowException, requests, sqlalchemy)
            if lock_wait_s > 0 and is_lock_error(err) and time.monotonic() < lock_deadline:
                if on_lock is not None:
                    on_lock()
                # jitter: the waiting jobs do not all retry at the same instant
                time.sleep(min(lock_wait, max(0.0, lock_deadline - time.monotonic())) * random.uniform(0.5, 1.5))
                lock_wait = min(lock_wait * 2, 5.0)
                continue
            if attempt >= attempts:
                raise
            if on_retry is not None:
                on_retry(attempt, err)
            time.sleep(retry_wait_s * attempt)
            attempt += 1


def run_tags(cfg: Config, world_size: int) -> dict[str, str]:
    """What makes a run traceable: code (git commit, dirty flag, package version), job (SLURM job id and array
    index, world size, host), data (the shards' manifest content hash) and the resolved config's hash.
    Values that cannot be known here are ``unknown`` (with the reason logged), never guessed."""
    import hashlib
    import socket

    from g3dr import __version__
    from g3dr.config import dump_config

    commit, dirty = _git_state()
    env = os.environ
    return {
        "mlflow.source.git.commit": commit, "g3dr.git_dirty": dirty, "g3dr.version": __version__,
        "g3dr.slurm_job_id": env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID") or "",
        "g3dr.slurm_array_task_id": env.get("SLURM_ARRAY_TASK_ID", ""),
        "g3dr.world_size": str(world_size), "g3dr.host": socket.gethostname(),
        "g3dr.dataset_hash": _dataset_hash(cfg),
        "g3dr.config_hash": hashlib.sha256(dump_config(cfg).encode()).hexdigest()[:16],
    }


def _git_state() -> tuple[str, str]:
    """(commit, "true"/"false") of the checkout this package runs from; ("unknown", "unknown") outside one."""
    import subprocess

    where = Path(__file__).resolve().parents[1]  # the checkout holding g3dr/
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        log.info("run tags: %s is not a git checkout (or git is missing); commit unknown", where)
        return "unknown", "unknown"
    return commit, "true" if status.strip() else "false"


def _dataset_hash(cfg: Config) -> str:
    """The content hash of the training shards (their manifests), as the eval keys its runs."""
    from g3dr.data.loader import data_urls
    from g3dr.errors import G3DRError
    from g3dr.metrics.dataset_stats import dataset_content_hash

    try:
        return dataset_content_hash(data_urls(cfg))
    except (G3DRError, OSError, ValueError) as err:
        log.info("run tags: no dataset hash (%s)", err)
        return "unknown"


class NullTracker:
    """The tracker of ranks other than 0, and of runs with tracking unavailable: accepts and drops everything."""

    run_id: str | None = None
    uri: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, image: Any, key: str, step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, Any], run_id: str | None = None) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


class MlflowTracker(NullTracker):
    """One MLflow run, created (or reopened by ``run_id``) at construction; every call is failure-tolerant."""

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None = None,
                 artifact_location: str | None = None, attempts: int = 2, retry_wait_s: float = 0.5):
        # A dead HTTP server should cost seconds, not MLflow's default minutes of back-off per call.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri = uri
        self.attempts = attempts
        self.retry_wait_s = retry_wait_s
        self.failures = 0
        self.calls = 0
        self.client = None
        self.run_id = None
        self._lock = threading.Lock()  # one MLflow call at a time (the worker and the training thread)
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._start(experiment, run_name, run_id, artifact_location)

    def _start(self, experiment: str, run_name: str, run_id: str | None, artifact_location: str | None) -> None:
        def start() -> str:
            from mlflow.tracking import MlflowClient

            prepare_tracking_store(self.uri, lock_timeout_s=30.0)
            client = MlflowClient(tracking_uri=self.uri)
            if run_id:
                client.get_run(run_id)  # raises if the store lost the run
                client.update_run(run_id, status="RUNNING")
                self.client = client
                return run_id
            experiment_id = get_or_create_experiment(client, experiment, artifact_location)
            run = client.create_run(experiment_id, run_name=run_name or None)
            self.client = client
            return run.info.run_id

        self.run_id = self._call("start run", start)
        if self.run_id is None:
            # Keep the previous id so checkpoints still name the run a later resume should continue.
            self.run_id = run_id
            log.warning("MLflow tracking at %s is unavailable; training continues without tracking", self.uri)
        else:
            log.info("MLflow run %s at %s", self.run_id, self.uri)

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        with self._lock:
            return self._call_locked(what, fn)

    def _call_locked(self, what: str, fn: Callable[[], Any]) -> Any:
        self.calls += 1
        # After repeated failures, try only every 20th call so a dead store does not slow training down.
        if self.failures >= 3 and self.calls % 20:
            return None
        try:
            result = call_with_retries(fn, self.attempts, self.retry_wait_s)
        except Exception as last:  # noqa: BLE001 - tracking must never stop training
            self.failures += 1
            if self.failures in (1, 3) or self.failures % 100 == 0:
                log.warning("MLflow %s failed (%d consecutive failures; training continues): %s: %s", what,
                            self.failures, type(last).__name__, str(last).splitlines()[0] if str(last) else "")
            return None
        if self.failures:
            log.warning("MLflow tracking at %s works again after %d failed calls", self.uri, self.failures)
        self.failures = 0
        return result

    @property
    def active(self) -> bool:
        return self.client is not None and self.run_id is not None

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_PARAM_MAX]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            chunk = items[i:i + 100]
            self._call("log params", lambda chunk=chunk: self.client.log_batch(self.run_id, params=chunk))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queued for a background thread: a slow or failing tracking server never stalls a training step.
        :meth:`close` (and :meth:`flush`) wait for what is queued, in order."""
        if not self.active or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        if self._worker is None:
            self._worker = threading.Thread(target=self._drain, name="g3dr-mlflow", daemon=True)
            self._worker.start()
        self._queue.put(items)
        if self._queue.qsize() in (100, 1000, 10000):
            log.warning("MLflow: %d metric batches waiting for %s (the store is slower than training logs)",
                        self._queue.qsize(), self.uri)

    def _drain(self) -> None:
        while True:
            items = self._queue.get()
            try:
                if items is None:
                    return
                self._call("log metrics", lambda: self.client.log_batch(self.run_id, metrics=items))
            finally:
                self._queue.task_done()

    def flush(self, timeout_s: float = 120.0) -> bool:
        """Wait until every queued metric batch was sent (or dropped after retries); False on timeout."""
        if self._worker is None:
            return True
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._queue.unfinished_tasks:
            log.warning("MLflow: %d metric batches still unsent after %.0f s; giving up on them",
                        self._queue.unfinished_tasks, timeout_s)
            return False
        return True

    def log_image(self, image: Any, key: str, step: int) -> None:
        """``image``: uint8 numpy array (H, W, 3) or a PIL image, logged as MLflow's image ``key`` at ``step``
        (the UI's image panel then has a step slider)."""
        if not self.active:
            return
        self._call("log image", lambda: self.client.log_image(self.run_id, image, key=key, step=int(step)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        self._call("log artifact", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def set_tags(self, tags: dict[str, Any], run_id: str | None = None) -> None:
        """Tag this run (or ``run_id``, another run of the same store)."""
        if not self.active or not tags:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:_PARAM_MAX]) for k, v in sorted(tags.items())]
        target = run_id or self.run_id
        self._call("set tags", lambda: self.client.log_batch(target, tags=items))

    def close(self, status: str = "FINISHED") -> None:
        if not self.active:
            return
        self.flush(timeout_s=60.0)
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(timeout=5)
            self._worker = None
        self._call("end run", lambda: self.client.set_terminated(self.run_id, status=status))


FORKED_FROM_RUN_TAG = "g3dr.forked_from_run"
FORKED_AT_STEP_TAG = "g3dr.forked_at_step"
ABANDONED_AFTER_STEP_TAG = "g3dr.abandoned_after_step"
CONTINUED_IN_TAG = "g3dr.continued_in"


def build_tracker(cfg: Config, is_main: bool, run_id: str | None = None,
                  forked_from: tuple[str, int, list[str]] | None = None, world_size: int = 1) -> NullTracker:
    """Rank 0: an :class:`MlflowTracker` (reopening ``run_id`` on resume, logging params on a new run);
    other ranks: a :class:`NullTracker`.

    ``forked_from = (old_run_id, step, abandoned checkpoints)``: the run resumed from an older checkpoint than its
    newest (a rollback). A new run continues from ``step`` (named ``<run name>-from-step-<step>``, a child of the old
    run in MLflow's UI) and the old run keeps the abandoned steps, tagged ``g3dr.abandoned_after_step`` and
    ``g3dr.continued_in``; the new run carries ``g3dr.forked_from_run`` and ``g3dr.forked_at_step``. No curve of
    either run then holds two values of one step.
    """
    if not is_main:
        return NullTracker()
    run_name = cfg.logging.run_name or Path(cfg.run_dir).name
    if forked_from is not None:
        run_name = f"{run_name}-from-step-{forked_from[1]}"
    tracker = MlflowTracker(tracking_uri(cfg), experiment_name(cfg), run_name, run_id=run_id,
                            artifact_location=artifact_location(cfg))
    if run_id is None:
        tracker.log_params(flatten_config(cfg))
    if tracker.active:  # on every start: a requeued job has another job id and host
        tracker.set_tags(run_tags(cfg, world_size))
    if forked_from is not None and tracker.active:
        old_run, step, abandoned = forked_from
        tracker.set_tags({FORKED_FROM_RUN_TAG: old_run, FORKED_AT_STEP_TAG: step, "mlflow.parentRunId": old_run,
                          "g3dr.abandoned_checkpoints": ",".join(abandoned)})
        tracker.set_tags({ABANDONED_AFTER_STEP_TAG: step, CONTINUED_IN_TAG: tracker.run_id}, run_id=old_run)
        log.warning("rollback to step %d: MLflow run %s continues in the new run %s (the abandoned steps stay in "
                    "the old run, tagged %s)", step, old_run, tracker.run_id, ABANDONED_AFTER_STEP_TAG)
    return tracker


class EvalTracker:
    """Rank-0 MLflow client for evaluation runs: every call must succeed (bounded retries, then a
    :class:`~g3dr.errors.TrackingError`). One run per (checkpoint, eval config), nested under a sweep run; a run
    counts as done only with status ``FINISHED``.

    Several eval jobs may log to one sqlite store at once (a ``g3dr submit eval`` array): the store is created once
    under a file lock and "database is locked" is waited for up to ``lock_wait_s`` seconds, on top of (and not
    counted as) the ordinary attempts.
    """

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
        def locked() -> None:
            self.lock_retries += 1
            if self.lock_retries in (1, 10) or self.lock_retries % 100 == 0:
                log.warning("MLflow: %s: the sqlite store is locked by another job (%d lock retries so far); "
                            "retrying", what, self.lock_retries)

        def failed(attempt: int, err: Exception) -> None:
            log.warning("MLflow: %s failed (attempt %d/%d: %s); retrying", what, attempt, self.attempts,
                        type(err).__name__)

        try:
            return call_with_retries(fn, self.attempts, self.retry_wait_s, self.lock_wait_s, on_lock=locked,
                                     on_retry=failed)
        except Exception as err:
            raise TrackingError(f"MLflow at {self.uri}: {what} failed after {self.attempts} attempts "
                                f"({type(err).__name__}: {str(err)[:300]}); check that the tracking server "
                                f"is up (results stay in the eval directory as JSON)") from None

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
