"""Config compiled into the live objects a request uses, one generation per config.

A `Runtime` holds the route table and, per service, its cluster (endpoints), breaker and
in-flight count; per route, its retry policy, budget and fault injector. Metric children
are resolved once here so the hot path never formats label sets.

On reload a new `Runtime` is built; every service whose config is unchanged is carried
over as the same object (breaker state, endpoint health, in-flight requests and all).
Requests already in flight keep the objects they started with.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from prometheus_client.metrics import Counter

from sidecar.cluster import Cluster
from sidecar.cluster.recovery import Recovery
from sidecar.config.model import RouteConfig, ServiceConfig, SidecarConfig
from sidecar.grpc import code_name
from sidecar.metrics import Metrics
from sidecar.resilience.breaker import ServiceBreaker
from sidecar.resilience.budget import RetryBudget
from sidecar.resilience.fault import FaultInjector
from sidecar.resilience.retry import RetryPolicy
from sidecar.routing import RouteTable
from sidecar.upstream.base import UpstreamClient
from sidecar.vocab import TimeoutKind


class ServiceRuntime:
    def __init__(self, config: ServiceConfig, metrics: Metrics, client: UpstreamClient) -> None:
        self.config = config
        self.name = config.name
        self.max_requests = config.max_requests
        self.connect_timeout = config.connect_timeout
        self.idle_timeout = config.idle_timeout
        self.client = client  # the wire client for this service's protocol
        self.cluster = Cluster(config, metrics, on_removed=client.forget)
        self.breaker = ServiceBreaker(config.name, config.circuit_breaker, metrics)
        cluster = self.cluster
        self.recovery = Recovery.for_service(
            config, self.breaker, lambda: cluster.endpoints, metrics
        )
        self.in_flight = 0
        self._metrics = metrics
        self._publish_in_flight()
        self.m_overloaded = metrics.overloaded.labels(config.name)
        self._attempts: dict[tuple[str, str], Counter] = {}

    def _publish_in_flight(self) -> None:
        # Read when Prometheus scrapes, so the request path only touches a plain int.
        self._metrics.in_flight.labels(self.name).set_function(lambda: self.in_flight)

    def publish(self) -> None:
        """Point this service's gauges at it again (a replacement built by a reload that
        then failed had taken them over)."""
        self._publish_in_flight()
        self.breaker.publish()
        self.cluster.publish()

    def count_attempt(self, endpoint: str, result: str) -> None:
        key = (endpoint, result)
        child = self._attempts.get(key)
        if child is None:
            child = self._metrics.upstream_attempts.labels(self.name, endpoint, result)
            self._attempts[key] = child
        child.inc()

    async def start(self) -> None:
        await self.cluster.start()
        self.recovery.start()

    async def close(self) -> None:
        await self.recovery.close()
        await self.cluster.close()
        self.breaker.close()

    def snapshot(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "breaker": self.breaker.snapshot(),
            "in_flight": self.in_flight,
            "max_requests": self.max_requests,
        }
        state.update(self.cluster.snapshot())
        return state


class RouteRuntime:
    def __init__(self, config: RouteConfig, service: ServiceRuntime, metrics: Metrics) -> None:
        self.config = config
        self.name = config.name
        self.service = service
        self.service_name = service.name
        self.policy = RetryPolicy(config.retries)
        budget = config.retries.budget
        self.budget = RetryBudget(budget.ratio, budget.min_per_second)
        self.fault = FaultInjector(config.fault) if config.fault is not None else None
        # Once the head is in, silence between body chunks longer than this breaks the relay.
        self.body_idle_timeout = config.timeout
        self._metrics = metrics
        labels = (config.name, service.name)
        self.m_duration = metrics.request_duration.labels(*labels)
        self.m_retries = metrics.retries.labels(*labels)
        self.m_budget_exhausted = metrics.retry_budget_exhausted.labels(*labels)
        self.m_timeouts = {kind: metrics.timeouts.labels(*labels, kind) for kind in TimeoutKind}
        self._requests: dict[int, Counter] = {}
        self._grpc: dict[int, Counter] = {}

    def count_request(self, status: int) -> None:
        child = self._requests.get(status)
        if child is None:
            child = self._metrics.requests.labels(self.name, self.service_name, str(status))
            self._requests[status] = child
        child.inc()

    def count_grpc(self, code: int) -> None:
        child = self._grpc.get(code)
        if child is None:
            name = code_name(code)
            child = self._metrics.grpc_responses.labels(self.name, self.service_name, name)
            self._grpc[code] = child
        child.inc()

    def count_retry(self) -> None:
        self.m_retries.inc()

    def count_budget_exhausted(self) -> None:
        self.m_budget_exhausted.inc()

    def count_timeout(self, kind: TimeoutKind) -> None:
        self.m_timeouts[kind].inc()


class Runtime:
    def __init__(
        self,
        config: SidecarConfig,
        metrics: Metrics,
        clients: Mapping[str, UpstreamClient],
        previous: Runtime | None = None,
    ) -> None:
        self.config = config
        kept: dict[str, ServiceRuntime] = {}
        if previous is not None:
            for name, old in previous.services.items():
                new_cfg = config.services.get(name)
                if new_cfg is not None and new_cfg == old.config:
                    kept[name] = old
        self.services: dict[str, ServiceRuntime] = {}
        self.new_services: list[ServiceRuntime] = []
        for name, svc_cfg in config.services.items():
            svc = kept.get(name)
            if svc is None:
                svc = ServiceRuntime(svc_cfg, metrics, clients[svc_cfg.protocol])
                self.new_services.append(svc)
            self.services[name] = svc
        self.dropped_services: list[ServiceRuntime] = []
        if previous is not None:
            self.dropped_services = [
                svc for name, svc in previous.services.items() if self.services.get(name) is not svc
            ]
        self.routes: dict[str, RouteRuntime] = {}
        for route_cfg in config.routes:
            self.routes[route_cfg.name] = RouteRuntime(
                route_cfg, self.services[route_cfg.service], metrics
            )
        self.table = RouteTable(config.routes)
        self.reject_escaped_slashes = config.listen_path_escaped_slashes == "reject"
        self._by_config: Mapping[int, RouteRuntime] = {
            id(r.config): r for r in self.routes.values()
        }

    def route_for(
        self, path: str, method: str, host: str | None, headers: Mapping[str, str]
    ) -> RouteRuntime | None:
        config = self.table.match(path, method, host, headers)
        if config is None:
            return None
        return self._by_config[id(config)]

    async def start_new(self) -> None:
        """Start the services this generation created (kept ones are running already).

        All at once: each may wait up to its discovery's first-result timeout, and a
        config with many dynamic services must not pay that once per service. If any
        fails, every new service is closed again and the first error is raised, so a
        failed reload leaves nothing of the new generation running.
        """
        results = await asyncio.gather(
            *(svc.start() for svc in self.new_services), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.close_new()
            raise errors[0]

    async def close_new(self) -> None:
        """Close the services this generation created (a reload that did not happen)."""
        for svc in self.new_services:
            await svc.close()

    async def close_all(self) -> None:
        for svc in self.services.values():
            await svc.close()

    def snapshot(self) -> dict[str, Any]:
        return {
            "services": {name: svc.snapshot() for name, svc in self.services.items()},
            "routes": [{"name": r.name, "service": r.service_name} for r in self.routes.values()],
        }
