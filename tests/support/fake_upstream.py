"""A scripted upstream client, a fake clock and a fake sleep: the attempt loop without sockets.

`sidecar.upstream.base.UpstreamClient` is the seam between the attempt loop
(`sidecar.attempts.forward`) and the wire. `ScriptedClient` implements it with answers
scripted per call, so a unit test says exactly what each attempt meets and reads back
exactly what each attempt sent. Nothing here opens a socket or waits for real time:

    FakeClock       monotonic and wall time that move only when something moves them
    FakeSleep       `asyncio.sleep` for the loop's back-off: records each delay, moves the
                    clock by it, returns at once
    ScriptedClient  answers each call with the next scripted `Answer` (per endpoint first,
                    then the shared queue, then `default`), records every request (`Sent`)
                    and every response it handed out (`FakeResponse`)
    LoopService, LoopRoute
                    the small runtimes the loop reads (`attempts.ServiceRuntimeLike`,
                    `RouteRuntimeLike`): a real static `Cluster`, a real `ServiceBreaker`
                    and `RetryBudget` on the fake clock, the real `RetryPolicy`, and plain
                    counters where the real runtimes touch Prometheus
    AppBody         an app's request body arriving in chunks (for `StreamedBody`)

The answers (what one attempt meets):

    Respond(status, headers, body, trailers, chunks=, breaks_after=, took=)
                    a response head after `took` seconds; its body in `chunks`, breaking
                    (UpstreamBroken) after `breaks_after` of them when that is set
    Refuse()        ConnectFailed: nothing of the request left
    ConnectTimesOut()
                    ConnectTimeout after `connect_timeout` (TimeoutError if the attempt's
                    deadline comes first)
    Break(sent=)    UpstreamBroken after connecting; `sent` says whether any of the request
                    was handed over (a streamed body is read only when it was)
    Hang()          no head: the clock moves to the attempt's deadline, then TimeoutError,
                    as a real client's deadline timer would fire
    Gate(then)      waits until the test opens it (`open()`), then plays `then`; a gate
                    never opened holds the attempt until it is cancelled

The loop must be run with `clock=FakeClock.monotonic` and `sleep=FakeSleep`, the same
clock the breaker and the budget were built on (`loop_route` does that); the client's
`deadline` argument is then on the fake clock too.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.cluster import Cluster
from sidecar.config.model import (
    Address,
    CircuitBreakerConfig,
    OutlierDetectionConfig,
    RetryConfig,
    ServiceConfig,
    StaticDiscovery,
)
from sidecar.endpoint import Endpoint
from sidecar.metrics import Metrics
from sidecar.request import Exchange, StreamedBody
from sidecar.resilience.breaker import ServiceBreaker
from sidecar.resilience.budget import RetryBudget
from sidecar.resilience.retry import RetryPolicy
from sidecar.upstream.base import (
    Body,
    ConnectFailed,
    ConnectTimeout,
    UpstreamBroken,
    UpstreamClient,
    UpstreamRequest,
)
from sidecar.vocab import TimeoutKind

# Where fake time starts. Large enough that differences of nearby times are exact floats
# (Sterbenz), so `now + (deadline - now) == deadline` holds exactly.
START = 1000.0
WALL_OFFSET = 1_700_000_000.0

Fields = Mapping[str, str] | Sequence[tuple[str, str]]

# -- time ------------------------------------------------------------------------------------


class FakeClock:
    """Monotonic time (`monotonic`) and wall time (`wall` = monotonic + an offset) that
    move only by `advance` (called by the test, by `FakeSleep` and by scripted answers
    that take time). Never backwards."""

    def __init__(self, start: float = START) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + WALL_OFFSET

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"time does not go back: advance({seconds})")
        self.now += seconds

    def advance_to(self, when: float) -> None:
        """Move to `when`, if that is later than now."""
        self.now = max(self.now, when)


class FakeSleep:
    """The attempt loop's `sleep`: records each delay (`calls`), moves the clock by it and
    returns without yielding to anything."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.calls.append(delay)
        self.clock.advance(delay)


# -- what an attempt meets -------------------------------------------------------------------


