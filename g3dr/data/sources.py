"""Inputs of ``g3dr prep shards``: discovery of the work items and the preparation of one sample.

A *source* lists its items deterministically (sorted by key) and turns a batch of items into prepared
samples (the files of one WebDataset sample) or :class:`Rejected` records. Sources are picklable so that
worker processes can run them. Layouts:

- ``release``: ``NAME.jpg`` beside ``NAME_depth.png`` (16-bit) anywhere under ``--src``, as in the G3DR
  release; the label is the index of the stem's synset in ``--synsets`` when the stem starts with one,
  otherwise -1 (unknown).
- ``imagenet``: ``SRC/train/<wnid>/*.JPEG`` (or ``SRC/<wnid>/*.JPEG``); the label is the index of the wnid
  in the sorted synset list (or in ``--synsets``); depth from ``--depth-src`` with the same stems, or
  computed by a depth model (``--depth-model``).
- ``synthetic``: procedural primitives with exact depth live in the library (:mod:`g3dr.data.synth`).

Sample files (WebDataset extensions): ``{res}.jpg`` or ``{res}.webp`` (RGB), ``{res}.depth.png`` (uint16,
release encoding) for each stored resolution, ``cls`` (class index as text), ``json`` (metadata).
Images are centre-cropped to a square, then resized with Lanczos; image and depth are cropped alike.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from PIL import Image, ImageFile

from g3dr.data.depth_codec import encode_u16_png, u16_from_image
from g3dr.data.shard_writer import (Item, Prepared, Rejected, StoreOptions, centre_square, encode_image,
                                   image_error_detail, input_problem)
from g3dr.errors import DataError

__all__ = ["FileSource", "Item", "Prepared", "Rejected", "StoreOptions", "centre_square", "encode_image",
           "load_depth_codes", "load_rgb", "read_synsets", "resize_codes", "store_files"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
WNID_RE = re.compile(r"^(n\d{8})(?:_|$)")


class RejectError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def sanitize_key(text: str) -> str:
    """WebDataset splits a member name at the first dot of its last component: keys must have none."""
    return text.replace(".", "_").replace(" ", "_")


def read_synsets(path: str | Path) -> list[str]:
    """A synset list (first token of each non-empty line, e.g. ``LOC_synset_mapping.txt``), in file order."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise DataError(f"cannot read the synset list {path}: {err}") from None
    return [line.split()[0] for line in lines if line.strip()]


# --------------------------------------------------------------------------------------------------
# Image helpers
# --------------------------------------------------------------------------------------------------


