"""Loaders built from the config: ``build_train_loader`` (resampled, fixed epoch length, resumable) and
``build_eval_loader`` (exact single pass).

Both sum the skip counts their workers send with every batch (:attr:`TrainLoader.counts`,
:attr:`EvalLoader.counts`), stop with a :class:`DataError` past ``data.max_skip_fraction`` of the samples
read on this rank, and raise a worker's DataError in this process with its own message.

With ``data.source: synthetic`` the synthetic shards are first written to ``data.synthetic_dir``
(``g3dr prep synth``'s code) when that folder has no manifest yet: at ``data.resolution``, and also at the
super-resolution target size when the loader is asked for one (``g3dr train-sr``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import torch

from g3dr.config import Config
from g3dr.data.counts import CountsByWorker, DataCounts
from g3dr.data.pipeline import (ShardStream, TargetSizeError, expand_existing_shard_urls, expand_shard_urls,
                                finish_batch, manifest_num_samples, plan_exact_workers, read_manifest,
                                target_size_message)
from g3dr.distributed import DistEnv
from g3dr.errors import DataError
from g3dr.log import get_logger

log = get_logger("g3dr.data")


def synthetic_view_spec(cfg: Config):
    """The :class:`~g3dr.data.synth.ViewSpec` of ``data.synthetic_views`` / ``data.synthetic_view_cameras``,
    with the config's cameras and scene box."""
    from g3dr.data.synth import ViewSpec

    return ViewSpec(count=cfg.data.synthetic_views, cameras=cfg.data.synthetic_view_cameras, camera=cfg.camera,
                    box_half=cfg.renderer.box_warp / 2)


def ensure_synthetic(cfg: Config, progress: bool = False, target_resolution: int = 0) -> str:
    """The synthetic shard folder of ``cfg``, written first if it has no manifest; returns the folder.

    It is written at ``data.resolution``, and also at ``target_resolution`` when > 0 (the super-resolution
    target: each size is rendered from the scene itself, so the larger image is exact ground truth).
    An existing folder is reused only when its manifest agrees with the config on the sample count and on
    the stored views (count, camera kind, cameras, scene box), and stores an image of at least
    ``target_resolution``; otherwise a :class:`DataError` says so.
    """
    folder = Path(cfg.data.synthetic_dir)
    manifest = read_manifest(folder)
    views = synthetic_view_spec(cfg)
    if manifest is None:
        from g3dr.data.synth import write_synthetic_shards

        n = cfg.data.synthetic_size
        sizes = (cfg.data.resolution, target_resolution) if target_resolution else (cfg.data.resolution,)
        log.info("writing %d synthetic samples at %s px to %s%s", n, " and ".join(map(str, sizes)), folder,
                 f" with {views.count} {views.cameras} views each" if views.count else "")
        # At least 8 shards so that 2 ranks x 4 workers can split them by shard.
        write_synthetic_shards(str(folder), n, sizes, seed=cfg.train.seed,
                               shard_size=max(1, math.ceil(n / 8)), progress=progress, views=views)
        manifest = read_manifest(folder)
        assert manifest is not None
    fix = "delete the folder or set data.synthetic_dir to a new one"
    if manifest["num_inputs"] != cfg.data.synthetic_size:
        raise DataError(f"{folder} holds {manifest['num_inputs']} synthetic samples but data.synthetic_size is "
                        f"{cfg.data.synthetic_size}; {fix}")
    source = manifest.get("source", {})
    stored = {k: source.get(k) for k in views.to_json()} if source.get("views", 0) else {}
    wanted = views.to_json() if views.count else {}
    if stored != wanted:
        def summary(d):
            return f"{d['views']} {d['view_cameras']} views" if d else "no views"
        differ = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        raise DataError(f"{folder} holds synthetic samples with {summary(stored)} but the config asks for "
                        f"{summary(wanted)} (differing: {', '.join(differ)}; set by data.synthetic_views, "
                        f"data.synthetic_view_cameras, camera.*, renderer.box_warp); {fix}")
    stored_sizes = [int(r) for r in source.get("resolutions", [])]
    if target_resolution and stored_sizes and max(stored_sizes) < target_resolution:
        raise TargetSizeError(target_size_message(f"the synthetic set {folder}", stored_sizes, cfg.data.resolution,
                                                  target_resolution))
    return str(folder)


