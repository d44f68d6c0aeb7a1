"""The attempt loop (`sidecar.attempts`), unit-tested against a scripted upstream client.

Each test scripts what every attempt meets (tests/support/fake_upstream.py) and reads back
what the loop sent and decided: retries, the budget, the breaker, the deadline, settling.
The loop runs on a fake clock with a fake sleep, so the arithmetic is exact; no socket is
opened and nothing waits for real time. The real policy pieces (RetryPolicy, RetryBudget,
ServiceBreaker, Cluster) are used as they are, on the same fake clock.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from itertools import pairwise
from typing import Any

import pytest
from support import current_state
from support.fake_upstream import (
    AppBody,
    Break,
    ConnectTimesOut,
    FakeClock,
    FakeSleep,
    Gate,
    Hang,
    LoopRoute,
    Refuse,
    Respond,
    ScriptedClient,
    exchange,
    loop_route,
)

from sidecar.attempts import forward, settle
from sidecar.config.model import (
    BackoffConfig,
    BudgetConfig,
    CircuitBreakerConfig,
    FailureRateConfig,
    OutlierDetectionConfig,
    RetryConfig,
)
from sidecar.request import Exchange, StreamedBody
from sidecar.tasks import TaskOwner
from sidecar.upstream.base import UpstreamBroken
from sidecar.vocab import BreakerState, Outcome, Reason, TimeoutKind, TripReason

EP1, EP2, EP3 = "127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"
# A breaker that never opens, for tests about retries and the budget alone.
QUIET = CircuitBreakerConfig(failure_threshold=1_000_000, failure_rate=None)
# Outlier detection that counts failures but never ejects (an ejection starts a timer).
COUNTING = OutlierDetectionConfig(consecutive_failures=1_000_000)
RESERVE = 25.0  # the throttle's reserve at min_per_second 10: 10 x 10 s / 4


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sleep(clock: FakeClock) -> FakeSleep:
    return FakeSleep(clock)


@pytest.fixture
def client(clock: FakeClock) -> ScriptedClient:
    return ScriptedClient(clock)


MakeRoute = Callable[..., LoopRoute]


@pytest.fixture
async def make_route(client: ScriptedClient) -> AsyncIterator[MakeRoute]:
    made: list[LoopRoute] = []

    def make(**kwargs: Any) -> LoopRoute:
        route = loop_route(client, **kwargs)
        made.append(route)
        return route

    yield make
    for route in made:
        await route.close()


@pytest.fixture
def seeded() -> Iterator[int]:
    """The loop's back-off draws from the `random` module: seed it, and restore it after."""
    state = random.getstate()
    random.seed(20_26)
    yield 20_26
    random.setstate(state)


Run = Callable[..., Coroutine[Any, Any, Exchange]]


@pytest.fixture
def run(clock: FakeClock, sleep: FakeSleep) -> Run:
    """`run(route, **exchange_kwargs)`: one request through the loop, on the fake clock."""

    async def go(route: LoopRoute, ex: Exchange | None = None, **kwargs: Any) -> Exchange:
        ex = ex if ex is not None else exchange(clock, route, **kwargs)
        return await forward(ex, route, sleep=sleep, clock=clock.monotonic)

    return go


def retries(**kwargs: Any) -> RetryConfig:
    """A RetryConfig; `retry_on` may be given as any iterable."""
    if "retry_on" in kwargs:
        kwargs["retry_on"] = frozenset(kwargs["retry_on"])
    return RetryConfig(**kwargs)


def done(route: LoopRoute, ex: Exchange, *, broken: bool = False) -> None:
    """What the proxy does after relaying an answer: settle it, then release it."""
    settle(ex, route, broken=broken)
    if ex.last is not None:
        ex.last.release()


# -- what is retried -------------------------------------------------------------------------

CONDITIONS = [
    ("connect-failure", Refuse(), Outcome.CONNECT_ERROR),
    ("reset", Break(), Outcome.RESET),
    ("per-try-timeout", Hang(), Outcome.TIMEOUT),
    (503, Respond(503), Outcome.RESPONSE),
]
ALL_CONDITIONS = frozenset(c for c, _, _ in CONDITIONS)


