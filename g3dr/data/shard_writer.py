"""Writes prepared samples into WebDataset shards: parallel, deterministic, resumable, SLURM-array ready.

Assignment is deterministic: the inputs, sorted by key, are cut into consecutive runs of ``shard_size``;
shard ``s`` holds inputs ``[s * shard_size, (s + 1) * shard_size)`` minus the rejected ones. A job with
``shard_index=i, num_jobs=j`` writes the shards ``s`` with ``s % j == i`` (one SLURM array task each).

A shard is written to a temporary name and renamed only when complete; its record
(``_records/<name>.json``: sample count, bytes, sha256, rejects, the plan fingerprint) is written before
the rename, so "the tar exists" means "the shard and its record are complete". A rerun skips finished
shards. When every shard of the plan is finished, the job that notices writes ``manifest.json`` and
``rejects.jsonl`` and checks that inputs = written + rejected.

This module knows nothing about where inputs come from; a *source* prepares samples: the release and
ImageNet layouts in :mod:`g3dr.data.sources` (which ``g3dr prep shards`` and ``g3dr bench loader`` use), the
procedural set in :mod:`g3dr.data.synth`. It lives in the library because the loaders create the synthetic set on
first use.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, Sequence

from PIL import Image

from g3dr.errors import DataError
from g3dr.log import get_logger
from g3dr.outputs import check_writable_dir, writing

log = get_logger("g3dr.data_prep")

MIN_INPUT_SIZE = 64
"""Default shortest side an input image must have (``g3dr prep shards --min-size``, ``g3dr render --min-size``)."""


# --------------------------------------------------------------------------------------------------
# What sources produce
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)  # slots: an ImageNet plan holds 1.3M of these
class Item:
    """One input: an image (or a synthetic index) and where its depth comes from."""

    key: str
    image: str = ""
    depth: str = ""
    label: int = -1
    synset: str = ""
    index: int = -1


@dataclass
class Prepared:
    key: str
    files: dict[str, bytes]


@dataclass
class Rejected:
    key: str
    source: str
    reason: str
    """Short code: corrupt_image, too_small, missing_depth, corrupt_depth, depth_not_16bit, depth_size_mismatch."""
    detail: str = ""

    def to_json(self) -> dict[str, str]:
        return {"key": self.key, "source": self.source, "reason": self.reason, "detail": self.detail}


@dataclass(frozen=True)
class StoreOptions:
    """How samples are stored: square resolutions, image codec and quality, the minimum input size."""

    resolutions: tuple[int, ...] = (256,)
    image_format: Literal["jpg", "webp"] = "jpg"
    quality: int = 95
    min_size: int = MIN_INPUT_SIZE
    """Inputs whose shorter side is below this are rejected (``too_small``)."""
    depth_png_level: int = 0
    """zlib level of the depth PNGs. 0 (stored) decodes ~2.5x faster than 1-9 for ~30% more bytes;
    the loader's throughput is bound by decoding, so speed wins by default."""

    def to_json(self) -> dict[str, Any]:
        return {"resolutions": list(self.resolutions), "image_format": self.image_format,
                "quality": self.quality, "min_size": self.min_size, "depth_png_level": self.depth_png_level}


def input_problem(image_size: tuple[int, int], depth_size: tuple[int, int] | None,
                  min_size: int = MIN_INPUT_SIZE) -> tuple[str, str] | None:
    """``(reason, detail)`` when an input image of ``image_size`` (width, height) with a depth map of ``depth_size``
    (width, height; None: not known yet) must be rejected, else None. One rule for every job that reads inputs
    (prep, render): the shorter side at least ``min_size`` (``too_small``), and a depth map of the image's aspect
    ratio, to 1% (``depth_size_mismatch``; a depth map of another size but the same aspect is resized)."""
    width, height = image_size
    if min(width, height) < min_size:
        return "too_small", f"{width}x{height} is below --min-size {min_size}"
    if depth_size is not None and tuple(depth_size) != tuple(image_size):
        if not math.isclose(width / height, depth_size[0] / depth_size[1], rel_tol=0.01):
            return "depth_size_mismatch", f"depth {depth_size[0]}x{depth_size[1]} vs image {width}x{height}"
    return None


