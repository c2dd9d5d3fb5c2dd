"""Counts of what the data pipeline read, delivered and skipped, and the skip-fraction guard.

A :class:`DataCounts` lives in every stream (one per DataLoader worker or in-process stream); workers send
a snapshot with each batch, and the loaders in the receiving process sum the latest snapshot of every
worker (:class:`CountsByWorker`). Both sides apply :meth:`DataCounts.check`: the worker so that a worker
whose samples are all bad stops instead of spinning, the loader on the rank's totals.

Sample reasons (each counts one input sample that was read and not delivered):

- ``undecodable_sample``: an image or depth PNG that does not decode, or a sample without both;
- ``duplicate_key``: a key seen before in the same read of a shard (the first one is kept);
- ``incomplete_sample``: the sample at the point where a shard's tar stream breaks (truncated or corrupt).

Shard reasons (each counts one event; the samples behind a break are not in the stream and cannot be
counted without the manifest): ``unreadable_shard`` (cannot be opened, ``pipe:`` command failed),
``truncated_shard``, ``corrupt_shard`` (bad tar header), ``empty_shard`` (a readable shard without samples).

Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from g3dr.errors import DataError

SAMPLE_REASONS = ("undecodable_sample", "duplicate_key", "incomplete_sample")
SHARD_REASONS = ("unreadable_shard", "truncated_shard", "corrupt_shard", "empty_shard")
FIRST_BAD_KEPT = 5


@dataclass
class DataCounts:
    """What one stream (or the sum of several) read, delivered and skipped.

    ``read`` counts input samples that reached the decode stage (every one is either delivered, skipped,
    or waiting in an unfinished batch), so ``read == delivered + skipped_total`` at the end of an exact
    pass and after every batch of a training worker.
    """

    read: int = 0
    delivered: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    """Skipped samples by reason (:data:`SAMPLE_REASONS`)."""
    shard_errors: dict[str, int] = field(default_factory=dict)
    """Shard-level events by reason (:data:`SHARD_REASONS`)."""
    first_bad: list[str] = field(default_factory=list)
    """The first few problems, ``"reason: key in url"`` (for error messages)."""

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    @property
    def skip_fraction(self) -> float:
        return self.skipped_total / self.read if self.read else 0.0

    def add_skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self._note(f"{reason}: {where}")

    def add_shard_error(self, reason: str, where: str) -> None:
        self.shard_errors[reason] = self.shard_errors.get(reason, 0) + 1
        self._note(f"{reason}: {where}")

    def _note(self, text: str) -> None:
        if len(self.first_bad) < FIRST_BAD_KEPT:
            self.first_bad.append(text)

    def merge(self, other: DataCounts) -> DataCounts:
        """Add ``other`` into this one (in place); returns self."""
        self.read += other.read
        self.delivered += other.delivered
        for mine, theirs in ((self.skipped, other.skipped), (self.shard_errors, other.shard_errors)):
            for reason, count in theirs.items():
                mine[reason] = mine.get(reason, 0) + count
        for text in other.first_bad:
            if text not in self.first_bad:
                self._note(text)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"read": self.read, "delivered": self.delivered, "skipped": dict(self.skipped),
                "shard_errors": dict(self.shard_errors), "first_bad": list(self.first_bad)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataCounts:
        return cls(read=int(data["read"]), delivered=int(data["delivered"]), skipped=dict(data["skipped"]),
                   shard_errors=dict(data["shard_errors"]), first_bad=list(data["first_bad"]))

    def summary(self) -> str:
        parts = [f"{self.read} read, {self.delivered} delivered, {self.skipped_total} skipped"]
        if self.skipped:
            parts.append("skipped by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())))
        if self.shard_errors:
            parts.append("shard errors: " + ", ".join(f"{k} {v}" for k, v in sorted(self.shard_errors.items())))
        if self.first_bad:
            parts.append("first problems: " + "; ".join(self.first_bad))
        return "; ".join(parts)

    def check(self, max_fraction: float, min_samples: int, where: str = "") -> None:
        """Raise :class:`DataError` when at least ``min_samples`` were read and more than ``max_fraction``
        of them were skipped (``max_fraction >= 1`` never raises)."""
        if max_fraction >= 1.0 or self.read < max(min_samples, 1) or self.skip_fraction <= max_fraction:
            return
        raise DataError(
            f"too much bad data{where}: {self.skipped_total} of {self.read} samples read were skipped "
            f"({100 * self.skip_fraction:.2f}%), more than data.max_skip_fraction={max_fraction} (checked once "
            f"data.skip_check_min_samples={min_samples} samples were read). {self.summary()}. Run "
            "'g3dr prep validate' on the shard folder and rewrite or drop the bad shards, or raise "
            "data.max_skip_fraction")


class CountsByWorker:
    """The counts of one rank: the sum of the latest snapshot of each worker of the current DataLoader
    iteration, plus everything of earlier iterations (epochs, or restarts after ``close()``)."""

    def __init__(self) -> None:
        self._done = DataCounts()
        self._latest: dict[int, DataCounts] = {}

    def new_iteration(self) -> None:
        """Fold the current workers' counts into the past ones (their processes are about to be replaced)."""
        for counts in self._latest.values():
            self._done.merge(counts)
        self._latest = {}

    def update(self, worker: int, snapshot: dict[str, Any]) -> None:
        self._latest[int(worker)] = DataCounts.from_dict(snapshot)

    def total(self) -> DataCounts:
        out = DataCounts().merge(self._done)
        for _, counts in sorted(self._latest.items()):
            out.merge(counts)
        return out
