"""Eight eval jobs logging to one tracking store at the same moment (a `g3dr submit eval` array).

Each job is a real process doing what an eval job does when it logs (`resolve_tracking`, `EvalTracker`:
open the store, get or create the experiment, create its run with the eval tags, log params, metrics and an
artifact, end the run FINISHED). The processes import everything first and then start together, so they
open a *new* store at the same instant: before the store was created under a file lock, most of them died
with "table ... already exists", alembic revision mismatches or "database is locked".
Checked against (a) a real `mlflow server` (sqlite behind it) and (b) the default shared sqlite file.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from g3dr.errors import TrackingError
from g3dr.tracking import EvalTracker, get_or_create_experiment, is_lock_error, resolve_tracking, sqlite_db_path
from g3dr_test_support import load_test_helper

JOBS = 8
EXPERIMENT = "concurrent-evals"


def _load(name: str):
    return load_test_helper(name)


# One eval job's tracking, as Evaluator.ensure_tracker / evaluate / _log_run do it. argv: tracking base dir,
# job index, sync dir. It signals "ready" after its imports and waits for the file "go", which holds the
# tracking URI ("" for the default sqlite store under the base dir).
WORKER = r"""
import json, sys, time
from pathlib import Path
base, index, sync = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
import mlflow.tracking, mlflow.store.tracking.sqlalchemy_store  # noqa: F401 - the slow imports, before the start
from g3dr.tracking import EvalTracker, resolve_tracking
(sync / f"ready-{index}").touch()
deadline = time.monotonic() + 120
while not (sync / "go").exists():
    if time.monotonic() > deadline:
        sys.exit("no go signal")
    time.sleep(0.005)
uri, artifacts = resolve_tracking((sync / "go").read_text(), base)
tracker = EvalTracker(uri, "concurrent-evals", artifacts, attempts=3, retry_wait_s=1.0)
run_id = tracker.start_run(f"ck{index}-step{index}", {"g3dr.kind": "eval", "g3dr.checkpoint_id": f"ck{index}",
                                                    "g3dr.eval_hash": "h"})
