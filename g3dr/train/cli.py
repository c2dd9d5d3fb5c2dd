"""``g3dr train --config FILE [overrides] [--resume auto|PATH]``: the thin entry point of training.

Runs as one process or as one rank of a ``torchrun`` / DeepSpeed-launcher / SLURM job (rank and world
size from the environment). Registering is cheap; torch and deepspeed are imported in the handler.
"""

from __future__ import annotations

import argparse

from g3dr.config_cli import add_config_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train f_trigen on DeepSpeed (one process, or one rank of torchrun/SLURM)",
        description="Train G3DR's f_trigen with the full objective. Checkpoints go to <run_dir>/checkpoints, "
                    "the fp32 export to <run_dir>/f_trigen.safetensors, metrics to MLflow (rank 0).")
    add_config_arguments(parser, required=True)
    parser.add_argument("--resume", metavar="auto|PATH", default=None,
                        help="'auto': continue from the newest complete checkpoint of run_dir (fresh start if "
                             "none); PATH: a checkpoint directory step-N")
    parser.add_argument("--no-export", action="store_true", help="skip the fp32 safetensors export at the end")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (there is none anyway when stderr is not a terminal, e.g. a SLURM log)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from g3dr.config import load_config
    from g3dr.log import get_logger
    from g3dr.train.trainer import EXIT_PREEMPTED, shutdown_distributed, train

    cfg = load_config(args.config, args.overrides)
    from g3dr.log import requested_level, setup_logging

    if requested_level() is None:  # neither --log-level nor $G3DR_LOG_LEVEL: the config's logging.level
        setup_logging(cfg.logging.level)
    from g3dr.distributed import resolve_dist_env
    from g3dr.weights import verify_for

    # Before any process group: every rank checks the same files and fails alike (hashes are cached).
    verify_for(cfg, "train", progress=resolve_dist_env().is_main)
    result = train(cfg, resume=args.resume, export=not args.no_export, progress=not args.no_progress)
    shutdown_distributed()  # every rank leaves together (also after a preemption: all ranks stopped at one step)
    log = get_logger("g3dr.train")
    if result.preempted:
        return EXIT_PREEMPTED
    if result.already_finished:  # the trainer said what happened; nothing was trained or rewritten
        return 0
    log.info("done: step %d, checkpoint %s, export %s, MLflow run %s", result.step, result.checkpoint,
             result.export, result.run_id)
    return 0
