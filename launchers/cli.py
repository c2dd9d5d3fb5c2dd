"""``g3dr submit``: run training, data preparation and evaluation as SLURM (or local) jobs.

    g3dr submit train [LAUNCH OPTIONS] --config FILE [KEY=VALUE ...]
    g3dr submit train-sr [LAUNCH OPTIONS] --config FILE sr.generator=F_TRIGEN [KEY=VALUE ...]
    g3dr submit prep shards [LAUNCH OPTIONS] --num-shard-jobs N -- PREP-SHARDS-ARGS (--src .. --layout .. --out ..)
    g3dr submit eval [LAUNCH OPTIONS] --checkpoints CK [CK ...] [--metrics fid,is] -- EVAL-ARGS

Launch options: ``--executor local|slurm`` (default slurm where ``sbatch`` exists), ``--nodes``,
``--gpus-per-node`` (one task per GPU), ``--tasks-per-node`` (CPU ranks), ``--cpus-per-task``, ``--partition``,
``--time`` (minutes), ``--account``, ``--qos``, ``--constraint``, ``--mem-gb``, ``--dry-run`` (print the sbatch
script, submit nothing), ``--wait``. Every job's arguments are parsed by the ``g3dr`` parser before anything is
submitted, so a typo fails here and not in the queue. Registering is cheap: submitit is imported in handlers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class _DefaultsFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default, unless its help already says it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default in (None, False, [], argparse.SUPPRESS)
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def _launch_arguments() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("launch options")
    g.add_argument("--executor", choices=["local", "slurm"], default=None,
                   help="where to run: slurm (default where sbatch exists) or local (this machine, same callable)")
    g.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default partition)")
    g.add_argument("--nodes", type=int, default=1, help="nodes per job")
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one task (rank) per GPU")
    g.add_argument("--tasks-per-node", type=int, default=0,
                   help="ranks per node on a CPU-only request (default 1; with GPUs it equals --gpus-per-node)")
    g.add_argument("--cpus-per-task", type=int, default=1, help="CPU cores per task (data loader workers + 1)")
    g.add_argument("--time", type=int, default=60, metavar="MIN", help="time limit per run in minutes")
    g.add_argument("--mem-gb", type=int, default=None, help="memory per node in GB")
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", default=None, help="node feature constraint (e.g. h100)")
    g.add_argument("--exclude", default=None, metavar="NODES", help="nodes to leave out (node[01-04],node17)")
    g.add_argument("--comment", default=None, help="sbatch --comment")
    g.add_argument("--mail-user", default=None, metavar="ADDRESS", help="sbatch --mail-user")
    g.add_argument("--mail-type", default=None, metavar="TYPES", help="sbatch --mail-type (e.g. END,FAIL)")
    g.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option by its long name, repeatable (--sbatch reservation=r1)")
    g.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="a shell line run before the tasks start, repeatable (--setup 'module load cuda/12.4')")
    g.add_argument("--signal-delay-s", type=int, default=120,
                   help="USR2 this many seconds before the time limit: the job checkpoints and requeues itself")
    g.add_argument("--max-requeues", type=int, default=50,
                   help="time-limit requeues allowed per job (a long training runs as a chain of time-limited runs)")
    g.add_argument("--job-name", default=None, help="SLURM job name (default g3dr-<kind>)")
    g.add_argument("--log-dir", default=None,
                   help="folder of per-job logs and submitit files (a %%j subfolder per job); default: see each kind")
    g.add_argument("--dry-run", action="store_true", help="print the sbatch script(s) and submit nothing")
    g.add_argument("--skip-weights-check", action="store_true",
                   help="do not verify the weight files here before submitting (when only the compute nodes see "
                        "them; the job still verifies them before it starts)")
    g.add_argument("--wait", action="store_true",
                   help="wait for the jobs and fail if one fails (always on with --executor local)")
    g.add_argument("--wait-timeout", type=float, default=24 * 3600.0, metavar="S", help="give up waiting after S s")
    return p


def register(subparsers: argparse._SubParsersAction) -> None:
    from g3dr.config_cli import add_config_arguments

    launch = _launch_arguments()
    parser = subparsers.add_parser("submit", help="run train / prep / eval as SLURM or local jobs",
                                   description="Submit g3dr jobs through submitit (SLURM or this machine).")
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)

    train = kinds.add_parser("train", parents=[launch],
                             formatter_class=_DefaultsFormatter, help="one training job: nodes x tasks ranks",
                             description="Submit `g3dr train` as one job; every task is one rank. The job "
                                         "requeues itself on preemption or time limit and resumes from run_dir.")
    add_config_arguments(train)
    train.add_argument("--eval", action="store_true",
                       help="also queue `g3dr eval --sweep RUN_DIR` as one job that starts when the training job "
                            "ends (however it ends; after every requeue): every checkpoint gets evaluated")
    train.add_argument("--eval-args", default="", metavar="ARGS",
                       help="with --eval: more `g3dr eval` arguments, one string (e.g. '--metrics nfs,da')")
    train.set_defaults(handler=run_train, train_command="train")

    train_sr = kinds.add_parser("train-sr", parents=[launch], formatter_class=_DefaultsFormatter,
                                help="one super-resolution training job (g3dr train-sr): nodes x tasks ranks",
                                description="Submit `g3dr train-sr` as one job; every task is one rank. As `submit "
                                            "train`: the job requeues itself on preemption or time limit and resumes "
                                            "from run_dir.")
    add_config_arguments(train_sr)
    train_sr.set_defaults(handler=run_train, train_command="train-sr", eval=False, eval_args="")

    prep = kinds.add_parser("prep", help="data preparation arrays")
    prep_kinds = prep.add_subparsers(dest="prep_kind", metavar="ACTION", required=True)
    shards = prep_kinds.add_parser("shards", parents=[launch], formatter_class=_DefaultsFormatter,
                                   help="an array of `g3dr prep shards` + merge/validate",
                                   description="A job array over --shard-index/--num-shard-jobs, then one job "
                                               "(after all succeed) that writes the manifest and validates.")
    shards.add_argument("--num-shard-jobs", type=int, required=True, help="array size")
    shards.add_argument("prep_args", nargs="*", metavar="-- ARGS",
                        help="arguments of `g3dr prep shards` after --, without --shard-index/--num-shard-jobs")
    shards.set_defaults(handler=run_prep_shards)

    ev = kinds.add_parser("eval", parents=[launch], formatter_class=_DefaultsFormatter,
                          help="an array of `g3dr eval` over checkpoints (x metrics)",
                          description="A job array: one `g3dr eval --checkpoint CK [--metrics M] EVAL-ARGS` per "
                                      "checkpoint, or per checkpoint and metric with --metrics. Each job may be "
                                      "multi-rank (--tasks-per-node/--gpus-per-node).")
    target = ev.add_mutually_exclusive_group(required=True)
    target.add_argument("--checkpoints", nargs="+", metavar="CK", help="f_trigen .safetensors files")
    target.add_argument("--sweep", metavar="DIR",
                        help="one job: `g3dr eval --sweep DIR` (every checkpoint under DIR without a finished run)")
    ev.add_argument("--watch", action="store_true",
                    help="with --sweep: keep polling for new checkpoints; the job requeues itself at its time limit "
                         "(finished evaluations are skipped, an interrupted one is redone)")
    ev.add_argument("--metrics", default="", metavar="LIST",
                    help="comma list (fid,is,nfs,da,gt_views): one array job per checkpoint and metric")
    ev.add_argument("eval_args", nargs="*", metavar="-- ARGS",
                    help="more arguments of `g3dr eval` after -- (not --checkpoint/--sweep/--metrics)")
    ev.set_defaults(handler=run_eval)


def _options(args: argparse.Namespace, kind: str):
    from g3dr.launchers.submit import LaunchOptions

    return LaunchOptions(
        job_name=args.job_name or f"g3dr-{kind}", partition=args.partition, nodes=args.nodes,
        gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
        time_min=args.time, mem_gb=args.mem_gb, account=args.account, qos=args.qos, constraint=args.constraint,
        signal_delay_s=args.signal_delay_s, max_requeues=args.max_requeues, exclude=args.exclude,
        comment=args.comment, mail_user=args.mail_user, mail_type=args.mail_type, setup=tuple(args.setup),
        extra=_sbatch_pairs(args.sbatch))


def _sbatch_pairs(items: list[str]) -> dict[str, str]:
    """``--sbatch KEY=VALUE`` options as submitit's ``additional_parameters`` (dashes in KEY allowed)."""
    from g3dr.errors import ConfigError

    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--sbatch {item!r}: expected KEY=VALUE (an sbatch long option, e.g. reservation=r1)")
        pairs[key] = value
    return pairs


