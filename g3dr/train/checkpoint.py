"""Training checkpoints: the one module that owns their names, completeness, lineage, verification and pruning.

Layout under ``<run_dir>/checkpoints``::

    step-120/                    one DeepSpeed checkpoint directory (tag ``step-120``)
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed's files (model, optimizer, LR scheduler)
        rank-0.pt, rank-1.pt     per-rank state: RNG states, data position
        meta.json                written last: step, world size, client state, the parent checkpoint, and the
                                 size and sha256 of every other file -> the directory is complete
    step-120.partial/            a save in progress (or killed mid-write); never loaded, removed later
    latest                       names the head of the run's lineage, replaced atomically, last
    set-aside/                   checkpoints taken out of the lineage, never deleted by g3dr:
        step-140.abandoned/      newer than the checkpoint a rollback resumed from
        step-160.corrupt/        failed verification (a file missing, truncated or changed); why: SET_ASIDE.txt

A save writes everything into ``step-N.partial``, waits for every rank, hashes the files (each rank a share),
then rank 0 writes ``meta.json``, renames the directory to ``step-N`` and finally replaces ``latest``. A kill at
any point leaves the previous complete checkpoint untouched and findable. A save that fails (disk full,
read-only) is an :class:`~g3dr.errors.OutputError` that leaves the previous checkpoint as it was.

Lineage: ``latest`` is the truth. :func:`find_latest` returns the checkpoint ``latest`` names (or its complete
child, when a save was killed between its rename and the update of ``latest``; each ``meta.json`` names its
parent), and only without a usable ``latest`` the highest complete ``step-N``. Resuming from an older checkpoint
(a rollback, ``--resume RUN/checkpoints/step-20``) sets the newer ones aside (:func:`set_aside_newer`) and points
``latest`` at the one resumed from, so neither ``--resume auto`` nor ``keep_last`` ever prefers abandoned work.

Verification: :func:`resolve_resume` checks the sizes and sha256 recorded at save time before a checkpoint is
trusted (every rank a share of the files; the verdict is shared, so every rank decides alike). With ``auto`` a
damaged head is logged, set aside and the previous complete checkpoint is tried; an explicit path to a damaged
checkpoint is a one-line error. Checkpoints written before sums were recorded get structural checks only.

Resuming on another world size: with ZeRO 1/2 the fp32 master weights and Adam moments are stored as one
flat partition per rank (``*optim_states.pt``), which DeepSpeed cannot re-split itself. :func:`load_checkpoint`
then converts the checkpoint once into DeepSpeed's universal format (``deepspeed.checkpoint.ds_to_universal``:
one folder per parameter with ``fp32``, ``exp_avg``, ``exp_avg_sq``, ``step``), cached as ``step-N/universal/``,
and loads that into an engine created with ``checkpoint.load_universal`` (:func:`needs_universal` tells the
trainer before it builds the engine). Per-rank state (RNG, data position) cannot carry over; the trainer
re-derives it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from g3dr.distributed import broadcast_object
from g3dr.errors import ConfigError, OutputError, WeightsError
from g3dr.log import get_logger

log = get_logger("g3dr.train.checkpoint")

CHECKPOINTS_DIRNAME = "checkpoints"
META_FILENAME = "meta.json"
LATEST_FILENAME = "latest"
PARTIAL_SUFFIX = ".partial"
SET_ASIDE_DIRNAME = "set-aside"
SET_ASIDE_NOTE = "SET_ASIDE.txt"
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


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a complete checkpoint."""
    return json.loads((Path(path) / META_FILENAME).read_text())


def _meta_or_none(path: Path) -> dict[str, Any] | None:
    try:
        meta = read_meta(path)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _read_latest(root: Path) -> str | None:
    try:
        name = (root / LATEST_FILENAME).read_text().strip()
    except OSError:
        return None
    return name or None


def find_latest(root: str | Path) -> Path | None:
    """The head of the run's lineage under ``root`` (None if there is no complete checkpoint).

    That is the complete checkpoint ``latest`` names, or a complete checkpoint whose ``meta.json`` names it as its
    parent (a save killed after its rename, before ``latest`` was replaced). Complete checkpoints newer than the
    head that do not descend from it were abandoned by a rollback and are never chosen. Without a usable
    ``latest`` (absent, or naming a folder that is gone) the highest complete ``step-N`` is the head.
    """
    root = Path(root)
    complete = list_complete(root)
    if not complete:
        return None
    by_name = {p.name: p for p in complete}
    name = _read_latest(root)
    head = by_name.get(name) if name else None
    if head is None:
        if name:
            log.warning("%s names %s, which is not a complete checkpoint; taking the newest complete one",
                        root / LATEST_FILENAME, name)
        return complete[-1]
    while True:
        children = [p for p in complete if step_of(p) > step_of(head)
                    and (_meta_or_none(p) or {}).get("parent") == head.name]
        if not children:
            return head
        head = children[-1]


