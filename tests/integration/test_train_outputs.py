"""``g3dr train`` and unwritable output: a read-only folder, a full disk, a file where a folder should be.

Real faults, from a read-only or tiny tmpfs in a private mount namespace (``tests/helpers/fs_faults.py``): the
kernel returns EROFS and ENOSPC as it would on a cluster. Skipped where such namespaces are not allowed.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

TINY = ["--config", "configs/tiny.yaml", "train.image_every=0"]


@pytest.fixture
def fs_faults(helper_module):
    module = helper_module("fs_faults")
    reason = module.unavailable_reason()
    if reason:
        pytest.skip(reason)
    return module


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run_cases(fs_faults, tmp_path: Path, cases: list[list[str]], mounts: dict[Path, str],
               repo_root: Path) -> list[dict]:
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    helper = repo_root / "tests" / "helpers" / "cli_cases.py"
    proc = fs_faults.run_with_tmpfs(f"exec {sys.executable} {helper} {tmp_path / 'cases.json'} {tmp_path / 'out.json'}",
                                    mounts, cwd=repo_root, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "out.json").read_text())


def test_unwritable_output_fails_before_the_first_step_with_one_line(fs_faults, tmp_path, repo_root):
    synth = f"data.synthetic_dir={tmp_path / 'synthetic'}"
    ro_ckpt, ro_run, small, file_run = (tmp_path / n for n in ("ro-ckpt", "ro-run", "small", "file-run"))
    file_run.write_text("not a folder")
    cases = [["train", *TINY, f"run_dir={ro_ckpt}", synth],
             ["train", *TINY, f"run_dir={ro_run}", synth],
             ["train", *TINY, f"run_dir={small}", synth],
             ["train", *TINY, f"run_dir={file_run}", synth],
             ["train", *TINY, f"run_dir={file_run / 'sub'}", synth]]
    mounts = {ro_ckpt / "checkpoints": "ro", ro_run: "ro", small / "checkpoints": "size=1m"}
    results = _run_cases(fs_faults, tmp_path, cases, mounts, repo_root)
    expected = [
        rf"checkpoint folder {ro_ckpt / 'checkpoints'} cannot be written: the file system is read-only \(EROFS\); "
        r"set run_dir to a writable folder",
        rf"run_dir {ro_run} cannot be written: the file system is read-only \(EROFS\)",
        rf"checkpoint folder {small / 'checkpoints'}: 1.0 MB free, but one checkpoint takes about 2.\d MB; free space",
        rf"run_dir {file_run} is a file, not a folder",
        rf"run_dir {file_run / 'sub'} cannot be a folder: {file_run} is a file",
    ]
    for result, pattern in zip(results, expected):
        assert result["rc"] == 2, result
        assert "Traceback" not in result["stderr"], result["stderr"]
        errors = [line for line in result["stderr"].splitlines() if line.startswith("g3dr train: error: ")]
        assert len(errors) == 1 and re.search(pattern, errors[0]), result["stderr"][-2000:]
        assert "step/s" not in result["stderr"]  # not one training step was run
    assert not (ro_ckpt / "config.yaml").exists() and not (small / "config.yaml").exists()


def test_a_disk_that_fills_mid_run_is_a_clear_error_and_keeps_the_previous_checkpoint(fs_faults, tmp_path, repo_root):
    """A 4 MB checkpoint disk holds one tiny checkpoint (2.7 MB) but not two: the save of step 2 fails."""
    run = tmp_path / "run"
    g3dr = Path(sys.executable).parent / "g3dr"
    train = [str(g3dr), "train", *TINY, f"run_dir={run}", f"data.synthetic_dir={tmp_path / 'synthetic'}",
             "train.total_steps=3", "train.checkpoint_every=1", "train.keep_last=1"]
    check = ("from g3dr.train import checkpoint as c; import json, sys; r = sys.argv[1]; "
             "print(json.dumps({'latest': str(c.find_latest(r)), 'problems': c.verify_checkpoint(c.find_latest(r)), "
             "'names': sorted(p.name for p in __import__('pathlib').Path(r).iterdir())}))")
    script = (" ".join(f"'{a}'" for a in train) + f" 2> {tmp_path / 'train.err'}; echo $? > {tmp_path / 'rc'}; "
              f"{sys.executable} -c \"{check}\" {run / 'checkpoints'}")
    proc = fs_faults.run_with_tmpfs(script, {run / "checkpoints": "size=4m"}, cwd=repo_root, env=_env())
    stderr = (tmp_path / "train.err").read_text()
    assert (tmp_path / "rc").read_text().strip() == "2", stderr[-3000:]
    assert "Traceback" not in stderr
    assert re.search(rf"g3dr train: error: saving checkpoint step-2 to {run / 'checkpoints'} failed on rank 0: the disk "
                     rf"is full, .* free \(ENOSPC\); the previous checkpoint {run / 'checkpoints' / 'step-1'} is intact. "
                     r"Free space or fix the folder, then rerun with --resume auto", stderr), stderr[-3000:]
    assert "train.keep_last=1 keeps up to 2 checkpoints" in stderr  # the preflight warned about the peak
    state = json.loads(proc.stdout.strip().splitlines()[-1])
    assert state["latest"] == str(run / "checkpoints" / "step-1") and state["problems"] == []
    assert "step-2.partial" not in state["names"]  # the failed save's space was given back
