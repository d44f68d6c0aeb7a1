"""The per-service circuit breaker: pybreaker's state machine, adapted to asyncio.

pybreaker owns the counting and the state machine: consecutive failures (a success resets
them), `fail_max`, `success_threshold`, and the closed -> open -> half-open -> closed/open
transitions, announced to `CircuitBreakerListener`s. Its call API is synchronous, though, and
under asyncio it gets three things wrong (see STYLE.md, "pybreaker under asyncio"): it lets
every concurrent caller through in half-open, counts a cancelled call as a failure, and has no
way to hold a call open across an `await`.

So this module splits a call in two. `ServiceBreaker.admit()` decides, synchronously, whether
an attempt may go and hands back a `Trial`; the retry loop awaits the upstream, then resolves
the trial exactly once with `success()`, `failure(reason)` or `abandon()`. Only the outcome is
fed to pybreaker, as a synchronous `call()` that returns or raises, so pybreaker counts it and
moves the state. What the adapter adds on top:

- half-open gating: at most `half_open_max_requests` trials in flight at once; the rest get
  `CircuitOpen`, as do all calls while open;
- the open -> half-open timer on the monotonic clock (pybreaker's own uses the wall clock, and
  an NTP step must not hold a breaker open or release it early);
- cancellation: `abandon()` counts as nothing in closed state and re-opens a half-open breaker;
- stale outcomes: an attempt admitted before the breaker changed state does not count after
  it (a slow attempt from the closed era must not decide a half-open trial);
- `since` / `last_failure` for /admin/state, and a listener that mirrors every transition into
  the metrics and the `sidecar.breaker` log.

Everything runs on the event loop: no threads, no sleeping, no I/O, in-memory storage only.
"""

from __future__ import annotations

import contextlib
import logging
import time
from types import TracebackType
from typing import Any, Final

import pybreaker

from sidecar.config.model import CircuitBreakerConfig
from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.breaker")

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"

# pybreaker spells it "half-open"; the contract's state names and metric labels use "half_open".
_STATE_NAMES: Final = {
    pybreaker.STATE_CLOSED: CLOSED,
    pybreaker.STATE_OPEN: OPEN,
    pybreaker.STATE_HALF_OPEN: HALF_OPEN,
}

# The only transitions the adapter can make; their counters exist from start-up at 0 so that
# `rate()` and `increase()` work from the first change on.
_TRANSITIONS: Final = (
    (CLOSED, OPEN),
    (OPEN, HALF_OPEN),
    (HALF_OPEN, OPEN),
    (HALF_OPEN, CLOSED),
)

# While half-open with every trial slot taken there is no timer to quote: a slot frees when a
# trial finishes, usually well within a second. Callers are told to come back after this long
# (or after reset_timeout, when that is shorter).
_BUSY_RETRY_AFTER: Final = 1.0


class CircuitOpen(Exception):
    """The breaker refused an attempt: it is open, or half-open with its trial slots taken.

    `retry_after` is how many seconds until the breaker would admit a call (> 0); the proxy
    answers 503 `circuit_open` with it as `Retry-After`.
    """

    def __init__(self, service: str, state: str, retry_after: float) -> None:
        self.service = service
        self.state = state
        self.retry_after = retry_after
        super().__init__(
            f"circuit breaker for service {service!r} is {state}; retry after {retry_after:.3f}s"
        )


class _AttemptFailed(Exception):
    """Raised inside pybreaker's `call()` so that pybreaker counts the attempt as failed."""


def _succeed() -> None:
    """The call pybreaker makes for a successful attempt: it returns, so it counts as success."""


def _fail(reason: str) -> None:
    raise _AttemptFailed(reason)


