"""How long to wait: the back-off between attempts and the `Retry-After` header.

`backoff_delay` is one pure function, exponential with full jitter (the "Full Jitter" of the
AWS architecture blog): retry n waits uniform(0, min(cap, base * 2**(n-1))). Spreading the
whole interval de-synchronises clients that failed together, which matters more than a
guaranteed minimum wait. The random source is a parameter so tests can seed it; the caller
does the sleeping, within the route deadline.

`Backoff` is the same exponential sequence for a background loop's failure streak (a
discovery source reconnecting, a registration retrying, a crashed task restarting): the
n-th failure in a row waits about min(cap, base * 2**(n-1)), and a success starts over. It
holds only a counter; the loop does the sleeping. Its default jitter is "equal"
(uniform in [ceiling/2, ceiling]): loops that failed together spread out, and none waits
much longer, nor much less, than planned.

`parse_retry_after` reads an upstream's `Retry-After` (RFC 9110 §10.2.3). The one the sidecar
sends with 503 `circuit_open` is the breaker's wait rounded up to whole seconds, at least 1
(`sidecar.proxy`).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Final, Literal

# 2.0 ** 1000 is still a finite float, and base * 2**1000 exceeds any sensible cap; clamping
# the exponent there keeps huge retry numbers from raising OverflowError.
_MAX_EXPONENT: Final = 1000

# Upper bound for a parsed Retry-After: a day. Larger values are almost certainly a bug or an
# attack, and no request deadline is anywhere near that long anyway.
MAX_RETRY_AFTER: Final = 86400.0

# delta-seconds is 1*DIGIT; a fraction is tolerated because some servers send one. More than
# 15 integer digits is clamped without being converted (Python refuses int() of very long
# digit strings, and the value is beyond MAX_RETRY_AFTER anyway).
_DELTA_SECONDS: Final = re.compile(r"(\d+)(?:\.\d+)?")
_MAX_DIGITS: Final = 15


Jitter = Literal["none", "full", "equal"]


def exponential_ceiling(n: int, base: float, cap: float) -> float:
    """min(cap, base * 2**(n - 1)) for the n-th try (n >= 1); 0 when base or cap is <= 0."""
    if n < 1:
        raise ValueError(f"retry_number starts at 1, got {n}")
    if base <= 0 or cap <= 0:
        return 0.0
    return min(cap, base * 2.0 ** min(n - 1, _MAX_EXPONENT))


def jittered(ceiling: float, jitter: Jitter, rand: Callable[[], float] = random.random) -> float:
    """`ceiling` spread by `jitter`, given `rand` in [0, 1).

    none: exactly `ceiling`; full: uniform in [0, ceiling); equal: uniform in
    [ceiling/2, ceiling). Jitter only ever shortens the wait.
    """
    if jitter == "none":
        return ceiling
    if jitter == "full":
        return rand() * ceiling
    return ceiling / 2 + rand() * ceiling / 2


def backoff_delay(
    retry_number: int,
    base: float,
    cap: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry `retry_number` (1 for the first retry).

    Uniform in [0, min(cap, base * 2**(retry_number - 1))), given `rand` in [0, 1).
    """
    return jittered(exponential_ceiling(retry_number, base, cap), "full", rand)


@dataclass(slots=True)
class Backoff:
    """The delays of one failure streak: exponential from `base`, capped at `cap`, jittered.

    `next()` counts a failure and returns how long to wait before trying again; `reset()`
    (after a success) starts the streak over. Pure: no clock, no sleeping, `rand` injected.
    """

    base: float
    cap: float
    jitter: Jitter = "equal"
    rand: Callable[[], float] = field(default=random.random, repr=False, compare=False)
    failures: int = 0

    def delay(self, n: int) -> float:
        """The wait after the n-th failure in a row (n >= 1), without counting it."""
        return jittered(exponential_ceiling(n, self.base, self.cap), self.jitter, self.rand)

    def next(self) -> float:
        """Count one more failure; the wait before the next try."""
        self.failures += 1
        return self.delay(self.failures)

    def reset(self) -> None:
        """A success: the next failure waits about `base` again."""
        self.failures = 0


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds an upstream's `Retry-After` asks us to wait, or None if absent or unusable.

    Accepts delta-seconds ("120") and HTTP-dates in any of the three RFC 9110 forms, compared
    with `now` (a UNIX timestamp, default the current time). A date in the past means "now",
    0.0. Garbage and negative numbers give None; values above MAX_RETRY_AFTER are clamped to it.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    match = _DELTA_SECONDS.fullmatch(text)
    if match is not None:
        if len(match.group(1)) > _MAX_DIGITS:
            return MAX_RETRY_AFTER
        return min(float(text), MAX_RETRY_AFTER)
    if text[0] in "+-" or text[0].isdigit():
        return None  # a signed or malformed number, not a date
    try:
        when = parsedate_to_datetime(text)
    except (ValueError, TypeError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        # asctime() dates carry no zone; HTTP-dates are always GMT.
        when = when.replace(tzinfo=UTC)
    current = time.time() if now is None else now
    delay = when.timestamp() - current
    return min(max(delay, 0.0), MAX_RETRY_AFTER)