@dataclass(frozen=True)
class Respond:
    """A response head (after `took` seconds), then its body and trailers.

    The body is `chunks` if given (then with no Content-Length, as if chunked), else `body`
    in one piece. With `breaks_after` set, reading the body raises `UpstreamBroken` after
    that many chunks: a body that breaks after its head was relayed. A head that would
    come later than the attempt's deadline is a `Hang` instead.
    """

    status: int = 200
    headers: Fields = ()
    body: bytes = b""
    trailers: Fields | None = None
    chunks: Sequence[bytes] | None = None
    breaks_after: int | None = None
    took: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class Refuse:
    """ConnectFailed: the connection was refused; nothing of the request left."""

    detail: str = "connection refused"


@dataclass(frozen=True)
class ConnectTimesOut:
    """ConnectTimeout once `connect_timeout` has passed (TimeoutError if the attempt's
    deadline comes first)."""


@dataclass(frozen=True)
class Break:
    """UpstreamBroken after connecting; `sent`: whether any byte of the request went out."""

    sent: bool = True
    detail: str = "connection reset by peer"


@dataclass(frozen=True)
class Hang:
    """No response head: the clock moves to the attempt's deadline, then TimeoutError."""


class Gate:
    """Holds the attempt until `open()`, then plays `then`. `reached` is set when an
    attempt arrives at the gate; a gate never opened holds it until it is cancelled."""

    def __init__(self, then: Answer | None = None) -> None:
        self.then: Answer = then if then is not None else Respond()
        self.reached = asyncio.Event()
        self._opened = asyncio.Event()

    def open(self) -> None:
        self._opened.set()

    async def passed(self) -> None:
        """Return once the gate is open (the scripted client waits here)."""
        await self._opened.wait()

    async def wait_reached(self, bound: float = 5.0) -> None:
        """Wait (bounded, in real time: a guard, never a measurement) until an attempt is
        held here."""
        async with asyncio.timeout(bound):
            await self.reached.wait()


Answer = Respond | Refuse | ConnectTimesOut | Break | Hang | Gate


# -- what the client records -----------------------------------------------------------------


@dataclass
class Sent:
    """One call the client got: what the attempt loop sent, and when (fake time).

    `body` is what was sent: a bytes body as given; an iterator body as read, and read
    only when the answer connected and took the request (not for Refuse, ConnectTimesOut
    or Break(sent=False)).
    """

    endpoint: str
    method: str
    target: str
    authority: str
    headers: list[tuple[str, str]]
    body: bytes
    connect_timeout: float
    deadline: float
    at: float

    def header(self, name: str) -> str | None:
        """The value of header `name` (case-insensitive), or None; there must be at most one."""
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        assert len(values) <= 1, f"{name} sent {len(values)} times: {values}"
        return values[0] if values else None

    @property
    def attempt(self) -> int:
        """The attempt's number, from `x-sidecar-attempt`."""
        value = self.header("x-sidecar-attempt")
        assert value is not None, "no x-sidecar-attempt header"
        return int(value)

    @property
    def timeout(self) -> float:
        """The attempt's own timeout: its deadline, less when it was sent."""
        return self.deadline - self.at


class FakeResponse:
    """An `UpstreamResponse` played from a `Respond`. `releases` counts `release()` calls
    (the seam asks for exactly one)."""

    def __init__(self, reply: Respond) -> None:
        self.status = reply.status
        self.reason: str | None = reply.reason
        self.headers: CIMultiDictProxy[str] = _fields(reply.headers)
        self._chunks = list(reply.chunks) if reply.chunks is not None else [reply.body]
        self._chunks = [c for c in self._chunks if c]
        self.content_length: int | None = len(reply.body) if reply.chunks is None else None
        self._breaks_after = reply.breaks_after
        self._trailers = reply.trailers
        self.trailers: CIMultiDictProxy[str] | None = None
        self.releases = 0

    async def iter_chunks(self, idle_timeout: float | None = None) -> AsyncIterator[bytes]:
        for index, chunk in enumerate(self._chunks):
            if self._breaks_after is not None and index >= self._breaks_after:
                raise UpstreamBroken("connection reset in the middle of the body")
            yield chunk
        if self._breaks_after is not None and self._breaks_after >= len(self._chunks):
            raise UpstreamBroken("connection reset before the end of the body")
        if self._trailers is not None:
            self.trailers = _fields(self._trailers)

    async def read(self, idle_timeout: float | None = None) -> bytes:
        return b"".join([chunk async for chunk in self.iter_chunks(idle_timeout)])

    def release(self) -> None:
        self.releases += 1


