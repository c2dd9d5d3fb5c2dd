"""``g3dr train --config FILE [overrides] [--resume auto|PATH]``: the thin entry point of training; and
``g3dr train-sr`` (same arguments), the super-resolution stage through the same trainer (:mod:`g3dr.train.sr`).

Runs as one process or as one rank of a ``torchrun`` / DeepSpeed-launcher / SLURM job (rank and world
size from the environment). Registering is cheap; torch and deepspeed are imported in the handler.
"""

from __future__ import annotations

import argparse
from typing import Literal

from g3dr.config_cli import add_config_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train f_trigen on DeepSpeed (one process, or one rank of torchrun/SLURM)",
        description="Train G3DR's f_trigen with the full objective. Checkpoints go to <run_dir>/checkpoints, "
                    "the fp32 export to <run_dir>/f_trigen.safetensors, metrics to MLflow (rank 0).")
    _add_arguments(parser)
    parser.set_defaults(handler=run, stage="f_trigen")
    sr = subparsers.add_parser(
        "train-sr", help="train the super-resolution stage on a frozen f_trigen's renders (DeepSpeed, as train)",
        description="Train the RCAN super-resolution network (sr.*) to upscale the canonical renders of the frozen "
                    "f_trigen named by sr.generator from data.resolution to sr.scale x data.resolution, against the "
                    "input image at that size (L1 + LPIPS-VGG, sr.loss.*). Same trainer as g3dr train: checkpoints "
                    "in <run_dir>/checkpoints, the fp32 export in <run_dir>/sr.safetensors, metrics to MLflow.",
        epilog="Example: g3dr train-sr --config configs/imagenet128.yaml run_dir=outputs/sr "
               "sr.generator=outputs/run/f_trigen.safetensors data.source=shards data.shards=/data/train-256")
    _add_arguments(sr)
    sr.set_defaults(handler=run, stage="sr")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, required=True)
    parser.add_argument("--resume", metavar="auto|PATH", default=None,
                        help="'auto': continue from the newest complete checkpoint of run_dir (fresh start if "
                             "none); PATH: a checkpoint directory step-N")
    parser.add_argument("--no-export", action="store_true", help="skip the fp32 safetensors export at the end")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (there is none anyway when stderr is not a terminal, e.g. a SLURM log)")


def run(args: argparse.Namespace) -> int:
    from g3dr.config import load_config
    from g3dr.train.trainer import EXIT_PREEMPTED

    result = run_training(load_config(args.config, args.overrides), resume=args.resume, export=not args.no_export,
                          progress=not args.no_progress, stage=getattr(args, "stage", "f_trigen"))
    return EXIT_PREEMPTED if result.preempted else 0


def run_training(cfg, resume: str | None = None, export: bool = True, progress: bool = True,
                 stage: Literal["f_trigen", "sr"] = "f_trigen"):
    """One rank's training of the resolved config ``cfg``, as ``g3dr train`` (``stage="sr"``: ``g3dr train-sr``)
    runs it and as the launched training job calls it: the console level (the config's ``logging.level`` unless
    one was requested), the weight files checked, :func:`~g3dr.train.trainer.train`, then every rank leaves the
    process group together. Returns the :class:`~g3dr.train.trainer.TrainResult`."""
    from g3dr.distributed import resolve_dist_env, shutdown_process_group
    from g3dr.log import get_logger, requested_level, setup_logging
    from g3dr.train.trainer import train
    from g3dr.weights import verify_for

    if requested_level() is None:  # neither --log-level nor $G3DR_LOG_LEVEL: the config's logging.level
        setup_logging(cfg.logging.level)
    # Before any process group: every rank checks the same files and fails alike (hashes are cached).
    verify_for(cfg, "train", progress=resolve_dist_env().is_main)
    training_stage = None
    if stage == "sr":
        from g3dr.train.sr import SR_STAGE as training_stage
    result = train(cfg, resume=resume, export=export, progress=progress, stage=training_stage)
    shutdown_process_group()  # every rank leaves together (also after a preemption: all ranks stopped at one step)
    if not (result.preempted or result.already_finished):  # else the trainer said what happened
        get_logger("g3dr.train").info("done: step %d, checkpoint %s, export %s, MLflow run %s", result.step,
                                      result.checkpoint, result.export, result.run_id)
    return result
