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

Resuming on another world size: with ZeRO 1/2 the fp32 master weights and Adam moments are stored as one
flat partition per rank (``*optim_states.pt``), which DeepSpeed cannot re-split itself. :func:`load_checkpoint`
then converts the checkpoint once into DeepSpeed's universal format (``deepspeed.checkpoint.ds_to_universal``:
one folder per parameter with ``fp32``, ``exp_avg``, ``exp_avg_sq``, ``step``), cached as ``step-N/universal/``,
and loads that into an engine created with ``checkpoint.load_universal`` (:func:`needs_universal` tells the
trainer before it builds the engine). Per-rank state (RNG, data position) cannot carry over; the trainer
re-derives it.
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


UNIVERSAL_DIRNAME = "universal"
_OPTIM_GLOB = "*optim_states.pt"


def saved_world_size(path: str | Path) -> int:
    """The number of ranks that saved the complete checkpoint ``path``."""
    return int(read_meta(path)["world_size"])


def has_zero_partitions(path: str | Path) -> bool:
    """True when the checkpoint holds ZeRO 1/2 optimizer partitions (one ``*optim_states.pt`` per rank)."""
    return any(Path(path).glob(_OPTIM_GLOB))


def needs_universal(path: str | Path, world_size: int) -> bool:
    """True when resuming ``path`` on ``world_size`` ranks needs the universal-checkpoint conversion: the
    checkpoint was saved by another number of ranks and its optimizer state is partitioned (ZeRO 1/2).

    ZeRO 0 checkpoints keep the whole optimizer state in ``mp_rank_00_model_states.pt`` and load on any
    world size as they are. A step-0 checkpoint (written before the first optimizer step, e.g. by the
    non-finite guard) has no Adam state to carry: its weights load and the fp32 copy is rebuilt from them.
    It must not be converted: with no optimizer state DeepSpeed's converter falls back to saving each module
    tensor, and each is a view of ZeRO's flat weight buffer, so it writes the whole buffer once per parameter
    (for the paper model 279 x 590 MB).
    """
    meta = read_meta(path)
    return int(meta["world_size"]) != int(world_size) and int(meta["step"]) > 0 and has_zero_partitions(path)


def check_zero_stage(path: str | Path, zero_stage: int) -> None:
    """ConfigError when the checkpoint's optimizer layout cannot be loaded by an engine of ``zero_stage``.

    DeepSpeed would otherwise start a ZeRO 1/2 engine from a ZeRO 0 checkpoint with fresh Adam moments (it
    finds no partitions and silently rebuilds the fp32 weights from the module), and a ZeRO 0 engine cannot
    read partitions at all. Switching between ZeRO 1 and 2 is fine (the same partition format).
    """
    partitioned = has_zero_partitions(path)
    if partitioned != (int(zero_stage) in (1, 2)):
        saved = "ZeRO 1/2 (partitioned optimizer state)" if partitioned else "ZeRO 0 (whole optimizer state)"
        raise ConfigError(f"checkpoint {path} was saved with {saved}, but train.zero_stage={zero_stage}; resume with "
                          f"train.zero_stage={'1 or 2' if partitioned else '0'} (the optimizer state would otherwise "
                          "be lost)")


def universal_dir(path: str | Path) -> Path:
    """Where the universal-format copy of the checkpoint ``path`` is cached (removed with the checkpoint)."""
    return Path(path) / UNIVERSAL_DIRNAME


def convert_to_universal(path: str | Path) -> Path:
    """Convert the complete ZeRO 1/2 checkpoint ``path`` into DeepSpeed's universal format, once; returns
    ``path/universal`` (DeepSpeed tag ``universal`` under the load directory ``path``). One process only.

    The conversion is DeepSpeed's own (``ds_to_universal``): the per-rank flat partitions of the fp32 master
    weights and Adam moments are cut into per-parameter tensors using the parameter-to-slice mapping every
    partition file records. It is written to ``universal.partial`` and renamed, so a kill mid-way leaves no
    half conversion behind; an existing ``universal`` folder is reused.
    """
    import contextlib
    import io
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    path = Path(path)
    final = universal_dir(path)
    if final.is_dir():
        return final
    partial = path / (UNIVERSAL_DIRNAME + PARTIAL_SUFFIX)
    if partial.exists():
        shutil.rmtree(partial)
    started = time.time()
    # One extraction process: worker pools forked from a rank that holds a process group are not safe.
    args = Namespace(input_folder=str(path), output_folder=str(partial), num_extract_workers=1, num_merge_workers=1,
                     keep_temp_folder=False, strict=True,
                     # Our engines record no Megatron-style parallelism info; with plain data parallelism the
                     # conversion needs none (DeepSpeed's own option for exactly this case).
                     inject_missing_state=True)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        ds_to_universal(args)
    log.debug("ds_to_universal output:\n%s", printed.getvalue())
    # ds_to_universal also names its output in `latest_universal` beside it; we always pass the tag instead.
    (path / "latest_universal").unlink(missing_ok=True)
    os.replace(partial, final)
    _fsync_dir(path)
    log.info("converted %s to a universal checkpoint in %.1f s", path, time.time() - started)
    return final