@pytest.mark.parametrize(("condition", "answer", "kind"), CONDITIONS)
async def test_an_outcome_is_retried_when_retry_on_lists_it(
    make_route: MakeRoute, client: ScriptedClient, run: Run, condition, answer, kind
) -> None:
    route = make_route(retries=retries(retry_on={condition}, per_try_timeout=0.5))
    client.script(answer, Respond(200))
    ex = await run(route)
    assert [s.attempt for s in client.sent] == [1, 2]
    assert (ex.attempts, ex.retries, route.retries) == (2, 1, 1)
    assert ex.last is not None and ex.last.status == 200


@pytest.mark.parametrize(("condition", "answer", "kind"), CONDITIONS)
async def test_an_outcome_is_not_retried_when_retry_on_leaves_it_out(
    make_route: MakeRoute, client: ScriptedClient, run: Run, condition, answer, kind
) -> None:
    route = make_route(retries=retries(retry_on=ALL_CONDITIONS - {condition}, per_try_timeout=0.5))
    client.script(answer)  # a second attempt would be an unscripted call
    ex = await run(route)
    assert (ex.attempts, ex.retries, route.retries) == (1, 0, 0)
    assert ex.last is not None and ex.last.kind is kind


async def test_a_status_outside_retry_on_is_the_answer(
    make_route: MakeRoute, client: ScriptedClient, run: Run
) -> None:
    route = make_route()  # the default retry_on has 502, 503, 504, not 500
    client.script(Respond(500, body=b"boom"))
    ex = await run(route)
    assert ex.attempts == 1
    assert ex.last is not None and ex.last.status == 500
    assert ex.unsettled is ex.last  # passed through, for the proxy to relay
    # 500 is a failure_status: judged at once, so it counts before the relay.
    assert route.service.breaker.failure_rate == 1.0


async def test_a_listed_status_the_breaker_counts_as_a_success_is_retried_as_one(
    make_route: MakeRoute, client: ScriptedClient, run: Run
) -> None:
    route = make_route(retries=retries(retry_on={429, 503}), outlier_detection=COUNTING)
    client.script(Respond(429), Respond(200))
    ex = await run(route)
    assert ex.attempts == 2 and route.retries == 1
    done(route, ex)
    service, breaker = route.service, route.service.breaker
    assert service.attempts == {(EP1, "4xx"): 1, (EP1, "2xx"): 1}
    assert (breaker.window_calls, breaker.failure_rate) == (2, 0.0)  # 429 is no failure
    assert [r.releases for r in client.responses] == [1, 1]


async def test_a_listed_success_status_left_when_retries_run_out_is_settled_as_the_answer(
    make_route: MakeRoute, client: ScriptedClient, run: Run
) -> None:
    route = make_route(retries=retries(retry_on={429}, max_retries=1))
    client.script(Respond(429), Respond(429, chunks=[b"a", b"b"], breaks_after=1))
    ex = await run(route)
    assert ex.attempts == 2 and ex.unsettled is ex.last
    assert ex.last is not None and ex.last.trial is not None and not ex.last.trial.resolved
    done(route, ex, broken=True)  # its body broke while it was relayed: a reset
    assert route.service.attempts == {(EP1, "4xx"): 1, (EP1, "reset"): 1}
    assert route.service.breaker.failure_rate == 0.5


# -- methods ---------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", [Break(), Hang(), Respond(503)], ids=["reset", "timeout", "503"])
@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_post_and_patch_are_not_retried_once_the_upstream_may_have_acted(
    make_route: MakeRoute, client: ScriptedClient, run: Run, method: str, answer
) -> None:
    route = make_route(retries=retries(per_try_timeout=0.5))
    client.script(answer)
    ex = await run(route, method=method, body=b'{"n": 1}')
    assert (ex.attempts, route.retries) == (1, 0)


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_post_and_patch_are_retried_after_a_connect_failure_with_the_same_body(
    make_route: MakeRoute, client: ScriptedClient, run: Run, method: str
) -> None:
    route = make_route(endpoints=(EP1, EP2))
    client.script(Refuse(), Respond(201))
    ex = await run(route, method=method, body=b'{"n": 1}')
    assert ex.attempts == 2
    assert [(s.method, s.body) for s in client.sent] == [(method, b'{"n": 1}')] * 2


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_non_idempotent_retries_post_and_patch_like_get(
    make_route: MakeRoute, client: ScriptedClient, run: Run, method: str
) -> None:
    route = make_route(retries=retries(non_idempotent=True))
    client.script(Respond(503), Respond(200))
    ex = await run(route, method=method, body=b"x")
    assert ex.attempts == 2
    assert [s.body for s in client.sent] == [b"x", b"x"]


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"])
async def test_idempotent_methods_are_retried_on_anything_in_retry_on(
    make_route: MakeRoute, client: ScriptedClient, run: Run, method: str
) -> None:
    route = make_route()
    client.script(Respond(503), Respond(200))
    assert (await run(route, method=method)).attempts == 2


