"""Data errors and the on_error policy: raise with file:line, or skip and count by reason."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger("engine.data")


class DataError(ValueError):
    """A sample or image is unusable. `reason` is a short key used to count skips."""

    # Defaults let DataLoader re-create it in the main process as DataError(message=...) from a worker.
    def __init__(self, reason: str = "worker_error", message: str = "", where: str = ""):
        self.reason = reason
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


@dataclass
class SkipCounter:
    """Counts skipped samples by reason; logs the first few of each reason so nothing is silent."""

    log_first: int = 3  # per reason; the rest are counted only, the total is in `summary()`
    counts: Counter = field(default_factory=Counter)

    def add(self, err: DataError) -> None:
        self.counts[err.reason] += 1
        if self.counts[err.reason] <= self.log_first:
            log.warning("skipping sample (%s): %s", err.reason, err)

    def merge(self, reasons: dict[str, int]) -> None:
        self.counts.update(reasons)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


def handle(err: DataError, policy: str, skips: SkipCounter) -> None:
    """Apply data.on_error: re-raise, or count the skip."""
    if policy == "raise":
        raise err
    skips.add(err)
