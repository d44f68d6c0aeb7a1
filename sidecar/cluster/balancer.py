"""Load balancers: choose one available endpoint of a service for the next attempt.

Every balancer skips endpoints that are not `available` (unhealthy by active checks, or
ejected by outlier detection) and prefers endpoints outside `exclude` (the ones a request
already tried), falling back to an excluded one only when nothing else is available.

`pick()` runs once per attempt, so each implementation walks the endpoint list at most
twice and allocates nothing: no filtered copies of the list, no sorting.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Protocol

from sidecar.config.model import LoadBalancerKind

if TYPE_CHECKING:
    from sidecar.endpoint import Endpoint


class Balancer(Protocol):
    """The seam between a cluster and its balancing policy."""

    def pick(self, endpoints: Sequence[Endpoint], exclude: Collection[Endpoint]) -> Endpoint | None:
        """One available endpoint, preferably not in `exclude`; None when none is available."""
        ...


class RoundRobin:
    """Each endpoint in turn; unavailable ones are skipped without giving their turn away.

    The cursor moves to just after the endpoint picked, so skipping an ejected endpoint
    does not hand its share to its neighbour: the remaining endpoints stay even.

    A retry (a pick with `exclude`) takes the next endpoint after the cursor that was not
    tried, but does not move the cursor: the rotation is over first attempts. Otherwise
    a failing endpoint followed by a retry would push the cursor past its healthy
    neighbour every time, and with two endpoints the failing one would get every first
    attempt instead of half of them.
    """

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def pick(self, endpoints: Sequence[Endpoint], exclude: Collection[Endpoint]) -> Endpoint | None:
        n = len(endpoints)
        if n == 0:
            return None
        start = self._next % n
        fallback = -1
        for step in range(n):
            i = start + step
            if i >= n:
                i -= n
            e = endpoints[i]
            if not e.available:
                continue
            if exclude:
                if e in exclude:
                    if fallback < 0:
                        fallback = i
                    continue
                return e  # a retry: the rotation stays where it is
            self._next = i + 1
            return e
        if fallback >= 0:
            return endpoints[fallback]
        return None


def _eligible_count(
    endpoints: Sequence[Endpoint], exclude: Collection[Endpoint]
) -> tuple[int, bool]:
    """How many endpoints can be picked, and whether `exclude` could be honoured."""
    count = 0
    if exclude:
        for e in endpoints:
            if e.available and e not in exclude:
                count += 1
        if count:
            return count, True
    for e in endpoints:
        if e.available:
            count += 1
    return count, False


def _nth_eligible(
    endpoints: Sequence[Endpoint], exclude: Collection[Endpoint], strict: bool, rank: int
) -> Endpoint:
    """The eligible endpoint at position `rank` among the eligible ones (0-based)."""
    for e in endpoints:
        if not e.available or (strict and e in exclude):
            continue
        if rank == 0:
            return e
        rank -= 1
    raise IndexError(rank)  # only reachable if the caller miscounted


class RandomBalancer:
    """A uniformly random available endpoint."""

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, endpoints: Sequence[Endpoint], exclude: Collection[Endpoint]) -> Endpoint | None:
        count, strict = _eligible_count(endpoints, exclude)
        if count == 0:
            return None
        return _nth_eligible(endpoints, exclude, strict, self._rng.randrange(count))


class LeastRequest:
    """Power of two choices: draw two distinct endpoints, keep the one with fewer in flight.

    This tracks the least loaded endpoint almost as well as a full scan would, without
    every sidecar herding onto the same "least loaded" endpoint at once.
    """

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, endpoints: Sequence[Endpoint], exclude: Collection[Endpoint]) -> Endpoint | None:
        count, strict = _eligible_count(endpoints, exclude)
        if count == 0:
            return None
        if count == 1:
            return _nth_eligible(endpoints, exclude, strict, 0)
        first = self._rng.randrange(count)
        second = self._rng.randrange(count - 1)
        if second >= first:
            second += 1
        a: Endpoint | None = None
        b: Endpoint | None = None
        rank = 0
        # One pass finds both draws.
        for e in endpoints:
            if not e.available or (strict and e in exclude):
                continue
            if rank == first:
                a = e
            elif rank == second:
                b = e
            rank += 1
        if a is None or b is None:  # pragma: no cover - counted above
            return a or b
        return b if b.in_flight < a.in_flight else a


def make_balancer(kind: LoadBalancerKind, rng: random.Random | None = None) -> Balancer:
    """The balancer a service's `load_balancer` setting names."""
    if kind == "round_robin":
        return RoundRobin()
    if kind == "least_request":
        return LeastRequest(rng)
    if kind == "random":
        return RandomBalancer(rng)
    raise ValueError(f"unknown load_balancer {kind!r}")
