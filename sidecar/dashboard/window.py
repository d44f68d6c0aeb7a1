"""A service's last minute, as counter readings a second apart, and what they add up to.

Pure: no clock, no I/O. The sampler appends one `Totals` (cumulative counters, read from the
Prometheus registry) per second with the monotonic time it was read at; everything the
dashboard shows is a difference of two readings, so nothing on the request path counts
anything for the dashboard, and a missed tick only makes one interval longer.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

# Readings kept per service: one a second for the sparkline's minute, plus its start.
HISTORY: Final = 61

# The headline numbers (rate, error share, p50/p99, retries/s) cover this many seconds,
# like Hystrix's rolling window: long enough to be steady at a few requests a second.
WINDOW: Final = 10.0


@dataclass(frozen=True, slots=True)
class Totals:
    """Cumulative counters of one service at one instant, summed over its routes."""

    requests: float = 0.0
    errors: float = 0.0  # answers with a 5xx status, the sidecar's own 502/503/504 included
    retries: float = 0.0
    budget_exhausted: float = 0.0
    rejected: float = 0.0  # failed fast: refused by the breaker, or overloaded
    # Cumulative histogram counts, one per bucket bound of `bounds`, +Inf last.
    buckets: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class Delta:
    """What happened between two readings."""

    seconds: float
    requests: float
    errors: float
    retries: float
    budget_exhausted: float
    rejected: float
    buckets: tuple[float, ...]

    def per_second(self, value: float) -> float:
        return value / self.seconds if self.seconds > 0 else 0.0


def _grew(new: float, old: float) -> float:
    # Counters only grow; a drop means the series was recreated, so count from zero.
    return new - old if new >= old else new


def delta(old: Totals, new: Totals, seconds: float) -> Delta:
    if len(old.buckets) == len(new.buckets):
        buckets = tuple(_grew(n, o) for n, o in zip(new.buckets, old.buckets, strict=True))
    else:
        buckets = new.buckets
    return Delta(
        seconds=seconds,
        requests=_grew(new.requests, old.requests),
        errors=_grew(new.errors, old.errors),
        retries=_grew(new.retries, old.retries),
        budget_exhausted=_grew(new.budget_exhausted, old.budget_exhausted),
        rejected=_grew(new.rejected, old.rejected),
        buckets=buckets,
    )


def quantile(q: float, bounds: Sequence[float], counts: Sequence[float]) -> float | None:
    """The q-quantile of cumulative bucket counts, as PromQL's histogram_quantile finds it.

    `bounds` are the finite upper bounds, `counts` has one more entry (the +Inf bucket).
    Linear interpolation inside the bucket the rank falls in; the first bucket starts at 0;
    a rank in the +Inf bucket answers the largest finite bound. None without observations.
    """
    if not bounds or len(counts) != len(bounds) + 1:
        return None
    total = counts[-1]
    if total <= 0:
        return None
    rank = q * total
    previous = 0.0
    for i, count in enumerate(counts[:-1]):
        # A reading is not atomic across buckets: keep the counts non-decreasing.
        cumulative = max(count, previous)
        if cumulative >= rank and cumulative > previous:
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * (rank - previous) / (cumulative - previous)
        previous = cumulative
    return bounds[-1]


def _finite(value: float | None, digits: int) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


class ServiceWindow:
    """The last `HISTORY` readings of one service."""

    __slots__ = ("_readings",)

    def __init__(self) -> None:
        self._readings: deque[tuple[float, Totals]] = deque(maxlen=HISTORY)

    def __len__(self) -> int:
        return len(self._readings)

    def add(self, at: float, totals: Totals) -> None:
        """A reading taken at monotonic time `at` (readings come in time order)."""
        self._readings.append((at, totals))

    def latest(self) -> Totals | None:
        return self._readings[-1][1] if self._readings else None

    def recent(self, window: float = WINDOW) -> Delta | None:
        """The change over the last `window` seconds (or as much of it as is recorded)."""
        if len(self._readings) < 2:
            return None
        end_at, end = self._readings[-1]
        # The oldest reading within the window; half a tick of slack for timer jitter.
        start_at, start = self._readings[-2]
        for at, totals in self._readings:
            if end_at - at <= window * 1.05:
                start_at, start = at, totals
                break
        if end_at <= start_at:
            return None
        return delta(start, end, end_at - start_at)

    def steps(self) -> list[Delta]:
        """One delta per consecutive pair of readings, oldest first (the sparkline)."""
        return [
            delta(old, new, new_at - old_at)
            for (old_at, old), (new_at, new) in itertools.pairwise(self._readings)
            if new_at > old_at
        ]

    def summary(self, bounds: Sequence[float]) -> dict[str, object]:
        """The numbers of one dashboard tile; None where there is nothing to show yet."""
        latest = self.latest()
        recent = self.recent()
        out: dict[str, object] = {
            "window_seconds": round(recent.seconds, 3) if recent else None,
            "rate": None,
            "error_share": None,
            "p50_ms": None,
            "p99_ms": None,
            "retries": {"per_second": None, "total": latest.retries if latest else 0},
            "budget_exhausted": {
                "per_second": None,
                "total": latest.budget_exhausted if latest else 0,
            },
            "rejected": {"per_second": None, "total": latest.rejected if latest else 0},
            "requests_total": latest.requests if latest else 0,
        }
        if recent is not None:
            out["rate"] = _finite(recent.per_second(recent.requests), 3)
            if recent.requests > 0:
                out["error_share"] = _finite(recent.errors / recent.requests, 4)
            for key, q in (("p50_ms", 0.5), ("p99_ms", 0.99)):
                seconds = quantile(q, bounds, recent.buckets)
                out[key] = _finite(seconds * 1000 if seconds is not None else None, 3)
            out["retries"] = {
                "per_second": _finite(recent.per_second(recent.retries), 3),
                "total": latest.retries if latest else 0,
            }
            out["budget_exhausted"] = {
                "per_second": _finite(recent.per_second(recent.budget_exhausted), 3),
                "total": latest.budget_exhausted if latest else 0,
            }
            out["rejected"] = {
                "per_second": _finite(recent.per_second(recent.rejected), 3),
                "total": latest.rejected if latest else 0,
            }
        steps = self.steps()
        out["sparkline"] = {
            "rate": [_finite(s.per_second(s.requests), 3) or 0.0 for s in steps],
            "errors": [_finite(s.per_second(s.errors), 3) or 0.0 for s in steps],
        }
        return out