def check_cpus(cpus_per_task: int, num_workers: int, executor: str) -> None:
    """A SLURM task runs the trainer and ``data.num_workers`` loader processes: fewer CPUs than that starves the
    data loader (the workers share the cores the scheduler gave). A ConfigError before submitting."""
    from g3dr.errors import ConfigError

    if executor == "slurm" and cpus_per_task < num_workers + 1:
        raise ConfigError(f"--cpus-per-task {cpus_per_task} is less than data.num_workers + 1 = {num_workers + 1} "
                          f"(the loader's workers and the trainer); pass --cpus-per-task {num_workers + 1} or more, "
                          "or lower data.num_workers")


def check_g3dr_arguments(argv: list[str]) -> argparse.Namespace:
    """Parse ``g3dr ARGV`` before submitting: the namespace, or a ConfigError with argparse's message."""
    import contextlib
    import io

    from g3dr.launchers.main import build_parser
    from g3dr.errors import ConfigError

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv)
    except SystemExit:
        msg = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else ""
        raise ConfigError(f"the job would run `g3dr {' '.join(argv)}`, which is invalid: {msg}") from None


def eval_job(argv: list[str], name: str):
    """An :class:`~g3dr.launchers.jobs.EvalJob` of the ``g3dr eval`` arguments ``argv`` (parsed here, once)."""
    from g3dr.eval.cli import request_from_args
    from g3dr.launchers.jobs import EvalJob

    return EvalJob(request_from_args(check_g3dr_arguments(["eval", *argv])), name=name)


