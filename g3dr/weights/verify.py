"""Which weight files a job needs, and whether the local copies are the right ones (sha256).

:func:`verify_for` is the one check every job entry point calls before starting (train, eval, prep,
``g3dr submit``): it lists the files the config names for that job kind, checks presence, then the sha256
against the lock file (full hashes the lab pinned) or the registry (published full hashes or prefixes),
and raises one :class:`~g3dr.errors.WeightsError` naming every missing or mismatching file, its config
key and the command that gets it.

Hashing streams the file (progress bar for big files) and caches the digest keyed by the file's real
path, size, mtime, ctime, inode and device (``$G3DR_CACHE_DIR`` or ``~/.cache/g3dr``), so a 600 MB file is
hashed once, not at every job start. No torch import here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Literal

from g3dr.errors import WeightsError
from g3dr.log import get_logger
from g3dr.weights.registry import Lock, LockEntry, Registry, WeightEntry, load_lock, load_registry

if TYPE_CHECKING:
    from g3dr.config import Config

log = get_logger("g3dr.weights")

JobKind = Literal["train", "eval", "prep", "all"]
JOB_KINDS: tuple[str, ...] = ("train", "eval", "prep", "all")
DEPTH_MODEL_KEY = "prep.depth_model"
"""Pseudo config key of ``g3dr prep shards --depth-model DIR`` (prep takes no config file)."""
PROGRESS_MIN_BYTES = 32 << 20
CACHE_ENV = "G3DR_CACHE_DIR"
LOCK_ENV = "G3DR_WEIGHTS_LOCK"
"""Lock file used when neither ``--lock`` nor the config's ``weights_lock`` names one (prep has no config)."""
_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------------
# Hashing with a cache
# --------------------------------------------------------------------------------------------------


def hash_cache_file() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "g3dr")
    return Path(base) / "sha256-cache.json"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


_STAMP_KEYS = ("size", "mtime_ns", "ctime_ns", "ino", "dev")


def _stamp(st: os.stat_result) -> dict:
    # ctime is set by the kernel on every write and every metadata change (utime included) and cannot be set back
    # by a user: a file rewritten and given its old mtime again has a new ctime.
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino,
            "dev": st.st_dev}


def file_sha256(path: str | Path, progress: bool = False, use_cache: bool = True) -> str:
    """Hex sha256 of ``path``'s bytes, streamed; reuses a cached digest while size, mtime, ctime, inode and device
    match.

    A cache that cannot be read or written only costs a rehash. What the cache cannot see (``docs/weights.md``):
    bytes changed without any metadata change (disk corruption, a write to the block device, a clock set back);
    pass ``use_cache=False`` (``--no-cache``) to rehash.
    """
    from tqdm import tqdm

    path = Path(path)
    real = os.path.realpath(path)
    st = os.stat(real)
    cache_path = hash_cache_file()
    if use_cache:
        hit = _read_cache(cache_path).get(real)
        if isinstance(hit, dict) and {k: hit.get(k) for k in _STAMP_KEYS} == _stamp(st):
            return str(hit["sha256"])
    h = hashlib.sha256()
    with open(real, "rb") as f, tqdm(total=st.st_size, unit="B", unit_scale=True, unit_divisor=1024,
                                     desc=f"sha256 {path.name}", leave=False,
                                     disable=not progress or st.st_size < PROGRESS_MIN_BYTES) as bar:
        while block := f.read(_CHUNK):
            h.update(block)
            bar.update(len(block))
    digest = h.hexdigest()
    if use_cache and os.stat(real).st_mtime_ns == st.st_mtime_ns:  # not changed while we read it
        try:
            cache = _read_cache(cache_path)
            cache[real] = {**_stamp(st), "sha256": digest}
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
            os.replace(tmp, cache_path)  # concurrent writers may drop each other's entries: only a rehash
        except OSError as err:
            log.debug("cannot write the hash cache %s (%s); files will be rehashed", cache_path, err)
    return digest


# --------------------------------------------------------------------------------------------------
# What a job needs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Requirement:
    """A weight file (or folder) a job needs: ``key`` names it in the config, ``path`` as configured."""

    key: str
    path: str
    kind: str
    directory: bool = False


def requirements_for(cfg: Config | None, kind: str, depth_model: str = "") -> list[Requirement]:
    """The weight files ``cfg`` names for job ``kind``: CLIP and VGG for ``train`` when
    ``loss.critics`` is ``pretrained``; Inception for ``eval`` when FID or IS is requested; the depth model
    folder for ``prep`` when ``depth_model`` is given; all of them for ``all``."""
    if kind not in JOB_KINDS:
        raise ValueError(f"job kind must be one of {JOB_KINDS}, got {kind!r}")
    out: list[Requirement] = []
    if cfg is not None and kind in ("train", "all") and cfg.loss.critics == "pretrained":
        out.append(Requirement("loss.clip_weights", cfg.loss.clip_weights, "train"))
        out.append(Requirement("loss.vgg_weights", cfg.loss.vgg_weights, "train"))
    if cfg is not None and kind in ("eval", "all") and {"fid", "is"} & set(cfg.eval.metrics):
        out.append(Requirement("eval.inception_weights", cfg.eval.inception_weights, "eval"))
    if depth_model and kind in ("prep", "all"):
        out.append(Requirement(DEPTH_MODEL_KEY, depth_model, "prep", directory=True))
    return out


