"""Durations: `250ms`, `1.5s`, `2m`, `1h`, `1m30s` or a plain number of seconds, and back.

Parsing only reads the text; the bounds (> 0, at most `MAX_SECONDS`) are checked by the
validator so its messages can quote what was written.
"""

from __future__ import annotations

import math
import re

UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# A day: long enough for any timeout, breaker or refresh, and far below the limits of
# timedelta (pybreaker) and of the event loop's timer arithmetic.
MAX_SECONDS = 86400.0

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PART = re.compile(rf"({_NUMBER})(ms|s|m|h)")
# A sign, then either a bare number (seconds) or one or more number+unit parts (`1m30s`).
_DURATION = re.compile(rf"([+-]?)(?:({_NUMBER})|((?:{_NUMBER}(?:ms|s|m|h))+))")


def parse_duration(value: object) -> float | None:
    """Seconds for a duration string or number, None when it is not one (bools are not)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if match is None:
            return None
        sign, bare, parts = match.groups()
        if bare is not None:
            seconds = float(bare)
        else:
            seconds = sum(float(n) * UNITS[unit] for n, unit in _PART.findall(parts))
        if sign == "-":
            seconds = -seconds
    else:
        return None
    return seconds if math.isfinite(seconds) else None


def format_duration(seconds: float) -> str:
    """The shortest natural spelling: 0.25 -> '250ms', 2.0 -> '2s', 90.0 -> '90s', 3600 -> '1h'."""
    if seconds < 1:
        return f"{round(seconds * 1000, 3):g}ms"
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{round(seconds, 6):g}s"