def _executor(args: argparse.Namespace) -> str:
    from g3dr.launchers.submit import default_executor

    return args.executor or default_executor()


def _finish(args: argparse.Namespace, executor: str, jobs, what: str) -> int:
    from g3dr.launchers.submit import wait_jobs

    for job in jobs:
        print(f"{what}: {executor} job {job.job_id}  logs: {job.paths.folder}")
    if jobs and (args.wait or executor == "local"):
        try:
            wait_jobs(jobs, timeout_s=args.wait_timeout, poll_s=2.0 if executor == "slurm" else 0.5)
        except (RuntimeError, TimeoutError) as err:
            print(f"g3dr submit: {what} failed: {err}", file=sys.stderr)
            return 1
        print(f"{what}: finished")
    return 0


def run_train(args: argparse.Namespace) -> int:
    """``g3dr submit train`` and ``g3dr submit train-sr`` (``args.train_command``)."""
    from g3dr.launchers.jobs import train_job
    from g3dr.launchers.submit import submit_jobs

    command = getattr(args, "train_command", "train")
    executor = _executor(args)
    options = _options(args, command)
    job = train_job(args.config, args.overrides, command)  # the config is resolved here: it fails now, not queued
    cfg = job.config
    cfg.train.grad_accumulation(options.world_size)  # a ConfigError when the world size cannot divide the batch
    check_cpus(options.cpus_per_task, cfg.data.num_workers, executor)
    if command == "train-sr":
        from g3dr.train.sr import check_sr_config

        check_sr_config(cfg)  # sr.generator missing or at another resolution fails here, not after the queue
    if not args.skip_weights_check:
        from g3dr.weights import verify_for

        verify_for(cfg, "train")  # a missing CLIP/VGG file fails here, not after the queue
    # Logs beside the checkpoints they belong to; run_dir itself is stable across requeues (resume).
    folder = Path(args.log_dir or Path(cfg.run_dir) / "slurm").resolve() / "%j"
    sweep = None
    if args.eval:
        import shlex
        from dataclasses import replace

        sweep = sweep_job(str(Path(cfg.run_dir).resolve()), shlex.split(args.eval_args), watch=False)
        # One process evaluates (GPUs: one), after the training job has ended, however it ended.
        eval_options = replace(options, job_name=f"{options.job_name}-eval", nodes=1, tasks_per_node=0,
                               gpus_per_node=min(options.gpus_per_node, 1))
    out = submit_jobs([job], executor, folder, options, dry_run=args.dry_run)
    if sweep is not None and executor == "local" and not args.dry_run:
        # No scheduler to hold the sweep back: run it here once the training has returned.
        code = _finish(args, executor, out, f"{command} ({options.world_size} ranks, run_dir {cfg.run_dir})")
        eval_out = submit_jobs([sweep], executor, folder, eval_options, dry_run=False)
        return max(code, _finish(args, executor, eval_out, f"eval sweep of {cfg.run_dir}"))
    if sweep is not None:
        after = "afterany:{}".format("$TRAIN_JOB_ID" if args.dry_run else out[0].job_id)
        eval_out = submit_jobs([sweep], executor, folder, replace(eval_options, dependency=after),
                               dry_run=args.dry_run)
        if args.dry_run:
            out += "\n# then, after the training job (--eval):\n" + eval_out
        else:
            for j in eval_out:
                print(f"eval sweep: {executor} job {j.job_id} (after {out[0].job_id})  logs: {j.paths.folder}")
    if args.dry_run:
        sys.stdout.write(out)
        return 0
    return _finish(args, executor, out, f"{command} ({options.world_size} ranks, run_dir {cfg.run_dir})")


