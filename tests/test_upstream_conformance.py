"""One suite, two HTTP/1.1 upstream clients: the hand-written one and aiohttp's (reference).

The hand-written client (`sidecar.upstream.h1`) is there only because it is cheaper; it
must earn that by doing everything aiohttp's client does right, and by refusing what a
proxy must not relay. Every case runs through a real sidecar with each client in turn
(`client_kind`, like uvicorn's `http_protocol_cls`), against a raw upstream that sends
the case's bytes, and an app that reads the answer strictly (tests/support/strictclient):

1. what the app gets: status, headers, body, interim heads, or a cut connection;
2. that the NEXT request to that endpoint gets its own answer and only its own headers
   (nothing of the case's response, its trailers or any stray bytes leaks into it).

Retries are off, so each case is exactly one attempt. Where the two clients rightly
differ, the case says what each does and why (`Want` per client), instead of an xfail.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from helpers import one_service
from support.scripted import Reply, SeenRequest, response, scripted_upstream
from support.strictclient import Answer, call

from sidecar.upstream.base import UpstreamClient
from sidecar.upstream.h1 import UpstreamPool
from sidecar.upstream.reference import ReferenceClient

CLIENTS: dict[str, Callable[[], UpstreamClient]] = {
    "h1": UpstreamPool,
    "reference": ReferenceClient,
}
NO_RETRY = "retries: { max_retries: 0 }\n        timeout: 3s"


@pytest.fixture(params=list(CLIENTS))
def client_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass(frozen=True)
class Want:
    status: int
    body: bytes | None = None
    cut: bool = False
    headers: dict[str, str] = field(default_factory=dict)  # present, with these values
    absent: tuple[str, ...] = ()
    interim: tuple[int, ...] = ()
    reason: bytes | None = None

    def check(self, answer: Answer) -> None:
        assert answer.violations == [], answer.violations
        assert answer.status == self.status, (answer.status, answer.body[:200])
        assert answer.cut == self.cut
        if self.body is not None:
            assert answer.body == self.body
        for name, value in self.headers.items():
            assert answer.header(name) == value, name
        for name in self.absent:
            assert answer.header(name) is None, name
        assert tuple(status for status, _ in answer.interim) == self.interim
        if self.reason is not None:
            assert answer.reason == self.reason
        if self.status == 502 and answer.header("x-sidecar-error") is not None:
            assert answer.header("x-sidecar-error") == "upstream_reset"


RESET = Want(502, headers={"x-sidecar-error": "upstream_reset"})
CASE = b"X-Case: case\r\n"  # in the case's own response
STRAY = b"X-Stray: leak\r\n"  # in bytes after it: must reach nobody


@dataclass(frozen=True)
class Case:
    name: str
    reply: Reply
    want: Want | dict[str, Want]  # per client where they rightly differ
    method: str = "GET"
    why: str = ""  # why the clients differ, when they do

    def wanted(self, kind: str) -> Want:
        return self.want[kind] if isinstance(self.want, dict) else self.want


def keep(data: bytes) -> Reply:
    return Reply(data, after="keep")


def close(data: bytes) -> Reply:
    return Reply(data, after="close")


def head(status: bytes = b"200 OK", *fields: bytes) -> bytes:
    return b"HTTP/1.1 " + status + b"\r\n" + CASE + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


def cl(body: bytes, *fields: bytes) -> bytes:
    return head(b"200 OK", b"Content-Length: %d" % len(body), *fields) + body


CHUNKED = head(b"200 OK", b"Transfer-Encoding: chunked")

CASES = [
    # -- framing: Content-Length --------------------------------------------------------
    Case("content-length", keep(cl(b"hello")), Want(200, b"hello", headers={"X-Case": "case"})),
    Case("content-length-zero", keep(cl(b"")), Want(200, b"")),
    Case(
        "content-length-leading-zeros",
        keep(head(b"200 OK", b"Content-Length: 0005") + b"hello"),
        Want(200, b"hello"),
    ),
    Case("content-length-large-streamed", keep(cl(b"L" * 100_000)), Want(200, b"L" * 100_000)),
    Case(
        "content-length-duplicate-equal",
        keep(head(b"200 OK", b"Content-Length: 5", b"Content-Length: 5") + b"hello"),
        RESET,
    ),
    Case(
        "content-length-list",
        keep(head(b"200 OK", b"Content-Length: 5, 5") + b"hello"),
        RESET,
    ),
    Case(
        "content-length-conflicting",
        keep(head(b"200 OK", b"Content-Length: 5", b"Content-Length: 6") + b"hello!"),
        RESET,
    ),
    Case(
        "content-length-not-a-number",
        keep(head(b"200 OK", b"Content-Length: 5x") + b"hello"),
        RESET,
    ),
    Case("content-length-negative", keep(head(b"200 OK", b"Content-Length: -1") + b"hello"), RESET),
    Case(
        "content-length-and-chunked",
        keep(head(b"200 OK", b"Content-Length: 5", b"Transfer-Encoding: chunked") + b"0\r\n\r\n"),
        RESET,
    ),
    Case(
        "longer-than-content-length",
        keep(cl(b"ok") + b"EXTRA" + STRAY),
        {"h1": Want(200, b"ok", absent=("X-Stray",)), "reference": RESET},
        why="the response itself was complete and valid: h1 relays it and closes the "
        "connection; aiohttp's parser fails the whole response on the bytes after it",
    ),
    Case(
        "a-second-whole-response",
        keep(cl(b"ok") + b"HTTP/1.1 200 OK\r\n" + STRAY + b"Content-Length: 5\r\n\r\nstray"),
        Want(200, b"ok", absent=("X-Stray",)),
    ),
    Case("close-after-head-with-length", close(head(b"200 OK", b"Content-Length: 10")), RESET),
    Case("close-without-answer", close(b""), RESET),
    # -- framing: chunked ---------------------------------------------------------------
    Case(
        "chunked-extensions-and-trailers",
        keep(
            CHUNKED + b"5;name=value\r\nhello\r\n6;x\r\n world\r\n0\r\n"
            b"X-Trailer: t\r\nSet-Cookie: leak=1\r\n\r\n"
        ),
        # HTTP/1.1 to the app carries no trailers; they must not turn into headers either.
        Want(200, b"hello world", absent=("X-Trailer", "Set-Cookie")),
    ),
    # A body error in the same read as the head: nothing was relayed yet, a clean 502.
    Case("chunked-bad-size", keep(CHUNKED + b"5\r\nhello\r\nZZ\r\n"), RESET),
    Case("chunked-size-overflow", keep(CHUNKED + b"f" * 20 + b"\r\n"), RESET),
    Case("chunked-missing-crlf", keep(CHUNKED + b"5\r\nhelloXX"), RESET),
    # ... and in a later read: the head is out, so the app's connection is cut.
    Case(
        "chunked-bad-size-later",
        Reply(pieces=[CHUNKED + b"5\r\nhello\r\n", b"ZZ\r\n"], pause=0.05, after="hang"),
        Want(200, cut=True),
    ),
    Case("chunked-close-mid-body", close(CHUNKED + b"a\r\nhello"), Want(200, cut=True)),
    Case("chunked-close-after-head", close(CHUNKED), Want(200, cut=True)),
    Case(
        "chunked-trailer-obs-fold",
        Reply(pieces=[CHUNKED + b"5\r\nhello\r\n", b"0\r\nX-T: a\r\n b\r\n\r\n"], pause=0.05),
        {"h1": Want(200, cut=True), "reference": Want(200, b"hello")},
        why="RFC 9112 5.2: obs-fold is refused (or replaced by a proxy); aiohttp unfolds it",
    ),
    # -- framing: read until close ------------------------------------------------------
    Case(
        "until-close-connection-close",
        close(head(b"200 OK", b"Connection: close") + b"all of it"),
        Want(200, b"all of it"),
    ),
    Case("until-close-no-header", close(head(b"200 OK") + b"all of it"), Want(200, b"all of it")),
    Case(
        "until-close-http10",
        close(b"HTTP/1.0 200 OK\r\n" + CASE + b"\r\nold style"),
        Want(200, b"old style"),
    ),
    Case(
        "http10-keep-alive-with-length",
        keep(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"),
        Want(200, b"ok"),
    ),
    # -- transfer codings ---------------------------------------------------------------
    Case(
        "te-gzip-then-chunked",
        close(head(b"200 OK", b"Transfer-Encoding: gzip, chunked") + b"5\r\nhello\r\n0\r\n\r\n"),
        {"h1": RESET, "reference": Want(200, b"hello")},
        why="we decode no gzip transfer coding: relaying its bytes with the coding dropped "
        "(hop-by-hop) would corrupt the body silently; aiohttp strips chunked and passes "
        "the rest through",
    ),
    Case(
        "te-chunked-then-gzip",
        close(head(b"200 OK", b"Transfer-Encoding: chunked, gzip") + b"5\r\nhello\r\n0\r\n\r\n"),
        {"h1": RESET, "reference": Want(200, b"5\r\nhello\r\n0\r\n\r\n")},
        why="RFC 9112 6.3: not chunked-final means read until close; we refuse the coding",
    ),
    Case(
        "te-http10",
        close(b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        {"h1": RESET, "reference": Want(200, b"hello")},
        why="RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 is faulty framing",
    ),
    # -- interim responses --------------------------------------------------------------
    Case(
        "100-then-final",
        keep(b"HTTP/1.1 100 Continue\r\n\r\n" + cl(b"final")),
        Want(200, b"final"),
    ),
    Case(
        "103-then-final",
        keep(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n" + cl(b"final")),
        {
            "h1": Want(200, b"final", interim=(103,), absent=("Link",)),
            "reference": Want(200, b"final"),
        },
        why="RFC 9110 15.2: a proxy forwards 1xx; aiohttp's client drops them",
    ),
    Case(
        "many-interim",
        keep(b"HTTP/1.1 103 Early Hints\r\n\r\n" * 12 + cl(b"final")),
        {"h1": Want(502, interim=(103,) * 8), "reference": Want(200, b"final")},
        why="we forward at most 8 interim heads, then refuse the response",
    ),
    Case(
        "101-to-a-plain-request",
        keep(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"),
        RESET,
    ),
    # -- no body allowed ----------------------------------------------------------------
    Case(
        "204-with-stray-bytes",
        keep(head(b"204 No Content") + b"GARBAGE"),
        {"h1": Want(204, b""), "reference": RESET},
        why="as for a response longer than its Content-Length",
    ),
    Case(
        "304-then-a-stray-response",
        keep(
            head(b"304 Not Modified")
            + b"HTTP/1.1 200 OK\r\n"
            + STRAY
            + b"Content-Length: 1\r\n\r\nx"
        ),
        Want(304, b"", absent=("X-Stray",)),
    ),
    Case(
        "head-with-a-body",
        keep(cl(b"hello")),
        {"h1": Want(200, b"", headers={"Content-Length": "5"}), "reference": RESET},
        method="HEAD",
        why="the bytes after a HEAD answer are stray: h1 relays the head and closes the "
        "connection; aiohttp fails the response on them",
    ),
    # -- field values -------------------------------------------------------------------
    Case("bare-cr-in-value", keep(cl(b"ok", b"X-Bad: a\rb")), RESET),
    Case("bare-lf-in-value", keep(cl(b"ok", b"X-Bad: a\nb")), RESET),
    Case("nul-in-value", keep(cl(b"ok", b"X-Bad: a\x00b")), RESET),
    Case("control-in-value", keep(cl(b"ok", b"X-Bad: a\x01b")), RESET),
    Case("del-in-value", keep(cl(b"ok", b"X-Bad: a\x7fb")), RESET),
    Case(
        "obs-fold",
        keep(cl(b"ok", b"X-Folded: a", b" b")),
        {"h1": RESET, "reference": Want(200, b"ok", headers={"X-Folded": "a b"})},
        why="RFC 9112 5.2: a proxy refuses obs-fold or replaces it with SP; aiohttp replaces",
    ),
    Case("space-before-colon", keep(cl(b"ok", b"X-Bad : v")), RESET),
    Case(
        "obs-text-in-value",
        keep(cl(b"ok", b"X-Latin: caf\xe9")),
        Want(200, b"ok", headers={"X-Latin": b"caf\xe9".decode("utf-8", "surrogateescape")}),
    ),
    Case(
        "trailing-whitespace",
        keep(cl(b"ok", b"X-Pad: value \t ")),
        Want(200, b"ok", headers={"X-Pad": "value"}),
    ),
    # -- status line --------------------------------------------------------------------
    Case("status-099", keep(b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n"), RESET),
    Case("status-600", keep(b"HTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n"), RESET),
    Case("status-999", keep(b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n"), RESET),
    Case("status-two-digits", keep(b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n"), RESET),
    Case("http2-status-line", keep(b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n"), RESET),
    Case("garbage", keep(b"SPDY/9 what\r\n\r\n\x00\x01"), RESET),
    Case(
        "no-reason-phrase",
        keep(b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok"),
        Want(200, b"ok", reason=b"OK"),
    ),
    Case(
        "control-in-reason",
        keep(b"HTTP/1.1 200 O\x01K\r\nContent-Length: 2\r\n\r\nok"),
        {"h1": RESET, "reference": RESET},
    ),
    Case(
        "obs-text-in-reason",
        keep(b"HTTP/1.1 200 Tr\xe8s bien\r\nContent-Length: 2\r\n\r\nok"),
        {
            "h1": Want(200, b"ok", reason=b"OK"),
            "reference": Want(200, b"ok", reason=b"Tr\xe8s bien"),
        },
        why="obs-text is valid in a reason; h1 sends the standard phrase instead (aiohttp's "
        "streamed responses cannot encode it), aiohttp relays the bytes",
    ),
    # -- head limits (64 KiB per head, 100 fields) --------------------------------------
    # X-Case and Content-Length are two of the fields.
    Case("100-fields", keep(cl(b"ok", *[b"X-F%d: v" % i for i in range(98)])), Want(200, b"ok")),
    Case("101-fields", keep(cl(b"ok", *[b"X-F%d: v" % i for i in range(99)])), RESET),
    Case("60-KiB-field", keep(cl(b"ok", b"X-Big: " + b"v" * 60_000)), Want(200, b"ok")),
    Case("70-KiB-field", keep(cl(b"ok", b"X-Big: " + b"v" * 70_000)), RESET),
    Case(
        "72-kB-head-of-small-fields",
        keep(cl(b"ok", *[b"X-F%d: %s" % (i, b"v" * 900) for i in range(80)])),
        {"h1": RESET, "reference": Want(200, b"ok")},
        why="the contract bounds the whole head at 64 KiB; aiohttp bounds each line only",
    ),
]


async def _run(sidecar: Any, kind: str, reply: Reply, method: str = "GET") -> tuple[Answer, Answer]:
    """The case's answer, then the next request's answer, from one sidecar and upstream."""

    def answer(request: SeenRequest) -> Reply | bytes:
        if request.target == "/api/case":
            return reply
        return response(200, b"next:" + request.target.encode(), [("X-Next", "mine")])

    async with scripted_upstream(answer) as up:
        sc = await sidecar(
            one_service(up.address, route_extra=NO_RETRY), upstream_client=CLIENTS[kind]
        )
        first = await call(sc.listen, "/api/case", method=method)
        second = await call(sc.listen, "/api/next")
    return first, second


def _check_next(answer: Answer) -> None:
    assert answer.violations == []
    assert (answer.status, answer.body) == (200, b"next:/api/next")
    assert answer.header("X-Next") == "mine"
    for name in ("X-Case", "X-Stray", "X-Trailer", "Set-Cookie", "X-Bad", "Link"):
        assert answer.header(name) is None, name
    assert answer.interim == []


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_case(sidecar, client_kind: str, case: Case) -> None:
    first, second = await _run(sidecar, client_kind, case.reply, case.method)
    case.wanted(client_kind).check(first)
    _check_next(second)


# --------------------------------------------------------------------------- keep-alive


@pytest.mark.slow
async def test_keep_alive_race(sidecar, client_kind: str) -> None:
    # The upstream announces `Keep-Alive: timeout=1` and drops (reads, never answers) a
    # request that arrives on a connection idle for 0.8 s or more, as if its FIN crossed
    # the request. The app calls every 0.85 s, GET and POST, retries off.
    # h1: connections retire 0.75 s after use (max(10 %, 250 ms) before 1 s): nothing is
    # lost and nothing is sent twice.
    # reference: aiohttp ignores Keep-Alive and reuses the doomed connection; it resends
    # the GET by itself (the upstream sees it twice: the contract forbids this) and the
    # POST fails.
    last: dict[int, float] = {}

    def answer(request: SeenRequest) -> Reply | bytes:
        now = time.monotonic()
        idle = now - last.get(request.connection, now)
        last[request.connection] = now
        if idle >= 0.8:
            return Reply(b"", after="close")
        return response(200, b"ok", [("Keep-Alive", "timeout=1")])

    async with scripted_upstream(answer) as up:
        sc = await sidecar(
            one_service(up.address, route_extra=NO_RETRY), upstream_client=CLIENTS[client_kind]
        )
        results = []
        for i, method in enumerate(["GET", "GET", "POST"]):
            got = await call(
                sc.listen, f"/api/{i}", method=method, body=b"p" if method == "POST" else None
            )
            results.append(got.status)
            await asyncio.sleep(0.85)
    targets = [r.target for r in up.requests]
    if client_kind == "h1":
        assert results == [200, 200, 200]
        assert targets == ["/api/0", "/api/1", "/api/2"]
    else:
        assert results == [200, 200, 502]
        assert targets == ["/api/0", "/api/1", "/api/1", "/api/2"]


# --------------------------------------------------------------------------- trailers


async def test_trailers_reach_nobody_but_their_own_response(sidecar, client_kind: str) -> None:
    # Pooled: both requests go over one connection, so a trailer leaking into the next
    # head would show. A `Connection: X-Own` trailer must not delete the next X-Own.
    reply = keep(
        CHUNKED + b"2\r\nok\r\n0\r\nSet-Cookie: s=1\r\nLocation: /evil\r\ngrpc-status: 13\r\n"
        b"x-sidecar-error: forged\r\nConnection: X-Own\r\n\r\n"
    )

    def answer(request: SeenRequest) -> Reply | bytes:
        if request.target == "/api/case":
            return reply
        return response(200, b"next", [("X-Own", "mine")])

    async with scripted_upstream(answer) as up:
        sc = await sidecar(
            one_service(up.address, route_extra=NO_RETRY), upstream_client=CLIENTS[client_kind]
        )
        first = await call(sc.listen, "/api/case")
        second = await call(sc.listen, "/api/next")
    assert (first.status, first.body, second.body) == (200, b"ok", b"next")
    assert second.header("X-Own") == "mine"
    for name in ("Set-Cookie", "Location", "grpc-status", "x-sidecar-error"):
        assert second.header(name) is None
    assert [r.connection for r in up.requests] == [1, 1]


# --------------------------------------------------------------------------- uploads


async def test_early_answer_to_an_upload(sidecar, client_kind: str, client) -> None:
    # 413 before the upload is read, then close (a reset, with the body unread): h1 gives
    # the app the 413, not a 502, and the attempt counts as 4xx, not a reset.
    def answer(request: SeenRequest) -> Reply:
        return Reply(
            response(413, b"too large", [("Connection", "close")], reason="Content Too Large"),
            read_body=False,
            after="close",
        )

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b"u" * 65536

    async with scripted_upstream(answer, answer_before_body=True) as up:
        sc = await sidecar(
            one_service(up.address, route_extra=NO_RETRY), upstream_client=CLIENTS[client_kind]
        )
        async with client.post(f"{sc.url}/api/upload", data=upload()) as resp:
            status = resp.status
            body = await resp.read()
    labels = {"service": "api", "endpoint": up.address}
    uvloop = type(asyncio.get_running_loop()).__module__.startswith("uvloop")
    if client_kind == "h1" or uvloop:
        assert (status, body) == (413, b"too large")
        assert sc.sample("sidecar_upstream_attempts_total", **labels, result="4xx") == 1
    else:
        # On asyncio's own loop, aiohttp's client sees the failed write (the reset) before
        # it reads the answer waiting in the kernel, and fails the request: the app gets
        # 502 and the breaker counts a reset. (On uvloop, reads come first.) h1 reads what
        # is left in the socket when a write breaks.
        assert status == 502
        assert sc.sample("sidecar_upstream_attempts_total", **labels, result="reset") == 1


async def test_a_streamed_upload_that_is_answered_after_it_ends(
    sidecar, client_kind: str, client
) -> None:
    async def upload() -> AsyncIterator[bytes]:
        for i in range(32):
            yield b"%05d" % i + b"u" * 65531

    async with scripted_upstream(
        lambda r: response(200, b"got %d" % len(r.body), [("X-Sum", str(sum(r.body) % 997))])
    ) as up:
        sc = await sidecar(
            one_service(up.address, route_extra=NO_RETRY), upstream_client=CLIENTS[client_kind]
        )
        async with client.post(f"{sc.url}/api/upload", data=upload()) as resp:
            assert resp.status == 200
            assert await resp.read() == b"got %d" % (32 * 65536)
    expected = b"".join([b"%05d" % i + b"u" * 65531 for i in range(32)])
    assert up.requests[0].body == expected


# --------------------------------------------------------------------------- stray bytes


async def test_a_late_stray_response_reaches_nobody(sidecar, client_kind: str) -> None:
    # The upstream answers, then (after the sidecar pooled the connection) sends a second,
    # unrequested response. h1 closes a pooled connection that receives any byte, so the
    # next request gets its own answer. aiohttp's client keeps the stray response and
    # hands it to the next request on that connection: another request's answer, cookie
    # included. (The fuzz found this; it is the leak the h1 client had with trailers.)
    stray = (
        b"HTTP/1.1 200 OK\r\n" + STRAY + b"Set-Cookie: s=stolen\r\nContent-Length: 5\r\n\r\nstray"
    )

    def answer(request: SeenRequest) -> Reply | bytes:
        if request.target == "/api/case":
            return Reply(pieces=[cl(b"mine"), stray], pause=0.05)
        return response(200, b"next:" + request.target.encode(), [("X-Next", "mine")])

    async with scripted_upstream(answer) as up:
        sc = await sidecar(
            one_service(up.address, route_extra=NO_RETRY), upstream_client=CLIENTS[client_kind]
        )
        first = await call(sc.listen, "/api/case")
        await asyncio.sleep(0.2)  # the stray response arrives while the connection is idle
        second = await call(sc.listen, "/api/next")
    assert (first.status, first.body) == (200, b"mine")
    if client_kind == "h1":
        _check_next(second)
        assert [r.connection for r in up.requests] == [1, 2]
    else:
        assert (second.body, second.header("Set-Cookie")) == (b"stray", "s=stolen")
