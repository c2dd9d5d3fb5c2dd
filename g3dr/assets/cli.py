"""``g3dr mesh`` (one image -> mesh), ``g3dr batch`` (a folder or shards -> a folder of assets), ``g3dr generate``.

Registering is cheap (no torch import); the handlers import the heavy code. See ``docs/assets.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from g3dr.errors import ConfigError
from g3dr.models.render_cli import add_model_arguments, add_sr_arguments, model_from_args, sr_from_args

_CKPT_HELP = "f_trigen .safetensors checkpoint (ours; convert the reference's with 'g3dr import-official')"
_DEPTH_MODEL_HELP = ("depth-model folder (transformers, as for 'g3dr prep shards --depth-model'), used for images "
                     "without a depth PNG")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help=_CKPT_HELP)
    parser.add_argument("--depth-model", metavar="DIR", help=_DEPTH_MODEL_HELP)
    add_model_arguments(parser)
    add_mesh_arguments(parser)


def add_mesh_arguments(parser: argparse.ArgumentParser) -> None:
    """``--grid``, ``--threshold``, ``--keep-components``: the mesh extraction of ``mesh``, ``batch``, ``generate``."""
    parser.add_argument("--grid", type=int, default=128, metavar="N",
                        help="mesh: density samples per axis over the scene box (default 128)")
    parser.add_argument("--threshold", type=float, default=5.0, metavar="SIGMA",
                        help="mesh: iso-level on the activated density (default 5: a 0.2 thick layer is 63%% opaque)")
    parser.add_argument("--keep-components", type=int, metavar="K",
                        help="mesh: keep only the K largest connected components (drops floaters; default: all)")


def asset_options(args: argparse.Namespace):
    """The :class:`AssetOptions` of the asset-output flags (``_add_asset_outputs``)."""
    from g3dr.assets.export import AssetOptions

    return AssetOptions(png=args.png, npz=args.npz, video=[f".{v}" for v in dict.fromkeys(args.video)],
                        mesh=[f".{m}" for m in dict.fromkeys(args.mesh)], frames=args.frames, fps=args.fps,
                        resolution=args.resolution, grid=args.grid, threshold=args.threshold, seed=args.seed,
                        keep_components=args.keep_components, sheet=args.sheet)


def _add_asset_outputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--png", action="store_true", help="write the canonical render as NAME.png")
    parser.add_argument("--npz", action="store_true",
                        help="write the canonical render's float32 rgb, depth, weight_sum as NAME.npz")
    parser.add_argument("--video", action="append", default=[], choices=["mp4", "gif"],
                        help="write the circular video (RGB | colourised depth) as NAME.mp4 / NAME.gif (repeatable)")
    parser.add_argument("--mesh", action="append", default=[], choices=["ply", "glb", "obj"],
                        help="write the mesh as NAME.ply / .glb / .obj (repeatable)")
    parser.add_argument("--sheet", action="store_true",
                        help="write a labelled contact sheet NAME.sheet.png: input, canonical render, 4 novel views, "
                             "depth, mesh")
    parser.add_argument("--frames", type=int, default=128, help="video frames (default 128)")
    parser.add_argument("--fps", type=int, default=40, help="video frame rate (default 40)")
    parser.add_argument("--resolution", type=int, help="render resolution (default: the checkpoint's data.resolution)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the renderer's random sampling")
    add_sr_arguments(parser)


def register(subparsers: argparse._SubParsersAction) -> None:
    mesh = subparsers.add_parser(
        "mesh", help="lift one image to a coloured mesh (.ply/.glb/.obj)",
        description="Build the triplane of IMAGE (+ DEPTH, or depth from --depth-model), sample its density on a "
                    "grid over the scene box, extract the iso-surface with marching cubes and colour the vertices "
                    "with the decoder. The mesh is in the viewer frame (the input camera on +z, up +y).",
        epilog="Example: g3dr mesh --checkpoint g3dr.safetensors --image cat.jpg --depth cat_depth.png --out cat.glb")
    _add_common(mesh)
    mesh.add_argument("--image", required=True, metavar="IMG")
    mesh.add_argument("--depth", metavar="DEPTH_PNG", help="16-bit release-format depth PNG (or use --depth-model)")
    mesh.add_argument("--out", required=True, metavar="OUT", help="mesh file: .ply, .glb or .obj")
    mesh.set_defaults(handler=run_mesh)

    batch = subparsers.add_parser(
        "batch", help="lift a folder of images (or shards) to a folder of renders, videos and meshes",
        description="Every image of --input (a folder in the release layout: NAME.jpg beside NAME_depth.png; or "
                    "WebDataset shards with --shards) is lifted with the checkpoint and written to --out as "
                    "NAME.<ext> per requested output. Inputs that cannot be used are skipped with a counted, logged "
                    "reason; --out/summary.json records inputs = written + rejected.",
        epilog="Example: g3dr batch --checkpoint g3dr.safetensors --input photos/ --out assets/ --png --video mp4 "
               "--mesh glb --depth-model weights/depth-anything-v2-small")
    _add_common(batch)
    source = batch.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", metavar="DIR",
                        help="folder of images, searched recursively (depth as NAME_depth.png "
                        "beside them); outputs mirror its tree")
    source.add_argument("--shards", nargs="+", metavar="TAR", help="WebDataset shards (files or folders of *.tar)")
    batch.add_argument("--out", required=True, metavar="DIR")
    batch.add_argument("--no-progress", action="store_true")
    _add_asset_outputs(batch)
    batch.set_defaults(handler=run_batch)




def _depth_filler(args):
    from g3dr.assets.inputs import DepthFiller

    return DepthFiller(args.depth_model, device=args.device) if args.depth_model else None


def run_mesh(args: argparse.Namespace) -> int:
    import torch

    from g3dr.assets.inputs import Rejected, input_from_files, rgbd_from_sample
    from g3dr.assets.mesh import MESH_FORMATS, TriplaneField, extract_mesh, write_mesh
    from g3dr.errors import DataError
    from g3dr.log import get_logger

    log = get_logger("g3dr.assets")
    suffix = Path(args.out).suffix.lower()
    if suffix not in MESH_FORMATS:
        raise ConfigError(f"--out {args.out} must end in one of {', '.join(MESH_FORMATS)}")
    if args.depth is None and args.depth_model is None:
        raise ConfigError("give --depth DEPTH_PNG or --depth-model DIR (to estimate the depth)")
    model, cfg, meta, device = model_from_args(args)
    raw = input_from_files(args.image, args.depth)
    try:
        rgb, depth = rgbd_from_sample(raw, cfg.data.resolution, cfg.data.depth_scale, cfg.data.depth_offset,
                                      _depth_filler(args))
    except Rejected as err:
        raise DataError(f"cannot use {args.image}: {err.detail}") from None
    with torch.no_grad():
        planes = model.make_planes(rgb.to(device), depth.to(device))
    field = TriplaneField(planes, model.decoder, model.renderer)
    if args.keep_components is not None and args.keep_components < 1:
        raise ConfigError(f"--keep-components must be >= 1, got {args.keep_components}")
    mesh = extract_mesh(field, resolution=args.grid, threshold=args.threshold, box_warp=cfg.renderer.box_warp,
                        keep_components=args.keep_components, progress=True)
    write_mesh(mesh, args.out)
    log.info("wrote %s", args.out)
    print(f"mesh of {args.image}: {len(mesh.vertices)} vertices, {len(mesh.faces)} faces "
          f"(grid {args.grid}, threshold {args.threshold}) -> {args.out}")
    return 0


def run_batch(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from g3dr.assets.export import export_assets
    from g3dr.assets.inputs import Rejected, inputs_from_folder, inputs_from_shards, rgbd_from_sample
    from g3dr.errors import DataError
    from g3dr.models.inference import describe_sizes
    from g3dr.log import get_logger

    log = get_logger("g3dr.assets")
    options = asset_options(args)
    options.check()
    if args.input and Path(args.out).resolve() == Path(args.input).resolve():
        raise ConfigError(f"--out {args.out} is the input folder: outputs (NAME.png, ...) could overwrite inputs")
    model, cfg, meta, device = model_from_args(args)
    sr = sr_from_args(args, cfg, device)
    resolution = options.resolution or cfg.data.resolution
    log.info("%s", describe_sizes(sr, resolution))
    inputs = inputs_from_folder(args.input) if args.input else inputs_from_shards(args.shards)
    total = len(inputs) if isinstance(inputs, list) else None
    filler = _depth_filler(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written, rejected, seen_keys = 0, Counter(), set()
    rejected_items = []
    started = time.time()
    for raw in tqdm(inputs, total=total, desc="batch", unit="image", disable=args.no_progress):
        try:
            if raw.key.startswith("/") or ".." in raw.key.split("/") or not raw.key.strip("/."):
                raise Rejected("unsafe_key", f"the sample key {raw.key!r} would write outside --out")
            if raw.key in seen_keys:
                raise Rejected("duplicate_key", f"another input already wrote {raw.key}.*")
            seen_keys.add(raw.key)
            rgb, depth = rgbd_from_sample(raw, cfg.data.resolution, cfg.data.depth_scale, cfg.data.depth_offset, filler)
            with torch.no_grad():
                planes = model.make_planes(rgb.to(device), depth.to(device))
            try:
                export_assets(model, planes, out / raw.key, options, source=rgb, sr=sr)
            except DataError as err:  # e.g. nothing above the mesh threshold
                raise Rejected("export_failed", str(err)) from None
            written += 1
        except Rejected as err:
            rejected[err.reason] += 1
            rejected_items.append({"key": raw.key, "source": raw.source, "reason": err.reason, "detail": err.detail})
            log.warning("skipped %s (%s): %s", raw.source, err.reason, err.detail)
    inputs_count = written + sum(rejected.values())
    summary = {"checkpoint": str(args.checkpoint), "step": meta.get("step"), "inputs": inputs_count,
               "written": written, "rejected": sum(rejected.values()), "rejected_by_reason": dict(rejected),
               "rejected_items": rejected_items, "outputs": _output_names(options),
               "rgb_resolution": resolution * (sr.scale if sr is not None else 1), "depth_resolution": resolution,
               "super_resolution": None if sr is None else {"weights": sr.path, "source": sr.source,
                                                            "architecture": sr.architecture},
               "seconds": round(time.time() - started, 3)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(f"batch: {inputs_count} inputs, {written} written, {summary['rejected']} rejected "
          f"{dict(rejected) if rejected else ''} -> {out}")
    return 0 if written else 1


def _output_names(options) -> list[str]:
    names = [".png"] if options.png else []
    names += [".npz"] if options.npz else []
    return names + options.video + options.mesh
