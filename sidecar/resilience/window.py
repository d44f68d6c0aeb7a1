"""A sliding time window of counters, in fixed-width buckets, on an injected clock.

The breaker's rate rules (calls, failures, slow calls over the last `failure_rate.window`)
and the retry budget's ceiling (requests and retries over the last 10 s) both need "how
many of each kind of event in the last W seconds", on the request path, in O(1) and fixed
memory. This is that, once: a ring of buckets, each holding one count per field, plus
running totals.

- Bucket width: W / 10, but never wider than one second (a 10 s window has ten 1 s
  buckets, a 2 s window ten 0.2 s ones, a 60 s window sixty 1 s ones). At least ten
  buckets keep the slide smooth; a second at most keeps a long window from forgetting in
  big steps.
- Counts leave a whole bucket at a time, so an event may be forgotten up to one bucket
  width early: the window covers between W - width and W seconds back.
- Adding is O(1) apart from clearing the buckets that expired since the last call (at most
  the ring's size, however long the clock jumped).
- A clock that steps back (only an injected one can) keeps counting in the newest bucket.

Pure: no I/O, no sleeping; the clock is a parameter.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Final

# Bucket counts are whole numbers, but W / width is a float division: 10 / 0.1 may be
# 99.99999999999999. This keeps such ratios on the intended integer.
_EPSILON: Final = 1e-9

Clock = Callable[[], float]


class SlidingWindow:
    """`fields` counters summed over the last `window` seconds."""

    __slots__ = ("_buckets", "_clock", "_head", "_size", "_width", "totals", "window")

    def __init__(self, window: float, fields: int, clock: Clock = time.monotonic) -> None:
        if not window > 0:
            raise ValueError(f"window must be > 0 seconds, got {window}")
        if fields < 1:
            raise ValueError(f"a window needs at least one field, got {fields}")
        self.window = window
        self._clock = clock
        self._width = min(1.0, window / 10)
        self._size = math.ceil(window / self._width - _EPSILON)
        self._buckets = [[0] * fields for _ in range(self._size)]
        # Running sums over the ring; read them only after `advance()` (or use `read()`).
        self.totals = [0] * fields
        self._head = math.floor(clock() / self._width)  # the newest bucket's number

    @property
    def bucket_width(self) -> float:
        return self._width

    def advance(self) -> list[int]:
        """Expire the buckets that left the window; return the current bucket's counts.

        The caller may add to the returned list, and must add the same amounts to `totals`
        (`add()` does both).
        """
        now = math.floor(self._clock() / self._width)
        steps = now - self._head
        if steps > 0:
            size = self._size
            buckets = self._buckets
            totals = self.totals
            for i in range(1, min(steps, size) + 1):
                bucket = buckets[(self._head + i) % size]
                for f, count in enumerate(bucket):
                    if count:
                        totals[f] -= count
                        bucket[f] = 0
            self._head = now
        return self._buckets[self._head % self._size]

    def add(self, field: int, count: int = 1) -> None:
        """Count `count` events of kind `field` now."""
        self.advance()[field] += count
        self.totals[field] += count

    def read(self) -> list[int]:
        """The totals over the window as of now (a copy)."""
        self.advance()
        return list(self.totals)

    def clear(self) -> None:
        """Forget everything (the breaker starts a fresh window when it closes)."""
        for bucket in self._buckets:
            for f in range(len(bucket)):
                bucket[f] = 0
        for f in range(len(self.totals)):
            self.totals[f] = 0