# -- how many, and numbered ------------------------------------------------------------------


async def test_max_retries_bounds_the_attempts_and_each_attempt_is_numbered(
    make_route: MakeRoute, client: ScriptedClient, run: Run
) -> None:
    route = make_route(retries=retries(max_retries=3), breaker=QUIET)
    client.default = Respond(503)
    ex = await run(route, timeout=10.0)
    assert [s.attempt for s in client.sent] == [1, 2, 3, 4]
    assert (ex.attempts, ex.retries, route.retries) == (4, 3, 3)
    assert ex.last is not None and ex.last.status == 503
    assert ex.unsettled is ex.last  # retries spent: the upstream's answer goes to the app
    service = route.service
    assert service.attempts == {(EP1, "5xx"): 3}  # the relayed one counts when settled
    done(route, ex)
    assert service.attempts == {(EP1, "5xx"): 4}


async def test_a_lower_max_retries_for_the_request_is_honoured(
    make_route: MakeRoute, client: ScriptedClient, run: Run
) -> None:
    route = make_route(retries=retries(max_retries=3))
    client.default = Respond(503)
    assert (await run(route, max_retries=1)).attempts == 2
    assert (await run(route, max_retries=0)).attempts == 1


async def test_every_response_that_is_not_the_answer_is_released_exactly_once(
    make_route: MakeRoute, client: ScriptedClient, run: Run
) -> None:
    route = make_route()
    client.script(Respond(503), Respond(502), Respond(200))
    ex = await run(route)
    assert [r.releases for r in client.responses] == [1, 1, 0]  # the answer: the proxy's
    done(route, ex)
    assert [r.releases for r in client.responses] == [1, 1, 1]


# -- back-off and Retry-After ----------------------------------------------------------------


async def test_back_off_is_full_jitter_under_a_doubling_ceiling(
    make_route: MakeRoute, client: ScriptedClient, run: Run, sleep: FakeSleep, seeded: int
) -> None:
    backoff = BackoffConfig(base=0.1, max=0.3)
    route = make_route(retries=retries(max_retries=4, backoff=backoff), breaker=QUIET)
    client.default = Respond(503)
    await run(route, timeout=10.0)
    ceilings = [0.1, 0.2, 0.3, 0.3]
    draws = random.Random(seeded)
    assert sleep.calls == [draws.random() * ceiling for ceiling in ceilings]
    assert all(0 <= d < c for d, c in zip(sleep.calls, ceilings, strict=True))
    # Each retry went out once its pause was over (on the fake clock), not before.
    gaps = [b.at - a.at for a, b in pairwise(client.sent)]
    assert gaps == pytest.approx(sleep.calls, abs=1e-9)


async def test_retry_after_is_honoured_when_it_fits(
    make_route: MakeRoute, client: ScriptedClient, run: Run, sleep: FakeSleep
) -> None:
    route = make_route()
    client.script(Respond(503, headers={"Retry-After": "1"}), Respond(200))
    ex = await run(route, timeout=2.0)
    assert ex.attempts == 2
    assert sleep.calls == [1.0]  # longer than any back-off of the default 25 ms base
    assert client.sent[1].at - client.sent[0].at == 1.0


async def test_a_retry_after_beyond_the_deadline_makes_the_503_the_answer(
    make_route: MakeRoute, client: ScriptedClient, run: Run, sleep: FakeSleep
) -> None:
    route = make_route()
    client.script(Respond(503, headers={"Retry-After": "5"}))
    ex = await run(route, timeout=2.0)
    assert ex.attempts == 1 and sleep.calls == []
    assert ex.last is not None and ex.last.status == 503 and ex.unsettled is ex.last
    assert route.retries == 0
    # The budget is asked last: a retry that could not happen spent nothing of it.
    assert route.budget.retries_in_window == 0 and route.budget_exhausted == 0


