"""The typed config tree of g3dr-scale: one dataclass per section, YAML presets, dotted overrides.

Every hyperparameter of the method (``shared/DESIGN.md``) is a default here; ``configs/imagenet128.yaml``
spells them out and ``configs/tiny.yaml`` shrinks them for CPU tests and the demo.

Loading is strict: an unknown key, a value of the wrong type or a value out of range is a
:class:`~g3dr.errors.ConfigError` naming the dotted key and where the value came from (the YAML file or
the command-line override). The loader knows nothing about deepspeed, mlflow or submitit; those derive
their own settings from the resolved config (one source of truth).

Usage::

    cfg = load_config("configs/tiny.yaml", ["train.lr=1e-4", "data.batch_size=2"])
    save_config(cfg, run_dir)            # writes run_dir/config.yaml, loadable by load_config
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from g3dr.errors import ConfigError

CONFIG_FILENAME = "config.yaml"


class _FieldError(ValueError):
    """Raised by a section's checks; the loader adds the section path and the value's origin."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise _FieldError(key, message)


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where training images come from and how they are decoded."""

    source: Literal["synthetic", "shards"] = "synthetic"
    """``synthetic``: procedural RGB-D primitives generated into ``synthetic_dir`` on first use;
    ``shards``: WebDataset shards named by ``shards``."""
    shards: str = ""
    """Shard URLs: a shard folder (with ``manifest.json``), a brace pattern (``/data/train-{000000..000127}.tar``), a
    glob (``/data/train-*.tar``), a comma list, or ``pipe:``. Read only when ``source`` is ``shards``."""
    synthetic_dir: str = "outputs/synthetic"
    """Where the synthetic dataset is written and read (used when ``source`` is ``synthetic``)."""
    synthetic_size: int = 64
    """Number of synthetic samples to generate."""
    synthetic_views: int = 0
    """Novel views with exact depth stored per synthetic sample (``g3dr prep synth --views``), for the eval's
    ``gt_views`` metrics; taken with the cameras of ``camera`` inside the box of ``renderer.box_warp``."""
    synthetic_view_cameras: Literal["sampled", "video"] = "sampled"
    """Cameras of the synthetic views: ``sampled`` as in training at its end (seeded per sample), or ``video``
    (points of the video path)."""
    resolution: int = 128
    """Training resolution: images and depth are resized (Lanczos) to this square size."""
    flip_p: float = 0.5
    """Probability of the joint horizontal flip of image and depth."""
    depth_scale: float = 2.0
    """Release depth decoding: ``depth = png_u16 / 65536 * depth_scale + depth_offset``."""
    depth_offset: float = 4.0
    """See ``depth_scale``; with the defaults depth lies in [4, 6]."""
    shuffle_buffer: int = 1000
    """Samples held in the shuffle buffer of the training pipeline."""
    num_workers: int = 4
    """Data-loader worker processes per rank."""
    epoch_length: int = 0
    """Samples per rank per epoch in resampled mode (0: derived from the manifest)."""
    max_skip_fraction: float = 0.01
    """Stop with a DataError when more than this fraction of the samples read on a rank were skipped
    (undecodable, duplicate key, cut by a truncated tar); 1.0 never stops. See docs/data.md."""
    skip_check_min_samples: int = 10000
    """Samples a rank (and each reader) must have read before ``max_skip_fraction`` is checked. Bad data
    comes in whole shards: to ride over one bad shard of S samples, use at least S / max_skip_fraction."""
    eval_few_shards: Literal["error", "fewer_workers", "read_all"] = "error"
    """Exact (eval) passes split shards over ranks x workers. With fewer shards: ``error`` (a DataError naming
    the counts and fixes), ``fewer_workers`` (lower the workers per rank, with a warning), ``read_all``
    (every reader reads all shards and keeps every k-th sample: exact, but reads the data k times)."""

    def __post_init__(self) -> None:
        _check(self.source != "shards" or bool(self.shards), "source",
               "is 'shards' but data.shards is empty: set data.shards to the shard URLs, e.g. data.shards=/data/train-{000000..000127}.tar")
        # Setting shards alone used to train on the synthetic set without a word.
        _check(self.source == "shards" or not self.shards, "source",
               f"is {self.source!r} but data.shards is set ({self.shards!r}): add data.source=shards to train on those "
               "shards, or leave data.shards empty for the synthetic set (docs/data.md, 'Training on your own shards')")
        _check(self.synthetic_size > 0, "synthetic_size", f"must be > 0, got {self.synthetic_size}")
        _check(self.synthetic_views >= 0, "synthetic_views", f"must be >= 0, got {self.synthetic_views}")
        _check(self.synthetic_view_cameras in ("sampled", "video"), "synthetic_view_cameras",
               f"must be sampled or video, got {self.synthetic_view_cameras!r}")
        _check(self.resolution in (32, 64, 128, 256), "resolution", f"must be one of 32, 64, 128, 256, got {self.resolution}")
        _check(0.0 <= self.flip_p <= 1.0, "flip_p", f"must be in [0, 1], got {self.flip_p}")
        _check(self.depth_scale > 0, "depth_scale", f"must be > 0, got {self.depth_scale}")
        _check(self.shuffle_buffer >= 0, "shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}")
        _check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        _check(self.epoch_length >= 0, "epoch_length", f"must be >= 0, got {self.epoch_length}")
        _check(0.0 <= self.max_skip_fraction <= 1.0, "max_skip_fraction",
               f"must be in [0, 1] (1 = never stop), got {self.max_skip_fraction}")
        _check(self.skip_check_min_samples >= 1, "skip_check_min_samples",
               f"must be >= 1, got {self.skip_check_min_samples}")
        _check(self.eval_few_shards in ("error", "fewer_workers", "read_all"), "eval_few_shards",
               f"must be error, fewer_workers or read_all, got {self.eval_few_shards!r}")


@dataclass
class ModelConfig:
    """f_trigen: the U-Net that lifts RGB-D to a triplane, and the triplane decoder MLP."""

    in_channels: int = 4
    """RGB in [-1, 1] concatenated with depth."""
    base_width: int = 128
    """Channels of the first U-Net level."""
    channel_mults: tuple[int, ...] = (1, 2, 4, 8)
    """Width multiplier of each U-Net level."""
    num_res_blocks: int = 2
    """ResNet blocks per level."""
    norm_groups: int = 8
    """GroupNorm groups in every ResNet block."""
    attn_heads: int = 4
    """Heads of the linear and full attention layers."""
    attn_head_dim: int = 32
    """Channels per attention head."""
    pos_emb_channels: int = 256
    """Channels of the learned positional embedding concatenated to the input."""
    triplane_channels: int = 64
    """C: feature channels of each of the three planes."""
    decoder_hidden: int = 64
    """Hidden width of the decoder MLP (C -> hidden -> softplus -> 1 + 3)."""
    decoder_lr_mul: float = 1.0
    """EG3D-style learning-rate multiplier of the decoder's fully connected layers."""

    def __post_init__(self) -> None:
        _check(self.in_channels == 4, "in_channels", f"must be 4 (RGB + depth), got {self.in_channels}")
        _check(self.base_width > 0, "base_width", f"must be > 0, got {self.base_width}")
        _check(len(self.channel_mults) >= 1 and all(m > 0 for m in self.channel_mults),
               "channel_mults", f"must be a non-empty list of positive ints, got {list(self.channel_mults)}")
        _check(self.num_res_blocks >= 1, "num_res_blocks", f"must be >= 1, got {self.num_res_blocks}")
        _check(self.norm_groups >= 1 and self.base_width % self.norm_groups == 0, "norm_groups",
               f"must divide model.base_width ({self.base_width}), got {self.norm_groups}")
        _check(self.attn_heads >= 1, "attn_heads", f"must be >= 1, got {self.attn_heads}")
        _check(self.attn_head_dim >= 1, "attn_head_dim", f"must be >= 1, got {self.attn_head_dim}")
        _check(self.pos_emb_channels >= 0, "pos_emb_channels", f"must be >= 0, got {self.pos_emb_channels}")
        _check(self.triplane_channels >= 1, "triplane_channels", f"must be >= 1, got {self.triplane_channels}")
        _check(self.decoder_hidden >= 1, "decoder_hidden", f"must be >= 1, got {self.decoder_hidden}")
        _check(self.decoder_lr_mul > 0, "decoder_lr_mul", f"must be > 0, got {self.decoder_lr_mul}")


