"""Test helper: a single-node SLURM cluster on this machine (see ``start_cluster.sh`` beside this file).

``ensure_cluster()`` returns None when a cluster is up (starting one if needed and allowed) or the reason it
cannot, for ``pytest.skip``. A cluster this helper started is stopped when the test process exits, so a
developer's machine is left as it was; one that was already running (CI starts it before ``make test``) is
left running. Tests use it through the ``slurm_cluster`` fixture of ``tests/conftest.py`` (``slurm_cluster("debug",
"multi")`` skips unless those partitions are up), which imports this file once per session, so that every test
file shares one state.
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


def ensure_cluster(partitions: tuple[str, ...] = ("debug",)) -> str | None:
    """None when the test cluster is up with ``partitions``, else why not (the cluster is started once)."""
    if "reason" not in _state:
        _state["reason"] = _start()
    if _state["reason"]:
        return _state["reason"]
    missing = set(partitions) - _partitions()
    if missing:
        return (f"the running SLURM cluster has no partition {', '.join(sorted(missing))} "
                f"(not the test cluster of {SCRIPT.name}, or its virtual nodes could not be set up)")
    return None


def _start() -> str | None:
    was_up = _up()
    # The script is idempotent and quick when the cluster is up (it restarts one of ours whose config is old).
    try:
        out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return f"{SCRIPT.name} did not finish in 600 s"
    if out.returncode != 0:
        why = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit status {out.returncode}"
        return f"no local SLURM cluster: {why}"
    if not was_up:
        atexit.register(lambda: subprocess.run(["bash", str(SCRIPT), "--stop"], capture_output=True, timeout=60))
    return None
