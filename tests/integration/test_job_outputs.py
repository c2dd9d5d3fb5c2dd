"""``g3dr prep shards``, ``g3dr render`` and ``g3dr eval`` meet an output location they cannot write: a read-only file
system, a full disk, a file where a folder should be. Each is one line naming the flag, the location and the cause,
before the job does its work (or, for a disk that fills mid-way, when the write fails), never a traceback.

Real faults from tmpfs mounts in a private mount namespace (``tests/helpers/fs_faults.py``); all cases of a test run
in one process (``tests/helpers/cli_cases.py``) so the imports are paid once.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def fs_faults(helper_module):
    module = helper_module("fs_faults")
    reason = module.unavailable_reason()
    if reason:
        pytest.skip(reason)
    return module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_config_path, helper_module):
    return helper_module("tiny_models").save_perturbed_f_trigen(
        tiny_config_path, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", step=5)


def release_pairs(folder: Path, n: int, size: int = 64, seed: int = 0) -> Path:
    """``n`` random-noise images with 16-bit depth maps in the release layout (NAME.jpg beside NAME_depth.png)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"p{i}.jpg", quality=95)
        Image.fromarray(rng.integers(0, 65535, (size, size)).astype(np.uint16)).save(folder / f"p{i}_depth.png")
    return folder


def _run_cases(fs_faults, tmp_path, repo_root, cases, mounts, after: str = "") -> tuple[list[dict], str]:
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    helper = repo_root / "tests" / "helpers" / "cli_cases.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = fs_faults.run_with_tmpfs(f"{sys.executable} {helper} {tmp_path / 'cases.json'} {tmp_path / 'out.json'}"
                                    f" || exit 1\n{after}", mounts, cwd=repo_root, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "out.json").read_text()), proc.stdout


def _one_error_line(result: dict, command: str, pattern: str) -> None:
    assert result["rc"] == 2, result
    assert "Traceback" not in result["stderr"], result["stderr"][-3000:]
    errors = [line for line in result["stderr"].splitlines() if line.startswith(f"g3dr {command}: error: ")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), (pattern, result["stderr"][-2000:])


def test_prep_shards_out_read_only_full_or_a_file(fs_faults, tmp_path, repo_root):
    src = release_pairs(tmp_path / "src", 3)
    ro, full, a_file = tmp_path / "ro", tmp_path / "full", tmp_path / "a-file"
    a_file.write_text("x")
    prep = ["prep", "shards", "--src", str(src), "--layout", "release", "--no-progress", "--out"]
    cases = [[*prep, str(ro)], [*prep, str(a_file)], [*prep, str(a_file / "shards")], [*prep, str(full)]]
    results, listing = _run_cases(fs_faults, tmp_path, repo_root, cases, {ro: "ro", full: "size=64k"},
                                  after=f"ls -A {full}")
    _one_error_line(results[0], "prep", rf"--out {ro} cannot be written: the file system is read-only \(EROFS\)")
    _one_error_line(results[1], "prep", rf"--out {a_file} is a file, not a folder")
    _one_error_line(results[2], "prep", rf"--out {a_file / 'shards'} cannot be a folder: {a_file} is a file")
    # 64 KB hold the records folder but not one shard (3 inputs stored at 128 px): the write fails mid-shard.
    _one_error_line(results[3], "prep", rf"writing shard {full / 'train-000000.tar'} failed: the disk is full, .* free "
                                        r"\(ENOSPC\); free space \(or choose another --out\) and rerun")
    assert listing.split() == ["_records"]  # the half-written shard gave its space back


def test_render_outputs_read_only_or_mistyped(fs_faults, tmp_path, repo_root, checkpoint):
    src = release_pairs(tmp_path / "src", 1)
    ro, a_file, a_dir = tmp_path / "ro", tmp_path / "a-file", tmp_path / "a-dir"
    a_file.write_text("x")
    a_dir.mkdir()
    render = ["render", "--checkpoint", str(checkpoint), "--image", str(src / "p0.jpg"), "--depth",
              str(src / "p0_depth.png"), "--device", "cpu"]
    cases = [[*render, "--png", str(ro / "out.png")], [*render, "--png", str(a_file / "out.png")],
             [*render, "--png", str(a_dir)], [*render, "--save-npz", str(ro / "out.npz")]]
    results, _ = _run_cases(fs_faults, tmp_path, repo_root, cases, {ro: "ro"})
    _one_error_line(results[0], "render", rf"--png {ro / 'out.png'}: its folder {ro} cannot be written: the file "
                                          r"system is read-only \(EROFS\)")
    _one_error_line(results[1], "render", rf"--png {a_file / 'out.png'}: its folder {a_file} is a file, not a folder")
    _one_error_line(results[2], "render", rf"--png {a_dir} is a folder; give a file name")
    _one_error_line(results[3], "render", rf"--save-npz {ro / 'out.npz'}: its folder {ro} cannot be written")
    for result in results:
        assert "rendered" not in result["stderr"]  # nothing was rendered first


def test_eval_output_folders_read_only_or_a_file(fs_faults, tmp_path, repo_root, checkpoint):
    ro, a_file = tmp_path / "ro", tmp_path / "a-file"
    a_file.write_text("x")
    evaluate = ["eval", "--checkpoint", str(checkpoint), "--metrics", "nfs", "--no-progress"]
    cases = [[*evaluate, "--out", str(ro / "eval")], [*evaluate, "--out", str(a_file)],
             [*evaluate, "--out", str(tmp_path / "ok"), "--save-images", str(ro / "images")]]
    results, _ = _run_cases(fs_faults, tmp_path, repo_root, cases, {ro: "ro"})
    _one_error_line(results[0], "eval", rf"--out {ro / 'eval'} cannot be written: the file system is read-only "
                                        r"\(EROFS\)")
    _one_error_line(results[1], "eval", rf"--out {a_file} is a file, not a folder")
    _one_error_line(results[2], "eval", rf"--save-images {ro / 'images'} cannot be written: the file system is "
                                        r"read-only \(EROFS\)")
