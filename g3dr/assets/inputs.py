"""Inputs of the asset commands: one image (+ depth PNG, or depth from a depth model), a folder, or shards.

Every input becomes the same raw sample dict the data pipeline decodes (``__key__`` + bytes per
extension), so images and depths are decoded exactly like training data
(:func:`g3dr.data.pipeline.decode_sample`: centre square, Lanczos to ``data.resolution``, 16-bit depth
without an 8-bit step). When an image has no depth and a depth model is given, the depth comes from the
data-prep backend (:class:`g3dr.data.depth_model.DepthEstimator`: centre square, the model, the
per-image percentile mapping to the release encoding) and is stored as a 16-bit PNG in the sample.
Inputs that cannot be used raise :class:`Rejected` with a short reason; the batch runner counts them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from g3dr.errors import DataError

__all__ = ["IMAGE_SUFFIXES", "Rejected", "RawInput", "inputs_from_folder", "inputs_from_shards", "input_from_files",
           "DepthFiller", "rgbd_from_sample"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class Rejected(Exception):
    """An input that is skipped: ``reason`` is a short counted key, ``detail`` the human explanation."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class RawInput:
    """One input: its key (output file stem), where it came from, and its raw sample (or why it is unusable)."""

    key: str
    source: str
    sample: dict | None
    rejected: Rejected | None = None


def _image_ext(path: Path) -> str:
    return "jpg" if path.suffix.lower() in (".jpg", ".jpeg") else path.suffix.lower()[1:]


def input_from_files(image: str | Path, depth: str | Path | None) -> RawInput:
    """One image and (optionally) its 16-bit depth PNG; a missing file is a :class:`DataError`."""
    image = Path(image)
    if not image.is_file():
        raise DataError(f"image {image} does not exist")
    sample = {"__key__": image.stem, _image_ext(image): image.read_bytes()}
    if depth is not None:
        depth = Path(depth)
        if not depth.is_file():
            raise DataError(f"depth PNG {depth} does not exist")
        sample["depth.png"] = depth.read_bytes()
    return RawInput(image.stem, str(image), sample)


def inputs_from_folder(folder: str | Path) -> list[RawInput]:
    """Images under ``folder`` (recursive, sorted) with ``NAME_depth.png`` beside them when present (release layout).

    The key of an image is its path relative to ``folder`` without the suffix (``1/1551``), so outputs mirror
    the input tree.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"input folder {folder} does not exist")
    out = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.stem.endswith("_depth") or not path.is_file():
            continue
        depth = path.with_name(f"{path.stem}_depth.png")
        raw = input_from_files(path, depth if depth.is_file() else None)
        raw.key = path.relative_to(folder).with_suffix("").as_posix()
        out.append(raw)
    if not out:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return out


def inputs_from_shards(shards: list[str | Path]) -> Iterator[RawInput]:
    """Samples of WebDataset tar shards (files or folders of ``*.tar``), in order, read as the training pipeline reads
    them (:func:`g3dr.data.tar_reader.iter_samples`: WebDataset's key, the member's folder and the name up to its
    first dot, so ``1/x`` and ``2/x`` are two samples and outputs keep the folders); an unreadable shard raises a
    :class:`DataError` after the samples before the break."""
    from g3dr.data.tar_reader import iter_samples

    paths: list[Path] = []
    for item in shards:
        item = Path(item)
        if item.is_dir():
            paths += sorted(item.glob("*.tar"))
        elif item.is_file():
            paths.append(item)
        else:
            raise DataError(f"shard {item} does not exist")
    if not paths:
        raise DataError(f"no .tar shards in {', '.join(map(str, shards))}")
    for path in paths:
        try:
            with open(path, "rb") as stream:
                for sample in iter_samples(stream):
                    del sample["__url__"]  # the raw sample is __key__ + files, as for the other inputs
                    yield _shard_input(sample, path)
        except OSError as err:  # TarReadError (corrupt or truncated) is an OSError
            raise DataError(f"cannot read shard {path}: {err}") from None


def _shard_input(sample: dict, path: Path) -> RawInput:
    return RawInput(sample["__key__"], f"{path.name}:{sample['__key__']}", sample)


def _has_depth(sample: dict) -> bool:
    return any(key == "depth.png" or key.endswith(".depth.png") for key in sample if not key.startswith("__"))


class DepthFiller:
    """Adds a depth PNG from a depth model to samples that have none (loaded on first use)."""

    def __init__(self, model_path: str, device: str = "auto"):
        self.model_path = model_path
        self.device = device
        self._estimator = None

    def __call__(self, sample: dict, size: int) -> dict:
        from PIL import Image

        from g3dr.data.depth_codec import encode_u16_png
        from g3dr.data.depth_model import DepthEstimator

        if self._estimator is None:
            self._estimator = DepthEstimator(self.model_path, device=self.device)
        image_key = next((k for k in sample if not k.startswith("__") and k.rpartition(".")[2] in
                          ("jpg", "jpeg", "png", "webp") and not k.endswith("depth.png")), None)
        if image_key is None:
            raise Rejected("no_image", "the sample has no image")
        try:
            with Image.open(io.BytesIO(sample[image_key])) as image:
                image.load()
                image = image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as err:
            from g3dr.data.shard_writer import image_error_detail

            raise Rejected("corrupt_image", f"{image_key}: {image_error_detail(err)}") from None
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        square = image.crop((left, top, left + side, top + side))  # the centre square, as g3dr prep crops
        (codes,) = self._estimator.predict_codes([square], size)
        return {**sample, "depth.png": encode_u16_png(codes)}


def rgbd_from_sample(raw: RawInput, resolution: int, depth_scale: float, depth_offset: float,
                     depth_filler: DepthFiller | None = None):
    """``(rgb (1, 3, R, R) float32 in [-1, 1], depth (1, 1, R, R) float32)`` of one input, or :class:`Rejected`."""
    import torch

    from g3dr.data.pipeline import decode_sample

    if raw.rejected is not None:
        raise raw.rejected
    sample = raw.sample
    if not _has_depth(sample):
        if depth_filler is None:
            raise Rejected("missing_depth", "no depth PNG (NAME_depth.png beside the image, or pass --depth-model)")
        sample = depth_filler(sample, resolution)
    try:
        out = decode_sample(sample, resolution, depth_scale=depth_scale, depth_offset=depth_offset)
    except Exception as err:  # PIL, the depth codec and the pipeline raise many types for unusable files
        raise Rejected("undecodable", f"{type(err).__name__}: {err}") from None
    rgb = torch.as_tensor(out["rgb"])
    rgb = rgb.float() / 127.5 - 1.0 if rgb.dtype == torch.uint8 else rgb.float()
    depth = torch.as_tensor(out["depth"]).float()
    if not (torch.isfinite(rgb).all() and torch.isfinite(depth).all()):
        raise Rejected("non_finite", "decoded values are not finite")
    return rgb[None], depth[None]
