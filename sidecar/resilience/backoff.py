"""How long to wait: the back-off between attempts and the `Retry-After` header.

`backoff_delay` is one pure function, exponential with full jitter (the "Full Jitter" of the
AWS architecture blog): retry n waits uniform(0, min(cap, base * 2**(n-1))). Spreading the
whole interval de-synchronises clients that failed together, which matters more than a
guaranteed minimum wait. The random source is a parameter so tests can seed it; the caller
does the sleeping, within the route deadline.

`parse_retry_after` reads an upstream's `Retry-After` (RFC 9110 §10.2.3); `format_retry_after`
writes the one the sidecar sends with 503 `circuit_open`.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Final

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


def backoff_delay(
    retry_number: int,
    base: float,
    cap: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry `retry_number` (1 for the first retry).

    Uniform in [0, min(cap, base * 2**(retry_number - 1))), given `rand` in [0, 1).
    """
    if retry_number < 1:
        raise ValueError(f"retry_number starts at 1, got {retry_number}")
    if base <= 0 or cap <= 0:
        return 0.0
    exponent = min(retry_number - 1, _MAX_EXPONENT)
    ceiling = min(cap, base * 2.0**exponent)
    return rand() * ceiling


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


def format_retry_after(seconds: float) -> str:
    """The `Retry-After` value for a wait of `seconds`: whole seconds, rounded up.

    Rounding up keeps clients from coming back before the breaker would admit them; a
    sub-second wait becomes "1".
    """
    if not seconds > 0:  # also catches NaN
        return "0"
    return str(math.ceil(min(seconds, MAX_RETRY_AFTER)))
