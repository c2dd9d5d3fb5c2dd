"""A real SIGKILL in the middle of a real checkpoint save: the previous checkpoint stays, ``--resume auto`` takes it.

The unit test in test_train_checkpoint.py interrupts a stand-in engine; here a real training process (DeepSpeed
engine, tiny config) is SIGKILLed after DeepSpeed has written its files for step 4 and before the save is
complete (no per-rank state, no meta.json, no rename), as a node failure or the OOM killer would do it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = '''
import os, signal, sys
from g3dr.config import load_config
from g3dr.log import setup_logging
from g3dr.train import checkpoint as ckpt
from g3dr.train.trainer import train

setup_logging("INFO")
real_save = ckpt.save_checkpoint

def save_then_die_at_step_4(engine, root, step, *args, **kwargs):
    if step == 4:
        deepspeed_save = engine.save_checkpoint

        def killed(*a, **k):
            deepspeed_save(*a, **k)  # DeepSpeed's model and optimizer files are in step-4.partial now
            os.kill(os.getpid(), signal.SIGKILL)

        engine.save_checkpoint = killed
    return real_save(engine, root, step, *args, **kwargs)

ckpt.save_checkpoint = save_then_die_at_step_4
train(load_config("configs/tiny.yaml", sys.argv[1:]))
'''


@pytest.mark.slow
def test_sigkill_mid_save_then_resume_auto(tmp_path, repo_root):
    from g3dr.train import checkpoint as ckpt

    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", f"data.synthetic_dir={tmp_path}/synthetic", "train.total_steps=6",
                 "train.checkpoint_every=2", "train.keep_last=3", "train.image_every=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    (tmp_path / "worker.py").write_text(WORKER)
    killed = subprocess.run([sys.executable, str(tmp_path / "worker.py"), *overrides], cwd=repo_root, env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    root = run_dir / "checkpoints"
    partial = root / "step-4.partial"
    assert partial.is_dir() and any(partial.glob("*model_states.pt"))  # the save was really under way
    assert not (partial / "meta.json").exists() and not (root / "step-4").exists()
    assert ckpt.find_latest(root) == root / "step-2"
    assert (root / "latest").read_text().strip() == "step-2"

    g3dr = str(Path(sys.executable).parent / "g3dr")
    done = subprocess.run([g3dr, "train", "--config", "configs/tiny.yaml", *overrides, "--resume", "auto"],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {root / 'step-2'} at step 2" in done.stderr
    assert [ckpt.step_of(p) for p in ckpt.list_complete(root)] == [2, 4, 6]
    assert not partial.exists()  # the killed save's leftovers were replaced, not loaded
    assert (run_dir / "f_trigen.safetensors").is_file()
