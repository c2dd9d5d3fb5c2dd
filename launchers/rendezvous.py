"""Rendezvous of a launched job's tasks, read from the scheduler's environment.

Under SLURM the master is the first host of ``SLURM_JOB_NODELIST`` (expanded by ``scontrol show hostnames``) and
the port is derived from the job id, so every task of a job computes the same address without talking to the
others, and two jobs sharing a node use different ports. Under submitit's local executor the master is
127.0.0.1 and the port comes from the local job id. The result is exported as the torchrun variables
(``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``), which
:func:`g3dr.distributed.resolve_dist_env` reads first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Mapping

from g3dr.errors import ConfigError

PORT_BASE = 10000
"""Ports are ``PORT_BASE + job_id % PORT_SPAN``: below Linux's ephemeral range (32768+), above the well-known."""
PORT_SPAN = 20000


def port_from_job_id(job_id: str | int) -> int:
    """A TCP port every task of job ``job_id`` agrees on (``"4242"`` -> 14242)."""
    digits = re.sub(r"\D", "", str(job_id))
    if not digits:
        raise ConfigError(f"cannot derive a rendezvous port from job id {job_id!r}")
    return PORT_BASE + int(digits) % PORT_SPAN


@dataclass(frozen=True)
class Rendezvous:
    """Where this task meets the others, and who it is."""

    master_addr: str
    master_port: int
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    job_id: str
    restarts: int
    """How many times the scheduler restarted this job (``SLURM_RESTART_COUNT``; 0 elsewhere)."""
    source: Literal["slurm", "local", "single"]

    def env(self) -> dict[str, str]:
        """The torchrun variables for this task."""
        return {
            "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port), "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank), "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size), "GROUP_RANK": str(self.node_rank),
        }


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    if name not in env:
        if default is None:
            raise ConfigError(f"environment variable {name} is missing: not inside a launched job?")
        return default
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"environment variable {name}={env[name]!r} is not an integer") from None


def rendezvous_from_env(env: Mapping[str, str], hostnames=None) -> Rendezvous:
    """The rendezvous of this task from a SLURM or submitit-local environment (or a single process).

    ``hostnames(nodelist) -> list[str]`` expands a SLURM node list; default ``scontrol show hostnames``.
    """
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env:
        if hostnames is None:
            from g3dr.launchers.slurm import expand_hostnames as hostnames
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise ConfigError("SLURM_JOB_NODELIST is not set: cannot find the master node")
        hosts = hostnames(nodelist)
        world = _int(env, "SLURM_NTASKS")
        num_nodes = _int(env, "SLURM_JOB_NUM_NODES", len(hosts))
        return Rendezvous(master_addr=hosts[0], master_port=port_from_job_id(env["SLURM_JOB_ID"]),
                          rank=_int(env, "SLURM_PROCID"), local_rank=_int(env, "SLURM_LOCALID", 0), world_size=world,
                          local_world_size=max(1, world // max(1, num_nodes)), node_rank=_int(env, "SLURM_NODEID", 0),
                          job_id=env["SLURM_JOB_ID"], restarts=_int(env, "SLURM_RESTART_COUNT", 0), source="slurm")
    if "SUBMITIT_LOCAL_JOB_ID" in env:
        world = _int(env, "SUBMITIT_LOCAL_NTASKS", 1)
        return Rendezvous(master_addr="127.0.0.1", master_port=port_from_job_id(env["SUBMITIT_LOCAL_JOB_ID"]),
                          rank=_int(env, "SUBMITIT_LOCAL_GLOBALID", 0),
                          local_rank=_int(env, "SUBMITIT_LOCAL_LOCALID", 0),
                          world_size=world, local_world_size=world, node_rank=0,
                          job_id=env["SUBMITIT_LOCAL_JOB_ID"], restarts=0, source="local")
    return Rendezvous(master_addr="127.0.0.1", master_port=29500, rank=0, local_rank=0, world_size=1,
                      local_world_size=1, node_rank=0, job_id="0", restarts=0, source="single")
