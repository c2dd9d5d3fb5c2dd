"""``g3dr prep validate``: re-read a shard folder and check it against its manifest.

Checks every shard's size and sha256, decodes every sample (each stored image at its resolution, each
16-bit depth PNG, the class and the metadata, and the novel views a synthetic sample's metadata lists at
every stored resolution), compares per-shard counts and the totals with the
manifest and ``rejects.jsonl``. Returns the list of problems; the CLI exits non-zero when it is not empty.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

from PIL import Image

from g3dr.data.depth_codec import decode_u16_png
from g3dr.data.shard_writer import MANIFEST, REJECTS, empty_dataset_message, sha256_file
from g3dr.data.tar_reader import iter_samples
from g3dr.errors import DataError
from g3dr.log import get_logger

log = get_logger("g3dr.data_prep")
_IMAGE_EXT = re.compile(r"^(\d+)\.(jpg|webp)$")
_DEPTH_EXT = re.compile(r"^(\d+)\.depth\.png$")


def load_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DataError(f"no {MANIFEST} in {folder}; is this a shard folder written by 'g3dr prep shards' "
                        "(and did every shard job finish)?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}); rerun 'g3dr prep shards' to rewrite it") from None


def check_sample(key: str, files: dict[str, bytes], resolutions: list[int]) -> list[str]:
    """Problems of one sample (empty when it decodes completely)."""
    problems = []
    images = {int(m.group(1)): ext for ext in files if (m := _IMAGE_EXT.match(ext))}
    depths = {int(m.group(1)): ext for ext in files if (m := _DEPTH_EXT.match(ext))}
    for res in resolutions:
        if res not in images:
            problems.append(f"{key}: no image at resolution {res}")
        else:
            try:
                with Image.open(io.BytesIO(files[images[res]])) as image:
                    image.load()
                    if image.size != (res, res) or image.mode != "RGB":
                        problems.append(f"{key}: image {images[res]} is {image.mode} {image.size}, expected RGB {res}x{res}")
            except Exception as err:  # noqa: BLE001 - any decoder failure is a problem to report
                problems.append(f"{key}: image {images[res]} does not decode: {err}")
        if res not in depths:
            problems.append(f"{key}: no depth at resolution {res}")
        else:
            try:
                codes = decode_u16_png(files[depths[res]])
                if codes.shape != (res, res):
                    problems.append(f"{key}: depth {depths[res]} is {codes.shape}, expected ({res}, {res})")
            except Exception as err:  # noqa: BLE001
                problems.append(f"{key}: depth {depths[res]} does not decode: {err}")
    try:
        int(files["cls"].decode())
    except (KeyError, ValueError, UnicodeDecodeError):
        problems.append(f"{key}: missing or invalid cls")
    try:
        meta = json.loads(files["json"])
    except (KeyError, ValueError):
        problems.append(f"{key}: missing or invalid json")
        return problems
    if isinstance(meta, dict) and meta.get("views"):
        from g3dr.data.pipeline import decode_views

        for res in resolutions:
            try:
                decode_views({"__key__": key, **files}, res)
            except Exception as err:  # noqa: BLE001
                problems.append(f"{key}: stored views at {res} px do not decode: {err}")
    return problems


def read_tar_samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """All samples of a tar in order as ``(key, {ext: bytes})``, read as the training pipeline reads them
    (:func:`g3dr.data.tar_reader.iter_samples`: a corrupt header or a cut stream raises
    :class:`~g3dr.data.tar_reader.TarReadError`, a member repeated inside a sample starts a second sample with the
    same key)."""
    with open(path, "rb") as stream:
        return [(sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")})
                for sample in iter_samples(stream, str(path))]


def validate_folder(folder: str | Path, progress: bool = True) -> tuple[list[str], dict[str, Any]]:
    """(problems, summary) of a shard folder."""
    from tqdm import tqdm

    folder = Path(folder)
    manifest = load_manifest(folder)
    resolutions = list(manifest.get("source", {}).get("resolutions", []))
    problems: list[str] = []
    total = 0
    keys: set[str] = set()
    bar = tqdm(total=manifest.get("num_samples", 0), unit="sample", desc="validate", disable=not progress)
    for shard in manifest["shards"]:
        path = folder / shard["name"]
        if not path.is_file():
            problems.append(f"{shard['name']}: missing")
            continue
        if path.stat().st_size != shard["bytes"]:
            problems.append(f"{shard['name']}: {path.stat().st_size} bytes, manifest says {shard['bytes']}")
        if sha256_file(path) != shard["sha256"]:
            problems.append(f"{shard['name']}: sha256 differs from the manifest (corrupt or modified)")
        try:
            samples = read_tar_samples(path)
        except (OSError, ValueError) as err:  # TarReadError is an OSError; a bad PAX record a ValueError
            problems.append(f"{shard['name']}: unreadable tar: {err}")
            continue
        if len(samples) != shard["samples"]:
            problems.append(f"{shard['name']}: {len(samples)} samples, manifest says {shard['samples']}")
        for key, files in samples:
            if key in keys:
                problems.append(f"{shard['name']}: duplicate key {key}")
            keys.add(key)
            problems += [f"{shard['name']}: {p}" for p in check_sample(key, files, resolutions)]
        total += len(samples)
        bar.update(len(samples))
    bar.close()
    listed = {shard["name"] for shard in manifest["shards"]}
    for extra in sorted(p.name for p in folder.glob("*.tar") if p.name not in listed):
        problems.append(f"{extra}: in the folder but not in the manifest (left from another run?)")
    if total != manifest["num_samples"]:
        problems.append(f"{total} samples in the shards, manifest says {manifest['num_samples']}")
    rejects_path = folder / REJECTS
    num_rejects = len(rejects_path.read_text().splitlines()) if rejects_path.is_file() else None
    if num_rejects is None:
        problems.append(f"{REJECTS} is missing")
    elif num_rejects != manifest["num_rejected"]:
        problems.append(f"{REJECTS} has {num_rejects} lines, manifest says {manifest['num_rejected']}")
    if manifest["num_samples"] == 0:
        problems.append(empty_dataset_message(folder, manifest))
    if manifest["num_samples"] + manifest["num_rejected"] != manifest["num_inputs"]:
        problems.append(f"manifest: inputs {manifest['num_inputs']} != samples {manifest['num_samples']} "
                        f"+ rejected {manifest['num_rejected']}")
    summary = {"folder": str(folder), "shards": len(manifest["shards"]), "samples": total,
               "rejected": manifest["num_rejected"], "problems": len(problems)}
    return problems, summary
