"""Which failed outcomes are the app's doing (and so count for no breaker rule)."""

from __future__ import annotations

from sidecar.attempts import app_caused
from sidecar.config.model import Address
from sidecar.endpoint import Endpoint
from sidecar.request import Exchange
from sidecar.upstream import Attempt
from sidecar.vocab import Outcome

ENDPOINT = Endpoint(Address("127.0.0.1", 9001))
STARTED = 1000.0


def exchange(deadline: float, route_deadline: float | None) -> Exchange:
    return Exchange(
        method="GET",
        target="/x",
        headers=[],
        body=None,
        deadline=deadline,
        max_retries=2,
        route_deadline=route_deadline,
    )


def timed_out() -> Attempt:
    return Attempt(Outcome.TIMEOUT, ENDPOINT, detail="no response within 50ms")


def test_a_timeout_under_the_routes_own_deadline_counts() -> None:
    ex = exchange(deadline=STARTED + 0.05, route_deadline=None)
    assert not app_caused(ex, timed_out(), STARTED, 0.05, None, STARTED + 0.05)


def test_a_timeout_only_the_override_made_that_short_does_not() -> None:
    ex = exchange(deadline=STARTED + 0.05, route_deadline=STARTED + 5.0)
    assert app_caused(ex, timed_out(), STARTED, 0.05, None, STARTED + 0.05)


def test_the_per_try_timeout_still_counts_under_a_looser_override() -> None:
    # The override left 0.5 s, the per-try timeout cut the attempt at 0.1 s: the route's
    # own settings made it that short, so it is the upstream's timeout.
    ex = exchange(deadline=STARTED + 0.5, route_deadline=STARTED + 5.0)
    assert not app_caused(ex, timed_out(), STARTED, 0.1, 0.1, STARTED + 0.1)


def test_the_override_counts_when_it_is_below_the_per_try_timeout() -> None:
    ex = exchange(deadline=STARTED + 0.05, route_deadline=STARTED + 5.0)
    assert app_caused(ex, timed_out(), STARTED, 0.05, 0.5, STARTED + 0.05)


def test_other_failures_under_an_override_count() -> None:
    ex = exchange(deadline=STARTED + 0.05, route_deadline=STARTED + 5.0)
    for kind in (Outcome.CONNECT_ERROR, Outcome.RESET):
        attempt = Attempt(kind, ENDPOINT, detail="refused")
        assert not app_caused(ex, attempt, STARTED, 0.05, None, STARTED + 0.01)
