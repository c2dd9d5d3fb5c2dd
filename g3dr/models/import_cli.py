"""``g3dr import-official SRC DST``: convert the G3DR reference checkpoint into our f_trigen checkpoint."""

from __future__ import annotations

import argparse

from g3dr.config_cli import add_config_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import-official", help="convert the reference checkpoint_generic.pt to a g3dr .safetensors checkpoint",
        description="Read the G3DR reference training checkpoint (a torch file with step, model, opt, scheduler), "
                    "map its U-Net and decoder weights onto f_trigen, and write one fp32 .safetensors file with the "
                    "resolved config and the EG3D plane convention. Every tensor name and shape is checked; "
                    "optimizer and scheduler state are dropped. The config (default: the built-in paper "
                    "configuration) must describe the network the checkpoint was trained with.",
        epilog="Example: g3dr import-official --config configs/imagenet128.yaml checkpoint_generic.pt "
               "weights/g3dr-imagenet128.safetensors (options before SRC DST; KEY=VALUE overrides last)")
    parser.add_argument("src", metavar="SRC", help="reference checkpoint, e.g. checkpoint_generic.pt")
    parser.add_argument("dst", metavar="DST", help="output checkpoint, e.g. weights/g3dr-imagenet128.safetensors")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="unpickle SRC fully (runs code from the file and needs every package it references: "
                             "only for trusted files, and only if the default data-only reading fails)")
    add_config_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from g3dr.config import load_config
    from g3dr.models.reference_import import import_official

    cfg = load_config(args.config, args.overrides)
    summary = import_official(args.src, args.dst, cfg, allow_pickle=args.allow_pickle)
    print(f"wrote {args.dst}: step {summary['step']}, {summary['tensors']} tensors, "
          f"{summary['parameters']:,} parameters, plane convention eg3d")
    return 0
