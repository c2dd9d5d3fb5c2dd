"""``g3dr generate``: a class- or text-conditioned RGB-D diffusion model (LDM3D) feeding f_trigen.

The paper's generation pipeline: an RGB-D image from an LDM3D-like model (f_rgbd) is lifted to 3D by
f_trigen. Here f_rgbd is ``diffusers``' ``StableDiffusionLDM3DPipeline`` loaded from a **local folder**
(``save_pretrained`` layout; no hub access at run time) with a 4-channel (RGB + depth) autoencoder, e.g.
``Intel/ldm3d-4c``. Needs the optional extra ``generate`` (diffusers, transformers).

Depth mapping: the pipeline's depth channel (in [0, 1]; LDM3D is trained on DPT depth, which is inverse
depth: near = large) goes through the same per-image mapping as the data-prep depth backend
(:func:`g3dr.data.depth_model.codes_from_prediction`: 1st/99th percentiles -> [4, 6] in the release
encoding), so f_trigen sees depth like its training data. ``--depth-convention depth`` for a model whose
channel grows with distance.

Writes ``OUT/rgbd/NAME.png`` + ``OUT/rgbd/NAME_depth.png`` (the release layout, so ``g3dr batch --input
OUT/rgbd`` can lift them again) and, with ``--checkpoint``, the requested assets ``OUT/NAME.*``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from g3dr.errors import ConfigError, WeightsError

_DOWNLOAD_HINT = ("download one on a machine with hub access, e.g. 'huggingface-cli download Intel/ldm3d-4c "
                  "--local-dir weights/ldm3d-4c', and pass that folder to --pipeline")


def register(subparsers: argparse._SubParsersAction) -> None:
    from g3dr.assets.cli import _add_asset_outputs, add_mesh_arguments
    from g3dr.models.render_cli import add_model_arguments

    parser = subparsers.add_parser(
        "generate", help="generate RGB-D images with an LDM3D pipeline (local weights) and lift them to 3D",
        description="Generate RGB-D images from a prompt (or a class name, prompted as 'a photo of a NAME') with a "
                    "diffusers StableDiffusionLDM3DPipeline saved in a local folder, write them in the release layout, "
                    "and lift each with f_trigen (--checkpoint) to the requested renders, videos and meshes.",
        epilog="Example: g3dr generate --pipeline weights/ldm3d-4c --class goldfish --num 4 "
               "--checkpoint g3dr.safetensors "
               "--out gen/ --video mp4 --mesh glb")
    parser.add_argument("--pipeline", required=True, metavar="DIR", help="local StableDiffusionLDM3DPipeline folder")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="text prompt")
    what.add_argument("--class", dest="class_name", metavar="NAME", help="class name, prompted as 'a photo of a NAME'")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--num", type=int, default=1, help="images to generate (default 1)")
    parser.add_argument("--steps", type=int, default=49, help="denoising steps (default 49, the pipeline's)")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    parser.add_argument("--size", type=int, default=None, help="generated height = width (default: the pipeline's)")
    parser.add_argument("--depth-convention", choices=["inverse", "depth"], default="inverse",
                        help="what the pipeline's depth channel is: inverse depth (near = large; LDM3D) or depth")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--checkpoint", metavar="CKPT",
                        help="f_trigen checkpoint; without it only the RGB-D images are written")
    add_model_arguments(parser)
    add_mesh_arguments(parser)
    _add_asset_outputs(parser)
    parser.set_defaults(handler=run_generate)


def slug(text: str, limit: int = 40) -> str:
    """A file-name stem from a prompt: lower case, runs of other characters become '_'."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "image"


