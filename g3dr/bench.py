"""``g3dr bench ACTION``: performance measurements, each printing one JSON line.

Actions live beside the code they measure; each module in :data:`BENCH_MODULES` exposes
``register_bench(actions)`` that adds its action parsers (with ``set_defaults(handler=...)``).
To add one (e.g. ``g3dr bench renderer``), write ``register_bench`` in your module and append the
module's dotted path here. Registering stays cheap: no torch import at module top.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

BENCH_MODULES: tuple[str, ...] = (
    "g3dr.data.bench",
    "g3dr.render.bench",
    "g3dr.train.bench",
    "g3dr.models.sr_bench",
    "g3dr.models.sr_quality",
    "g3dr.gpu_check",
    "g3dr.bench_chart",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="performance benchmarks (one JSON line each)",
                                   description="Measure a subsystem on this machine and print one JSON line.")
    actions = parser.add_subparsers(dest="bench_action", metavar="ACTION", required=True)
    for name in BENCH_MODULES:
        importlib.import_module(name).register_bench(actions)


# What the actions share: each measured case runs in a fresh child process (``python -m MODULE --child ...``), so
# its peak memory and compiled kernels are its own.


def run_child(module: str, args: list[str], what: str) -> None:
    """Run ``python -m module --child *args`` in this environment; on failure echo its stderr and raise
    ``RuntimeError("<what> failed with exit code N")``. The child writes its result to a file named in ``args``."""
    proc = subprocess.run([sys.executable, "-m", module, "--child", *args], env=os.environ.copy(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"{what} failed with exit code {proc.returncode}")


def rss_bytes() -> int:
    """This process's resident set size now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def comma_list(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    """``"a, b"`` -> ``["a", "b"]``, each in ``allowed``; a ConfigError naming ``flag`` otherwise (or when empty)."""
    from g3dr.errors import ConfigError

    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if not items or bad:
        raise ConfigError(f"{flag}={value!r}: expected a comma list of {', '.join(allowed)}")
    return items


CONFIG_FILES = {"tiny": "tiny.yaml", "paper": "imagenet128.yaml"}
"""The configs the benchmarks compare, by name: files of the checkout's ``configs/``."""


def add_config_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """``--configs`` (a comma list of ``names``, default all in that order) and one ``--NAME-config FILE`` each."""
    parser.add_argument("--configs", default=",".join(names), help=f"comma list of: {', '.join(names)}")
    configs = Path(__file__).resolve().parents[1] / "configs"
    for name in names:
        parser.add_argument(f"--{name}-config", default=str(configs / CONFIG_FILES[name]))