async def test_retry_after_is_read_on_429_and_503_only(
    make_route: MakeRoute, client: ScriptedClient, run: Run, sleep: FakeSleep
) -> None:
    route = make_route(retries=retries(retry_on={502, 429}))
    client.script(Respond(502, headers={"Retry-After": "1"}), Respond(200))
    await run(route)
    assert len(sleep.calls) == 1 and sleep.calls[0] < 0.025  # the back-off alone
    client.script(Respond(429, headers={"Retry-After": "1"}), Respond(200))
    await run(route)
    assert sleep.calls[1] == 1.0


# -- the deadline ----------------------------------------------------------------------------


async def test_no_attempt_starts_without_time_left(
    make_route: MakeRoute, client: ScriptedClient, run: Run, clock: FakeClock
) -> None:
    route = make_route()
    ex = exchange(clock, route, timeout=0.5)
    clock.advance(0.5)  # e.g. an injected fault delay, or a slow request body, used it up
    ex = await run(route, ex)
    assert ex.attempts == 0 and client.sent == []
    assert ex.last is None and ex.refused is None  # the proxy answers 504 timeout


async def test_each_attempt_gets_the_smaller_of_per_try_timeout_and_the_time_left(
    make_route: MakeRoute, client: ScriptedClient, run: Run, clock: FakeClock
) -> None:
    route = make_route(retries=retries(max_retries=5, per_try_timeout=0.5), breaker=QUIET)
    client.default = Hang()
    ex = await run(route, timeout=1.25)
    # 0.5 + 0.5 + what is left after two back-offs (< 25 + 50 ms); then nothing is left,
    # although three retries are.
    assert len(client.sent) == 3 and ex.retries == 2
    for sent in client.sent:
        expected = min(0.5, ex.deadline - sent.at)
        assert sent.timeout == pytest.approx(expected, abs=1e-9)
        assert sent.header("x-sidecar-timeout-ms") == str(max(1, math.floor(expected * 1000)))
    assert client.sent[-1].deadline == ex.deadline
    assert clock.now == ex.deadline
    assert route.timeouts == {TimeoutKind.PER_TRY: 2, TimeoutKind.ROUTE: 1}
    assert ex.last is not None and ex.last.kind is Outcome.TIMEOUT


async def test_without_per_try_timeout_an_attempt_may_use_the_whole_route_timeout(
    make_route: MakeRoute, client: ScriptedClient, run: Run
) -> None:
    route = make_route()
    client.script(Hang())
    ex = await run(route, timeout=1.0)
    assert ex.attempts == 1  # timed out at the route deadline: no time for a retry
    assert client.sent[0].timeout == 1.0
    assert client.sent[0].header("x-sidecar-timeout-ms") == "1000"
    assert route.timeouts == {TimeoutKind.ROUTE: 1}


async def test_a_connect_timeout_takes_connect_timeout_and_is_a_connect_failure(
    make_route: MakeRoute, client: ScriptedClient, run: Run, clock: FakeClock, sleep: FakeSleep
) -> None:
    route = make_route(connect_timeout=0.25)
    client.script(ConnectTimesOut(), Respond(200))
    start = clock.now
    ex = await run(route)
    assert client.sent[0].connect_timeout == 0.25
    assert client.sent[1].at - start == pytest.approx(0.25 + sleep.calls[0], abs=1e-9)
    assert route.service.attempts[(EP1, "connect_error")] == 1
    assert ex.attempts == 2


# -- the budget ------------------------------------------------------------------------------


async def test_budget_refusals_are_counted_and_the_last_answer_stands(
    make_route: MakeRoute, client: ScriptedClient, run: Run
) -> None:
    # ratio 0.5 and no floor: the n-th request may retry once n / 2 covers its retry.
    budget = BudgetConfig(ratio=0.5, min_per_second=0)
    route = make_route(retries=retries(max_retries=1, budget=budget), breaker=QUIET)
    client.default = Respond(503)
    made = []
    for _ in range(6):
        ex = await run(route)
        made.append(ex.attempts)
        assert ex.last is not None and ex.last.status == 503
        done(route, ex)
    assert made == [1, 2, 1, 2, 1, 2]
    assert (route.retries, route.budget_exhausted) == (3, 3)