@dataclass
class DepthKernelConfig:
    """The depth kernel k(t) = clamp(s1 * exp(-(t - d)^2 / s2), c_min, c_max) (paper S.1, S.8).

    It scales the backward gradients of alpha and colour per sample in canonical views; forward
    values are unchanged. Whether it is used is ``loss.depth_supervision`` (``kernel``).
    """

    s1: float = 1.25
    s2: float = 0.03
    c_min: float = 0.05
    c_max: float = 1.0
    scales: tuple[str, ...] = ("alpha", "colour")
    """Which backward gradients the kernel scales: both (the paper and the reference code), or only ``alpha``
    or only ``colour``: an ablation (docs/science.md measures what each part does to the learned geometry)."""

    def __post_init__(self) -> None:
        _check(len(self.scales) > 0 and len(set(self.scales)) == len(self.scales)
               and set(self.scales) <= {"alpha", "colour"}, "scales",
               f"must name alpha, colour or both, each once; got {list(self.scales)}")
        _check(self.s1 > 0, "s1", f"must be > 0, got {self.s1}")
        _check(self.s2 > 0, "s2", f"must be > 0, got {self.s2}")
        _check(0 <= self.c_min <= self.c_max, "c_min", f"must satisfy 0 <= c_min <= c_max ({self.c_max}), got {self.c_min}")


@dataclass
class RendererConfig:
    """Volume rendering of the triplane (EG3D-style importance renderer, MipNeRF ray marcher)."""

    impl: Literal["fused", "reference"] = "fused"
    """``fused``: the fast path (same numbers); ``reference``: plain autograd, the ground truth."""
    plane_convention: Literal["eg3d", "orthogonal"] = "eg3d"
    """``eg3d``: planes (xy, xz, zx) as in the reference code and its checkpoints; ``orthogonal``: (xy, xz, yz)."""
    box_warp: float = 2.0
    """Side length of the scene box [-1, 1]^3."""
    num_coarse: int = 32
    """Stratified coarse samples per ray."""
    num_fine: int = 32
    """Importance (or depth-prior) fine samples per ray."""
    plane_resolutions: tuple[int, ...] = (128, 64, 32)
    """Multi-resolution triplane levels; the first is the generator's output resolution."""
    depth_prior_p: float = 0.4
    """Probability that, in canonical views, fine samples spread over the pseudo-depth window instead."""
    depth_prior_window: float = 0.05
    """Half-width of the depth-prior window [d - w, d + w]."""
    density_offset: float = -1.0
    """density = softplus(raw + density_offset)."""
    sigma_scale: float = 1.0
    """Multiplies the activated density before compositing (paper S.3 sweep: 1, 5, 10, 50)."""
    deterministic: bool = False
    """No stratified jitter, evenly spaced inverse-CDF, no random depth-prior choice."""
    depth_kernel: DepthKernelConfig = field(default_factory=DepthKernelConfig)

    def __post_init__(self) -> None:
        _check(self.box_warp > 0, "box_warp", f"must be > 0, got {self.box_warp}")
        _check(self.num_coarse >= 2, "num_coarse", f"must be >= 2, got {self.num_coarse}")
        _check(self.num_fine >= 0, "num_fine", f"must be >= 0, got {self.num_fine}")
        _check(len(self.plane_resolutions) >= 1 and all(r > 0 for r in self.plane_resolutions),
               "plane_resolutions", f"must be a non-empty list of positive ints, got {list(self.plane_resolutions)}")
        _check(list(self.plane_resolutions) == sorted(self.plane_resolutions, reverse=True), "plane_resolutions",
               f"must be decreasing, got {list(self.plane_resolutions)}")
        _check(0.0 <= self.depth_prior_p <= 1.0, "depth_prior_p", f"must be in [0, 1], got {self.depth_prior_p}")
        _check(self.depth_prior_window > 0, "depth_prior_window", f"must be > 0, got {self.depth_prior_window}")
        _check(self.sigma_scale > 0, "sigma_scale", f"must be > 0, got {self.sigma_scale}")


