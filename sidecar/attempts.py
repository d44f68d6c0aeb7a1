"""The attempt loop: deadline, endpoint choice, breaker, retries, budget and back-off.

One request becomes one or more attempts. The route deadline bounds all of them, back-off
included: no attempt starts without time left, and each attempt's timeout is the smaller
of `per_try_timeout` and the time left. After each attempt:

- the breaker records it (connect errors, resets, timeouts and `failure_status` count as
  failures; a cancelled attempt counts as nothing, or re-opens a half-open breaker);
- the endpoint's outcome feeds outlier detection, and the budget's throttle when the
  attempt reached an upstream;
- unless the outcome is the app's doing (`app_caused`): then it counts for none of them;
- the retry policy (`sidecar.resilience.retry`) says whether another attempt may follow,
  the budget whether the upstream may take it (retries after a connect failure are free:
  they add no load upstream), and the back-off whether it fits in the time left.
  Otherwise the last outcome is the answer: an upstream response is passed through
  unchanged.

When the request is over, its last trial is told (`Trial.request_done`): the breaker's
consecutive rule counts requests, not attempts.

This is the only module of the request path that sleeps between attempts; the policy
pieces it consults do no I/O.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Protocol

from sidecar.cluster import Cluster
from sidecar.endpoint import Endpoint
from sidecar.request import Exchange, StreamedBody
from sidecar.resilience.breaker import CircuitOpen, ServiceBreaker, Trial
from sidecar.resilience.budget import RetryBudget
from sidecar.resilience.retry import RetryPolicy, failure_reason, may_retry, retry_delay
from sidecar.upstream import Attempt, send
from sidecar.upstream.h1 import UpstreamPool
from sidecar.vocab import BreakerState, Outcome, Reason, TimeoutKind


class ServiceRuntimeLike(Protocol):
    """What `forward` needs from a service (see `sidecar.runtime.ServiceRuntime`)."""

    cluster: Cluster
    breaker: ServiceBreaker

    def count_attempt(self, endpoint: str, result: str) -> None: ...


class RouteRuntimeLike(Protocol):
    """What `forward` needs from a route (see `sidecar.runtime.RouteRuntime`)."""

    policy: RetryPolicy
    budget: RetryBudget
    connect_timeout: float

    @property
    def service(self) -> ServiceRuntimeLike: ...

    def count_retry(self) -> None: ...
    def count_budget_exhausted(self) -> None: ...
    def count_timeout(self, kind: str) -> None: ...


async def forward(
    ex: Exchange,
    route: RouteRuntimeLike,
    pool: UpstreamPool,
) -> Exchange:
    """Make attempts until one answers, or retrying is no longer allowed or possible."""
    trials: list[Trial] = []
    try:
        return await _attempts(ex, route, pool, trials)
    finally:
        # Whichever way the loop ended, the request's outcome is its last attempt's.
        if trials:
            trials[-1].request_done()


async def _attempts(
    ex: Exchange, route: RouteRuntimeLike, pool: UpstreamPool, trials: list[Trial]
) -> Exchange:
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
        trials.append(trial)

        per_try = policy.per_try_timeout
        route_bound = per_try is None or per_try >= remaining
        timeout = remaining if route_bound or per_try is None else per_try
        ex.attempts += 1
        headers = ex.headers
        headers["Host"] = ex.host_header or endpoint.key
        headers["x-sidecar-attempt"] = str(ex.attempts)
        headers["x-sidecar-timeout-ms"] = str(max(1, math.floor(timeout * 1000)))
        body = ex.body
        data: bytes | AsyncIterator[bytes] | None = (
            body.chunks() if isinstance(body, StreamedBody) else body
        )
        endpoint.in_flight += 1
        started = loop.time()
        try:
            attempt = await send(
                pool,
                endpoint,
                ex.method,
                ex.path_qs,
                headers,
                data,
                timeout,
                route.connect_timeout,
            )
        except asyncio.CancelledError:
            trial.abandon()
            raise
        finally:
            endpoint.in_flight -= 1
        if ex.last is not None:
            ex.last.release()
        ex.last = attempt
        tried.append(endpoint)

        failed = attempt.kind is not Outcome.RESPONSE or breaker.is_failure_status(attempt.status)
        if failed and app_caused(ex, attempt, started, timeout, per_try, loop.time()):
            trial.ignore()
        else:
            if failed:
                trial.failure(failure_reason(attempt), attempt.kind)
            else:
                trial.success()
            cluster.report(endpoint, not failed)
            if attempt.kind is not Outcome.CONNECT_ERROR:
                route.budget.record_attempt(failed)
        service.count_attempt(endpoint.key, attempt.result_label)
        if attempt.kind is Outcome.TIMEOUT:
            route.count_timeout(TimeoutKind.ROUTE if route_bound else TimeoutKind.PER_TRY)

        if not may_retry(ex, attempt, policy, breaker.state == BreakerState.OPEN):
            return ex
        delay = retry_delay(ex, attempt, policy)
        remaining = ex.deadline - loop.time()
        if delay >= remaining:
            return ex
        # A connect failure reached no upstream, so retrying it adds no load: the budget,
        # which exists to cap extra load on a struggling service, is not spent on it.
        if attempt.kind is not Outcome.CONNECT_ERROR and not route.budget.try_spend():
            route.count_budget_exhausted()
            return ex
        attempt.release()
        ex.retries += 1
        route.count_retry()
        if delay > 0:
            await asyncio.sleep(delay)


def app_caused(
    ex: Exchange,
    attempt: Attempt,
    started: float,
    timeout: float,
    per_try: float | None,
    now: float,
) -> bool:
    """Whether a failed attempt's outcome is the app's doing, so that it counts for neither
    the breaker, outlier detection nor the budget's throttle (it still counts in the
    attempt and timeout metrics):

    - the deadline passed while the sidecar was still waiting for the app's (streamed)
      request body: the upstream could not have answered a request it had not received;
    - it timed out, and only a per-request override (x-sidecar-timeout-ms) made the
      attempt's timeout shorter than the route's own timeout and per-try timeout would.
    """
    kind = attempt.kind
    if kind is not Outcome.TIMEOUT and kind is not Outcome.RESET:
        return False
    attempt_deadline = started + timeout
    body = ex.body
    if (
        isinstance(body, StreamedBody)
        and now >= attempt_deadline
        and body.waiting_for_app_at(attempt_deadline)
    ):
        return True
    if kind is Outcome.TIMEOUT and ex.route_deadline is not None:
        own = ex.route_deadline - started
        if per_try is not None:
            own = min(own, per_try)
        return timeout < own
    return False
