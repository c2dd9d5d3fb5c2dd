"""``g3dr prep``: build, check and synthesise WebDataset shards.

    g3dr prep shards --src DIR --layout {release,imagenet} --out DIR [--depth-src DIR | --depth-model PATH]
                     [--resolution 128 256] [--shard-size N] [--workers W] [--shard-index I --num-shard-jobs J]
    g3dr prep validate DIR
    g3dr prep synth --out DIR --n N [--resolution 128] [--views K [--view-cameras sampled|video]]

Registering is cheap (argparse only); the handlers import the heavy modules.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from g3dr.data.shard_writer import JobSpec
    from g3dr.data.sources import FileSource


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("prep", help="prepare data: shards, validate, synth",
                                   description="Build WebDataset shards of RGB + 16-bit depth, check them, or make a synthetic set.")
    actions = parser.add_subparsers(dest="prep_action", metavar="ACTION", required=True)

    shards = actions.add_parser("shards", help="write images + depth into WebDataset shards",
                                description="Images + pseudo-depth into WebDataset shards with manifest.json and rejects.jsonl. "
                                            "Resumable: a rerun skips finished shards.")
    shards.add_argument("--src", required=True, help="input folder")
    shards.add_argument("--layout", required=True, choices=["release", "imagenet"],
                        help="release: NAME.jpg + NAME_depth.png; imagenet: train/<wnid>/*.JPEG")
    shards.add_argument("--out", required=True, help="output folder of the shards")
    depth = shards.add_mutually_exclusive_group()
    depth.add_argument("--depth-src", default="", help="folder of 16-bit depth PNGs with the images' stems")
    depth.add_argument("--depth-model", default="", metavar="PATH",
                       help="local directory of a transformers depth-estimation model (DPT, Depth Anything); needs the 'depth' extra")
    shards.add_argument("--device", default="auto", help="device of the depth model (auto: cuda when present)")
    shards.add_argument("--depth-batch", type=int, default=8, help="images per depth-model batch")
    shards.add_argument("--synsets", default="", help="synset list file (one wnid per line) that fixes class indices")
    _add_store_arguments(shards, default_resolutions=[128])
    shards.add_argument("--shard-size", type=int, default=1000, help="inputs per shard")
    shards.add_argument("--prefix", default="train", help="shard name prefix (PREFIX-000000.tar)")
    shards.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    shards.add_argument("--shard-index", type=int, default=0, help="this job's index in a job array")
    shards.add_argument("--num-shard-jobs", type=int, default=1, help="number of jobs in the array")
    shards.add_argument("--no-progress", action="store_true", help="no progress bar")
    shards.set_defaults(handler=run_shards)

    validate = actions.add_parser("validate", help="re-read and check a shard folder against its manifest")
    validate.add_argument("folder", metavar="DIR")
    validate.add_argument("--no-progress", action="store_true")
    validate.set_defaults(handler=run_validate)

    synth = actions.add_parser("synth", help="write a procedural RGB-D dataset with exact depth",
                               description="Textured primitives (sphere, cube, cylinder, cone = classes 0-3) in the "
                                           "scene box, seen from the canonical camera, exact depth in the release encoding.")
    synth.add_argument("--out", required=True)
    synth.add_argument("--n", type=int, required=True, help="number of samples")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--shard-size", type=int, default=256)
    synth.add_argument("--workers", type=int, default=1)
    synth.add_argument("--views", type=int, default=0, metavar="K",
                       help="also store K novel views per sample with exact depth (view{k}.{R}.png, "
                            "view{k}.{R}.depth.png; cameras in the json), for `g3dr eval --metrics gt_views`")
    synth.add_argument("--view-cameras", choices=["sampled", "video"], default="sampled",
                       help="sampled: drawn per sample as in training at its end; video: K points of the video path")
    synth.add_argument("--config", default="", metavar="YAML",
                       help="take the view cameras (camera.*) and the scene box (renderer.box_warp) from this "
                            "config (default: the built-in defaults)")
    _add_store_arguments(synth, default_resolutions=[128])
    synth.add_argument("--no-progress", action="store_true")
    synth.set_defaults(handler=run_synth)


def _add_store_arguments(parser: argparse.ArgumentParser, default_resolutions: list[int]) -> None:
    parser.add_argument("--resolution", type=int, nargs="+", default=default_resolutions,
                        help=f"stored square resolutions (default {default_resolutions})")
    parser.add_argument("--format", dest="image_format", choices=["jpg", "webp"], default="jpg")
    parser.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality")
    parser.add_argument("--min-size", type=int, default=64, help="reject inputs whose shorter side is smaller")
    parser.add_argument("--depth-png-level", type=int, default=0, choices=range(10), metavar="0-9",
                        help="zlib level of the depth PNGs (0: stored, fastest to decode; 9: smallest)")


def command_line(argv: Sequence[str]) -> str:
    """``g3dr ARGV`` as one shell-quoted line (what the manifest records as ``command``)."""
    return shlex.join(["g3dr", *argv])


def _command() -> str:
    return command_line(sys.argv[1:])


def _summary(result, extra: dict) -> int:
    summary = {**extra, "written_shards": result.written_shards, "skipped_shards": result.skipped_shards,
               "samples": result.samples, "rejected": result.rejected, "seconds": round(result.seconds, 2),
               "images_per_s": round(result.images_per_second, 1), "manifest": result.manifest is not None}
    if result.manifest is not None:
        summary.update(total_samples=result.manifest["num_samples"], total_rejected=result.manifest["num_rejected"],
                       rejected_by_reason=result.manifest["rejected_by_reason"], shards=result.manifest["num_shards"])
    print(json.dumps(summary, sort_keys=True))
    return 0


@dataclass(frozen=True)
class ShardsRequest:
    """One ``g3dr prep shards`` run, typed: what the command parses, and what a launched prep job (``g3dr submit prep
    shards``) carries and runs with :func:`run_shards_request`. Picklable."""

    source: FileSource
    """The inputs and how samples are stored; each run works on a copy (listing fills in the synsets)."""
    spec: JobSpec
    command: str
    """The command line that runs this request, recorded in the manifest."""
    config: dict[str, Any]
    """The parsed ``g3dr`` arguments, recorded in the manifest."""
    progress: bool = True

    def for_job(self, shard_index: int, num_jobs: int, command: str) -> ShardsRequest:
        """This request as job ``shard_index`` of ``num_jobs`` (what ``--shard-index``/``--num-shard-jobs`` set),
        run by ``command``."""
        return replace(self, spec=replace(self.spec, shard_index=shard_index, num_jobs=num_jobs), command=command,
                       config={**self.config, "shard_index": shard_index, "num_shard_jobs": num_jobs})

    def run(self) -> int:
        return run_shards_request(self)


def shards_request_from_args(args: argparse.Namespace, command: str | None = None) -> ShardsRequest:
    """The :class:`ShardsRequest` of parsed ``g3dr prep shards`` arguments; ``command`` defaults to this process's
    command line. Reads the ``--synsets`` file."""
    from g3dr.data.shard_writer import JobSpec, StoreOptions
    from g3dr.data.sources import FileSource, read_synsets

    options = StoreOptions(resolutions=tuple(args.resolution), image_format=args.image_format,
                           quality=args.quality, min_size=args.min_size, depth_png_level=args.depth_png_level)
    source = FileSource(layout=args.layout, src=args.src, options=options, depth_src=args.depth_src,
                        synsets=tuple(read_synsets(args.synsets)) if args.synsets else (),
                        depth_model=args.depth_model, depth_batch=args.depth_batch, device=args.device)
    spec = JobSpec(out=args.out, shard_size=args.shard_size, prefix=args.prefix, workers=args.workers,
                   shard_index=args.shard_index, num_jobs=args.num_shard_jobs,
                   batch=max(args.depth_batch, 1) if args.depth_model else 16)
    return ShardsRequest(source=source, spec=spec, command=_command() if command is None else command,
                         config={k: v for k, v in vars(args).items() if k != "handler"},
                         progress=not args.no_progress)


def run_shards(args: argparse.Namespace) -> int:
    return run_shards_request(shards_request_from_args(args))


def run_shards_request(request: ShardsRequest) -> int:
    """Write this job's shards of the plan (and the manifest when the plan is finished); prints a JSON summary."""
    from g3dr.data.shard_writer import run_shard_job
    from g3dr.weights import verify_for

    source, spec = request.source, request.spec
    if source.depth_model:  # the depth model's files, before any image is read
        verify_for(None, "prep", depth_model=source.depth_model, progress=request.progress)
    if source.depth_model and spec.workers > 1:
        from g3dr.data.depth_model import preload

        preload()
    result = run_shard_job(copy.deepcopy(source), spec, command=request.command, config=request.config,
                           progress=request.progress)
    return _summary(result, {"out": spec.out, "workers": spec.workers})


