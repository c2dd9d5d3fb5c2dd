"""The runtime of a distributed process, for training, evaluation and the launched jobs alike.

- Who this process is (:func:`resolve_dist_env`), read from the environment and never mutated. Order of
  precedence (as in dinov2 and open_clip): torchrun / the DeepSpeed launcher (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``), then SLURM (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``), then a single process.
- Joining and leaving the process group (:func:`init_process_group`, :func:`shutdown_process_group`).
- Collectives that are identities without a process group (:func:`broadcast_object`, :func:`all_ranks_true`).
- Stop requests (:class:`StopSignal`): the one handler of SIGTERM / SIGUSR1 that work polls at safe points.

Importing it is cheap (torch and deepspeed are imported inside the functions that need them); it imports no
job package (``g3dr.eval``, ``g3dr.launchers``, ``g3dr.data_prep``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable, Literal, Mapping

from g3dr.errors import ConfigError

log = logging.getLogger("g3dr.distributed")  # not g3dr.log.get_logger: g3dr.log imports this module


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


# ------------------------------------------------------------------------------------------------
# The process group
# ------------------------------------------------------------------------------------------------


def extensions_dir() -> str:
    """Where DeepSpeed's JIT-built ops go: ``$TORCH_EXTENSIONS_DIR`` when set, else ``torch_extensions`` inside
    this Python environment (``sys.prefix``), so two virtualenvs never rebuild each other's copy in the shared
    default (``~/.cache/torch_extensions``) whatever the entry point (``g3dr``, ``torchrun``, a script, submitit)."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(sys.prefix, "torch_extensions")


def _skip_unused_deepspeed_ops() -> None:
    """Keep DeepSpeed from building its CPU shared-memory communication op (55 to 90 s of C++ compilation on a
    cold cache). DeepSpeed builds it for every CPU process group, but only uses it in ``inference_all_reduce``
    (tensor-parallel inference); training's collectives go through torch.distributed. DeepSpeed skips ops its
    compatibility table marks unusable, so the op is marked so for this process."""
    import deepspeed.ops

    from deepspeed.accelerator import get_accelerator

    try:
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")  # None on accelerators without it
    except Exception as err:  # noqa: BLE001 - an optimisation only: never stop a run for it
        log.debug("cannot look up DeepSpeed's ShareMemCommBuilder (%s); leaving DeepSpeed's ops as they are", err)
        return
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(dist: DistEnv, device_type: str, backend: str = "auto", timeout_minutes: int = 30,
                       via: Literal["torch", "deepspeed"] = "torch",
                       launch_hint: str = "torchrun or `g3dr submit`") -> bool:
    """Join the process group of this job; True when this call created it (the caller then owns
    :func:`shutdown_process_group`), False when one existed or none is needed.

    ``backend="auto"``: NCCL when ``device_type`` is ``cuda``, else gloo. ``via="deepspeed"`` (training) goes
    through ``deepspeed.init_distributed`` and always makes a group, a lone process included (a private TCP
    rendezvous); ``via="torch"`` (evaluation) makes one only for several ranks, and on NCCL selects this rank's
    local GPU. Several ranks need ``MASTER_ADDR``/``MASTER_PORT`` (torchrun, or a launched job's rendezvous):
    a :class:`ConfigError` naming ``launch_hint`` otherwise.
    """
    import torch

    if via == "deepspeed":
        if device_type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ["TORCH_EXTENSIONS_DIR"] = extensions_dir()
        import deepspeed
    elif dist.world_size == 1:
        return False
    if torch.distributed.is_initialized():
        return False
    init_method = None
    if dist.world_size == 1 and "MASTER_ADDR" not in os.environ:  # only via deepspeed
        # A lone process: a private TCP rendezvous; RANK/WORLD_SIZE stay unset (DeepSpeed only needs LOCAL_RANK).
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        os.environ.setdefault("LOCAL_RANK", "0")
    else:
        if via == "deepspeed":  # SLURM sets only SLURM_* variables; DeepSpeed and torch read these.
            os.environ.setdefault("RANK", str(dist.rank))
            os.environ.setdefault("WORLD_SIZE", str(dist.world_size))
            os.environ.setdefault("LOCAL_RANK", str(dist.local_rank))
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise ConfigError(f"{dist.world_size} ranks ({dist.source}) but MASTER_ADDR/MASTER_PORT are not set; "
                              f"launch with {launch_hint}")
    if backend == "auto":
        backend = "nccl" if device_type == "cuda" else "gloo"
    timeout = timedelta(minutes=timeout_minutes)
    if via == "deepspeed":
        _skip_unused_deepspeed_ops()
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout,
                                   init_method=init_method, rank=dist.rank, world_size=dist.world_size)
        return True
    if backend == "nccl":
        torch.cuda.set_device(dist.local_rank % torch.cuda.device_count())
    torch.distributed.init_process_group(backend, rank=dist.rank, world_size=dist.world_size, timeout=timeout)
    return True


