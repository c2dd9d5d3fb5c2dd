"""``g3dr weights``: list, fetch and verify the weight files jobs need.

    g3dr weights list [--json]
    g3dr weights verify [--config FILE] [KEY=VALUE ...] [--for train|eval|prep|all] [--depth-model DIR]
                        [--lock FILE] [--write-lock FILE] [--strict] [--no-cache]
    g3dr weights fetch NAME [NAME ...] [--dest PATH]            (on a machine with internet)
    g3dr weights fetch --config FILE [KEY=VALUE ...] [--for KIND] [--depth-model DIR]

All take ``--registry FILE`` (default: ``$G3DR_WEIGHTS_REGISTRY``, else the built-in registry). Registering
is cheap: no torch anywhere in this subcommand.
"""

from __future__ import annotations

import argparse
import json
import sys

from g3dr.config_cli import add_config_arguments

KINDS = ("train", "eval", "prep", "all")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", metavar="FILE", default=None,
                        help="registry of known weight files (default: $G3DR_WEIGHTS_REGISTRY, else the built-in one)")
    parser.add_argument("--lock", metavar="FILE", default=None,
                        help="lock file of pinned sha256s (default: the config's weights_lock, else $G3DR_WEIGHTS_LOCK)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _job_selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--for", dest="kind", choices=KINDS, default="all",
                        help="the job kind whose files to consider (default all): train = CLIP + VGG when "
                             "loss.critics=pretrained; eval = Inception when FID/IS are requested; prep = the "
                             "--depth-model folder")
    parser.add_argument("--depth-model", default="", metavar="DIR",
                        help="the depth-model folder of `g3dr prep shards --depth-model` (prep takes no config)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("weights", help="list, fetch and verify weight files (CLIP, VGG, Inception, depth)",
                                   description="Offline weight files: what each job needs, where it comes from, "
                                               "and whether the local copy is the right one (sha256).")
    actions = parser.add_subparsers(dest="weights_action", metavar="ACTION", required=True)

    ls = actions.add_parser("list", help="the registered weight files")
    ls.add_argument("--registry", metavar="FILE", default=None)
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(handler=run_list)

    verify = actions.add_parser(
        "verify", help="check presence and sha256 of every weight file a config needs",
        description="Check every weight file the config names for a job kind: present, and its sha256 equal to "
                    "the lock file's pin or the registry's published hash. Exits non-zero naming each missing or "
                    "mismatching file and the command that gets it.")
    add_config_arguments(verify)
    _job_selection(verify)
    _common(verify)
    verify.add_argument("--write-lock", metavar="FILE", default=None,
                        help="record the sha256 of the files present into FILE (merged; mismatching files are "
                             "never pinned)")
    verify.add_argument("--strict", action="store_true",
                        help="also fail on files not pinned by a full sha256 (lock or registry)")
    verify.add_argument("--no-cache", action="store_true", help="rehash every file (ignore the hash cache)")
    verify.set_defaults(handler=run_verify)

    fetch = actions.add_parser(
        "fetch", help="download weight files by name or for a config (needs internet)",
        description="Download registered weight files (resumable; verified against the lock or registry sha256 "
                    "before the atomic rename). Give NAMEs (see `g3dr weights list`), or --config to fetch what "
                    "that config needs to the paths it names.")
    fetch.add_argument("items", nargs="*", metavar="NAME|KEY=VALUE",
                       help="registry names, or (with --config) dotted config overrides")
    fetch.add_argument("--config", "-c", metavar="FILE", default=None, help="fetch what this config needs")
    _job_selection(fetch)
    fetch.add_argument("--dest", metavar="PATH", default=None,
                       help="with one NAME: the file (or folder) to write; with several: a folder for all")
    fetch.add_argument("--force", action="store_true", help="download even when a file is already there")
    fetch.add_argument("--timeout", type=float, default=60.0, metavar="S", help="network timeout per read")
    _common(fetch)
    fetch.set_defaults(handler=run_fetch)


