"""``g3dr import-official SRC DST``: convert the G3DR reference checkpoint into our f_trigen checkpoint;
``g3dr import-official --sr FILE DST``: convert an RCAN super-resolution state dict (e.g. the authors' file)
into our super-resolution ``.safetensors``."""

from __future__ import annotations

import argparse

from g3dr.config_cli import add_config_arguments
from g3dr.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import-official", help="convert the reference checkpoint_generic.pt (or, with --sr, an RCAN "
                                "super-resolution state dict) to a g3dr .safetensors file",
        description="Read the G3DR reference training checkpoint (a torch file with step, model, opt, scheduler), "
                    "map its U-Net and decoder weights onto f_trigen, and write one fp32 .safetensors file with the "
                    "resolved config and the EG3D plane convention. Every tensor name and shape is checked; "
                    "optimizer and scheduler state are dropped. The config (default: the built-in paper "
                    "configuration) must describe the network the checkpoint was trained with. "
                    "With --sr FILE DST: read an RCAN state dict of any size (.pth/.pt/.ckpt, read without "
                    "unpickling objects, or .safetensors), detect its architecture with spandrel, and write our "
                    "super-resolution .safetensors (the RCAN weights and their architecture).",
        epilog="Examples: g3dr import-official --config configs/imagenet128.yaml checkpoint_generic.pt "
               "weights/g3dr-imagenet128.safetensors (options before SRC DST; KEY=VALUE overrides last); "
               "g3dr import-official --sr RCAN_x2.pth weights/g3dr-sr-x2.safetensors")
    parser.add_argument("src", metavar="SRC", nargs="?", help="reference checkpoint, e.g. checkpoint_generic.pt")
    parser.add_argument("dst", metavar="DST", nargs="?",
                        help="output checkpoint, e.g. weights/g3dr-imagenet128.safetensors (with --sr: the only "
                             "positional argument)")
    parser.add_argument("--sr", metavar="FILE",
                        help="import an RCAN super-resolution state dict instead: g3dr import-official --sr FILE DST")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="unpickle SRC fully (runs code from the file and needs every package it references: "
                             "only for trusted files, and only if the default data-only reading fails; not with --sr)")
    add_config_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.sr:
        return run_sr(args)
    if not args.src or not args.dst:
        raise ConfigError("give SRC DST (the reference checkpoint and the output .safetensors), or --sr FILE DST")
    from g3dr.config import load_config
    from g3dr.models.reference_import import import_official

    cfg = load_config(args.config, args.overrides)
    summary = import_official(args.src, args.dst, cfg, allow_pickle=args.allow_pickle)
    print(f"wrote {args.dst}: step {summary['step']}, {summary['tensors']} tensors, "
          f"{summary['parameters']:,} parameters, plane convention eg3d")
    return 0


def run_sr(args: argparse.Namespace) -> int:
    """``--sr FILE DST``: the positional DST lands in ``args.src`` (the first positional)."""
    import hashlib
    import json
    from pathlib import Path

    extra = [v for v in (args.dst, *args.overrides) if v]
    if not args.src or extra or args.config:
        got = f"; extra: {' '.join(extra)}" if extra else ""
        raise ConfigError("with --sr give FILE and one output: g3dr import-official --sr FILE DST (no SRC, --config "
                          f"or KEY=VALUE: the file carries its own architecture){got}")
    if args.allow_pickle:
        raise ConfigError("--allow-pickle does not apply to --sr: super-resolution weights are always read as "
                          "tensors only; save the RCAN state dict alone (torch.save(model.state_dict(), FILE)) if "
                          "reading fails")
    from g3dr.models.sr import describe_architecture, load_sr, save_sr
    from g3dr.outputs import check_output_file, writing

    src, dst = Path(args.sr), Path(args.src)
    if dst.suffix != ".safetensors":
        raise ConfigError(f"DST {dst} must end in .safetensors")
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise ConfigError(f"DST {dst} is the input file; write the import to another file")
    check_output_file(dst, "DST")
    model = load_sr(src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    with writing(dst, "DST"):
        save_sr(model, dst, metadata={"source": "import-official", "imported_from": src.name,
                                      "imported_sha256": digest})
    parameters = sum(p.numel() for p in model.parameters())
    print(f"detected {describe_architecture(model.architecture)} ({parameters:,} parameters)")
    print(f"architecture: {json.dumps(model.architecture, sort_keys=True)}")
    print(f"wrote {dst} (from {src}, sha256 {digest[:12]}); use it with --sr {dst} or sr.checkpoint={dst}")
    return 0
