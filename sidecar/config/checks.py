"""Warnings: settings that are valid but probably not what the user meant.

These run on the built model, where every default is resolved, and point back into the
file through `Reader.spot`. A warning never stops the sidecar; `validate` prints each on
stderr starting with `warning:`. The docs' list of warnings mirrors this module.
"""

from __future__ import annotations

from collections.abc import Iterable

from sidecar.config.addresses import is_loopback
from sidecar.config.build import Built
from sidecar.config.durations import format_duration as fmt
from sidecar.config.model import MatchConfig, RetryConfig, RouteConfig, ServiceConfig
from sidecar.config.reader import Reader
from sidecar.config.show import quote
from sidecar.config.yamlsafe import YMap, join

# Below this many calls per second over the window, `min_calls` is never reached.
MIN_CALLS_PER_SECOND = 10


def check(built: Built, r: Reader) -> None:
    cfg = built.config
    if "admin" in r.where and not is_loopback(cfg.admin.host):
        r.warn(
            r.spot("admin"),
            f"the admin API (metrics, config, reload) on {cfg.admin} is reachable from other "
            "hosts; keep it on 127.0.0.1 or [::1]",
        )
    if "listen" in r.where and not is_loopback(cfg.listen.host):
        r.warn(
            r.spot("listen"),
            f"{cfg.listen} is reachable from other hosts, which can then call every configured "
            "service through the sidecar; keep it on 127.0.0.1 unless that is intended",
        )
    for name, service in cfg.services.items():
        _check_service(r, name, service)
        _check_slow_call(r, built, name, service)
    if not r.failed:  # with errors, routes and services may be missing from the model
        _check_usage(r, built)
    for k, route in enumerate(cfg.routes):
        eff = f"routes[{built.route_index[k]}]"
        _check_route(r, eff, route, cfg.services.get(route.service))
        for j in range(k):
            if _covers(cfg.routes[j].match, route.match):
                _route_warn(
                    r,
                    eff,
                    f"{eff}.match",
                    route.name,
                    f"this route can never match: routes[{built.route_index[j]}] "
                    f"({quote(cfg.routes[j].name)}) comes first and matches every request it would",
                )
                break


def _check_usage(r: Reader, built: Built) -> None:
    cfg = built.config
    if not cfg.routes:
        r.warn(r.spot("routes"), "no routes are configured: every request gets 404 no_route")
        return
    used = {route.service for route in cfg.routes}
    services = r.where.get("services")
    for name in cfg.services:
        if name not in used and isinstance(services, YMap) and name in services.entries:
            r.report(
                services.entries[name].key_pos,
                join("services", name),
                f"service {quote(name)} is not used by any route",
                warning=True,
            )


def _route_warn(
    r: Reader, eff: str, key_eff: str, name: str, message: str, *, per_route: bool = True
) -> None:
    """Warn at a route's setting; one inherited from defaults names the route when the
    warning depends on the route, and is otherwise said once, at the default."""
    node = r.spot(key_eff)
    inherited = node.path != eff and not node.path.startswith((eff + ".", eff + "["))
    if inherited and per_route:
        message += f" (in route {quote(name)})"
    r.warn(node, message)


def _check_service(r: Reader, name: str, service: ServiceConfig) -> None:
    eff = join("services", name)
    breaker = service.circuit_breaker
    if breaker.failure_threshold == 1:
        r.warn(
            r.spot(f"{eff}.circuit_breaker.failure_threshold"),
            "a failure_threshold of 1 opens the breaker on every single failed attempt",
        )
    rate = breaker.failure_rate
    if rate is not None and rate.min_calls > MIN_CALLS_PER_SECOND * rate.window:
        r.warn(
            r.spot(f"{eff}.circuit_breaker.failure_rate.min_calls"),
            f"min_calls ({rate.min_calls}) is reached only at {rate.min_calls / rate.window:g} "
            f"calls per second or more over the {fmt(rate.window)} window; below that the "
            "failure_rate and slow_call rules never act (only failure_threshold opens the "
            "breaker): lower min_calls or widen the window",
        )
    hc = service.health_check
    if hc is not None and hc.timeout >= hc.interval:
        r.warn(
            r.spot(f"{eff}.health_check.timeout"),
            f"health check timeout ({fmt(hc.timeout)}) is not shorter than its interval "
            f"({fmt(hc.interval)}); slow checks will overlap",
        )


def _check_slow_call(r: Reader, built: Built, name: str, service: ServiceConfig) -> None:
    """A call cut off by its timeout is a failure, never a slow call: `slow_call.duration`
    must be shorter than every attempt's limit on the routes to this service."""
    slow = service.circuit_breaker.slow_call
    if slow is None:
        return
    spot = f"{join('services', name)}.circuit_breaker.slow_call.duration"
    for k, route in enumerate(built.config.routes):
        if route.service != name:
            continue
        per_try = route.retries.per_try_timeout
        if per_try is not None and per_try < route.timeout:
            limit, key = per_try, "per_try_timeout"
        else:
            limit, key = route.timeout, "timeout"
        if slow.duration >= limit:
            r.warn(
                r.spot(spot),
                f"slow_call.duration ({fmt(slow.duration)}) is not shorter than the {key} "
                f"({fmt(limit)}) of route {quote(route.name)} (routes[{built.route_index[k]}]): "
                "its attempts time out (and count as failures) before they can count as slow",
            )