async def test_the_throttle_holds_an_outage_within_the_contract_bound(
    make_route: MakeRoute, client: ScriptedClient, run: Run, clock: FakeClock, seeded: int
) -> None:
    # Every attempt fails, 100 requests a second for 2 s, max_retries 2, default budget.
    route = make_route(retries=retries(max_retries=2), breaker=QUIET)
    client.default = Respond(503)
    requests = 200
    made: list[int] = []
    for _ in range(requests):
        ex = await run(route)
        made.append(ex.attempts)
        done(route, ex)
        clock.advance(0.01)
    attempts = len(client.sent)
    assert attempts == requests + route.retries
    # Attempts that reached an upstream <= 1.25 x requests + min_per_second x 10.
    assert attempts <= 1.25 * requests + 10 * 10
    # The throttle, not the ceiling (0.3 x 200 + 100 = 160 retries), is what held it:
    # the reserve of 25 plus the refill of 10 a second over about 2 s.
    assert route.retries <= RESERVE + 10 * (clock.now - 1000.0) + 1
    assert route.retries < 0.3 * requests + 10 * 10
    # Each request ended with its retries spent, or with a refusal.
    assert route.budget_exhausted == requests - made.count(3)


async def test_retries_after_connect_failures_are_free_of_the_budget(
    make_route: MakeRoute, client: ScriptedClient, run: Run
) -> None:
    nothing = BudgetConfig(ratio=0, min_per_second=0)  # refuses every retry it is asked for
    route = make_route(endpoints=(EP1, EP2, EP3), retries=retries(budget=nothing))
    client.script(Refuse(), Refuse(), Respond(200))
    ex = await run(route)
    assert (ex.attempts, route.retries, route.budget_exhausted) == (3, 2, 0)
    assert route.budget.retries_in_window == 0
    # The same budget refuses the retry of an attempt that reached the upstream.
    client.script(Respond(503))
    ex = await run(route)
    assert (ex.attempts, route.budget_exhausted) == (1, 1)


async def test_connect_failures_do_not_drain_the_throttle(
    make_route: MakeRoute, client: ScriptedClient, run: Run
) -> None:
    route = make_route(retries=retries(max_retries=2), breaker=QUIET)
    client.default = Refuse()
    for _ in range(30):
        await run(route)
    assert route.retries == 60 and route.budget_exhausted == 0
    assert route.budget.tokens == RESERVE
    client.default = Respond(503)
    done(route, await run(route))
    assert route.budget.tokens < RESERVE  # failures that reached it do take tokens


# -- the breaker -----------------------------------------------------------------------------


async def test_the_attempt_that_opens_the_breaker_is_the_answer_and_stops_the_retries(
    make_route: MakeRoute, client: ScriptedClient, run: Run, clock: FakeClock
) -> None:
    rate = FailureRateConfig(threshold=0.5, window=10.0, min_calls=2)
    breaker_config = CircuitBreakerConfig(failure_rate=rate, reset_timeout=5.0)
    route = make_route(retries=retries(max_retries=5), breaker=breaker_config)
    client.default = Respond(503)
    ex = await run(route)
    breaker = route.service.breaker
    assert ex.attempts == 2  # the second failed attempt crossed the rate: no third
    assert current_state(breaker) is BreakerState.OPEN
    assert breaker.trip_reason is TripReason.FAILURE_RATE
    assert ex.last is not None and ex.last.status == 503 and ex.refused is None
    done(route, ex)
    # Later requests are refused at once, with the time left of the open period.
    ex = await run(route)
    assert (ex.attempts, ex.refused) == (0, Reason.CIRCUIT_OPEN)
    assert ex.retry_after == pytest.approx(5.0)
    clock.advance(2.0)
    assert (await run(route)).retry_after == pytest.approx(3.0)
    assert len(client.sent) == 2


async def test_the_consecutive_rule_counts_requests_not_attempts(
    make_route: MakeRoute, client: ScriptedClient, run: Run
) -> None:
    config = CircuitBreakerConfig(failure_threshold=2, failure_rate=None)
    route = make_route(retries=retries(max_retries=2), breaker=config)
    breaker = route.service.breaker
    for _ in range(5):  # two failed attempts, then a success: the request succeeded
        client.script(Respond(503), Respond(503), Respond(200))
        done(route, await run(route))
        assert breaker.snapshot()["failures"] == 0
    assert current_state(breaker) is BreakerState.CLOSED
    client.default = Respond(503)
    done(route, await run(route))
    assert current_state(breaker) is BreakerState.CLOSED and breaker.snapshot()["failures"] == 1
    done(route, await run(route))
    assert current_state(breaker) is BreakerState.OPEN
    assert breaker.trip_reason is TripReason.CONSECUTIVE


