"""Evaluate one f_trigen: lift dataset RGB-D images to triplanes, render them at every sigma scale, score.

For each input sample (the first ``max(eval.num_samples, eval.fid_samples)`` of the eval stream: NFS and DA
use the first ``num_samples``, FID and IS the first ``fid_samples``), the triplane is built once and
rendered, per sigma scale, in the canonical view (NFS on 3DGP's depth maps - a second render of those
samples with its density cut - or on the median depth, by ``eval.nfs_depth``; DA against the input's
pseudo-depth, and FID/IS when ``canonical`` is among the views) and in a novel view (FID/IS). Novel
cameras are a function of the sample index (seeded per sample, or the video trajectory), and eval renders
are deterministic by default, so the scores do not depend on batch size or on how samples are split
across ranks.

Ground-truth views (``gt_views`` in ``eval.metrics``; the batches must carry ``views``, as a synthetic set
written with ``--views K`` gives them): per sigma scale, ``psnr_canonical`` (the canonical render against
the input image), ``psnr_novel`` (renders at every stored view camera against the stored views, on the
pixels whose surface lies inside the scene box) and ``da_novel`` (DA of the rendered depth against the
exact view depth on those pixels), ``weight_front_novel`` and ``weight_surface_novel`` (the mean over those
pixels of the rendering weight in front of the exact surface, and within ``WEIGHT_BAND`` of it), on the first
``num_samples`` samples (:mod:`g3dr.metrics.views`), and a no-model baseline ``psnr_novel_flat`` (each view
painted in the input image's mean colour; the same at every scale).

Super-resolution (``sr``, a :class:`~g3dr.models.sr.SuperResolution`): the images FID and IS score (and the
grids and saved PNGs show) are the network's output on the render at ``data.resolution``; NFS, DA and the
ground-truth view metrics above stay on the render (the geometry is never super-resolved). Where the batches
also carry the input and the stored views at the super-resolution size (``sr_rgb``, ``sr_views``:
:func:`attach_sr_views`), ``psnr_canonical_sr``/``psnr_novel_sr`` score the upscaled renders against them,
beside ``psnr_canonical_bicubic``/``psnr_novel_bicubic`` for bicubic upsampling of the same renders.

Ranks: every rank reads the same input stream and keeps the samples of its contiguous block
(:func:`g3dr.metrics.gather.shard_range`); moments are all-reduced and per-sample values gathered, so the
scores use exactly N samples. Nothing here talks to MLflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from g3dr.config import CameraConfig, Config, EvalConfig
from g3dr.distributed import rank_and_world_size
from g3dr.errors import ConfigError, DataError
from g3dr.eval.report import format_scale, metric_key
from g3dr.log import get_logger
from g3dr.metrics.dataset_stats import STATS_RECIPE_VERSION
from g3dr.metrics.depth import depth_accuracy_per_map, non_flatness_per_map
from g3dr.metrics.fid import FeatureMoments, frechet_distance
from g3dr.metrics.gather import all_reduce_moments, as_numpy, gather_rows, shard_range
from g3dr.metrics.image_folder import write_png_batch
from g3dr.metrics.inception import FEATURE_DIM, InceptionDetector, quantize_images
from g3dr.metrics.inception_score import inception_score
from g3dr.metrics.views import WEIGHT_BAND, masked_depth_accuracy_per_map, psnr_per_image, weight_mass_per_view

log = get_logger("g3dr.eval")

PROTOCOL_VERSION = "g3dr-eval/5"
"""Bump when a change to this module changes scores: the eval hash then differs and sweeps re-run.
2: IS splits after a shuffle seeded by ``eval.seed``; the reference-statistics recipe joins the hash.
3: NFS on 3DGP's depth maps by default (``eval.nfs_depth``, ``eval.nfs_cut_quantile``; before: the median
depth), and the depth grids show the depth NFS scores.
4: ``psnr_novel_flat``.
5: ``weight_front_novel``, ``weight_surface_novel`` (and the gt-view renders take the reference path)."""


class EvalInterrupted(RuntimeError):
    """Raised inside an evaluation when a stop was requested (SIGTERM): nothing may be logged as complete."""


@dataclass(frozen=True)
class EvalSpec:
    """Everything that determines the scores of a checkpoint (besides its weights and the data)."""

    metrics: tuple[str, ...]
    sigma_scales: tuple[float, ...]
    num_samples: int
    fid_samples: int
    views: tuple[str, ...]
    novel_camera: str
    nfs_bins: int
    nfs_near: float
    nfs_far: float
    nfs_depth: str
    nfs_cut_quantile: float
    is_splits: int
    num_real: int
    deterministic_render: bool
    seed: int
    resolution: int

    @classmethod
    def from_config(cls, cfg: Config) -> EvalSpec:
        e: EvalConfig = cfg.eval
        return cls(metrics=tuple(e.metrics), sigma_scales=tuple(float(s) for s in e.sigma_scales),
                   num_samples=e.num_samples, fid_samples=e.fid_samples or e.num_samples,
                   views=tuple(e.views), novel_camera=e.novel_camera,
                   nfs_bins=e.nfs_bins, nfs_near=e.nfs_near, nfs_far=e.nfs_far, nfs_depth=e.nfs_depth,
                   nfs_cut_quantile=e.nfs_cut_quantile, is_splits=e.is_splits,
                   num_real=e.num_real, deterministic_render=e.deterministic_render, seed=e.seed,
                   resolution=e.render_resolution or cfg.data.resolution)

    def params(self) -> dict[str, str]:
        """Flat string params (for MLflow and the eval hash)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f"eval.{f.name}"] = ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
        return out

    @property
    def total_samples(self) -> int:
        """Input samples read: the larger of the NFS/DA and the FID/IS counts."""
        return max(self.num_samples, self.fid_samples)

    @property
    def needs_inception(self) -> bool:
        return "fid" in self.metrics or "is" in self.metrics

    @property
    def needs_gt_views(self) -> bool:
        """The batches must carry the stored ground-truth views (``batch["views"]``)."""
        return GT_VIEWS in self.metrics