def load_ldm3d(folder: str, device):
    """The LDM3D pipeline of a local folder, checked to produce RGB + depth (a 4-channel autoencoder)."""
    if not (Path(folder) / "model_index.json").is_file():
        raise WeightsError(f"no diffusers pipeline at {folder} (expected model_index.json); {_DOWNLOAD_HINT}")
    try:
        from diffusers import StableDiffusionLDM3DPipeline
    except ImportError as err:
        raise ConfigError(f"g3dr generate needs diffusers ({err}): pip install 'g3dr-scale[generate]'") from None
    try:
        pipe = StableDiffusionLDM3DPipeline.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise WeightsError(f"cannot load the LDM3D pipeline from {folder}: {err}") from None
    if pipe.vae.config.out_channels != 4:
        raise WeightsError(f"{folder}: the autoencoder decodes {pipe.vae.config.out_channels} channels; "
                           "only RGB + depth "
                           "(4 channels, e.g. Intel/ldm3d-4c) is supported")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate_rgbd(pipe, prompt: str, num: int, *, steps: int, guidance: float, size: int | None, seed: int,
                  negative_prompt: str | None = None, inverse: bool = True, device="cpu"):
    """``num`` images: list of (rgb uint8 (H, W, 3), depth codes uint16 (H, W) in the release encoding)."""
    import numpy as np
    import torch

    from g3dr.data.depth_model import codes_from_prediction

    out = []
    for i in range(num):
        generator = torch.Generator(device=device).manual_seed(seed + i)
        result = pipe(prompt=prompt, negative_prompt=negative_prompt, height=size, width=size,
                      num_inference_steps=steps, guidance_scale=guidance, output_type="np", generator=generator)
        rgb = np.clip(np.rint(np.asarray(result.rgb[0]) * 255), 0, 255).astype(np.uint8)
        depth = np.asarray(result.depth[0], dtype=np.float64)[..., 0]
        if not (np.isfinite(rgb).all() and np.isfinite(depth).all()):
            raise WeightsError("the pipeline produced non-finite values")
        codes, _ = codes_from_prediction(depth, inverse=inverse)
        out.append((rgb, codes))
    return out


def run_generate(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from g3dr.assets.export import export_assets
    from g3dr.assets.inputs import input_from_files, rgbd_from_sample
    from g3dr.data.depth_codec import encode_u16_png
    from g3dr.log import get_logger
    from g3dr.models.inference import resolve_device

    log = get_logger("g3dr.assets")
    if args.num < 1 or args.steps < 1:
        raise ConfigError(f"--num and --steps must be >= 1, got {args.num} and {args.steps}")
    from g3dr.assets.cli import asset_options

    options = asset_options(args)
    if args.checkpoint:
        options.check()
    elif options.png or options.npz or options.video or options.mesh or args.sr:
        raise ConfigError("--png/--npz/--video/--mesh/--sr need --checkpoint (f_trigen lifts the generated RGB-D)")
    device = resolve_device(args.device)
    prompt = args.prompt if args.prompt is not None else f"a photo of a {args.class_name}"
    pipe = load_ldm3d(args.pipeline, device)
    images = generate_rgbd(pipe, prompt, args.num, steps=args.steps, guidance=args.guidance, size=args.size,
                           seed=args.seed, negative_prompt=args.negative_prompt,
                           inverse=args.depth_convention == "inverse", device=device)
    del pipe
    out = Path(args.out)
    (out / "rgbd").mkdir(parents=True, exist_ok=True)
    names = []
    for i, (rgb, codes) in enumerate(images):
        name = f"{slug(prompt)}_{i:03d}"
        Image.fromarray(rgb).save(out / "rgbd" / f"{name}.png")
        (out / "rgbd" / f"{name}_depth.png").write_bytes(encode_u16_png(codes))
        names.append(name)
    log.info("wrote %d RGB-D image(s) to %s", len(names), out / "rgbd")
    written = []
    if args.checkpoint:
        from g3dr.models.inference import describe_sizes
        from g3dr.models.render_cli import model_from_args, sr_from_args

        model, cfg, meta, device = model_from_args(args)
        sr = sr_from_args(args, cfg, device)
        log.info("%s", describe_sizes(sr, options.resolution or cfg.data.resolution))
        for name in names:
            raw = input_from_files(out / "rgbd" / f"{name}.png", out / "rgbd" / f"{name}_depth.png")
            rgb, depth = rgbd_from_sample(raw, cfg.data.resolution, cfg.data.depth_scale, cfg.data.depth_offset)
            with torch.no_grad():
                planes = model.make_planes(rgb.to(device), depth.to(device))
            written += [str(p) for p in export_assets(model, planes, out / name, options, source=rgb, sr=sr)]
    (out / "generate.json").write_text(json.dumps({"prompt": prompt, "num": args.num, "steps": args.steps,
                                                   "guidance": args.guidance, "seed": args.seed,
                                                   "pipeline": str(args.pipeline), "images": names,
                                                   "assets": written}, indent=2) + "\n")
    print(f"generate: {len(names)} RGB-D image(s) for {prompt!r} -> {out / 'rgbd'}"
          + (f"; {len(written)} asset file(s)" if written else ""))
    return 0
