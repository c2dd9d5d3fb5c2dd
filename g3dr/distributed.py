"""Who this process is in a distributed job, read from the environment and never mutated.

Order of precedence (as in dinov2 and open_clip): torchrun / the DeepSpeed launcher (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``), then SLURM (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``), then a
single process. This module does not initialise process groups; the trainer does, from this value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Mapping

from g3dr.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    """Rank information of this process."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    source: Literal["torchrun", "slurm", "single"] = "single"

    @property
    def is_main(self) -> bool:
        """True on global rank 0: the only rank that writes logs, MLflow runs and artifacts."""
        return self.rank == 0


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"environment variable {name}={env[name]!r} is not an integer") from None


def resolve_dist_env(env: Mapping[str, str] | None = None) -> DistEnv:
    """Rank, local rank and world size of this process from ``env`` (default ``os.environ``)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        source = "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        source = "slurm"
    else:
        return DistEnv()
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"inconsistent {source} environment: rank {rank}, local rank {local}, world size {world}")
    return DistEnv(rank=rank, local_rank=local, world_size=world, source=source)