@dataclass(frozen=True)
class ValidateRequest:
    """One ``g3dr prep validate DIR`` run, typed (see :class:`ShardsRequest`)."""

    folder: str
    progress: bool = True

    @property
    def command(self) -> str:
        return command_line(["prep", "validate", self.folder, *([] if self.progress else ["--no-progress"])])

    def run(self) -> int:
        return run_validate_request(self)


def run_validate(args: argparse.Namespace) -> int:
    return run_validate_request(ValidateRequest(args.folder, progress=not args.no_progress))


def run_validate_request(request: ValidateRequest) -> int:
    """Check a shard folder against its manifest; logs each problem, prints a JSON summary, 1 on any problem."""
    from g3dr.data_prep.validate import validate_folder
    from g3dr.log import get_logger

    problems, summary = validate_folder(request.folder, progress=request.progress)
    log = get_logger("g3dr.data_prep")
    for problem in problems:
        log.error("%s", problem)
    print(json.dumps(summary, sort_keys=True))
    return 1 if problems else 0


def run_synth(args: argparse.Namespace) -> int:
    from g3dr.config import Config, load_config
    from g3dr.data.synth import ViewSpec, write_synthetic_shards

    cfg = load_config(args.config) if args.config else Config()
    views = ViewSpec(count=args.views, cameras=args.view_cameras, camera=cfg.camera, box_half=cfg.renderer.box_warp / 2)
    result = write_synthetic_shards(args.out, args.n, tuple(args.resolution), seed=args.seed, shard_size=args.shard_size,
                                    workers=args.workers, image_format=args.image_format, quality=args.quality,
                                    depth_png_level=args.depth_png_level,
                                    progress=not args.no_progress, command=_command(), views=views)
    return _summary(result, {"out": args.out, "workers": args.workers})