def worst_backoff(retries: RetryConfig) -> float:
    """The longest total back-off: full jitter can draw the cap of every exponential step."""
    total, step = 0.0, retries.backoff.base
    for done in range(retries.max_retries):
        if step >= retries.backoff.max:
            return total + (retries.max_retries - done) * retries.backoff.max
        total += step
        step *= 2
    return total


def _check_route(r: Reader, eff: str, route: RouteConfig, service: ServiceConfig | None) -> None:
    retries = route.retries
    per_try = retries.per_try_timeout
    n = retries.max_retries
    if per_try is not None and per_try >= route.timeout:
        _route_warn(
            r,
            eff,
            f"{eff}.retries.per_try_timeout",
            route.name,
            f"per_try_timeout ({fmt(per_try)}) is not shorter than the route timeout "
            f"({fmt(route.timeout)}): the route timeout fires first, so a slow attempt is "
            "never retried",
        )
    elif per_try is not None and n > 0:
        backoff = worst_backoff(retries)
        worst = per_try * (n + 1) + backoff
        if worst > route.timeout:
            _route_warn(
                r,
                eff,
                f"{eff}.retries.per_try_timeout",
                route.name,
                f"{n + 1} attempts of {fmt(per_try)} plus up to {fmt(backoff)} of back-off "
                f"can take {fmt(worst)}, more than the route timeout ({fmt(route.timeout)}); "
                "later attempts will be cut short",
            )
    if n > 0 and not retries.retry_on and not retries.retry_on_grpc:
        _route_warn(
            r,
            eff,
            f"{eff}.retries.retry_on",
            route.name,
            f"retry_on is empty, so max_retries: {n} never retries anything",
        )
    if n > 0 and retries.budget.ratio == 0 and retries.budget.min_per_second == 0:
        _route_warn(
            r,
            eff,
            f"{eff}.retries.budget",
            route.name,
            "a retry budget with ratio 0 and min_per_second 0 allows no retries at all",
        )
    if retries.non_idempotent and n > 0:
        _route_warn(
            r,
            eff,
            f"{eff}.retries.non_idempotent",
            route.name,
            "non_idempotent: true retries POST and PATCH too; the upstream may apply such a "
            "request twice",
            per_route=False,
        )
    fault = route.fault
    if fault is not None:
        parts = []
        if fault.delay is not None and fault.delay.percent > 0:
            parts.append(
                f"delays {fault.delay.percent:g}% of requests by {fmt(fault.delay.duration)}"
            )
        abort = fault.abort
        if abort is not None and abort.percent > 0:
            grpc = f"{eff}.fault.abort.grpc_status" in r.where
            http = f"{eff}.fault.abort.status" in r.where
            if grpc and http:
                answer = f"{abort.status} (gRPC requests: status {abort.grpc_status})"
            elif grpc:
                answer = f"gRPC status {abort.grpc_status} ({abort.status} to other requests)"
            else:
                answer = f"{abort.status}"
            parts.append(f"aborts {abort.percent:g}% with {answer}")
        if parts:
            _route_warn(
                r,
                eff,
                f"{eff}.fault",
                route.name,
                "fault injection is on: it " + " and ".join(parts),
                per_route=False,
            )
    if service is not None and n > 0:
        statuses = {c for c in retries.retry_on if isinstance(c, int)}
        missing = statuses - service.circuit_breaker.failure_status
        if missing:
            _route_warn(
                r,
                eff,
                f"{eff}.retries.retry_on",
                route.name,
                f"retry_on includes {format_statuses(missing)}, which the circuit breaker of "
                f"service {quote(service.name)} does not count as failures (failure_status); "
                "repeated failures of that kind never open it",
            )


def format_statuses(statuses: Iterable[int]) -> str:
    """`[501, 505, 506, 507]` -> `501, 505-507`."""
    ordered = sorted(statuses)
    runs: list[list[int]] = []
    for status in ordered:
        if runs and status == runs[-1][1] + 1:
            runs[-1][1] = status
        else:
            runs.append([status, status])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _prefix_covers(prefix: str, target: str) -> bool:
    # Segment-wise, the narrower reading: whether the router treats `/orders` as matching
    # `/orders-v2` or not, a route flagged here is shadowed either way.
    return prefix in ("/", target) or target.startswith(prefix.rstrip("/") + "/")


def _covers(first: MatchConfig, later: MatchConfig) -> bool:
    """Whether every request `later` matches is already matched by `first`."""
    target = later.path if later.path is not None else later.prefix
    assert target is not None
    if first.path is not None:
        if later.path != first.path:
            return False
    elif first.prefix is None or not _prefix_covers(first.prefix, target):
        return False
    if first.methods is not None and (later.methods is None or not later.methods <= first.methods):
        return False
    if not set(first.headers) <= set(later.headers):
        return False
    return first.host is None or first.host == later.host
