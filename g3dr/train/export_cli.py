"""``g3dr export STEP_DIR [OUT.safetensors]``: a training checkpoint folder as one fp32 f_trigen file.

The folders under ``RUN/checkpoints/`` are DeepSpeed's (model, optimizer partitions, per-rank state); ``g3dr eval``,
``g3dr render`` and the asset commands read f_trigen ``.safetensors`` files. Registering is cheap; torch and
deepspeed are imported in the handler.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="write a training checkpoint (RUN/checkpoints/step-N) as an fp32 f_trigen .safetensors",
        description="Rebuild the fp32 weights of a training checkpoint (from the ZeRO partitions) and write them with "
                    "the checkpoint's config as one f_trigen .safetensors file, as g3dr train does at the end of a "
                    "run. The checkpoint's files are verified first.",
        epilog="Example: g3dr export runs/mine/checkpoints/step-20000 (writes runs/mine/exports/step-20000.safetensors)")
    parser.add_argument("checkpoint", metavar="STEP_DIR", help="a complete training checkpoint folder, step-N")
    parser.add_argument("out", metavar="OUT", nargs="?", default=None,
                        help="output .safetensors (default: RUN/exports/step-N.safetensors)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from g3dr.train.checkpointer import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out)
    print(f"wrote {out}")
    return 0