def data_urls(cfg: Config, shards: Any = None, target_resolution: int = 0) -> list[str]:
    """The shard URLs of ``cfg``'s data (``shards`` instead, when given); the synthetic set is written first if
    absent (:func:`ensure_synthetic`, also at ``target_resolution`` when > 0). A pattern matching no file is a
    DataError saying so."""
    if shards is not None:
        return expand_existing_shard_urls(shards)
    if cfg.data.source == "synthetic":
        return expand_shard_urls(ensure_synthetic(cfg, target_resolution=target_resolution))
    return expand_existing_shard_urls(cfg.data.shards)


def check_stored_sizes(urls: list[str], resolution: int, target_resolution: int) -> None:
    """A :class:`~g3dr.data.pipeline.TargetSizeError` when the manifests beside local shards say no image of at
    least ``target_resolution`` is stored (before any worker starts). Shards without a manifest are checked
    sample by sample while reading (the stream stops at the first sample without the size)."""
    folders = sorted({Path(u).parent for u in urls if not (u.startswith("pipe:") or "://" in u)})
    for folder in folders:
        manifest = read_manifest(folder)
        stored = [int(r) for r in ((manifest or {}).get("source", {}).get("resolutions") or [])]
        if stored and max(stored) < target_resolution:
            raise TargetSizeError(target_size_message(f"the shards in {folder} (manifest.json)", stored, resolution,
                                                      target_resolution))


def _data_loader(stream: ShardStream, num_workers: int) -> torch.utils.data.DataLoader:
    # No pin_memory here: the compact wire batches are converted in this process by finish_batch,
    # which writes its outputs into pinned memory itself when CUDA is present.
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=False)


def _wire_batches(stream: ShardStream, num_workers: int, counts: CountsByWorker) -> Iterator[dict[str, Any]]:
    """The stream's wire batches through a DataLoader, with the workers' counts taken off into ``counts``
    (checked against the skip fraction on this rank's totals); stats-only items are consumed here and a
    worker's DataError is raised here. Worker processes are shut down when the iteration ends."""
    counts.new_iteration()
    batches = iter(_data_loader(stream, num_workers))
    where = f" on rank {stream.rank}"
    try:
        for wire in batches:
            counts.update(wire["_stats"]["worker"], wire.pop("_stats"))
            if "_error" in wire:
                raise DataError(wire["_error"])
            counts.total().check(stream.max_skip_fraction, stream.skip_check_min_samples, where)
            if "rgb" in wire:
                yield wire
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:  # do not leave workers to the garbage collector
            shutdown()


def _log_counts(counts: DataCounts, what: str) -> None:
    if counts.skipped_total or counts.shard_errors:
        log.warning("%s: %s", what, counts.summary())


