"""Download registered weight files (on a machine with internet), resumably and verified.

A download goes to ``DEST.partial``; an interrupted one is resumed with an HTTP Range request when the
server supports it (else restarted). The finished file is hashed and compared with the lock file's or the
registry's sha256 (or prefix) *before* it is renamed to ``DEST`` (atomic ``os.replace``), so ``DEST`` is
either absent, the old file, or a verified copy; a mismatching download is deleted. urllib only (no torch).
"""

from __future__ import annotations

import http.client
import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from g3dr.errors import WeightsError
from g3dr.log import get_logger
from g3dr.weights.registry import Lock, RegistryFile, WeightEntry
from g3dr.weights.verify import file_sha256

log = get_logger("g3dr.weights")

USER_AGENT = "g3dr-scale-weights/1"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FetchTarget:
    """One file to download: ``file`` of ``entry`` to ``dest``; ``lock_key`` finds its pin in a lock file."""

    entry: WeightEntry
    file: RegistryFile
    dest: Path
    lock_key: str = ""


@dataclass
class FetchResult:
    dest: Path
    status: str
    """``downloaded``, ``present`` (already there and verified, or unpinned and not forced)."""
    sha256: str | None
    verified_by: str
    """``lock``, ``registry``, ``registry prefix`` or ``""`` (nothing to compare with)."""


def targets_for_entry(entry: WeightEntry, dest: str | Path | None, lock_key: str = "") -> list[FetchTarget]:
    """The files of ``entry`` downloaded to ``dest`` (a file path, or the folder of a folder entry);
    ``dest`` None: the entry's default path."""
    base = Path(dest) if dest else Path(entry.default_path)
    key = lock_key or entry.config_key
    if entry.directory:
        return [FetchTarget(entry, f, base / f.path, f"{key}/{f.path}") for f in entry.files]
    return [FetchTarget(entry, entry.files[0], base, key)]


def _expected(target: FetchTarget, lock: Lock) -> tuple[str | None, str | None, str, list[str]]:
    """(full sha256, prefix, source, urls) for ``target``: the lock's pin first, then the registry."""
    pinned = lock.for_key(target.lock_key) if target.lock_key else None
    if pinned is None:
        pinned = lock.for_name(target.entry.name, target.file.path)
    urls = list(target.file.urls)
    if pinned is not None:
        if pinned.url:
            urls.insert(0, pinned.url)
        return pinned.sha256, None, f"the lock {lock.source}", urls
    return target.file.sha256, target.file.sha256_prefix, f"the registry ({target.entry.name})", urls


def _matches(digest: str, sha: str | None, prefix: str | None) -> bool:
    return digest == sha if sha else digest.startswith(prefix) if prefix else True


def _download(url: str, partial: Path, progress: bool, timeout: float) -> None:
    """Append ``url``'s remaining bytes to ``partial`` (Range resume), or restart it; raises WeightsError."""
    from tqdm import tqdm

    have = partial.stat().st_size if partial.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)

    def resume_note() -> str:
        if partial.exists() and partial.stat().st_size:
            return f"; the partial download stays at {partial}: run the same command again to resume"
        return ""

    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status = getattr(response, "status", 200)
            if have and status == 206 and str(response.headers.get("Content-Range", "")).startswith(f"bytes {have}-"):
                mode = "ab"
            else:
                mode, have = "wb", 0  # no (usable) range support: start again
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            got = 0
            with open(partial, mode) as out, tqdm(total=(expected + have) if expected is not None else None,
                                                  initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                                                  desc=partial.name[: -len(".partial")], disable=not progress) as bar:
                while block := response.read(_CHUNK):
                    out.write(block)
                    got += len(block)
                    bar.update(len(block))
                out.flush()
                os.fsync(out.fileno())
            if expected is not None and got < expected:
                raise WeightsError(f"download of {url} ended after {have + got} of {have + expected} bytes"
                                   + resume_note())
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: the partial file is complete (checked next)
            return
        raise WeightsError(f"cannot download {url}: HTTP {err.code} {err.reason}" + resume_note()) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, socket.timeout) as err:
        reason = getattr(err, "reason", None) or err
        raise WeightsError(f"cannot download {url}: {reason} (no internet on this machine? fetch on one that has it "
                           f"and copy the file)" + resume_note()) from None


def fetch_target(target: FetchTarget, lock: Lock | None = None, force: bool = False, progress: bool = True,
                 timeout: float = 60.0) -> FetchResult:
    """Make ``target.dest`` a verified copy: keep a verified existing file, else download, check, rename."""
    lock = lock or Lock()
    sha, prefix, source, urls = _expected(target, lock)
    dest = target.dest
    how = "lock" if source.startswith("the lock") else ("registry" if sha else "registry prefix" if prefix else "")
    if dest.is_file() and not force:
        if not (sha or prefix):
            log.info("%s exists; nothing pins its sha256, keeping it (--force downloads again)", dest)
            return FetchResult(dest, "present", None, "")
        digest = file_sha256(dest, progress)
        if _matches(digest, sha, prefix):
            log.info("%s is present and verified (%s)", dest, how)
            return FetchResult(dest, "present", digest, how)
        log.warning("%s exists but its sha256 %s does not match %s; downloading it again", dest, digest, source)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    errors = []
    for i, url in enumerate(urls):
        try:
            log.info("downloading %s -> %s", url, dest)
            _download(url, partial, progress, timeout)
            break
        except WeightsError as err:
            errors.append(str(err))
            if i + 1 < len(urls):
                log.warning("%s; trying the next URL", err)
    else:
        raise WeightsError("; ".join(errors) if errors else f"{target.entry.name}: no URL to download from")
    digest = file_sha256(partial, progress, use_cache=False)
    if not _matches(digest, sha, prefix):
        partial.unlink(missing_ok=True)
        want = sha or f"{prefix}... (prefix)"
        raise WeightsError(f"downloaded {target.entry.name} has sha256 {digest}, but {source} expects {want}; "
                           f"the download was deleted and {dest} left as it was (a wrong mirror, a changed "
                           f"file upstream, or a corrupted transfer)")
    os.replace(partial, dest)
    if not how:
        log.warning("%s downloaded; no published sha256 to check it against (sha256 %s): pin it with "
                    "`g3dr weights verify --write-lock FILE`", dest, digest)
    return FetchResult(dest, "downloaded", digest, how)