@dataclass
class CameraConfig:
    """Pinhole cameras on a sphere looking at the origin (3DGP conventions)."""

    fov_degrees: float = 18.0
    radius: float = 5.0
    canonical_yaw: float = math.pi / 2
    canonical_pitch: float = math.pi / 2
    novel_yaw_den_start: float = 24.0
    """Novel yaw = canonical_yaw + U(-1, 1) * pi / den; den decays linearly from start ..."""
    novel_yaw_den_end: float = 6.0
    """... to end ..."""
    novel_yaw_decay_fraction: float = 1.0 / 3.0
    """... over this fraction of training."""
    novel_pitch_range: float = math.pi / 18
    """Novel pitch = canonical_pitch + U(-1, 1) * novel_pitch_range."""
    video_yaw: float = 0.35
    """Yaw amplitude of the circular video trajectory (paper S.6)."""
    video_pitch: float = 0.15
    """Pitch amplitude of the circular video trajectory."""

    def __post_init__(self) -> None:
        _check(0 < self.fov_degrees < 180, "fov_degrees", f"must be in (0, 180), got {self.fov_degrees}")
        _check(self.radius > 0, "radius", f"must be > 0, got {self.radius}")
        _check(self.novel_yaw_den_start > 0, "novel_yaw_den_start", f"must be > 0, got {self.novel_yaw_den_start}")
        _check(self.novel_yaw_den_end > 0, "novel_yaw_den_end", f"must be > 0, got {self.novel_yaw_den_end}")
        _check(0 < self.novel_yaw_decay_fraction <= 1, "novel_yaw_decay_fraction",
               f"must be in (0, 1], got {self.novel_yaw_decay_fraction}")
        _check(self.novel_pitch_range >= 0, "novel_pitch_range", f"must be >= 0, got {self.novel_pitch_range}")


@dataclass
class WeightSchedule:
    """A loss weight over training: piecewise linear through ``knots`` ``(at, weight)``.

    ``at`` counts optimizer steps (``unit: steps``) or the fraction of ``train.total_steps`` (``unit:
    fraction``). Before the first knot the weight is the first knot's, after the last the last knot's. Two
    knots at the same ``at`` make a jump, taking effect at that point: ``[[0, 0], [0.5, 0], [0.5, 1]]`` with
    ``unit: fraction`` is 0 for ``step < T / 2`` and 1 from ``T / 2`` on. In YAML a bare number is a
    constant weight (``tv: 0.1`` is ``tv: {knots: [[0, 0.1]]}``).
    """

    knots: tuple[tuple[float, float], ...] = ((0.0, 0.0),)
    unit: Literal["steps", "fraction"] = "steps"

    @classmethod
    def from_scalar(cls, weight: float) -> "WeightSchedule":
        return cls(knots=((0.0, float(weight)),))

    def __post_init__(self) -> None:
        _check(len(self.knots) >= 1, "knots", "must hold at least one [at, weight] pair")
        ats = [a for a, _ in self.knots]
        _check(all(a >= 0 for a in ats), "knots", f"positions must be >= 0, got {ats}")
        _check(all(b >= a for a, b in zip(ats, ats[1:])), "knots", f"positions must not decrease, got {ats}")
        _check(self.unit != "fraction" or ats[-1] <= 1.0, "knots",
               f"positions are fractions of train.total_steps (unit: fraction) and must be <= 1, got {ats}")
        _check(all(w >= 0 for _, w in self.knots), "knots", f"weights must be >= 0, got {[w for _, w in self.knots]}")

    def at(self, step: int, total_steps: int) -> float:
        """The weight at optimizer step ``step`` of a run of ``total_steps``."""
        x = step / total_steps if self.unit == "fraction" else float(step)
        last = 0
        for i, (a, _) in enumerate(self.knots):
            if a <= x:
                last = i
        if last == len(self.knots) - 1 or x < self.knots[0][0]:
            return self.knots[last][1]
        (a0, w0), (a1, w1) = self.knots[last], self.knots[last + 1]
        return w0 + (w1 - w0) * (x - a0) / (a1 - a0)  # a1 > x >= a0, so a1 > a0

    @property
    def always_zero(self) -> bool:
        """True when the weight is 0 at every step (the term is never computed)."""
        return all(w == 0 for _, w in self.knots)


ALL_VGG_BLOCKS: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)
DEEPEST_VGG_BLOCKS: tuple[float, ...] = (0.0, 0.0, 0.0, 1.0, 1.0)


@dataclass
class PerceptualSchedule(WeightSchedule):
    """The perceptual (LPIPS-VGG) term: a :class:`WeightSchedule` plus the weight of each VGG block."""

    layers: tuple[float, ...] = ALL_VGG_BLOCKS
    """Weight of each of the five VGG16 blocks (relu1_2 ... relu5_3) in the LPIPS sum."""

    @classmethod
    def from_scalar(cls, weight: float) -> "PerceptualSchedule":
        return cls(knots=((0.0, float(weight)),))

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(len(self.layers) >= 1 and all(w >= 0 for w in self.layers), "layers",
               f"must be non-negative block weights, got {list(self.layers)}")


def _constant(weight: float) -> Any:
    return field(default_factory=lambda: WeightSchedule.from_scalar(weight))


