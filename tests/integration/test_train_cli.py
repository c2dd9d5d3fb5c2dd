"""``g3dr train`` end to end as a user runs it: SIGTERM checkpoints and exits 75; ``--resume auto`` finishes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.mark.slow
def test_sigterm_checkpoints_then_resume_auto_finishes(tmp_path, repo_root):
    from g3dr.train import checkpoint as ckpt

    g3dr = str(Path(sys.executable).parent / "g3dr")
    run_dir = tmp_path / "run"
    args = [g3dr, "train", "--config", "configs/tiny.yaml", f"run_dir={run_dir}",
            f"data.synthetic_dir={tmp_path}/synthetic", "train.total_steps=500", "train.checkpoint_every=1000",
            "train.image_every=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.Popen(args, cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not (run_dir / "config.yaml").is_file():  # written after setup, once signals are caught
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "training did not start"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, out[-3000:]
    assert "stopped by a signal" in out
    saved = ckpt.find_latest(run_dir / "checkpoints")
    assert saved is not None and 1 <= ckpt.step_of(saved) < 500
    assert not (run_dir / "f_trigen.safetensors").exists()  # no export of an unfinished run

    done = subprocess.run([str(Path(sys.executable).parent / "g3dr"), "--log-level", "INFO", *args[1:-3],
                           "train.total_steps=" + str(ckpt.step_of(saved) + 2), "train.checkpoint_every=1000",
                           "train.image_every=0", "logging.level=WARNING", "--resume", "auto"],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {saved}" in done.stderr  # an INFO line: --log-level wins over logging.level=WARNING
    assert "\r" not in done.stderr and "step/s" not in done.stderr  # stderr is a pipe: no progress bar in a log
    # one plain line per logging window (tiny: every step), what an operator reads in a SLURM log
    last = ckpt.step_of(saved) + 2
    line = next(x for x in done.stderr.splitlines() if f"g3dr.train: step {last}/{last} | " in x)
    for field in ("total ", "| lr ", "| grad_norm ", "samples/s", "| data_wait ", "| peak_mem ", "| eta 0m00s"):
        assert field in line, line
    final = ckpt.find_latest(run_dir / "checkpoints")
    assert ckpt.step_of(final) == ckpt.step_of(saved) + 2
    assert (run_dir / "f_trigen.safetensors").is_file()