def sweep_job(directory: str, eval_args: list[str], watch: bool):
    """One eval job running ``g3dr eval --sweep DIR [--watch] EVAL_ARGS`` (idempotent, so a requeue re-runs it
    safely: finished checkpoints are skipped)."""
    from g3dr.errors import ConfigError

    if any(a.startswith(("--checkpoint", "--sweep", "--watch")) for a in eval_args):
        raise ConfigError("the eval arguments of a sweep job must not name --checkpoint, --sweep or --watch")
    return eval_job(["--sweep", directory, *(["--watch"] if watch else []), "--no-progress", *eval_args],
                    name="eval-sweep")


def prep_jobs(prep_args: list[str], num_jobs: int):
    """The array of ``g3dr prep shards PREP_ARGS`` jobs and the merge job after it, from one typed request (the
    arguments are parsed here, once, with the submitting user's ``--log-level``)."""
    from g3dr.data_prep.cli import command_line, shards_request_from_args
    from g3dr.errors import ConfigError
    from g3dr.launchers.jobs import prep_merge_job, prep_shard_jobs
    from g3dr.log import requested_level

    if any(a.startswith(("--shard-index", "--num-shard-jobs")) for a in prep_args):
        raise ConfigError("give --num-shard-jobs to `g3dr submit prep shards`, not after --: the launcher sets "
                          "--shard-index and --num-shard-jobs of each array job")
    argv = [*(["--log-level", requested_level()] if requested_level() else []), "prep", "shards", *prep_args]
    request = shards_request_from_args(check_g3dr_arguments(argv), command=command_line(argv))
    return prep_shard_jobs(request, argv, num_jobs), prep_merge_job(request, argv)


