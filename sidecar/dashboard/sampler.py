"""The dashboard's sampler: once a second, the metrics registry read into per-service windows.

It reads what Prometheus would scrape (`sidecar_requests_total` by code, the duration
histogram's buckets, retries, budget refusals, breaker refusals and overloads), summed over
each service's routes, and keeps the last minute per service (window.py). `view()` joins
those numbers with the live runtime snapshot (breaker, endpoints, in-flight) into the JSON
of `GET /admin/dashboard.json`. The request path is untouched: it already counts into the
registry, and the sampler only reads it.

Services follow the runtime: a service added by a reload gets a window at the next tick,
a removed one loses its window.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Protocol

from prometheus_client.metrics import MetricWrapperBase

from sidecar.dashboard.window import HISTORY, WINDOW, ServiceWindow, Totals
from sidecar.metrics import DURATION_BUCKETS, Metrics

log = logging.getLogger("sidecar.dashboard")

INTERVAL: Final = 1.0

_BOUNDS: Final = tuple(float(b) for b in DURATION_BUCKETS)


def _by_service(metric: MetricWrapperBase, suffix: str) -> dict[str, float]:
    """A counter's value per `service` label, summed over its other labels."""
    totals: dict[str, float] = defaultdict(float)
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith(suffix):
                totals[sample.labels["service"]] += sample.value
    return totals


def read_totals(metrics: Metrics, services: Iterable[str]) -> dict[str, Totals]:
    """The cumulative counters of each named service, as the registry has them now."""
    requests: dict[str, float] = defaultdict(float)
    errors: dict[str, float] = defaultdict(float)
    for family in metrics.requests.collect():
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            service = sample.labels["service"]
            requests[service] += sample.value
            if sample.labels["code"].startswith("5"):
                errors[service] += sample.value
    index = {bound: i for i, bound in enumerate(_BOUNDS)}
    buckets: dict[str, list[float]] = {}
    for family in metrics.request_duration.collect():
        for sample in family.samples:
            if not sample.name.endswith("_bucket"):
                continue
            le = float(sample.labels["le"])
            i = index.get(le, len(_BOUNDS))  # +Inf last
            counts = buckets.setdefault(sample.labels["service"], [0.0] * (len(_BOUNDS) + 1))
            counts[i] += sample.value
    retries = _by_service(metrics.retries, "_total")
    exhausted = _by_service(metrics.retry_budget_exhausted, "_total")
    rejected = _by_service(metrics.breaker_rejected, "_total")
    overloaded = _by_service(metrics.overloaded, "_total")
    empty = (0.0,) * (len(_BOUNDS) + 1)
    return {
        name: Totals(
            requests=requests.get(name, 0.0),
            errors=errors.get(name, 0.0),
            retries=retries.get(name, 0.0),
            budget_exhausted=exhausted.get(name, 0.0),
            rejected=rejected.get(name, 0.0) + overloaded.get(name, 0.0),
            buckets=tuple(buckets[name]) if name in buckets else empty,
        )
        for name in services
    }


class ServicesLike(Protocol):
    """What the sampler reads of the runtime (a `sidecar.runtime.Runtime`): its services."""

    @property
    def services(self) -> Mapping[str, object]: ...


class Sampler:
    """Per-service windows over the registry, ticked by `run()` (or `tick()` in tests)."""

    def __init__(
        self,
        metrics: Metrics,
        runtime: Callable[[], ServicesLike],
        *,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._runtime = runtime
        self._clock = clock
        self.interval = interval
        self.windows: dict[str, ServiceWindow] = {}

    def tick(self) -> None:
        names = list(self._runtime().services)
        totals = read_totals(self._metrics, names)
        at = self._clock()
        for name in list(self.windows):
            if name not in totals:
                del self.windows[name]  # removed by a reload
        for name, reading in totals.items():
            self.windows.setdefault(name, ServiceWindow()).add(at, reading)

    async def run(self) -> None:
        """Tick every `interval` until cancelled (the admin app owns this task)."""
        failing = False
        while True:
            try:
                self.tick()
                failing = False
            except Exception:
                # A bad tick must not end the dashboard; say so once, not every second.
                if not failing:
                    log.exception("dashboard sampler tick failed")
                failing = True
            await asyncio.sleep(self.interval)

    def view(self, snapshot: dict[str, Any], *, draining: bool = False) -> dict[str, Any]:
        """The dashboard JSON: one entry per service of `snapshot` (Runtime.snapshot())."""
        routes: dict[str, list[str]] = defaultdict(list)
        for route in snapshot.get("routes", []):
            routes[route["service"]].append(route["name"])
        services = []
        for name, state in snapshot["services"].items():
            window = self.windows.get(name)
            numbers = (
                window.summary(_BOUNDS) if window is not None else ServiceWindow().summary(_BOUNDS)
            )
            counts = state.get("endpoint_counts", {})
            services.append(
                {
                    "name": name,
                    "routes": routes.get(name, []),
                    # Passed through whole: state, since, last_failure and whatever else
                    # the breaker reports (trip_reason, failure_rate, open_until, ...).
                    "breaker": state["breaker"],
                    "endpoints": {
                        "healthy": counts.get("healthy", 0),
                        "unhealthy": counts.get("unhealthy", 0),
                        "ejected": counts.get("ejected", 0),
                    },
                    "in_flight": state["in_flight"],
                    "max_requests": state["max_requests"],
                    **numbers,
                }
            )
        return {
            "generated_at": round(time.time(), 3),
            "interval_seconds": self.interval,
            "window_seconds": WINDOW,
            "history_points": HISTORY - 1,
            "draining": draining,
            "services": services,
        }
