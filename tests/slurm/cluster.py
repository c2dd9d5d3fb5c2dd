"""Test helper: a single-node SLURM cluster on this machine (see ``start_cluster.sh`` beside this file).

``ensure_cluster()`` returns None when a cluster is up (starting one if needed and allowed) or the reason it
cannot, for ``pytest.skip``. A cluster this helper started is stopped when the test process exits, so a
developer's machine is left as it was; one that was already running (CI starts it before ``make test``) is
left running. Tests import it by path (``--import-mode=importlib``) under one ``sys.modules`` name, so that
every test file shares one state.
"""

from __future__ import annotations

import atexit
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "start_cluster.sh"
_state: dict[str, str | None] = {}


def _up() -> bool:
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
        nodes = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=15)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return "is UP" in ping.stdout and any(s.startswith(("idle", "mix", "alloc", "comp")) for s in nodes.stdout.split())


def _partitions() -> set[str]:
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=15)
    return {p.rstrip("*") for p in out.stdout.split()}


def ensure_cluster() -> str | None:
    """None when the test cluster is usable, else why not (decided once per process)."""
    if "reason" in _state:
        return _state["reason"]
    was_up = _up()
    # The script is idempotent and quick when the cluster is up (it restarts one of ours whose config is old).
    try:
        out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        _state["reason"] = f"{SCRIPT.name} did not finish in 600 s"
        return _state["reason"]
    if out.returncode != 0:
        why = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit status {out.returncode}"
        _state["reason"] = f"no local SLURM cluster: {why}"
        return _state["reason"]
    if not was_up:
        atexit.register(lambda: subprocess.run(["bash", str(SCRIPT), "--stop"], capture_output=True, timeout=60))
    missing = {"debug", "multi"} - _partitions()
    _state["reason"] = (f"the running SLURM cluster is not the test cluster of {SCRIPT.name} (no partition "
                        f"{', '.join(sorted(missing))})") if missing else None
    return _state["reason"]
