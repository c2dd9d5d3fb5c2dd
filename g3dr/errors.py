"""Typed user-facing errors.

Every error a user can fix (a bad config, bad data, a missing weight file) is one of these. The CLI
prints them as one line with the action to take, without a traceback, and exits non-zero.
Programming errors stay ordinary exceptions and keep their tracebacks.
"""

from __future__ import annotations


class G3DRError(Exception):
    """Base class of errors the user can act on. The message says what to do."""

    exit_code = 2


class ConfigError(G3DRError):
    """A config file or override is invalid: unknown key, wrong type, value out of range."""


class DataError(G3DRError):
    """Input data is missing, malformed or inconsistent with its manifest."""


class WeightsError(G3DRError):
    """A required weight file (CLIP, VGG, Inception, depth model, checkpoint) is missing or invalid."""


class OutputError(G3DRError):
    """An output location cannot be written: a read-only file system, a full disk, no permission, or a file
    where a folder should be. The message names the location, the cause and what to do."""


class TrackingError(G3DRError):
    """The MLflow tracking store could not be reached or refused a write (after retries), where tracking must
    succeed (evaluation; training's tracking never stops training)."""
