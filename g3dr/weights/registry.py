"""The registry of known weight files (``registry.yaml`` beside this module) and user lock files.

The registry says, per weight file: which config key names it, its default local path, where to download
it, and its sha256 where a public source states it (a full hash, or the 8-hex prefix of torch.hub file
names). A lock file (``g3dr weights verify --write-lock FILE``) pins the full sha256 of a lab's own copies,
keyed by config key, so that files without a published hash are verified too.

Only stdlib and PyYAML here: the CLI imports this module to register its parser.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import yaml

from g3dr.errors import WeightsError

REGISTRY_ENV = "G3DR_WEIGHTS_REGISTRY"
"""Environment variable naming a registry file that replaces the built-in one (a lab mirror, tests)."""
LOCK_VERSION = 1
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX_PREFIX = re.compile(r"[0-9a-f]{8,63}")


@dataclass(frozen=True)
class RegistryFile:
    """One downloadable file: ``path`` inside its entry (``""`` for single-file entries)."""

    path: str
    urls: tuple[str, ...]
    sha256: str | None = None
    sha256_prefix: str | None = None
    size: int | None = None

    @property
    def has_hash(self) -> bool:
        return bool(self.sha256 or self.sha256_prefix)

    def matches(self, digest: str) -> bool:
        """True when ``digest`` (full hex sha256) equals the recorded hash or starts with the recorded prefix."""
        if self.sha256:
            return digest == self.sha256
        if self.sha256_prefix:
            return digest.startswith(self.sha256_prefix)
        return False

    def expected_text(self) -> str:
        if self.sha256:
            return self.sha256
        if self.sha256_prefix:
            return f"{self.sha256_prefix}... (prefix)"
        return "unknown"


@dataclass(frozen=True)
class WeightEntry:
    """A registered weight: one file, or a folder of files (``directory``), named by ``config_key``."""

    name: str
    config_key: str
    default_path: str
    files: tuple[RegistryFile, ...]
    directory: bool = False
    description: str = ""
    hash_source: str = ""
    licence: str = ""

    def file(self, relpath: str = "") -> RegistryFile | None:
        for f in self.files:
            if f.path == relpath:
                return f
        return None

    @property
    def file_names(self) -> set[str]:
        """Names a local copy of this (single-file) entry plausibly has: the default path's and the URLs'."""
        names = {PurePosixPath(self.default_path).name}
        for f in self.files:
            names.update(PurePosixPath(urlparse(u).path).name for u in f.urls)
        return names

    def hash_kind(self) -> str:
        """``sha256``, ``prefix``, ``none`` or ``partial`` (folders whose files differ)."""
        kinds = {"sha256" if f.sha256 else "prefix" if f.sha256_prefix else "none" for f in self.files}
        return kinds.pop() if len(kinds) == 1 else "partial"


@dataclass
class Registry:
    entries: tuple[WeightEntry, ...]
    source: str

    def get(self, name: str) -> WeightEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise WeightsError(f"no weight named {name!r} in the registry {self.source} "
                           f"(known: {', '.join(e.name for e in self.entries)}; `g3dr weights list` shows them)")

    def for_key(self, key: str) -> list[WeightEntry]:
        return [e for e in self.entries if e.config_key == key]

    def match(self, key: str, path: str) -> WeightEntry | None:
        """The entry of ``key`` that the local ``path`` is a copy of, judged by its file (or folder) name."""
        name = PurePosixPath(str(path).replace(os.sep, "/")).name
        for e in self.for_key(key):
            if e.directory and PurePosixPath(e.default_path).name == name:
                return e
            if not e.directory and name in e.file_names:
                return e
        return None

    def primary(self, key: str) -> WeightEntry | None:
        """The preferred entry of ``key`` (the first listed): what ``fetch`` downloads for an unknown file name."""
        entries = self.for_key(key)
        return entries[0] if entries else None


def _parse_hash(value: Any, where: str, prefix: bool) -> str | None:
    if value is None:
        return None
    text = str(value).strip().lower()
    if not (_HEX_PREFIX if prefix else _HEX64).fullmatch(text):
        what = "8 to 63 hex digits" if prefix else "64 hex digits"
        raise WeightsError(f"{where}: {'sha256_prefix' if prefix else 'sha256'} must be {what}, got {value!r}")
    return text


def _parse_file(data: dict, where: str, relpath: str) -> RegistryFile:
    urls = data.get("urls") or []
    if isinstance(urls, str):
        urls = [urls]
    sha = _parse_hash(data.get("sha256"), where, prefix=False)
    prefix = _parse_hash(data.get("sha256_prefix"), where, prefix=True)
    if sha and prefix:
        raise WeightsError(f"{where}: give sha256 or sha256_prefix, not both")
    return RegistryFile(path=relpath, urls=tuple(str(u) for u in urls), sha256=sha, sha256_prefix=prefix,
                        size=_parse_size(data.get("size"), where))


def _parse_size(size: Any, where: str) -> int | None:
    """A file size from a registry or lock entry: a byte count, or None (unknown)."""
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise WeightsError(f"{where}: size must be a byte count or null, got {size!r}")
    return size


def parse_registry(data: Any, source: str) -> Registry:
    """Validate the mapping of a registry file; a :class:`WeightsError` names the entry and field."""
    if not isinstance(data, dict) or not isinstance(data.get("weights"), list):
        raise WeightsError(f"weights registry {source}: expected a mapping with a list 'weights'")
    entries, names = [], set()
    for i, raw in enumerate(data["weights"]):
        where = f"weights registry {source}, entry {i}"
        if not isinstance(raw, dict):
            raise WeightsError(f"{where}: expected a mapping")
        for key in ("name", "config_key", "default_path"):
            if not isinstance(raw.get(key), str) or not raw[key]:
                raise WeightsError(f"{where}: '{key}' must be a non-empty string")
        where = f"weights registry {source}, entry {raw['name']!r}"
        if raw["name"] in names:
            raise WeightsError(f"{where}: the name is used twice")
        names.add(raw["name"])
        if "files" in raw:
            if not isinstance(raw["files"], list) or not raw["files"]:
                raise WeightsError(f"{where}: 'files' must be a non-empty list")
            files = []
            for f in raw["files"]:
                if not isinstance(f, dict) or not isinstance(f.get("path"), str) or not f["path"]:
                    raise WeightsError(f"{where}: every file needs a 'path' inside the folder")
                files.append(_parse_file(f, f"{where}, file {f['path']!r}", f["path"]))
            directory = True
        else:
            files = [_parse_file(raw, where, "")]
            directory = False
        if not all(f.urls for f in files):
            raise WeightsError(f"{where}: every file needs at least one URL")
        entries.append(WeightEntry(name=raw["name"], config_key=raw["config_key"], default_path=raw["default_path"],
                                   files=tuple(files), directory=directory,
                                   description=" ".join(str(raw.get("description", "")).split()),
                                   hash_source=str(raw.get("hash_source", "")),
                                   licence=" ".join(str(raw.get("licence", "")).split())))
    return Registry(tuple(entries), source)


def default_registry_path() -> str:
    return str(resources.files("g3dr.weights").joinpath("registry.yaml"))


def load_registry(path: str | Path | None = None) -> Registry:
    """The registry at ``path``, else at ``$G3DR_WEIGHTS_REGISTRY``, else the built-in ``registry.yaml``."""
    if path is None:
        path = os.environ.get(REGISTRY_ENV) or None
    if path is None:
        text = resources.files("g3dr.weights").joinpath("registry.yaml").read_text(encoding="utf-8")
        source = default_registry_path()
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise WeightsError(f"cannot read the weights registry {path}: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise WeightsError(f"weights registry {source}: not valid YAML ({err})") from None
    return parse_registry(data, source)


# --------------------------------------------------------------------------------------------------
# Lock files
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LockEntry:
    """The pinned copy of one file: ``key`` is the config key (``prep.depth_model/model.safetensors`` for a
    file of a folder); ``path`` where it was when pinned (informative); ``url`` an optional mirror."""

    key: str
    sha256: str
    size: int | None = None
    path: str = ""
    name: str = ""
    url: str = ""


@dataclass
class Lock:
    entries: dict[str, LockEntry] = field(default_factory=dict)
    source: str = ""

    def for_key(self, key: str) -> LockEntry | None:
        return self.entries.get(key)

    def for_name(self, name: str, relpath: str = "") -> LockEntry | None:
        """A pinned file of registry entry ``name`` (and ``relpath`` inside a folder), whatever its key."""
        for e in self.entries.values():
            if e.name == name and (not relpath or e.key.endswith("/" + relpath)):
                return e
        return None


def load_lock(path: str | Path | None) -> Lock:
    """Read a lock file; ``None`` or ``""`` is an empty lock. A missing or malformed file is a WeightsError."""
    if not path:
        return Lock()
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights lock file {p} not found; write one with "
                           f"`g3dr weights verify --config CONFIG --write-lock {p}` where the weights are")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise WeightsError(f"weights lock file {p}: cannot read it ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("files", {}), dict):
        raise WeightsError(f"weights lock file {p}: expected a mapping with a mapping 'files' (config key -> pin)")
    if data.get("version", LOCK_VERSION) != LOCK_VERSION:
        raise WeightsError(f"weights lock file {p}: version {data.get('version')!r} is not {LOCK_VERSION}")
    entries = {}
    for key, raw in (data.get("files") or {}).items():
        where = f"weights lock file {p}, {key!r}"
        if not isinstance(raw, dict):
            raise WeightsError(f"{where}: expected a mapping with sha256")
        sha = _parse_hash(raw.get("sha256"), where, prefix=False)
        if sha is None:
            raise WeightsError(f"{where}: sha256 is missing")
        entries[str(key)] = LockEntry(key=str(key), sha256=sha, size=_parse_size(raw.get("size"), where), path=str(raw.get("path") or ""),
                                      name=str(raw.get("name") or ""), url=str(raw.get("url") or ""))
    return Lock(entries, str(p))


def write_lock(path: str | Path, new: list[LockEntry]) -> Path:
    """Merge ``new`` into the lock file at ``path`` (created if absent), atomically; returns the path."""
    p = Path(path)
    lock = load_lock(p) if p.is_file() else Lock()
    for e in new:
        lock.entries[e.key] = e
    files = {}
    for key in sorted(lock.entries):
        e = lock.entries[key]
        item: dict[str, Any] = {"sha256": e.sha256, "size": e.size, "path": e.path}
        if e.name:
            item["name"] = e.name
        if e.url:
            item["url"] = e.url
        files[key] = item
    text = ("# Pinned sha256 of weight files, written by `g3dr weights verify --write-lock`.\n"
            "# Keys are config keys; every job checks the files it needs against these hashes.\n"
            + yaml.safe_dump({"version": LOCK_VERSION, "files": files}, sort_keys=False))
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)
    return p
