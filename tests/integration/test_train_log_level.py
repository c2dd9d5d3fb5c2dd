"""``logging.level`` is the training's console level unless ``--log-level`` or ``$G3DR_LOG_LEVEL`` says otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_logging_level_of_the_config_sets_the_console_level(tmp_path, repo_root):
    g3dr = str(Path(sys.executable).parent / "g3dr")
    env = {k: v for k, v in os.environ.items()
           if k not in ("G3DR_LOG_LEVEL", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"

    def train(name: str, *before: str) -> str:
        proc = subprocess.run([g3dr, *before, "train", "--config", "configs/tiny.yaml", f"run_dir={tmp_path / name}",
                               f"data.synthetic_dir={tmp_path / 'synth'}", "data.synthetic_size=4",
                               "train.total_steps=1", "train.image_every=0", "logging.level=WARNING", "--no-export"],
                              cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr

    quiet = train("quiet")
    assert "INFO    [rank" not in quiet, quiet[-2000:]  # our format (MLflow logs its own INFO lines)
    # the flag winning over the config, and the per-window log line: tests/integration/test_train_cli.py