@dataclass
class CanonicalLossConfig:
    """Terms of a canonical-view step (the input camera: the input image and its pseudo-depth are targets)."""

    l1: WeightSchedule = _constant(1.0)
    """Reconstruction L1, canonical RGB vs input."""
    depth: WeightSchedule = _constant(2.0)
    """The geometry term: L1 of the rendered depth vs the pseudo-depth, or the KL term (``loss.depth_supervision``)."""
    perceptual: PerceptualSchedule = field(default_factory=lambda: PerceptualSchedule(((0.0, 0.5),)))
    """LPIPS-VGG, render vs input."""
    clip: WeightSchedule = _constant(0.0)
    """CLIP embedding L1, render vs input (the reference code: 0.175 from T / 2 on)."""
    weight_sum: WeightSchedule = _constant(0.0)
    """Opacity term ``mean(1 - sum w)`` (the reference code: ramped 0 -> 1 over T / 2)."""


@dataclass
class NovelLossConfig:
    """Terms of a novel-view step (a camera from the novel-view schedule: no pixel targets)."""

    clip: WeightSchedule = field(default_factory=lambda: WeightSchedule(((0.0, 0.02), (100_000.0, 0.35))))
    """CLIP embedding L1, novel render vs input (paper: 0.02 -> 0.35 over 100k steps)."""
    tv: WeightSchedule = _constant(0.1)
    """Total variation of the novel-view depth map."""
    perceptual: PerceptualSchedule = field(
        default_factory=lambda: PerceptualSchedule(((0.0, 0.5),), layers=DEEPEST_VGG_BLOCKS))
    """LPIPS-VGG, novel render vs input, on the deepest blocks (docs/training.md says why)."""
    weight_sum: WeightSchedule = _constant(0.0)
    """Opacity term ``mean(1 - sum w)``."""


@dataclass
class SyntheticCriticsConfig:
    """``loss.critics: synthetic``: the tiny critics trained once on procedural primitives and cached
    (:mod:`g3dr.losses.synthetic_critics`; docs/training.md). For small-scale studies, never for real runs."""

    dir: str = "outputs/critics-cache"
    """Cache folder of the trained critics: one file per training recipe, named by a hash of the recipe; a file
    lock there lets one process (rank) train while the others wait and load."""
    seed: int = 0
    """Seed of the critics' primitives, cameras, initial weights and batch order (primitives come from their own
    seed stream, disjoint from every dataset's; docs/training.md)."""
    primitives: int = 512
    """Primitives rendered for training (each from ``views`` cameras)."""
    views: int = 4
    """Cameras per primitive, drawn as training's novel views at the end of the yaw schedule."""
    steps: int = 300
    """Adam steps of the contrastive training (each tower)."""
    batch_size: int = 64
    """Primitives per contrastive batch (two views each; the other primitives are the negatives)."""

    def __post_init__(self) -> None:
        _check(bool(self.dir), "dir", "must not be empty")
        _check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        _check(self.primitives >= 2, "primitives",
               f"must be >= 2 (other primitives are the negatives), got {self.primitives}")
        _check(self.views >= 2, "views", f"must be >= 2 (two views of a primitive make a positive pair), got {self.views}")
        _check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        _check(2 <= self.batch_size <= self.primitives, "batch_size",
               f"must be in [2, primitives = {self.primitives}], got {self.batch_size}")