def image_error_detail(err: BaseException) -> str:
    """PIL's message for an unreadable image, without the in-memory buffer it names (``cannot identify image file
    <_io.BytesIO object at 0x...>``); callers put the file name in front."""
    text = str(err)
    if "cannot identify image file" in text:
        return "not an image file PIL can read (unknown format, or not an image at all)"
    return text or type(err).__name__


def centre_square(width: int, height: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def encode_image(image: Image.Image, options: StoreOptions) -> bytes:
    buf = io.BytesIO()
    if options.image_format == "jpg":
        image.save(buf, format="JPEG", quality=options.quality)
    else:
        image.save(buf, format="WEBP", quality=options.quality)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------

MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
RECORDS_DIR = "_records"
FORMAT = "g3dr-shards/1"
STALE_TMP_SECONDS = 3600


class Source(Protocol):
    def list_items(self) -> list[Item]: ...
    def prepare_batch(self, items: Sequence[Item]) -> list[Prepared | Rejected]: ...
    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class JobSpec:
    out: str
    shard_size: int = 1000
    prefix: str = "train"
    workers: int = 1
    shard_index: int = 0
    num_jobs: int = 1
    batch: int = 16
    """Inputs handed to the source at once (the depth model's batch)."""


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def plan_fingerprint(items: Sequence[Item], description: dict[str, Any], spec: JobSpec) -> str:
    """A hash of everything that decides shard contents; all jobs of one dataset must agree on it."""
    h = hashlib.sha256()
    h.update(json.dumps({"source": description, "shard_size": spec.shard_size, "prefix": spec.prefix},
                        sort_keys=True).encode())
    for item in items:
        h.update(f"{item.key}\0{item.image}\0{item.depth}\0{item.label}\n".encode())
    return h.hexdigest()[:16]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic bytes: the same inputs give the same sha256
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


# Per-process source (set once per worker by the pool initializer, so it is not pickled per task).
_WORKER_SOURCE: Source | None = None
_WORKER_PROGRESS: Any = None  # a multiprocessing queue of processed-input counts


def _init_worker(source: Source, progress: Any) -> None:
    global _WORKER_SOURCE, _WORKER_PROGRESS
    _WORKER_SOURCE, _WORKER_PROGRESS = source, progress
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def write_shard(source: Source, items: Sequence[Item], out: Path, name: str, fingerprint: str, batch: int,
                on_inputs: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Prepare ``items``, write shard ``name`` (temp name, then rename) and its record; returns the record.

    ``on_inputs(n)`` is called after each batch of ``n`` inputs (progress reporting).
    """
    start = time.perf_counter()
    for stale in out.glob(f".{name}.tmp-*"):
        # Left by a killed run. Only old ones: another process may be writing the same shard right now
        # (two ranks creating the synthetic set); both write identical bytes and the rename is atomic.
        try:
            if time.time() - stale.stat().st_mtime > STALE_TMP_SECONDS:
                stale.unlink()
        except FileNotFoundError:
            pass
    tmp = out / f".{name}.tmp-{os.getpid()}"
    rejects: list[dict[str, str]] = []
    count = 0
    try:
        with writing(out / name, "shard", "free space (or choose another --out) and rerun: finished shards are kept"):
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for lo in range(0, len(items), batch):
                    chunk = items[lo:lo + batch]
                    for result in source.prepare_batch(chunk):
                        if isinstance(result, Rejected):
                            rejects.append(result.to_json())
                            continue
                        for ext in sorted(result.files):
                            _add_member(tar, f"{result.key}.{ext}", result.files[ext])
                        count += 1
                    if on_inputs is not None:
                        on_inputs(len(chunk))
            record = {"name": name, "samples": count, "inputs": len(items), "bytes": tmp.stat().st_size,
                      "sha256": sha256_file(tmp), "rejects": rejects, "fingerprint": fingerprint,
                      "seconds": round(time.perf_counter() - start, 3)}
            _write_json_atomic(out / RECORDS_DIR / f"{name}.json", record)
            os.replace(tmp, out / name)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written shard gives its space back
        raise
    return record


def _write_shard_in_worker(items: Sequence[Item], out: str, name: str, fingerprint: str, batch: int) -> dict[str, Any]:
    assert _WORKER_SOURCE is not None
    return write_shard(_WORKER_SOURCE, items, Path(out), name, fingerprint, batch, _WORKER_PROGRESS.put)


def _read_record(out: Path, name: str) -> dict[str, Any] | None:
    path = out / RECORDS_DIR / f"{name}.json"
    if not (out / name).is_file() or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


@dataclass
class JobResult:
    written_shards: int
    skipped_shards: int
    samples: int
    rejected: int
    seconds: float
    manifest: dict[str, Any] | None

    @property
    def images_per_second(self) -> float:
        return (self.samples + self.rejected) / self.seconds if self.seconds > 0 else 0.0


def run_shard_job(source: Source, spec: JobSpec, command: str = "", config: dict[str, Any] | None = None,
                  progress: bool = True) -> JobResult:
    """Write this job's shards of the plan, then the manifest if the whole plan is finished."""
    if spec.shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {spec.shard_size}")
    if not 0 <= spec.shard_index < spec.num_jobs:
        raise DataError(f"--shard-index {spec.shard_index} must be in [0, --num-shard-jobs={spec.num_jobs})")
    if spec.workers < 1:
        raise DataError(f"--workers must be >= 1, got {spec.workers}")
    out = Path(spec.out)
    check_writable_dir(out, "--out")  # before any input is read: read-only, full, or a file in the way
    (out / RECORDS_DIR).mkdir(parents=True, exist_ok=True)

    items = source.list_items()
    description = source.describe()
    fingerprint = plan_fingerprint(items, description, spec)
    chunks = [items[lo:lo + spec.shard_size] for lo in range(0, len(items), spec.shard_size)]
    names = [shard_name(spec.prefix, s) for s in range(len(chunks))]

    mine = [s for s in range(len(chunks)) if s % spec.num_jobs == spec.shard_index]
    todo, skipped = [], 0
    for s in mine:
        record = _read_record(out, names[s])
        if record is None:
            if (out / names[s]).exists():  # a finished shard always has its record (written before the rename)
                raise DataError(f"{out / names[s]} exists but has no record in {out / RECORDS_DIR}: it was not written "
                                "by 'g3dr prep shards' for this folder, and overwriting it would mix two datasets; "
                                "move it away or write to a new --out")
            todo.append(s)
        elif record.get("fingerprint") != fingerprint:
            raise DataError(
                f"{out / names[s]} was written by a different plan (other inputs or options: fingerprint "
                f"{record.get('fingerprint')} != {fingerprint}); write to a new --out or delete the old shards")
        else:
            skipped += 1
    log.info("%d inputs -> %d shards of <= %d; this job (%d/%d): %d to write, %d already finished",
             len(items), len(chunks), spec.shard_size, spec.shard_index, spec.num_jobs, len(todo), skipped)

    from tqdm import tqdm

    start = time.perf_counter()
    samples = rejected = 0
    bar = tqdm(total=sum(len(chunks[s]) for s in todo), unit="img", desc="prep shards", disable=not progress,
               dynamic_ncols=True)

    def account(record: dict[str, Any]) -> None:
        nonlocal samples, rejected
        samples += record["samples"]
        rejected += len(record["rejects"])
        bar.set_postfix(rejected=rejected)
        for reject in record["rejects"]:
            log.warning("rejected %s (%s): %s", reject["source"], reject["reason"], reject["detail"])

    if spec.workers == 1 or len(todo) <= 1:
        for s in todo:
            account(write_shard(source, chunks[s], out, names[s], fingerprint, spec.batch, bar.update))
    else:
        ctx = get_context("fork")
        queue = ctx.Queue()
        drain = threading.Thread(target=_drain_progress, args=(queue, bar), daemon=True)
        drain.start()
        try:
            with ProcessPoolExecutor(max_workers=min(spec.workers, len(todo)), mp_context=ctx,
                                     initializer=_init_worker, initargs=(source, queue)) as pool:
                futures = [pool.submit(_write_shard_in_worker, chunks[s], str(out), names[s], fingerprint, spec.batch)
                           for s in todo]
                for future in as_completed(futures):
                    account(future.result())
        finally:
            queue.put(None)
            drain.join()
    bar.close()
    seconds = time.perf_counter() - start

    manifest = finalize(out, names, len(items), fingerprint, description, spec, command, config or {})
    result = JobResult(len(todo), skipped, samples, rejected, seconds, manifest)
    log.info("wrote %d shards (%d samples, %d rejected) in %.1fs: %.1f images/s with %d workers; skipped %d finished shards",
             len(todo), samples, rejected, seconds, result.images_per_second, spec.workers, skipped)
    if manifest is not None and manifest["num_samples"] == 0:
        raise DataError(empty_dataset_message(out, manifest))
    return result


def empty_dataset_message(out: Path, manifest: dict[str, Any]) -> str:
    """The error for a finished dataset without a single sample (every input rejected)."""
    reasons = ", ".join(f"{k}: {v}" for k, v in manifest.get("rejected_by_reason", {}).items()) or "none recorded"
    return (f"{out} holds no samples: all {manifest['num_inputs']} inputs were rejected ({reasons}); see "
            f"{Path(out) / REJECTS} for each file and reason (too_small: lower --min-size; missing_depth: check "
            "--depth-src); nothing can train on an empty dataset")


def _drain_progress(queue: Any, bar: Any) -> None:
    """Main-process thread: forward the workers' processed-input counts to the progress bar."""
    while (n := queue.get()) is not None:
        bar.update(n)


def finalize(out: Path, names: Sequence[str], num_inputs: int, fingerprint: str, description: dict[str, Any],
             spec: JobSpec, command: str, config: dict[str, Any]) -> dict[str, Any] | None:
    """Write ``manifest.json`` and ``rejects.jsonl`` when every shard of the plan is finished."""
    records = [_read_record(out, name) for name in names]
    missing = [name for name, record in zip(names, records) if record is None]
    if missing:
        log.info("%d of %d shards finished; the manifest is written when all are (missing e.g. %s)",
                 len(names) - len(missing), len(names), missing[0])
        return None
    foreign = [name for name, record in zip(names, records) if record["fingerprint"] != fingerprint]
    if foreign:
        raise DataError(f"{len(foreign)} shards in {out} (e.g. {foreign[0]}) were written by a different plan "
                        "(other inputs or options); write to a new --out or delete those shards and rerun")
    rejects = sorted((r for record in records for r in record["rejects"]), key=lambda r: r["key"])
    written = sum(record["samples"] for record in records)
    if written + len(rejects) != num_inputs:
        raise DataError(f"inputs ({num_inputs}) != written ({written}) + rejected ({len(rejects)}) in {out}; "
                        "the shard records are inconsistent: delete the output folder and rerun")
    manifest = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "source": description,
        "shard_size": spec.shard_size,
        "num_inputs": num_inputs,
        "num_samples": written,
        "num_rejected": len(rejects),
        "rejected_by_reason": _count_by(rejects, "reason"),
        "num_shards": len(names),
        "total_bytes": sum(record["bytes"] for record in records),
        "shards": [{"name": r["name"], "samples": r["samples"], "bytes": r["bytes"], "sha256": r["sha256"]}
                   for r in records],
        "depth_encoding": {"png": "uint16 grayscale", "decode": "v / 65536 * 2 + 4"},
        "command": command,
        "config": config,
    }
    with writing(out / MANIFEST, "the manifest", "free space and rerun (the shards are finished and kept)"):
        rejects_tmp = out / f".{REJECTS}.tmp-{os.getpid()}"
        rejects_tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects))
        os.replace(rejects_tmp, out / REJECTS)
        _write_json_atomic(out / MANIFEST, manifest)
    log.info("manifest: %d inputs = %d written + %d rejected %s, %d shards, %.1f MB",
             num_inputs, written, len(rejects), manifest["rejected_by_reason"], len(names),
             manifest["total_bytes"] / 1e6)
    return manifest


def _count_by(rows: Sequence[dict[str, str]], key: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row[key]] = counts.get(row[key], 0) + 1
    return dict(sorted(counts.items()))