async def open_breaker(route: LoopRoute, client: ScriptedClient, run: Run) -> None:
    """One request failing once; with failure_threshold 1 it opens the breaker."""
    client.script(Respond(503))
    done(route, await run(route, max_retries=0))
    assert current_state(route.service.breaker) is BreakerState.OPEN


TRIAL = CircuitBreakerConfig(
    failure_threshold=1, failure_rate=None, reset_timeout=5.0, half_open_max_requests=1
)


async def test_half_open_admits_one_trial_at_a_time_and_refuses_the_rest(
    make_route: MakeRoute, client: ScriptedClient, run: Run, clock: FakeClock
) -> None:
    route = make_route(breaker=TRIAL)
    breaker = route.service.breaker
    await open_breaker(route, client, run)
    clock.advance(5.0)
    gate = Gate(Respond(200))
    client.script(gate)
    owner = TaskOwner("test")
    try:
        trial = owner.spawn(run(route), "trial")
        await gate.wait_reached()
        assert current_state(breaker) is BreakerState.HALF_OPEN
        other = await run(route)  # while the trial is in flight
        assert (other.attempts, other.refused, other.retry_after) == (0, Reason.CIRCUIT_OPEN, 1.0)
        gate.open()
        ex = await trial
    finally:
        await owner.close()
    assert ex.last is not None and ex.last.status == 200
    # A success is judged when it is settled (its body could still break): the slot is
    # held until then.
    assert current_state(breaker) is BreakerState.HALF_OPEN
    assert breaker.snapshot()["trials_in_flight"] == 1
    done(route, ex)
    assert current_state(breaker) is BreakerState.CLOSED
    assert len(client.sent) == 2


async def test_a_failed_trial_reopens_the_breaker_and_is_not_retried(
    make_route: MakeRoute, client: ScriptedClient, run: Run, clock: FakeClock
) -> None:
    route = make_route(retries=retries(max_retries=3), breaker=TRIAL)
    breaker = route.service.breaker
    await open_breaker(route, client, run)
    clock.advance(5.0)
    client.script(Refuse())  # a connect failure would be retried, but not into an open breaker
    ex = await run(route)
    assert ex.attempts == 1 and route.retries == 0
    assert current_state(breaker) is BreakerState.OPEN
    assert breaker.open_period == 10.0  # a failed trial doubles the period


# -- endpoints -------------------------------------------------------------------------------


async def test_each_endpoint_is_tried_once_while_others_are_left(
    make_route: MakeRoute, client: ScriptedClient, run: Run
) -> None:
    route = make_route(endpoints=(EP1, EP2, EP3), retries=retries(max_retries=4), breaker=QUIET)
    client.default = Refuse()
    ex = await run(route)
    assert ex.attempts == 5
    assert sorted(client.endpoints[:3]) == [EP1, EP2, EP3]  # then they come round again
    assert all(route.service.endpoint(e).in_flight == 0 for e in (EP1, EP2, EP3))


async def test_a_retry_goes_to_an_endpoint_not_yet_tried(
    make_route: MakeRoute, client: ScriptedClient, run: Run
) -> None:
    route = make_route(endpoints=(EP1, EP2))
    client.script_for(EP1, Respond(503))
    client.script_for(EP2, Respond(200))
    ex = await run(route)
    assert client.endpoints == [EP1, EP2]
    assert ex.last is not None and ex.last.status == 200


# -- settling the relayed answer -------------------------------------------------------------


async def test_the_relayed_answer_counts_once_it_is_settled(
    make_route: MakeRoute, client: ScriptedClient, run: Run
) -> None:
    route = make_route(outlier_detection=COUNTING)
    client.script(Respond(200, chunks=[b"a", b"b"]))
    ex = await run(route)
    service, breaker = route.service, route.service.breaker
    assert ex.unsettled is ex.last
    assert ex.last is not None and ex.last.trial is not None and not ex.last.trial.resolved
    assert service.attempts == {} and breaker.window_calls == 0
    response = ex.last.response
    assert response is not None
    assert [chunk async for chunk in response.iter_chunks()] == [b"a", b"b"]
    done(route, ex)
    assert ex.unsettled is None
    assert service.attempts == {(EP1, "2xx"): 1}
    assert (breaker.window_calls, breaker.failure_rate) == (1, 0.0)


