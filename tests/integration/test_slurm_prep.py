"""``g3dr submit prep shards`` on the local SLURM cluster: an array of 3 shard jobs, then the merge + validate
job (``afterok`` on the array), over the 24 real release samples."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

G3DR = Path(sys.executable).with_name("g3dr")
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def cluster(slurm_cluster):
    slurm_cluster("debug")


def _prep_args(src: Path, out: Path) -> list[str]:
    return ["--src", str(src), "--layout", "release", "--out", str(out), "--resolution", "64", "--shard-size", "4",
            "--no-progress"]


def test_prep_dry_run_prints_array_and_dependent_merge(cluster, release_samples, tmp_path):
    out = subprocess.run([str(G3DR), "submit", "prep", "shards", "--num-shard-jobs", "3", "--dry-run", "--",
                          *_prep_args(release_samples, tmp_path / "shards")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "#SBATCH --array=0-2%3" in lines and "#SBATCH --job-name=g3dr-prep" in lines
    assert "#SBATCH --job-name=g3dr-prep-merge" in lines and "#SBATCH --dependency=afterok:ARRAY_JOB_ID" in lines
    assert not (tmp_path / "shards").exists() and not (tmp_path / "shards-slurm").exists()


def test_prep_refuses_bad_arguments_before_submitting(cluster, release_samples, tmp_path):
    out = subprocess.run([str(G3DR), "submit", "prep", "shards", "--num-shard-jobs", "3", "--",
                          *_prep_args(release_samples, tmp_path / "shards"), "--no-such-flag"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unrecognized arguments: --no-such-flag" in out.stderr
    assert not (tmp_path / "shards-slurm").exists()


def test_prep_array_of_three_then_merge_validates(cluster, release_samples, tmp_path):
    shards = tmp_path / "shards"
    start = time.monotonic()
    out = subprocess.run([str(G3DR), "submit", "prep", "shards", "--num-shard-jobs", "3", "--time", "5", "--wait",
                          "--", *_prep_args(release_samples, shards)], capture_output=True, text=True, timeout=800)
    elapsed = time.monotonic() - start
    logs = {p.name: p.read_text(errors="replace") for p in sorted((tmp_path / "shards-slurm").glob("*/*_log.err"))}
    assert out.returncode == 0, out.stdout + out.stderr + "\n".join(logs.values())
    print(f"prep array of 3 + merge/validate via SLURM: {elapsed:.1f}s")
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["num_inputs"] == 24 and manifest["num_samples"] == 24 and manifest["num_shards"] == 6
    # Written last by the merge job: the command that runs it by hand, not the job's own (submitit's) argv.
    assert manifest["command"] == shlex.join(["g3dr", "prep", "shards", *_prep_args(release_samples, shards),
                                              "--shard-index", "0", "--num-shard-jobs", "1"])
    array_logs = {k: v for k, v in logs.items() if re.match(r"\d+_\d_0_log\.err", k)}
    assert len(array_logs) == 3, sorted(logs)
    for i in range(3):
        assert sum(f"this job ({i}/3): 2 to write, 0 already finished" in v for v in array_logs.values()) == 1
    merge_logs = [v for k, v in logs.items() if k not in array_logs]
    assert len(merge_logs) == 1 and "this job (0/1): 0 to write, 6 already finished" in merge_logs[0]
    assert "g3dr prep validate" in merge_logs[0] and "prep merge + validate: finished" in out.stdout
    # The validate step's summary (it exits 1 on any problem, which would fail the job).
    merge_out = [p.read_text() for p in (tmp_path / "shards-slurm").glob("*/*_0_log.out")
                 if not re.match(r"\d+_\d+_\d+_log", p.name)]  # array logs are A_a_t_log.out
    summaries = [json.loads(line) for text in merge_out for line in text.splitlines() if line.startswith('{"folder"')]
    assert summaries == [{"folder": str(shards), "problems": 0, "rejected": 0, "samples": 24, "shards": 6}]
