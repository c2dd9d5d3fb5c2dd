"""One log format for every subcommand, rank-aware.

Rank 0 logs at the configured level; other ranks log warnings and errors only, so a 64-rank job prints
one stream of progress and every rank's problems. The rank is part of every line.
"""

from __future__ import annotations

import logging
import sys

from g3dr.distributed import DistEnv, resolve_dist_env

LOG_FORMAT = "%(asctime)s %(levelname)-7s [rank %(rank)s] %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
_HANDLER_NAME = "g3dr-console"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (as ``logging.lastResort`` does), not to
    the stream that was current at setup: a caller that swaps stderr (pytest's capture, a notebook, a
    redirect) never leaves the handler writing to a closed file."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property ignores it
        pass


LEVEL_ENV = "G3DR_LOG_LEVEL"
"""Environment variable with the console level when no ``--log-level`` is given (launched jobs read it)."""
_requested: str | None = None


def request_level(level: str | None) -> None:
    """Record the level the user asked for (``g3dr --log-level``); launched jobs carry it to their tasks."""
    global _requested
    _requested = level


def requested_level() -> str | None:
    """The level the user asked for: ``--log-level``, else ``$G3DR_LOG_LEVEL``, else None (the config decides:
    ``logging.level`` for training, INFO otherwise)."""
    import os

    return _requested or os.environ.get(LEVEL_ENV) or None


def setup_logging(level: str = "INFO", dist: DistEnv | None = None, stream=None) -> logging.Logger:
    """Configure the ``g3dr`` logger tree once per process (idempotent) and return it."""
    dist = dist or resolve_dist_env()
    logger = logging.getLogger("g3dr")
    for handler in list(logger.handlers):
        if handler.get_name() == _HANDLER_NAME:
            logger.removeHandler(handler)
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    handler.addFilter(_RankFilter(dist.rank))
    logger.addHandler(handler)
    logger.setLevel(level if dist.is_main else "WARNING")
    logger.propagate = False
    return logger


def get_logger(name: str) -> logging.Logger:
    """A logger under the ``g3dr`` tree (``g3dr.data``, ``g3dr.train``, ...)."""
    return logging.getLogger(name if name.startswith("g3dr") else f"g3dr.{name}")
