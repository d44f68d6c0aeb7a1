"""The per-route retry budget (`retries.budget`): a ceiling, and a throttle under it.

Retries multiply load exactly when an upstream can least take it; they also rescue most
requests to a healthy-but-flaky one. The budget must tell the two apart. It has two parts,
and a retry needs both to agree:

**The ceiling** (Finagle's budget). Over the last `window` (10 s):

    retries <= ratio * requests + min_per_second * window

"Requests" are first attempts; the retry being asked for is already counted on the left.
The `min_per_second` floor lets a quiet route still retry; 0 means "only the ratio".

**The throttle** (gRPC's retryThrottling, with Finagle's time-based refill). A reserve of
`reserve` tokens, full when the route is healthy:

    an attempt that reached an upstream and failed   takes one token  (not below 0)
    an attempt that reached an upstream and worked   gives one back   (not above reserve)
    time                                             refills min_per_second tokens a second
    a retry                                          needs at least one token left

`reserve` is a quarter of the floor (min_per_second * window / 4, at least 1): 25 by
default. While successes keep pace with failures the reserve stays full and only the
ceiling applies. When most attempts fail, the reserve drains within `reserve` failures
and then refills only as fast as `min_per_second`, so in a full outage the retries that
reach the upstream per window are about the floor alone. `min_per_second: 0` turns the
throttle off along with the floor: the ceiling (ratio alone) is then the whole budget.
docs/resilience.md has the arithmetic: why the throttle never bites at 20 % random
failures, and why it caps an outage at 1.25 x requests + the floor.

Retries after a connect failure never ask the budget (the request reached no upstream), and
connect failures do not touch the throttle: a dead endpoint among healthy ones must not
starve the retries of the rest.

Pure: no I/O, no sleeping; the clock is injected.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from sidecar.resilience.window import SlidingWindow

# Spend decisions compare a sum of float products with an integer count; this keeps e.g.
# 0.1 * 30 (3.0000000000000004 or 2.9999999999999996) on the intended side of the line.
_EPSILON: Final = 1e-9

_REQUESTS: Final = 0
_RETRIES: Final = 1

# The throttle's reserve as a share of the floor (min_per_second x window).
RESERVE_SHARE: Final = 0.25


class RetryBudget:
    __slots__ = (
        "_clock",
        "_counts",
        "_refill",
        "_refilled_at",
        "_tokens",
        "floor",
        "min_per_second",
        "ratio",
        "reserve",
        "window",
    )

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
        self.floor = min_per_second * window
        self._clock = clock
        self._counts = SlidingWindow(window, 2, clock)
        # 0 means no throttle (min_per_second 0: "only the ratio").
        self.reserve = max(1.0, self.floor * RESERVE_SHARE) if min_per_second > 0 else 0.0
        self._refill = min_per_second
        self._tokens = self.reserve
        self._refilled_at = clock()

    # -- what the attempt loop reports -----------------------------------------------------

    def record_request(self) -> None:
        """Count one request the route received (its first attempt, never a retry)."""
        self._counts.add(_REQUESTS)

    def record_attempt(self, failed: bool) -> None:
        """One attempt that reached an upstream (not a connect failure) had this outcome.

        Outcomes that do not count (the app's own short deadline, a slow request body) are
        not reported: they say nothing about the upstream.
        """
        if not self.reserve or (not failed and self._tokens >= self.reserve):
            return  # no throttle, or the hot path: a success with the reserve full
        tokens = self._refilled()
        self._tokens = max(0.0, tokens - 1.0) if failed else min(self.reserve, tokens + 1.0)

    def try_spend(self) -> bool:
        """Count a retry and return True if ceiling and throttle allow it; else False."""
        if self.reserve and self._refilled() < 1.0 - _EPSILON:
            return False
        bucket = self._counts.advance()
        totals = self._counts.totals
        allowance = self.ratio * totals[_REQUESTS] + self.floor
        if totals[_RETRIES] + 1 > allowance + _EPSILON:
            return False
        bucket[_RETRIES] += 1
        totals[_RETRIES] += 1
        return True

    # -- reading ---------------------------------------------------------------------------

    @property
    def requests_in_window(self) -> int:
        return self._counts.read()[_REQUESTS]

    @property
    def retries_in_window(self) -> int:
        return self._counts.read()[_RETRIES]

    @property
    def tokens(self) -> float:
        """The throttle's tokens now (0 when there is no throttle)."""
        return self._refilled() if self.reserve else 0.0

    def snapshot(self) -> dict[str, float]:
        requests, retries = self._counts.read()
        return {
            "requests": requests,
            "retries": retries,
            "allowance": self.ratio * requests + self.floor,
            "throttle_tokens": round(self.tokens, 3),
            "throttle_reserve": self.reserve,
        }

    def _refilled(self) -> float:
        now = self._clock()
        elapsed = now - self._refilled_at
        self._refilled_at = now
        if elapsed > 0 and self._tokens < self.reserve:
            self._tokens = min(self.reserve, self._tokens + elapsed * self._refill)
        return self._tokens
