"""Training checkpoints: the one module that owns their names, completeness, discovery and pruning.

Layout under ``<run_dir>/checkpoints``::

    step-120/                    one DeepSpeed checkpoint directory (tag ``step-120``)
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed's files (model, optimizer, LR scheduler)
        rank-0.pt, rank-1.pt     per-rank state: RNG states, data position
        meta.json                written last: step, world size, client state  -> the directory is complete
    step-120.partial/            a save in progress (or killed mid-write); never loaded, removed later
    latest                       text file naming the newest complete checkpoint, replaced atomically, last

A save writes everything into ``step-N.partial``, waits for every rank, then rank 0 writes ``meta.json``,
renames the directory to ``step-N`` and finally replaces ``latest``. A kill at any point leaves the
previous complete checkpoint untouched and findable: :func:`find_latest` trusts only directories named
``step-N`` that hold ``meta.json`` (``latest`` is a convenience for humans and tools).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from g3dr.errors import ConfigError
from g3dr.log import get_logger

log = get_logger("g3dr.train.checkpoint")

CHECKPOINTS_DIRNAME = "checkpoints"
META_FILENAME = "meta.json"
LATEST_FILENAME = "latest"
PARTIAL_SUFFIX = ".partial"
_NAME_RE = re.compile(r"^step-(\d+)$")


def checkpoints_root(run_dir: str | Path) -> Path:
    """Where the checkpoints of the run in ``run_dir`` live."""
    return Path(run_dir) / CHECKPOINTS_DIRNAME


def checkpoint_name(step: int) -> str:
    """The directory name (DeepSpeed tag) of the checkpoint after ``step`` optimizer steps."""
    return f"step-{int(step)}"


def step_of(path: str | Path) -> int | None:
    """The step of a checkpoint directory name ``step-N``, or None for any other name."""
    match = _NAME_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: str | Path) -> bool:
    """True for a directory named ``step-N`` whose ``meta.json`` was written (the last act of a save)."""
    path = Path(path)
    return step_of(path) is not None and path.is_dir() and (path / META_FILENAME).is_file()


def list_complete(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_complete(p)]
    return sorted(found, key=lambda p: step_of(p))


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (None if there is none)."""
    complete = list_complete(root)
    return complete[-1] if complete else None


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a complete checkpoint."""
    return json.loads((Path(path) / META_FILENAME).read_text())


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: None (fresh start), ``auto`` (newest complete in this run, or None),
    or an explicit checkpoint directory (must be complete)."""
    if not resume:
        return None
    if resume == "auto":
        return find_latest(checkpoints_root(run_dir))
    path = Path(resume)
    if not is_complete(path):
        raise ConfigError(f"--resume {resume}: not a complete checkpoint directory (expected step-N/ holding "
                          f"{META_FILENAME}); use --resume auto to pick the newest complete one")
    return path


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU and CUDA)."""
    import random

    import numpy as np

    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine: Any, root: str | Path, step: int, client_state: dict[str, Any],
                    rank_state: dict[str, Any], rank: int, world_size: int, keep_last: int) -> Path:
    """Save the DeepSpeed ``engine`` after ``step`` optimizer steps; collective (every rank calls it).

    ``client_state`` (JSON-serialisable: step, resolved config, MLflow run id, ...) goes into ``meta.json``
    and DeepSpeed's client state; ``rank_state`` (RNG states, data position) is saved per rank. Returns the
    final directory. Keeps the newest ``keep_last`` complete checkpoints.
    """
    root = Path(root)
    name = checkpoint_name(step)
    final = root / name
    partial = root / (name + PARTIAL_SUFFIX)
    if is_complete(final):
        log.info("checkpoint %s already exists; not saving it again", final)
        return final
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():  # left by a save that was killed
            shutil.rmtree(partial)
        if final.exists():  # an incomplete directory of that name (cannot normally happen)
            shutil.rmtree(final)
    _barrier()
    started = time.time()
    engine.save_checkpoint(str(root), tag=partial.name, client_state=dict(client_state), save_latest=False)
    torch.save(rank_state, partial / f"rank-{rank}.pt")
    _barrier()
    if rank == 0:
        missing = [r for r in range(world_size) if not (partial / f"rank-{r}.pt").is_file()]
        if missing:
            raise RuntimeError(f"checkpoint {partial}: per-rank state of ranks {missing} is missing")
        meta = {"step": int(step), "world_size": int(world_size), "saved_at": time.time(),
                "client_state": client_state}
        _atomic_write_text(partial / META_FILENAME, json.dumps(meta, indent=1, sort_keys=True, default=str))
        os.replace(partial, final)
        _fsync_dir(root)
        _atomic_write_text(root / LATEST_FILENAME, name + "\n")
        prune(root, keep_last)
        log.info("saved checkpoint %s in %.1f s", final, time.time() - started)
    _barrier()
    return final


def prune(root: str | Path, keep_last: int) -> list[Path]:
    """Remove all but the newest ``keep_last`` complete checkpoints, and stale partial saves; returns removed."""
    root = Path(root)
    complete = list_complete(root)
    removed = complete[:-keep_last] if keep_last > 0 else []
    newest = step_of(complete[-1]) if complete else None
    for path in root.iterdir() if root.is_dir() else []:
        if path.name.endswith(PARTIAL_SUFFIX) and newest is not None:
            s = step_of(path.name[: -len(PARTIAL_SUFFIX)])
            if s is not None and s <= newest:
                removed.append(path)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def load_checkpoint(engine: Any, path: str | Path, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load a complete checkpoint into ``engine`` (model, optimizer, LR scheduler); collective.

    Returns ``(client_state, rank_state)``; ``rank_state`` is None when the checkpoint was written by fewer
    ranks than this rank's index (a resume on another world size; the caller re-derives RNG and data state).
    """
    path = Path(path)
    if not is_complete(path):
        raise ConfigError(f"{path} is not a complete checkpoint (no {META_FILENAME})")
    meta = read_meta(path)
    loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if loaded is None:
        raise ConfigError(f"DeepSpeed could not load the checkpoint {path}")
    rank_file = path / f"rank-{rank}.pt"
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=False) if rank_file.is_file() else None
    return meta["client_state"], rank_state