GT_VIEWS = "gt_views"
"""The ``eval.metrics`` name of the ground-truth view metrics (:data:`GT_VIEW_METRICS`)."""
WEIGHT_VIEW_METRICS = ("weight_front_novel", "weight_surface_novel")
"""Means over all valid pixels of all views (each pixel counts once): accumulated as per-view ``(sum, valid
pixel count)`` rows (n, K, 2), gathered like the others, divided once (:func:`_pooled_mean`)."""
GT_VIEW_METRICS = ("psnr_canonical", "psnr_novel", "da_novel", "psnr_novel_flat", *WEIGHT_VIEW_METRICS)
SR_VIEW_METRICS = ("psnr_canonical_sr", "psnr_novel_sr", "psnr_canonical_bicubic", "psnr_novel_bicubic")
"""Ground-truth view PSNR at the super-resolution size (with ``sr`` and views stored at that size): the upscaled
renders, and bicubic upsampling of the same renders as the baseline."""


def image_resolution(spec: EvalSpec, sr: torch.nn.Module | None) -> int:
    """Side of the images FID and IS score: the render's, or the super-resolution output's."""
    return spec.resolution * int(sr.scale) if sr is not None else spec.resolution


def check_sr_render(spec: EvalSpec, cfg: Config) -> None:
    """With super-resolution the renders must be at ``data.resolution`` (the size the network upscales, the
    paper's 128 -> 256); a different ``eval.render_resolution`` would be two ways of reaching one size."""
    if spec.resolution != cfg.data.resolution:
        raise ConfigError(f"eval.render_resolution={cfg.eval.render_resolution} with super-resolution: the SR stage "
                          f"upscales renders at data.resolution ({cfg.data.resolution} px), so FID/IS are measured at "
                          f"its output size; set eval.render_resolution=0 (or {cfg.data.resolution}), or evaluate "
                          "without super-resolution (--no-sr, sr.checkpoint='') to render directly at "
                          f"{cfg.eval.render_resolution} px")


