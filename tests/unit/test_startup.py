"""Start-up of a job: no C++ build the run does not use, builds kept with their environment, and outputs with the
user's umask (issue 17, item 6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROBE = '''
import json, os, sys, time
import torch
from g3dr.distributed import DistEnv, init_process_group

started = time.time()
init_process_group(DistEnv(), "cpu", via="deepspeed")
from deepspeed.comm import comm
print(json.dumps({"seconds": time.time() - started, "shm_op": comm.cdb.shm_comm_op is not None,
                  "extensions": os.environ.get("TORCH_EXTENSIONS_DIR")}))
'''


def test_a_single_process_start_builds_no_deepspeed_op_and_keeps_builds_with_its_environment(tmp_path, repo_root):
    """With a cold, private extensions cache (HOME points at an empty folder and TORCH_EXTENSIONS_DIR is unset, as
    for a user outside `make`), initialising training's process group compiles nothing: DeepSpeed's CPU
    shared-memory op (55 to 90 s to build) is used only by tensor-parallel inference. Any op a run does build goes
    to the environment's own folder, not the cache other virtualenvs share."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    env.update(HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "home" / ".cache"), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["shm_op"] is False, "DeepSpeed's shared-memory op was built or loaded"
    assert report["extensions"] == os.path.join(sys.prefix, "torch_extensions")
    assert not (tmp_path / "home" / ".cache" / "torch_extensions").exists()  # nothing built in the shared default
    assert report["seconds"] < 20, report  # measured ~1 s; a build of the op takes 55 to 90 s
    print(f"process group initialised in {report['seconds']:.1f} s (the whole probe: {time.time() - started:.1f} s)")


def test_the_fp32_export_follows_the_umask(tmp_path, tiny_config_path):
    from g3dr.config import load_config
    from g3dr.models.checkpoint_io import save_f_trigen
    from g3dr.models.f_trigen import FTrigen

    model = FTrigen(load_config(tiny_config_path))
    previous = os.umask(0o022)
    try:
        shared = save_f_trigen(model, load_config(tiny_config_path), tmp_path / "lab.safetensors")
        os.umask(0o077)
        private = save_f_trigen(model, load_config(tiny_config_path), tmp_path / "private.safetensors")
    finally:
        os.umask(previous)
    assert oct(Path(shared).stat().st_mode & 0o777) == oct(0o644)  # readable by the lab, as torch.save's files
    assert oct(Path(private).stat().st_mode & 0o777) == oct(0o600)
