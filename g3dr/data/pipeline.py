"""The training and evaluation data pipeline over WebDataset shards.

Stages (per rank, per data-loader worker):

- shard URLs: brace patterns, ``::``- or comma-separated lists, Python lists, local paths, a folder
  (its ``manifest.json``), ``pipe:`` commands (opened by WebDataset's ``gopen``);
- **train** (resampled): every (seed, rank, worker, epoch) draws shards with replacement from its own
  seeded RNG (as open_clip's resampled mode), shuffles in a buffer, decodes, flips image and depth
  together with p = ``flip_p``, batches, and stops after a fixed number of batches per epoch so every
  rank runs the same number of steps;
- **eval** (exact single pass): no shuffle, no flip; shards are split by rank and worker, so there must
  be at least ranks x workers shards (:func:`plan_exact_workers`: a :class:`DataError` by default, or the
  opt-in ``read_all`` plan where every worker reads all shards and keeps every k-th sample); together
  the ranks and workers see every sample exactly once;
- decoding picks the smallest stored resolution >= the training resolution and resizes with Lanczos;
  depth is decoded from the 16-bit PNG explicitly (never through an 8-bit image mode);
- a stream with ``target_resolution`` > 0 (the super-resolution stage, ``g3dr train-sr``) also decodes the
  image at that size (``rgb_target``) from the smallest stored image at least that large, flipped with the
  rest; a target is never upsampled: a sample storing no image that large stops the stream with a
  :class:`TargetSizeError` naming the command that writes the larger size;
- a sample that fails to decode, repeats a key of its shard, or is cut by a truncated or corrupt tar
  stream is skipped, counted by reason and logged (rate-limited); shard-level failures are counted apart
  (:mod:`g3dr.data.counts`). The counts are on :attr:`ShardStream.counts` in the process that ran the
  stream, and in wire mode every batch carries a snapshot (``_stats``) so the loaders can sum them; past
  ``max_skip_fraction`` of the samples read (after ``skip_check_min_samples``) the stream stops with a
  :class:`DataError`.

Batches are dicts ``rgb`` float32 (B, 3, H, W) in [-1, 1], ``depth`` float32 (B, 1, H, W) in the
release decoding (~[4, 6]), ``label`` int64 (B,), ``key`` list[str]; with ``target_resolution`` T > 0 also
``rgb_target`` float32 (B, 3, T, T) in [-1, 1]. An eval stream with
``view_resolution`` > 0 also decodes the novel views a synthetic set stores (``g3dr prep synth --views K``)
into ``views``: ``rgb`` float32 (B, K, 3, H, W) in [-1, 1], ``depth`` float32 (B, K, H, W) (inf where
not ``valid``), ``valid`` bool (B, K, H, W), ``yaw`` / ``pitch`` float64 (B, K), ``radius`` /
``fov_degrees`` float64 (B,). Training streams never decode them.

In train mode the stream adds ``_worker`` / ``_consumed`` bookkeeping entries that :class:`TrainLoader`
strips; they make the position exactly resumable (:meth:`TrainLoader.state_dict`). The loaders run the
stream with ``wire=True`` (uint8 images and raw depth codes cross the process boundary) and complete the
batches in the receiving process with :func:`finish_batch`. In wire mode every item carries ``_stats``
(the worker's counts so far); each worker ends with a stats-only item, and a :class:`DataError` inside a
worker is sent as a stats-only item with ``_error`` (the loaders raise it in the receiving process, so
the message arrives without a worker traceback).
"""

from __future__ import annotations

import glob
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import braceexpand
import numpy as np
import torch
from PIL import Image

from g3dr.data.counts import DataCounts
from g3dr.data.depth_codec import decode_u16_png
from g3dr.data.tar_reader import TarReadError, iter_samples
from g3dr.errors import DataError
from g3dr.log import get_logger

log = get_logger("g3dr.data")

_IMAGE_EXT = re.compile(r"^(?:(\d+)\.)?(jpg|jpeg|webp|png)$")
_DEPTH_EXT = re.compile(r"^(?:(\d+)\.)?depth\.png$")
_VIEW_EXT = re.compile(r"^view(\d+)\.(\d+)\.png$")
_PIL_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}
_LOG_FIRST = 5
_LOG_EVERY = 100
_SKIP = "__skip__"  # a raw-sample entry (reason, detail): the sample is counted and skipped at the decode stage


# --------------------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------------------