class ScriptedClient:
    """An `UpstreamClient` that answers each call as scripted and records it.

    Each call takes the next answer scripted for its endpoint (`script_for`), else the next
    of the shared queue (the constructor's answers, in call order), else `default`. A call
    with nothing left to answer fails the test (AssertionError): the loop made an attempt
    the script did not expect.
    """

    def __init__(self, clock: FakeClock, *answers: Answer, default: Answer | None = None):
        self.clock = clock
        self._queue: deque[Answer] = deque(answers)
        self._by_endpoint: dict[str, deque[Answer]] = {}
        self.default = default
        self.sent: list[Sent] = []
        self.responses: list[FakeResponse] = []
        self.forgotten: list[str] = []
        self.closed = False

    def script(self, *answers: Answer) -> None:
        """Add answers to the shared queue."""
        self._queue.extend(answers)

    def script_for(self, endpoint: str, *answers: Answer) -> None:
        """Answers for calls to `endpoint` ("host:port"), before the shared queue."""
        self._by_endpoint.setdefault(endpoint, deque()).extend(answers)

    @property
    def endpoints(self) -> list[str]:
        """The endpoint of each call, in order."""
        return [s.endpoint for s in self.sent]

    def _next(self, endpoint: str) -> Answer:
        own = self._by_endpoint.get(endpoint)
        if own:
            return own.popleft()
        if self._queue:
            return self._queue.popleft()
        if self.default is not None:
            return self.default
        raise AssertionError(f"unscripted call {len(self.sent) + 1} to {endpoint}")

    async def request(
        self,
        endpoint: Endpoint,
        request: UpstreamRequest,
        *,
        connect_timeout: float,
        deadline: float,
    ) -> FakeResponse:
        answer = self._next(endpoint.key)
        sent = Sent(
            endpoint=endpoint.key,
            method=request.method,
            target=request.target,
            authority=request.authority,
            headers=list(request.headers),
            body=request.body if isinstance(request.body, bytes) else b"",
            connect_timeout=connect_timeout,
            deadline=deadline,
            at=self.clock.now,
        )
        self.sent.append(sent)
        return await self._play(answer, request.body, sent)

    async def _play(self, answer: Answer, body: Body, sent: Sent) -> FakeResponse:
        clock = self.clock
        if isinstance(answer, Gate):
            answer.reached.set()
            await answer.passed()
            return await self._play(answer.then, body, sent)
        if isinstance(answer, Refuse):
            raise ConnectFailed(f"cannot connect to {sent.endpoint}: {answer.detail}")
        if isinstance(answer, ConnectTimesOut):
            if clock.now + sent.connect_timeout >= sent.deadline:
                clock.advance_to(sent.deadline)
                raise TimeoutError
            clock.advance(sent.connect_timeout)
            raise ConnectTimeout(f"connect to {sent.endpoint} timed out")
        if isinstance(answer, Break) and not answer.sent:
            raise UpstreamBroken(answer.detail, sent=False)
        if not isinstance(body, bytes | None):
            sent.body = b"".join([chunk async for chunk in body])
        if isinstance(answer, Break):
            raise UpstreamBroken(answer.detail, sent=True)
        if isinstance(answer, Hang) or clock.now + answer.took >= sent.deadline:
            clock.advance_to(sent.deadline)
            raise TimeoutError
        clock.advance(answer.took)
        response = FakeResponse(answer)
        self.responses.append(response)
        return response

    def forget(self, endpoint: Endpoint) -> None:
        self.forgotten.append(endpoint.key)

    async def close(self) -> None:
        self.closed = True


def _fields(fields: Fields) -> CIMultiDictProxy[str]:
    items = fields.items() if isinstance(fields, Mapping) else fields
    return CIMultiDictProxy(CIMultiDict(items))


# -- the runtimes the loop reads -------------------------------------------------------------