def shutdown_process_group(barrier: bool = True) -> None:
    """End this process's part of a multi-rank job: wait for every rank (``barrier``; rank 0 may still be
    exporting), then destroy the process group. Call it once, right before the process exits, when every rank
    got here (``barrier=False`` on a failure path, where another rank may never arrive). Leaving the group to
    interpreter exit while another rank still works aborted the exiting rank in about 1 of 12 two-rank gloo
    runs ("terminate called without an active exception", SIGABRT)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if barrier:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# Collectives (identities without a process group, or with one rank)
# ------------------------------------------------------------------------------------------------


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group; ``(0, 1)`` without one."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def collective_device():
    """Where collective tensors live: this rank's GPU under NCCL, else the CPU."""
    import torch

    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects; identity without a process group)."""
    import torch.distributed as tdist

    rank, size = rank_and_world_size()
    if size == 1:
        return obj
    box = [obj if rank == 0 else None]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def all_ranks_true(flag: bool) -> bool:
    """True when ``flag`` is true on every rank (e.g. "my cache file exists")."""
    import torch

    if rank_and_world_size()[1] == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def any_rank_flags(flags: list[bool]) -> list[bool]:
    """Each flag OR-ed over the ranks, in one collective (e.g. "a stop was requested", "my run folder is gone")."""
    import torch

    if rank_and_world_size()[1] == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


# ------------------------------------------------------------------------------------------------
# Stop signals
# ------------------------------------------------------------------------------------------------


class StopSignal:
    """A stop request: set by the signals it is installed for (or by :meth:`request`), polled by the work at
    safe points (the trainer at step boundaries, eval between batches and checkpoints); calling it says
    whether a stop was requested.

    Use it as a context manager or with :meth:`install` / :meth:`uninstall`; the previous handlers come back on
    exit. :meth:`installed` is the one currently installed (the innermost), so that a launched job can hand it a
    scheduler's signal (``SIGUSR2`` before a time limit) without knowing who installed it.
    """

    _stack: list[StopSignal] = []

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM,), notice: str | None = None) -> None:
        self.signals = tuple(signals)
        self.notice = notice
        """Logged (once, as a warning) at the first request."""
        self.received: int | None = None
        """The first signal received (:meth:`request` by hand records SIGTERM); None until then."""
        self._previous: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.received is not None

    def request(self, signum: int = signal.SIGTERM, frame: Any = None) -> None:
        if self.received is None:
            if self.notice:
                log.warning("%s", self.notice)
            self.received = signum

    def install(self) -> StopSignal:
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self.request)
            except ValueError:  # not the main thread
                pass
        StopSignal._stack.append(self)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self in StopSignal._stack:
            StopSignal._stack.remove(self)

    def __enter__(self) -> StopSignal:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()

    @classmethod
    def installed(cls) -> StopSignal | None:
        """The stop signal installed last and still installed; None outside any."""
        return cls._stack[-1] if cls._stack else None
