"""The per-service circuit breaker: three trip rules and growing open periods, with
pybreaker as the state machine.

pybreaker owns the states and their transitions (`open()`, `half_open()`, `close()`),
announced to `CircuitBreakerListener`s, which mirror them into metrics and logs. This
adapter owns everything pybreaker cannot do under asyncio or does not do at all: the
counting, the rules, the timers and the half-open gate. (pybreaker's `call()` wraps a
synchronous function under a thread lock, its `call_async()` needs Tornado, its open timer
runs on the wall clock, and its half-open state lets every concurrent caller through.) It
never calls pybreaker's `call()`.

What counts (the attempt loop reports; docs/resilience.md has the whole table):

- Each attempt resolves its `Trial` once: `success()`, `failure(reason, kind)`, `ignore()`
  (an outcome the app caused: its own shorter deadline, its slow request body; it counts
  for nothing) or `abandon()` (cancelled).
- Once per request, the attempt loop calls `request_done()` on the request's last trial:
  a request fails when its last attempt failed.

The rules, checked in this order on each call, the first that fires named as `trip_reason`:

- consecutive: `failure_threshold` failed *requests* in a row (a successful one resets
  the run). Counting requests, not attempts, is what lets a flaky upstream be retried
  without tripping: at 20 % random failures and two retries a request fails 0.8 % of the
  time, and five in a row essentially never happen.
- failure_rate: the share of failed *attempts* over a sliding time window (`window`), once
  at least `min_calls` attempts are in it; `threshold` or more trips.
- slow_call (off unless configured): the share of attempts whose response head took longer
  than `duration`, failed or not, over the same window and with the same `min_calls` gate
  (the failure_rate defaults when failure_rate itself is off); `rate` or more trips.

The rate rules fire on the attempt that crosses the line. That attempt is always its
request's last one (the retry loop never retries into an open breaker), so it also ends a
failed request: if that request makes `failure_threshold` in a row, the reason is
"consecutive", keeping the contract's order.

Open periods: the first lasts `reset_timeout`; each failed half-open trial re-opens the
breaker (no new trip: `trip_reason` stays) for twice the last period, up to
`open_period_cap`; closing resets it. The period ending half-opens the breaker, with or
without traffic: the recovery task (`sidecar.cluster.recovery`) calls `end_open_period()`
on time, and `admit()` does the same if it runs first. A passing recovery probe calls
`probe_passed()`. `transport_evidence` tells the recovery task whether the failures that
opened the breaker include connect failures or resets (so a TCP probe means something).

Half-open admits `half_open_max_requests` trials at once; `success_threshold` successes
close it; one failed trial (or, with slow_call on, one slow trial) re-opens it; a cancelled
trial re-opens it for the same period; an ignored trial frees its slot. Outcomes of
attempts admitted in an earlier state never count (`epoch`).

Everything runs on the event loop: no threads, no sleeping, no I/O. Both clocks are
injected: `clock` (monotonic) drives windows and timers, `wall` only labels timestamps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import IntEnum
from typing import Any, Final

import pybreaker

from sidecar.config.model import CircuitBreakerConfig, FailureRateConfig
from sidecar.metrics import Metrics
from sidecar.resilience.window import SlidingWindow
from sidecar.vocab import BreakerState, Outcome, TripReason

log = logging.getLogger("sidecar.breaker")

Clock = Callable[[], float]

# pybreaker spells it "half-open"; the contract's state names and metric labels use "half_open".
_STATE_NAMES: Final = {
    pybreaker.STATE_CLOSED: BreakerState.CLOSED,
    pybreaker.STATE_OPEN: BreakerState.OPEN,
    pybreaker.STATE_HALF_OPEN: BreakerState.HALF_OPEN,
}

# While half-open with every trial slot taken there is no timer to quote: a slot frees when a
# trial finishes, usually well within a second (docs/contract.md#circuit-breaker: Retry-After 1).
BUSY_RETRY_AFTER: Final = 1.0

# Attempt outcomes that say "nothing answered on that port": a TCP probe can tell when
# that changes. Timeouts are not among them: a hung server accepts connections.
TRANSPORT_FAILURES: Final = frozenset({Outcome.CONNECT_ERROR, Outcome.RESET})

# Rate comparisons are float products against integer counts.
_EPSILON: Final = 1e-9

# The window's fields.
_CALLS: Final = 0
_FAILURES: Final = 1
_SLOW: Final = 2
_TRANSPORT: Final = 3


class CircuitOpen(Exception):
    """The breaker refused an attempt: it is open, or half-open with its trial slots taken.

    `retry_after` is how many seconds until the breaker would admit a call (> 0): while
    open, until the current open period ends; while half-open and busy, 1. The proxy
    answers 503 `circuit_open` with it, rounded up, as `Retry-After`.
    """

    def __init__(self, service: str, state: BreakerState, retry_after: float) -> None:
        self.service = service
        self.state = state
        self.retry_after = retry_after
        super().__init__(
            f"circuit breaker for service {service!r} is {state}; retry after {retry_after:.3f}s"
        )


class Verdict(IntEnum):
    """How a trial was resolved."""

    PENDING = 0
    SUCCESS = 1
    FAILURE = 2
    IGNORED = 3  # the app's doing: counts for nothing
    ABANDONED = 4  # cancelled before an outcome


# Members bound once: looking one up on its class (EnumType has __getattr__) costs
# about twice a module global, and admission and outcomes run on every attempt.
_B_CLOSED: Final = BreakerState.CLOSED
_B_HALF_OPEN: Final = BreakerState.HALF_OPEN
_B_OPEN: Final = BreakerState.OPEN
_O_RESPONSE: Final = Outcome.RESPONSE
_T_CONSECUTIVE: Final = TripReason.CONSECUTIVE
_T_FAILURE_RATE: Final = TripReason.FAILURE_RATE
_T_SLOW_CALL: Final = TripReason.SLOW_CALL
_V_ABANDONED: Final = Verdict.ABANDONED
_V_FAILURE: Final = Verdict.FAILURE
_V_IGNORED: Final = Verdict.IGNORED
_V_PENDING: Final = Verdict.PENDING
_V_SUCCESS: Final = Verdict.SUCCESS


class Trial:
    """One admitted attempt. Resolve it exactly once: `success()`, `failure()`, `ignore()`
    or `abandon()`; on the request's last attempt, also call `request_done()`.

    The first resolution wins and later ones are ignored, so `finally: trial.abandon()` is a
    safe way to make sure a trial never stays unresolved: an unresolved half-open trial
    would hold its slot forever.
    """

    __slots__ = ("_breaker", "epoch", "half_open", "started", "verdict")

    def __init__(self, breaker: ServiceBreaker, epoch: int, half_open: bool, started: float):
        self._breaker = breaker
        self.verdict = _V_PENDING
        # The breaker's state-change count at admission: outcomes only count in that state.
        self.epoch = epoch
        # True when this attempt holds one of the half-open trial slots.
        self.half_open = half_open
        # Monotonic admission time, for the slow-call rule (0.0 when slow_call is off).
        self.started = started

    @property
    def resolved(self) -> bool:
        return self.verdict is not _V_PENDING

    def success(self) -> None:
        """The upstream answered with a status that is not a failure status."""
        if self._claim(_V_SUCCESS):
            self._breaker.resolve_trial(self, None, _O_RESPONSE)

    def failure(self, reason: str, kind: Outcome = Outcome.RESPONSE) -> None:
        """The attempt failed: `kind` is what happened, `reason` its text for operators
        (e.g. "HTTP 503 from 10.0.0.5:8080"), kept as the breaker's `last_failure`.

        It returns normally even when this failure trips the breaker: the attempt that trips
        it still returns the upstream's own response; only later attempts get `CircuitOpen`.
        """
        if self._claim(_V_FAILURE):
            self._breaker.resolve_trial(self, reason, kind)

    def ignore(self) -> None:
        """The outcome is the app's doing (its own shorter deadline, its slow request body):
        it counts for no rule, and a half-open trial just frees its slot."""
        if self._claim(_V_IGNORED):
            self._breaker.resolve_trial(self, None, None)

    def abandon(self) -> None:
        """The attempt was cancelled before it had an outcome (the app went away, shutdown).

        In closed state this counts as nothing. A cancelled half-open trial re-opens the
        breaker (for the same period): the trial said nothing about the upstream, and
        letting another through at once would let a client that keeps cancelling probe a
        sick service at full speed.
        """
        if self._claim(_V_ABANDONED):
            self._breaker.resolve_trial(self, None, None)

    def request_done(self) -> None:
        """This trial was its request's last attempt: count the request for the
        consecutive rule (failed if this attempt failed). Call it once per request."""
        self._breaker.count_request(self)

    def _claim(self, verdict: Verdict) -> bool:
        if self.verdict is not _V_PENDING:
            return False
        self.verdict = verdict
        return True


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
        breaker = self._breaker
        service = breaker.service
        to_state = _STATE_NAMES[new_state.name]
        self._metrics.set_breaker_state(service, to_state)
        if old_state is None:
            return
        from_state = _STATE_NAMES[old_state.name]
        if from_state == to_state:
            return  # pybreaker re-announces a state it re-reads from storage; not a change
        self._metrics.breaker_transitions.labels(service, from_state, to_state).inc()
        extra = {"service": service, "from_state": from_state, "to_state": to_state}
        if to_state == _B_OPEN:
            log.warning(
                "circuit breaker for %s: %s -> %s (%s; last failure: %s; open for %.3gs)",
                service,
                from_state,
                to_state,
                breaker.trip_reason if from_state == _B_CLOSED else "half-open trial",
                breaker.last_failure,
                breaker.open_period,
                extra=extra,
            )
        else:
            log.info("circuit breaker for %s: %s -> %s", service, from_state, to_state, extra=extra)


class ServiceBreaker:
    """The circuit breaker of one service (`services.NAME.circuit_breaker`)."""

    def __init__(
        self,
        service: str,
        config: CircuitBreakerConfig,
        metrics: Metrics,
        *,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
    ) -> None:
        self.service = service
        self.config = config
        self._metrics = metrics
        self._clock = clock
        self._wall = wall
        # The rules, compiled for the hot path.
        self._threshold = config.failure_threshold
        rate = config.failure_rate
        gate = rate if rate is not None else FailureRateConfig()  # slow_call's window, gate
        self._min_calls = gate.min_calls
        self._failure_rate = rate.threshold if rate is not None else None
        slow = config.slow_call
        self._slow_duration = slow.duration if slow is not None else None
        self._slow_rate = slow.rate if slow is not None else None
        self._window = SlidingWindow(gate.window, 4, clock)
        self._base_period = config.reset_timeout
        self._period_cap = max(config.open_period_cap, config.reset_timeout)
        # State.
        self._state = _B_CLOSED  # pybreaker's, mirrored by the tracker
        self._epoch = 0  # bumped on every state change
        self._since = wall()  # wall clock: shown to operators as a UNIX timestamp
        self._consecutive = 0  # failed requests in a row (closed)
        self._run_transport = False  # the current run includes a connect failure / reset
        self._trials = 0  # half-open trials in flight in the current epoch
        self._successes = 0  # successful trials in the current half-open epoch
        self._period = self._base_period  # the current (or next) open period
        self._open_until = 0.0  # monotonic end of the current open period
        self._open_until_wall: float | None = None
        self._trip_reason: TripReason | None = None
        self._transport_evidence = False
        self._last_failure: str | None = None
        self._last_failure_at: float | None = None
        self._watchers: list[Callable[[BreakerState], None]] = []
        self._listener = BreakerMetricsListener(self, metrics)
        self._cb = pybreaker.CircuitBreaker(
            # Unused: the adapter counts and decides; pybreaker only holds the state.
            fail_max=config.failure_threshold,
            reset_timeout=config.reset_timeout,
            success_threshold=config.success_threshold,
            # The tracker first, so the epoch and `since` are current when the mirror logs.
            listeners=[_Tracker(self), self._listener],
            name=service,
            throw_new_error_on_trip=False,
        )
        self._m_rejected = metrics.breaker_rejected.labels(service)
        self._m_trips = {r: metrics.breaker_trips.labels(service, r) for r in TripReason}
        metrics.init_breaker_series(service)
        self.publish()

    def publish(self) -> None:
        """Point this service's state and failure-rate series at this breaker (again: a
        reload that failed after building a replacement had taken them over)."""
        self._metrics.set_breaker_state(self.service, self.state)
        # Read at scrape time: the request path never touches a gauge.
        self._metrics.breaker_failure_rate.labels(self.service).set_function(
            lambda: self.failure_rate
        )

    # -- admission -------------------------------------------------------------------------

    def admit(self) -> Trial:
        """Let one attempt through, or raise `CircuitOpen` (counted in `breaker_rejected`).

        Closed: always admitted. Open: refused until the open period ends; a call after
        that half-opens the breaker (if the recovery task has not yet) and becomes a trial.
        Half-open: admitted while fewer than `half_open_max_requests` trials are in flight.
        """
        state = self.state
        if state is _B_OPEN:
            remaining = self._open_until - self._clock()
            if remaining > 0:
                raise self._reject(_B_OPEN, remaining)
            self._cb.half_open()
            state = _B_HALF_OPEN
        started = self._clock() if self._slow_duration is not None else 0.0
        if state is _B_HALF_OPEN:
            if self._trials >= self.config.half_open_max_requests:
                raise self._reject(_B_HALF_OPEN, BUSY_RETRY_AFTER)
            self._trials += 1
            return Trial(self, self._epoch, True, started)
        return Trial(self, self._epoch, False, started)

    def _reject(self, state: BreakerState, retry_after: float) -> CircuitOpen:
        self._m_rejected.inc()
        return CircuitOpen(self.service, state, retry_after)

    # -- recovery (called by sidecar.cluster.recovery) -------------------------------------

    def end_open_period(self) -> bool:
        """Half-open the breaker if it is open and its open period has ended."""
        if self.state is _B_OPEN and self._clock() >= self._open_until:
            self._cb.half_open()
            return True
        return False

    def probe_passed(self) -> bool:
        """A recovery probe passed: half-open the breaker now, if it is still open."""
        if self.state is _B_OPEN:
            self._cb.half_open()
            return True
        return False

    def watch(self, callback: Callable[[BreakerState], None]) -> None:
        """Call `callback(new_state)` after every state change (synchronously, on the loop)."""
        self._watchers.append(callback)

    # -- outcomes --------------------------------------------------------------------------

    def resolve_trial(self, trial: Trial, reason: str | None, kind: Outcome | None) -> None:
        verdict = trial.verdict
        if verdict is _V_FAILURE:
            # Informational, so kept even for a stale attempt: it is still this service's
            # most recent failure.
            self._last_failure = reason
            self._last_failure_at = self._wall()
        if trial.epoch != self._epoch:
            # The breaker changed state while this attempt was in flight: its outcome says
            # nothing about the new state, and its slot (if any) belonged to an epoch whose
            # slots were all released when it ended.
            return
        slow = (
            self._slow_duration is not None
            and verdict in (_V_SUCCESS, _V_FAILURE)
            and self._clock() - trial.started > self._slow_duration
        )
        if trial.half_open:
            self._trials -= 1
            self._half_open_outcome(verdict, kind, slow)
        elif verdict is _V_SUCCESS or verdict is _V_FAILURE:
            self._closed_outcome(verdict is _V_FAILURE, kind, slow)

    def _closed_outcome(self, failed: bool, kind: Outcome | None, slow: bool) -> None:
        bucket = self._window.advance()
        totals = self._window.totals
        bucket[_CALLS] += 1
        totals[_CALLS] += 1
        if not failed and not slow:
            return  # the hot path: a success trips nothing
        if failed:
            bucket[_FAILURES] += 1
            totals[_FAILURES] += 1
            if kind in TRANSPORT_FAILURES:
                bucket[_TRANSPORT] += 1
                totals[_TRANSPORT] += 1
                self._run_transport = True
        if slow:
            bucket[_SLOW] += 1
            totals[_SLOW] += 1
        calls = totals[_CALLS]
        if calls < self._min_calls:
            return
        reason: TripReason | None = None
        if (
            failed
            and self._failure_rate is not None
            and totals[_FAILURES] >= self._failure_rate * calls - _EPSILON
        ):
            reason = _T_FAILURE_RATE
        elif (
            slow
            and self._slow_rate is not None
            and totals[_SLOW] >= self._slow_rate * calls - _EPSILON
        ):
            reason = _T_SLOW_CALL
        if reason is None:
            return
        # This attempt trips the breaker, so it is its request's last: a failed request
        # that completes the run of failed requests makes the reason "consecutive".
        if failed and self._consecutive + 1 >= self._threshold:
            reason = _T_CONSECUTIVE
        self._trip(reason)

    def _half_open_outcome(self, verdict: Verdict, kind: Outcome | None, slow: bool) -> None:
        if verdict is _V_IGNORED:
            return  # the slot is free again; the state waits for a trial that counts
        if verdict is _V_ABANDONED:
            self._cb.open()  # same period: a cancelled trial is no evidence
            return
        if verdict is _V_FAILURE or slow:
            self._period = min(self._period * 2, self._period_cap)
            self._transport_evidence = kind in TRANSPORT_FAILURES
            self._cb.open()
            return
        self._successes += 1
        if self._successes >= self.config.success_threshold:
            self._cb.close()

    def count_request(self, trial: Trial) -> None:
        if trial.half_open or trial.epoch != self._epoch:
            return  # half-open is decided by its trials; stale requests count for nothing
        verdict = trial.verdict
        if verdict is _V_SUCCESS:
            self._consecutive = 0
            self._run_transport = False
        elif verdict is _V_FAILURE:
            self._consecutive += 1
            if self._consecutive >= self._threshold:
                self._trip(_T_CONSECUTIVE)

    def _trip(self, reason: TripReason) -> None:
        """closed -> open: the only change trips_total counts."""
        self._trip_reason = reason
        self._transport_evidence = self._run_transport or self._window.totals[_TRANSPORT] > 0
        self._period = self._base_period
        self._m_trips[reason].inc()
        self._cb.open()

    def on_state_change(self, state: BreakerState) -> None:
        self._state = state
        self._epoch += 1
        self._trials = 0
        self._successes = 0
        self._since = self._wall()
        if state is _B_OPEN:
            self._open_until = self._clock() + self._period
            self._open_until_wall = self._since + self._period
        else:
            self._open_until_wall = None
        if state is _B_CLOSED:
            self._period = self._base_period
            self._trip_reason = None
            self._transport_evidence = False
            self._consecutive = 0
            self._run_transport = False
            self._window.clear()
        for watcher in self._watchers:
            watcher(state)

    # -- reading -----------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """closed, open or half_open. An open breaker whose period has ended reads open
        until the recovery task (or the next `admit()`) half-opens it, within moments."""
        return self._state

    @property
    def epoch(self) -> int:
        """How many state changes so far: equal epochs mean the same open period."""
        return self._epoch

    @property
    def last_failure(self) -> str | None:
        return self._last_failure

    @property
    def trip_reason(self) -> TripReason | None:
        """The rule that opened the breaker; kept through re-opens until it closes."""
        return self._trip_reason

    @property
    def open_period(self) -> float:
        """The current open period (while open), or the one the next re-open would start
        from (base after a close)."""
        return self._period

    @property
    def open_until(self) -> float | None:
        """UNIX timestamp at which the current open period ends; None unless open."""
        return self._open_until_wall if self.state is _B_OPEN else None

    def open_remaining(self) -> float:
        """Seconds until the current open period ends (0 when not open, or ended)."""
        if self.state is not _B_OPEN:
            return 0.0
        return max(0.0, self._open_until - self._clock())

    @property
    def transport_evidence(self) -> bool:
        """Whether the failures that (re-)opened the breaker include connect failures or
        resets, i.e. whether a TCP connect would tell that the upstream is back."""
        return self._transport_evidence

    @property
    def failure_rate(self) -> float:
        calls, failures, _, _ = self._window.read()
        return failures / calls if calls else 0.0

    @property
    def slow_call_rate(self) -> float:
        calls, _, slow, _ = self._window.read()
        return slow / calls if calls else 0.0

    @property
    def window_calls(self) -> int:
        return self._window.read()[_CALLS]

    def is_failure_status(self, status: int) -> bool:
        """Whether an upstream status counts as a failed attempt (`failure_status`)."""
        return status in self.config.failure_status

    def is_failure_grpc_status(self, status: int | None) -> bool:
        """Whether a gRPC answer's status counts as a failure (`failure_grpc_status`)."""
        return status is not None and status in self.config.failure_grpc_status

    def retry_after(self) -> float | None:
        """Seconds a call arriving now would be told to wait, or None if it would be admitted."""
        state = self.state
        if state is _B_OPEN:
            remaining = self._open_until - self._clock()
            return remaining if remaining > 0 else None
        if state is _B_HALF_OPEN and self._trials >= self.config.half_open_max_requests:
            return BUSY_RETRY_AFTER
        return None

    def snapshot(self) -> dict[str, Any]:
        """The breaker's part of /admin/state, plus counters for operators."""
        state = self.state
        calls, failures, slow, _ = self._window.read()
        retry_after = self.retry_after()
        return {
            "state": state,
            "since": self._since,
            "last_failure": self._last_failure,
            "last_failure_at": self._last_failure_at,
            "trip_reason": self._trip_reason,
            "failure_rate": failures / calls if calls else 0.0,
            "slow_call_rate": slow / calls if calls else 0.0,
            "window_calls": calls,
            "open_until": self.open_until,
            "open_period": self._period,
            "failures": self._consecutive,
            "failure_threshold": self._threshold,
            "half_open_successes": self._successes if state is _B_HALF_OPEN else 0,
            "trials_in_flight": self._trials if state is _B_HALF_OPEN else 0,
            "retry_after": None if retry_after is None else round(retry_after, 3),
        }

    def close(self) -> None:
        """Stop publishing: detach the metrics listener (the service was removed on reload).

        The breaker keeps working on its own, so attempts still in flight can resolve their
        trials, but it no longer touches the service's series, which a replacement breaker
        for the same name may now own. The failure-rate gauge's function is left alone for
        the same reason: the replacement has set its own, or `forget_service` removes it.
        """
        if self._listener in self._cb.listeners:
            self._cb.remove_listener(self._listener)
        self._watchers.clear()
