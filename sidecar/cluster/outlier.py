"""Passive outlier detection: eject an endpoint that keeps failing real traffic.

Semantics (close to Envoy's consecutive-5xx detector):

- Every attempt's outcome is reported (`Cluster.report`). A failure is a connect error,
  reset, timeout or 5xx; any success resets the endpoint's run of failures.
- After `consecutive_failures` failures in a row the endpoint is ejected: it gets no picks
  for `ejection_time` x (number of times it has been ejected), capped at 10 x
  `ejection_time` and at 300 s (or at `ejection_time` itself if that is longer). The
  ejection count resets once the endpoint has stayed in for a full cap since it came back.
- At most `max_ejection_percent` of the service's endpoints are ejected at once, rounded
  down, but at least one when the percentage is above 0 (so a two-endpoint service can
  still shed its bad one); 0 turns ejection off. A failing endpoint that could not be
  ejected is ejected on its next failure once there is room.
- Never the last available endpoint: an endpoint is ejected only if another one stays
  available (healthy and not ejected). A one-endpoint service is never ejected, and a
  service whose endpoints all fail keeps one in rotation. Ejecting the last one would
  turn a failing service into `no_healthy_upstream` for everyone, hiding the upstream's
  own answers and leaving the circuit breaker (which sees the whole service) nothing to
  judge; Envoy reaches the same end through its panic threshold.
- A timer task (owned by the cluster's TaskOwner) brings the endpoint back when its time
  is up, with a fresh run of failures; metrics update at both ends.
- Failures reported while an endpoint is ejected (attempts that were already in flight)
  are not counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from sidecar.config.model import OutlierDetectionConfig
from sidecar.tasks import TaskOwner

if TYPE_CHECKING:
    from sidecar.endpoint import Endpoint

log = logging.getLogger("sidecar.outlier")

MAX_MULTIPLIER = 10
MAX_EJECTION_SECONDS = 300.0


class OutlierDetector:
    def __init__(
        self,
        service: str,
        config: OutlierDetectionConfig,
        owner: TaskOwner,
        changed: Callable[[], None],
    ) -> None:
        self.service = service
        self.config = config
        self._owner = owner
        self._changed = changed
        self._timers: dict[Endpoint, asyncio.Task[None]] = {}
        self.cap = max(
            config.ejection_time, min(config.ejection_time * MAX_MULTIPLIER, MAX_EJECTION_SECONDS)
        )

    def ejection_time(self, ejections: int) -> float:
        """How long the `ejections`-th ejection (1-based) lasts."""
        return min(self.config.ejection_time * ejections, self.cap)

    def max_ejected(self, total: int) -> int:
        """How many of `total` endpoints may be ejected at once."""
        percent = self.config.max_ejection_percent
        if percent <= 0 or total == 0:
            return 0
        return max(1, int(total * percent / 100))

    def record(self, endpoint: Endpoint, ok: bool, endpoints: Sequence[Endpoint]) -> None:
        """One attempt's outcome for `endpoint`, a current member of `endpoints`."""
        state = endpoint.ejection
        if ok:
            state.failures = 0
            return
        if state.ejected:
            return
        state.failures += 1
        if state.failures < self.config.consecutive_failures:
            return
        # Only when an ejection is due: count the ejected (rare, so O(n) is fine here).
        ejected = sum(1 for e in endpoints if e.ejection.ejected)
        if ejected >= self.max_ejected(len(endpoints)):
            log.debug(
                "service %s: %s not ejected: %d of %d already out (max_ejection_percent %g)",
                self.service,
                endpoint.key,
                ejected,
                len(endpoints),
                self.config.max_ejection_percent,
            )
            return
        if not any(e.available for e in endpoints if e is not endpoint):
            log.debug(
                "service %s: %s not ejected: it is the last available endpoint",
                self.service,
                endpoint.key,
            )
            return
        self._eject(endpoint)

    def _eject(self, endpoint: Endpoint) -> None:
        state = endpoint.ejection
        now = time.monotonic()
        if state.returned_at is not None and now - state.returned_at >= self.cap:
            state.ejections = 0  # well-behaved for a long while: start over
        state.ejections += 1
        duration = self.ejection_time(state.ejections)
        state.ejected = True
        log.warning(
            "service %s: ejected %s for %.3gs after %d consecutive failures (ejection #%d)",
            self.service,
            endpoint.key,
            duration,
            state.failures,
            state.ejections,
        )
        self._timers[endpoint] = self._owner.spawn(
            self._return_after(endpoint, duration), name=f"eject-return:{endpoint.key}"
        )
        self._changed()

    async def _return_after(self, endpoint: Endpoint, duration: float) -> None:
        await asyncio.sleep(duration)
        self._timers.pop(endpoint, None)
        state = endpoint.ejection
        state.ejected = False
        state.failures = 0
        state.returned_at = time.monotonic()
        log.info("service %s: %s is back from ejection", self.service, endpoint.key)
        self._changed()

    def forget(self, endpoint: Endpoint) -> None:
        """`endpoint` left the service: stop its timer."""
        timer = self._timers.pop(endpoint, None)
        if timer is not None:
            timer.cancel()