class TrainLoader:
    """Infinite training batches for one rank, in epochs of ``batches_per_epoch`` batches.

    Iterating yields batch dicts forever (epoch after epoch, each with fresh shard draws). The position
    (epoch, batches done, raw samples consumed by each worker) is exact: ``state_dict()`` after k
    batches, then ``load_state_dict()`` on a new loader, continues with batch k + 1 of the same stream.
    Worker processes are started per epoch.
    """

    def __init__(self, stream: ShardStream, num_workers: int):
        self.stream = stream
        self.num_workers = num_workers
        self.epoch = 0
        self.batches_done = 0
        self._consumed: dict[int, int] = {}
        self._active: Iterator[dict[str, Any]] | None = None
        self._counts = CountsByWorker()

    @property
    def counts(self) -> DataCounts:
        """Samples read, delivered and skipped (by reason) on this rank since this loader was built
        (not carried across a resume: the resumed process counts from zero)."""
        return self._counts.total()

    def data_metrics(self) -> dict[str, float]:
        """``data/read``, ``data/skipped``, ``data/skip_fraction``, ``data/shard_errors`` of this rank (for MLflow)."""
        counts = self.counts
        return {"data/read": float(counts.read), "data/skipped": float(counts.skipped_total),
                "data/skip_fraction": counts.skip_fraction,
                "data/shard_errors": float(sum(counts.shard_errors.values()))}

    @property
    def batches_per_epoch(self) -> int:
        return self.stream.batches_per_epoch

    def __len__(self) -> int:
        """Batches per epoch (the iterator itself does not stop)."""
        return self.stream.batches_per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_done": self.batches_done,
                "consumed": {str(k): v for k, v in self._consumed.items()}, "num_workers": self.num_workers,
                "batches_per_epoch": self.batches_per_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_workers") != self.num_workers or state.get("batches_per_epoch") != self.batches_per_epoch:
            log.warning("data position saved with %s workers / %s batches per epoch, now %d / %d: "
                        "resuming at the start of epoch %d instead of its exact position",
                        state.get("num_workers"), state.get("batches_per_epoch"), self.num_workers,
                        self.batches_per_epoch, state["epoch"] + 1)
            self.epoch, self.batches_done, self._consumed = int(state["epoch"]) + 1, 0, {}
            return
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])
        self._consumed = {int(k): int(v) for k, v in state["consumed"].items()}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.close()
        self._active = self._batches()
        return self._active

    def close(self) -> None:
        """Stop the current iteration and its worker processes (iterating again starts new ones)."""
        active, self._active = self._active, None
        if active is not None:
            active.close()

    def _batches(self) -> Iterator[dict[str, Any]]:
        while True:
            if self.batches_done >= self.batches_per_epoch:
                self.epoch, self.batches_done, self._consumed = self.epoch + 1, 0, {}
            self.stream.epoch = self.epoch
            self.stream.resume_batches_done = self.batches_done
            self.stream.resume_consumed = dict(self._consumed)
            pin = torch.cuda.is_available()
            wires = _wire_batches(self.stream, self.num_workers, self._counts)
            try:
                for wire in wires:
                    self._consumed[wire.pop("_worker")] = wire.pop("_consumed")
                    self.batches_done += 1
                    yield finish_batch(wire, self.stream.depth_scale, self.stream.depth_offset, pin)
            finally:
                wires.close()  # stops the worker processes now, also when this generator is closed
            if self.batches_done >= self.batches_per_epoch:
                _log_counts(self.counts, f"train data after epoch {self.epoch} on rank {self.stream.rank}")
            else:  # every worker ended early: cannot happen with resampled shards; never loop on it silently
                raise DataError(f"the training stream of rank {self.stream.rank} ended after {self.batches_done} of "
                                f"{self.batches_per_epoch} batches of epoch {self.epoch} ({self.counts.summary()})")


class EvalLoader:
    """One exact pass over the shards per iteration (see :func:`build_eval_loader`)."""

    def __init__(self, stream: ShardStream, num_workers: int):
        self.stream = stream
        self.num_workers = num_workers
        self._counts = CountsByWorker()

    @property
    def counts(self) -> DataCounts:
        """Samples read, delivered and skipped (by reason) on this rank in the current or last pass."""
        return self._counts.total()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._counts = CountsByWorker()
        pin = torch.cuda.is_available()
        wires = _wire_batches(self.stream, self.num_workers, self._counts)
        try:
            for wire in wires:
                yield finish_batch(wire, self.stream.depth_scale, self.stream.depth_offset, pin)
        finally:
            wires.close()
        _log_counts(self.counts, f"eval data pass on rank {self.stream.rank}")


