"""Rendezvous of a launched job's tasks, read from the scheduler's environment by submitit.

Under SLURM the master is the first host of ``SLURM_JOB_NODELIST`` and the port is derived from the job id, so
every task of a job computes the same address without talking to the others, and two jobs sharing a node use
different ports. Under submitit's local executor the master is 127.0.0.1 and the port comes from the local job
id. The result is exported as the torchrun variables
(``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``), which
:func:`g3dr.distributed.resolve_dist_env` reads first.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal

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


def rendezvous_from_env() -> Rendezvous:
    """The rendezvous of this task inside a submitit job (SLURM or local), else of a single process.

    Read with submitit's :class:`~submitit.helpers.TorchDistributedEnvironment` (the master is the first host of
    the job's node list; ranks, world size and local world size from the scheduler), with two choices of ours:
    the port is :func:`port_from_job_id` of the scheduler's job id (submitit's default, a random one seeded by the
    job id, may take ``$MASTER_PORT`` from the submitting shell), and a local job meets at 127.0.0.1 (this host's
    name need not resolve to a local interface).
    """
    import submitit

    try:
        job = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job
        return Rendezvous(master_addr="127.0.0.1", master_port=29500, rank=0, local_rank=0, world_size=1,
                          local_world_size=1, node_rank=0, job_id="0", restarts=0, source="single")
    slurm = job.cluster == "slurm"
    if slurm:
        for name in ("SLURM_NTASKS", "SLURM_JOB_NODELIST"):
            if name not in os.environ:  # submitit would default to one task on this host
                raise ConfigError(f"environment variable {name} is missing: not inside a launched SLURM job?")
    torch_env = submitit.helpers.TorchDistributedEnvironment()
    return Rendezvous(master_addr=torch_env.master_addr if slurm else "127.0.0.1",
                      master_port=port_from_job_id(job.raw_job_id), rank=torch_env.rank,
                      local_rank=torch_env.local_rank, world_size=torch_env.world_size,
                      local_world_size=torch_env.local_world_size, node_rank=job.node, job_id=job.raw_job_id,
                      restarts=int(os.environ.get("SLURM_RESTART_COUNT", 0)) if slurm else 0,
                      source="slurm" if slurm else "local")