def run_list(args: argparse.Namespace) -> int:
    from g3dr.weights.registry import load_registry

    registry = load_registry(args.registry)
    if args.json:
        out = [{"name": e.name, "config_key": e.config_key, "default_path": e.default_path,
                "directory": e.directory, "hash": e.hash_kind(), "hash_source": e.hash_source,
                "licence": e.licence, "description": e.description,
                "files": [{"path": f.path, "urls": list(f.urls), "sha256": f.sha256,
                           "sha256_prefix": f.sha256_prefix, "size": f.size} for f in e.files]}
               for e in registry.entries]
        print(json.dumps(out, indent=1))
        return 0
    rows = [("NAME", "CONFIG KEY", "DEFAULT PATH", "SHA256")]
    for e in registry.entries:
        f = e.files[0]
        rows.append((e.name, e.config_key, e.default_path + ("/" if e.directory else ""),
                     f.sha256[:16] + "..." if e.hash_kind() == "sha256" and not e.directory
                     else f"prefix {f.sha256_prefix}" if e.hash_kind() == "prefix" and not e.directory
                     else "none published (pin with --write-lock)"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
    print(f"\nregistry: {registry.source}\n`g3dr weights list --json` shows URLs, hash sources and licences.")
    return 0


def _config(args: argparse.Namespace, overrides: list[str]):
    from g3dr.config import load_config

    return load_config(args.config, overrides)


def run_verify(args: argparse.Namespace) -> int:
    from g3dr.errors import WeightsError
    from g3dr.weights.registry import load_lock, load_registry, write_lock
    from g3dr.weights.verify import (check_requirements, default_lock, failure_message, format_table, lock_entries,
                                     requirements_for)

    cfg = _config(args, args.overrides)
    requirements = requirements_for(cfg, args.kind, depth_model=args.depth_model)
    if not requirements:
        print(f"no weight files needed for {args.kind} with this config (loss.critics={cfg.loss.critics}, "
              f"eval.metrics={list(cfg.eval.metrics)}" + (", no --depth-model" if args.kind in ("prep", "all") else "")
              + ")")
        return 0
    lock_path = args.lock if args.lock is not None else default_lock(cfg)
    checks = check_requirements(requirements, load_registry(args.registry), load_lock(lock_path),
                                want_hash=bool(args.write_lock), progress=not args.no_progress,
                                use_cache=not args.no_cache)
    print(format_table(checks))
    if args.write_lock:
        pins = lock_entries(checks)
        if pins:
            path = write_lock(args.write_lock, pins)
            print(f"pinned {len(pins)} file(s) in {path}: {', '.join(p.key for p in pins)}")
    failures = [c for c in checks if not c.passes(args.strict)]
    if failures:
        raise WeightsError(failure_message(failures, f"`{args.kind}`"))
    unpinned = [c for c in checks if c.status == "unpinned"]
    if unpinned and not args.write_lock:
        print(f"note: {len(unpinned)} file(s) present but unpinned (no published sha256): pin them with "
              f"--write-lock FILE and set weights_lock=FILE in the config", file=sys.stderr)
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from g3dr.errors import ConfigError, WeightsError
    from g3dr.weights.fetch import fetch_target, targets_for_entry
    from g3dr.weights.registry import load_lock, load_registry
    from g3dr.weights.verify import default_lock, requirements_for

    registry = load_registry(args.registry)
    names = [i for i in args.items if "=" not in i]
    overrides = [i for i in args.items if "=" in i]
    targets = []
    lock_path = args.lock
    if names:
        if args.config or overrides or args.depth_model:
            raise ConfigError("give either registry NAMEs or --config/--depth-model to `g3dr weights fetch`, not both")
        entries = [registry.get(n) for n in names]
        for e in entries:
            dest = args.dest
            if dest and len(entries) > 1:
                from pathlib import Path

                dest = str(Path(dest) / Path(e.default_path).name)
            targets += targets_for_entry(e, dest)
    elif args.config or overrides or args.depth_model:
        if args.dest:
            raise ConfigError("--dest goes with NAMEs; with --config the files go where the config names them")
        cfg = _config(args, overrides) if (args.config or overrides) else None
        if lock_path is None:
            lock_path = default_lock(cfg)
        requirements = requirements_for(cfg, args.kind, depth_model=args.depth_model)
        if not requirements:
            print(f"nothing to fetch for {args.kind} with this config")
            return 0
        for req in requirements:
            entry = registry.match(req.key, req.path) or registry.primary(req.key)
            if entry is None:
                raise WeightsError(f"no registered weight file for {req.key} (registry {registry.source})")
            targets += targets_for_entry(entry, req.path, lock_key=req.key)
    else:
        raise ConfigError("name the weights to fetch (`g3dr weights list` shows them) or give --config FILE")
    lock = load_lock(lock_path if lock_path is not None else default_lock(None))
    for t in targets:
        result = fetch_target(t, lock, force=args.force, progress=not args.no_progress, timeout=args.timeout)
        print(f"{result.status}\t{t.entry.name}{'/' + t.file.path if t.file.path else ''}\t{result.dest}\t"
              f"sha256={result.sha256 or '-'}\tverified={result.verified_by or 'no (no published hash)'}", flush=True)
    return 0
