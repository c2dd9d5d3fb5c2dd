"""Evaluate checkpoints end to end: discovery, idempotent sweeps, results on disk and in MLflow.

One :class:`Evaluator` per process holds what is reused across checkpoints (the Inception network, the
dataset statistics, the MLflow client on rank 0). For each checkpoint it resolves the eval config (the
checkpoint's stored config plus the user's overrides), hashes it with the data and detector identity,
and then

1. skips the checkpoint when MLflow holds a FINISHED run with the same checkpoint id and eval hash;
2. uploads ``results.json`` without recomputing when a previous evaluation finished but its upload failed;
3. otherwise evaluates, writes ``results.json`` (``complete: true``) and the report files, logs them and
   only then marks the MLflow run FINISHED. Any failure or a stop request ends the run as FAILED or
   KILLED and leaves ``complete: false`` on disk.

Sweeps (:func:`run_sweep`) take checkpoints newest first and, with ``watch``, poll for new ones until a
SIGTERM (:func:`stop_signal`) arrives; the stop is honoured between batches and between checkpoints.
Only rank 0 talks to MLflow and writes files; decisions are broadcast so every rank does the same work.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from g3dr.config import Config, config_from_dict
from g3dr.distributed import DistEnv, StopSignal, broadcast_object
from g3dr.errors import ConfigError, DataError, TrackingError, WeightsError
from g3dr.eval.evaluate import (GT_VIEWS, EvalInterrupted, EvalSpec, attach_sr_views, check_sr_render, eval_hash,
                                evaluate_model, image_resolution)
from g3dr.eval.report import plot_metrics, save_grid, table_csv, table_markdown, table_rows
from g3dr.log import get_logger
from g3dr.tracking import EvalTracker, resolve_tracking

log = get_logger("g3dr.eval")

RESULTS_FILE = "results.json"


def stop_signal() -> StopSignal:
    """Eval's stop request: SIGTERM (once installed) or by hand; polled between batches and checkpoints."""
    return StopSignal(notice="stop requested: finishing nothing new; an evaluation in progress is abandoned")


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointRef:
    """An f_trigen ``.safetensors`` checkpoint found on disk."""

    path: Path
    step: int
    mtime: float
    training_run_id: str = ""

    @property
    def id(self) -> str:
        """Identity used by sweeps: the resolved path and the step (a re-export at a new step is new)."""
        return hashlib.sha256(f"{self.path.resolve()}|{self.step}".encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        return f"{self.path.stem}-step{self.step}"


def checkpoint_ref(path: str | Path) -> CheckpointRef:
    """Read a checkpoint's step (and its training run id, if recorded) from its metadata header."""
    from g3dr.models.checkpoint_io import read_f_trigen_metadata

    path = Path(path)
    meta = read_f_trigen_metadata(path)
    run_id = str(meta.get("mlflow_run_id") or meta.get("training_run_id") or "")
    return CheckpointRef(path=path, step=int(meta["step"]), mtime=path.stat().st_mtime, training_run_id=run_id)


def stored_config(path: str | Path, overrides: tuple[str, ...] = ()) -> Config:
    """The config an evaluation of the checkpoint ``path`` runs with: the one stored in it, with ``overrides``."""
    from g3dr.models.checkpoint_io import read_f_trigen_metadata

    meta = read_f_trigen_metadata(path)
    return config_from_dict(meta["config"], overrides, source=f"{path} (stored config)")


def discover_checkpoints(directory: str | Path, exclude: Path | None = None) -> list[CheckpointRef]:
    """Every readable f_trigen ``.safetensors`` under ``directory``, newest (highest step, then latest) first.

    Files in unfinished trainer checkpoints (``*.partial``) and under ``exclude`` (the eval output) are
    ignored; unreadable files are skipped with a logged reason (a file still being written is never seen:
    writers rename ``*.tmp`` files into place).
    """
    directory = Path(directory)
    refs, skipped = [], 0
    for path in sorted(directory.rglob("*.safetensors")):
        rel_parts = path.relative_to(directory).parts
        if any(p.endswith(".partial") or p.startswith(".") for p in rel_parts):
            continue
        if exclude is not None and exclude.resolve() in path.resolve().parents:
            continue
        try:
            refs.append(checkpoint_ref(path))
        except WeightsError as err:
            skipped += 1
            log.warning("sweep: skipping %s: %s", path, err)
    if skipped:
        log.warning("sweep: %d unreadable .safetensors file(s) skipped under %s", skipped, directory)
    return sorted(refs, key=lambda r: (r.step, r.mtime), reverse=True)


EXPORTS_DIRNAME = "exports"


def export_training_checkpoints(run_dir: str | Path) -> list[Path]:
    """Write ``run_dir/exports/step-N.safetensors`` for every complete DeepSpeed checkpoint
    ``run_dir/checkpoints/step-N`` that has none yet (rank 0 only); returns the new files.

    Uses the trainer's own export (:func:`g3dr.train.trainer.export_f_trigen`, fp32 weights rebuilt from
    the ZeRO partitions) and adds the training run id (``meta.json`` client state) to the file's metadata,
    so eval runs link back to the training run. A checkpoint pruned or broken meanwhile is skipped with a
    warning. Nothing happens when ``run_dir`` has no ``checkpoints/`` folder.
    """
    import os

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from g3dr.train.checkpoint import checkpoints_root, list_complete, read_meta
    from g3dr.train.stage import export_f_trigen

    run_dir = Path(run_dir)
    written = []
    for ckpt in list_complete(checkpoints_root(run_dir)):
        out = run_dir / EXPORTS_DIRNAME / f"{ckpt.name}.safetensors"
        if out.exists():
            continue
        tmp = out.with_name(f".{ckpt.name}.export.safetensors")
        try:
            client = read_meta(ckpt).get("client_state", {})
            if "config" in client:
                cfg = config_from_dict(client["config"], source=f"{ckpt}/meta.json")
            else:
                from g3dr.config import load_config

                cfg = load_config(run_dir / "config.yaml")
            out.parent.mkdir(parents=True, exist_ok=True)
            log.info("exporting %s to %s for evaluation", ckpt, out)
            export_f_trigen(cfg, ckpt, tmp)
            with safe_open(str(tmp), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            if client.get("mlflow_run_id"):
                metadata["mlflow_run_id"] = str(client["mlflow_run_id"])
            final_tmp = out.with_name(f".{ckpt.name}.final.safetensors")
            save_file(load_file(str(tmp)), str(final_tmp), metadata=metadata)
            os.replace(final_tmp, out)
            written.append(out)
        except Exception as err:  # a checkpoint pruned by the trainer meanwhile, or a broken one
            log.warning("sweep: cannot export %s (%s: %s); skipping it", ckpt, type(err).__name__, err)
        finally:
            tmp.unlink(missing_ok=True)
    return written


# ------------------------------------------------------------------------------------------------
# The evaluator
# ------------------------------------------------------------------------------------------------


@dataclass
class EvalOptions:
    """What the user chose for every checkpoint of one ``g3dr eval`` invocation."""

    overrides: tuple[str, ...] = ()
    """Dotted overrides applied to each checkpoint's stored config (``eval.*``, ``data.*``, render settings)."""
    out_dir: Path | None = None
    """Where per-checkpoint eval folders go (default: beside the checkpoint / in the sweep dir, ``eval/``)."""
    mlflow_uri: str = ""
    experiment: str = "g3dr-eval"
    tracking_base: Path | None = None
    """Folder of the default sqlite store when neither ``mlflow_uri`` nor the config names one."""
    device: str = "auto"
    attempts: int = 3
    retry_wait_s: float = 1.0
    progress: bool = True
    save_images: Path | None = None
    """Also write the uint8 images scored by FID/IS as PNGs under ``save_images/<label>-<eval_hash>/``
    (:func:`g3dr.eval.evaluate.evaluate_model`'s ``image_dir``; not uploaded to MLflow)."""


@dataclass
class Outcome:
    status: str
    """``evaluated``, ``uploaded`` (from an earlier results.json), ``skipped`` (finished run exists),
    ``failed`` (sweeps only: a user-fixable error with this checkpoint; the sweep goes on)."""
    checkpoint: CheckpointRef
    eval_hash: str
    run_id: str | None = None
    results: dict[str, float] = field(default_factory=dict)
    eval_dir: Path | None = None
    error: str = ""


class Evaluator:
    """Evaluates checkpoints one after another; see the module docstring."""

    def __init__(self, options: EvalOptions, dist: DistEnv, stop: StopSignal | None = None):
        self.options = options
        self.dist = dist
        self.stop = stop or stop_signal()
        self.tracker: EvalTracker | None = None
        self._detectors: dict[str, Any] = {}
        self._srs: dict[str, Any] = {}
        self._sr_digests: dict[tuple[str, int, int], str] = {}
        self._real_stats: dict[str, tuple[Any, Any]] = {}
        self._urls: dict[str, list[str]] = {}

    # -- configuration ----------------------------------------------------------------------------

    def config_for(self, ref: CheckpointRef) -> Config:
        return stored_config(ref.path, self.options.overrides)

    def device(self) -> torch.device:
        choice = self.options.device
        if choice == "auto":
            choice = "cuda" if torch.cuda.is_available() else "cpu"
        if choice == "cuda":
            return torch.device("cuda", self.dist.local_rank % max(1, torch.cuda.device_count()))
        return torch.device("cpu")

    def data_urls(self, cfg: Config) -> list[str]:
        from g3dr.data.loader import ensure_synthetic
        from g3dr.data.pipeline import expand_existing_shard_urls, expand_shard_urls

        key = f"{cfg.data.source}|{cfg.data.shards}|{cfg.data.synthetic_dir}"
        if key not in self._urls:
            if cfg.data.source == "synthetic":
                # rank 0 writes the synthetic shards if absent; the others wait for it
                folder = ensure_synthetic(cfg) if self.dist.is_main else None
                folder = broadcast_object(folder)
                urls = expand_shard_urls(folder)
            else:
                urls = expand_existing_shard_urls(cfg.data.shards)  # a pattern matching nothing says so
            self._urls[key] = urls
        return self._urls[key]

    def stored_views(self, cfg: Config) -> tuple[int, set[int]]:
        """Ground-truth views per sample the eval data stores and the resolutions they are stored at, from the
        manifests beside its shards ((0, {}) when none, or when the shards have no local manifest)."""
        from g3dr.data.pipeline import read_manifest
        from g3dr.data.synth import stored_views

        counts, resolutions = set(), set()
        for url in self.data_urls(cfg):
            if url.startswith("pipe:") or "://" in url:
                counts.add(0)
                continue
            manifest = read_manifest(Path(url).parent)
            counts.add(stored_views(manifest)[0])
            resolutions.update(int(r) for r in (manifest or {}).get("source", {}).get("resolutions", []))
        if len(counts) > 1:
            raise DataError(f"the eval shards come from sets with different numbers of stored views ({sorted(counts)}); "
                            "evaluate one set at a time")
        count = counts.pop() if counts else 0
        return count, resolutions if count else set()

    def resolve_gt_views(self, cfg: Config) -> Config:
        """``cfg`` with ``gt_views`` left out of ``eval.metrics`` when the data stores no views, unless the user
        named the selection (``--metrics`` / ``eval.metrics=``): then a :class:`DataError`."""
        import dataclasses

        count, resolutions = self.stored_views(cfg)
        if GT_VIEWS not in cfg.eval.metrics:
            if count:
                log.info("the eval data stores %d ground-truth views per sample; add %s to --metrics to score them",
                         count, GT_VIEWS)
            return cfg
        if count:
            render = cfg.eval.render_resolution or cfg.data.resolution
            if render not in resolutions:
                raise DataError(f"the eval data stores its ground-truth views at {sorted(resolutions)} px but the eval "
                                f"renders at {render} px (views are never resized: their depth is exact); set "
                                f"eval.render_resolution to a stored size or write the set with --resolution {render}")
            return cfg
        named = any(o.split("=", 1)[0].strip() == "eval.metrics" for o in self.options.overrides)
        rest = tuple(m for m in cfg.eval.metrics if m != GT_VIEWS)
        if named or not rest:
            raise DataError(f"eval.metrics names {GT_VIEWS}, but the eval data ({cfg.data.source}: "
                            f"{cfg.data.shards or cfg.data.synthetic_dir}) stores no ground-truth views; write a "
                            "synthetic set with them ('g3dr prep synth --views K', or data.synthetic_views=K with a new "
                            f"data.synthetic_dir) or leave {GT_VIEWS} out")
        log.info("the eval data stores no ground-truth views: scoring %s without %s", ",".join(rest), GT_VIEWS)
        return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, metrics=rest))

    def detector(self, cfg: Config):
        from g3dr.metrics.inception import load_inception

        path = cfg.eval.inception_weights
        if path not in self._detectors:
            self._detectors[path] = load_inception(path, self.device())
        return self._detectors[path]

    def super_resolution(self, cfg: Config):
        """The super-resolution network named by ``sr.checkpoint`` (``--sr FILE`` sets it), loaded once per file on
        the eval device; None when it is empty (no super-resolution)."""
        from g3dr.models.sr import load_sr

        path = cfg.sr.checkpoint
        if not path:
            return None
        if path not in self._srs:
            try:
                self._srs[path] = load_sr(path, device=self.device())
            except WeightsError as err:
                raise WeightsError(f"{err} (the eval's sr.checkpoint, from --sr or the checkpoint's config; --no-sr "
                                   "evaluates without super-resolution)") from None
        return self._srs[path]

    def sr_sha256(self, path: str) -> str:
        """sha256 of the super-resolution weights file (its identity in the eval hash), cached by path, size and
        mtime."""
        p = Path(path)
        stat = p.stat()
        key = (str(p.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._sr_digests:
            digest = hashlib.sha256()
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            self._sr_digests[key] = digest.hexdigest()
        return self._sr_digests[key]

    def identity(self, cfg: Config, spec: EvalSpec) -> dict[str, str]:
        """What besides the spec determines the scores: the dataset content hash, the Inception file's sha256 (FID,
        IS) and, with super-resolution, the SR weights file's sha256 (``sr``; absent without SR, so evaluations
        without it keep their hashes)."""
        from g3dr.metrics.dataset_stats import dataset_content_hash

        ident = {"dataset": dataset_content_hash(self.data_urls(cfg))}
        if spec.needs_inception:
            ident["detector"] = self.detector(cfg).sha256
        if cfg.sr.checkpoint:
            self.super_resolution(cfg)  # a missing or broken file fails here, before anything else
            ident["sr"] = self.sr_sha256(cfg.sr.checkpoint)
        return ident

    def stored_resolutions(self, cfg: Config) -> set[int]:
        """The image sizes every eval shard's manifest says it stores (``source.resolutions``); a
        :class:`DataError` when a manifest does not say."""
        from g3dr.data.pipeline import read_manifest

        common: set[int] | None = None
        for url in self.data_urls(cfg):
            listed = ((read_manifest(Path(url).parent) or {}).get("source") or {}).get("resolutions")
            if not listed:
                raise DataError(f"the manifest beside {url} does not list the stored image resolutions "
                                "(source.resolutions); rewrite the shards with 'g3dr prep shards'")
            common = set(int(r) for r in listed) if common is None else common & set(int(r) for r in listed)
        return common or set()

    def check_reference_images(self, cfg: Config, resolution: int) -> None:
        """With super-resolution, FID's reference images are the dataset's own at the SR output size: the data must
        store images at that size or larger (decoded as the recipe says: the smallest stored size >= it, Lanczos
        down), never upsampled from smaller ones. A :class:`DataError` otherwise."""
        stored = self.stored_resolutions(cfg)
        if not any(r >= resolution for r in stored):
            raise DataError(f"FID with super-resolution scores {resolution} px images, but the eval data "
                            f"({cfg.data.shards or cfg.data.synthetic_dir}) stores images at {sorted(stored)} px only: "
                            f"the reference statistics need the dataset's images at {resolution} px. Write the shards "
                            f"with 'g3dr prep shards --resolution {cfg.data.resolution} {resolution}' (or 'g3dr prep "
                            f"synth --resolution {cfg.data.resolution} {resolution}'), or leave fid out of --metrics")

    def real_stats(self, cfg: Config, ident: dict[str, str], resolution: int | None = None):
        """``(mu, sigma)`` of the eval data's Inception features at ``resolution`` (default: the render size), from
        the statistics cache (keyed by resolution, among others) or computed once."""
        from g3dr.data.loader import build_eval_loader
        from g3dr.metrics.dataset_stats import cached_dataset_stats, compute_dataset_moments, stats_key

        detector = self.detector(cfg)
        num_real = cfg.eval.num_real or None
        resolution = resolution or cfg.eval.render_resolution or cfg.data.resolution
        key = stats_key(ident["dataset"], resolution, detector.sha256, num_real)
        cache_id = json.dumps(key, sort_keys=True)
        if cache_id not in self._real_stats:
            def compute():
                if resolution == cfg.data.resolution:
                    loader = build_eval_loader(cfg, self.dist, shards=self.data_urls(cfg),
                                               batch_size=cfg.eval.batch_size)
                else:
                    loader = self._reference_loader(cfg, resolution)
                return compute_dataset_moments(loader, detector.features, max_items=num_real,
                                               progress=self.options.progress)

            mu, sigma, _, _ = cached_dataset_stats(cfg.eval.stats_cache, key, compute)
            self._real_stats[cache_id] = (mu, sigma)
        return self._real_stats[cache_id]

    def _reference_loader(self, cfg: Config, resolution: int):
        """The eval data decoded at ``resolution`` (FID reference images when renders are not at
        data.resolution): the data pipeline's exact single pass, split over ranks, no flip."""
        from g3dr.data.loader import build_eval_loader

        return build_eval_loader(cfg, self.dist, shards=self.data_urls(cfg), batch_size=cfg.eval.batch_size,
                                 resolution=resolution)

    def eval_dir(self, ref: CheckpointRef, ehash: str) -> Path:
        """``<stem>-step<N>-<checkpoint id[:8]>-<eval hash>``: two checkpoints sharing a file name and
        a step (``a/f_trigen.safetensors`` and ``b/f_trigen.safetensors``) never share a folder."""
        base = self.options.out_dir or ref.path.parent / "eval"
        return Path(base) / f"{ref.label}-{ref.id[:8]}-{ehash}"

    # -- tracking (rank 0) ------------------------------------------------------------------------

    def ensure_tracker(self, cfg: Config) -> EvalTracker | None:
        if not self.dist.is_main:
            return None
        if self.tracker is None:
            uri = self.options.mlflow_uri or cfg.logging.mlflow_uri
            base = self.options.tracking_base or Path(".")
            uri, artifacts = resolve_tracking(uri, base)
            self.tracker = EvalTracker(uri, self.options.experiment, artifacts, attempts=self.options.attempts,
                                       retry_wait_s=self.options.retry_wait_s)
            log.info("MLflow: %s, experiment %s", uri, self.options.experiment)
        return self.tracker

    # -- one checkpoint ---------------------------------------------------------------------------

    def evaluate(self, ref: CheckpointRef, parent_run_id: str | None = None,
                 parent_factory=None) -> Outcome:
        """Evaluate ``ref`` unless already done; ``parent_factory()`` gives the sweep run id lazily."""
        cfg = self.resolve_gt_views(self.config_for(ref))
        spec = EvalSpec.from_config(cfg)
        if cfg.sr.checkpoint:
            check_sr_render(spec, cfg)
        from g3dr.weights import verify_for

        verify_for(cfg, "eval", progress=self.dist.is_main)  # Inception when FID/IS: before any work
        ident = self.identity(cfg, spec)
        sr = self.super_resolution(cfg)
        if sr is not None and "fid" in spec.metrics:
            self.check_reference_images(cfg, image_resolution(spec, sr))
        sr_views = self.sr_views_stored(cfg, spec, sr)
        ehash = eval_hash(spec, **ident)
        out_dir = self.eval_dir(ref, ehash)

        decision = None
        if self.dist.is_main:
            try:
                tracker = self.ensure_tracker(cfg)
                finished = tracker.find_finished(ref.id, ehash)
                saved = _read_results(out_dir)
                if saved and saved.get("checkpoint_id") != ref.id:  # never another checkpoint's numbers
                    log.warning("%s: %s holds results of %s; recomputing", ref.label, out_dir,
                                saved.get("checkpoint", "another checkpoint"))
                    saved = {}
                if finished:
                    decision = ("skip", finished)
                else:
                    decision = ("upload", None) if saved.get("complete") else ("run", None)
            except TrackingError as err:  # tell the other ranks instead of leaving them in the broadcast
                decision = ("error", str(err))
        decision = broadcast_object(decision)
        if decision[0] == "error":
            raise TrackingError(decision[1])
        tracker = self.tracker if self.dist.is_main else None
        if decision[0] == "skip":
            log.info("%s: finished eval run %s exists for eval config %s; skipping", ref.label, decision[1], ehash)
            return Outcome("skipped", ref, ehash, run_id=decision[1], eval_dir=out_dir)
        if parent_run_id is None and parent_factory is not None:
            parent_run_id = parent_factory()
        params = self._params(ref, cfg, spec, ident, ehash, sr_views)
        tags = self._tags(ref, ehash, ident)
        if decision[0] == "upload":
            run_id = None
            saved = _read_results(out_dir)
            if tracker is not None:
                log.info("%s: uploading the finished results in %s (an earlier upload failed)", ref.label, out_dir)
                run_id = self._log_run(tracker, ref, parent_run_id, params, tags, saved["metrics"], out_dir)
                if ref.training_run_id:
                    tracker.log_to_training_run(ref.training_run_id, saved["metrics"], ref.step)
            return Outcome("uploaded", ref, ehash, run_id=run_id, results=dict(saved.get("metrics", {})),
                           eval_dir=out_dir)

        run_id = tracker.start_run(ref.label, tags, parent_run_id) if tracker is not None else None
        if tracker is not None:
            tracker.log_params(run_id, params)
            _write_results(out_dir, {"complete": False, "status": "running", "run_id": run_id,
                                     **_header(ref, ehash, params)})
        try:
            results, grids = self._compute(ref, cfg, spec, ident, self.images_dir(ref, ehash), sr_views)
        except EvalInterrupted:
            if tracker is not None:
                tracker.end_run_quietly(run_id, "KILLED")
                _write_results(out_dir, {"complete": False, "status": "interrupted", "run_id": run_id,
                                         **_header(ref, ehash, params)})
            raise
        except BaseException:
            if tracker is not None:
                tracker.end_run_quietly(run_id, "FAILED")
                _write_results(out_dir, {"complete": False, "status": "failed", "run_id": run_id,
                                         **_header(ref, ehash, params)})
            raise
        if tracker is not None:
            self._write_report(out_dir, ref, spec, results, grids, cfg, params)
            _write_results(out_dir, {"complete": True, "status": "finished", "run_id": run_id,
                                     **_header(ref, ehash, params), "metrics": results})
            try:
                tracker.log_metrics(run_id, results, step=ref.step)
                tracker.log_artifacts(run_id, out_dir)
                tracker.end_run(run_id, "FINISHED")
            except BaseException:
                tracker.end_run_quietly(run_id, "FAILED")
                raise
            if ref.training_run_id:
                tracker.log_to_training_run(ref.training_run_id, results, ref.step)
            log.info("%s: %s", ref.label, ", ".join(f"{k}={v:.4g}" for k, v in sorted(results.items())))
        return Outcome("evaluated", ref, ehash, run_id=run_id, results=results, eval_dir=out_dir)

    def images_dir(self, ref: CheckpointRef, ehash: str) -> Path | None:
        """Where ``--save-images`` puts this checkpoint's FID/IS images (None when not saving)."""
        if self.options.save_images is None:
            return None
        return Path(self.options.save_images) / f"{ref.label}-{ref.id[:8]}-{ehash}"

    def sr_views_stored(self, cfg: Config, spec: EvalSpec, sr) -> bool:
        """With super-resolution and ``gt_views``: whether the data stores its views at the SR output size too (then
        the SR-size view PSNRs are scored as well); otherwise the view metrics stay at the render size, logged."""
        if sr is None or not spec.needs_gt_views:
            return False
        size = image_resolution(spec, sr)
        _, resolutions = self.stored_views(cfg)
        if size in resolutions:
            return True
        log.info("super-resolution: the eval data stores its ground-truth views at %s px, not at the SR output size "
                 "%d px: gt_views are scored at the render size (%d px) only", sorted(resolutions), size,
                 spec.resolution)
        return False

    def _compute(self, ref: CheckpointRef, cfg: Config, spec: EvalSpec, ident: dict[str, str],
                 image_dir: Path | None = None, sr_views: bool = False):
        from g3dr.data.loader import build_eval_loader
        from g3dr.models.checkpoint_io import load_f_trigen

        device = self.device()
        model, _, _ = load_f_trigen(ref.path, device, overrides=self.options.overrides)
        sr = self.super_resolution(cfg)
        detector = self.detector(cfg) if spec.needs_inception else None
        real = self.real_stats(cfg, ident, image_resolution(spec, sr)) if "fid" in spec.metrics else None
        # Every rank reads the same stream and keeps its own block of samples (exact N, rank-independent).
        stream = build_eval_loader(cfg, DistEnv(), shards=self.data_urls(cfg), batch_size=cfg.eval.batch_size,
                                   view_resolution=spec.resolution if spec.needs_gt_views else 0)
        if sr_views:  # the input and the views at the SR size: a second pass over the same shards, in step
            size = image_resolution(spec, sr)
            stream = attach_sr_views(stream, build_eval_loader(
                cfg, DistEnv(), shards=self.data_urls(cfg), batch_size=cfg.eval.batch_size, resolution=size,
                view_resolution=size))
        return evaluate_model(model, cfg, stream, spec, detector, real, device=device,
                              grid_samples=cfg.eval.grid_samples if self.dist.is_main else 0,
                              should_stop=self.stop, progress=self.options.progress, image_dir=image_dir,
                              sr=sr, sr_views=sr_views)

    def _params(self, ref, cfg: Config, spec: EvalSpec, ident: dict[str, str], ehash: str,
                sr_views: bool = False) -> dict[str, str]:
        """MLflow params (also in ``results.json``): the checkpoint, the hashes, the spec, and the sizes: FID/IS on
        ``eval.image_resolution`` px images, with super-resolution the SR file (``sr.*``, its sha256) and the size
        the ground-truth views were scored at too (``sr.gt_views_resolution``)."""
        sr = self.super_resolution(cfg)
        params = {"checkpoint": str(ref.path.resolve()), "checkpoint_step": str(ref.step), "eval_hash": ehash,
                  "dataset_manifest_hash": ident["dataset"], "detector_sha256": ident.get("detector", ""),
                  "data.source": cfg.data.source, "data.shards": cfg.data.shards,
                  "eval.inception_weights": cfg.eval.inception_weights, "renderer.impl": cfg.renderer.impl,
                  "overrides": " ".join(self.options.overrides), **spec.params(),
                  "eval.image_resolution": str(image_resolution(spec, sr)), "sr.checkpoint": cfg.sr.checkpoint}
        if sr is not None:
            params.update({"sr.sha256": ident["sr"], "sr.scale": str(sr.scale), "sr.source": sr.source,
                           "sr.architecture": json.dumps(sr.architecture, sort_keys=True),
                           "sr.gt_views_resolution": str(image_resolution(spec, sr) if sr_views else spec.resolution)})
        return params

    def _tags(self, ref: CheckpointRef, ehash: str, ident: dict[str, str] | None = None) -> dict[str, str]:
        tags = {"g3dr.kind": "eval", "g3dr.checkpoint": str(ref.path.resolve()), "g3dr.checkpoint_id": ref.id,
                "g3dr.step": str(ref.step), "g3dr.eval_hash": ehash}
        if ref.training_run_id:
            tags["g3dr.training_run_id"] = ref.training_run_id
        if ident and ident.get("sr"):
            tags["g3dr.sr_sha256"] = ident["sr"]
        return tags

    def _log_run(self, tracker, ref, parent_run_id, params, tags, metrics, out_dir) -> str:
        run_id = tracker.start_run(ref.label, tags, parent_run_id)
        try:
            tracker.log_params(run_id, params)
            tracker.log_metrics(run_id, metrics, step=ref.step)
            tracker.log_artifacts(run_id, out_dir)
            tracker.end_run(run_id, "FINISHED")
        except BaseException:
            tracker.end_run_quietly(run_id, "FAILED")
            raise
        return run_id

    def _write_report(self, out_dir: Path, ref: CheckpointRef, spec: EvalSpec, results: dict[str, float],
                      grids: dict[str, torch.Tensor], cfg: Config, params: dict[str, str] | None = None) -> None:
        rows = table_rows(results, spec.sigma_scales)
        (out_dir / "table.csv").write_text(table_csv(rows))
        (out_dir / "table.md").write_text(table_markdown(rows, title=f"{ref.label} ({ref.path})",
                                                         is_splits=spec.is_splits if "is" in spec.metrics else None,
                                                         seed=spec.seed, note=_sizes_note(spec, params or {})))
        plot_metrics(results, spec.sigma_scales, out_dir / "metrics_vs_sigma_scale.png")
        for name, images in sorted(grids.items()):
            value_range = (spec.nfs_near, spec.nfs_far) if name.startswith("depth_") else (-1.0, 1.0)
            save_grid(images, out_dir / "grids" / f"{name}.png", value_range=value_range)


def _sizes_note(spec: EvalSpec, params: dict[str, str]) -> str:
    """One line for ``table.md``: the size FID/IS were measured at, and the SR file when there is one."""
    render = spec.resolution
    image = int(params.get("eval.image_resolution", render))
    if not params.get("sr.sha256"):
        return f"FID/IS on the {render} px renders (no super-resolution); NFS and DA on the same renders."
    views = params.get("sr.gt_views_resolution")
    gt = f"; ground-truth view PSNR also at {views} px" if views and int(views) != render else ""
    return (f"FID/IS on {image} px images: super-resolution x{params.get('sr.scale')} of the {render} px renders "
            f"({params.get('sr.checkpoint')}, sha256 {params['sr.sha256'][:16]}); reference statistics of the data at "
            f"{image} px. NFS, DA and the ground-truth views on the {render} px renders{gt}.")


def _header(ref: CheckpointRef, ehash: str, params: dict[str, str]) -> dict[str, Any]:
    """What every ``results.json`` starts with; ``image_resolution`` (the FID/IS size) and ``super_resolution``
    (the SR file and its sha256, or null) are repeated from the params for readers of the file."""
    sr = ({"checkpoint": params["sr.checkpoint"], "sha256": params["sr.sha256"], "scale": int(params["sr.scale"])}
          if params.get("sr.sha256") else None)
    return {"checkpoint": str(ref.path), "step": ref.step, "checkpoint_id": ref.id, "eval_hash": ehash,
            "image_resolution": int(params.get("eval.image_resolution", 0)), "super_resolution": sr,
            "params": params}


def _read_results(out_dir: Path) -> dict[str, Any]:
    path = out_dir / RESULTS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON; ignoring it", path)
        return {}


def _write_results(out_dir: Path, data: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{RESULTS_FILE}.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(out_dir / RESULTS_FILE)


# ------------------------------------------------------------------------------------------------
# Sweeps
# ------------------------------------------------------------------------------------------------


@dataclass
class SweepReport:
    outcomes: list[Outcome] = field(default_factory=list)
    parent_run_id: str | None = None
    interrupted: bool = False

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)


def run_sweep(directory: str | Path, evaluator: Evaluator, watch: bool = False, poll_s: float = 60.0,
              export: bool = True) -> SweepReport:
    """Evaluate every checkpoint under ``directory`` that lacks a finished run for its eval config, newest
    first; with ``watch``, keep polling every ``poll_s`` seconds until a stop is requested. With ``export``,
    complete DeepSpeed checkpoints of a training run directory are first exported to ``exports/``."""
    directory = Path(directory)
    report = SweepReport()
    failed: set[str] = set()
    out_dir = evaluator.options.out_dir
    stop = evaluator.stop

    def parent() -> str | None:
        if report.parent_run_id is None and evaluator.tracker is not None:
            report.parent_run_id = evaluator.tracker.start_run(
                f"sweep {directory.name}", {"g3dr.kind": "sweep", "g3dr.sweep_dir": str(directory.resolve())})
        return report.parent_run_id

    try:
        while True:
            if export and evaluator.dist.is_main:
                export_training_checkpoints(directory)
            refs = discover_checkpoints(directory, exclude=out_dir) if evaluator.dist.is_main else None
            refs = broadcast_object(refs)
            log.info("sweep: %d checkpoint(s) under %s", len(refs), directory)
            for ref in refs:
                if broadcast_object(stop()):
                    break
                if ref.id in failed:
                    continue  # failed earlier in this process: not retried on every poll
                try:
                    report.outcomes.append(evaluator.evaluate(ref, parent_factory=parent))
                except (WeightsError, DataError, ConfigError) as err:
                    # One bad checkpoint must not stop a scheduled sweep; its run (if any) is FAILED.
                    log.error("sweep: %s failed: %s", ref.path, err)
                    failed.add(ref.id)
                    report.outcomes.append(Outcome("failed", ref, "", error=str(err)))
            if not watch or broadcast_object(stop()):
                break
            deadline = time.monotonic() + poll_s
            while time.monotonic() < deadline and not stop():
                time.sleep(min(0.2, poll_s))
            if broadcast_object(stop()):
                break
    except EvalInterrupted:
        report.interrupted = True
        log.warning("sweep: stopped during an evaluation; that run is marked KILLED and will be redone")
    finally:
        if report.parent_run_id is not None and evaluator.tracker is not None:
            evaluator.tracker.end_run_quietly(report.parent_run_id, "KILLED" if report.interrupted else "FINISHED")
    return report

