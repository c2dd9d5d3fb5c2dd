"""What the SLURM cluster offers, asked of its own tools (``sinfo``, ``scontrol``); never guessed from a host name.

Used before submitting (does the partition exist, does it have the nodes, GPUs and CPUs asked for) and while
waiting (job states from ``scontrol show job``, which works without an accounting database, unlike ``sacct``).
This module runs commands and parses their output; it does not submit anything.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from g3dr.errors import ConfigError

# Job states after which a job will not run again (``scontrol show job``; see squeue(1) "JOB STATE CODES").
# PREEMPTED is not one: with PreemptMode=REQUEUE the job shows it briefly, then pends again.
TERMINAL_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT",
    "SPECIAL_EXIT", "REVOKED",
})


TIME_LIMIT_CHECK_S = 30
"""slurmctld checks time limits every 30 s (``PERIODIC_TIMEOUT``, a compile-time constant). At each check it sends
the ``--signal`` of a job whose end is at most ``delay + 30`` s away, and ends a job past its limit: USR2 comes
about ``delay`` to ``delay + 30`` s before the limit, and the kill 0 to 30 s after it, one check (30 s) or more
after the signal."""


def sbatch_available() -> bool:
    """True where ``sbatch`` is on the PATH: the launcher then defaults to the SLURM executor."""
    return shutil.which("sbatch") is not None


def _run(cmd: list[str], timeout: float = 30.0) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise ConfigError(f"`{cmd[0]}` is not installed: run on a SLURM login node, or use --executor local") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(f"`{' '.join(cmd)}` did not answer in {timeout:.0f}s: is slurmctld up? "
                          "(scontrol ping)") from None
    if out.returncode != 0:
        raise ConfigError(f"`{' '.join(cmd)}` failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


@dataclass(frozen=True)
class PartitionInfo:
    """One partition as ``sinfo`` reports it (several node groups are summed; per-node values are the minimum)."""

    name: str
    nodes: int
    cpus_per_node: int
    gpus_per_node: int
    time_limit: str
    default: bool
    up: bool


def parse_gpu_count(gres: str) -> int:
    """GPUs per node from an ``sinfo %G`` field: ``gpu:8``, ``gpu:h100:8(S:0-1)``, ``(null)`` -> 8, 8, 0."""
    total = 0
    for part in gres.split(","):
        fields = re.sub(r"\(.*?\)", "", part.strip()).split(":")
        if fields[0] == "gpu" and len(fields) >= 2 and fields[-1].isdigit():
            total += int(fields[-1])
    return total


def parse_sinfo(text: str) -> dict[str, PartitionInfo]:
    """Parse ``sinfo -h -o '%P|%D|%c|%G|%l|%a'`` (one line per partition and node group)."""
    rows: dict[str, list[tuple[int, int, int, str, bool, bool]]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, nodes, cpus, gres, limit, avail = line.split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        cpus_min = int(re.split(r"[^0-9]", cpus)[0] or 0)  # "2" or "2+" when nodes differ
        rows.setdefault(name, []).append((int(nodes), cpus_min, parse_gpu_count(gres), limit, default, avail == "up"))
    return {
        name: PartitionInfo(name=name, nodes=sum(r[0] for r in group), cpus_per_node=min(r[1] for r in group),
                            gpus_per_node=min(r[2] for r in group), time_limit=group[0][3],
                            default=any(r[4] for r in group), up=all(r[5] for r in group))
        for name, group in rows.items()
    }


def partitions() -> dict[str, PartitionInfo]:
    """Every partition of the cluster, from ``sinfo``."""
    return parse_sinfo(_run(["sinfo", "-h", "-o", "%P|%D|%c|%G|%l|%a"]))


def check_request(parts: dict[str, PartitionInfo], partition: str | None, nodes: int, tasks_per_node: int,
                  gpus_per_node: int, cpus_per_task: int) -> PartitionInfo:
    """The partition a request lands on, or a :class:`ConfigError` naming what does not fit and what would.

    ``partition=None`` means the cluster's default partition.
    """
    if not parts:
        raise ConfigError("sinfo lists no partitions: is this a SLURM cluster? (or use --executor local)")
    names = ", ".join(sorted(parts))
    if partition is None:
        defaults = [p for p in parts.values() if p.default]
        if not defaults:
            raise ConfigError(f"the cluster has no default partition: pass --partition (one of {names})")
        info = defaults[0]
    elif partition not in parts:
        raise ConfigError(f"partition {partition!r} does not exist on this cluster: "
                          f"pass --partition with one of {names}")
    else:
        info = parts[partition]
    if not info.up:
        raise ConfigError(f"partition {info.name!r} is not up (sinfo): choose another of {names}")
    if nodes > info.nodes:
        raise ConfigError(f"--nodes {nodes} is more than partition {info.name!r} has ({info.nodes} nodes): "
                          f"ask for at most {info.nodes}, or another partition")
    if gpus_per_node > info.gpus_per_node:
        what = "has no GPUs (a CPU-only partition: use --gpus-per-node 0 and --tasks-per-node)" \
            if info.gpus_per_node == 0 else f"has {info.gpus_per_node} GPUs per node"
        raise ConfigError(f"--gpus-per-node {gpus_per_node} does not fit: partition {info.name!r} {what}")
    if info.cpus_per_node and tasks_per_node * cpus_per_task > info.cpus_per_node:
        raise ConfigError(f"{tasks_per_node} tasks x {cpus_per_task} CPUs per task is more than the "
                          f"{info.cpus_per_node} CPUs per node of partition {info.name!r}: lower --cpus-per-task "
                          "or --tasks-per-node")
    return info


def job_state(job_id: str) -> tuple[str, int]:
    """``(JobState, Restarts)`` of a job from ``scontrol show job``; ``("UNKNOWN", 0)`` once SLURM forgot it."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return "UNKNOWN", 0
    # An array job id asks for every task: keep the first record (one per line).
    line = out.stdout.splitlines()[0] if out.stdout else ""
    state = re.search(r"\bJobState=(\S+)", line)
    restarts = re.search(r"\bRestarts=(\d+)", line)
    return (state.group(1) if state else "UNKNOWN"), (int(restarts.group(1)) if restarts else 0)