def _convert_on_rank0(path: Path, rank: int) -> None:
    """Rank 0 converts while the others wait; a failure is raised on every rank (no rank left in a collective)."""
    error = None
    if rank == 0:
        try:
            convert_to_universal(path)
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            log.exception("converting %s to a universal checkpoint failed", path)
            error = f"{type(exc).__name__}: {exc}"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise RuntimeError(f"converting {path} to a universal checkpoint failed on rank 0: {error}")


def read_rank_states(path: str | Path) -> list[dict[str, Any]]:
    """The per-rank states (``rank-R.pt``) of every rank that saved ``path``, in rank order."""
    path = Path(path)
    return [torch.load(path / f"rank-{r}.pt", map_location="cpu", weights_only=False)
            for r in range(saved_world_size(path)) if (path / f"rank-{r}.pt").is_file()]


def load_checkpoint(engine: Any, path: str | Path, rank: int,
                    world_size: int | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load a complete checkpoint into ``engine`` (weights, Adam state, LR scheduler); collective.

    Returns ``(client_state, rank_state)``. ``rank_state`` (RNG states, data position of this rank) is None
    when the checkpoint was saved by another number of ranks than ``world_size`` (default: the saver's):
    per-rank state does not carry over and the caller re-derives it.

    On another world size a ZeRO 1/2 checkpoint is converted to the universal format (rank 0, once, see
    :func:`convert_to_universal`) and loaded from there; the engine must have been created with
    ``checkpoint.load_universal`` (see :func:`needs_universal`). The fp32 master weights, Adam moments and
    step, the LR scheduler and DeepSpeed's step counters are restored exactly; module buffers, which the
    universal format does not carry, are copied from the saved module state.
    """
    path = Path(path)
    if not is_complete(path):
        raise ConfigError(f"{path} is not a complete checkpoint (no {META_FILENAME})")
    meta = read_meta(path)
    saved = int(meta["world_size"])
    world_size = saved if world_size is None else int(world_size)
    universal = needs_universal(path, world_size)
    if universal:
        if not engine.load_universal_checkpoint():
            raise RuntimeError(f"{path} was saved by {saved} ranks and this run has {world_size}: the engine must be "
                               "created with checkpoint.load_universal=true (see checkpoint.needs_universal)")
        _convert_on_rank0(path, rank)
        load_dir, tag = path, UNIVERSAL_DIRNAME
    else:
        load_dir, tag = path.parent, path.name
    # Partitions of another world size that need no conversion (step 0: empty Adam state) cannot be loaded
    # as they are; DeepSpeed then rebuilds its fp32 copy from the loaded weights.
    load_optimizer = universal or world_size == saved or not has_zero_partitions(path)
    loaded, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=load_optimizer,
                                       load_lr_scheduler_states=True)
    if loaded is None:
        raise ConfigError(f"DeepSpeed could not load the checkpoint {path}")
    if universal:
        _load_buffers(engine.module, path)
    if world_size != saved:
        return meta["client_state"], None
    rank_file = path / f"rank-{rank}.pt"
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=False) if rank_file.is_file() else None
    return meta["client_state"], rank_state


def _load_buffers(module: torch.nn.Module, path: Path) -> None:
    """Copy the saved values of ``module``'s buffers (universal loading restores parameters only)."""
    names = set(module.state_dict()) - {name for name, _ in module.named_parameters()}  # persistent buffers
    if not names:
        return
    saved = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    missing = sorted(names - set(saved))
    if missing:
        raise ConfigError(f"checkpoint {path} lacks the module buffers {missing}; it was written by another model")
    module.load_state_dict({k: v for k, v in saved.items() if k in names}, strict=False)
