"""Generated images as lossless uint8 PNG files, and FID/IS inputs read back from such a folder.

``g3dr eval --save-images DIR`` writes the exact uint8 tensors that the in-memory path hands to the
Inception network (:func:`g3dr.metrics.inception.quantize_images` of each render), one
``NNNNNN.png`` per sample index. Reading the folder back (:func:`iter_png_batches`) yields the same
tensors, so the moments, FID and IS of the folder (:func:`folder_moments`, :func:`folder_probabilities`)
equal those of the evaluation itself (tested to 1e-6): the folder can be re-scored later, or by another
tool, without re-rendering. PNG is lossless; JPEG would not be.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from g3dr.errors import DataError
from g3dr.metrics.fid import FeatureMoments
from g3dr.metrics.inception import FEATURE_DIM, InceptionDetector


def png_name(index: int) -> str:
    """File name of sample ``index`` (zero-padded, so names sort in index order up to 10^6 - 1 and beyond)."""
    return f"{int(index):06d}.png"


def write_png_batch(images: torch.Tensor, indices: Sequence[int], folder: str | Path) -> list[Path]:
    """Write uint8 images ``(N, 3, H, W)`` as ``folder/<png_name(index)>``; returns the paths.

    Each file is written under a temporary name and renamed, so a reader never sees half a PNG.
    """
    from PIL import Image

    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if len(indices) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(indices)} indices")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = images.detach().cpu().permute(0, 2, 3, 1).numpy()
    paths = []
    for array, index in zip(arrays, indices):
        path = folder / png_name(index)
        tmp = folder / f".{path.name}.tmp"
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")
        tmp.replace(path)
        paths.append(path)
    return paths


def list_pngs(folder: str | Path) -> list[Path]:
    """The ``*.png`` files of ``folder`` (not hidden ones), sorted by name; a missing or empty folder is a
    :class:`~g3dr.errors.DataError`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} not found")
    paths = sorted(p for p in folder.glob("*.png") if not p.name.startswith("."))
    if not paths:
        raise DataError(f"no .png files in {folder}")
    return paths


def read_png(path: str | Path) -> torch.Tensor:
    """One 8-bit RGB PNG as uint8 ``(3, H, W)``; other modes (16-bit, palette, grey, alpha) are refused,
    since converting them would score different pixels than the evaluation did."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode != "RGB":
            raise DataError(f"{path}: PNG mode {image.mode}, expected 8-bit RGB (as g3dr eval --save-images writes)")
        array = np.array(image)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def iter_png_batches(folder: str | Path, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 batches ``(B, 3, H, W)`` of the folder's PNGs in name order; all images must share one size."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    paths = list_pngs(folder)
    size = None
    for start in range(0, len(paths), batch_size):
        batch = [read_png(p) for p in paths[start:start + batch_size]]
        for path, image in zip(paths[start:], batch):
            if size is None:
                size = image.shape
            elif image.shape != size:
                raise DataError(f"{path}: size {tuple(image.shape[1:])} differs from the folder's {tuple(size[1:])}")
        yield torch.stack(batch)


def folder_moments(folder: str | Path, detector: InceptionDetector, batch_size: int = 64) -> FeatureMoments:
    """float64 Inception feature moments of every PNG in ``folder`` (FID: ``frechet_distance(*m.mean_cov(),
    mu_ref, sigma_ref)``)."""
    moments = FeatureMoments(FEATURE_DIM)
    for images in iter_png_batches(folder, batch_size):
        moments.update(detector.features(images))
    return moments


def folder_probabilities(folder: str | Path, detector: InceptionDetector, batch_size: int = 64) -> np.ndarray:
    """Bias-free Inception class probabilities ``(N, 1008)`` (float64) of the folder's PNGs in name order
    (IS: ``inception_score(p, splits, seed)``)."""
    parts = [detector.probabilities(images).double().numpy() for images in iter_png_batches(folder, batch_size)]
    return np.concatenate(parts)


def score_folder(folder: str | Path, detector: InceptionDetector, stats_file: str | Path | None = None,
                 is_splits: int | None = 10, seed: int | None = 0, batch_size: int = 64) -> dict[str, float]:
    """FID (against the reference statistics file written by the eval cache, when given) and IS (when
    ``is_splits``) of the PNGs in ``folder``; ``{"count", "fid", "is", "is_std"}`` as available.

    The statistics file must have been made with the same Inception file (its stored ``detector`` sha256)
    and at the folder's image size (its ``resolution``): otherwise a :class:`~g3dr.errors.DataError`,
    since the distance would not follow the protocol.
    """
    from g3dr.metrics.fid import frechet_distance, load_moments
    from g3dr.metrics.inception_score import inception_score

    out: dict[str, float] = {}
    reference = None
    if stats_file is not None:
        try:
            mu_ref, sigma_ref, count_ref, meta = load_moments(stats_file)
        except Exception as err:
            raise DataError(f"cannot read reference statistics {stats_file} ({type(err).__name__}: {err})") from None
        if mu_ref.shape != (FEATURE_DIM,) or sigma_ref.shape != (FEATURE_DIM, FEATURE_DIM):
            raise DataError(f"{stats_file}: statistics of shape {mu_ref.shape}, expected ({FEATURE_DIM},)")
        if meta.get("detector") and meta["detector"] != detector.sha256:
            raise DataError(f"{stats_file} was made with the Inception file of sha256 {meta['detector'][:12]}..., "
                            f"not {detector.path} ({detector.sha256[:12]}...); use the same file for both")
        reference = (mu_ref, sigma_ref, meta)
    first = read_png(list_pngs(folder)[0])
    if reference is not None and reference[2].get("resolution") not in (None, str(first.shape[-1])):
        raise DataError(f"{folder} holds {first.shape[-1]} px images but {stats_file} is of "
                        f"{reference[2]['resolution']} px reference images")
    if reference is not None:
        moments = folder_moments(folder, detector, batch_size)
        out["count"] = float(moments.count)
        out["fid"] = frechet_distance(*moments.mean_cov(), reference[0], reference[1])
    if is_splits:
        probs = folder_probabilities(folder, detector, batch_size)
        out["count"] = float(probs.shape[0])
        out["is"], out["is_std"] = inception_score(probs, is_splits, seed=seed)
    return out