def eval_hash(spec: EvalSpec, **identity: str) -> str:
    """Short hash of the spec, the protocol version, the reference-statistics recipe version and identity
    strings (dataset hash, detector sha256)."""
    payload = {"protocol": PROTOCOL_VERSION, "stats_recipe": STATS_RECIPE_VERSION, **spec.params(),
               **{k: str(v) for k, v in identity.items()}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# Cameras
# ------------------------------------------------------------------------------------------------


def novel_angles(indices: Sequence[int], spec: EvalSpec, cam_cfg: CameraConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(yaw (n,), pitch (n,)) of the novel views of samples ``indices``, a function of each index alone.

    ``sampled``: the training distribution at the end of training (progress 1), drawn from a generator
    seeded by ``(eval.seed, index)``; ``video``: point ``index`` of the video trajectory through N points.
    """
    from g3dr.render.cameras import sample_novel_angles, video_trajectory

    if spec.novel_camera == "video":
        yaw, pitch = video_trajectory(spec.total_samples, cam_cfg)
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return yaw[idx], pitch[idx]
    yaws, pitches = [], []
    for i in indices:
        gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + int(i))
        y, p = sample_novel_angles(1, 1.0, cam_cfg, generator=gen)
        yaws.append(y)
        pitches.append(p)
    return torch.cat(yaws), torch.cat(pitches)


def cameras(indices: Sequence[int], view: str, spec: EvalSpec, cam_cfg: CameraConfig) -> torch.Tensor:
    """cam2world (n, 4, 4) of the ``canonical`` or ``novel`` view of samples ``indices``."""
    from g3dr.render.cameras import camera_to_world_from_angles, canonical_angles

    if view == "canonical":
        yaw, pitch = canonical_angles(len(indices), cam_cfg)
    else:
        yaw, pitch = novel_angles(indices, spec, cam_cfg)
    return camera_to_world_from_angles(yaw, pitch, cam_cfg.radius)


# ------------------------------------------------------------------------------------------------
# Input samples
# ------------------------------------------------------------------------------------------------


def take_block(batches: Iterable[dict], block: range, batch_size: int, total: int) -> Iterator[tuple[list[int], dict]]:
    """From a stream of dataset batches (the same on every rank), yield ``(indices, batch)`` re-batched to
    ``batch_size`` holding exactly the samples whose global index is in ``block``. Reads the first ``total``
    samples on every rank (decoding is cheap next to rendering) so that all ranks agree on errors.

    A stream with fewer than ``total`` samples is a :class:`~g3dr.errors.DataError`.
    """
    seen = 0
    pending: list[tuple[int, dict]] = []
    for batch in batches:
        rgb = batch["rgb"]
        for j in range(rgb.shape[0]):
            i = seen + j
            if i in block:
                item = {}
                for name in _SAMPLE_FIELDS:
                    value = batch.get(name)
                    if isinstance(value, dict):
                        item[name] = {k: v[j] for k, v in value.items()}
                    elif value is not None:
                        item[name] = value[j]
                pending.append((i, item))
                if len(pending) == batch_size:
                    yield _stack(pending)
                    pending = []
        seen += rgb.shape[0]
        if seen >= total:  # every rank reads all N, so a short stream fails on every rank alike
            break
    if seen < total:
        raise DataError(f"the eval data holds {seen} samples but the evaluation needs {total} "
                        f"(eval.num_samples / eval.fid_samples); lower them or use more data")
    if pending:
        yield _stack(pending)


_SAMPLE_FIELDS = ("rgb", "depth", "views", "sr_rgb", "sr_views")
"""Per-sample batch entries :func:`take_block` carries (tensors, or dicts of tensors such as ``views``)."""


def _stack(items: list[tuple[int, dict]]) -> tuple[list[int], dict]:
    samples = [item for _, item in items]
    batch = {}
    for name in _SAMPLE_FIELDS:
        if not all(name in x for x in samples):
            continue
        first = samples[0][name]
        if isinstance(first, dict):
            batch[name] = {k: torch.stack([x[name][k] for x in samples]) for k in first}
        else:
            batch[name] = torch.stack([x[name] for x in samples])
    return [i for i, _ in items], batch


def attach_sr_views(batches: Iterable[dict], sr_batches: Iterable[dict]) -> Iterator[dict]:
    """``batches`` (the eval stream at ``data.resolution``) with ``sr_rgb`` and ``sr_views`` (the input image and the
    stored views) taken from ``sr_batches``, the same samples decoded at the super-resolution size.

    Both streams must hold the same samples in the same order and batching (two exact passes over the same
    shards with the same plan); a sample whose keys differ is a :class:`~g3dr.errors.DataError` (e.g. a sample
    that decodes at one size and is skipped at the other).
    """
    sr_iter = iter(sr_batches)
    for batch in batches:
        other = next(sr_iter, None)
        if other is None or list(other.get("key", [])) != list(batch.get("key", [])):
            keys = list(batch.get("key", []))[:3]
            raise DataError(f"the eval data decoded at the super-resolution size does not hold the same samples as at "
                            f"data.resolution (near {keys}); check the shards with 'g3dr prep validate' (a sample "
                            "may be skipped at one size), or leave gt_views out")
        if other.get("views") is None:
            raise DataError("the eval data stores no ground-truth views at the super-resolution size; write the set "
                            "with views at both sizes ('g3dr prep synth --views K --resolution R 2R')")
        yield {**batch, "sr_rgb": other["rgb"], "sr_views": other["views"]}
    if next(sr_iter, None) is not None:
        raise DataError("the eval data decoded at the super-resolution size holds more samples than at "
                        "data.resolution; check the shards with 'g3dr prep validate'")


# ------------------------------------------------------------------------------------------------
# Rendering at a sigma scale
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def render_settings(model: torch.nn.Module, sigma_scale: float, deterministic: bool):
    """Temporarily render ``model`` (an FTrigen) with ``sigma_scale`` (and deterministic sampling)."""
    renderer = model.renderer
    original = renderer.cfg
    renderer.cfg = dataclasses.replace(original, sigma_scale=float(sigma_scale),
                                       deterministic=original.deterministic or deterministic)
    try:
        yield
    finally:
        renderer.cfg = original


@dataclass
class _Scores:
    """Per-(view, scale) accumulators on one rank."""

    moments: FeatureMoments
    probs: list[torch.Tensor]
    nfs: list[np.ndarray]
    da: list[np.ndarray]
    gt: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)
    """Per-sample ground-truth view scores by name (``psnr_canonical`` (n,), ``psnr_novel``/``da_novel`` (n, K),
    :data:`WEIGHT_VIEW_METRICS` (n, K, 2))."""


def evaluate_model(model: torch.nn.Module, cfg: Config, batches: Iterable[dict], spec: EvalSpec,
                   detector: InceptionDetector | None, real_stats: tuple[np.ndarray, np.ndarray] | None,
                   device: torch.device | str = "cpu", batch_size: int | None = None,
                   grid_samples: int = 0, should_stop: Callable[[], bool] = lambda: False,
                   progress: bool = True, image_dir: str | Path | None = None,
                   sr: torch.nn.Module | None = None, sr_views: bool = False,
                   ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Scores of ``model`` on the first ``spec.total_samples`` samples of ``batches``; returns
    ``(results, grids)``: results by MLflow metric name (``fid/s5``...), identical on every rank, and on
    rank 0 the first ``grid_samples`` renders per view and scale (``rgb_novel_s5``, ``depth_canonical_s5``).

    ``detector`` and ``real_stats`` (``mu, sigma`` of the dataset's Inception features) are needed for FID
    (``real_stats``) and IS (``detector``). ``should_stop`` is polled between batches; when it returns
    True an :class:`EvalInterrupted` is raised.

    ``image_dir``: also write the uint8 images scored by FID/IS, exactly as the detector gets them, to
    ``image_dir/<view>_s<scale>/NNNNNN.png`` (NNNNNN the sample index; each rank writes its own samples).
    Scoring that folder (:mod:`g3dr.metrics.image_folder`) gives the same FID and IS.

    ``sr``: a super-resolution network (:class:`~g3dr.models.sr.SuperResolution`, on ``device``, eval mode); FID
    and IS then score its output on the renders (``real_stats`` must be statistics of images at that size,
    :func:`image_resolution`), and the grids and ``image_dir`` hold those images. The renders are at
    ``data.resolution`` (:func:`check_sr_render`); NFS, DA and the ground-truth view metrics stay on them.
    ``sr_views`` (with ``sr`` and ``gt_views``): the batches carry ``sr_rgb`` and ``sr_views``
    (:func:`attach_sr_views`), and :data:`SR_VIEW_METRICS` are computed too.
    """
    if sr is not None:
        check_sr_render(spec, cfg)
    if sr_views and (sr is None or not spec.needs_gt_views):
        raise ValueError("sr_views needs a super-resolution network and gt_views among the metrics")
    if spec.needs_inception and detector is None:
        raise ValueError("FID/IS need the Inception detector")
    if "fid" in spec.metrics and real_stats is None:
        raise ValueError("FID needs the dataset statistics")
    rank, world = rank_and_world_size()
    block = shard_range(spec.total_samples, rank, world)
    batch_size = batch_size or cfg.eval.batch_size
    image_views = list(spec.views) if spec.needs_inception else []
    canonical_metrics = {"nfs", "da", GT_VIEWS} & set(spec.metrics)
    render_views = sorted(set(image_views) | ({"canonical"} if canonical_metrics else set()))
    scores = {(v, s): _Scores(FeatureMoments(FEATURE_DIM), [], [], []) for v in render_views for s in spec.sigma_scales}
    grids: dict[str, list[torch.Tensor]] = {}
    model.eval()
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=len(block), desc="eval samples", unit="img", leave=False)
    with torch.no_grad():
        for indices, batch in take_block(batches, block, batch_size, spec.total_samples):
            if should_stop():
                raise EvalInterrupted("stop requested during evaluation")
            if spec.needs_gt_views:
                _check_gt_views(batch, spec, cfg.camera)
                if sr_views:
                    _check_sr_views(batch, image_resolution(spec, sr))
            rgb = batch["rgb"].to(device)
            depth = batch["depth"].to(device)
            planes = model.make_planes(rgb, depth)
            cams = {v: cameras(indices, v, spec, cfg.camera).to(device) for v in render_views}
            for_images = [j for j, i in enumerate(indices) if i < spec.fid_samples]  # rows scored by FID/IS
            for_depth = [j for j, i in enumerate(indices) if i < spec.num_samples]  # rows scored by NFS/DA
            for scale in spec.sigma_scales:
                with render_settings(model, scale, spec.deterministic_render):
                    for view in render_views:
                        out = model.renderer(planes, model.decoder, cams[view], spec.resolution,
                                             depth=None, canonical=view == "canonical")
                        acc = scores[(view, scale)]
                        grid_rows = [j for j, i in enumerate(indices) if i < grid_samples]
                        nfs_rows = for_depth if view == "canonical" and "nfs" in spec.metrics else []
                        depth_rows = sorted(set(nfs_rows) | set(grid_rows))
                        nfs_maps = _nfs_depth_maps(model, planes, cams[view], out, depth_rows, spec,
                                                   canonical=view == "canonical")
                        # The pictures that leave the eval (FID/IS images, PNGs, grids): upscaled with SR.
                        picture_rows = sorted(set(for_images if view in image_views else []) | set(grid_rows))
                        pictures = out["rgb"][picture_rows]
                        if sr is not None and picture_rows:
                            pictures = sr(pictures)
                        if view in image_views and for_images:
                            images = quantize_images(pictures[[picture_rows.index(j) for j in for_images]])
                            if image_dir is not None:
                                write_png_batch(images, [indices[j] for j in for_images],
                                                Path(image_dir) / f"{view}_s{format_scale(scale)}")
                            if "fid" in spec.metrics:
                                acc.moments.update(detector.features(images))
                            if "is" in spec.metrics:
                                acc.probs.append(detector.probabilities(images))
                        if view == "canonical" and for_depth:
                            if "nfs" in spec.metrics:
                                maps = nfs_maps[[depth_rows.index(j) for j in for_depth]]
                                acc.nfs.append(non_flatness_per_map(maps, spec.nfs_near, spec.nfs_far, spec.nfs_bins))
                            if "da" in spec.metrics:
                                target = _resized(depth[for_depth], spec.resolution)
                                acc.da.append(depth_accuracy_per_map(out["depth"][for_depth], target))
                            if spec.needs_gt_views:
                                _score_gt_views(model, planes, out, rgb, batch, for_depth, spec, cfg, acc,
                                                sr if sr_views else None)
                        _keep_grid(grids, view, scale, pictures[[picture_rows.index(j) for j in grid_rows]],
                                   nfs_maps[[depth_rows.index(j) for j in grid_rows]])
            if bar is not None:
                bar.update(len(indices))
    if bar is not None:
        bar.close()
    results = _reduce(scores, spec, real_stats, sr_views=sr_views)
    return results, {k: torch.cat(v) for k, v in grids.items()}


def _check_gt_views(batch: dict, spec: EvalSpec, cam_cfg: CameraConfig) -> None:
    """The batch carries stored views that the model's renders can be compared with, else a DataError."""
    views = batch.get("views")
    if views is None:
        raise DataError(f"eval.metrics names {GT_VIEWS} but the eval data stores no ground-truth views; write a "
                        "synthetic set with them ('g3dr prep synth --views K', or data.synthetic_views=K) or drop "
                        f"{GT_VIEWS} from --metrics")
    if views["rgb"].shape[-1] != spec.resolution or views["rgb"].shape[-2] != spec.resolution:
        raise DataError(f"the stored views are {tuple(views['rgb'].shape[-2:])} px but the eval renders at "
                        f"{spec.resolution} px; store views at that size or set eval.render_resolution")
    for name, wanted in (("radius", cam_cfg.radius), ("fov_degrees", cam_cfg.fov_degrees)):
        stored = views[name].double()
        if not torch.allclose(stored, torch.full_like(stored, float(wanted)), rtol=0, atol=1e-9):
            raise DataError(f"the stored views were taken with camera {name} {sorted(set(stored.tolist()))}, but the "
                            f"model renders with camera.{name}={wanted}; evaluate with the camera the views were made with")


def _check_sr_views(batch: dict, size: int) -> None:
    """The batch carries the input and the stored views at the super-resolution size ``size``, else a DataError."""
    views, rgb = batch.get("sr_views"), batch.get("sr_rgb")
    if views is None or rgb is None:
        raise DataError("the batches carry no input images and views at the super-resolution size (sr_rgb, "
                        "sr_views); attach them with attach_sr_views or score the views at the render size only")
    for name, tensor in (("sr_rgb", rgb), ("sr_views", views["rgb"])):
        if tuple(tensor.shape[-2:]) != (size, size):
            raise DataError(f"{name} is {tuple(tensor.shape[-2:])} px but the super-resolution output is {size} px")
    if not (torch.equal(views["yaw"], batch["views"]["yaw"]) and torch.equal(views["pitch"], batch["views"]["pitch"])):
        raise DataError("the views stored at the super-resolution size have other cameras than those at the render "
                        "size; the eval data is inconsistent")


def _score_gt_views(model: torch.nn.Module, planes: torch.Tensor, canonical: dict[str, torch.Tensor],
                    rgb: torch.Tensor, batch: dict, rows: list[int], spec: EvalSpec,
                    cfg: Config, acc: _Scores, sr: torch.nn.Module | None = None) -> None:
    """Ground-truth view scores of batch rows ``rows`` at the current sigma scale into ``acc.gt``.

    ``canonical`` is the canonical render of the whole batch; the model is rendered again at each stored
    view camera (one renderer call per view index k, rows only), without the depth prior, with its per-sample
    weights (``sample_weights=True``: the reference render path, whose rgb and depth equal the fused path's
    to float precision) for :data:`WEIGHT_VIEW_METRICS`. With ``sr`` the
    renders are also upscaled (and, as the baseline, upsampled bicubically) and scored against
    ``batch["sr_rgb"]`` / ``batch["sr_views"]`` (:data:`SR_VIEW_METRICS`).
    """
    from g3dr.render.cameras import camera_to_world_from_angles

    if not rows:
        return
    views = batch["views"]
    target = _resized(rgb[rows].float(), spec.resolution)
    acc.gt.setdefault("psnr_canonical", []).append(psnr_per_image(canonical["rgb"][rows], target))
    if sr is not None:
        sr_target = batch["sr_rgb"][rows].float()
        for name, upscaled in _upscaled(canonical["rgb"][rows], sr).items():
            acc.gt.setdefault(f"psnr_canonical_{name}", []).append(psnr_per_image(upscaled, sr_target))
    device = planes.device
    yaw, pitch = views["yaw"][rows], views["pitch"][rows]
    rendered_rgb, rendered_depth = [], []
    masses: dict[str, list[np.ndarray]] = {name: [] for name in WEIGHT_VIEW_METRICS}
    upscaled_rgb: dict[str, list[torch.Tensor]] = {}
    for k in range(yaw.shape[1]):
        cams = camera_to_world_from_angles(yaw[:, k].float(), pitch[:, k].float(), cfg.camera.radius).to(device)
        out = model.renderer(planes[rows], model.decoder, cams, spec.resolution, depth=None, canonical=False,
                             sample_weights=True)
        rendered_rgb.append(out["rgb"].detach().cpu())
        rendered_depth.append(out["depth"][:, 0].detach().cpu())
        front, near, count = weight_mass_per_view(*_pixel_samples(out, spec.resolution),
                                                  views["depth"][rows, k], views["valid"][rows, k], WEIGHT_BAND)
        masses["weight_front_novel"].append(np.stack([front, count], axis=-1))
        masses["weight_surface_novel"].append(np.stack([near, count], axis=-1))
        if sr is not None:
            for name, upscaled in _upscaled(out["rgb"], sr).items():
                upscaled_rgb.setdefault(name, []).append(upscaled)
    if sr is not None:
        sr_views = batch["sr_views"]
        for name, parts in upscaled_rgb.items():
            acc.gt.setdefault(f"psnr_novel_{name}", []).append(
                psnr_per_image(torch.stack(parts, dim=1), sr_views["rgb"][rows].cpu(), sr_views["valid"][rows].cpu()))
    rendered_rgb = torch.stack(rendered_rgb, dim=1)  # (n, K, 3, H, W)
    rendered_depth = torch.stack(rendered_depth, dim=1)  # (n, K, H, W)
    valid = views["valid"][rows].cpu()
    acc.gt.setdefault("psnr_novel", []).append(psnr_per_image(rendered_rgb, views["rgb"][rows].cpu(), valid))
    acc.gt.setdefault("da_novel", []).append(
        masked_depth_accuracy_per_map(rendered_depth, views["depth"][rows].cpu(), valid))
    for name, parts in masses.items():
        acc.gt.setdefault(name, []).append(np.stack(parts, axis=1))  # (n, K, 2): per view (sum, valid pixels)
    # No model, no 3D: every view painted in the input image's mean colour (what novel-view PSNR gives for
    # knowing the input's average colour alone; a model that learned 3D colour should beat it).
    flat = rgb[rows].float().mean(dim=(-2, -1)).cpu()[:, None, :, None, None].expand_as(views["rgb"][rows])
    acc.gt.setdefault("psnr_novel_flat", []).append(psnr_per_image(flat, views["rgb"][rows].cpu(), valid))


def _pixel_samples(out: dict[str, torch.Tensor], resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample weights (n, H, W, S - 1) and depths (n, H, W, S) of a ``sample_weights=True`` render, in
    the pixel layout of its images: the renderer's rays are ray-major, ray ``r`` is pixel ``(r // W, r % W)``
    (row-major, as ``out["rgb"]`` and the stored views)."""
    weights, depths = out["sample_weights"], out["sample_depths"]
    n, rays = weights.shape[:2]
    if rays != resolution * resolution:
        raise ValueError(f"the render has {rays} rays per image, expected {resolution} x {resolution}")
    return (weights.reshape(n, resolution, resolution, weights.shape[2]),
            depths.reshape(n, resolution, resolution, depths.shape[2]))


def _upscaled(rgb: torch.Tensor, sr: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``sr``: the network's output on renders ``rgb`` (n, 3, H, W); ``bicubic``: bicubic upsampling of the same
    renders to that size (the baseline an SR network must beat); both on the CPU."""
    size = (rgb.shape[-2] * int(sr.scale), rgb.shape[-1] * int(sr.scale))
    bicubic = torch.nn.functional.interpolate(rgb.float(), size=size, mode="bicubic", align_corners=False)
    return {"sr": sr(rgb).detach().cpu(), "bicubic": bicubic.detach().cpu()}


def _resized(depth: torch.Tensor, resolution: int) -> torch.Tensor:
    """The pseudo-depth (B, 1, H, W) at the render resolution (bilinear) for DA, unchanged if equal."""
    if depth.shape[-1] == resolution and depth.shape[-2] == resolution:
        return depth
    return torch.nn.functional.interpolate(depth.float(), size=(resolution, resolution), mode="bilinear",
                                           align_corners=False)


def _nfs_depth_maps(model: torch.nn.Module, planes: torch.Tensor, cam2world: torch.Tensor, out: dict[str, torch.Tensor],
                    rows: list[int], spec: EvalSpec, canonical: bool) -> torch.Tensor:
    """The depth maps NFS scores (and the depth grids show), (len(rows), 1, H, W), of batch rows ``rows``.

    ``planes``, ``cam2world`` and ``out`` (the ordinary render) are the whole batch's. ``median``: the
    ordinary render's median depth. ``3dgp``: 3DGP's depth ``sum(w t)`` of a render of the rows with the
    density cut in every marcher call (the cut changes where the fine samples go, so it is a render of its
    own; its quantile is per image, so rendering only these rows gives the whole batch's maps).
    """
    if spec.nfs_depth == "median":
        return out["median_depth"][rows]
    if not rows or spec.nfs_cut_quantile == 0.0:  # no cut: the ordinary render is 3DGP's render
        return out["depth_3dgp"][rows]
    cut = model.renderer(planes[rows], model.decoder, cam2world[rows], spec.resolution, depth=None,
                         canonical=canonical, cut_quantile=spec.nfs_cut_quantile)
    return cut["depth_3dgp"]


def _keep_grid(grids, view, scale, rgb, depth) -> None:
    """Append the grid rows' renders ``rgb`` (n, 3, H, W) and depth maps (n, 1, H, W) (nothing if n = 0)."""
    if rgb.shape[0] == 0:
        return
    tag = f"{view}_s{format_scale(scale)}"
    grids.setdefault(f"rgb_{tag}", []).append(rgb.float().cpu())
    grids.setdefault(f"depth_{tag}", []).append(depth.float().cpu())


def _reduce(scores: dict[tuple[str, float], _Scores], spec: EvalSpec,
            real_stats: tuple[np.ndarray, np.ndarray] | None, sr_views: bool = False) -> dict[str, float]:
    """Combine the ranks' accumulators into final scores (every rank runs the same collectives in order)."""
    results: dict[str, float] = {}
    n, n_images = spec.num_samples, spec.fid_samples
    for (view, scale), acc in sorted(scores.items()):
        image_view = view in spec.views and spec.needs_inception
        if image_view and "fid" in spec.metrics:
            total = all_reduce_moments(acc.moments)
            _check_count(total.count, n_images, "FID features")
            mu, sigma = total.mean_cov()
            results[metric_key("fid", scale, view, spec.views)] = frechet_distance(mu, sigma, *real_stats)
        if image_view and "is" in spec.metrics:
            local = torch.cat(acc.probs) if acc.probs else torch.zeros(0, 1008)
            probs = gather_rows(local)
            _check_count(probs.shape[0], n_images, "IS probabilities")
            mean, std = inception_score(as_numpy(probs), spec.is_splits, seed=spec.seed)
            results[metric_key("is", scale, view, spec.views)] = mean
            results[metric_key("is_std", scale, view, spec.views)] = std
        if view == "canonical":
            for name, parts in (("nfs", acc.nfs), ("da", acc.da)):
                if name not in spec.metrics:
                    continue
                local = torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.float64)
                values = gather_rows(local)
                _check_count(values.shape[0], n, name.upper())
                results[metric_key(name, scale)] = float(values.double().mean())
            if spec.needs_gt_views:
                for name in GT_VIEW_METRICS + (SR_VIEW_METRICS if sr_views else ()):
                    parts = acc.gt.get(name, [])
                    local = torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.float64)
                    values = gather_rows(local)
                    _check_count(values.shape[0], n, name)
                    mean = _pooled_mean if name in WEIGHT_VIEW_METRICS else _mean_over_views
                    results[metric_key(name, scale)] = mean(values, name)
    for key, value in results.items():
        if not math.isfinite(value):
            log.warning("%s is %s", key, value)
    return results


def _mean_over_views(values: torch.Tensor, name: str) -> float:
    """Mean of per-sample (N,) or per-view (N, K) scores; views without a valid pixel (NaN) are left out."""
    flat = values.double().numpy().ravel()
    missing = int(np.isnan(flat).sum())
    if missing:
        log.warning("%s: %d of %d views have no valid pixel and are left out of the mean", name, missing, flat.size)
    return float(np.nanmean(flat)) if missing < flat.size else math.nan


def _pooled_mean(values: torch.Tensor, name: str) -> float:
    """Mean over every valid pixel of all views from per-view ``(sum, valid pixel count)`` rows (N, K, 2)."""
    pairs = values.double().reshape(-1, 2).sum(dim=0)
    total, count = float(pairs[0]), float(pairs[1])
    if count == 0:
        log.warning("%s: no view has a valid pixel", name)
        return math.nan
    return total / count


def _check_count(got: int, expected: int, what: str) -> None:
    if got != expected:
        raise RuntimeError(f"{what}: gathered {got} samples, expected exactly {expected}")
