"""Loaders built from the config: ``build_train_loader`` (resampled, fixed epoch length, resumable) and
``build_eval_loader`` (exact single pass).

With ``data.source: synthetic`` the synthetic shards are first written to ``data.synthetic_dir``
(``g3dr prep synth``'s code) when that folder has no manifest yet.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import torch

from g3dr.config import Config
from g3dr.data.pipeline import ShardStream, expand_shard_urls, finish_batch, manifest_num_samples, read_manifest
from g3dr.distributed import DistEnv
from g3dr.errors import DataError
from g3dr.log import get_logger

log = get_logger("g3dr.data")


def ensure_synthetic(cfg: Config, progress: bool = False) -> str:
    """The synthetic shard folder of ``cfg``, written first if it has no manifest; returns the folder."""
    folder = Path(cfg.data.synthetic_dir)
    manifest = read_manifest(folder)
    if manifest is None:
        from g3dr.data.synth import write_synthetic_shards

        n = cfg.data.synthetic_size
        log.info("writing %d synthetic samples at %dpx to %s", n, cfg.data.resolution, folder)
        # At least 8 shards so that 2 ranks x 4 workers can split them by shard.
        write_synthetic_shards(str(folder), n, (cfg.data.resolution,), seed=cfg.train.seed,
                               shard_size=max(1, math.ceil(n / 8)), progress=progress)
        manifest = read_manifest(folder)
        assert manifest is not None
    if manifest["num_inputs"] != cfg.data.synthetic_size:
        raise DataError(f"{folder} holds {manifest['num_inputs']} synthetic samples but data.synthetic_size is "
                        f"{cfg.data.synthetic_size}; delete the folder or set data.synthetic_dir to a new one")
    return str(folder)


def _urls(cfg: Config, shards: Any = None) -> list[str]:
    if shards is not None:
        return expand_shard_urls(shards)
    if cfg.data.source == "synthetic":
        return expand_shard_urls(ensure_synthetic(cfg))
    return expand_shard_urls(cfg.data.shards)


def _data_loader(stream: ShardStream, num_workers: int) -> torch.utils.data.DataLoader:
    # No pin_memory here: the compact wire batches are converted in this process by finish_batch,
    # which writes its outputs into pinned memory itself when CUDA is present.
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=False)


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
            batches = iter(_data_loader(self.stream, self.num_workers))
            pin = torch.cuda.is_available()
            try:
                for wire in batches:
                    self._consumed[wire.pop("_worker")] = wire.pop("_consumed")
                    self.batches_done += 1
                    yield finish_batch(wire, self.stream.depth_scale, self.stream.depth_offset, pin)
            finally:
                shutdown = getattr(batches, "_shutdown_workers", None)
                if shutdown is not None:  # do not leave workers to the garbage collector
                    shutdown()


class EvalLoader:
    """One exact pass over the shards per iteration (see :func:`build_eval_loader`)."""

    def __init__(self, stream: ShardStream, num_workers: int):
        self.stream = stream
        self.num_workers = num_workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = iter(_data_loader(self.stream, self.num_workers))
        pin = torch.cuda.is_available()
        try:
            for wire in batches:
                yield finish_batch(wire, self.stream.depth_scale, self.stream.depth_offset, pin)
        finally:
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


def build_train_loader(cfg: Config, dist: DistEnv) -> TrainLoader:
    """Resampled training batches for this rank at ``cfg.data.resolution``, micro-batch ``cfg.train.micro_batch_size``.

    Epoch length per rank: ``data.epoch_length`` samples, or (when 0) the manifest's sample count
    divided by the world size; every rank runs the same number of batches per epoch.
    """
    urls = _urls(cfg)
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
                         batches_per_epoch=batches, wire=True)
    log.info("train data: %d shards, %d batches of %d per epoch on rank %d/%d, %d workers",
             len(urls), batches, batch, dist.rank, dist.world_size, cfg.data.num_workers)
    return TrainLoader(stream, cfg.data.num_workers)


def build_eval_loader(cfg: Config, dist: DistEnv, shards: Any = None, batch_size: int | None = None,
                      num_workers: int | None = None) -> EvalLoader:
    """One exact pass over ``shards`` (default: the config's data) split over ranks and workers; no flip, no shuffle.

    Together the ranks see every sample exactly once; the last batch of a worker may be smaller.
    """
    urls = _urls(cfg, shards)
    stream = ShardStream(urls=urls, mode="eval", resolution=cfg.data.resolution,
                         batch_size=batch_size or cfg.train.micro_batch_size, rank=dist.rank,
                         world_size=dist.world_size, seed=cfg.train.seed, shuffle_buffer=0, flip_p=0.0,
                         depth_scale=cfg.data.depth_scale, depth_offset=cfg.data.depth_offset, wire=True)
    return EvalLoader(stream, cfg.data.num_workers if num_workers is None else num_workers)