class LoopService:
    """`attempts.ServiceRuntimeLike` without Prometheus children: `attempts` counts
    sidecar_upstream_attempts_total by (endpoint, result)."""

    def __init__(
        self,
        name: str,
        cluster: Cluster,
        breaker: ServiceBreaker,
        client: ScriptedClient,
        connect_timeout: float,
        idle_timeout: float = 4.0,
    ) -> None:
        self.name = name
        self.cluster = cluster
        self.breaker = breaker
        # As the seam's type: ServiceRuntimeLike.client is a plain (invariant) attribute.
        self.client: UpstreamClient = client
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.attempts: Counter[tuple[str, str]] = Counter()

    def count_attempt(self, endpoint: str, result: str) -> None:
        self.attempts[(endpoint, result)] += 1

    def endpoint(self, key: str) -> Endpoint:
        return next(e for e in self.cluster.endpoints if e.key == key)


class LoopRoute:
    """`attempts.RouteRuntimeLike` with plain counters for the route's metrics."""

    def __init__(self, policy: RetryPolicy, budget: RetryBudget, service: LoopService) -> None:
        self.policy = policy
        self.budget = budget
        self._service = service
        self.retries = 0
        self.budget_exhausted = 0
        self.timeouts: Counter[TimeoutKind] = Counter()

    @property
    def service(self) -> LoopService:
        return self._service

    def count_retry(self) -> None:
        self.retries += 1

    def count_budget_exhausted(self) -> None:
        self.budget_exhausted += 1

    def count_timeout(self, kind: TimeoutKind) -> None:
        self.timeouts[kind] += 1

    async def close(self) -> None:
        self._service.breaker.close()
        await self._service.cluster.close()


def loop_route(
    client: ScriptedClient,
    *,
    endpoints: Iterable[str] = ("127.0.0.1:9001",),
    retries: RetryConfig | None = None,
    breaker: CircuitBreakerConfig | None = None,
    outlier_detection: OutlierDetectionConfig | None = None,
    connect_timeout: float = 1.0,
    service: str = "orders",
) -> LoopRoute:
    """A route to one service on a static endpoint list, everything on `client.clock`.

    Outlier detection is off unless given (an ejection starts a real timer task); pass a
    config with a high `consecutive_failures` to watch its counts without ejecting.
    """
    clock = client.clock
    metrics = Metrics()
    config = ServiceConfig(
        name=service,
        discovery=StaticDiscovery(tuple(_address(e) for e in endpoints)),
        outlier_detection=outlier_detection,
        circuit_breaker=breaker if breaker is not None else CircuitBreakerConfig(),
        connect_timeout=connect_timeout,
    )
    cluster = Cluster(config, metrics, on_removed=client.forget)
    service_breaker = ServiceBreaker(
        service, config.circuit_breaker, metrics, clock=clock.monotonic, wall=clock.wall
    )
    retry_config = retries if retries is not None else RetryConfig()
    budget = RetryBudget(
        retry_config.budget.ratio, retry_config.budget.min_per_second, clock=clock.monotonic
    )
    runtime = LoopService(service, cluster, service_breaker, client, connect_timeout)
    return LoopRoute(RetryPolicy(retry_config), budget, runtime)


def _address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return Address(host, int(port))


def exchange(
    clock: FakeClock,
    route: LoopRoute,
    *,
    method: str = "GET",
    target: str = "/orders/42",
    timeout: float = 2.0,
    max_retries: int | None = None,
    body: bytes | StreamedBody | None = None,
    headers: Sequence[tuple[str, str]] = (),
    grpc: bool = False,
    route_timeout: float | None = None,
) -> Exchange:
    """One request's `Exchange`, its deadline `timeout` from now on the fake clock.

    `max_retries` defaults to the route's; `route_timeout` (longer than `timeout`) says a
    per-request override shortened the route's own timeout to `timeout`.
    """
    now = clock.monotonic()
    return Exchange(
        method=method,
        target=target,
        headers=list(headers),
        body=body,
        deadline=now + timeout,
        max_retries=route.policy.max_retries if max_retries is None else max_retries,
        grpc=grpc,
        route_deadline=None if route_timeout is None else now + route_timeout,
    )


class AppBody:
    """The part of an `Inbound` a `StreamedBody` reads: the app's body in chunks."""

    def __init__(self, *chunks: bytes) -> None:
        self._chunks = deque(chunks)
        self.reads = 0

    async def read_chunk(self) -> bytes:
        self.reads += 1
        return self._chunks.popleft() if self._chunks else b""
