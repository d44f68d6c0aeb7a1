"""Flood limits for one app connection, and the counter that applies them.

`FloodLimits` is what `H2Server(limits=...)` takes; `_Counter` keeps one kind of frame's
recent arrivals. `H2ServerProtocol._judge` applies both to each frame header, before
`h2` parses the frame; `PING_ANSWER` and `SETTINGS_ANSWER` are what each answer we owe
counts against `FloodLimits.unread_answers`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final

PING_ANSWER: Final = 9 + 8
SETTINGS_ANSWER: Final = 9


@dataclass(frozen=True, slots=True)
class FloodLimits:
    """What one connection may send within `window` seconds before it is closed."""

    window: float = 10.0
    resets: int = 1000
    pings: int = 1000
    settings: int = 1000
    unread_answers: int = 64 * 1024  # PING/SETTINGS answers queued while the app reads none


class _Counter:
    """Events within a sliding window of `window` seconds, up to `limit` + 1 kept."""

    __slots__ = ("limit", "times", "window")

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self.times: deque[float] = deque()

    def hit(self, now: float) -> bool:
        """Count one; True when more than `limit` fell within the window."""
        times = self.times
        times.append(now)
        horizon = now - self.window
        while times and times[0] <= horizon:
            times.popleft()
        return len(times) > self.limit
