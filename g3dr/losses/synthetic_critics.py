"""``loss.critics: synthetic``: the tiny CLIP and VGG critics, trained once on procedural primitives and cached.

No pretrained weights can be downloaded here, and the random-weight critics of ``loss.critics: random`` inject
noise that swamps learning at small scale. These critics have the same tiny architectures (the open_clip model
``loss.clip_model`` with :data:`~g3dr.losses.critics.TINY_CLIP_OVERRIDES`, its image size set to
``loss.clip_resolution``; the timm VGG with :data:`~g3dr.losses.critics.TINY_VGG_LAYERS`) but are trained, so
their embeddings and distances carry information about the scenes G3DR sees at small scale: which primitive,
its shape, colours and texture, from any training camera. They know primitives, not ImageNet: never for real
runs.

Training (:func:`train_synthetic_critics`, seeded, CPU, about 25 s on one core with the defaults):

- data: ``primitives`` primitives of :func:`g3dr.data.synth.random_primitive`, each rendered by
  :func:`~g3dr.data.synth.render_primitive` at the data resolution from ``views`` cameras drawn as training's
  novel views at the end of the yaw schedule (yaw ``pi/2 + U(-1, 1) pi / novel_yaw_den_end`` = +-pi/6, pitch
  ``pi/2 + U(-1, 1) pi/18``, the :class:`~g3dr.config.CameraConfig` defaults), each view in front of its own
  random back wall, so the wall is a nuisance and never identifies the primitive;
- seeds: primitive ``i`` of critic seed ``s`` comes from ``np.random.default_rng((CRITIC_DATA_TAG, s, i,
  CRITIC_DATA_TAG))``. A dataset sample is ``default_rng((seed, index))`` (:func:`g3dr.data.synth.synth_sample`),
  which numpy pads with zero words; the critics' fourth word is never zero, so no critic primitive is a dataset
  primitive for any dataset seed and index below 2**32. Held-out primitives for tests and numbers are the
  indices from ``primitives`` on;
- objective: InfoNCE (symmetric cross-entropy, temperature :data:`TEMPERATURE`) across views: two views of a
  primitive are the positive pair, the other primitives of the batch the negatives. The CLIP tower is trained on
  its normalised image embedding (``ClipCritic``'s resize and CLIP normalisation included); the VGG trunk through
  ``VggCritic.layer_features`` (LPIPS scaling included) with a head used only for training: every tapped block's
  features averaged over space, concatenated, a linear projection to :data:`PROJECTION_DIM`. Adam, lr
  :data:`LEARNING_RATE`; the text tower is never trained (unused by the critic).

Cache (:func:`load_or_train_synthetic_critics`): ``<loss.synthetic_critics.dir>/synthetic-critics-<hash>.pt``,
the hash over everything that determines the weights (:meth:`SyntheticCriticSpec.identity`: architectures,
resolutions, seed, data size, steps, batch, optimiser constants, :data:`CODE_VERSION`). Written to a temporary
file and renamed (atomic); an ``fcntl`` lock beside it lets exactly one process train while the others (ranks of
torchrun, parallel tests) wait and then load. Training twice with the same hash and the same torch thread
setting gives identical weights (the thread count and the torch build may change the last bits).
Building neither reads nor advances the global torch RNG (a forked RNG), so a run's randomness does not depend on
whether the cache was warm.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from g3dr.config import CameraConfig, LossConfig
from g3dr.errors import WeightsError
from g3dr.log import get_logger
from g3dr.losses.critics import (TINY_CLIP_OVERRIDES, TINY_VGG_LAYERS, ClipCritic, VggCritic, build_clip_model,
                                 build_vgg_features)

log = get_logger("g3dr.losses")

CODE_VERSION = 1
"""Bump when the training code changes what it learns: every cached file then retrains."""
CRITIC_DATA_TAG = 0x63726974  # "crit"
"""First and last word of the critics' primitive seeds (module docstring: disjoint from every dataset's)."""
TEMPERATURE = 0.1
"""InfoNCE temperature on cosine similarities."""
LEARNING_RATE = 2e-3
PROJECTION_DIM = 32
"""Output size of the VGG trunk's training-only projection head."""
FILE_FORMAT = "g3dr-synthetic-critics"


