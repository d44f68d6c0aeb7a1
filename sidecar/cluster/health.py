"""Active health checks: GET `path` (or, with `grpc: true`, gRPC's Health/Check) on every
endpoint of a service, every `interval`.

A 2xx answer (gRPC: OK and SERVING) within `timeout` passes; anything else (another
status, a connect error, a reset, a timeout) fails. A healthy endpoint turns unhealthy
after `unhealthy_threshold` failures in a row, and back after `healthy_threshold` passes
in a row. New endpoints start healthy, so a fresh discovery result takes traffic at once.

Each check is one `health_check` (sidecar.cluster.probes): a new connection of its own,
never the proxy's, with keep-alive off, so a pass also proves the endpoint still accepts
connections. Each round checks every endpoint concurrently, then sleeps `interval`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from sidecar.cluster.probes import health_check
from sidecar.config.model import HealthCheckConfig

if TYPE_CHECKING:
    from sidecar.endpoint import Endpoint

log = logging.getLogger("sidecar.health")


class HealthChecker:
    def __init__(
        self,
        service: str,
        config: HealthCheckConfig,
        endpoints: Callable[[], Sequence[Endpoint]],
        changed: Callable[[], None],
    ) -> None:
        self.service = service
        self.config = config
        self._endpoints = endpoints
        self._changed = changed

    async def run(self) -> None:
        while True:
            endpoints = list(self._endpoints())
            results = await asyncio.gather(*(self._probe(e) for e in endpoints))
            changed = False
            for endpoint, ok in zip(endpoints, results, strict=True):
                changed |= self.record(endpoint, ok)
            if changed:
                self._changed()
            await asyncio.sleep(self.config.interval)

    async def _probe(self, endpoint: Endpoint) -> bool:
        outcome = await health_check(self.config, endpoint.address)
        if not outcome.ok:
            log.debug("health check of %s: %s", endpoint.key, outcome.detail)
        return outcome.ok

    def record(self, endpoint: Endpoint, ok: bool) -> bool:
        """Count one check result; True when the endpoint's health flipped."""
        health = endpoint.health
        if ok:
            health.fails = 0
            health.passes += 1
            if not health.healthy and health.passes >= self.config.healthy_threshold:
                health.healthy = True
                log.info("service %s: endpoint %s is healthy again", self.service, endpoint.key)
                return True
        else:
            health.passes = 0
            health.fails += 1
            if health.healthy and health.fails >= self.config.unhealthy_threshold:
                health.healthy = False
                log.warning(
                    "service %s: endpoint %s failed %d health checks in a row: unhealthy",
                    self.service,
                    endpoint.key,
                    health.fails,
                )
                return True
        return False
