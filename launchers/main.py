"""The ``g3dr`` command (``g3dr.launchers.main:main``): one entry point, one subcommand per job.

It lives with the jobs because it imports them all: the library (``g3dr/``) never imports a job package.
Each subcommand lives beside the code it runs and exposes ``register(subparsers)``; registering must
stay cheap (no torch import) so that ``g3dr --help`` is instant. Handlers receive the parsed arguments
and return an exit code. Typed errors (:class:`~g3dr.errors.G3DRError`) are printed as one line,
without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from g3dr import __version__
from g3dr.errors import G3DRError
from g3dr.log import request_level, requested_level, setup_logging

# Modules that provide subcommands, in the order ``--help`` lists them.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "g3dr.data_prep.cli",     # prep
    "g3dr.train.cli",         # train
    "g3dr.train.export_cli",  # export
    "g3dr.launchers.cli",     # submit
    "g3dr.eval.cli",          # eval
    "g3dr.models.render_cli",  # render
    "g3dr.assets.cli",        # batch, mesh
    "g3dr.assets.generate_cli",  # generate
    "g3dr.models.import_cli",  # import-official
    "g3dr.bench",             # bench
    "g3dr.weights.cli",       # weights
    "g3dr.eval.study",        # study
    "g3dr.config_cli",        # config
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="g3dr",
        description="g3dr-scale: train and evaluate G3DR (generative 3D reconstruction in ImageNet) at cluster scale.",
    )
    parser.add_argument("--version", action="version", version=f"g3dr-scale {__version__}")
    parser.add_argument("--log-level", default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="console log level on rank 0 (other ranks log warnings only); default: "
                             "$G3DR_LOG_LEVEL, else the config's logging.level for train, else INFO. "
                             "Jobs that g3dr submit launches get the same level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    request_level(args.log_level)
    setup_logging(requested_level() or "INFO")
    try:
        return int(args.handler(args) or 0)
    except G3DRError as err:
        print(f"g3dr {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"g3dr {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