# Files transformers reads from a depth-model folder (AutoImageProcessor + AutoModelForDepthEstimation).
_DEPTH_FILES = ("config.json", "preprocessor_config.json")
_DEPTH_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _folder_files(folder: Path, entry: WeightEntry | None) -> list[str]:
    names = list(_DEPTH_FILES) if entry is None else [f.path for f in entry.files if f.path not in _DEPTH_WEIGHTS]
    weights = next((w for w in _DEPTH_WEIGHTS if (folder / w).is_file()), _DEPTH_WEIGHTS[0])
    return [*names, weights]


# --------------------------------------------------------------------------------------------------
# Checking files
# --------------------------------------------------------------------------------------------------


Status = Literal["ok", "missing", "mismatch", "unpinned"]


@dataclass
class FileCheck:
    """The verdict on one local file.

    ``status``: ``ok`` (hash matches the lock or the registry), ``missing``, ``mismatch`` (wrong hash or
    size), ``unpinned`` (present, but neither the lock nor the registry knows its hash). ``verified_by``:
    ``lock``, ``registry``, ``registry prefix`` or ``""``.
    """

    key: str
    path: str
    status: Status
    detail: str
    entry: WeightEntry | None = None
    relpath: str = ""
    sha256: str | None = None
    size: int | None = None
    verified_by: str = ""
    requirement: Requirement | None = None

    def passes(self, strict: bool = False) -> bool:
        if strict:
            return self.status == "ok" and self.verified_by in ("lock", "registry")
        return self.status in ("ok", "unpinned")

    def fetch_command(self) -> str:
        """The command that downloads this file (for a folder: the whole folder) to where the config wants it."""
        req = self.requirement
        dest = req.path if req is not None else self.path
        name = self.entry.name if self.entry is not None else "NAME"
        return f"g3dr weights fetch {name} --dest {shlex.quote(str(dest))}"


def _check_file(key: str, path: Path, shown: str, entry: WeightEntry | None, candidates: list[WeightEntry],
                relpath: str, lock: Lock, want_hash: bool, progress: bool, use_cache: bool) -> FileCheck:
    lock_key = f"{key}/{relpath}" if relpath else key
    pinned = lock.for_key(lock_key)
    if not path.is_file():
        where = f"not found (looked at {path.resolve()})"
        return FileCheck(lock_key, shown, "missing", where, entry, relpath)
    size = path.stat().st_size
    if pinned is not None:
        if pinned.size is not None and pinned.size != size:
            return FileCheck(lock_key, shown, "mismatch", f"{size} bytes, the lock {lock.source} pins {pinned.size}",
                             entry, relpath, size=size)
        digest = file_sha256(path, progress, use_cache)
        if digest != pinned.sha256:
            return FileCheck(lock_key, shown, "mismatch",
                             f"sha256 {digest}, the lock {lock.source} pins {pinned.sha256}", entry, relpath,
                             sha256=digest, size=size)
        return FileCheck(lock_key, shown, "ok", f"sha256 {digest[:16]}... pinned by {Path(lock.source).name}",
                         entry, relpath, digest, size, "lock")
    known = [(e, e.file(relpath)) for e in candidates]
    known = [(e, f) for e, f in known if f is not None and f.has_hash]
    mine = entry.file(relpath) if entry is not None else None
    if mine is not None and mine.size is not None and mine.size != size and mine.has_hash:
        return FileCheck(lock_key, shown, "mismatch", f"{size} bytes, {entry.name} has {mine.size}", entry, relpath,
                         size=size)
    digest = file_sha256(path, progress, use_cache) if (known or want_hash) else None
    if digest is not None:
        for e, f in known:
            if f.matches(digest):
                how = "registry" if f.sha256 else "registry prefix"
                what = f"sha256 {digest[:16]}... = {e.name}" + ("" if f.sha256 else f" (prefix {f.sha256_prefix} only)")
                return FileCheck(lock_key, shown, "ok", what, e, relpath, digest, size, how)
        if mine is not None and mine.has_hash:
            return FileCheck(lock_key, shown, "mismatch",
                             f"sha256 {digest}, {entry.name} has {mine.expected_text()} ({entry.hash_source})",
                             entry, relpath, digest, size)
    about = f" for {entry.name}" if entry is not None else ", not a registered file"
    detail = f"present; no published sha256{about}: pin it with --write-lock"
    return FileCheck(lock_key, shown, "unpinned", detail, entry, relpath, digest, size)