def run_prep_shards(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from g3dr.errors import ConfigError
    from g3dr.launchers.submit import submit_jobs

    if args.num_shard_jobs < 1:
        raise ConfigError(f"--num-shard-jobs must be >= 1, got {args.num_shard_jobs}")
    array, merge = prep_jobs(list(args.prep_args), args.num_shard_jobs)
    source = merge.steps[0].source
    if source.depth_model and not args.skip_weights_check:
        from g3dr.weights import verify_for

        verify_for(None, "prep", depth_model=source.depth_model)
    out = merge.steps[-1].folder
    executor = _executor(args)
    options = _options(args, "prep")
    folder = Path(args.log_dir or Path(out).parent / f"{Path(out).name}-slurm").resolve()
    if args.dry_run:
        sys.stdout.write(submit_jobs(array, executor, folder / "%j", options, dry_run=True))
        merge_options = replace(options, job_name=options.job_name + "-merge", dependency="afterok:ARRAY_JOB_ID")
        sys.stdout.write(submit_jobs([merge], executor, folder / "%j", merge_options, dry_run=True))
        return 0
    jobs = submit_jobs(array, executor, folder / "%j", options)
    if executor == "slurm":
        array_id = jobs[0].job_id.split("_")[0]
        merge_options = replace(options, job_name=options.job_name + "-merge", dependency=f"afterok:{array_id}")
        merge_jobs = submit_jobs([merge], executor, folder / "%j", merge_options)
    else:  # local jobs have no dependencies: wait, then merge
        if _finish(args, executor, jobs, f"prep shards ({args.num_shard_jobs} jobs)"):
            return 1
        merge_jobs = submit_jobs([merge], executor, folder / "%j", options)
    if executor == "slurm" and _finish(args, executor, jobs, f"prep shards ({args.num_shard_jobs} jobs)"):
        return 1
    return _finish(args, executor, merge_jobs, "prep merge + validate")


def eval_jobs(checkpoints: list[str], metrics: list[str], eval_args: list[str]):
    """One eval job per checkpoint, or per (checkpoint, metric) when ``metrics`` is not empty."""
    jobs = []
    for ck in checkpoints:
        for metric in metrics or [None]:
            argv = ["--checkpoint", str(Path(ck).resolve()), *(["--metrics", metric] if metric else []), *eval_args]
            jobs.append(eval_job(argv, name=f"eval-{len(jobs)}"))
    return jobs


def run_eval(args: argparse.Namespace) -> int:
    from g3dr.errors import ConfigError
    from g3dr.launchers.submit import submit_jobs

    if args.sweep:
        if not Path(args.sweep).is_dir():
            raise ConfigError(f"--sweep {args.sweep}: not a directory")
        if args.metrics:
            args.eval_args = ["--metrics", args.metrics, *args.eval_args]
        job = sweep_job(str(Path(args.sweep).resolve()), list(args.eval_args), watch=args.watch)
        executor = _executor(args)
        options = _options(args, "eval")
        folder = Path(args.log_dir or Path(args.sweep) / "eval-slurm").resolve() / "%j"
        out = submit_jobs([job], executor, folder, options, dry_run=args.dry_run)
        if args.dry_run:
            sys.stdout.write(out)
            return 0
        return _finish(args, executor, out, f"eval sweep of {args.sweep}{' (watching)' if args.watch else ''}")
    if args.watch:
        raise ConfigError("--watch needs --sweep DIR")
    if any(a.startswith(("--checkpoint", "--sweep", "--metrics")) for a in args.eval_args):
        raise ConfigError("give --checkpoints and --metrics to `g3dr submit eval`, not after --: the launcher "
                          "sets them per array job")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    missing = [ck for ck in args.checkpoints if not Path(ck).is_file()]
    if missing:
        raise ConfigError(f"checkpoint file(s) not found: {', '.join(missing)}")
    jobs_to_run = eval_jobs(args.checkpoints, metrics, list(args.eval_args))
    if not args.skip_weights_check:
        from g3dr.eval.runner import stored_config
        from g3dr.weights import verify_for

        for job in jobs_to_run:  # Inception when the job computes FID/IS
            verify_for(stored_config(job.request.checkpoint, job.request.overrides), "eval")
    executor = _executor(args)
    options = _options(args, "eval")
    folder = Path(args.log_dir or "outputs/eval-slurm").resolve() / "%j"
    out = submit_jobs(jobs_to_run, executor, folder, options, dry_run=args.dry_run)
    if args.dry_run:
        sys.stdout.write(out)
        return 0
    return _finish(args, executor, out, f"eval ({len(jobs_to_run)} jobs)")
