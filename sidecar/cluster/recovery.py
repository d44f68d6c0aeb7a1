"""Breaker recovery, the I/O side: while a service's breaker is open, probe its endpoints
the way the evidence calls for, and half-open it when its open period ends.

The breaker (`sidecar.resilience.breaker`) is pure: it knows when its open period ends and
what opened it, but it never sleeps. This task, one per service, does the waiting:

- While the breaker is open, it sleeps until the next probe or the end of the open period,
  whichever comes first, and wakes early when the breaker changes state.
- The end of the open period half-opens the breaker, traffic or not.
- Every `probe.interval` (jitter only shortens it, by up to a fifth) it probes, if the
  evidence calls for it:
    * with a `health_check` configured: that check (its path and timeout, at
      `probe.interval` rather than its own interval), on every endpoint;
    * without one, when the failures that opened the breaker include connect failures or
      resets: a TCP connect to every endpoint, with a timeout of the smaller of
      `connect_timeout` and `probe.interval`;
    * otherwise (5xx or timeouts alone, no health check): nothing. A TCP connect would
      pass on an upstream that answers 503, so it would prove nothing.
  One passing probe half-opens the breaker at once; a failing one changes nothing. A
  probe never sends a request on a route's path.
- Each probe's result counts in `sidecar_circuit_breaker_probes_total{service,result}`.

The probes are injected callables (`sidecar.cluster.probes` gives the real ones), so the
timing can be tested against fakes; the task is owned by its own `TaskOwner`, closed with
the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Final

from sidecar.cluster import probes
from sidecar.config.model import Address, ServiceConfig
from sidecar.metrics import Metrics
from sidecar.tasks import TaskOwner
from sidecar.vocab import BreakerState, ProbeResult

if TYPE_CHECKING:
    from sidecar.endpoint import Endpoint
    from sidecar.resilience.breaker import ServiceBreaker

log = logging.getLogger("sidecar.breaker")

Probe = Callable[[Address], Awaitable[bool]]

# Each probe interval is shortened by a random share of up to this much, so that sidecars
# that opened together do not probe a recovering service in lockstep.
JITTER: Final = 0.2


class Recovery:
    """The recovery task of one service's breaker."""

    def __init__(
        self,
        breaker: ServiceBreaker,
        endpoints: Callable[[], Sequence[Endpoint]],
        metrics: Metrics,
        *,
        interval: float | None,
        health_probe: Probe | None = None,
        tcp_probe: Probe | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.breaker = breaker
        self._endpoints = endpoints
        self.interval = interval  # None: no probes, only the end of the open period
        self._health_probe = health_probe
        self._tcp_probe = tcp_probe
        self._rng = rng
        service = breaker.service
        self._m_probes = {r: metrics.breaker_probes.labels(service, r) for r in ProbeResult}
        self._owner = TaskOwner(f"recovery:{service}")
        self._changed = asyncio.Event()
        breaker.watch(self._on_change)

    @classmethod
    def for_service(
        cls,
        config: ServiceConfig,
        breaker: ServiceBreaker,
        endpoints: Callable[[], Sequence[Endpoint]],
        metrics: Metrics,
    ) -> Recovery:
        """The recovery task `config` asks for, with the real probes."""
        probe = config.circuit_breaker.probe
        interval = probe.interval if probe is not None else None
        health_probe: Probe | None = None
        tcp_probe: Probe | None = None
        if interval is not None:
            hc = config.health_check
            if hc is not None:

                async def health_probe(address: Address) -> bool:
                    return (await probes.health_check(hc, address)).ok

            tcp_timeout = min(config.connect_timeout, interval)

            async def tcp_probe(address: Address) -> bool:
                return await probes.tcp_probe(address, tcp_timeout)

        return cls(
            breaker,
            endpoints,
            metrics,
            interval=interval,
            health_probe=health_probe,
            tcp_probe=tcp_probe,
        )

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def tasks(self) -> int:
        """Background tasks running (0 or 1): /admin/state shows it, tests read it."""
        return len(self._owner)

    def start(self) -> None:
        self._owner.spawn(self.run(), name="recovery")

    async def close(self) -> None:
        await self._owner.close()

    # -- the task ----------------------------------------------------------------------

    def probe_for_evidence(self) -> Probe | None:
        """The probe the breaker's current open period calls for, if any."""
        if self.interval is None:
            return None
        if self._health_probe is not None:
            return self._health_probe
        if self.breaker.transport_evidence:
            return self._tcp_probe
        return None

    async def run(self) -> None:
        while True:
            if self.breaker.state is not BreakerState.OPEN:
                self._changed.clear()
                await self._changed.wait()
                continue
            await self._open_period()

    async def _open_period(self) -> None:
        """Wait out one open period (one epoch), probing when the evidence says so."""
        breaker = self.breaker
        epoch = breaker.epoch
        loop = asyncio.get_running_loop()
        next_probe = loop.time() + self._next_interval()
        while breaker.epoch == epoch:
            remaining = breaker.open_remaining()
            if remaining <= 0:
                breaker.end_open_period()
                return
            probe = self.probe_for_evidence()
            if probe is None:
                await self._sleep(remaining)
                continue
            wait = next_probe - loop.time()
            if wait > 0:
                await self._sleep(min(wait, remaining))
                continue
            next_probe = loop.time() + self._next_interval()
            try:
                # The period's end must not wait for a slow probe.
                async with asyncio.timeout(remaining):
                    passed = await self._probe_round(probe)
            except TimeoutError:
                continue
            if passed and breaker.epoch == epoch and breaker.probe_passed():
                log.info(
                    "circuit breaker for %s: a recovery probe passed; admitting trials",
                    breaker.service,
                )
                return

    async def _probe_round(self, probe: Probe) -> bool:
        endpoints = list(self._endpoints())
        if not endpoints:
            return False
        results = await asyncio.gather(*(probe(e.address) for e in endpoints))
        for ok in results:
            self._m_probes[ProbeResult.SUCCESS if ok else ProbeResult.FAILURE].inc()
        return any(results)

    async def _sleep(self, seconds: float) -> None:
        """Sleep up to `seconds`, waking early if the breaker changes state."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._changed.wait()

    def _next_interval(self) -> float:
        if self.interval is None:
            return 0.0  # no probes: only the period's end matters
        return self.interval * (1.0 - JITTER * self._rng())

    def _on_change(self, state: BreakerState) -> None:
        self._changed.set()