class Trial:
    """One admitted attempt. Resolve it exactly once: `success()`, `failure()` or `abandon()`.

    The first resolution wins and later ones are ignored, so `finally: trial.abandon()` (or
    `with trial:`) is a safe way to make sure a trial never stays unresolved: an unresolved
    half-open trial would hold its slot forever.
    """

    __slots__ = ("_breaker", "_resolved", "epoch", "half_open")

    def __init__(self, breaker: ServiceBreaker, epoch: int, half_open: bool) -> None:
        self._breaker = breaker
        self._resolved = False
        # The breaker's state-change count at admission: outcomes only count in that state.
        self.epoch = epoch
        # True when this attempt holds one of the half-open trial slots.
        self.half_open = half_open

    @property
    def resolved(self) -> bool:
        return self._resolved

    def success(self) -> None:
        """The upstream answered with a status that is not a failure status."""
        if self._claim():
            self._breaker.resolve(self, "success", None)

    def failure(self, reason: str) -> None:
        """The attempt failed: `reason` is e.g. "HTTP 503", "connect_error", "timeout", "reset".

        It is kept as the breaker's `last_failure`. The call returns normally even when this
        failure trips the breaker: the attempt that trips it still returns the upstream's own
        response (CONTRACT §4); only later attempts get `CircuitOpen`.
        """
        if self._claim():
            self._breaker.resolve(self, "failure", reason)

    def abandon(self) -> None:
        """The attempt was cancelled before it had an outcome (the app went away, shutdown).

        In closed state this counts as neither success nor failure. A cancelled half-open
        trial re-opens the breaker: the trial said nothing about the upstream, and letting
        another through at once would let a client that keeps cancelling probe a sick service
        at full speed.
        """
        if self._claim():
            self._breaker.resolve(self, "abandon", None)

    def _claim(self) -> bool:
        if self._resolved:
            return False
        self._resolved = True
        return True

    def __enter__(self) -> Trial:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Resolve a trial the block left unresolved; never swallows the exception.

        A `TimeoutError` leaving the block is an attempt deadline (`asyncio.timeout()` raises
        it at its own boundary), so it counts as a "timeout" failure. Anything else,
        `CancelledError` above all, is not the upstream's doing: abandon.
        """
        if self._resolved:
            return
        if exc_type is not None and issubclass(exc_type, TimeoutError):
            self.failure("timeout")
        else:
            self.abandon()


class _Tracker(pybreaker.CircuitBreakerListener):
    """Keeps the adapter's own bookkeeping in step with pybreaker's transitions."""

    def __init__(self, breaker: ServiceBreaker) -> None:
        self._breaker = breaker

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        self._breaker.on_state_change(_STATE_NAMES[new_state.name])


class BreakerMetricsListener(pybreaker.CircuitBreakerListener):
    """Mirrors every state change into the metrics (one-hot gauge, transition counter) and log."""

    def __init__(self, breaker: ServiceBreaker, metrics: Metrics) -> None:
        self._breaker = breaker
        self._metrics = metrics

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        service = self._breaker.service
        to_state = _STATE_NAMES[new_state.name]
        self._metrics.set_breaker_state(service, to_state)
        if old_state is None:
            return
        from_state = _STATE_NAMES[old_state.name]
        if from_state == to_state:
            # pybreaker re-announces a state it re-reads from shared storage; not a change.
            return
        self._metrics.breaker_transitions.labels(service, from_state, to_state).inc()
        extra = {"service": service, "from_state": from_state, "to_state": to_state}
        if to_state == OPEN:
            log.warning(
                "circuit breaker for %s: %s -> %s (last failure: %s; admits a trial in %.3gs)",
                service,
                from_state,
                to_state,
                self._breaker.last_failure,
                self._breaker.config.reset_timeout,
                extra=extra,
            )
        else:
            log.info("circuit breaker for %s: %s -> %s", service, from_state, to_state, extra=extra)


class ServiceBreaker:
    """The circuit breaker of one service (CONTRACT §2 `circuit_breaker`, §3, §4)."""

    def __init__(self, service: str, config: CircuitBreakerConfig, metrics: Metrics) -> None:
        self.service = service
        self.config = config
        self._metrics = metrics
        self._since = time.time()  # wall clock: shown to operators as a UNIX timestamp
        self._opened_at: float | None = None  # monotonic: drives the open -> half_open timer
        self._epoch = 0  # bumped on every state change
        self._trials = 0  # half-open trials in flight in the current epoch
        self._last_failure: str | None = None
        self._last_failure_at: float | None = None
        self._listener = BreakerMetricsListener(self, metrics)
        self._cb = pybreaker.CircuitBreaker(
            fail_max=config.failure_threshold,
            # Kept for pybreaker's own view; admit() runs the timer itself (module docstring).
            reset_timeout=config.reset_timeout,
            success_threshold=config.success_threshold,
            # The tracker first, so `since` and the epoch are current when the mirror logs.
            listeners=[_Tracker(self), self._listener],
            name=service,
            # Let our own exception out of call() when an outcome trips the breaker: the trip
            # is read from the state, never from an exception.
            throw_new_error_on_trip=False,
        )
        # CONTRACT §5: the state series exist from start-up, before any traffic.
        metrics.set_breaker_state(service, CLOSED)
        metrics.breaker_rejected.labels(service)
        for from_state, to_state in _TRANSITIONS:
            metrics.breaker_transitions.labels(service, from_state, to_state)

    # -- admission -------------------------------------------------------------------------

    def admit(self) -> Trial:
        """Let one attempt through, or raise `CircuitOpen` (counted in `breaker_rejected`).

        Closed: always admitted. Open: refused until `reset_timeout` has passed since it
        opened; then this call becomes a half-open trial, and the state reads `half_open` from
        now until the trial's outcome (CONTRACT §4). Half-open: admitted while fewer than
        `half_open_max_requests` trials are in flight.
        """
        state = self.state
        if state == OPEN:
            remaining = self._open_remaining()
            if remaining > 0:
                raise self._reject(OPEN, remaining)
            self._cb.half_open()  # the tracker starts a new epoch with every slot free
            state = HALF_OPEN
        if state == HALF_OPEN:
            if self._trials >= self.config.half_open_max_requests:
                raise self._reject(HALF_OPEN, self._busy_retry_after())
            self._trials += 1
            return Trial(self, self._epoch, half_open=True)
        return Trial(self, self._epoch, half_open=False)

    def _reject(self, state: str, retry_after: float) -> CircuitOpen:
        self._metrics.breaker_rejected.labels(self.service).inc()
        return CircuitOpen(self.service, state, retry_after)

    def _open_remaining(self) -> float:
        if self._opened_at is None:
            return 0.0
        return self._opened_at + self.config.reset_timeout - time.monotonic()

    def _busy_retry_after(self) -> float:
        timeout = self.config.reset_timeout
        return min(_BUSY_RETRY_AFTER, timeout) if timeout > 0 else _BUSY_RETRY_AFTER

    # -- outcomes --------------------------------------------------------------------------

    def resolve(self, trial: Trial, outcome: str, reason: str | None) -> None:
        if outcome == "failure":
            # Informational, so kept even for a stale attempt: it is still this service's
            # most recent failure.
            self._last_failure = reason
            self._last_failure_at = time.time()
        if trial.epoch != self._epoch:
            # The breaker changed state while this attempt was in flight: its outcome says
            # nothing about the new state, and its slot (if any) belonged to an epoch whose
            # slots were all released when it ended.
            return
        if trial.half_open:
            self._trials -= 1
        if outcome == "success":
            # The hot path: in closed state with no failures counted, pybreaker's success
            # would only reset a counter that is already 0 (its listeners, ours included,
            # act on state changes alone), so the call is skipped.
            if trial.half_open or self._cb.fail_counter:
                self._cb.call(_succeed)
        elif outcome == "failure":
            # pybreaker counts it and re-raises it; a trip shows in the state, not here.
            with contextlib.suppress(_AttemptFailed):
                self._cb.call(_fail, reason)
        elif trial.half_open:
            self._cb.open()  # an abandoned trial re-opens (Trial.abandon explains why)

    def on_state_change(self, state: str) -> None:
        self._epoch += 1
        self._trials = 0
        self._since = time.time()
        if state == OPEN:
            self._opened_at = time.monotonic()

    # -- reading -----------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """ "closed", "open" or "half_open". An open breaker whose reset_timeout has passed
        still reads "open" until the next `admit()` makes that call its trial."""
        return _STATE_NAMES[self._cb.current_state]

    @property
    def since(self) -> float:
        """UNIX timestamp of the last state change (of construction, if none)."""
        return self._since

    @property
    def last_failure(self) -> str | None:
        return self._last_failure

    def is_failure_status(self, status: int) -> bool:
        """Whether an upstream status counts as a failed attempt (`failure_status`)."""
        return status in self.config.failure_status

    def retry_after(self) -> float | None:
        """Seconds a call arriving now would be told to wait, or None if it would be admitted."""
        state = self.state
        if state == OPEN:
            remaining = self._open_remaining()
            return remaining if remaining > 0 else None
        if state == HALF_OPEN and self._trials >= self.config.half_open_max_requests:
            return self._busy_retry_after()
        return None

    def snapshot(self) -> dict[str, Any]:
        """The breaker's part of /admin/state (CONTRACT §4), plus counters for operators."""
        state = self.state
        return {
            "state": state,
            "since": self._since,
            "last_failure": self._last_failure,
            "last_failure_at": self._last_failure_at,
            "failures": self._cb.fail_counter,
            "failure_threshold": self.config.failure_threshold,
            "half_open_successes": self._cb.success_counter if state == HALF_OPEN else 0,
            "trials_in_flight": self._trials if state == HALF_OPEN else 0,
            "retry_after": self.retry_after(),
        }

    def close(self) -> None:
        """Stop publishing: detach the metrics listener (the service was removed on reload).

        The breaker keeps working on its own, so attempts still in flight can resolve their
        trials, but it no longer touches the service's series, which a replacement breaker
        for the same name may now own.
        """
        if self._listener in self._cb.listeners:
            self._cb.remove_listener(self._listener)