async def test_a_body_that_breaks_after_the_head_counts_as_a_reset(
    make_route: MakeRoute, client: ScriptedClient, run: Run
) -> None:
    route = make_route(outlier_detection=COUNTING)
    client.script(Respond(200, chunks=[b"a", b"b", b"c"], breaks_after=1))
    ex = await run(route)
    assert ex.last is not None and ex.last.response is not None
    relayed = []
    with pytest.raises(UpstreamBroken):
        async for chunk in ex.last.response.iter_chunks():
            relayed.append(chunk)
    assert relayed == [b"a"]
    done(route, ex, broken=True)
    service, breaker = route.service, route.service.breaker
    assert service.attempts == {(EP1, "reset"): 1}
    assert breaker.failure_rate == 1.0
    assert breaker.snapshot()["failures"] == 1  # the request failed
    assert "response body broke" in (breaker.last_failure or "")
    assert service.endpoint(EP1).ejection.failures == 1  # outlier detection heard it
    assert route.budget.tokens == RESERVE - 1  # and the budget's throttle
    settle(ex, route, broken=True)  # settling twice changes nothing
    assert service.attempts == {(EP1, "reset"): 1}
    assert breaker.snapshot()["failures"] == 1


# -- cancellation ----------------------------------------------------------------------------


async def cancel_at(gate: Gate, work: Coroutine[Any, Any, Exchange]) -> None:
    """Run `work` until its attempt is held at `gate`, then cancel it."""
    owner = TaskOwner("test")
    try:
        task = owner.spawn(work, "request")
        await gate.wait_reached()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
    finally:
        await owner.close()


async def test_a_cancelled_attempt_is_abandoned_and_counted_nowhere(
    make_route: MakeRoute, client: ScriptedClient, run: Run
) -> None:
    route = make_route(outlier_detection=COUNTING)
    service, breaker = route.service, route.service.breaker
    gate = Gate()
    client.script(gate)
    await cancel_at(gate, run(route))
    assert service.endpoint(EP1).in_flight == 0
    assert service.attempts == {}
    assert (breaker.window_calls, breaker.snapshot()["failures"]) == (0, 0)
    assert current_state(breaker) is BreakerState.CLOSED
    assert service.endpoint(EP1).ejection.failures == 0
    assert route.budget.tokens == RESERVE and route.retries == 0
    client.script(Respond(200))  # and the next request is served as usual
    done(route, await run(route))
    assert service.attempts == {(EP1, "2xx"): 1}


async def test_a_cancelled_trial_reopens_the_breaker_for_the_same_period(
    make_route: MakeRoute, client: ScriptedClient, run: Run, clock: FakeClock
) -> None:
    route = make_route(breaker=TRIAL)
    breaker = route.service.breaker
    await open_breaker(route, client, run)
    clock.advance(5.0)
    gate = Gate()
    client.script(gate)
    await cancel_at(gate, run(route))
    assert current_state(breaker) is BreakerState.OPEN
    assert breaker.open_period == 5.0  # not doubled: a cancelled trial is no evidence
    assert breaker.snapshot()["trials_in_flight"] == 0
    assert route.service.attempts == {(EP1, "5xx"): 1}  # the opening request's only


# -- the app's own doing ---------------------------------------------------------------------


async def test_a_timeout_only_the_apps_override_made_that_short_counts_for_nothing(
    make_route: MakeRoute, client: ScriptedClient, run: Run
) -> None:
    route = make_route(outlier_detection=COUNTING)
    client.script(Hang())
    ex = await run(route, timeout=0.25, route_timeout=2.0)  # x-sidecar-timeout-ms: 250
    breaker = route.service.breaker
    assert ex.last is not None and ex.last.kind is Outcome.TIMEOUT
    assert (breaker.window_calls, breaker.snapshot()["failures"]) == (0, 0)
    assert route.service.endpoint(EP1).ejection.failures == 0
    assert route.budget.tokens == RESERVE
    # It still counts as an attempt and as a timeout.
    assert route.service.attempts == {(EP1, "timeout"): 1}
    assert route.timeouts == {TimeoutKind.ROUTE: 1}


