"""``g3dr render``: lift one RGB-D image to a triplane with a checkpoint and render a view or a video.

The image and its release-format depth PNG are decoded as training data are (centre square, Lanczos
resize to ``data.resolution``, 16-bit depth decoded without an 8-bit step;
:func:`g3dr.models.inference.load_rgbd`). Views are rendered as the reference code renders for evaluation and
videos: without the depth prior (``--depth-prior`` renders the canonical view as in training instead). The command's
flags become the typed arguments of :mod:`g3dr.models.inference`; ``add_sr_arguments`` is shared with the commands
that take ``--sr`` / ``--no-sr``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from g3dr.errors import ConfigError, DataError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "render", help="render the canonical view, a novel view or a video of one RGB-D image",
        description="Build the triplane of IMAGE + DEPTH with a checkpoint (ours; convert the reference's with "
                    "'g3dr import-official') and render it. Without --yaw/--pitch/--video the canonical (input) "
                    "view is rendered. Angles are absolute spherical angles in radians (3DGP convention: the "
                    "canonical view is yaw = pitch = pi/2).",
        epilog="Example: g3dr render --checkpoint g3dr.safetensors --image cat.jpg --depth cat_depth.png "
               "--yaw 1.77 --deterministic --png novel.png --save-npz novel.npz")
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="f_trigen .safetensors checkpoint")
    parser.add_argument("--image", required=True, metavar="IMG", help="RGB image (jpg/png)")
    parser.add_argument("--depth", metavar="DEPTH_PNG",
                        help="16-bit release-format depth PNG (depth = v / 65536 * 2 + 4); or use --depth-model")
    parser.add_argument("--depth-model", metavar="DIR",
                        help="estimate the depth with this depth-model folder (as 'g3dr prep shards --depth-model'); "
                             "needs the 'depth' extra")
    view = parser.add_mutually_exclusive_group()
    view.add_argument("--video", metavar="OUT.mp4",
                      help="render the circular video trajectory (paper S.6) to an .mp4 or .gif: RGB | colourised "
                           "depth side by side")
    view.add_argument("--yaw", type=float, help="camera yaw in radians (default: canonical)")
    parser.add_argument("--pitch", type=float, help="camera pitch in radians (default: canonical)")
    add_model_arguments(parser)
    parser.add_argument("--depth-prior", action="store_true",
                        help="canonical view only: use the input depth for the fine samples, as in training")
    parser.add_argument("--resolution", type=int, help="render resolution (default: the checkpoint's data.resolution)")
    parser.add_argument("--frames", type=int, default=128, help="video frames (default 128, as the reference)")
    parser.add_argument("--fps", type=int, default=40, help="video frame rate (default 40, as the reference)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the renderer's random sampling (non-deterministic mode)")
    parser.add_argument("--save-npz", metavar="OUT.npz",
                        help="float32 arrays rgb (3,H,W) in [-1,1], depth (1,H,W), weight_sum (1,H,W); with --video "
                             "a leading frame axis; with super-resolution rgb is upscaled and rgb_render is the render")
    parser.add_argument("--png", metavar="OUT.png", help="the rendered RGB as an 8-bit PNG")
    parser.add_argument("--min-size", type=int, default=64, metavar="PX",
                        help="reject an input whose shorter side is smaller (default 64, as 'g3dr prep shards')")
    add_sr_arguments(parser)
    parser.set_defaults(handler=run)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--deterministic``, ``--sigma-scale S``, ``--device``: how the checkpoint renders (:func:`model_from_args`)."""
    parser.add_argument("--deterministic", action="store_true",
                        help="no stratified jitter, evenly spaced importance samples: bit-reproducible renders")
    parser.add_argument("--sigma-scale", type=float, metavar="S", help="multiply the density (paper S.3 sweep)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def model_from_args(args: argparse.Namespace):
    """:func:`g3dr.models.inference.load_model` of ``--checkpoint`` and the flags of :func:`add_model_arguments`."""
    from g3dr.models.inference import load_model

    return load_model(args.checkpoint, deterministic=args.deterministic, sigma_scale=args.sigma_scale,
                      device=args.device)


def sr_from_args(args: argparse.Namespace, cfg, device):
    """:func:`g3dr.models.inference.load_sr_option` of the flags of :func:`add_sr_arguments`."""
    from g3dr.models.inference import load_sr_option

    return load_sr_option(cfg, device, sr=args.sr, no_sr=args.no_sr)


SR_PICTURES_HELP = ("upscale every RGB picture written (png, npz rgb, video, contact sheet) with this "
                    "super-resolution network: a .safetensors from 'g3dr import-official --sr' or "
                    "'g3dr train-sr', or an RCAN .pth. Default: the checkpoint config's sr.checkpoint "
                    "(empty: none). Depth and weight_sum stay at the render resolution")


def add_sr_arguments(parser: argparse.ArgumentParser, sr_help: str = SR_PICTURES_HELP) -> None:
    """``--sr FILE`` / ``--no-sr``: the super-resolution stage (``sr_help`` says what it applies to)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--sr", metavar="FILE", help=sr_help)
    group.add_argument("--no-sr", action="store_true",
                       help="no super-resolution, even where the checkpoint's config names sr.checkpoint")





def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from g3dr.log import get_logger

    log = get_logger("g3dr.render_cli")
    if not (args.png or args.save_npz or args.video):
        raise ConfigError("nothing to write: give --png OUT.png, --save-npz OUT.npz and/or --video OUT.mp4")
    if args.video and Path(args.video).suffix.lower() not in (".mp4", ".gif"):
        raise ConfigError(f"--video {args.video} must end in .mp4 or .gif")
    if args.video and args.pitch is not None:
        raise ConfigError("--pitch cannot be combined with --video (the video follows its own trajectory)")
    if args.video and args.png:
        raise ConfigError("--png writes a single view; with --video use --save-npz for the frames' values")
    novel = args.yaw is not None or args.pitch is not None
    if args.depth_prior and (novel or args.video):
        raise ConfigError("--depth-prior applies to the canonical view only (no --yaw/--pitch/--video)")
    if args.frames < 1 or args.fps < 1:
        raise ConfigError(f"--frames and --fps must be >= 1, got {args.frames} and {args.fps}")
    if args.resolution is not None and args.resolution < 1:
        raise ConfigError(f"--resolution must be >= 1, got {args.resolution}")
    if (args.depth is None) == (args.depth_model is None):
        raise ConfigError("give exactly one of --depth DEPTH_PNG and --depth-model DIR")
    from g3dr.outputs import check_output_file

    for flag, path in (("--png", args.png), ("--save-npz", args.save_npz), ("--video", args.video)):
        if path:  # before the model is loaded: a read-only or mistyped output fails now, not after the render
            check_output_file(path, flag)

    from g3dr.models.inference import describe_sizes, load_rgbd, render_angles, uint8_rgb, write_video

    model, cfg, meta, device = model_from_args(args)
    sr = sr_from_args(args, cfg, device)
    resolution = args.resolution or cfg.data.resolution
    if args.depth_prior and resolution != cfg.data.resolution:
        raise ConfigError(f"--depth-prior needs --resolution {cfg.data.resolution} (the depth map's size)")
    if args.depth is not None:
        rgb, depth = load_rgbd(args.image, args.depth, cfg.data.resolution, cfg.data.depth_scale, cfg.data.depth_offset,
                               min_size=args.min_size)
    else:  # depth from the data-prep depth backend (see docs/assets.md)
        from g3dr.assets.inputs import DepthFiller, Rejected, input_from_files, rgbd_from_sample

        try:
            rgb, depth = rgbd_from_sample(input_from_files(args.image, None), cfg.data.resolution, cfg.data.depth_scale,
                                          cfg.data.depth_offset, DepthFiller(args.depth_model, device=args.device))
        except Rejected as err:
            raise DataError(f"cannot use {args.image}: {err.detail}") from None
    rgb, depth = rgb.to(device), depth.to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    with torch.no_grad():
        planes = model.make_planes(rgb, depth)
    cam = cfg.camera
    if args.video:
        from g3dr.render import video_trajectory

        yaw, pitch = video_trajectory(args.frames, cam)
    else:
        yaw = torch.tensor([cam.canonical_yaw if args.yaw is None else args.yaw])
        pitch = torch.tensor([cam.canonical_pitch if args.pitch is None else args.pitch])
    images = render_angles(model, planes, yaw, pitch, resolution=resolution,
                           depth=depth if args.depth_prior else None, generator=generator, progress=True, sr=sr)
    log.info("%s", describe_sizes(sr, resolution))

    from g3dr.outputs import writing

    half = cfg.renderer.box_warp / 2
    if args.video:
        with writing(args.video, "--video"):
            write_video(args.video, images["rgb"], images["depth"], args.fps, cam.radius - half, cam.radius + half)
        log.info("wrote %s (%d frames at %d fps)", args.video, args.frames, args.fps)
    if args.save_npz:
        squeeze = not args.video
        arrays = {key: (images[key][0] if squeeze else images[key]).numpy().astype(np.float32)
                  for key in ("rgb", "depth", "weight_sum", "rgb_render") if key in images}
        with writing(args.save_npz, "--save-npz"):
            np.savez(args.save_npz, **arrays)
        log.info("wrote %s", args.save_npz)
    if args.png:
        with writing(args.png, "--png"):
            Image.fromarray(uint8_rgb(images["rgb"])[0]).save(args.png)
        log.info("wrote %s", args.png)
    print(f"rendered {yaw.shape[0]} view(s) at {resolution}x{resolution} from {args.checkpoint} (step {meta['step']}): "
          f"mean weight_sum {images['weight_sum'].mean().item():.4f}, mean depth {images['depth'].mean().item():.4f}"
          + (f"; {describe_sizes(sr, resolution)}" if sr is not None else ""))
    return 0