def _split_top_level_commas(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in text:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def expand_shard_urls(spec: str | Sequence[str]) -> list[str]:
    """Shard URLs from a pattern, a list or a folder; order is preserved, duplicates are an error.

    ``"/d/train-{000000..000003}.tar"`` -> 4 paths; ``"/d/train-*.tar"`` -> the matching files, sorted;
    ``"a.tar::b.tar"`` or ``"a.tar,b.tar"`` -> 2; a folder with ``manifest.json`` -> its shards;
    ``"pipe:curl -s http://h/s-{0..1}.tar"`` -> 2 commands. Names are not checked on disk (globs aside):
    :func:`expand_existing_shard_urls` does that for the loaders.
    """
    if isinstance(spec, (list, tuple)):
        pieces = [str(s) for s in spec]
    else:
        pieces = [p for chunk in str(spec).split("::") for p in _split_top_level_commas(chunk)]
    urls: list[str] = []
    empty_globs: list[str] = []
    for piece in (p.strip() for p in pieces):
        if not piece:
            continue
        if _is_remote(piece):
            urls += list(braceexpand.braceexpand(piece))
            continue
        if Path(piece).is_dir():
            urls += shards_of_folder(piece)
            continue
        for name in braceexpand.braceexpand(piece):
            if _GLOB_CHARS.search(name) and not Path(name).exists():
                matches = sorted(glob.glob(name))
                if not matches:
                    empty_globs.append(name)
                urls += matches
            else:
                urls.append(name)
    if not urls:
        if empty_globs:
            raise DataError(f"shard pattern {spec!r} (data.shards / --data) matches no file: the glob "
                            f"{empty_globs[0]!r} matches nothing; check the folder and the pattern")
        raise DataError(f"no shard URLs in {spec!r}; set data.shards to a brace pattern, a list or a shard folder")
    if len(set(urls)) != len(urls):
        raise DataError(f"shard list {spec!r} names some shards twice; each shard must appear once")
    return urls


def expand_existing_shard_urls(spec: str | Sequence[str]) -> list[str]:
    """:func:`expand_shard_urls`, then a :class:`DataError` when the spec names local files and not one exists (a
    mistyped folder or pattern), instead of a later complaint about a missing manifest. Some missing files are left
    to the readers, which skip and count them as lost shards."""
    urls = expand_shard_urls(spec)
    local = [u for u in urls if not _is_remote(u)]
    if local and len(local) == len(urls) and not any(Path(u).is_file() for u in local):
        where = Path(local[0]).parent
        hint = "" if where.is_dir() else f" (the folder {where} does not exist)"
        raise DataError(f"shard pattern {spec!r} (data.shards / --data) matches no file: it names {len(local)} "
                        f"file(s), none of which exists, e.g. {local[0]}{hint}; check the path and the pattern "
                        "(a brace pattern train-{000000..000127}.tar, a glob train-*.tar, a comma list, or a shard "
                        "folder holding manifest.json)")
    return urls


_GLOB_CHARS = re.compile(r"[*?\[]")


def _is_remote(url: str) -> bool:
    """``pipe:`` commands and ``scheme://`` URLs: opened by WebDataset, not checked on this machine's disk."""
    return url.startswith("pipe:") or "://" in url


def shards_of_folder(folder: str | Path) -> list[str]:
    """The shard paths listed in ``folder/manifest.json`` (written by ``g3dr prep``)."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise DataError(f"{folder} has no manifest.json; point data.shards at the shard files or run 'g3dr prep shards'")
    return [str(Path(folder) / shard["name"]) for shard in manifest["shards"] if shard["samples"] > 0]


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def manifest_num_samples(urls: Sequence[str]) -> int | None:
    """Samples in ``urls`` according to the manifests beside them (local shards only), else None."""
    by_folder: dict[Path, set[str]] = {}
    for url in urls:
        if url.startswith("pipe:") or "://" in url:
            return None
        by_folder.setdefault(Path(url).parent, set()).add(Path(url).name)
    total = 0
    for folder, names in by_folder.items():
        manifest = read_manifest(folder)
        if manifest is None:
            return None
        counts = {shard["name"]: shard["samples"] for shard in manifest["shards"]}
        if not names <= counts.keys():
            return None
        total += sum(counts[name] for name in names)
    return total


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


def _pick(sample: dict[str, Any], pattern: re.Pattern, resolution: int) -> str | None:
    """The extension of the smallest stored resolution >= ``resolution`` (else the largest; unsized last)."""
    options = []
    for ext in sample:
        match = pattern.match(ext)
        if match:
            size = int(match.group(1)) if match.group(1) else 0
            options.append((size, ext))
    if not options:
        return None
    at_least = sorted(o for o in options if o[0] >= resolution)
    return at_least[0][1] if at_least else max(options)[1]


class TargetSizeError(DataError):
    """The data stores no image as large as the super-resolution target (never a per-sample skip)."""


def target_size_message(where: str, stored: Sequence[int], resolution: int, target: int) -> str:
    """The error of a super-resolution target larger than every stored image, with the commands that fix it."""
    sizes = ", ".join(str(s) for s in sorted(set(stored))) or "unknown sizes"
    return (f"{where} stores images at {sizes} px, smaller than the super-resolution target of {target} px "
            f"(sr.scale x data.resolution = {target // resolution} x {resolution}); a target is never upsampled. "
            f"Write the shards with both sizes: 'g3dr prep shards ... --resolution {resolution} {target}' (a "
            f"synthetic set: 'g3dr prep synth ... --resolution {resolution} {target}'; the one g3dr train-sr writes "
            "itself holds both: delete the old folder or set data.synthetic_dir to a new one)")


def _pick_target(sample: dict[str, Any], resolution: int, target: int) -> str:
    """The image extension to decode the ``target`` px image from: the smallest stored size >= ``target``, or
    an unsized image (checked on decoding); a :class:`TargetSizeError` when every stored size is smaller."""
    options = []
    for ext in sample:
        match = _IMAGE_EXT.match(ext)
        if match:
            options.append((int(match.group(1)) if match.group(1) else 0, ext))
    large = sorted(o for o in options if o[0] >= target)
    if large:
        return large[0][1]
    unsized = [ext for size, ext in options if size == 0]
    if unsized:
        return unsized[0]
    raise TargetSizeError(target_size_message(f"sample {sample.get('__key__', '?')}", [s for s, _ in options],
                                              resolution, target))


def _square(image: Image.Image) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def _decode_rgb(data: bytes, ext: str, resolution: int, no_upsampling: str = "") -> torch.Tensor:
    """(3, R, R) uint8 via PIL: any mode -> RGB, centre square, Lanczos resize when not already R x R.
    ``no_upsampling`` (a sample key): a centre square smaller than R raises :class:`TargetSizeError`."""
    formats = [_PIL_FORMATS[ext.rpartition(".")[2]]]  # skips PIL's format probing
    with Image.open(io.BytesIO(data), formats=formats) as image:
        image.load()
        image = _square(image if image.mode == "RGB" else image.convert("RGB"))
        if no_upsampling and image.size[0] < resolution:
            raise TargetSizeError(f"sample {no_upsampling}: its image ({ext}) is {image.size[0]} px, smaller than the "
                                  f"super-resolution target of {resolution} px; a target is never upsampled. Write the "
                                  f"shards with the larger size ('g3dr prep shards ... --resolution R {resolution}')")
        if image.size != (resolution, resolution):
            image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def _decode_depth_codes(data: bytes, resolution: int) -> torch.Tensor:
    """(1, R, R) float32 uint16 codes (resized as float) from 16-bit PNG bytes; 8-bit or colour PNGs raise."""
    codes = decode_u16_png(data)
    if codes.shape[0] != codes.shape[1]:
        side = min(codes.shape)
        top, left = (codes.shape[0] - side) // 2, (codes.shape[1] - side) // 2
        codes = codes[top:top + side, left:left + side]
    if codes.shape != (resolution, resolution):
        # Resize the codes as float (PIL mode F): an 8-bit step would lose the 16-bit precision.
        resized = Image.fromarray(codes.astype(np.float32), mode="F").resize(
            (resolution, resolution), Image.Resampling.LANCZOS)
        values = torch.from_numpy(np.array(resized)).clamp_(0.0, 65535.0)  # Lanczos overshoot at edges
    else:
        values = torch.from_numpy(codes.astype(np.float32))  # exact: every uint16 is a float32
    return values[None]


def _decode_parts(sample: dict[str, Any], resolution: int, view_resolution: int = 0,
                  target_resolution: int = 0) -> dict[str, Any]:
    """``rgb`` uint8 (3, R, R), ``depth_codes`` float32 (1, R, R) (uint16 codes, resized as float),
    ``label``, ``key`` of one raw sample, ``views`` (:func:`decode_views`) when ``view_resolution`` > 0
    and the sample stores views, and ``rgb_target`` uint8 (3, T, T) when ``target_resolution`` T > 0 (never
    upsampled: :class:`TargetSizeError`); raises on anything missing or undecodable."""
    key = sample.get("__key__", "?")
    image_ext = _pick(sample, _IMAGE_EXT, resolution)
    depth_ext = _pick(sample, _DEPTH_EXT, resolution)
    if image_ext is None or depth_ext is None:
        raise ValueError(f"sample {key} lacks an image or a depth PNG (has {sorted(k for k in sample if not k.startswith('__'))})")
    rgb = _decode_rgb(sample[image_ext], image_ext, resolution)
    codes = _decode_depth_codes(sample[depth_ext], resolution)
    label = int(sample["cls"].decode()) if "cls" in sample else -1
    parts = {"rgb": rgb, "depth_codes": codes, "label": label, "key": key}
    if target_resolution > 0:
        target_ext = _pick_target(sample, resolution, target_resolution)
        parts["rgb_target"] = _decode_rgb(sample[target_ext], target_ext, target_resolution, no_upsampling=key)
    if view_resolution > 0:
        views = decode_views(sample, view_resolution)
        if views is not None:
            parts["views"] = views
    return parts


def decode_views(sample: dict[str, Any], resolution: int) -> dict[str, torch.Tensor] | None:
    """The stored novel views of one raw sample at exactly ``resolution`` (never resized: their depth is
    exact), or None when the sample stores none (its json has no ``views`` entry).

    Returns ``rgb`` uint8 (K, 3, R, R), ``depth`` float32 (K, R, R) decoded with the json's view depth
    mapping (+inf where invalid), ``valid`` bool (K, R, R) (codes != the mapping's ``invalid_code``),
    ``yaw`` / ``pitch`` float64 (K,), ``radius`` / ``fov_degrees`` float64 scalars. Raises when a view is
    missing at ``resolution`` or does not decode.
    """
    key = sample.get("__key__", "?")
    meta = json.loads(sample["json"]).get("views") if "json" in sample else None
    if not meta:
        return None
    count, mapping = int(meta["count"]), meta["depth_mapping"]
    rgb = torch.empty(count, 3, resolution, resolution, dtype=torch.uint8)
    depth = torch.empty(count, resolution, resolution, dtype=torch.float32)
    valid = torch.empty(count, resolution, resolution, dtype=torch.bool)
    for k in range(count):
        image_ext, depth_ext = f"view{k}.{resolution}.png", f"view{k}.{resolution}.depth.png"
        if image_ext not in sample or depth_ext not in sample:
            stored = sorted({int(m.group(2)) for ext in sample if (m := _VIEW_EXT.match(ext))})
            raise ValueError(f"sample {key} stores its views at {stored} px, not at {resolution} px (views are never "
                             f"resized); write the set with 'g3dr prep synth --resolution {resolution}' or render at a "
                             "stored size (eval.render_resolution)")
        with Image.open(io.BytesIO(sample[image_ext]), formats=["PNG"]) as image:
            image.load()
            if image.mode != "RGB" or image.size != (resolution, resolution):
                raise ValueError(f"sample {key}: {image_ext} is {image.mode} {image.size}, expected RGB {resolution}")
            rgb[k] = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        codes = decode_u16_png(sample[depth_ext])
        if codes.shape != (resolution, resolution):
            raise ValueError(f"sample {key}: {depth_ext} is {codes.shape}, expected ({resolution}, {resolution})")
        ok = codes != int(mapping["invalid_code"])
        values = codes.astype(np.float64) / 65536.0 * float(mapping["scale"]) + float(mapping["offset"])
        depth[k] = torch.from_numpy(np.where(ok, values, np.inf).astype(np.float32))
        valid[k] = torch.from_numpy(ok)
    return {"rgb": rgb, "depth": depth, "valid": valid,
            "yaw": torch.tensor(meta["yaw"], dtype=torch.float64), "pitch": torch.tensor(meta["pitch"], dtype=torch.float64),
            "radius": torch.tensor(float(meta["radius"]), dtype=torch.float64),
            "fov_degrees": torch.tensor(float(meta["fov_degrees"]), dtype=torch.float64)}


def decode_sample(sample: dict[str, Any], resolution: int, depth_scale: float = 2.0,
                  depth_offset: float = 4.0) -> dict[str, Any]:
    """One raw WebDataset sample (``__key__`` + bytes per extension) -> tensors at ``resolution``.

    Returns ``rgb`` uint8 (3, R, R), ``depth`` float32 (1, R, R) = ``codes / 65536 * depth_scale +
    depth_offset``, ``label`` int, ``key`` str. Uses the smallest stored resolution >= R (Lanczos resize
    otherwise). Raises on anything missing or undecodable.
    """
    parts = _decode_parts(sample, resolution)
    depth = parts.pop("depth_codes").mul_(depth_scale / 65536.0).add_(depth_offset)
    return {**parts, "depth": depth}


def flip_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Horizontal flip of image and depth together (and of the super-resolution target, when decoded)."""
    sample["rgb"] = sample["rgb"].flip(-1)
    sample["depth_codes"] = sample["depth_codes"].flip(-1)
    if "rgb_target" in sample:
        sample["rgb_target"] = sample["rgb_target"].flip(-1)
    return sample


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor; in a DataLoader worker it lives in shared memory, so that sending it to the
    main process needs no copy (what torch's ``default_collate`` does)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = 1
    for dim in shape:
        numel *= dim
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel)
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


def collate_wire(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Decoded samples -> a compact batch for the trip from a worker: ``rgb`` uint8 (B, 3, R, R),
    ``depth_codes`` float32 (B, 1, R, R), ``label`` int64 (B,), ``key``. :func:`finish_batch` converts it.

    Moving uint8 instead of float32 images cuts the worker -> main transfer by 60%, which on a busy
    machine costs more than the conversion itself.
    """
    count, size = len(samples), samples[0]["rgb"].shape[1:]
    rgb = torch.stack([s["rgb"] for s in samples], out=_batch_tensor((count, 3, *size), torch.uint8))
    codes = torch.stack([s["depth_codes"] for s in samples], out=_batch_tensor((count, 1, *size), torch.float32))
    wire = {"rgb": rgb, "depth_codes": codes, "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
            "key": [s["key"] for s in samples]}
    if "rgb_target" in samples[0]:
        target = samples[0]["rgb_target"].shape
        wire["rgb_target"] = torch.stack([s["rgb_target"] for s in samples], out=_batch_tensor((count, *target),
                                                                                             torch.uint8))
    views = [s.get("views") for s in samples]
    if any(v is not None for v in views):
        shapes = {None if v is None else tuple(v["rgb"].shape) for v in views}
        if len(shapes) > 1:
            raise DataError(f"samples {wire['key']} mix stored views of different counts or sizes ({sorted(map(str, shapes))}) "
                            "in one batch; every sample of an eval set must store the same views (rewrite it with "
                            "'g3dr prep synth --views K')")
        wire["views"] = {name: torch.stack([v[name] for v in views], out=_batch_tensor((count, *views[0][name].shape),
                                                                                    views[0][name].dtype))
                         for name in views[0]}
    return wire


def finish_batch(wire: dict[str, Any], depth_scale: float = 2.0, depth_offset: float = 4.0,
                 pin_memory: bool = False) -> dict[str, Any]:
    """A wire batch -> ``rgb`` float32 (B, 3, R, R) in [-1, 1], ``depth`` float32 (B, 1, R, R)
    (``codes / 65536 * depth_scale + depth_offset``), ``label`` int64 (B,), ``key`` list[str] (and
    ``rgb_target`` float32 (B, 3, T, T) in [-1, 1] when the wire batch has one).

    ``pin_memory`` (CUDA only): the outputs are written straight into page-locked memory, so that
    ``.to(device, non_blocking=True)`` copies asynchronously without a separate pinning copy.
    """
    rgb_u8, codes = wire.pop("rgb"), wire.pop("depth_codes")
    if pin_memory:
        rgb = torch.empty(rgb_u8.shape, dtype=torch.float32, pin_memory=True).copy_(rgb_u8)
        depth = torch.empty(codes.shape, dtype=torch.float32, pin_memory=True).copy_(codes)
        wire["label"] = wire["label"].pin_memory()
    else:
        rgb, depth = rgb_u8.to(torch.float32), codes
    rgb.div_(127.5).sub_(1.0)
    depth.mul_(depth_scale / 65536.0).add_(depth_offset)
    if "rgb_target" in wire:
        target_u8 = wire.pop("rgb_target")
        target = (torch.empty(target_u8.shape, dtype=torch.float32, pin_memory=True).copy_(target_u8) if pin_memory
                  else target_u8.to(torch.float32))
        wire["rgb_target"] = target.div_(127.5).sub_(1.0)
    if "views" in wire:
        views = dict(wire.pop("views"))
        views["rgb"] = views["rgb"].to(torch.float32).div_(127.5).sub_(1.0)
        wire["views"] = views
    return {"rgb": rgb, "depth": depth, **wire}


def collate(samples: Sequence[dict[str, Any]], depth_scale: float = 2.0, depth_offset: float = 4.0) -> dict[str, Any]:
    """Decoded samples -> the final batch (``collate_wire`` then ``finish_batch`` in one process)."""
    return finish_batch(collate_wire(samples), depth_scale, depth_offset)


# --------------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------------


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions, unlike hash())."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]) >> 1


FewShards = Literal["error", "fewer_workers", "read_all"]


def plan_exact_workers(num_shards: int, world_size: int, num_workers: int, policy: FewShards = "error") -> int:
    """The DataLoader workers per rank for an exact (eval) pass over ``num_shards`` shards.

    Exact reading splits shards over ``world_size x max(num_workers, 1)`` readers. With fewer shards:
    ``error`` raises a :class:`DataError` naming the counts and the fixes; ``fewer_workers`` lowers the
    workers to ``num_shards // world_size`` with a warning (an error when there are fewer shards than
    ranks); ``read_all`` keeps the workers and lets every reader read all shards and keep every k-th
    sample (exact, but the data is read k times; a warning says so).
    """
    readers = world_size * max(num_workers, 1)
    if num_shards >= readers:
        return num_workers
    counts = (f"{num_shards} shard(s) for {world_size} rank(s) x {max(num_workers, 1)} reader(s) per rank "
              f"(data.num_workers={num_workers}) = {readers} readers")
    if policy == "read_all":
        log.warning("exact pass: %s; every reader reads all shards and keeps every %d-th sample "
                    "(data.eval_few_shards=read_all): exact, but the data is read %d times", counts, readers, readers)
        return num_workers
    if policy == "fewer_workers" and num_shards >= world_size:
        workers = num_shards // world_size  # >= 1; num_workers == 0 never gets here (readers == world_size)
        log.warning("exact pass: %s; using %d worker(s) per rank instead of %d (data.eval_few_shards=fewer_workers)",
                    counts, workers, num_workers)
        return workers
    raise _few_shards_error(num_shards, world_size, num_workers)


def _few_shards_error(num_shards: int, world_size: int, num_workers: int) -> DataError:
    readers = world_size * max(num_workers, 1)
    counts = (f"{num_shards} shard(s) for {world_size} rank(s) x {max(num_workers, 1)} reader(s) per rank "
              f"(data.num_workers={num_workers}) = {readers} readers")
    fixes = [f"reshard into at least {readers} smaller shards ('g3dr prep shards --shard-size N')"]
    if num_shards >= world_size:
        fixes.append(f"set data.num_workers={num_shards // world_size} (or 0: read in the rank's own process)")
        fixes.append("opt in with data.eval_few_shards=fewer_workers (lower the workers automatically)")
    else:
        fixes.append(f"run on at most {num_shards} rank(s)")
    fixes.append(f"opt in with data.eval_few_shards=read_all (every reader reads all shards and keeps every "
                 f"{readers}-th sample: exact, but reads the data {readers} times)")
    return DataError(f"exact (eval) reading splits shards over ranks x workers, but there are {counts}. Fix: "
                     + "; or ".join(fixes))


@dataclass
class ShardStream(torch.utils.data.IterableDataset):
    """Batches from shards for one rank; see the module docstring for the two modes."""

    urls: list[str]
    mode: Literal["train", "eval"]
    resolution: int
    batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle_buffer: int = 1000
    flip_p: float = 0.5
    depth_scale: float = 2.0
    depth_offset: float = 4.0
    batches_per_epoch: int = 0
    """Train mode: batches this rank yields per epoch (over all its workers)."""
    epoch: int = 0
    resume_batches_done: int = 0
    """Train mode: batches of this epoch already delivered (exact resume)."""
    resume_consumed: dict[int, int] = field(default_factory=dict)
    """Train mode: raw samples each (logical) worker already consumed in this epoch (exact resume)."""
    wire: bool = False
    """Yield compact batches (uint8 images, raw depth codes) that the receiving process completes with
    :func:`finish_batch`; the loaders do this, so workers send 60% fewer bytes."""
    max_skip_fraction: float = 0.01
    """Stop with a :class:`DataError` when more than this fraction of the samples read were skipped ..."""
    skip_check_min_samples: int = 10000
    """... once at least this many samples were read (by this stream; the loaders check their totals too)."""
    max_bad_in_row: int = 10000
    """Train mode: a reader that skips this many samples in a row stops with a :class:`DataError`, whatever
    ``max_skip_fraction`` says (with 1.0 and nothing usable it would otherwise spin forever)."""
    view_resolution: int = 0
    """Eval mode: also decode the novel views samples store, at exactly this resolution (0: never; training
    streams never do, so they do not pay for them)."""
    target_resolution: int = 0
    """Also decode each image at this size as ``rgb_target`` (the super-resolution target; 0: never), from a
    stored image at least that large: a sample without one stops the stream (:class:`TargetSizeError`)."""
    few_shards: Literal["error", "read_all"] = "error"
    """Eval mode with fewer shards than ranks x workers: raise, or let every reader read all shards and keep
    every k-th sample (see :func:`plan_exact_workers`)."""
    counts: DataCounts = field(default_factory=DataCounts)
    """What the last iteration in this process read, delivered and skipped (reset by ``__iter__``)."""

    def __post_init__(self) -> None:
        super().__init__()
        if self.mode == "train" and self.batches_per_epoch < 1:
            raise ValueError("train mode needs batches_per_epoch >= 1")

    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped in this process by reason (``counts.skipped``)."""
        return self.counts.skipped

    # ---- helpers -------------------------------------------------------------------------------------

    def _log_problem(self, reason: str, detail: Any, where: str) -> None:
        total = self.counts.skipped_total + sum(self.counts.shard_errors.values())
        if total <= _LOG_FIRST or total % _LOG_EVERY == 0:
            log.warning("data problem (%s) in %s: %s [so far in this reader: %s, shard errors %s, %d read]", reason,
                        where, detail, dict(self.counts.skipped), dict(self.counts.shard_errors), self.counts.read)

    def _skip(self, reason: str, detail: Any, where: str) -> None:
        """Count one skipped sample; raises :class:`DataError` past the configured fraction."""
        self.counts.add_skip(reason, where)
        self._log_problem(reason, detail, where)
        self.counts.check(self.max_skip_fraction, self.skip_check_min_samples,
                          f" in reader {self._worker()[0]} of rank {self.rank}")

    def _shard_error(self, reason: str, detail: Any, url: str) -> None:
        self.counts.add_shard_error(reason, url)
        self._log_problem(reason, detail, url)

    def _samples_of(self, url: str, count_shard_errors: bool = True) -> Iterator[dict[str, Any]]:
        """Raw samples of one shard. A key already seen in this shard comes out marked as a duplicate; a
        break in the tar stream ends the shard (it cannot be resynchronised) with the cut sample marked
        ``incomplete_sample`` (when one was cut); marked samples are counted where they are consumed, so
        that exact passes count each once. Shard-level failures are counted here (when
        ``count_shard_errors``)."""
        from webdataset.gopen import gopen

        failed = False

        def shard_error(reason: str, err: BaseException) -> None:
            # One event per read of a shard: a failed pipe: command is reported both by the read and by
            # close() (its exit status), depending on timing.
            nonlocal failed
            if count_shard_errors and not failed:
                self._shard_error(reason, err, url)
            failed = True

        try:
            stream = gopen(url, "rb")
        except Exception as err:  # noqa: BLE001 - missing file, failed pipe: counted, logged, skipped
            shard_error("unreadable_shard", err)
            return
        seen: set[str] = set()
        try:
            for raw in iter_samples(stream, url):
                key = raw["__key__"]
                if key in seen:
                    raw[_SKIP] = ("duplicate_key", f"key {key} appears twice in the shard; the first is kept")
                seen.add(key)
                yield raw
        except TarReadError as err:
            shard_error("corrupt_shard" if err.kind == "corrupt" else "truncated_shard", err)
            if err.partial_key is not None:
                yield {"__key__": err.partial_key, "__url__": url, _SKIP: ("incomplete_sample", err)}
        except Exception as err:  # noqa: BLE001 - read errors of the transport
            shard_error("unreadable_shard", err)
        finally:
            try:
                stream.close()  # for pipe: this checks the command's exit status
            except Exception as err:  # noqa: BLE001
                shard_error("unreadable_shard", err)
        if not seen and not failed:
            shard_error("empty_shard", RuntimeError("the shard holds no samples"))

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        where = f"{raw.get('__key__', '?')} in {raw.get('__url__', '?')}"
        if _SKIP in raw:
            reason, detail = raw[_SKIP]
            self._skip(reason, detail, where)
            return None
        try:
            return _decode_parts(raw, self.resolution, self.view_resolution if self.mode == "eval" else 0,
                                 self.target_resolution)
        except TargetSizeError:
            raise  # the data lacks the size (not one bad sample): stop with the fix
        except Exception as err:  # noqa: BLE001 - any corrupt sample is skipped, counted and logged
            self._skip("undecodable_sample", err, where)
            return None

    def _collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        self.counts.delivered += len(samples)
        return collate_wire(samples) if self.wire else collate(samples, self.depth_scale, self.depth_offset)

    @staticmethod
    def _worker() -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    # ---- modes ----------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.counts = DataCounts()
        worker, num_workers = self._worker()
        if self.mode == "train":
            batches = self._iter_train(worker, num_workers)
        else:
            batches = self._iter_eval(worker, num_workers)
        return self._wired(batches, worker) if self.wire else batches

    def _wired(self, batches: Iterator[dict[str, Any]], worker: int) -> Iterator[dict[str, Any]]:
        """Attach the counts to every batch; end with a stats-only item (or one carrying the DataError)."""
        try:
            for batch in batches:
                batch["_stats"] = {"worker": worker, **self.counts.to_dict()}
                yield batch
        except DataError as err:
            yield {"_stats": {"worker": worker, **self.counts.to_dict()}, "_error": str(err)}
            return
        yield {"_stats": {"worker": worker, **self.counts.to_dict()}}

    def _iter_train(self, physical_worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        # Batch j of an epoch comes from logical worker j % W (the DataLoader takes workers round-robin).
        # On resume after k batches, physical worker 0 must deliver batch k: it plays logical worker k % W.
        done = self.resume_batches_done
        worker = (physical_worker + done) % num_workers
        rng = random.Random(_seed(self.seed, self.rank, worker, self.epoch))
        my_batches = self.batches_per_epoch // num_workers + (worker < self.batches_per_epoch % num_workers)
        my_batches -= done // num_workers + (worker < done % num_workers)
        to_skip = self.resume_consumed.get(worker, 0)
        consumed = 0

        def raw_stream() -> Iterator[dict[str, Any]]:
            empty_in_a_row = 0
            while True:
                url = rng.choice(self.urls)
                got = False
                for raw in self._samples_of(url):
                    got = got or _SKIP not in raw  # a shard of only cut or duplicate samples counts as empty
                    yield raw
                if got:
                    empty_in_a_row = 0
                    continue
                empty_in_a_row += 1
                if empty_in_a_row >= 2 * len(self.urls) + 10:
                    raise DataError(f"{empty_in_a_row} shards in a row gave no samples (last: {url}; "
                                    f"{self.counts.summary()}); check data.shards and run 'g3dr prep validate' "
                                    "on the shard folder")

        buffer: list[dict[str, Any]] = []
        capacity = max(self.shuffle_buffer, 1)
        initial = min(capacity, 64)  # start emitting early; the buffer then grows to its capacity
        produced = 0
        bad_in_row = 0
        pending: list[dict[str, Any]] = []
        source = raw_stream()
        while produced < my_batches:
            while len(buffer) < initial:
                buffer.append(next(source))
            for _ in range(2):
                if len(buffer) < capacity:
                    buffer.append(next(source))
            # Emit a random element, and draw its flip from the same RNG, so that skipping samples on
            # resume (no decode) leaves every later decision identical.
            index = rng.randrange(len(buffer))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            raw = buffer.pop()
            flip = rng.random() < self.flip_p
            consumed += 1
            if consumed <= to_skip:
                continue
            self.counts.read += 1
            sample = self._decode(raw)
            if sample is None:
                bad_in_row += 1
                if bad_in_row >= self.max_bad_in_row:
                    raise DataError(f"{bad_in_row} samples in a row were skipped in reader {physical_worker} of rank "
                                    f"{self.rank}: no usable data ({self.counts.summary()}); run 'g3dr prep validate' "
                                    "on the shard folder")
                continue
            bad_in_row = 0
            if flip:
                flip_sample(sample)
            pending.append(sample)
            if len(pending) == self.batch_size:
                batch = self._collate(pending)
                batch["_worker"], batch["_consumed"] = worker, consumed
                pending = []
                produced += 1
                yield batch

    def _iter_eval(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        slots = self.world_size * num_workers
        slot = self.rank * num_workers + worker
        if len(self.urls) >= slots:
            # Split by shard: slot k reads shards k, k + slots, ...
            plan = [(url, None) for url in self.urls[slot::slots]]
        elif self.few_shards == "read_all":
            # Opt-in: every slot reads all shards and keeps samples j with j % slots == slot.
            plan = [(url, "sample") for url in self.urls]
        else:
            raise _few_shards_error(len(self.urls), self.world_size, num_workers)
        index = 0
        pending: list[dict[str, Any]] = []
        for url, split in plan:
            # With the read_all plan every slot meets the same shard failures: slot 0 alone counts them.
            for raw in self._samples_of(url, count_shard_errors=split is None or slot == 0):
                keep = split is None or index % slots == slot
                index += 1
                if not keep:
                    continue
                self.counts.read += 1
                sample = self._decode(raw)
                if sample is None:
                    continue
                pending.append(sample)
                if len(pending) == self.batch_size:
                    yield self._collate(pending)
                    pending = []
        if pending:
            yield self._collate(pending)
        # The pass is complete: the fraction is exact now, so check it once more (a skip already checked
        # it as it happened, but only with the counts of that moment).
        self.counts.check(self.max_skip_fraction, self.skip_check_min_samples,
                          f" in reader {worker} of rank {self.rank}")
