"""Progress with rate and ETA, written as log lines (readable in Ray job logs)."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("polyclip")


def format_seconds(seconds: float) -> str:
    """``3725 -> '1h02m05s'``."""
    seconds = max(0, round(seconds))
    hours, rem = divmod(seconds, 3600)
    minutes, secs = divmod(rem, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Log ``what: done/total (rate/s, ETA)`` at most every ``interval`` seconds.

    Args:
        what: What is being counted ("encode efficientnet_lite:0", "epoch 3").
        total: Units of work in all.
        unit: Unit name in the rate ("img", "step").
        interval: Minimum seconds between log lines.
        log: Logger to write to.
    """

    def __init__(self, what: str, total: int, unit: str = "it", interval: float = 10.0,
                 log: logging.Logger | None = None) -> None:
        self.what, self.total, self.unit, self.interval = what, total, unit, interval
        self.log = log or logger
        self.done = 0
        self.start = time.perf_counter()
        self._last = self.start

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units; log if the interval has passed."""
        self.done += n
        now = time.perf_counter()
        if now - self._last >= self.interval and self.done < self.total:
            self._last = now
            self.log.info(self.line())

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def line(self) -> str:
        rate = self.rate
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_s = format_seconds(eta) if eta != float("inf") else "?"
        return f"{self.what}: {self.done}/{self.total} ({rate:.1f} {self.unit}/s, ETA {eta_s})"

    def close(self) -> float:
        """Log the final line; return elapsed seconds."""
        elapsed = time.perf_counter() - self.start
        self.log.info("%s: %d %s in %s (%.1f %s/s)", self.what, self.done, self.unit,
                      format_seconds(elapsed), self.rate, self.unit)
        return elapsed