def load_rgb(path: str) -> tuple[Image.Image, bytes, str]:
    """Open and fully decode an image; returns (RGB image, original bytes, original mode).

    Truncated or corrupt files raise :class:`RejectError` (PIL decodes lazily: ``load()`` forces it).
    CMYK, grayscale, palette and alpha images are converted to RGB, not rejected.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; truncated inputs would pass silently")
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode = image.mode
            rgb = image.convert("RGB") if mode != "RGB" else image.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise RejectError("corrupt_image", f"{Path(path).name}: {image_error_detail(err)}") from None
    return rgb, data, mode


def load_depth_codes(path: str) -> np.ndarray:
    """(H, W) uint16 codes of a 16-bit depth PNG; missing, corrupt or 8-bit files raise :class:`RejectError`."""
    if not path or not Path(path).is_file():
        raise RejectError("missing_depth", f"no depth file {path or '(none found)'}")
    try:
        with Image.open(path) as image:
            image.load()
            return u16_from_image(image, what=f"depth {Path(path).name}")
    except DataError as err:
        raise RejectError("depth_not_16bit", str(err)) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise RejectError("corrupt_depth", f"{Path(path).name}: {image_error_detail(err)}") from None


def resize_codes(codes: np.ndarray, size: int) -> np.ndarray:
    """Lanczos resize of uint16 depth codes (as float, so no 8-bit step), back to the nearest uint16."""
    if codes.shape == (size, size):
        return codes
    image = Image.fromarray(codes.astype(np.float32), mode="F").resize((size, size), Image.Resampling.LANCZOS)
    return np.clip(np.rint(np.asarray(image)), 0, 65535).astype(np.uint16)


def store_files(key: str, image: Image.Image, image_bytes: bytes | None, codes: np.ndarray, label: int,
                meta: dict[str, Any], options: StoreOptions) -> dict[str, bytes]:
    """The files of one sample from a square RGB image and square depth codes (any sizes).

    ``image_bytes`` (the original JPEG) is stored unchanged where the image needs no resize, so the
    release data keeps its exact pixels at its own resolution.
    """
    files: dict[str, bytes] = {}
    for res in options.resolutions:
        if image.size == (res, res) and image_bytes is not None and options.image_format == "jpg":
            files[f"{res}.jpg"] = image_bytes
        else:
            resized = image if image.size == (res, res) else image.resize((res, res), Image.Resampling.LANCZOS)
            files[f"{res}.{options.image_format}"] = encode_image(resized, options)
        files[f"{res}.depth.png"] = encode_u16_png(resize_codes(codes, res), options.depth_png_level)
    files["cls"] = str(label).encode()
    files["json"] = json.dumps(meta, sort_keys=True).encode()
    return files


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


@dataclass
class FileSource:
    """Release or ImageNet layout with depth from files."""

    layout: Literal["release", "imagenet"]
    src: str
    options: StoreOptions
    depth_src: str = ""
    synsets: tuple[str, ...] = ()
    depth_model: str = ""
    """When set, depth comes from this model directory (see :mod:`g3dr.data.depth_model`)."""
    depth_batch: int = 8
    device: str = "auto"
    _estimator: Any = field(default=None, repr=False, compare=False)
    _listing: dict[Path, frozenset[str]] = field(default_factory=dict, repr=False, compare=False)

    def describe(self) -> dict[str, Any]:
        """What decides the shard contents (goes into the plan fingerprint and the manifest); call after
        :meth:`list_items`, which fixes the synset list of the imagenet layout. ``synsets[label]`` names a class."""
        return {"layout": self.layout, "src": str(Path(self.src).resolve()), "depth_src": self.depth_src,
                "depth_model": self.depth_model, "synsets": list(self.synsets), **self.options.to_json()}

    # ---- discovery -------------------------------------------------------------------------------

    def list_items(self) -> list[Item]:
        root = Path(self.src)
        if not root.is_dir():
            raise DataError(f"--src {root} is not a directory")
        try:
            items = self._list_release(root) if self.layout == "release" else self._list_imagenet(root)
        finally:
            self._listing = {}  # not needed after listing; would be copied into every worker
        if not items:
            raise DataError(f"no input images found under {root} for layout '{self.layout}'; check --src and --layout")
        keys = [item.key for item in items]
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})[:5]
            raise DataError(f"duplicate sample keys {dup} under {root}; rename the files so that stems are unique")
        return sorted(items, key=lambda item: item.key)

    def _label(self, stem: str, wnid: str = "") -> tuple[int, str]:
        match = WNID_RE.match(stem)
        synset = wnid or (match.group(1) if match else "")
        if synset and synset in self.synsets:
            return self.synsets.index(synset), synset
        return -1, synset

    # Listing touches each directory once (os.walk / os.listdir, no stat per file): an ImageNet job lists
    # 1.3M files, and every job of a SLURM array lists them again, often on a network file system.

    def _list_release(self, root: Path) -> list[Item]:
        items = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames.sort()
            folder = Path(dirpath)
            self._listing[folder] = frozenset(filenames)
            for name in sorted(filenames):
                stem, suffix = os.path.splitext(name)
                if suffix.lower() not in IMAGE_SUFFIXES or stem.endswith("_depth"):
                    continue
                path = folder / name
                rel = path.relative_to(root).with_suffix("")
                key = "/".join(sanitize_key(part) for part in rel.parts)
                depth = self._depth_for(stem, folder, folder.name)
                label, synset = self._label(stem)
                items.append(Item(key=key, image=str(path), depth=depth, label=label, synset=synset))
        return items

    def _list_imagenet(self, root: Path) -> list[Item]:
        train = root / "train" if (root / "train").is_dir() else root
        wnid_dirs = sorted(Path(entry.path) for entry in os.scandir(train) if entry.is_dir())
        if not self.synsets:
            self.synsets = tuple(p.name for p in wnid_dirs)
        items = []
        for wnid_dir in wnid_dirs:
            for name in sorted(os.listdir(wnid_dir)):
                stem, suffix = os.path.splitext(name)
                if suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                depth = self._depth_for(stem, None, wnid_dir.name)
                label, synset = self._label(stem, wnid_dir.name)
                items.append(Item(key=sanitize_key(stem), image=str(wnid_dir / name), depth=depth, label=label,
                                  synset=synset))
        return items

    def _names_in(self, folder: Path) -> frozenset[str]:
        if folder not in self._listing:
            try:
                self._listing[folder] = frozenset(os.listdir(folder))
            except OSError:
                self._listing[folder] = frozenset()
        return self._listing[folder]

    def _depth_for(self, stem: str, beside: Path | None, wnid: str) -> str:
        """The depth file of an image: ``--depth-src`` (``<wnid>/<stem>[_depth].png`` or ``<stem>[_depth].png``), else beside it."""
        if self.depth_model:
            return ""
        candidates: list[Path] = []
        if self.depth_src:
            base = Path(self.depth_src)
            for folder in (base / wnid, base):
                candidates += [folder / f"{stem}_depth.png", folder / f"{stem}.png"]
        elif beside is not None:
            candidates.append(beside / f"{stem}_depth.png")
        for candidate in candidates:
            if candidate.name in self._names_in(candidate.parent):
                return str(candidate)
        return str(candidates[0]) if candidates else ""

    # ---- preparation -----------------------------------------------------------------------------

    def prepare_batch(self, items: Sequence[Item]) -> list[Prepared | Rejected]:
        if self.depth_model:
            return self._prepare_with_model(items)
        return [self._prepare_one(item) for item in items]

    def _source_name(self, item: Item) -> str:
        try:
            return str(Path(item.image).relative_to(self.src))
        except ValueError:
            return item.image

    def _load_checked(self, item: Item) -> tuple[Image.Image, bytes, str]:
        image, data, mode = load_rgb(item.image)
        problem = input_problem(image.size, None, self.options.min_size)
        if problem:
            raise RejectError(*problem)
        return image, data, mode

    def _meta(self, item: Item, image: Image.Image, mode: str, crop, depth_source: str, mapping: dict) -> dict:
        return {"key": item.key, "source": self._source_name(item), "synset": item.synset, "label": item.label,
                "orig_size": list(image.size), "orig_mode": mode, "converted_to_rgb": mode != "RGB",
                "crop": list(crop), "depth_source": depth_source, "depth_mapping": mapping}

    def _prepare_one(self, item: Item) -> Prepared | Rejected:
        try:
            image, data, mode = self._load_checked(item)
            codes = load_depth_codes(item.depth)
            if codes.shape[::-1] != image.size:
                problem = input_problem(image.size, codes.shape[::-1], self.options.min_size)
                if problem:
                    raise RejectError(*problem)
                resized = Image.fromarray(codes.astype(np.float32), mode="F").resize(image.size, Image.Resampling.LANCZOS)
                codes = np.clip(np.rint(np.asarray(resized)), 0, 65535).astype(np.uint16)
        except RejectError as err:
            return Rejected(item.key, self._source_name(item), err.reason, err.detail)
        crop = centre_square(*image.size)
        square = image.crop(crop) if crop != (0, 0, *image.size) else image
        keep_bytes = data if (crop == (0, 0, *image.size) and mode == "RGB" and data[:2] == b"\xff\xd8") else None
        codes = codes[crop[1]:crop[3], crop[0]:crop[2]]
        depth_source = f"file:{Path(item.depth).name}"
        mapping = {"kind": "identity", "encoding": "v / 65536 * 2 + 4"}
        meta = self._meta(item, image, mode, crop, depth_source, mapping)
        return Prepared(item.key, store_files(item.key, square, keep_bytes, codes, item.label, meta, self.options))

    def _prepare_with_model(self, items: Sequence[Item]) -> list[Prepared | Rejected]:
        from g3dr.data.depth_model import DepthEstimator

        if self._estimator is None:
            self._estimator = DepthEstimator(self.depth_model, device=self.device)
        results: list[Prepared | Rejected | None] = [None] * len(items)
        loaded = []
        for i, item in enumerate(items):
            try:
                image, data, mode = self._load_checked(item)
            except RejectError as err:
                results[i] = Rejected(item.key, self._source_name(item), err.reason, err.detail)
                continue
            crop = centre_square(*image.size)
            square = image.crop(crop) if crop != (0, 0, *image.size) else image
            keep = data if (crop == (0, 0, *image.size) and mode == "RGB" and data[:2] == b"\xff\xd8") else None
            loaded.append((i, item, image, mode, crop, square, keep))
        size = max(self.options.resolutions)
        for start in range(0, len(loaded), self.depth_batch):
            chunk = loaded[start:start + self.depth_batch]
            codes_list = self._estimator.predict_codes([entry[5] for entry in chunk], size)
            for (i, item, image, mode, crop, square, keep), codes in zip(chunk, codes_list):
                meta = self._meta(item, image, mode, crop, f"model:{self._estimator.name}", self._estimator.mapping)
                results[i] = Prepared(item.key, store_files(item.key, square, keep, codes, item.label, meta, self.options))
        return results  # type: ignore[return-value]
