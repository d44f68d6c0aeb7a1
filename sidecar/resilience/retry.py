"""The attempt loop: deadline, endpoint choice, breaker, retries, budget and back-off.

One request becomes one or more attempts. The route deadline bounds all of them, back-off
included: no attempt starts without time left, and each attempt's timeout is the smaller
of `per_try_timeout` and the time left. After each attempt:

- the breaker records it (connect errors, resets, timeouts and `failure_status` count as
  failures; a cancelled attempt counts as nothing, or re-opens a half-open breaker);
- the endpoint's outcome feeds outlier detection;
- a retry happens only if the outcome is in `retry_on`, the method allows it (POST and
  PATCH only after a connect failure unless `non_idempotent`), the body can be replayed,
  retries are left, the breaker is not open, the budget allows it (retries after a connect
  failure are free: they add no load upstream), and the back-off (or a `Retry-After` on
  429/503) fits in the time left. Otherwise the last outcome is the answer:
  an upstream response is passed through unchanged.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from multidict import CIMultiDict

from sidecar.cluster import Cluster, Endpoint
from sidecar.config.model import (
    RETRY_CONNECT_FAILURE,
    RETRY_PER_TRY_TIMEOUT,
    RETRY_RESET,
    RetryConfig,
)
from sidecar.h1client import UpstreamPool
from sidecar.resilience.backoff import backoff_delay, parse_retry_after
from sidecar.resilience.breaker import CircuitOpen, ServiceBreaker
from sidecar.resilience.budget import RetryBudget
from sidecar.upstream import CONNECT_ERROR, RESET, RESPONSE, TIMEOUT, Attempt, send

# RFC 9110 §9.2.2: methods whose repetition has the same effect as one request.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class RetryPolicy:
    """`RetryConfig` compiled for the hot path."""

    __slots__ = (
        "backoff_base",
        "backoff_max",
        "max_retries",
        "non_idempotent",
        "on_connect_failure",
        "on_per_try_timeout",
        "on_reset",
        "per_try_timeout",
        "statuses",
    )

    def __init__(self, config: RetryConfig) -> None:
        self.max_retries = config.max_retries
        self.per_try_timeout = config.per_try_timeout
        self.on_connect_failure = RETRY_CONNECT_FAILURE in config.retry_on
        self.on_reset = RETRY_RESET in config.retry_on
        self.on_per_try_timeout = RETRY_PER_TRY_TIMEOUT in config.retry_on
        self.statuses = frozenset(s for s in config.retry_on if isinstance(s, int))
        self.non_idempotent = config.non_idempotent
        self.backoff_base = config.backoff.base
        self.backoff_max = config.backoff.max

    def retryable(self, attempt: Attempt, method: str) -> bool:
        kind = attempt.kind
        if kind == CONNECT_ERROR:
            # The request never left, so even a POST is safe to send again.
            return self.on_connect_failure
        if not self.non_idempotent and method not in IDEMPOTENT_METHODS:
            return False
        if kind == RESPONSE:
            return attempt.status in self.statuses
        if kind == RESET:
            return self.on_reset
        return kind == TIMEOUT and self.on_per_try_timeout


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


class StreamedBody:
    """A request body too large to buffer: sent once, straight from the client."""

    __slots__ = ("_content", "_prefix", "started")

    def __init__(self, content: aiohttp.StreamReader, prefix: bytes = b"") -> None:
        self._content = content
        self._prefix = prefix  # what was read while deciding it was too large to buffer
        self.started = False

    async def chunks(self) -> AsyncIterator[bytes]:
        self.started = True
        if self._prefix:
            yield self._prefix
        while chunk := await self._content.readany():
            yield chunk


@dataclass(slots=True)
class Exchange:
    """One request's state while its attempts are made."""

    method: str
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes | StreamedBody | None
    deadline: float  # loop time
    max_retries: int
    host_header: str | None = None  # None: send the endpoint's address as Host
    attempts: int = 0
    retries: int = 0
    last: Attempt | None = None
    refused: str | None = None  # circuit_open / no_healthy_upstream when no attempt could start
    retry_after: float | None = None
    timeout_kind: str | None = None  # set when the last attempt timed out: per_try | route


async def forward(
    ex: Exchange,
    route: RouteRuntimeLike,
    pool: UpstreamPool,
) -> Exchange:
    """Make attempts until one answers, or retrying is no longer allowed or possible."""
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
                ex.refused = "no_healthy_upstream"
            return ex
        try:
            trial = breaker.admit()
        except CircuitOpen as exc:
            if ex.last is None:
                ex.refused = "circuit_open"
                ex.retry_after = exc.retry_after
            return ex

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

        failed = attempt.kind != RESPONSE or breaker.is_failure_status(attempt.status)
        if failed:
            trial.failure(_failure_reason(attempt))
        else:
            trial.success()
        cluster.report(endpoint, not failed)
        service.count_attempt(endpoint.key, attempt.result_label)
        if attempt.kind == TIMEOUT:
            ex.timeout_kind = "route" if route_bound else "per_try"
            route.count_timeout(ex.timeout_kind)
        else:
            ex.timeout_kind = None

        if not _may_retry(ex, attempt, policy, breaker.state):
            return ex
        delay = _retry_delay(ex, attempt, policy)
        remaining = ex.deadline - loop.time()
        if delay is None or delay >= remaining:
            return ex
        # A connect failure reached no upstream, so retrying it adds no load: the budget,
        # which exists to cap extra load on a struggling service, is not spent on it.
        if attempt.kind != CONNECT_ERROR and not route.budget.try_spend():
            route.count_budget_exhausted()
            return ex
        attempt.release()
        ex.retries += 1
        route.count_retry()
        if delay > 0:
            await asyncio.sleep(delay)


def _may_retry(ex: Exchange, attempt: Attempt, policy: RetryPolicy, breaker_state: str) -> bool:
    if ex.retries >= ex.max_retries or breaker_state == "open":
        return False
    if not policy.retryable(attempt, ex.method):
        return False
    body = ex.body
    # A streamed body can be sent again only if no byte of it was consumed.
    return not (isinstance(body, StreamedBody) and body.started)


def _retry_delay(ex: Exchange, attempt: Attempt, policy: RetryPolicy) -> float | None:
    delay = backoff_delay(ex.retries + 1, policy.backoff_base, policy.backoff_max)
    response = attempt.response
    if response is not None and response.status in (429, 503):
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if retry_after is not None:
            # The upstream asked for a pause; honouring it beats hammering it sooner.
            return max(delay, retry_after)
    return delay


def _failure_reason(attempt: Attempt) -> str:
    if attempt.kind == RESPONSE:
        return f"HTTP {attempt.status} from {attempt.endpoint.key}"
    detail = f": {attempt.detail}" if attempt.detail else ""
    return f"{attempt.kind} to {attempt.endpoint.key}{detail}"
