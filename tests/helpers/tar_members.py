"""Read a shard's members and write them back (reordered, duplicated, cut) to build corrupt test shards."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def read_members(path: Path) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of every file member of the tar at ``path``, in order."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def write_members(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A USTAR tar at ``path`` holding ``members`` in the given order (names may repeat)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