def _previous_complete(root: Path, path: Path) -> Path | None:
    older = [p for p in list_complete(root) if step_of(p) < step_of(path)]
    return older[-1] if older else None


# --------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------


def _is_collective(world_size: int) -> bool:
    return world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_gather(value: Any, world_size: int) -> list[Any]:
    if not _is_collective(world_size):
        return [value]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _checkpoint_files(folder: Path) -> list[str]:
    """Every file of a checkpoint folder except ``meta.json`` and the universal-format cache, relative, sorted."""
    names = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if rel.parts[0].startswith(UNIVERSAL_DIRNAME) or rel.as_posix() == META_FILENAME or not path.is_file():
            continue
        names.append(rel.as_posix())
    return sorted(names)


def record_files(folder: str | Path, rank: int = 0, world_size: int = 1) -> dict[str, dict[str, Any]]:
    """``{relative name: {"size", "sha256"}}`` of every file in ``folder``; collective when ``world_size`` > 1
    (each rank hashes every ``world_size``-th file; every rank returns the whole table)."""
    folder = Path(folder)
    names = broadcast_object(_checkpoint_files(folder) if rank == 0 else None)  # one listing for all
    mine = {name: {"size": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
            for name in names[rank::world_size]}
    table: dict[str, dict[str, Any]] = {}
    for part in _all_gather(mine, world_size):
        table.update(part)
    return table


def _check_files(path: Path, meta: dict[str, Any], rank: int, world_size: int) -> list[str]:
    """Problems of this rank's share of the files ``meta`` records (all of them structurally for old checkpoints)."""
    files = meta.get("files")
    if not isinstance(files, dict):  # saved before sizes and sums were recorded: structural checks only
        if rank != 0:
            return []
        model = path / "mp_rank_00_model_states.pt"
        problems = [] if model.is_file() and model.stat().st_size > 0 else [f"{model.name}: missing or empty"]
        for r in range(int(meta.get("world_size", 1))):
            rank_file = path / f"rank-{r}.pt"
            if rank_file.exists() and rank_file.stat().st_size == 0:
                problems.append(f"{rank_file.name}: empty")
        return problems
    problems = []
    for name in sorted(files)[rank::world_size]:
        expected = files[name]
        file = path / name
        if not file.is_file():
            problems.append(f"{name}: missing")
            continue
        size = file.stat().st_size
        if size != expected.get("size"):
            problems.append(f"{name}: {size} bytes, {expected.get('size')} when saved (truncated or replaced)")
        elif _sha256(file) != expected.get("sha256"):
            problems.append(f"{name}: sha256 differs from the one recorded when it was saved (changed on disk)")
    return problems


def verify_checkpoint(path: str | Path, rank: int = 0, world_size: int = 1) -> list[str]:
    """The problems of the checkpoint ``path`` (empty when it is sound); collective when ``world_size`` > 1: every
    rank checks a share of the files and every rank returns the same full list.

    Checked: ``meta.json`` parses and holds the step and world size; every file recorded at save time is
    present with its size and sha256. Checkpoints saved before sums were recorded: ``meta.json``, and a
    non-empty model-states file and per-rank files.
    """
    path = Path(path)
    meta = broadcast_object(_meta_or_none(path) if rank == 0 else None)  # one table for all ranks
    if meta is None:
        local = [f"{META_FILENAME}: unreadable or not valid JSON (empty or truncated)"]
    elif not isinstance(meta.get("step"), int) or not isinstance(meta.get("world_size"), int):
        local = [f"{META_FILENAME}: no integer step and world_size"]
    else:
        local = _check_files(path, meta, rank, world_size)
    problems = []
    for part in _all_gather(local, world_size):
        problems += [p for p in part if p not in problems]
    return problems


def set_aside(path: str | Path, reason: str, details: list[str] | None = None) -> Path:
    """Move the checkpoint folder ``path`` to ``<root>/set-aside/<name>.<reason>`` (never deleted by g3dr), with a
    note saying why; returns the new location. One process only."""
    path = Path(path)
    folder = path.parent / SET_ASIDE_DIRNAME
    folder.mkdir(exist_ok=True)
    dest = folder / f"{path.name}.{reason}"
    n = 2
    while dest.exists():
        dest = folder / f"{path.name}.{reason}.{n}"
        n += 1
    os.replace(path, dest)
    note = [f"{path.name} set aside ({reason}) at {time.strftime('%Y-%m-%d %H:%M:%S')} by g3dr train", *(details or [])]
    try:
        (dest / SET_ASIDE_NOTE).write_text("\n".join(note) + "\n")
    except OSError:
        pass
    _fsync_dir(path.parent)
    return dest


def set_aside_newer(root: str | Path, chosen: str | Path) -> list[str]:
    """Resuming from ``chosen``: set aside every complete checkpoint of ``root`` newer than it (work the user
    abandoned by rolling back), remove newer partial saves, and point ``latest`` at ``chosen`` when it lives in
    ``root``. One process (rank 0). Returns the names set aside, oldest first."""
    root, chosen = Path(root), Path(chosen)
    step = step_of(chosen)
    if step is None or not root.is_dir():
        return []
    newer = [p for p in list_complete(root) if step_of(p) > step and p.resolve() != chosen.resolve()]
    for path in newer:
        dest = set_aside(path, "abandoned", [f"newer than {chosen}, which the run was resumed from (a rollback)"])
        log.warning("rollback to %s: set %s aside as %s (not deleted)", chosen.name, path.name, dest)
    for path in root.glob("*" + PARTIAL_SUFFIX):
        s = step_of(path.name[: -len(PARTIAL_SUFFIX)])
        if s is not None and s > step:
            shutil.rmtree(path, ignore_errors=True)
    if chosen.parent.resolve() == root.resolve() and _read_latest(root) != chosen.name:
        _atomic_write_text(root / LATEST_FILENAME, chosen.name + "\n")
    return [p.name for p in newer]


def resolve_resume(resume: str | None, run_dir: str | Path, rank: int = 0, world_size: int = 1) -> Path | None:
    """The checkpoint to resume from, verified; collective when ``world_size`` > 1 (every rank gets the same).

    ``None``: a fresh start. ``auto``: the head of this run's lineage (:func:`find_latest`), or None; a head that
    fails :func:`verify_checkpoint` is logged with its bad files, set aside as ``corrupt`` (rank 0) and the
    previous complete checkpoint is tried, on every rank alike. A path: that checkpoint directory, which must be
    complete and sound (a one-line error otherwise; it is left where it is).
    """
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if not is_complete(path):
            if path.is_file() and path.suffix == ".safetensors":
                hint = "; an f_trigen .safetensors export cannot be resumed (it holds no optimizer state)"
            elif path.is_dir() and (path / "mp_rank_00_model_states.pt").is_file():
                hint = "; its save never completed (no meta.json): use --resume auto for the newest complete one"
            else:
                hint = "; use --resume auto to pick the newest complete one"
            raise ConfigError(f"--resume {resume}: not a complete checkpoint directory (expected step-N/ holding "
                              f"{META_FILENAME}){hint}")
        problems = verify_checkpoint(path, rank, world_size)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise WeightsError(f"--resume {resume}: the checkpoint is damaged: {problems[0]}{more}; it was left as it "
                               "is. Resume from an earlier checkpoint, or use --resume auto, which sets damaged ones "
                               "aside and takes the previous complete one")
        return path
    root = checkpoints_root(run_dir)
    while True:
        head = find_latest(root) if rank == 0 else None
        name = broadcast_object(head.name if head is not None else None)
        if name is None:
            return None
        path = root / name
        problems = verify_checkpoint(path, rank, world_size)
        if not problems:
            return path
        if rank == 0:
            dest = set_aside(path, "corrupt", problems)
            previous = _previous_complete(root, path)
            if previous is not None:
                _atomic_write_text(root / LATEST_FILENAME, previous.name + "\n")
            else:
                (root / LATEST_FILENAME).unlink(missing_ok=True)
            log.error("checkpoint %s is damaged: %s; set aside as %s (not deleted); falling back to %s", path,
                      "; ".join(problems), dest, previous.name if previous is not None else "a fresh start")
        _barrier()


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


def rank_seed(seed: int, rank: int) -> int:
    """The RNG seed of ``rank``, derived from the run's one seed (distinct per rank, stable across runs)."""
    return (seed * 1_000_003 + rank * 7919 + 1) % (2**63 - 1)


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global RNGs from ``seed``."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes of the complete checkpoint ``path`` (its recorded files, else what is on disk)."""
    path = Path(path)
    files = (_meta_or_none(path) or {}).get("files")
    if isinstance(files, dict):
        return sum(int(f.get("size", 0)) for f in files.values())
    return sum((path / name).stat().st_size for name in _checkpoint_files(path))


def _save_failed(err: BaseException, root: Path, name: str, rank: int) -> OutputError | None:
    """The OutputError for a save that raised ``err``, when the cause is the disk (an OSError, or a folder that
    cannot be written now); None when it is something else (re-raised as it is)."""
    from g3dr.outputs import describe_os_error, write_probe

    cause = err
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError):
        reason = describe_os_error(cause, root)
    else:  # e.g. torch.save's "Parent directory ... does not exist" after DeepSpeed's mkdir failed quietly
        try:
            write_probe(root, create=False)
        except OSError as probe:
            reason = describe_os_error(probe, root)
        else:
            return None
    previous = find_latest(root) if root.is_dir() else None
    kept = f"the previous checkpoint {previous} is intact" if previous is not None else "no earlier checkpoint exists"
    return OutputError(f"saving checkpoint {name} to {root} failed on rank {rank}: {reason}; {kept}. Free space or "
                       "fix the folder, then rerun with --resume auto")


