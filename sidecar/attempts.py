"""The attempt loop: deadline, endpoint choice, breaker, retries, budget and back-off.

One request becomes one or more attempts. The route deadline bounds all of them, back-off
included: no attempt starts without time left, and each attempt's timeout is the smaller
of `per_try_timeout` and the time left. After each attempt:

- its outcome is judged: the breaker records it (connect errors, resets, timeouts and
  `failure_status` count as failures; a cancelled attempt counts as nothing, or re-opens
  a half-open breaker), outlier detection hears how the endpoint did, and so does the
  budget's throttle when the attempt reached an upstream; unless the outcome is the app's
  doing (`app_caused`): then it counts for none of them. sidecar_upstream_attempts_total
  counts every attempt. The one attempt whose response is relayed to the app is settled
  by the proxy once its body is through (`settle`), so a body that breaks counts as the
  reset it is;
- the retry policy (`sidecar.resilience.retry`) says whether another attempt may follow,
  the budget whether the upstream may take it (retries after a connect failure are free:
  they add no load upstream), and the back-off whether it fits in the time left.
  Otherwise the last outcome is the answer: an upstream response is passed through
  unchanged.

When the request is over, its last trial is told (`Trial.request_done`): the breaker's
consecutive rule counts requests, not attempts.

This is the only module of the request path that waits between attempts; the policy
pieces it consults do no I/O. `sleep` and `clock` are parameters so that unit tests can
drive the loop with a scripted client, a fake clock and a fake sleep, with no sockets and
no waiting (tests/support/fake_upstream.py, tests/test_attempts.py).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

from sidecar.cluster import Cluster
from sidecar.endpoint import Endpoint
from sidecar.grpc import Status, format_timeout, parse_status
from sidecar.request import Exchange, StreamedBody
from sidecar.resilience.breaker import CircuitOpen, ServiceBreaker
from sidecar.resilience.budget import RetryBudget
from sidecar.resilience.retry import RetryPolicy, failure_reason, may_retry, retry_delay
from sidecar.upstream import Attempt, send
from sidecar.upstream.base import UpstreamClient, UpstreamRequest
from sidecar.vocab import BreakerState, Outcome, Reason, TimeoutKind

# Enum members bound once: looking one up on its class (EnumType has __getattr__)
# costs about twice a module global, on the path every request takes.
_OPEN: Final = BreakerState.OPEN
_CONNECT_ERROR: Final = Outcome.CONNECT_ERROR
_RESET: Final = Outcome.RESET
_RESPONSE: Final = Outcome.RESPONSE
_TIMEOUT: Final = Outcome.TIMEOUT
_CIRCUIT_OPEN: Final = Reason.CIRCUIT_OPEN
_NO_HEALTHY_UPSTREAM: Final = Reason.NO_HEALTHY_UPSTREAM
_PER_TRY: Final = TimeoutKind.PER_TRY
_ROUTE: Final = TimeoutKind.ROUTE

# Seconds on the time base of `Exchange.deadline` (the event loop's `time()` in production).
Clock = Callable[[], float]


class ServiceRuntimeLike(Protocol):
    """What the loop needs from a service (see `sidecar.runtime.ServiceRuntime`)."""

    cluster: Cluster
    breaker: ServiceBreaker
    client: UpstreamClient
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
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Clock | None = None,
) -> Exchange:
    """Make attempts until one answers, or retrying is no longer allowed or possible.

    When `ex.last` is a response, it is unsettled (`ex.unsettled`): the caller relays it
    and then calls `settle`.

    `sleep` waits out a back-off. `clock` is the time base of `ex.deadline` and of the
    `deadline` handed to the upstream client: the running event loop's `time()`, which the
    wire clients' own timers run on (the proxy passes it; None looks it up). A test
    passes a fake clock together with a fake client and a fake sleep, so that the
    deadline arithmetic is exact and nothing waits.
    """
    try:
        return await _attempts(ex, route, sleep, clock or asyncio.get_running_loop().time)
    finally:
        last = ex.last
        # Whichever way the loop ended, the request's outcome is its last attempt's; an
        # answer still being relayed is told when it is settled.
        if last is not None and last.trial is not None and ex.unsettled is None:
            last.trial.request_done()


async def _attempts(
    ex: Exchange,
    route: RouteRuntimeLike,
    sleep: Callable[[float], Awaitable[None]],
    now: Clock,
) -> Exchange:
    service = route.service
    policy = route.policy
    cluster = service.cluster
    breaker = service.breaker
    client = service.client
    tried: list[Endpoint] = []
    route.budget.record_request()

    while True:
        remaining = ex.deadline - now()
        if remaining <= 0:
            return ex
        endpoint = cluster.pick(tried)
        if endpoint is None:
            if ex.last is None:
                ex.refused = _NO_HEALTHY_UPSTREAM
            return ex
        try:
            trial = breaker.admit()
        except CircuitOpen as exc:
            if ex.last is None:
                ex.refused = _CIRCUIT_OPEN
                ex.retry_after = exc.retry_after
            return ex

        per_try = policy.per_try_timeout
        route_bound = per_try is None or per_try >= remaining
        timeout = remaining if route_bound or per_try is None else per_try
        ex.attempts += 1
        headers = [
            *ex.headers,
            ("x-sidecar-attempt", str(ex.attempts)),
            ("x-sidecar-timeout-ms", str(max(1, math.floor(timeout * 1000)))),
        ]
        if ex.grpc:
            # The upstream learns the attempt's own deadline, as gRPC servers expect.
            headers.append(("grpc-timeout", format_timeout(timeout)))
        request = UpstreamRequest(
            ex.method,
            ex.target,
            ex.authority or endpoint.key,
            headers,
            ex.body_for_attempt(),
            ex.content_length,
            ex.on_interim,
            service.idle_timeout,
            ex.replay_body if isinstance(ex.body, StreamedBody) else None,
        )
        endpoint.in_flight += 1
        started = now()
        ex.apps_deadline = apps_deadline(ex, started, timeout, per_try)
        try:
            if isinstance(ex.body, StreamedBody):
                attempt = await _send_streamed(client, endpoint, request, timeout, service, now)
            else:
                attempt = await send(
                    client, endpoint, request, timeout, service.connect_timeout, clock=now
                )
        except asyncio.CancelledError:
            trial.abandon()
            raise
        finally:
            endpoint.in_flight -= 1
        attempt.trial = trial
        ex.last = attempt  # the previous attempt was released before its retry
        tried.append(endpoint)
        if attempt.kind is _TIMEOUT:
            route.count_timeout(_ROUTE if route_bound else _PER_TRY)

        succeeded = attempt.kind is _RESPONSE and not _failed_head(breaker, attempt)
        if succeeded:
            # A success: judged once it is clear whether it is the answer (settled after
            # the relay, so a body that breaks counts as a reset) or retried (a status
            # `retry_on` lists that is no failure, e.g. 429: judged below, as a success).
            if not _retry_listed(ex, attempt, policy):
                ex.unsettled = attempt
                return ex
        elif app_caused(ex, attempt, started, timeout, per_try, now()):
            trial.ignore()
        else:
            # Judged at once, so a failure that opens the breaker stops the retries.
            _judge(route, attempt, failed=True)
        if attempt.kind is not _RESPONSE:
            _count(service, attempt, broken=False)

        retry = _retry_allowed(ex, attempt, route, breaker, now(), tried)
        if retry is None:
            if attempt.kind is _RESPONSE:
                ex.unsettled = attempt
            return ex
        if succeeded:
            _judge(route, attempt, failed=False)
        if attempt.kind is _RESPONSE:
            _count(service, attempt, broken=False)
        attempt.release()
        ex.retries += 1
        route.count_retry()
        if retry > 0:
            await sleep(retry)


async def _send_streamed(
    client: UpstreamClient,
    endpoint: Endpoint,
    request: UpstreamRequest,
    limit: float,
    service: ServiceRuntimeLike,
    now: Clock,
) -> Attempt:
    """`send` for a body streamed from the app: the deadline also covers the wait for the
    app's next chunk, which no client can see (it is waiting on the app, not the wire).
    That guard is an event-loop timer, so it runs on loop time whatever `now` is."""
    try:
        async with asyncio.timeout(limit):
            return await send(client, endpoint, request, limit, service.connect_timeout, clock=now)
    except TimeoutError:
        return Attempt(_TIMEOUT, endpoint, detail=f"no response within {limit * 1000:.0f}ms")


def _retry_allowed(
    ex: Exchange,
    attempt: Attempt,
    route: RouteRuntimeLike,
    breaker: ServiceBreaker,
    now: float,
    tried: list[Endpoint],
) -> float | None:
    """The pause before a retry, or None when there is none to make."""
    if not may_retry(ex, attempt, route.policy, breaker.state == _OPEN):
        return None
    if attempt.kind is _CONNECT_ERROR and _untried_left(route.service.cluster, tried):
        # The request never left, and the retry goes to another endpoint: a pause would
        # protect no one and only make the app wait.
        delay = 0.0
    else:
        delay = retry_delay(ex, attempt, route.policy)
    if delay >= ex.deadline - now:
        return None
    # A connect failure reached no upstream, so retrying it adds no load: the budget,
    # which exists to cap extra load on a struggling service, is not spent on it.
    if attempt.kind is not _CONNECT_ERROR and not route.budget.try_spend():
        route.count_budget_exhausted()
        return None
    return delay


def _untried_left(cluster: Cluster, tried: list[Endpoint]) -> bool:
    return any(e.available and e not in tried for e in cluster.endpoints)


def _retry_listed(ex: Exchange, attempt: Attempt, policy: RetryPolicy) -> bool:
    """Whether `retry_on` would retry a response head the breaker counts as a success
    (e.g. 429, or a gRPC status outside `failure_grpc_status`). Most answers are not
    listed: one set lookup decides for them."""
    if attempt.status not in policy.statuses and not (ex.grpc and policy.grpc_statuses):
        return False
    return policy.retryable(attempt, ex.method)


def _failed_head(breaker: ServiceBreaker, attempt: Attempt) -> bool:
    """Whether a response head already says the attempt failed: a `failure_status`, or
    a Trailers-Only gRPC answer whose status is in `failure_grpc_status`."""
    return breaker.is_failure_status(attempt.status) or breaker.is_failure_grpc_status(
        attempt.head_grpc_status
    )


def settle(ex: Exchange, route: RouteRuntimeLike, *, broken: bool) -> None:
    """Record the relayed attempt's outcome, once its body is through (or broke)."""
    attempt = ex.unsettled
    if attempt is None:
        return
    ex.unsettled = None
    trial = attempt.trial
    if broken:
        _judge(route, attempt, failed=True, detail="response body broke")
    elif trial is not None and not trial.resolved:
        trailer_status = _trailer_grpc_status(attempt) if ex.grpc else None
        if trailer_status is None or not route.service.breaker.is_failure_grpc_status(
            trailer_status
        ):
            _judge(route, attempt, failed=False)
        elif trailer_status == Status.DEADLINE_EXCEEDED and ex.apps_deadline:
            # The app's own grpc-timeout (shorter than the route's) ran out upstream.
            trial.ignore()
        else:
            _judge(route, attempt, failed=True)
    _count(route.service, attempt, broken=broken)
    if trial is not None:
        trial.request_done()