@dataclass(frozen=True)
class SyntheticCriticSpec:
    """Everything that determines the synthetic critics' weights (with the module constants)."""

    clip_model: str
    clip_resolution: int
    image_resolution: int
    seed: int
    primitives: int
    views: int
    steps: int
    batch_size: int

    @classmethod
    def from_config(cls, loss_cfg: LossConfig, image_resolution: int | None = None) -> "SyntheticCriticSpec":
        """The spec of ``loss_cfg``; primitives are rendered at ``image_resolution`` (the data resolution, what the
        critics see in training), by default ``loss.clip_resolution``."""
        s = loss_cfg.synthetic_critics
        return cls(clip_model=loss_cfg.clip_model, clip_resolution=loss_cfg.clip_resolution,
                   image_resolution=int(image_resolution or loss_cfg.clip_resolution), seed=s.seed,
                   primitives=s.primitives, views=s.views, steps=s.steps, batch_size=s.batch_size)

    @property
    def clip_overrides(self) -> dict[str, Any]:
        """:data:`TINY_CLIP_OVERRIDES` with the ViT's image size at ``clip_resolution`` (4 x 4 patches, as the
        tiny ViT has at 32 px)."""
        vision = dict(TINY_CLIP_OVERRIDES["vision_cfg"], image_size=self.clip_resolution,
                      patch_size=self.clip_resolution // 4)
        return {**TINY_CLIP_OVERRIDES, "vision_cfg": vision}

    def identity(self) -> dict[str, Any]:
        """The JSON-able record hashed into the cache file name and stored in the file."""
        cam = CameraConfig()
        return {"format": FILE_FORMAT, "code_version": CODE_VERSION, **asdict(self),
                "clip_overrides": self.clip_overrides, "vgg_layers": list(TINY_VGG_LAYERS),
                "temperature": TEMPERATURE, "lr": LEARNING_RATE, "projection_dim": PROJECTION_DIM,
                "camera": {"fov_degrees": cam.fov_degrees, "radius": cam.radius,
                           "yaw_range": math.pi / cam.novel_yaw_den_end, "pitch_range": cam.novel_pitch_range}}

    def key(self) -> str:
        text = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def file_name(self) -> str:
        return f"synthetic-critics-{self.key()}.pt"


def critic_primitive_rng(seed: int, index: int) -> np.random.Generator:
    """The RNG of the critics' primitive ``index`` of seed ``seed`` (module docstring: disjoint from the datasets)."""
    return np.random.default_rng((CRITIC_DATA_TAG, seed, index, CRITIC_DATA_TAG))


def render_critic_views(seed: int, indices: range | list[int], views: int, resolution: int) -> torch.Tensor:
    """Views of the critics' primitives ``indices``: (N, views, 3, R, R) float32 in [-1, 1].

    Per primitive, from its own RNG: the primitive, then per view a camera (yaw, pitch as training's novel views at
    the end of the yaw schedule) and a back-wall seed.
    """
    from g3dr.data.synth import SynthCamera, random_primitive, render_primitive, synth_pose_from_renderer
    from g3dr.render.cameras import camera_to_world_from_angles

    cam = CameraConfig()
    synth_camera = SynthCamera(fov_degrees=cam.fov_degrees, radius=cam.radius)
    f64 = torch.float64
    canonical = camera_to_world_from_angles(torch.tensor([cam.canonical_yaw], dtype=f64),
                                            torch.tensor([cam.canonical_pitch], dtype=f64), cam.radius)[0].numpy()
    out = np.empty((len(indices), views, resolution, resolution, 3), dtype=np.uint8)
    for n, index in enumerate(indices):
        rng = critic_primitive_rng(seed, index)
        prim = random_primitive(rng)
        yaw = cam.canonical_yaw + rng.uniform(-1.0, 1.0, views) * math.pi / cam.novel_yaw_den_end
        pitch = cam.canonical_pitch + rng.uniform(-1.0, 1.0, views) * cam.novel_pitch_range
        walls = rng.integers(2**31, size=views)
        cam2world = camera_to_world_from_angles(torch.tensor(yaw, dtype=f64), torch.tensor(pitch, dtype=f64),
                                                cam.radius).numpy()
        for v in range(views):
            out[n, v], _ = render_primitive(prim, resolution, synth_camera, wall_seed=int(walls[v]),
                                            pose=synth_pose_from_renderer(cam2world[v], canonical))
    return torch.from_numpy(out).permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0


def build_synthetic_architectures(spec: SyntheticCriticSpec) -> tuple[nn.Module, nn.Sequential]:
    """The untrained CLIP model and VGG features of ``spec`` (initialised from the global torch RNG)."""
    root = logging.getLogger()
    quiet = _DropMessage("No pretrained weights loaded")  # open_clip's note; trained weights are loaded next
    root.addFilter(quiet)
    try:
        clip_model = build_clip_model(spec.clip_model, None, spec.clip_overrides)
    finally:
        root.removeFilter(quiet)
    # With a layer list build_vgg_features builds timm's VGG class on it; the model name is not used.
    return clip_model, build_vgg_features("vgg", None, TINY_VGG_LAYERS)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def info_nce(za: torch.Tensor, zb: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Symmetric InfoNCE of paired embeddings (B, D): row i of ``za`` and ``zb`` are positives, others negatives."""
    za, zb = F.normalize(za, dim=1), F.normalize(zb, dim=1)
    logits = za @ zb.T / temperature
    target = torch.arange(za.shape[0], device=za.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def pooled_vgg_features(vgg: Any, image: torch.Tensor) -> torch.Tensor:
    """(B, sum C_l): every tapped block of a :class:`VggCritic`, averaged over space (the training head's input)."""
    return torch.cat([f.mean(dim=(2, 3)) for f in vgg.layer_features(image)], dim=1)


def train_synthetic_critics(spec: SyntheticCriticSpec) -> dict[str, Any]:
    """Train both critics of ``spec`` (CPU, deterministic for a given torch thread setting); the file's content:
    ``{"identity", "clip", "vgg", "report"}`` with the state dicts of the CLIP model and the VGG features."""
    start = time.perf_counter()
    views = render_critic_views(spec.seed, range(spec.primitives), spec.views, spec.image_resolution)
    render_s = time.perf_counter() - start
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        clip_model, features = build_synthetic_architectures(spec)
        clip, vgg = ClipCritic(clip_model, spec.clip_resolution), VggCritic(features)
        head = nn.Linear(sum(vgg.channel_weight(k).shape[1] for k in range(vgg.num_layers)), PROJECTION_DIM)
    clip_params, vgg_params = list(clip_model.visual.parameters()), list(features.parameters())
    for p in clip_params + vgg_params:
        p.requires_grad_(True)
    opt_clip = torch.optim.Adam(clip_params, lr=LEARNING_RATE)
    opt_vgg = torch.optim.Adam(vgg_params + list(head.parameters()), lr=LEARNING_RATE)
    gen = torch.Generator().manual_seed(spec.seed)
    batch = min(spec.batch_size, spec.primitives)
    losses = {"clip": [], "vgg": []}
    for _ in range(spec.steps):
        index = torch.randperm(spec.primitives, generator=gen)[:batch]
        first = torch.randint(spec.views, (batch,), generator=gen)
        second = (first + 1 + torch.randint(spec.views - 1, (batch,), generator=gen)) % spec.views
        xa, xb = views[index, first], views[index, second]
        for name, opt, embed in (("clip", opt_clip, clip),
                                 ("vgg", opt_vgg, lambda x: head(pooled_vgg_features(vgg, x)))):
            loss = info_nce(embed(xa), embed(xb))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses[name].append(float(loss.detach()))
    for p in clip_params + vgg_params:
        p.requires_grad_(False)
    tail = max(1, spec.steps // 10)
    report = {"render_seconds": round(render_s, 3), "train_seconds": round(time.perf_counter() - start - render_s, 3),
              "torch_threads": torch.get_num_threads(), "torch_version": str(torch.__version__),
              "first_loss": {k: v[0] for k, v in losses.items()},
              "final_loss": {k: sum(v[-tail:]) / tail for k, v in losses.items()}}
    return {"identity": spec.identity(), "clip": clip_model.state_dict(), "vgg": features.state_dict(),
            "report": report}


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("synthetic critics: waiting for %s (another process is training them)", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_atomically(state: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path, spec: SyntheticCriticSpec) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise WeightsError(f"synthetic critics {path}: cannot read the cached file ({err}); delete it and they are "
                           "retrained on the next start") from None
    if not isinstance(state, dict) or state.get("identity") != spec.identity():
        raise WeightsError(f"synthetic critics {path}: the cached file was trained for another recipe than its name "
                           "says; delete it and they are retrained on the next start")
    return state


def load_or_train_synthetic_critics(spec: SyntheticCriticSpec,
                                    directory: str | Path) -> tuple[nn.Module, nn.Sequential, bool]:
    """The trained CLIP model and VGG features of ``spec`` from the cache ``directory``, trained and written first
    when absent. Returns ``(clip_model, vgg_features, trained)``, ``trained`` True when this call trained them.

    Under the cache file's lock: exactly one of several concurrent callers trains; the others wait and load.
    """
    folder = Path(directory)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WeightsError(f"loss.synthetic_critics.dir={str(directory)!r}: cannot create the cache folder "
                           f"({err.strerror or err}); set it to a writable folder") from None
    path = folder / spec.file_name()
    trained = False
    with _exclusive_lock(path.with_name(path.name + ".lock")):
        if path.is_file():
            state = _read(path, spec)
            log.info("synthetic critics: loading %s (trained in %.1f s)", path, state["report"]["train_seconds"])
        else:
            log.info("synthetic critics: training them (no cache at %s): %d primitives x %d views at %d px, %d steps "
                     "of batch %d, seed %d", path, spec.primitives, spec.views, spec.image_resolution, spec.steps,
                     spec.batch_size, spec.seed)
            state = train_synthetic_critics(spec)
            _write_atomically(state, path)
            trained = True
            r = state["report"]
            log.info("synthetic critics: trained in %.1f s (+ %.1f s rendering), InfoNCE clip %.3f -> %.3f, vgg %.3f "
                     "-> %.3f; wrote %s", r["train_seconds"], r["render_seconds"], r["first_loss"]["clip"],
                     r["final_loss"]["clip"], r["first_loss"]["vgg"], r["final_loss"]["vgg"], path)
    with torch.random.fork_rng(devices=[]):  # the architectures' random init must not move the caller's RNG
        clip_model, features = build_synthetic_architectures(spec)
    clip_model.load_state_dict(state["clip"])
    features.load_state_dict(state["vgg"])
    return clip_model, features, trained


def view_retrieval_accuracy(clip: nn.Module, views: torch.Tensor, distance: str = "cosine") -> float:
    """Top-1 view retrieval with a CLIP critic on ``views`` (N, >= 2, 3, R, R): the fraction of primitives whose
    second view is the nearest, among the second views of all N, to their first view (chance 1 / N).

    ``distance``: ``cosine`` (the contrastive objective's) or ``l1`` (the mean absolute difference of the raw
    embeddings, the G3DR CLIP loss).
    """
    with torch.no_grad():
        a, b = clip(views[:, 0]).float(), clip(views[:, 1]).float()
    match distance:
        case "cosine":
            d = -(F.normalize(a, dim=1) @ F.normalize(b, dim=1).T)
        case "l1":
            d = (a[:, None] - b[None]).abs().mean(dim=2)
        case _:
            raise ValueError(f"distance must be 'cosine' or 'l1', got {distance!r}")
    return float((d.argmin(dim=1) == torch.arange(len(a))).float().mean())


def perceptual_ordering(vgg: nn.Module, views: torch.Tensor, layer_weights: tuple[float, ...] | None = None,
                        negatives: int = 5) -> float:
    """How often a perceptual critic ranks two views of a primitive closer than views of different primitives.

    ``views`` (N, >= 2, 3, R, R): for every primitive i and each of the ``negatives`` next primitives j (cyclic),
    is ``d(view0_i, view1_i) < d(view0_i, view1_j)``; returns the fraction of true comparisons (0.5 = no
    information). ``d`` is the critic's per-sample distance summed over its layers with ``layer_weights``.
    """
    n = views.shape[0]
    weights = torch.tensor(layer_weights or (1.0,) * vgg.num_layers)
    with torch.no_grad():
        positive = (vgg.layer_distances(views[:, 0], views[:, 1]) * weights).sum(dim=1)
        wins = 0.0
        for shift in range(1, negatives + 1):
            other = torch.roll(torch.arange(n), -shift)
            negative = (vgg.layer_distances(views[:, 0], views[other, 1]) * weights).sum(dim=1)
            wins += float((positive < negative).float().sum())
    return wins / (n * negatives)