# -- request bodies --------------------------------------------------------------------------


@pytest.mark.parametrize("first", [Refuse(), Break(sent=False)], ids=["refused", "unsent"])
async def test_a_streamed_body_none_of_which_left_is_sent_again_whole(
    make_route: MakeRoute, client: ScriptedClient, run: Run, first
) -> None:
    route = make_route()
    client.script(first, Respond(200))
    body = StreamedBody(AppBody(b"abc", b"def"))  # the app's side: read_chunk
    ex = await run(route, method="PUT", body=body)
    assert ex.attempts == 2
    assert [s.body for s in client.sent] == [b"", b"abcdef"]


async def test_a_streamed_body_that_started_is_never_sent_twice(
    make_route: MakeRoute, client: ScriptedClient, run: Run
) -> None:
    route = make_route()
    client.script(Break(sent=True))  # reset is in retry_on; the body cannot be replayed
    body = StreamedBody(AppBody(b"abc", b"def"))
    ex = await run(route, method="PUT", body=body)
    assert ex.attempts == 1 and client.sent[0].body == b"abcdef"
    assert ex.last is not None and ex.last.kind is Outcome.RESET


# -- gRPC ------------------------------------------------------------------------------------

UNAVAILABLE = Respond(200, headers={"content-type": "application/grpc", "grpc-status": "14"})


async def test_a_grpc_attempt_carries_its_own_timeout_as_grpc_timeout(
    make_route: MakeRoute, client: ScriptedClient, run: Run
) -> None:
    route = make_route(retries=retries(per_try_timeout=0.5))
    client.script(Respond(200))
    await run(route, method="POST", grpc=True, timeout=2.0)
    assert client.sent[0].header("grpc-timeout") == "500m"


@pytest.mark.parametrize(("non_idempotent", "attempts"), [(False, 1), (True, 2)])
async def test_a_grpc_status_is_retried_only_when_listed_and_non_idempotent(
    make_route: MakeRoute, client: ScriptedClient, run: Run, non_idempotent: bool, attempts: int
) -> None:
    # gRPC calls are POSTs: the method rule applies to them as to any other POST.
    config = retries(retry_on_grpc=frozenset({14}), non_idempotent=non_idempotent)
    route = make_route(retries=config)
    client.script(UNAVAILABLE, Respond(200))
    ex = await run(route, method="POST", grpc=True)
    assert ex.attempts == attempts


async def test_a_listed_grpc_status_that_is_no_failure_is_retried_too(
    make_route: MakeRoute, client: ScriptedClient, run: Run
) -> None:
    # RESOURCE_EXHAUSTED (8) is not in the default failure_grpc_status [2, 4, 13, 14].
    route = make_route(retries=retries(retry_on_grpc=frozenset({8}), non_idempotent=True))
    exhausted = Respond(200, headers={"content-type": "application/grpc", "grpc-status": "8"})
    client.script(exhausted, Respond(200))
    ex = await run(route, method="POST", grpc=True)
    assert ex.attempts == 2
    done(route, ex)
    assert route.service.breaker.failure_rate == 0.0


async def test_a_connect_failure_is_retried_on_another_endpoint_without_a_pause(
    make_route: MakeRoute, client: ScriptedClient, run: Run, sleep: FakeSleep, seeded: int
) -> None:
    # The request never left: pausing would protect no one and only make the app wait.
    route = make_route(endpoints=(EP1, EP2), breaker=QUIET)
    client.script(Refuse(), Respond(200))
    ex = await run(route)
    assert ex.attempts == 2 and sleep.calls == []
    assert [s.endpoint for s in client.sent] == [EP1, EP2]


async def test_a_connect_failure_with_no_other_endpoint_backs_off(
    make_route: MakeRoute, client: ScriptedClient, run: Run, sleep: FakeSleep, seeded: int
) -> None:
    route = make_route(endpoints=(EP1,), breaker=QUIET)
    client.script(Refuse(), Respond(200))
    ex = await run(route)
    assert ex.attempts == 2
    (pause,) = sleep.calls
    assert 0 <= pause < 0.025  # the first retry's full-jitter ceiling, the default base
