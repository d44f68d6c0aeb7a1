"""The attempt loop: deadline, endpoint choice, breaker, retries, budget and back-off.

One request becomes one or more attempts. The route deadline bounds all of them, back-off
included: no attempt starts without time left, and each attempt's timeout is the smaller
of `per_try_timeout` and the time left. After each attempt:

- its outcome is settled: the breaker records it (connect errors, resets, timeouts and
  `failure_status` count as failures; a cancelled attempt counts as nothing, or re-opens
  a half-open breaker), outlier detection hears how the endpoint did, and
  sidecar_upstream_attempts_total counts it. The one attempt whose response is relayed to
  the app is settled by the proxy once its body is through (`settle`), so a body that
  breaks counts as the reset it is;
- the retry policy (`sidecar.resilience.retry`) says whether another attempt may follow,
  the budget whether the upstream may take it (retries after a connect failure are free:
  they add no load upstream), and the back-off whether it fits in the time left.
  Otherwise the last outcome is the answer: an upstream response is passed through
  unchanged.

This is the only module of the request path that waits between attempts; the policy
pieces it consults do no I/O. `sleep` is a parameter so the loop can be driven by a fake
client and clock in unit tests.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from sidecar.cluster import Cluster
from sidecar.endpoint import Endpoint
from sidecar.request import Exchange
from sidecar.resilience.breaker import CircuitOpen, ServiceBreaker
from sidecar.resilience.budget import RetryBudget
from sidecar.resilience.retry import RetryPolicy, failure_reason, may_retry, retry_delay
from sidecar.upstream import Attempt, send
from sidecar.upstream.base import UpstreamClient, UpstreamRequest
from sidecar.vocab import BreakerState, Outcome, Reason, TimeoutKind


class ServiceRuntimeLike(Protocol):
    """What the loop needs from a service (see `sidecar.runtime.ServiceRuntime`)."""

    cluster: Cluster
    breaker: ServiceBreaker
    connect_timeout: float
    idle_timeout: float

    def count_attempt(self, endpoint: str, result: str) -> None: ...


class RouteRuntimeLike(Protocol):
    """What the loop needs from a route (see `sidecar.runtime.RouteRuntime`)."""

    policy: RetryPolicy
    budget: RetryBudget

    @property
    def service(self) -> ServiceRuntimeLike: ...

    def count_retry(self) -> None: ...
    def count_budget_exhausted(self) -> None: ...
    def count_timeout(self, kind: TimeoutKind) -> None: ...


async def forward(
    ex: Exchange,
    route: RouteRuntimeLike,
    client: UpstreamClient,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Exchange:
    """Make attempts until one answers, or retrying is no longer allowed or possible.

    When `ex.last` is a response, it is unsettled (`ex.unsettled`): the caller relays it
    and then calls `settle`.
    """
    service = route.service
    policy = route.policy
    cluster = service.cluster
    breaker = service.breaker
    loop = asyncio.get_running_loop()
    tried: list[Endpoint] = []
    route.budget.record_request()

    while True:
        remaining = ex.deadline - loop.time()
        if remaining <= 0:
            return ex
        endpoint = cluster.pick(tried)
        if endpoint is None:
            if ex.last is None:
                ex.refused = Reason.NO_HEALTHY_UPSTREAM
            return ex
        try:
            trial = breaker.admit()
        except CircuitOpen as exc:
            if ex.last is None:
                ex.refused = Reason.CIRCUIT_OPEN
                ex.retry_after = exc.retry_after
            return ex

        per_try = policy.per_try_timeout
        route_bound = per_try is None or per_try >= remaining
        timeout = remaining if route_bound or per_try is None else per_try
        ex.attempts += 1
        request = UpstreamRequest(
            ex.method,
            ex.target,
            ex.authority or endpoint.key,
            [
                *ex.headers,
                ("x-sidecar-attempt", str(ex.attempts)),
                ("x-sidecar-timeout-ms", str(max(1, math.floor(timeout * 1000)))),
            ],
            ex.body_for_attempt(),
            ex.content_length,
            ex.on_interim,
            service.idle_timeout,
        )
        started = time.perf_counter()
        endpoint.in_flight += 1
        try:
            attempt = await send(client, endpoint, request, timeout, service.connect_timeout)
        except asyncio.CancelledError:
            trial.abandon()
            raise
        finally:
            endpoint.in_flight -= 1
        attempt.trial = trial
        attempt.started = started
        if ex.last is not None:
            ex.last.release()
        ex.last = attempt
        tried.append(endpoint)
        if attempt.kind is Outcome.TIMEOUT:
            route.count_timeout(TimeoutKind.ROUTE if route_bound else TimeoutKind.PER_TRY)

        if attempt.kind is Outcome.RESPONSE:
            failed = breaker.is_failure_status(attempt.status)
            if failed:
                # Judged at once, so a failure that opens the breaker stops the retries.
                _judge(service, attempt, failed=True)
        else:
            failed = True
            _judge(service, attempt, failed=True)
            _count(service, attempt, broken=False)

        retry = _retry_allowed(ex, attempt, route, breaker, loop.time()) if failed else None
        if retry is None:
            if attempt.kind is Outcome.RESPONSE:
                ex.unsettled = attempt
            return ex
        if attempt.kind is Outcome.RESPONSE:
            _count(service, attempt, broken=False)
        attempt.release()
        ex.retries += 1
        route.count_retry()
        if retry > 0:
            await sleep(retry)


def _retry_allowed(
    ex: Exchange,
    attempt: Attempt,
    route: RouteRuntimeLike,
    breaker: ServiceBreaker,
    now: float,
) -> float | None:
    """The pause before a retry, or None when there is none to make."""
    if not may_retry(ex, attempt, route.policy, breaker.state == BreakerState.OPEN):
        return None
    delay = retry_delay(ex, attempt, route.policy)
    if delay >= ex.deadline - now:
        return None
    # A connect failure reached no upstream, so retrying it adds no load: the budget,
    # which exists to cap extra load on a struggling service, is not spent on it.
    if attempt.kind is not Outcome.CONNECT_ERROR and not route.budget.try_spend():
        route.count_budget_exhausted()
        return None
    return delay


def settle(ex: Exchange, route: RouteRuntimeLike, *, broken: bool) -> None:
    """Record the relayed attempt's outcome, once its body is through (or broke)."""
    attempt = ex.unsettled
    if attempt is None:
        return
    ex.unsettled = None
    service = route.service
    if broken:
        _judge(service, attempt, failed=True, detail="response body broke")
    elif attempt.trial is not None and not attempt.trial.resolved:
        _judge(service, attempt, failed=False)
    _count(service, attempt, broken=broken)


def _judge(
    service: ServiceRuntimeLike, attempt: Attempt, *, failed: bool, detail: str | None = None
) -> None:
    """The attempt's verdict for the breaker and outlier detection (once per attempt:
    the breaker's trial ignores a second resolution)."""
    trial = attempt.trial
    if trial is not None:
        if trial.resolved:
            return
        if not failed:
            trial.success()
        elif detail is not None:
            trial.failure(f"reset to {attempt.endpoint.key}: {detail}")
        else:
            trial.failure(failure_reason(attempt))
    service.cluster.report(attempt.endpoint, not failed)


def _count(service: ServiceRuntimeLike, attempt: Attempt, *, broken: bool) -> None:
    """sidecar_upstream_attempts_total; a relayed body that broke counts as a reset."""
    service.count_attempt(attempt.endpoint.key, Outcome.RESET if broken else attempt.result_label)
