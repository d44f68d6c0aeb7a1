"""Plain (non-gRPC) HTTP/2 through the sidecar, end to end, and HTTP/2 hostile input on
the sidecar's real listener.

The app's side is either a raw h2 client (tests/support/grpc_peers.RawH2Client: frames
as written, for the hostile cases and Trailers-Only checks) or the sidecar's own h2c
client (H2Pool: flow control both ways, for the large bodies). Upstreams are an h2c
server built on the sidecar's own H2Server layer, and aiohttp's HTTP/1.1 server (the
`upstream` fixture), which records each request's head as it arrived.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h2.events
import h2.settings
import pytest
from aiohttp import web
from h2.errors import ErrorCodes
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame
from support import eventually
from support.grpc_peers import SERVICE, RawH2Client, RawResponse, frame, grpc_head

from sidecar.config.model import Address
from sidecar.endpoint import Endpoint
from sidecar.http.base import Inbound, Responder
from sidecar.http.h2server import H2Server
from sidecar.upstream.base import UpstreamRequest
from sidecar.upstream.h2 import H2Pool

Headers = list[tuple[bytes, bytes]]
BIG = 300 * 1024  # larger than the small-body limit (64 KiB) and every window on the way


def head(path: str, *extra: tuple[bytes, bytes], method: bytes = b"GET") -> Headers:
    return [
        (b":method", method),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", b"app.local"),
        *extra,
    ]


def pattern(size: int) -> bytes:
    """A body whose every byte depends on its offset: a shifted or lost piece shows."""
    return bytes(i * 7 % 251 for i in range(size))


@pytest.fixture(autouse=True)
async def _close_raw_clients() -> AsyncIterator[None]:
    yield
    await RawH2Client.close_all()


# --------------------------------------------------------------------------- upstreams


@dataclass
class H2Seen:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class H2Upstream:
    """An h2c upstream on the sidecar's own H2Server: /echo returns the body it read,
    /big?n=N returns N bytes; every request is recorded as the server saw it."""

    port: int = 0
    seen: list[H2Seen] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def handle(self, inbound: Inbound, out: Responder) -> None:
        body = b""
        while chunk := await inbound.read_chunk():
            body += chunk
        self.seen.append(
            H2Seen(inbound.method, inbound.target, list(inbound.headers.items()), body)
        )
        path, _, query = inbound.target.partition("?")
        if path.endswith("/big"):
            size = int(query.removeprefix("n="))
            await out.start(200, None, [("content-type", "application/octet-stream")])
            data = pattern(size)
            for i in range(0, size, 16384):
                await out.write(data[i : i + 16384])
            await out.finish([("x-trailer", "done")])
            return
        await out.send_whole(
            200,
            None,
            [("content-type", "application/octet-stream"), ("x-len", str(len(body)))],
            body,
            bodyless=False,
        )


@pytest.fixture
async def h2_upstream() -> AsyncIterator[Callable[[], Awaitable[H2Upstream]]]:
    made: list[tuple[asyncio.Server, H2Server]] = []

    async def make() -> H2Upstream:
        up = H2Upstream()
        server = H2Server(up.handle)
        listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
        up.port = listener.sockets[0].getsockname()[1]
        made.append((listener, server))
        return up

    yield make
    for listener, server in made:
        listener.close()
        await server.close()


async def h1_echo(request: web.Request) -> web.StreamResponse:
    """The aiohttp upstream's answer: the body it read back (the fixture read it first),
    or /big?n=N bytes, streamed chunked."""
    if request.path.endswith("/big"):
        size = int(request.query["n"])
        response = web.StreamResponse(headers={"content-type": "application/octet-stream"})
        await response.prepare(request)
        data = pattern(size)
        for i in range(0, size, 16384):
            await response.write(data[i : i + 16384])
        await response.write_eof()
        return response
    body = await request.read()
    return web.Response(body=body, headers={"x-len": str(len(body))})


def config(address: str, *, protocol: str = "http1", route_extra: str = "", top: str = "") -> str:
    return f"""
    {top}
    services:
      api:
        endpoints: ["{address}"]
        protocol: {protocol}
    routes:
      - name: api
        match: {{ prefix: /api }}
        service: api
        {route_extra}
      - name: admin
        match: {{ prefix: /admin }}
        service: api
    """


# --------------------------------------------------------------------------- the app's client


@pytest.fixture
async def app_pool() -> AsyncIterator[H2Pool]:
    pool = H2Pool()
    yield pool
    await pool.close()


async def pieces(data: bytes, size: int = 10_000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]
        await asyncio.sleep(0)


async def app_call(
    pool: H2Pool,
    port: int,
    method: str,
    path: str,
    body: bytes | AsyncIterator[bytes] | None = None,
    headers: list[tuple[str, str]] | None = None,
    content_length: int | None = None,
) -> tuple[int, dict[str, str], bytes, dict[str, str] | None]:
    """One HTTP/2 request from the app through the sidecar: status, head, body, trailers."""
    loop = asyncio.get_running_loop()
    request = UpstreamRequest(
        method, path, "app.local", headers or [], body, content_length=content_length
    )
    response = await pool.request(
        Endpoint(Address("127.0.0.1", port)),
        request,
        connect_timeout=2.0,
        deadline=loop.time() + 20,
    )
    try:
        data = await response.read(idle_timeout=10)
    finally:
        response.release()
    trailers = dict(response.trailers) if response.trailers is not None else None
    return response.status, dict(response.headers), data, trailers


# --------------------------------------------------------------------------- to an h2c service


async def test_h2_request_to_an_h2c_service_both_ways(sidecar, h2_upstream, app_pool):
    up = await h2_upstream()
    sc = await sidecar(config(up.address, protocol="h2c"))
    sent = pattern(BIG)
    status, got_head, body, _ = await app_call(
        app_pool, sc.listen, "POST", "/api/echo?x=1", pieces(sent), [("x-app", "a1")]
    )
    assert status == 200 and body == sent
    assert got_head["x-len"] == str(BIG)
    assert got_head["x-sidecar-attempts"] == "1"
    (seen,) = up.seen
    assert (seen.method, seen.target, seen.body) == ("POST", "/api/echo?x=1", sent)
    names = [name for name, _ in seen.headers]
    assert ("x-app", "a1") in seen.headers
    assert "content-length" not in names  # none declared: HTTP/2 frames the body itself
    assert dict(seen.headers)["x-sidecar-attempt"] == "1"

    status, _, body, trailers = await app_call(app_pool, sc.listen, "GET", f"/api/big?n={BIG}")
    assert status == 200 and body == pattern(BIG)
    assert trailers == {"x-trailer": "done"}  # response trailers pass on HTTP/2


async def test_h2_request_with_content_length_to_an_h2c_service(sidecar, h2_upstream, app_pool):
    up = await h2_upstream()
    sc = await sidecar(config(up.address, protocol="h2c"))
    sent = pattern(5000)
    status, _, body, _ = await app_call(
        app_pool, sc.listen, "PUT", "/api/echo", sent, [("content-length", "5000")]
    )
    assert (status, body) == (200, sent)
    # Checked against the DATA by the sidecar, then left to HTTP/2's own framing.
    assert up.seen[0].body == sent


# --------------------------------------------------------------------------- to an http1 service


@pytest.mark.parametrize(
    ("size", "declared", "route_extra", "framing"),
    [
        (5000, True, "", ("content-length", "5000")),
        # Buffered for a retry: the sidecar knows the length.
        (5000, False, "", ("content-length", "5000")),
        # Streamed (retries off): chunked, as the sidecar frames it.
        (5000, False, "retries: { max_retries: 0 }", ("transfer-encoding", "chunked")),
        (BIG, True, "", ("content-length", str(BIG))),
        # Larger than max_body_bytes, no length: streamed, chunked.
        (BIG, False, "", ("transfer-encoding", "chunked")),
    ],
    ids=["declared", "buffered", "streamed", "big-declared", "big-chunked"],
)
async def test_h2_request_to_an_http1_service_is_framed_by_the_sidecar(
    sidecar, upstream, app_pool, size, declared, route_extra, framing
):
    up = await upstream(h1_echo)
    sc = await sidecar(config(up.address, route_extra=route_extra))
    sent = pattern(size)
    headers = [("x-app", "a1"), ("te", "trailers")]
    if declared:
        headers.append(("content-length", str(size)))
    status, got_head, body, _ = await app_call(
        app_pool, sc.listen, "POST", "/api/echo", pieces(sent), headers, size if declared else None
    )
    assert status == 200 and body == sent
    assert got_head["x-len"] == str(size)
    (seen,) = up.seen
    assert seen.body == sent
    assert seen.headers.get(framing[0]) == framing[1]
    other = "transfer-encoding" if framing[0] == "content-length" else "content-length"
    assert other not in seen.headers  # one framing, never both
    assert seen.headers["host"] == "app.local"  # :authority becomes Host
    assert seen.headers["x-app"] == "a1"
    assert "te" not in seen.headers  # hop-by-hop


async def test_h2_request_gets_an_http1_service_big_answer(sidecar, upstream, app_pool):
    up = await upstream(h1_echo)
    sc = await sidecar(config(up.address))
    status, got_head, body, _ = await app_call(app_pool, sc.listen, "GET", f"/api/big?n={BIG}")
    assert status == 200 and body == pattern(BIG)
    assert "transfer-encoding" not in got_head  # HTTP/1.1 framing stays behind
    assert got_head["x-sidecar-attempts"] == "1"


async def test_an_h2_call_to_an_http1_service_is_retried_like_http1(sidecar, upstream, app_pool):
    calls = 0

    async def flaky(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        return web.Response(status=429 if calls == 1 else 200, text=f"try {calls}")

    up = await upstream(flaky)
    # 429 is not a failure_status (the breaker ignores it), but retry_on lists it.
    sc = await sidecar(config(up.address, route_extra="retries: { retry_on: [429] }"))
    status, got_head, body, _ = await app_call(app_pool, sc.listen, "GET", "/api/x")
    assert (status, body) == (200, b"try 2")
    assert got_head["x-sidecar-attempts"] == "2"
    assert up.hits == 2


# --------------------------------------------------------------------------- hostile input


async def served(port: int) -> None:
    """Another connection is served normally."""
    client = await RawH2Client.connect(port)
    response = await client.call(head("/api/ok"))
    assert response.status == 200
    assert response.header(b"x-sidecar-attempts") == b"1"
    client.close()


@pytest.fixture
async def target(sidecar, upstream) -> Any:
    up = await upstream(h1_echo)
    sc = await sidecar(config(up.address))
    return sc, up


MALFORMED = [
    (head("/api/x", (b"connection", b"keep-alive")), "connection-specific header 'connection'"),
    (head("/api/x", (b"keep-alive", b"5")), "connection-specific header 'keep-alive'"),
    (head("/api/x", (b"transfer-encoding", b"chunked")), "connection-specific header"),
    (head("/api/x", (b"upgrade", b"h2c")), "connection-specific header 'upgrade'"),
    (head("/api/x", (b"te", b"gzip")), "te other than trailers"),
    (head("/api/x", (b"X-Upper", b"1")), "invalid header name 'X-Upper'"),
    (head("/api/x", (b"x-a", b"a\rb")), "invalid character in the value of 'x-a'"),
    (head("/api/x", (b"x-a", b"a\x00b")), "invalid character in the value of 'x-a'"),
    (head("api/x"), ":path does not start with /"),
    (head("/api/x", (b"host", b"other.local")), "host and :authority differ"),
]


@pytest.mark.parametrize(("headers", "detail"), MALFORMED)
async def test_a_malformed_request_never_reaches_the_upstream(target, headers, detail):
    sc, up = target
    client = await RawH2Client.connect(sc.listen)
    response = await client.call(headers)
    assert response.status == 400
    assert response.header(b"x-sidecar-error") == b"bad_request"
    assert detail in json.loads(response.body)["detail"]
    assert (await client.call(head("/api/next"))).status == 200  # a stream error only
    assert [s.path_qs for s in up.seen] == ["/api/next"]


async def test_a_malformed_grpc_request_gets_trailers_only(target):
    sc, up = target
    client = await RawH2Client.connect(sc.listen)
    response = await client.call(grpc_head(f"/api/{SERVICE}/Unary", (b"X-Bad", b"1")), frame(b""))
    assert response.status == 200 and response.head_ended
    assert response.header(b"grpc-status") == b"13"
    assert response.header(b"grpc-message") == b"bad_request: invalid header name 'X-Bad'"
    assert up.hits == 0


@pytest.mark.parametrize(("declared", "sent"), [(3, b"12345"), (10, b"123")])
async def test_a_body_unequal_to_its_content_length_is_reset(target, declared, sent):
    sc, up = target
    client = await RawH2Client.connect(sc.listen)
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(
        sid, head("/api/echo", (b"content-length", b"%d" % declared), method=b"POST")
    )
    client.flush()
    # h2 (client side) checks lengths too: the DATA frame is written by hand.
    client.write(len(sent).to_bytes(3, "big") + b"\x00\x01" + sid.to_bytes(4, "big") + sent)
    event = await client.until(lambda e: isinstance(e, h2.events.StreamReset))
    assert isinstance(event, h2.events.StreamReset)
    assert event.error_code == ErrorCodes.PROTOCOL_ERROR
    await served(sc.listen)
    assert [s.path_qs for s in up.seen] == ["/api/ok"]


async def test_path_rules_apply_to_h2_paths(target):
    sc, up = target
    client = await RawH2Client.connect(sc.listen)
    response = await client.call(head("/api/../admin/panel"))
    assert response.status == 200
    assert up.seen[-1].path_qs == "/admin/panel"  # routed, and forwarded, as /admin
    response = await client.call(head("/api/%2e%2e/admin"))
    assert up.seen[-1].path_qs == "/admin"
    refused = await client.call(head("/api/a%2Fb"))
    assert refused.status == 400
    assert refused.header(b"x-sidecar-error") == b"bad_request"
    assert "encoded slash" in json.loads(refused.body)["detail"]
    grpc_refused = await client.call(grpc_head("/api/a%2Fb"), frame(b""))
    assert grpc_refused.head_ended and grpc_refused.header(b"grpc-status") == b"13"
    assert len(up.seen) == 2


async def test_oversized_header_list(target):
    sc, up = target
    client = await RawH2Client.connect(sc.listen)
    response = await client.call(head("/api/x", (b"x-big", b"v" * 70_000)))
    assert response.status == 431
    assert "header list of" in json.loads(response.body)["detail"]
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(sid, head("/api/x", (b"x-big", b"v" * 140_000)), end_stream=True)
    client.flush()
    goaway = await client.goaway()
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    await client.closed()
    await served(sc.listen)
    assert up.hits == 1


async def test_continuation_flood(target):
    sc, up = target
    client = await RawH2Client.connect(sc.listen)
    client.write(HeadersFrame(1, data=b"\x82", flags=["END_STREAM"]).serialize())
    for _ in range(80):
        client.write(ContinuationFrame(1, data=b"").serialize())
    goaway = await client.goaway()
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    await client.closed()
    await served(sc.listen)
    assert up.hits == 1


async def test_ping_flood(target):
    sc, _ = target
    client = await RawH2Client.connect(sc.listen)
    client.write(PingFrame(0, opaque_data=b"12345678").serialize() * 1001)
    goaway = await client.goaway()
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    await client.closed()
    await served(sc.listen)


async def test_rapid_reset(sidecar, upstream):
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        if request.path != "/api/ok":
            await release.wait()
        return web.Response()

    up = await upstream(hang)
    sc = await sidecar(config(up.address))
    client = await RawH2Client.connect(sc.listen)
    for i in range(1100):
        sid = 1 + 2 * i
        client.conn.send_headers(sid, head("/api/hang"), end_stream=True)
        client.conn.reset_stream(sid, ErrorCodes.CANCEL)
        if i % 100 == 99:
            client.flush()
            await asyncio.sleep(0)
    client.flush()
    goaway = await client.goaway()
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    await client.closed()
    # Every request the flood started was cut with it: nothing is left in flight.
    await eventually(lambda: sc.sidecar.proxy.in_flight == 0)
    await served(sc.listen)
    release.set()


async def test_too_many_streams(sidecar, upstream):
    release = asyncio.Event()

    async def wait(request: web.Request) -> web.StreamResponse:
        if request.path != "/api/ok":
            await release.wait()
        return web.Response(text="done")

    up = await upstream(wait)
    sc = await sidecar(config(up.address, top="http2: { max_concurrent_streams: 5 }"))
    client = await RawH2Client.connect(sc.listen)
    await client.until(lambda e: isinstance(e, h2.events.RemoteSettingsChanged))
    assert client.conn.remote_settings.max_concurrent_streams == 5
    # h2 would hold the sixth back itself: raise its view of our limit.
    client.conn.remote_settings = h2.settings.Settings(
        client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100}
    )
    for i in range(6):
        client.conn.send_headers(1 + 2 * i, head("/api/wait"), end_stream=True)
    client.flush()
    event = await client.until(lambda e: isinstance(e, h2.events.StreamReset))
    assert isinstance(event, h2.events.StreamReset)
    assert (event.stream_id, event.error_code) == (11, ErrorCodes.REFUSED_STREAM)
    await eventually(lambda: up.hits == 5)
    await served(sc.listen)
    release.set()
    for i in range(5):
        response: RawResponse = await client.response(1 + 2 * i)
        assert response.body == b"done"
    assert up.hits == 6  # five held, one served; the refused stream never went up
