"""Checks that output locations can be written, before a job spends time on work it could not save.

Every job that writes (``g3dr train``'s run folder and checkpoints, ``g3dr prep``'s ``--out``, ``g3dr render``'s
files, ``g3dr eval``'s output folder) calls :func:`check_writable_dir` or :func:`check_output_file` before its
first real work, and wraps its writes in :func:`writing`. A read-only file system (EROFS), a full disk or quota
(ENOSPC, EDQUOT), missing permission, or a file where a folder should be (ENOTDIR) becomes one
:class:`~g3dr.errors.OutputError` naming the location, the cause and the fix, instead of a traceback at the
first save. No torch import here.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from g3dr.errors import OutputError

_CAUSES = {
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a file stands where a folder should be",
    errno.EISDIR: "a folder stands where a file should be",
    errno.ENOENT: "a parent folder does not exist (deleted or moved?)",
}
_FULL = (errno.ENOSPC, errno.EDQUOT)


def free_bytes(path: str | Path) -> int | None:
    """Free bytes (for this user) on the file system holding ``path`` or its nearest existing parent."""
    for candidate in (Path(path), *Path(path).parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def describe_os_error(err: OSError, path: str | Path) -> str:
    """A short cause for ``err`` met while writing ``path``: the cause in words, the errno name, free space
    when the disk is full."""
    cause = _CAUSES.get(err.errno or -1, err.strerror or str(err))
    name = errno.errorcode.get(err.errno or -1, "")
    if err.errno in _FULL:
        free = free_bytes(path)
        if free is not None:
            cause += f", {human_bytes(free)} free"
    return f"{cause} ({name})" if name else cause


def _file_in_the_way(path: Path) -> Path | None:
    """The first existing component of ``path`` (itself or a parent) that is not a folder, if any."""
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return None if candidate.is_dir() else candidate
    return None


def write_probe(path: str | Path, create: bool = True) -> None:
    """Write, fsync and remove a small file in the folder ``path`` (created first when ``create``); raises the
    OSError met (EROFS, ENOSPC, EACCES, ENOTDIR, ENOENT, ...)."""
    path = Path(path)
    probe = path / f".g3dr-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if create:
        path.mkdir(parents=True, exist_ok=True)
    try:
        with open(probe, "wb") as f:
            f.write(b"g3dr")
            f.flush()
            os.fsync(f.fileno())
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def check_writable_dir(path: str | Path, what: str, fix: str = "", create: bool = True) -> Path:
    """Create ``path`` if needed and prove that a file can be written in it (a probe file, fsynced, removed).

    With ``create=False`` a missing ``path`` is not created: the probe goes to its nearest existing parent, where
    the folders would be created. ``what`` names the setting in the error (``run_dir``, ``--out``); ``fix``
    replaces the default action. Raises :class:`OutputError`; returns the path.
    """
    path = Path(path)
    blocker = _file_in_the_way(path)
    if blocker is not None:
        where = "is a file" if blocker == path else f"cannot be a folder: {blocker} is a file"
        raise OutputError(f"{what} {path} {where}, not a folder; {fix or 'choose another path or move the file'}")
    probe_in = path
    if not create:
        probe_in = next((p for p in (path, *path.parents) if p.is_dir()), Path("."))
    try:
        write_probe(probe_in, create=create)
    except OSError as err:
        raise OutputError(f"{what} {path} cannot be written: {describe_os_error(err, path)}; "
                          f"{fix or 'choose a writable location'}") from None
    return path


def check_output_file(path: str | Path, what: str, fix: str = "") -> Path:
    """``path`` is a file to be written: not an existing folder, and its folder writable (created if needed)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file name ({fix or 'e.g. ' + str(path / 'out')})")
    check_writable_dir(path.parent if str(path.parent) else Path("."), what=f"{what} {path}: its folder", fix=fix)
    return path


@contextmanager
def writing(path: str | Path, what: str, fix: str = "") -> Iterator[None]:
    """Turn an OSError raised by the writes inside the block into an :class:`OutputError` naming ``path``."""
    try:
        yield
    except OutputError:
        raise
    except OSError as err:
        raise OutputError(f"writing {what} {path} failed: {describe_os_error(err, path)}; "
                          f"{fix or 'free space or choose a writable location, then rerun'}") from err