def check_requirements(requirements: Iterable[Requirement], registry: Registry | None = None,
                       lock: Lock | None = None, want_hash: bool = False, progress: bool = True,
                       use_cache: bool = True) -> list[FileCheck]:
    """One :class:`FileCheck` per file of ``requirements`` (a folder gives one per file it needs).

    ``want_hash``: hash files even when nothing pins them (to write a lock file).
    """
    registry = registry or load_registry()
    lock = lock or Lock()
    checks = []
    for req in requirements:
        candidates = registry.for_key(req.key)
        matched = registry.match(req.key, req.path)
        entry = matched or registry.primary(req.key)
        if req.directory:
            folder = Path(req.path)
            if not folder.is_dir():
                checks.append(FileCheck(req.key, req.path, "missing",
                                        f"no depth model at {folder.resolve()} (the folder does not exist)", entry,
                                        requirement=req))
                continue
            for rel in _folder_files(folder, matched):
                check = _check_file(req.key, folder / rel, str(Path(req.path) / rel), entry,
                                    [matched] if matched else [], rel, lock, want_hash, progress, use_cache)
                check.requirement = req
                checks.append(check)
        else:
            check = _check_file(req.key, Path(req.path), req.path, matched, candidates, "", lock, want_hash,
                                progress, use_cache)
            if check.entry is None:
                check.entry = entry  # for the fetch command: the preferred file of this key
            check.requirement = req
            checks.append(check)
    return checks


def format_table(checks: list[FileCheck]) -> str:
    """A plain-text table: config key, path, status, detail."""
    rows = [("KEY", "PATH", "STATUS", "DETAIL")] + [(c.key, c.path, c.status.upper() if not c.passes() else c.status,
                                                    c.detail) for c in checks]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows)


def failure_message(failures: list[FileCheck], what: str) -> str:
    lines = [f"{len(failures)} weight file(s) needed for {what} missing or not verified:"]
    for c in failures:
        if c.status == "missing":
            source = c.entry.file(c.relpath) if c.entry is not None else None
            url = f" (downloads {source.urls[0]})" if source is not None and source.urls else ""
            action = (f"get it on a machine with internet with `{c.fetch_command()}`{url}, then copy it here"
                      if c.entry is not None else "put the file there or fix the config key")
        elif c.status == "mismatch":
            action = f"the file is corrupt or another file; re-download it with `{c.fetch_command()}`"
        else:
            action = "pin it with `g3dr weights verify ... --write-lock FILE` (strict mode needs a full sha256)"
        lines.append(f"  - {c.key}={c.path}: {c.status}: {c.detail}; {action}")
    return "\n".join(lines)


def default_lock(cfg: Config | None) -> str:
    """The lock file a job uses: the config's ``weights_lock``, else ``$G3DR_WEIGHTS_LOCK``, else none."""
    return (getattr(cfg, "weights_lock", "") if cfg is not None else "") or os.environ.get(LOCK_ENV, "")


def verify_for(cfg: Config | None, kind: str, *, depth_model: str = "", lock: str | None = None,
               strict: bool = False, progress: bool = True, registry: Registry | None = None,
               use_cache: bool = True) -> list[FileCheck]:
    """Check every weight file job ``kind`` needs under ``cfg`` (see :func:`requirements_for`) before it starts.

    ``lock`` defaults to :func:`default_lock`. Returns the checks; raises a :class:`WeightsError` naming each
    missing or mismatching file (and, with ``strict``, each file not pinned by a full sha256), its config
    key and the command that gets it. Unpinned files pass with a warning.
    """
    requirements = requirements_for(cfg, kind, depth_model=depth_model)
    if not requirements:
        return []
    lock_path = lock if lock is not None else default_lock(cfg)
    checks = check_requirements(requirements, registry, load_lock(lock_path), progress=progress,
                                use_cache=use_cache)
    failures = [c for c in checks if not c.passes(strict)]
    if failures:
        raise WeightsError(failure_message(failures, f"`{kind}`"))
    from g3dr.distributed import resolve_dist_env

    warn = log.warning if resolve_dist_env().is_main else log.debug  # once per job, not once per rank
    for c in checks:
        if c.status == "unpinned":
            warn("weights: %s=%s has no published sha256 and no lock entry (checked presence only); pin it "
                        "with `g3dr weights verify --write-lock FILE` and set weights_lock", c.key, c.path)
    log.info("weights for %s verified: %s", kind, ", ".join(f"{c.key} ({c.verified_by or 'present'})" for c in checks))
    return checks


def lock_entries(checks: list[FileCheck]) -> list[LockEntry]:
    """Lock entries for the checks that passed and carry a hash (mismatching files are never pinned)."""
    out = []
    for c in checks:
        if c.status in ("ok", "unpinned") and c.sha256:
            out.append(LockEntry(key=c.key, sha256=c.sha256, size=c.size, path=c.path,
                                 name=c.entry.name if c.entry is not None else ""))
    return out
