"""A service's live endpoint set: discovery fills it, the balancer picks from it.

The proxy sees only this seam: `pick()` an endpoint (avoiding ones already tried),
`report()` how an attempt went, and `snapshot()` for /admin/state. Discovery sources,
active health checks and outlier detection plug in behind it.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sidecar.config.model import Address, ServiceConfig, StaticDiscovery
from sidecar.metrics import Metrics


class Endpoint:
    __slots__ = ("address", "healthy", "in_flight", "key")

    def __init__(self, address: Address) -> None:
        self.address = address
        self.key = str(address)  # the `endpoint` metric label and admin address
        self.in_flight = 0
        self.healthy = True

    @property
    def state(self) -> str:
        return "healthy" if self.healthy else "unhealthy"

    @property
    def available(self) -> bool:
        return self.healthy


class Cluster:
    def __init__(self, config: ServiceConfig, metrics: Metrics) -> None:
        self.config = config
        self.name = config.name
        self._metrics = metrics
        self._endpoints: list[Endpoint] = []
        self._rr = 0
        if isinstance(config.discovery, StaticDiscovery):
            self.set_addresses(config.discovery.endpoints)

    async def start(self) -> None:
        """Start discovery and health checking (none needed for static endpoints)."""

    async def close(self) -> None:
        """Stop every background task this cluster owns."""

    @property
    def endpoints(self) -> list[Endpoint]:
        return self._endpoints

    def set_addresses(self, addresses: Collection[Address]) -> None:
        """Replace the endpoint set, keeping the state of endpoints that stay."""
        old = {e.address: e for e in self._endpoints}
        self._endpoints = [old.get(a) or Endpoint(a) for a in dict.fromkeys(addresses)]
        self._publish()

    def pick(self, exclude: Collection[Endpoint] = ()) -> Endpoint | None:
        """Choose an available endpoint, preferring one not in `exclude`."""
        candidates = [e for e in self._endpoints if e.available]
        if not candidates:
            return None
        if exclude:
            fresh = [e for e in candidates if e not in exclude]
            if fresh:
                candidates = fresh
        self._rr += 1
        return candidates[self._rr % len(candidates)]

    def report(self, endpoint: Endpoint, ok: bool) -> None:
        """Record an attempt's outcome (feeds passive outlier detection)."""

    def _publish(self) -> None:
        counts: dict[str, int] = {}
        for e in self._endpoints:
            counts[e.state] = counts.get(e.state, 0) + 1
        self._metrics.set_endpoint_counts(self.name, counts)

    def snapshot(self) -> dict[str, Any]:
        return {
            "endpoints": [
                {"address": e.key, "state": e.state, "in_flight": e.in_flight}
                for e in self._endpoints
            ],
        }