def save_checkpoint(engine: Any, root: str | Path, step: int, client_state: dict[str, Any],
                    rank_state: dict[str, Any], rank: int, world_size: int, keep_last: int) -> Path:
    """Save the DeepSpeed ``engine`` after ``step`` optimizer steps; collective (every rank calls it).

    ``client_state`` (JSON-serialisable: step, resolved config, MLflow run id, ...) goes into ``meta.json``
    and DeepSpeed's client state; ``rank_state`` (RNG states, data position) is saved per rank. ``meta.json``
    also records the parent (the checkpoint ``latest`` named) and the size and sha256 of every file. Returns the
    final directory. Keeps the newest ``keep_last`` complete checkpoints of the lineage.

    ``root`` must exist (the trainer creates it before the first step; a run folder deleted meanwhile is not
    recreated). A write that fails for a disk reason (full, read-only, folder gone) raises an
    :class:`~g3dr.errors.OutputError` on the rank that met it and leaves the previous checkpoint as it was; the
    other ranks of a multi-rank job are then ended by the launcher (torchrun, srun).
    """
    root = Path(root)
    name = checkpoint_name(step)
    final = root / name
    partial = root / (name + PARTIAL_SUFFIX)
    if is_complete(final):
        log.info("checkpoint %s already exists; not saving it again", final)
        return final
    started = time.time()
    try:
        if rank == 0:
            root.mkdir(exist_ok=True)  # not its parents: a run folder deleted during training is not recreated
            if partial.exists():  # left by a save that was killed
                shutil.rmtree(partial)
            if final.exists():  # an incomplete directory of that name (cannot normally happen)
                shutil.rmtree(final)
        _barrier()
        engine.save_checkpoint(str(root), tag=partial.name, client_state=dict(client_state), save_latest=False)
        torch.save(rank_state, partial / f"rank-{rank}.pt")
    except Exception as err:
        failure = _save_failed(err, root, name, rank)
        if failure is None:
            raise
        if rank == 0 and world_size == 1:  # give the space back; with more ranks the next save removes it
            shutil.rmtree(partial, ignore_errors=True)
        raise failure from err
    _barrier()
    files = record_files(partial, rank, world_size)
    if rank == 0:
        missing = [r for r in range(world_size) if f"rank-{r}.pt" not in files]
        if missing:
            raise RuntimeError(f"checkpoint {partial}: per-rank state of ranks {missing} is missing")
        meta = {"step": int(step), "world_size": int(world_size), "saved_at": time.time(),
                "parent": _read_latest(root), "files": files, "client_state": client_state}
        try:
            _atomic_write_text(partial / META_FILENAME, json.dumps(meta, indent=1, sort_keys=True, default=str))
            os.replace(partial, final)
            _fsync_dir(root)
            _atomic_write_text(root / LATEST_FILENAME, name + "\n")
        except OSError as err:
            failure = _save_failed(err, root, name, rank)
            if not final.exists():
                shutil.rmtree(partial, ignore_errors=True)
            raise failure from err
        prune(root, keep_last)
        log.info("saved checkpoint %s in %.1f s", final, time.time() - started)
    _barrier()
    return final


def prune(root: str | Path, keep_last: int) -> list[Path]:
    """Remove all but the newest ``keep_last`` complete checkpoints of the lineage (never the head, never a
    checkpoint newer than it) and stale partial saves; returns what was removed."""
    root = Path(root)
    head = find_latest(root)
    lineage = [p for p in list_complete(root) if head is not None and step_of(p) <= step_of(head)]
    removed = lineage[:-keep_last] if keep_last > 0 else []
    newest = step_of(head) if head is not None else None
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
    error = broadcast_object(error)
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
