"""Per-route fault injection (`routes[].fault`, docs/configuration.md#fault): delays and aborts,
drawn by percentage.

Each request draws once for a delay and once, independently, for an abort, so a request can
get both (delayed, then aborted), as in Envoy's fault filter. Percentages run from 0 to 100
and may be fractional: 0 never fires, 100 always does, and neither draws a random number, so
a seeded sequence is not shifted by faults that cannot vary. The injector only decides; the
proxy sleeps or answers `fault_injected` itself (docs/resilience.md, "Fault injection").
"""

from __future__ import annotations

import random
from collections.abc import Callable

from sidecar.config.model import FaultConfig


class FaultInjector:
    def __init__(self, config: FaultConfig, rand: Callable[[], float] = random.random) -> None:
        self.config = config
        self._rand = rand

    def delay(self) -> float | None:
        """Seconds to delay this request, or None."""
        delay = self.config.delay
        if delay is None or not self._fires(delay.percent):
            return None
        return delay.duration

    def abort(self, grpc: bool = False) -> int | None:
        """The status to abort this request with, or None: for a gRPC call its
        `grpc_status` (answered Trailers-Only), for any other request the HTTP `status`."""
        abort = self.config.abort
        if abort is None or not self._fires(abort.percent):
            return None
        return abort.grpc_status if grpc else abort.status

    def _fires(self, percent: float) -> bool:
        if percent <= 0:
            return False
        if percent >= 100:
            return True
        # rand() is in [0, 1), so this fires for exactly `percent`% of the unit interval.
        return self._rand() * 100 < percent
