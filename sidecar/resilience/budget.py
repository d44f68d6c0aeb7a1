"""The per-route retry budget (CONTRACT §2 `retries.budget`).

Retries multiply load exactly when an upstream can least take it. The budget caps them at a
share of the route's real traffic over a sliding window:

    retries in the last `window` seconds <= ratio * requests in that window
                                            + min_per_second * window

where "requests" are first attempts and the retry being asked for is already counted. The
`min_per_second` floor lets a quiet route still retry; 0 means "only the ratio".

The window is a ring of fixed-width buckets (one second, or finer for windows under ten
seconds) with running totals, so each call is O(1) apart from clearing the buckets that
expired since the last call (at most the ring's size), and memory is fixed. Counts leave the
window a whole bucket at a time: an event may be forgotten up to one bucket width early.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Final

# Spend decisions compare a sum of float products with an integer count; this keeps e.g.
# 0.1 * 30 (3.0000000000000004 or 2.9999999999999996) on the intended side of the line.
_EPSILON: Final = 1e-9


class RetryBudget:
    def __init__(
        self,
        ratio: float,
        min_per_second: float,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ratio < 0 or min_per_second < 0:
            raise ValueError(
                f"ratio and min_per_second must be >= 0, got {ratio} and {min_per_second}"
            )
        if not window > 0:
            raise ValueError(f"window must be > 0 seconds, got {window}")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.window = window
        self._clock = clock
        # At least ten buckets, none wider than a second: sliding stays smooth at any window.
        self._width = min(1.0, window / 10)
        self._size = math.ceil(window / self._width - _EPSILON)
        self._requests = [0] * self._size
        self._retries = [0] * self._size
        self._total_requests = 0
        self._total_retries = 0
        self._head = self._bucket_index()  # index of the newest bucket

    def record_request(self) -> None:
        """Count one request the route received (its first attempt, never a retry)."""
        slot = self._advance()
        self._requests[slot] += 1
        self._total_requests += 1

    def try_spend(self) -> bool:
        """Count a retry and return True if the budget allows it; else count nothing, False."""
        slot = self._advance()
        allowance = self.ratio * self._total_requests + self.min_per_second * self.window
        if self._total_retries + 1 > allowance + _EPSILON:
            return False
        self._retries[slot] += 1
        self._total_retries += 1
        return True

    @property
    def requests_in_window(self) -> int:
        self._advance()
        return self._total_requests

    @property
    def retries_in_window(self) -> int:
        self._advance()
        return self._total_retries

    def _bucket_index(self) -> int:
        return math.floor(self._clock() / self._width)

    def _advance(self) -> int:
        """Expire the buckets that left the window; return the ring slot of the current one."""
        now = self._bucket_index()
        # A clock that steps back (only an injected one can) keeps the newest bucket.
        steps = now - self._head
        if steps > 0:
            for i in range(1, min(steps, self._size) + 1):
                slot = (self._head + i) % self._size
                self._total_requests -= self._requests[slot]
                self._total_retries -= self._retries[slot]
                self._requests[slot] = 0
                self._retries[slot] = 0
            self._head = now
        return self._head % self._size
