"""A service's live endpoint set: discovery fills it, the balancer picks from it.

The proxy sees only this seam: `pick()` an endpoint (avoiding ones already tried),
`report()` how an attempt went, and `snapshot()` for /admin/state. Behind it:

    discovery source  ->  Cluster.discovered() / discovery_failed()    (sidecar.discovery)
    active checks     ->  Endpoint.health                   (sidecar.cluster.health)
    report()          ->  Endpoint.ejection                 (sidecar.cluster.outlier)
    pick()            ->  the configured balancer over available ones   (sidecar.cluster.balancer)

An endpoint that stays across discovery updates keeps its object, and with it its
in-flight count, health and ejection; a new address starts healthy. Every state change
republishes `sidecar_endpoints{service,state}`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from sidecar.cluster.balancer import Balancer, make_balancer
from sidecar.cluster.health import HealthChecker
from sidecar.cluster.outlier import OutlierDetector
from sidecar.config.model import Address, ServiceConfig, StaticDiscovery
from sidecar.discovery import DiscoverySource, make_source
from sidecar.endpoint import Endpoint
from sidecar.metrics import Metrics
from sidecar.resilience.backoff import Backoff
from sidecar.tasks import TaskOwner

log = logging.getLogger("sidecar.discovery")

# How long start() waits for a dynamic source's first answer (success or failure), so a
# service usually has endpoints before traffic arrives, without ever hanging start-up.
FIRST_RESULT_TIMEOUT = 2.0
# Back-off for restarting a crashed discovery source.
RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0


class Cluster:
    def __init__(
        self,
        config: ServiceConfig,
        metrics: Metrics,
        *,
        source: DiscoverySource | None = None,
        balancer: Balancer | None = None,
        first_result_timeout: float = FIRST_RESULT_TIMEOUT,
        on_removed: Callable[[Endpoint], None] | None = None,
    ) -> None:
        self.config = config
        # Told about every endpoint discovery removes (the upstream client closes its
        # idle connections to it).
        self._on_removed = on_removed
        self.name = config.name
        self._metrics = metrics
        self._endpoints: list[Endpoint] = []
        self._by_address: dict[Address, Endpoint] = {}
        self._owner = TaskOwner(f"cluster:{config.name}")
        self._source = source if source is not None else make_source(config.discovery)
        self._balancer = balancer if balancer is not None else make_balancer(config.load_balancer)
        self._first_result = asyncio.Event()
        self._first_result_timeout = first_result_timeout
        self._started = False
        self._warned_no_first_result = False
        self.last_update: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.consecutive_failures = 0
        self._health: HealthChecker | None = None
        if config.health_check is not None:
            self._health = HealthChecker(
                config.name, config.health_check, lambda: self._endpoints, self.publish
            )
        self._outlier: OutlierDetector | None = None
        if config.outlier_detection is not None:
            self._outlier = OutlierDetector(
                config.name, config.outlier_detection, self._owner, self.publish
            )
        # Both result series exist from the start, so rate() and alerts see a zero.
        metrics.discovery_updates.labels(config.name, "success")
        metrics.discovery_updates.labels(config.name, "failure")
        if isinstance(config.discovery, StaticDiscovery):
            # Applied now, so a static service can pick before (or without) start().
            self.discovered(config.discovery.endpoints)
        else:
            self.publish()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start discovery and health checking.

        A static service returns at once. A dynamic one waits up to `first_result_timeout`
        for the source's first answer (endpoints or an error) and then returns either way;
        until endpoints arrive, `pick()` returns None.

        Safe to run concurrently with other clusters' start() (each owns its tasks and
        shares nothing mutable with them) and with itself: the tasks are spawned once,
        before the first await, and every caller waits for the same first answer. A caller
        cancelled while it waits cancels only its wait; discovery and health checks go on
        until close().
        """
        dynamic = not isinstance(self.config.discovery, StaticDiscovery)
        if not self._started:
            self._started = True
            if dynamic:
                self._owner.spawn(self._discover(), name=f"discovery:{self._source.kind}")
            if self._health is not None:
                self._owner.spawn(self._check_health(self._health), name="health")
        if not dynamic or await self._wait_first_result() or self._warned_no_first_result:
            return
        self._warned_no_first_result = True  # once, however many callers waited
        log.warning(
            "service %s: no discovery result within %.3gs; starting without endpoints",
            self.name,
            self._first_result_timeout,
        )

    async def _wait_first_result(self) -> bool:
        """Wait up to `first_result_timeout` for discovery's first answer; False if none."""
        try:
            async with asyncio.timeout(self._first_result_timeout):
                await self._first_result.wait()
        except TimeoutError:
            return False
        return True

    async def _discover(self) -> None:
        """Run the source; if it crashes (a bug, a library surprise), count it and restart.

        Sources handle their expected errors themselves; this keeps a service's discovery
        alive through the unexpected ones instead of leaving it frozen without a word.
        """
        backoff = Backoff(RESTART_DELAY, MAX_RESTART_DELAY)
        while True:
            try:
                await self._source.run(self)
                return
            except Exception as exc:
                log.exception("service %s: %s discovery crashed", self.name, self._source.kind)
                self.discovery_failed(f"{self._source.kind} discovery crashed: {exc!r}")
            await asyncio.sleep(backoff.next())

    async def _check_health(self, checker: HealthChecker) -> None:
        """Run the health checker, restarting it if it crashes (endpoint states stay)."""
        # The first round checks what discovery found, not an empty set (bounded wait).
        await self._wait_first_result()
        while True:
            try:
                await checker.run()
                return
            except Exception:
                log.exception("service %s: health checker crashed; restarting", self.name)
            await asyncio.sleep(max(RESTART_DELAY, checker.config.interval))

    async def close(self) -> None:
        """Cancel and await every task (discovery, health checks, ejection timers)."""
        await self._owner.close()

    # -- discovery sink ------------------------------------------------------------------

    @property
    def endpoints(self) -> list[Endpoint]:
        return self._endpoints

    def set_addresses(self, addresses: Collection[Address]) -> None:
        """Replace the endpoint set, keeping the state of endpoints that stay."""
        old = self._by_address
        by_address: dict[Address, Endpoint] = {}
        for address in addresses:
            if address not in by_address:
                by_address[address] = old.get(address) or Endpoint(address)
        for address, endpoint in old.items():
            if address not in by_address:
                if self._outlier is not None:
                    self._outlier.forget(endpoint)
                if self._on_removed is not None:
                    self._on_removed(endpoint)
        # One assignment each: pick() never sees a half-built list.
        self._by_address = by_address
        self._endpoints = list(by_address.values())
        self.publish()

    def discovered(self, addresses: Sequence[Address]) -> None:
        """A source's complete new endpoint set (DiscoverySink)."""
        before = set(self._by_address)
        self.set_addresses(addresses)
        after = set(self._by_address)
        if before != after:
            log.info(
                "service %s: endpoints %s (+%d -%d)",
                self.name,
                [str(a) for a in addresses],
                len(after - before),
                len(before - after),
            )
        self.last_update = time.time()
        self.last_error = None
        self.consecutive_failures = 0
        self._metrics.discovery_updates.labels(self.name, "success").inc()
        self._first_result.set()

    def discovery_failed(self, reason: str) -> None:
        """A failed refresh; the last good endpoint set stays (DiscoverySink)."""
        self.consecutive_failures += 1
        if self.consecutive_failures == 1 or reason != self.last_error:
            log.warning("service %s: discovery failed (keeping endpoints): %s", self.name, reason)
        self.last_error = reason
        self.last_error_at = time.time()
        self._metrics.discovery_updates.labels(self.name, "failure").inc()
        self._first_result.set()

    # -- the proxy's hot path ------------------------------------------------------------

    def pick(self, exclude: Collection[Endpoint] = ()) -> Endpoint | None:
        """Choose an available endpoint, preferring one not in `exclude`."""
        return self._balancer.pick(self._endpoints, exclude)

    def report(self, endpoint: Endpoint, ok: bool) -> None:
        """Record an attempt's outcome (feeds passive outlier detection)."""
        if self._outlier is None:
            return
        if ok:
            # A success only ends the endpoint's run of failures (harmless on an endpoint
            # discovery removed): no lookup on the path nearly every attempt takes.
            endpoint.ejection.failures = 0
            return
        # An endpoint discovery already removed is not ours to eject any more.
        if self._by_address.get(endpoint.address) is not endpoint:
            return
        self._outlier.record(endpoint, ok, self._endpoints)

    # -- observability -------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        counts = {"healthy": 0, "unhealthy": 0, "ejected": 0}
        for e in self._endpoints:
            counts[e.state] += 1
        return counts

    def publish(self) -> None:
        """Set sidecar_endpoints{service,state} from the current endpoint states."""
        self._metrics.set_endpoint_counts(self.name, self.counts())

    def snapshot(self) -> dict[str, Any]:
        discovery: dict[str, Any] = {
            "source": self._source.kind,
            "last_update": self.last_update,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "consecutive_failures": self.consecutive_failures,
        }
        discovery.update(self._source.describe())
        return {
            "endpoints": [
                {
                    "address": e.key,
                    "state": e.state,
                    "in_flight": e.in_flight,
                    "ejections": e.ejection.ejections,
                }
                for e in self._endpoints
            ],
            "endpoint_counts": self.counts(),
            "discovery": discovery,
            "load_balancer": self.config.load_balancer,
            "health_check": self._health is not None,
            "outlier_detection": self._outlier is not None,
        }