tracker.log_params(run_id, {"checkpoint_step": index, **{f"eval.p{k}": k for k in range(30)}})
tracker.log_metrics(run_id, {f"fid/s{s}": index + s / 10 for s in (1, 5, 10, 50)}, step=index)
out = sync / f"results-{index}"
out.mkdir()
(out / "results.json").write_text(json.dumps({"complete": True, "job": index}))
tracker.log_artifacts(run_id, out)
tracker.end_run(run_id, "FINISHED")
print(json.dumps({"run_id": run_id, "lock_retries": tracker.lock_retries}))
"""


class Jobs:
    """JOBS worker processes started at once (their imports overlap with starting a server); :meth:`run`
    releases them together with the tracking URI and returns their printed results (all must exit 0)."""

    def __init__(self, base: Path, sync: Path):
        sync.mkdir(parents=True, exist_ok=True)
        self.sync = sync
        self.procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(base), str(i), str(sync)],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                      for i in range(JOBS)]

    def __enter__(self) -> Jobs:
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def run(self, uri: str) -> list[dict]:
        procs, sync = self.procs, self.sync
        deadline = time.monotonic() + 180
        while len(list(sync.glob("ready-*"))) < JOBS:
            dead = [p for p in procs if p.poll() is not None]
            assert not dead, f"a job died before the start: {dead[0].communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "jobs did not get ready in 180 s"
            time.sleep(0.05)
        started = time.monotonic()
        (sync / "go.tmp").write_text(uri)
        (sync / "go.tmp").rename(sync / "go")  # atomically: no job reads a half-written URI
        outputs = [p.communicate(timeout=240) for p in procs]
        elapsed = time.monotonic() - started
        failures = [(i, p.returncode, err[-3000:]) for i, (p, (_, err)) in enumerate(zip(procs, outputs))
                    if p.returncode != 0]
        assert not failures, f"{len(failures)} of {JOBS} eval jobs failed; first: {failures[0]}"
        results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
        print(f"{JOBS} jobs logged in {elapsed:.1f} s after the start "
              f"({sum(r['lock_retries'] for r in results)} 'database is locked' retries)")
        return results


def _check_store(uri: str, results: list[dict]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = [e for e in client.search_experiments() if e.name == EXPERIMENT]
    assert len(experiments) == 1
    runs = client.search_runs([experiments[0].experiment_id], max_results=100)
    assert len(runs) == JOBS
    assert {r.info.run_id for r in runs} == {r["run_id"] for r in results}
    for run in runs:
        index = int(run.data.tags["g3dr.checkpoint_id"][2:])
        assert run.info.status == "FINISHED", (index, run.info.status)
        assert run.info.run_name == f"ck{index}-step{index}"
        assert run.data.metrics == {f"fid/s{s}": pytest.approx(index + s / 10) for s in (1, 5, 10, 50)}
        assert [m.step for m in client.get_metric_history(run.info.run_id, "fid/s5")] == [index]
        assert len(run.data.params) == 31 and run.data.params["checkpoint_step"] == str(index)
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["results.json"]


@pytest.mark.slow
def test_eight_concurrent_eval_jobs_on_a_new_shared_sqlite_store(tmp_path):
    base = tmp_path / "sweep"  # every checkpoint of the array in one folder: one default store for all jobs
    with Jobs(base, tmp_path / "sync") as jobs:
        results = jobs.run("")
    uri, _ = resolve_tracking("", base)
    assert uri == f"sqlite:///{base.resolve() / 'mlflow.db'}"
    _check_store(uri, results)


@pytest.mark.slow
def test_eight_concurrent_eval_jobs_on_an_mlflow_server(tmp_path):
    server = _load("mlflow_server")
    with Jobs(tmp_path / "unused-base", tmp_path / "sync") as jobs:
        with server.running_mlflow_server(tmp_path / "server") as uri:
            results = jobs.run(uri)
            _check_store(uri, results)
    assert not (tmp_path / "unused-base" / "mlflow.db").exists()


# ------------------------------------------------------------------------------------------------
# The pieces, one process
# ------------------------------------------------------------------------------------------------


def test_sqlite_db_path_of_uris(tmp_path):
    assert sqlite_db_path(f"sqlite:///{tmp_path}/a/mlflow.db") == tmp_path / "a" / "mlflow.db"
    assert sqlite_db_path("sqlite:///rel/x.db") == Path("rel/x.db").resolve()
    assert sqlite_db_path("sqlite://") is None and sqlite_db_path("sqlite:///:memory:") is None
    assert sqlite_db_path("http://127.0.0.1:5000") is None and sqlite_db_path("postgresql://h/db") is None


def test_lock_errors_are_recognised_through_wrapping():
    from mlflow.exceptions import MlflowException

    try:
        try:
            raise sqlite3.OperationalError("database is locked")
        except sqlite3.OperationalError as inner:
            raise MlflowException("(sqlite3.OperationalError) ...", error_code="TEMPORARILY_UNAVAILABLE") from inner
    except MlflowException as wrapped:
        assert is_lock_error(wrapped)
    assert not is_lock_error(sqlite3.OperationalError("table runs already exists"))
    assert not is_lock_error(ConnectionError("refused"))


def test_experiment_created_meanwhile_by_another_job_is_used():
    class Exp:
        experiment_id = "7"

    class Client:
        """The race: not found, then the create fails because another job created it, then found."""

        def __init__(self):
            self.lookups = 0

        def get_experiment_by_name(self, name):
            self.lookups += 1
            return None if self.lookups == 1 else Exp()

        def create_experiment(self, name, artifact_location=None):
            raise RuntimeError("RESOURCE_ALREADY_EXISTS: Experiment(name=x) already exists")

    assert get_or_create_experiment(Client(), "x") == "7"

    class Broken(Client):
        def get_experiment_by_name(self, name):
            return None

    with pytest.raises(RuntimeError, match="ALREADY_EXISTS"):
        get_or_create_experiment(Broken(), "x")


def test_database_is_locked_is_retried_without_using_up_attempts(tmp_path):
    uri, artifacts = resolve_tracking("", tmp_path)
    tracker = EvalTracker(uri, "e", artifacts, attempts=1, retry_wait_s=0.0, lock_wait_s=30.0)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) <= 3:
            raise sqlite3.OperationalError("database is locked")
        return "done"

    assert tracker._call(flaky, "create run") == "done"
    assert len(calls) == 4 and tracker.lock_retries == 3
    # a store locked for longer than lock_wait_s is a clear TrackingError, not a hang
    tracker.lock_wait_s = 0.3
    started = time.monotonic()
    with pytest.raises(TrackingError, match="database is locked"):
        tracker._call(lambda: (_ for _ in ()).throw(sqlite3.OperationalError("database is locked")), "log metrics")
    assert time.monotonic() - started < 10
    # other errors still use the ordinary attempts (here: one)
    with pytest.raises(TrackingError, match="1 attempts"):
        tracker._call(lambda: (_ for _ in ()).throw(ConnectionError("refused")), "log metrics")


@pytest.mark.slow
def test_a_store_locked_past_mlflows_busy_timeout_is_waited_for(tmp_path):
    """A real sqlite write lock held longer than MLflow's 20 s busy timeout: MLflow raises its wrapped
    "database is locked", which the tracker recognises and retries until the lock is gone."""
    import threading

    uri, artifacts = resolve_tracking("", tmp_path)
    tracker = EvalTracker(uri, "locked", artifacts, attempts=1, retry_wait_s=0.0, lock_wait_s=120.0)
    holder = sqlite3.connect(sqlite_db_path(uri), isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # as another job in the middle of a long write
    release = threading.Timer(23.0, lambda: holder.execute("COMMIT"))
    release.start()
    try:
        started = time.monotonic()
        run_id = tracker.start_run("while-locked", {"g3dr.kind": "eval"})
        waited = time.monotonic() - started
    finally:
        release.join()
        holder.close()
    assert tracker.lock_retries >= 1 and waited >= 20.0
    tracker.end_run(run_id)
    assert tracker.client.get_run(run_id).info.status == "FINISHED"
