"""``g3dr bench ACTION``: performance measurements, each printing one JSON line.

Actions live beside the code they measure; each module in :data:`BENCH_MODULES` exposes
``register_bench(actions)`` that adds its action parsers (with ``set_defaults(handler=...)``).
To add one (e.g. ``g3dr bench renderer``), write ``register_bench`` in your module and append the
module's dotted path here. Registering stays cheap: no torch import at module top.
"""

from __future__ import annotations

import argparse
import importlib

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