def _trailer_grpc_status(attempt: Attempt) -> int | None:
    response = attempt.response
    if response is None or response.trailers is None:
        return None
    return parse_status(response.trailers.get("grpc-status"))


def _judge(
    route: RouteRuntimeLike, attempt: Attempt, *, failed: bool, detail: str | None = None
) -> None:
    """The attempt's verdict for the breaker, outlier detection and the budget's throttle
    (once per attempt: a resolved trial means it was judged)."""
    trial = attempt.trial
    if trial is not None:
        if trial.resolved:
            return
        if not failed:
            trial.success()
        elif detail is not None:
            trial.failure(f"reset to {attempt.endpoint.key}: {detail}", _RESET)
        else:
            trial.failure(failure_reason(attempt), attempt.kind)
    route.service.cluster.report(attempt.endpoint, not failed)
    if attempt.kind is not _CONNECT_ERROR:
        route.budget.record_attempt(failed)


def _count(service: ServiceRuntimeLike, attempt: Attempt, *, broken: bool) -> None:
    """sidecar_upstream_attempts_total; a relayed body that broke counts as a reset."""
    service.count_attempt(attempt.endpoint.key, _RESET if broken else attempt.result_label)


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
    - it timed out, or the upstream answered gRPC DEADLINE_EXCEEDED, and only a
      per-request override (x-sidecar-timeout-ms, grpc-timeout) made the attempt's
      timeout shorter than the route's own timeout and per-try timeout would.
    """
    kind = attempt.kind
    if kind is _RESPONSE:
        # A gRPC DEADLINE_EXCEEDED under a deadline only the app's own grpc-timeout (or
        # override) made shorter than the route's: the upstream kept the app's deadline.
        return attempt.head_grpc_status == Status.DEADLINE_EXCEEDED and apps_deadline(
            ex, started, timeout, per_try
        )
    if kind is not _TIMEOUT and kind is not _RESET:
        return False
    attempt_deadline = started + timeout
    body = ex.body
    if (
        isinstance(body, StreamedBody)
        and now >= attempt_deadline
        and body.waiting_for_app_at(attempt_deadline)
    ):
        return True
    return kind is _TIMEOUT and apps_deadline(ex, started, timeout, per_try)


def apps_deadline(ex: Exchange, started: float, timeout: float, per_try: float | None) -> bool:
    """Whether only a per-request override (x-sidecar-timeout-ms, grpc-timeout) made an
    attempt's timeout shorter than the route's own timeout and per-try timeout would."""
    if ex.route_deadline is None:
        return False
    own = ex.route_deadline - started
    if per_try is not None:
        own = min(own, per_try)
    return timeout < own
