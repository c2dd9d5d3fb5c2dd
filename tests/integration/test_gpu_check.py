"""``make gpu-check`` (``g3dr bench gpu-check``) where there is no GPU: it says so and fails at once; with
``--allow-cpu`` the same script runs its steps at toy sizes on the CPU and writes its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from g3dr.gpu_check import cuda_present

G3DR = str(Path(sys.executable).with_name("g3dr"))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.skipif(cuda_present(), reason="this machine has an NVIDIA driver")
def test_without_a_gpu_it_says_so_and_fails(tmp_path):
    proc = subprocess.run([G3DR, "bench", "gpu-check", "--out", str(tmp_path / "gc")], capture_output=True, text=True,
                          timeout=60, env=_env())
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["gpu_check"] == "no CUDA device"
    assert not (tmp_path / "gc").exists()  # nothing started


def test_the_script_runs_on_the_cpu_at_toy_size(tmp_path, repo_root):
    out = tmp_path / "gc"
    proc = subprocess.run([G3DR, "bench", "gpu-check", "--allow-cpu", "--out", str(out), "--train-steps", "2",
                           "--skip", "train_paper"], capture_output=True, text=True, timeout=600, env=_env(),
                          cwd=repo_root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line == json.loads((out / "report.json").read_text())
    steps = line["steps"]
    assert {k: v["status"] for k, v in steps.items()} == {
        "renderer": "ok", "ceilings": "ok", "kernel_rates": "ok", "train_tiny": "ok", "train_paper": "skipped",
        "eval": "ok"}
    assert steps["renderer"]["max_rel_error"] < 1e-4 and steps["renderer"]["speedup"] > 0
    assert 0 < steps["kernel_rates"]["fraction_of_mm"] and steps["ceilings"]["mm_flops_per_s"] > 1e8
    assert steps["train_tiny"]["steps_per_s"] > 0 and steps["train_tiny"]["peak_memory_mb"] > 0
    assert steps["eval"]["line"].startswith("evaluated\t")
    assert "| train_tiny | ok |" in (out / "report.md").read_text()
