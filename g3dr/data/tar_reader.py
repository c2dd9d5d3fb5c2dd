"""A fast sequential reader of WebDataset tar streams.

Python's ``tarfile`` spends ~0.2 ms per member on header parsing; with four members per sample that
was a third of the loader's time. This reader handles what shard writers produce - ustar/GNU/PAX
regular files, GNU long names (``L``) and PAX ``path`` records - verifies each header checksum, and
groups consecutive members into samples by WebDataset's rule (the key ends at the first dot of the last
path component). Streams come from WebDataset's ``gopen`` (local paths, ``pipe:``, URLs).

It never seeks, so it works on pipes. A corrupt header or a stream that ends inside a member raises
:class:`TarReadError` after the complete samples before it were yielded; the partial sample is dropped.
"""

from __future__ import annotations

from typing import BinaryIO, Iterator

BLOCK = 512


class TarReadError(IOError):
    """The tar stream is corrupt or truncated."""


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining > 0:
        chunk = stream.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if len(data) != size:
        raise TarReadError(f"stream ended inside a tar member ({len(data)} of {size} bytes)")
    return data


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for large sizes
        value = int.from_bytes(field[1:], "big")
        return value
    text = field.rstrip(b"\0 ").lstrip(b" ")
    return int(text, 8) if text else 0


def _pax_path(data: bytes) -> str | None:
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        record = data[space + 1:pos + length - 1]
        key, _, value = record.partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
        pos += length
    return None


def iter_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file in the tar stream, in order."""
    long_name: str | None = None
    while True:
        header = stream.read(BLOCK)
        if not header:
            return
        if len(header) < BLOCK:
            header += _read_exact(stream, BLOCK - len(header))
        if header.count(0) == BLOCK:  # end-of-archive marker
            return
        stored = _octal(header[148:156])
        computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
        if stored != computed:
            raise TarReadError("tar header checksum mismatch (corrupt shard)")
        size = _octal(header[124:136])
        kind = header[156:157]
        data = _read_exact(stream, size)
        padding = -size % BLOCK
        if padding:
            _read_exact(stream, padding)
        if kind in (b"L", b"x"):
            long_name = data.rstrip(b"\0").decode("utf-8") if kind == b"L" else _pax_path(data)
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name = None
            continue  # directories, links, global headers: not sample data
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            if header[257:262] == b"ustar":
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8")
                if prefix:
                    name = f"{prefix}/{name}"
        yield name, data


def split_key(name: str) -> tuple[str, str] | None:
    """WebDataset's key/extension split: ``a/b.c.d`` -> (``a/b``, ``c.d``); None without an extension."""
    directory, slash, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return directory + slash + stem, ext


def iter_samples(stream: BinaryIO, url: str = "") -> Iterator[dict]:
    """Samples ``{"__key__", "__url__", ext: bytes, ...}`` of a tar stream (consecutive members with one key)."""
    current: dict | None = None
    for name, data in iter_members(stream):
        if name.rpartition("/")[2].startswith("__"):
            continue  # WebDataset metadata members (__index__ and the like)
        split = split_key(name)
        if split is None:
            continue
        key, ext = split
        if current is not None and current["__key__"] != key:
            yield current
            current = None
        if current is None:
            current = {"__key__": key, "__url__": url}
        current[ext.lower()] = data
    if current is not None:
        yield current
