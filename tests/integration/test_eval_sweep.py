"""Sweeps on a sqlite MLflow store: newest first, skip what is finished, redo what was interrupted,
upload results whose upload failed without recomputing, exit cleanly on SIGTERM in watch mode."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from g3dr.distributed import DistEnv
from g3dr.eval.evaluate import EvalSpec
from g3dr.eval.runner import EvalOptions, Evaluator, checkpoint_ref, discover_checkpoints, run_sweep, stop_signal
from g3dr.errors import TrackingError
from g3dr_test_support import load_test_helper

fx = load_test_helper("eval_fixtures")


@pytest.fixture()
def run_dir(tmp_path):
    cfg = fx.tiny_config(tmp_path)
    fx.make_inception(cfg)
    run = tmp_path / "run"
    fx.make_checkpoint(cfg, run / "exports" / "step-10.safetensors", step=10, seed=1)
    fx.make_checkpoint(cfg, run / "exports" / "step-20.safetensors", step=20, seed=2, training_run_id="train-run-1")
    (run / "checkpoints" / "step-30.partial").mkdir(parents=True)
    fx.make_checkpoint(cfg, run / "checkpoints" / "step-30.partial" / "f_trigen.safetensors", step=30)
    (run / "broken.safetensors").write_bytes(b"garbage")
    return run


def _options(run_dir: Path, **kw) -> EvalOptions:
    return EvalOptions(out_dir=run_dir / "eval", mlflow_uri=f"sqlite:///{run_dir / 'mlflow.db'}",
                       experiment="eval-test", tracking_base=run_dir, progress=False, retry_wait_s=0.05,
                       overrides=("eval.sigma_scales=[1.0]", "eval.views=[canonical]", *kw.pop("overrides", ())), **kw)


def _runs(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("eval-test")
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_discovery_is_newest_first_and_ignores_partial_and_broken(run_dir):
    refs = discover_checkpoints(run_dir)
    assert [r.step for r in refs] == [20, 10]
    assert refs[0].training_run_id == "train-run-1" and refs[1].training_run_id == ""
    assert refs[0].id != refs[1].id


def test_sweep_skips_finished_and_redoes_interrupted(run_dir):
    # 1) interrupted during the first (newest) checkpoint: its run is KILLED, nothing complete on disk
    stop = stop_signal()
    calls = {"n": 0}

    def stop_after_first_batch() -> bool:
        calls["n"] += 1
        return calls["n"] > 1 or stop()

    evaluator = Evaluator(_options(run_dir, overrides=("eval.batch_size=3",)), DistEnv(), stop)
    evaluator.stop = stop_after_first_batch
    report = run_sweep(run_dir, evaluator)
    assert report.interrupted and report.outcomes == []
    client, runs = _runs(run_dir)
    eval_runs = [r for r in runs if r.data.tags.get("g3dr.kind") == "eval"]
    assert [r.info.status for r in eval_runs] == ["KILLED"]
    assert eval_runs[0].data.tags["g3dr.step"] == "20" and not eval_runs[0].data.metrics
    saved = json.loads(next((run_dir / "eval").glob("step-20-step20-*/results.json")).read_text())
    assert saved["complete"] is False and saved["status"] == "interrupted"

    # 2) a full sweep evaluates both, newest first, nested under one sweep run
    report = run_sweep(run_dir, Evaluator(_options(run_dir, overrides=("eval.batch_size=3",)), DistEnv()))
    assert [(o.status, o.checkpoint.step) for o in report.outcomes] == [("evaluated", 20), ("evaluated", 10)]
    client, runs = _runs(run_dir)
    finished = [r for r in runs if r.data.tags.get("g3dr.kind") == "eval" and r.info.status == "FINISHED"]
    assert [r.data.tags["g3dr.step"] for r in finished] == ["20", "10"]
    assert {r.data.tags["mlflow.parentRunId"] for r in finished} == {report.parent_run_id}
    assert client.get_run(report.parent_run_id).info.status == "FINISHED"
    assert finished[0].data.tags["g3dr.training_run_id"] == "train-run-1"
    # only canonical views were rendered: they are the table view, so FID/IS carry no view suffix
    assert set(finished[0].data.metrics) == {"is/s1", "is_std/s1", "nfs/s1", "da/s1"}
    assert finished[0].data.params["checkpoint_step"] == "20"

    # 3) the same eval config again: nothing to do, no new runs (not even a sweep run)
    before = len(runs)
    report = run_sweep(run_dir, Evaluator(_options(run_dir, overrides=("eval.batch_size=3",)), DistEnv()))
    assert [o.status for o in report.outcomes] == ["skipped", "skipped"] and report.parent_run_id is None
    assert len(_runs(run_dir)[1]) == before

    # 4) batch size is not part of the eval config; the number of samples is
    report = run_sweep(run_dir, Evaluator(_options(run_dir, overrides=("eval.batch_size=4",)), DistEnv()))
    assert [o.status for o in report.outcomes] == ["skipped", "skipped"]
    report = run_sweep(run_dir, Evaluator(_options(run_dir, overrides=("eval.num_samples=4",)), DistEnv()))
    assert [o.status for o in report.outcomes] == ["evaluated", "evaluated"]


def test_failed_upload_keeps_results_and_the_next_sweep_uploads_them(run_dir, monkeypatch):
    evaluator = Evaluator(_options(run_dir), DistEnv())
    ref = discover_checkpoints(run_dir)[1]
    evaluator.ensure_tracker(evaluator.config_for(ref))
    real_log_batch = evaluator.tracker.client.log_batch

    def failing_log_batch(run_id, metrics=(), params=(), tags=()):
        if metrics:
            raise ConnectionError("tracking server went away")
        return real_log_batch(run_id, metrics=metrics, params=params, tags=tags)

    monkeypatch.setattr(evaluator.tracker.client, "log_batch", failing_log_batch)
    with pytest.raises(TrackingError, match="3 attempts"):
        evaluator.evaluate(ref)
    saved = json.loads(next((run_dir / "eval").glob("step-10-step10-*/results.json")).read_text())
    assert saved["complete"] is True and set(saved["metrics"]) >= {"nfs/s1", "da/s1"}
    client, runs = _runs(run_dir)
    assert [r.info.status for r in runs] == ["FAILED"]

    # the next evaluation uploads the saved numbers instead of recomputing (the model is never loaded)
    monkeypatch.undo()
    fresh = Evaluator(_options(run_dir), DistEnv())
    monkeypatch.setattr(fresh, "_compute", lambda *a, **k: pytest.fail("recomputed finished results"))
    outcome = fresh.evaluate(ref)
    assert outcome.status == "uploaded" and outcome.results == saved["metrics"]
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == pytest.approx(saved["metrics"])
    assert {a.path for a in client.list_artifacts(outcome.run_id)} >= {"results.json", "table.csv", "table.md"}
    assert fresh.evaluate(ref).status == "skipped"


def test_dead_tracking_server_is_a_clear_failure(run_dir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    proc = subprocess.run([sys.executable, "-m", "g3dr.launchers.main", "eval", "--checkpoint",
                           str(run_dir / "exports" / "step-10.safetensors"), "--mlflow-uri", f"http://127.0.0.1:{port}",
                           "--retries", "2", "--no-progress"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "MLflow at http://127.0.0.1" in proc.stderr and "failed after 2 attempts" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_watch_exits_cleanly_on_sigterm(run_dir, tmp_path):
    cfg = fx.tiny_config(tmp_path)
    (run_dir / "broken.safetensors").unlink()
    (run_dir / "exports" / "step-20.safetensors").unlink()
    cmd = [sys.executable, "-m", "g3dr.launchers.main", "eval", "--sweep", str(run_dir), "--watch", "--poll-seconds", "0.5",
           "--mlflow-uri", f"sqlite:///{run_dir / 'mlflow.db'}", "--experiment", "eval-test", "--no-progress",
           "eval.sigma_scales=[1.0]", "eval.views=[canonical]", "eval.metrics=[nfs, da]"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        def wait_for(step: int, timeout: float = 240) -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                for path in (run_dir / "eval").glob(f"*-step{step}-*/results.json"):
                    if json.loads(path.read_text()).get("complete"):
                        return
                assert proc.poll() is None, proc.stderr.read()[-2000:]
                time.sleep(0.3)
            pytest.fail(f"step {step} was not evaluated in {timeout}s")

        wait_for(10)
        fx.make_checkpoint(cfg, run_dir / "exports" / "step-40.safetensors", step=40, seed=4)
        wait_for(40)  # picked up by polling
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err
    client, runs = _runs(run_dir)
    eval_runs = [r for r in runs if r.data.tags.get("g3dr.kind") == "eval"]
    assert [(r.data.tags["g3dr.step"], r.info.status) for r in eval_runs] == [("10", "FINISHED"), ("40", "FINISHED")]
    sweeps = [r for r in runs if r.data.tags.get("g3dr.kind") == "sweep"]
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"


def test_cli_single_checkpoint_and_user_errors(run_dir, tmp_path, capsys):
    from g3dr.launchers.main import main

    ck = str(run_dir / "exports" / "step-10.safetensors")
    common = ["--mlflow-uri", f"sqlite:///{run_dir / 'mlflow.db'}", "--experiment", "eval-test", "--no-progress",
              "--sigma-scales", "1", "--views", "canonical", "--num-samples", "4"]
    assert main(["eval", "--checkpoint", ck, "--metrics", "nfs,da", *common]) == 0
    out = capsys.readouterr().out
    assert out.startswith("evaluated\t") and "step=10" in out and "nfs/s1=" in out
    assert main(["eval", *common, "--metrics", "nfs,da", "--checkpoint", ck]) == 0
    assert capsys.readouterr().out.startswith("skipped\t")
    # default output folder: eval/ beside the checkpoint
    assert list((run_dir / "exports" / "eval").glob("step-10-step10-*/results.json"))

    missing = tmp_path / "nowhere" / "inception-2015-12-05.pt"
    assert main(["eval", "--checkpoint", ck, "--metrics", "fid", "--inception", str(missing), *common]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "inception-2015-12-05.pt" in err and "https://" in err
    assert main(["eval", "--checkpoint", ck, "--watch"]) == 2
    assert "--watch needs --sweep" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", ck, "eval.num_samples=0"]) == 2
    assert "eval.num_samples" in capsys.readouterr().err


def test_reference_statistics_at_the_render_resolution(run_dir, tmp_path):
    evaluator = Evaluator(_options(run_dir, overrides=("eval.render_resolution=64", "eval.metrics=[fid]")), DistEnv())
    ref = discover_checkpoints(run_dir)[0]
    cfg = evaluator.config_for(ref)
    ident = evaluator.identity(cfg, EvalSpec.from_config(cfg))
    mu, sigma = evaluator.real_stats(cfg, ident)
    files = list((tmp_path / "stats-cache").glob("inception-stats-*px-*.npz"))
    assert [f.name.split("-")[2] for f in files] == ["64px"]
    from g3dr.metrics.fid import load_moments

    assert load_moments(files[0])[2] == 16 and mu.shape == (2048,) and sigma.shape == (2048, 2048)


def test_a_broken_checkpoint_fails_alone(run_dir, capsys):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from g3dr.launchers.main import main

    good = run_dir / "exports" / "step-10.safetensors"
    with safe_open(str(good), framework="pt") as f:
        meta = dict(f.metadata())
    meta["step"] = "15"
    save_file({"unrelated": torch.zeros(1)}, str(run_dir / "exports" / "step-15.safetensors"), metadata=meta)
    (run_dir / "exports" / "step-20.safetensors").unlink()
    args = ["eval", "--sweep", str(run_dir), "--mlflow-uri", f"sqlite:///{run_dir / 'mlflow.db'}", "--experiment",
            "eval-test", "--no-progress", "--metrics", "nfs,da", "--sigma-scales", "1", "--views", "canonical",
            "--num-samples", "4"]
    assert main(args) == 1  # the sweep went on, then reports the failure
    out = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in out] == ["failed", "evaluated"]
    assert "does not match the model" in out[0]
    client, runs = _runs(run_dir)
    status = {r.data.tags.get("g3dr.step"): r.info.status for r in runs if r.data.tags.get("g3dr.kind") == "eval"}
    assert status == {"15": "FAILED", "10": "FINISHED"}


def test_two_rank_sweep_through_torchrun(run_dir):
    """`torchrun -m g3dr.launchers.main eval --sweep` on 2 ranks: rank 0 alone records, scores equal one process."""
    (run_dir / "broken.safetensors").unlink()
    dist_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env["OMP_NUM_THREADS"] = "1"
    flags = ["--metrics", "nfs,da", "--sigma-scales", "1", "--views", "canonical", "--num-samples", "5",
             "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           "-m", "g3dr.launchers.main", "eval", "--sweep", str(run_dir), "--mlflow-uri", f"sqlite:///{run_dir / 'mlflow.db'}",
           "--experiment", "eval-test", *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    client, runs = _runs(run_dir)
    evals = [r for r in runs if r.data.tags.get("g3dr.kind") == "eval"]
    assert sorted(r.data.tags["g3dr.step"] for r in evals) == ["10", "20"]
    assert all(r.info.status == "FINISHED" for r in evals)
    assert len([r for r in runs if r.data.tags.get("g3dr.kind") == "sweep"]) == 1
    # the same evaluation in one process (another output folder and experiment) gives the same numbers
    single = Evaluator(EvalOptions(out_dir=run_dir / "eval-single", mlflow_uri=f"sqlite:///{run_dir / 'mlflow.db'}",
                                   experiment="eval-single", progress=False,
                                   overrides=("eval.metrics=[nfs, da]", "eval.sigma_scales=[1]",
                                              "eval.views=[canonical]", "eval.num_samples=5")), DistEnv())
    outcome = single.evaluate(discover_checkpoints(run_dir)[0])
    two_rank = next(r for r in evals if r.data.tags["g3dr.step"] == "20").data.metrics
    assert outcome.results == pytest.approx(two_rank, rel=1e-6)


def test_same_name_and_step_in_two_runs_are_two_evaluations(run_dir, tmp_path):
    """Two runs' ``f_trigen.safetensors`` at the same step, scored into one output folder (what a study
    of variants does): each gets its own numbers, never the other's saved results."""
    cfg = fx.tiny_config(tmp_path)
    a = fx.make_checkpoint(cfg, tmp_path / "variant-a" / "f_trigen.safetensors", step=800, seed=11)
    b = fx.make_checkpoint(cfg, tmp_path / "variant-b" / "f_trigen.safetensors", step=800, seed=12)
    evaluator = Evaluator(_options(run_dir, overrides=("eval.metrics=[nfs,da]", "eval.num_samples=4")), DistEnv())
    outcomes = [evaluator.evaluate(checkpoint_ref(p)) for p in (a, b)]
    assert [o.status for o in outcomes] == ["evaluated", "evaluated"]
    assert outcomes[0].eval_dir != outcomes[1].eval_dir
    assert outcomes[0].results != outcomes[1].results
    for o, p in zip(outcomes, (a, b)):
        assert json.loads((o.eval_dir / "results.json").read_text())["checkpoint"] == str(p)

    # a results file left by another checkpoint in this checkpoint's folder is not uploaded as its own
    c = fx.make_checkpoint(cfg, tmp_path / "variant-c" / "f_trigen.safetensors", step=800, seed=13)
    ref_c = checkpoint_ref(c)
    foreign = json.loads((outcomes[0].eval_dir / "results.json").read_text())
    target = evaluator.eval_dir(ref_c, outcomes[0].eval_hash)
    target.mkdir(parents=True)
    (target / "results.json").write_text(json.dumps(foreign))
    again = evaluator.evaluate(ref_c)
    assert again.status == "evaluated" and again.results != outcomes[0].results