@dataclass
class LossConfig:
    """The G3DR objective (paper S.1, S.2): view choice, per-view weighted terms, geometry supervision, critics."""

    tau: float = 0.4
    """View choice (Eq. 1): canonical if r > min(tau, 2 * step / total_steps), r ~ U(0, 1)."""
    depth_supervision: Literal["kernel", "accumulated", "kl"] = "kernel"
    """Geometry supervision of canonical views (paper Table S1): ``kernel``: L1 of the accumulated depth with
    the depth kernel scaling the renderer's gradients (G3DR); ``accumulated``: the same L1 without the kernel;
    ``kl``: DS-NeRF's KL term between the ray's weights and a Gaussian at the pseudo-depth (no kernel, no L1)."""
    kl_sigma: float = 0.12247448713915891
    """Standard deviation of the ``kl`` target around the pseudo-depth; default sqrt(0.03 / 2), the width of
    the depth kernel's Gaussian exp(-(t - d)^2 / s2) with s2 = 0.03."""
    canonical: CanonicalLossConfig = field(default_factory=CanonicalLossConfig)
    novel: NovelLossConfig = field(default_factory=NovelLossConfig)
    clip_model: str = "ViT-B-16-quickgelu"
    """open_clip architecture of the CLIP critic (OpenAI weights need the QuickGELU form)."""
    clip_weights: str = "weights/clip/ViT-B-16.pt"
    """Local file of the CLIP critic's weights (OpenAI ViT-B/16): OpenAI's original release, whose sha256 is
    published (``g3dr weights fetch clip-vit-b-16-openai``), or open_clip's state dict of the same weights."""
    clip_resolution: int = 224
    """Renders are resized to this size before the CLIP critic."""
    vgg_model: str = "vgg16"
    """timm architecture of the perceptual critic."""
    vgg_weights: str = "weights/vgg/vgg16-397923af.pth"
    """Local file of the VGG16 ImageNet weights: torchvision's file, whose name carries its sha256 prefix
    (``g3dr weights fetch vgg16-torchvision``), or timm's safetensors copy of it."""
    perceptual_weights: Literal["lpips", "uniform"] = "lpips"
    """Per-channel weights of the perceptual distance (LPIPS on ``vgg_model``): ``lpips`` = LPIPS v0.1's learned
    linear weights, the reference's ``lpips.LPIPS(net='vgg')`` (the file the ``lpips`` wheel ships, sha256-checked;
    needs ``vgg_model=vgg16``); ``uniform`` = unit weights (channels summed unweighted). The tiny VGG of
    ``critics=random`` has other channel counts and always takes unit weights."""
    critics: Literal["pretrained", "random", "synthetic"] = "pretrained"
    """``pretrained`` loads the weight files (real runs); ``random`` builds random-weight critics (tests, demo);
    ``synthetic`` trains tiny critics once on procedural primitives and caches them (small-scale studies; see
    ``synthetic_critics``)."""
    synthetic_critics: SyntheticCriticsConfig = field(default_factory=SyntheticCriticsConfig)
    """Training recipe and cache of ``critics: synthetic`` (ignored otherwise)."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.tau <= 1.0, "tau", f"must be in [0, 1], got {self.tau}")
        _check(self.kl_sigma > 0, "kl_sigma", f"must be > 0, got {self.kl_sigma}")
        _check(self.clip_resolution > 0, "clip_resolution", f"must be > 0, got {self.clip_resolution}")
        _check(self.perceptual_weights != "lpips" or self.vgg_model == "vgg16", "perceptual_weights",
               f"lpips needs vgg_model=vgg16 (LPIPS learned its weights on VGG16's features), got "
               f"vgg_model={self.vgg_model!r}; set perceptual_weights=uniform for another VGG")
        _check(self.critics != "synthetic" or self.clip_resolution % 4 == 0, "clip_resolution",
               f"must be divisible by 4 with critics=synthetic (its tiny ViT cuts the image into 4 x 4 patches), "
               f"got {self.clip_resolution}")


@dataclass
class TrainConfig:
    """Optimisation: batch, Adam, the warmup + cosine schedule, precision, checkpoints."""

    total_steps: int = 300_000
    """Optimizer steps of the whole run (reference ``train_num_steps``)."""
    micro_batch_size: int = 8
    """Samples per rank per forward pass."""
    global_batch_size: int = 48
    """Samples per optimizer step over all ranks; must equal micro x ranks x accumulation. The paper gives
    none; the reference code runs 8 per process on 6 processes (``NUM_GPU = 6``): 48."""
    lr: float = 1e-4
    """Peak learning rate after warmup (paper; the reference script uses 5e-5)."""
    lr_start: float = 2e-6
    """Learning rate at step 0, warmed up linearly to ``lr``."""
    lr_min: float = 0.0
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 20_000
    """``warmup_cosine``: steps of the linear warmup; ``one_cycle``: steps of the rising (cosine) phase."""
    lr_schedule: Literal["warmup_cosine", "one_cycle"] = "warmup_cosine"
    """``warmup_cosine`` (paper): linear ``lr_start -> lr`` over ``warmup_steps``, cosine to ``lr_min`` at
    ``total_steps``. ``one_cycle`` (the reference code's ``OneCycleLR``, cosine annealing): cosine
    ``lr_start -> lr`` over ``warmup_steps``, cosine ``lr -> lr_min`` at ``total_steps``."""
    beta1_cycle: tuple[float, ...] = ()
    """``[max, base]``: with ``one_cycle``, Adam's beta1 follows the LR inversely, ``max -> base`` while the LR
    rises and ``base -> max`` while it falls (``OneCycleLR``'s ``cycle_momentum``; reference [0.95, 0.85]).
    Empty: beta1 stays ``betas[0]``."""
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    """Gradient-norm clipping (0 disables it). Neither the paper nor the reference code clips."""
    precision: Literal["fp32", "bf16"] = "bf16"
    zero_stage: Literal[0, 1, 2] = 2
    """DeepSpeed ZeRO stage."""
    seed: int = 420
    """One seed for the whole run; per-rank and per-worker seeds are derived from it."""
    checkpoint_every: int = 5000
    """Save a checkpoint every N optimizer steps (and at the end)."""
    keep_last: int = 3
    """Keep the newest K checkpoints."""
    export_initial: bool = False
    """On a fresh start, write the weights before the first step as ``<run_dir>/exports/step-0.safetensors``:
    the baseline a ``g3dr eval --sweep`` of the run scores beside the trained checkpoints (``make demo``)."""
    log_every: int = 50
    """Log losses every N optimizer steps."""
    image_every: int = 5000
    """Log an image grid (input, renders, depths) to MLflow every N optimizer steps (0: never)."""
    max_nonfinite_in_row: int = 20
    """A non-finite loss skips its micro-batch on every rank; this many in a row stops the run with a checkpoint."""

    def __post_init__(self) -> None:
        _check(self.total_steps >= 1, "total_steps", f"must be >= 1, got {self.total_steps}")
        _check(self.micro_batch_size >= 1, "micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        _check(self.global_batch_size >= self.micro_batch_size, "global_batch_size",
               f"must be >= train.micro_batch_size ({self.micro_batch_size}), got {self.global_batch_size}")
        _check(self.global_batch_size % self.micro_batch_size == 0, "global_batch_size",
               f"must be a multiple of train.micro_batch_size ({self.micro_batch_size}), got {self.global_batch_size}")
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.lr_start <= self.lr, "lr_start", f"must be in [0, train.lr={self.lr}], got {self.lr_start}")
        _check(0 <= self.lr_min <= self.lr, "lr_min", f"must be in [0, train.lr={self.lr}], got {self.lr_min}")
        _check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.lr_schedule != "one_cycle" or 1 <= self.warmup_steps < self.total_steps, "warmup_steps",
               f"must be in [1, train.total_steps) with lr_schedule one_cycle, got {self.warmup_steps}")
        _check(len(self.beta1_cycle) in (0, 2) and all(0 <= b < 1 for b in self.beta1_cycle), "beta1_cycle",
               f"must be empty or [max, base] in [0, 1), got {list(self.beta1_cycle)}")
        _check(not self.beta1_cycle or self.lr_schedule == "one_cycle", "beta1_cycle",
               "cycles beta1 with the one-cycle LR only: set train.lr_schedule=one_cycle or beta1_cycle=[]")
        _check(all(0 <= b < 1 for b in self.betas), "betas", f"must be two values in [0, 1), got {list(self.betas)}")
        _check(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")
        _check(self.checkpoint_every >= 1, "checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")
        _check(self.keep_last >= 1, "keep_last", f"must be >= 1, got {self.keep_last}")
        _check(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        _check(self.image_every >= 0, "image_every", f"must be >= 0, got {self.image_every}")
        _check(self.max_nonfinite_in_row >= 1, "max_nonfinite_in_row", f"must be >= 1, got {self.max_nonfinite_in_row}")

    def grad_accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step for ``world_size`` ranks; a clear error if they do not divide."""
        per_step = self.micro_batch_size * world_size
        if world_size < 1 or self.global_batch_size % per_step != 0:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by "
                f"train.micro_batch_size={self.micro_batch_size} x world size {world_size} = {per_step}; "
                f"change one of them (e.g. train.global_batch_size={per_step * max(1, self.global_batch_size // per_step)})"
            )
        return self.global_batch_size // per_step


@dataclass
class DistributedConfig:
    """Process group settings; rank and world size come from the environment (torchrun, DeepSpeed, SLURM)."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """``auto``: NCCL on CUDA, gloo on CPU."""
    timeout_minutes: int = 30
    """Collective timeout; a hung rank fails the job after this long instead of waiting forever."""

    def __post_init__(self) -> None:
        _check(self.timeout_minutes >= 1, "timeout_minutes", f"must be >= 1, got {self.timeout_minutes}")


@dataclass
class LoggingConfig:
    """Console logging and MLflow tracking."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Console level of ``g3dr train`` on rank 0 (other ranks: warnings). ``g3dr --log-level`` and
    ``$G3DR_LOG_LEVEL`` override it; a level given to ``g3dr submit`` reaches the job's tasks."""
    mlflow_uri: str = ""
    """MLflow tracking URI (``sqlite:///path.db`` or an ``http://`` server); empty: ``$MLFLOW_TRACKING_URI``,
    else a sqlite store ``<run_dir>/mlflow.db`` with artifacts in ``<run_dir>/mlartifacts``. MLflow 3 refuses
    ``file:`` stores."""
    experiment: str = ""
    """MLflow experiment; empty: ``$MLFLOW_EXPERIMENT_NAME``, else ``g3dr``."""
    run_name: str = ""
    """MLflow run name; empty: derived from the run directory."""


@dataclass
class EvalConfig:
    """Evaluation protocol (paper S.5)."""

    metrics: tuple[Literal["fid", "is", "nfs", "da", "gt_views"], ...] = ("fid", "is", "nfs", "da", "gt_views")
    """``gt_views``: PSNR, DA and the rendering weight in front of / at the surface against the ground-truth views
    a synthetic set stores (``psnr_canonical``, ``psnr_novel``, ``da_novel``, ``psnr_novel_flat``,
    ``weight_front_novel``, ``weight_surface_novel``). ``g3dr eval`` leaves it out, with a log line, when the data
    stores no views, unless the selection was given on its command line (``--metrics`` or ``eval.metrics=``):
    then it is an error."""
    sigma_scales: tuple[float, ...] = (1.0, 5.0, 10.0, 50.0)
    num_samples: int = 256
    """Generated samples per metric and scale (NFS uses N = 256 in the paper)."""
    views: tuple[Literal["canonical", "novel"], ...] = ("canonical", "novel")
    nfs_bins: int = 64
    is_splits: int = 10
    batch_size: int = 16
    inception_weights: str = "weights/inception/inception-2015-12-05.pt"
    """Local file of the Inception-v3 (2015-12-05) network used by FID and IS."""
    novel_camera: Literal["sampled", "video"] = "sampled"
    """Novel views: ``sampled`` as at the end of training (yaw range pi / novel_yaw_den_end), or ``video``:
    sample i takes point i of the circular video trajectory through all ``num_samples`` points."""
    nfs_near: float = 4.0
    """NFS clamps depths to [nfs_near, nfs_far] before its histograms: the ray-box bounds of the canonical
    central ray (camera.radius -/+ box_warp / 2), which is also the release pseudo-depth range."""
    nfs_far: float = 6.0
    """See ``nfs_near``."""
    nfs_depth: Literal["3dgp", "median"] = "3dgp"
    """Depth maps NFS scores (and the eval's depth grids show): ``3dgp`` as 3DGP renders them, a separate
    canonical render with the density cut ``nfs_cut_quantile`` in every marcher call and depth
    ``sum(w t)`` not divided by ``sum(w)``; ``median`` the depth where the accumulated weight of the
    ordinary render reaches 0.5 (this project's NFS before eval protocol 3)."""
    nfs_cut_quantile: float = 0.5
    """``nfs_depth=3dgp`` only: densities below this quantile of each image's densities are set to 0 before
    alpha (3DGP: 0.5, over a rendering chunk; here per image, so independent of the batch size). 0: no cut."""
    num_real: int = 0
    """Dataset images behind the FID reference statistics (0: the whole eval dataset)."""
    stats_cache: str = "outputs/eval-cache"
    """Directory of cached dataset Inception statistics (keyed by dataset content hash)."""
    deterministic_render: bool = True
    """Render without stratified jitter or random fine samples, so scores do not depend on batching or ranks."""
    seed: int = 0
    """Seed of the per-sample novel-view cameras (sample i always gets the same camera)."""
    grid_samples: int = 8
    """Samples shown in the render and depth grids logged as artifacts (0: none)."""
    fid_samples: int = 50_000
    """Samples behind FID and IS (0: ``num_samples``): 50k as EG3D's ``fid50k_full`` and ``is50k``. NFS and
    DA always use the first ``num_samples`` samples."""
    render_resolution: int = 0
    """Resolution of the eval renders and of the FID reference images (0: data.resolution). The paper
    reports ImageNet metrics at 256; the triplane is still built from the input at data.resolution.
    With super-resolution (``sr.checkpoint`` / ``g3dr eval --sr``) it must be 0 or data.resolution: the renders
    stay at data.resolution and FID/IS score the SR output (data.resolution x the network's scale), against
    reference statistics of the data's images at that size; a ``g3dr eval`` given both is a ConfigError."""

    def __post_init__(self) -> None:
        _check(len(self.metrics) >= 1, "metrics", "must name at least one metric")
        _check(self.nfs_far > self.nfs_near, "nfs_far", f"must be > eval.nfs_near ({self.nfs_near}), got {self.nfs_far}")
        _check(0.0 <= self.nfs_cut_quantile < 1.0, "nfs_cut_quantile",
               f"must be in [0, 1), got {self.nfs_cut_quantile}")
        _check(self.num_real >= 0, "num_real", f"must be >= 0, got {self.num_real}")
        _check(self.grid_samples >= 0, "grid_samples", f"must be >= 0, got {self.grid_samples}")
        _check(self.render_resolution >= 0, "render_resolution", f"must be >= 0, got {self.render_resolution}")
        _check(self.fid_samples >= 0, "fid_samples", f"must be >= 0, got {self.fid_samples}")
        _check(len(self.sigma_scales) >= 1 and all(s > 0 for s in self.sigma_scales), "sigma_scales",
               f"must be a non-empty list of positive numbers, got {list(self.sigma_scales)}")
        _check(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        _check(len(self.views) >= 1, "views", "must name at least one view")
        _check(self.nfs_bins >= 2, "nfs_bins", f"must be >= 2, got {self.nfs_bins}")
        _check(self.is_splits >= 1, "is_splits", f"must be >= 1, got {self.is_splits}")
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.is_splits <= (self.fid_samples or self.num_samples) or "is" not in self.metrics, "is_splits",
               f"must be <= the IS sample count ({self.fid_samples or self.num_samples}), got {self.is_splits}")


@dataclass
class SRLossConfig:
    """The objective of ``g3dr train-sr`` (docs/training.md, "Super-resolution"): the SR output of f_trigen's
    canonical render vs the input image at ``sr.scale x data.resolution``. Novel views get no term."""

    l1: WeightSchedule = _constant(1.0)
    """L1 of the SR output vs the input image at the higher resolution (the reconstruction term, weight 1)."""
    perceptual: PerceptualSchedule = field(default_factory=lambda: PerceptualSchedule(((0.0, 0.5),)))
    """LPIPS-VGG of the SR output vs the same image: the paper's second VGG term ("super-resolution output",
    weight 0.5), on all VGG blocks as the canonical perceptual term."""


@dataclass
class SRConfig:
    """The super-resolution stage on the rendered RGB (paper S.6; an RCAN, ``g3dr/models/sr.py``, docs/models.md).

    The architecture fields describe a network trained from scratch; a weights file carries its own
    architecture, which wins when it is loaded.
    """

    checkpoint: str = ""
    """Super-resolution weights (``.safetensors`` from ``g3dr import-official --sr`` or ``g3dr train-sr``, or an
    RCAN ``.pth``). Empty: no super-resolution; renders, batches and videos stay at the geometry's resolution."""
    scale: int = 2
    """Upscaling factor (128 -> 256 px: 2). RCAN's upsampler supports 2, 3, 4 and 8."""
    n_resgroups: int = 10
    """Residual groups (RCAN: 10)."""
    n_resblocks: int = 20
    """Residual channel-attention blocks per group (RCAN: 20)."""
    n_feats: int = 64
    """Feature channels (RCAN: 64)."""
    reduction: int = 16
    """Channel-attention squeeze ratio: the attention bottleneck has ``n_feats // reduction`` channels (RCAN: 16)."""
    generator: str = ""
    """``g3dr train-sr`` only: the frozen f_trigen (``.safetensors``) whose canonical renders at ``data.resolution``
    are the network's inputs; its stored config decides how it renders. Its ``data.resolution`` must equal ours."""
    loss: SRLossConfig = field(default_factory=SRLossConfig)
    """``g3dr train-sr`` only: the weights of its loss terms."""

    def __post_init__(self) -> None:
        _check(self.scale in (2, 3, 4, 8), "scale", f"must be one of 2, 3, 4, 8 (RCAN's upsampler), got {self.scale}")
        _check(self.n_resgroups >= 1, "n_resgroups", f"must be >= 1, got {self.n_resgroups}")
        _check(self.n_resblocks >= 1, "n_resblocks", f"must be >= 1, got {self.n_resblocks}")
        _check(self.n_feats >= 1, "n_feats", f"must be >= 1, got {self.n_feats}")
        _check(1 <= self.reduction <= self.n_feats and self.n_feats % self.reduction == 0, "reduction",
               f"must divide sr.n_feats ({self.n_feats}), got {self.reduction}")


@dataclass
class Config:
    """The whole run. Sections are validated on their own, then together here."""

    run_dir: str = "outputs/run"
    """Where checkpoints, logs and the resolved ``config.yaml`` of this run go."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    renderer: RendererConfig = field(default_factory=RendererConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sr: SRConfig = field(default_factory=SRConfig)
    weights_lock: str = ""
    """Lock file pinning the sha256 of the weight files (``g3dr weights verify --write-lock FILE``); every job
    checks the files it needs against it before starting. Empty: the built-in registry's hashes only."""

    def __post_init__(self) -> None:
        _check(bool(self.run_dir), "run_dir", "must not be empty")
        levels = len(self.renderer.plane_resolutions)
        down = 2 ** (len(self.model.channel_mults) - 1)
        _check(self.data.resolution % down == 0, "data.resolution",
               f"must be divisible by 2^(len(model.channel_mults) - 1) = {down}, got {self.data.resolution}")
        _check(self.renderer.plane_resolutions[0] == self.data.resolution, "renderer.plane_resolutions",
               f"the first level must equal data.resolution ({self.data.resolution}), the generator's output size; "
               f"got {list(self.renderer.plane_resolutions)} ({levels} levels)")


# --------------------------------------------------------------------------------------------------
# Loading, overriding, saving
# --------------------------------------------------------------------------------------------------


def _origin(origins: dict[str, str], key: str, default: str) -> str:
    """Where the value at dotted ``key`` came from: the longest matching prefix that was set."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in origins:
            return origins[prefix]
    return default


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        inner = _type_name(args[0]) if args else "any"
        return f"list of {inner}" if len(args) < 2 or args[1] is Ellipsis else f"list of {len(args)} values"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; returns it converted (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    wrong = _FieldError(key, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or type(value) is bool and not any(c is value for c in choices):
            raise _FieldError(key, f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise wrong
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _FieldError(key, f"expected {len(args)} values, got {len(value)}: {list(value)!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except _FieldError:
                continue
        raise wrong
    if tp is type(None):
        if value is not None:
            raise wrong
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        if not math.isfinite(value):
            raise _FieldError(key, f"must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise wrong
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")


def _build(cls: type, data: Any, prefix: str, origins: dict[str, str], default_origin: str) -> Any:
    """Build dataclass ``cls`` from a mapping, strictly, naming dotted keys and origins in errors."""
    where = prefix[:-1] if prefix else "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{_origin(origins, prefix[:-1], default_origin)}: {where}: expected a mapping, "
                          f"got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        key = prefix + str(unknown[0])
        moved = f"; {MOVED_KEYS[key]}" if key in MOVED_KEYS else ""
        raise ConfigError(f"{_origin(origins, key, default_origin)}: unknown key '{key}'"
                          f" (valid keys in {where}: {', '.join(sorted(names))}){moved}")
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if hasattr(tp, "from_scalar") and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = {"knots": [[0.0, value]]}  # a bare number: a constant schedule
            kwargs[name] = _build(tp, value, key + ".", origins, default_origin)
            continue
        try:
            kwargs[name] = _coerce(value, tp, key)
        except _FieldError as err:
            raise ConfigError(f"{_origin(origins, key, default_origin)}: {err.key}: {err}") from None
    try:
        return cls(**kwargs)
    except _FieldError as err:
        key = prefix + err.key
        raise ConfigError(f"{_origin(origins, key, default_origin)}: {key}: {err}") from None


_PER_VIEW = "loss weights are schedules per view now: loss.canonical.* and loss.novel.* (docs/training.md)"
MOVED_KEYS: dict[str, str] = {
    "loss.l1": f"now loss.canonical.l1; {_PER_VIEW}",
    "loss.depth": f"now loss.canonical.depth; {_PER_VIEW}",
    "loss.perceptual": f"now loss.canonical.perceptual; {_PER_VIEW}",
    "loss.perceptual_second": f"now loss.novel.perceptual; {_PER_VIEW}",
    "loss.clip": f"now loss.novel.clip (a ramp: knots [[0, start], [steps, end]]); {_PER_VIEW}",
    "loss.clip_start": f"now the first knot of loss.novel.clip; {_PER_VIEW}",
    "loss.clip_ramp_steps": f"now the second knot of loss.novel.clip; {_PER_VIEW}",
    "loss.tv": f"now loss.novel.tv; {_PER_VIEW}",
    "loss.weight_sum": f"now loss.canonical.weight_sum and loss.novel.weight_sum; {_PER_VIEW}",
    "loss.weight_sum_ramp_fraction": f"now the knots of loss.*.weight_sum (unit: fraction); {_PER_VIEW}",
    "renderer.depth_kernel.enabled": "the depth kernel is chosen by loss.depth_supervision "
                                     "(kernel | accumulated | kl) now",
}
"""Keys of earlier versions: an unknown-key error names where the setting went."""


def _flatten_keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in data.items():
        keys.append(prefix + str(k))
        if isinstance(v, dict):
            keys.extend(_flatten_keys(v, prefix + str(k) + "."))
    return keys


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b.c=value`` and parse the value as YAML (``1e-4`` -> float, ``[1, 2]`` -> list)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': expected dotted.key=value, e.g. train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': value is not valid YAML ({err.problem})") from None
    # YAML 1.1 reads 1e-4 (no dot) as a string; accept the float spelling users expect.
    if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        value = float(value)
    return key, value


def _set_dotted(data: dict, key: str, value: Any, text: str) -> list[str]:
    """Set ``key`` in the nested ``data``; returns the dotted keys of sections it had to create."""
    node, created = data, []
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part not in node:
            node[part] = {}
            created.append(".".join(parts[: i + 1]))
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"override '{text}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value
    return created


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (presets live in configs/, e.g. configs/tiny.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def config_from_dict(data: dict, overrides: list[str] | tuple[str, ...] = (), source: str = "<dict>") -> Config:
    """Build and validate a :class:`Config` from a nested mapping plus dotted overrides."""
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy through plain types
    origins = {key: source for key in _flatten_keys(data)}
    for text in overrides:
        key, value = parse_override(text)
        created = _set_dotted(data, key, value, text)
        for stale in [k for k in origins if k.startswith(key + ".")]:  # the override replaced what was below
            del origins[stale]
        nested = _flatten_keys(value, key + ".") if isinstance(value, dict) else []
        for k in [*created, key, *nested]:
            origins[k] = f"override '{text}'"
    return _build(Config, data, "", origins, source)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML preset (or the built-in defaults when ``path`` is None) and apply dotted overrides."""
    if path is None:
        return config_from_dict({}, overrides, source="defaults")
    path = Path(path)
    return config_from_dict(_read_yaml(path), overrides, source=str(path))


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (tuples as lists), as written to YAML and MLflow params."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def flatten_config(cfg: Config) -> dict[str, Any]:
    """Dotted-key view of the config (``train.lr`` -> 1e-4), e.g. for MLflow params."""
    out: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v

    walk(config_to_dict(cfg), "")
    return out


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text; :func:`load_config` reads it back to an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: Config, directory: str | Path) -> Path:
    """Write the resolved config to ``directory/config.yaml`` (atomically) and return the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CONFIG_FILENAME
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(dump_config(cfg))
    tmp.replace(path)
    return path
