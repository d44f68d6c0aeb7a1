"""Retry decisions: which outcomes may be retried, for which methods, after how long.

Pure policy: nothing here sends, sleeps or reads a clock. The attempt loop
(`sidecar.attempts`) asks these questions after every attempt and does the waiting.

A retry happens only if the outcome is in `retry_on`, the method allows it (POST and PATCH
only after a connect failure unless `non_idempotent`), the body can be replayed, retries
are left and the breaker is not open; the loop then also needs the budget and time left
for the back-off (or an upstream's `Retry-After` on 429/503).
"""

from __future__ import annotations

from typing import Final

from sidecar.config.model import (
    RETRY_CONNECT_FAILURE,
    RETRY_PER_TRY_TIMEOUT,
    RETRY_RESET,
    RetryConfig,
)
from sidecar.request import Exchange
from sidecar.resilience.backoff import backoff_delay, parse_retry_after
from sidecar.upstream import Attempt
from sidecar.vocab import Outcome

# Enum members bound once: looking one up on its class (EnumType has __getattr__)
# costs about twice a module global, on the path every request takes.
_CONNECT_ERROR: Final = Outcome.CONNECT_ERROR
_RESET: Final = Outcome.RESET
_RESPONSE: Final = Outcome.RESPONSE
_TIMEOUT: Final = Outcome.TIMEOUT

# RFC 9110 §9.2.2: methods whose repetition has the same effect as one request.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class RetryPolicy:
    """`RetryConfig` compiled for the hot path."""

    __slots__ = (
        "backoff_base",
        "backoff_max",
        "grpc_statuses",
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
        self.grpc_statuses = config.retry_on_grpc
        self.non_idempotent = config.non_idempotent
        self.backoff_base = config.backoff.base
        self.backoff_max = config.backoff.max

    def retryable(self, attempt: Attempt, method: str) -> bool:
        kind = attempt.kind
        if kind is _CONNECT_ERROR:
            # The request never left, so even a POST is safe to send again.
            return self.on_connect_failure
        if not self.non_idempotent and method not in IDEMPOTENT_METHODS:
            return False
        if kind is _RESPONSE:
            if attempt.status in self.statuses:
                return True
            # Only a status in the head (a Trailers-Only answer) can be retried: one in
            # the trailers comes after the answer's messages have reached the app.
            grpc_status = attempt.head_grpc_status
            return grpc_status is not None and grpc_status in self.grpc_statuses
        if kind is _RESET:
            return self.on_reset
        return kind is _TIMEOUT and self.on_per_try_timeout


def may_retry(ex: Exchange, attempt: Attempt, policy: RetryPolicy, breaker_open: bool) -> bool:
    """Whether the policy allows another attempt after `attempt` (budget and time aside)."""
    if ex.retries >= ex.max_retries or breaker_open:
        return False
    if not policy.retryable(attempt, ex.method):
        return False
    # A streamed body can be sent again only if no byte of it was consumed.
    return ex.body_replayable()


def retry_delay(ex: Exchange, attempt: Attempt, policy: RetryPolicy) -> float:
    """The pause before the next attempt: back-off, or longer if the upstream asked."""
    delay = backoff_delay(ex.retries + 1, policy.backoff_base, policy.backoff_max)
    response = attempt.response
    if response is not None and response.status in (429, 503):
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if retry_after is not None:
            # The upstream asked for a pause; honouring it beats hammering it sooner.
            return max(delay, retry_after)
    return delay


def failure_reason(attempt: Attempt) -> str:
    """The breaker's `last_failure` text for a failed attempt."""
    if attempt.kind is _RESPONSE:
        return f"HTTP {attempt.status} from {attempt.endpoint.key}"
    detail = f": {attempt.detail}" if attempt.detail else ""
    return f"{attempt.kind} to {attempt.endpoint.key}{detail}"