def build_train_loader(cfg: Config, dist: DistEnv, target_resolution: int = 0) -> TrainLoader:
    """Resampled training batches for this rank at ``cfg.data.resolution``, micro-batch ``cfg.train.micro_batch_size``.

    Epoch length per rank: ``data.epoch_length`` samples, or (when 0) the manifest's sample count
    divided by the world size; every rank runs the same number of batches per epoch. ``target_resolution``
    > 0: batches also carry ``rgb_target``, the image at that size decoded from a stored image at least that
    large (never upsampled; a :class:`~g3dr.data.pipeline.TargetSizeError` names the command that writes it).
    """
    urls = data_urls(cfg, target_resolution=target_resolution)
    if target_resolution:
        check_stored_sizes(urls, cfg.data.resolution, target_resolution)
    batch = cfg.train.micro_batch_size
    if cfg.data.epoch_length > 0:
        per_rank = cfg.data.epoch_length
    else:
        total = manifest_num_samples(urls)
        if total is None:
            raise DataError("cannot derive the epoch length: no manifest.json beside the shards "
                            f"({urls[0]}); set data.epoch_length (samples per rank per epoch)")
        per_rank = total // dist.world_size
    batches = max(1, per_rank // batch)
    stream = ShardStream(urls=urls, mode="train", resolution=cfg.data.resolution, batch_size=batch, rank=dist.rank,
                         world_size=dist.world_size, seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                         flip_p=cfg.data.flip_p, depth_scale=cfg.data.depth_scale, depth_offset=cfg.data.depth_offset,
                         batches_per_epoch=batches, wire=True, max_skip_fraction=cfg.data.max_skip_fraction,
                         skip_check_min_samples=cfg.data.skip_check_min_samples, target_resolution=target_resolution)
    log.info("train data: %d shards, %d batches of %d per epoch on rank %d/%d, %d workers",
             len(urls), batches, batch, dist.rank, dist.world_size, cfg.data.num_workers)
    return TrainLoader(stream, cfg.data.num_workers)


def build_eval_loader(cfg: Config, dist: DistEnv, shards: Any = None, batch_size: int | None = None,
                      num_workers: int | None = None, resolution: int | None = None,
                      view_resolution: int = 0) -> EvalLoader:
    """One exact pass over ``shards`` (default: the config's data) split over ranks and workers; no flip, no shuffle.

    Together the ranks see every sample exactly once; the last batch of a worker may be smaller, and ranks
    may get different numbers of batches (uneven shards): consumers must not run per-batch collectives.
    Shards are split over ranks x workers: with fewer shards this raises a :class:`DataError` naming the
    counts and the fixes, unless ``data.eval_few_shards`` opts in to fewer workers or to every reader
    reading all shards (:func:`g3dr.data.pipeline.plan_exact_workers`). ``resolution`` defaults to
    ``data.resolution``. ``view_resolution`` > 0: batches also carry the novel views the samples store, at
    exactly that resolution (``batch["views"]``, see :mod:`g3dr.data.pipeline`).
    """
    urls = data_urls(cfg, shards)
    workers = cfg.data.num_workers if num_workers is None else num_workers
    workers = plan_exact_workers(len(urls), dist.world_size, workers, cfg.data.eval_few_shards)
    stream = ShardStream(urls=urls, mode="eval", resolution=resolution or cfg.data.resolution,
                         batch_size=batch_size or cfg.train.micro_batch_size, rank=dist.rank,
                         world_size=dist.world_size, seed=cfg.train.seed, shuffle_buffer=0, flip_p=0.0,
                         depth_scale=cfg.data.depth_scale, depth_offset=cfg.data.depth_offset, wire=True,
                         max_skip_fraction=cfg.data.max_skip_fraction,
                         skip_check_min_samples=cfg.data.skip_check_min_samples, view_resolution=view_resolution,
                         few_shards="read_all" if cfg.data.eval_few_shards == "read_all" else "error")
    return EvalLoader(stream, workers)
