"""``g3dr config``: show or check a resolved config without running anything."""

from __future__ import annotations

import argparse
import sys


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """The ``--config FILE`` option and trailing ``key=value`` overrides shared by every job."""
    parser.add_argument("--config", "-c", required=required, metavar="FILE",
                        help="YAML preset (configs/tiny.yaml, configs/imagenet128.yaml); built-in defaults if omitted")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides applied after the file, e.g. train.lr=1e-4 data.resolution=64")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "config", help="print or check a resolved config",
        description="Load a preset, apply overrides, validate, and print the resolved YAML (or save it).")
    add_config_arguments(parser)
    parser.add_argument("--check", action="store_true", help="only validate; print nothing on success")
    parser.add_argument("--save", metavar="DIR", help="also write DIR/config.yaml")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from g3dr.config import dump_config, load_config, save_config

    cfg = load_config(args.config, args.overrides)
    if args.save:
        save_config(cfg, args.save)
    if not args.check:
        sys.stdout.write(dump_config(cfg))
    return 0
