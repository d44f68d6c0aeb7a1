"""gRPC through the sidecar, end to end: a real grpcio client calls 127.0.0.1:<listen>
with an insecure channel, the sidecar routes it over h2c to a real grpcio server.

Every case counts what the server saw (calls, metadata, deadlines) and what the client
got (messages, metadata, trailers, status), with short configured durations.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import grpc
import h2.connection
import h2.events
import pytest
from conftest import RunningSidecar
from h2.errors import ErrorCodes
from helpers import ROOT, free_port, wait_http
from support import eventually
from support.grpc_peers import (
    SERVICE,
    RawH2Client,
    RawH2Server,
    RawResponse,
    frame,
    grpc_channel,
    grpc_echo,
    grpc_head,
    grpc_server,
    raw_h2_server,
    unframe,
)

from sidecar.cluster.probes import grpc_health_check
from sidecar.config.model import Address
from sidecar.demo import SAY_PATH, Greeter
from sidecar.grpc import decode_message, encode_message
from sidecar.h2frames import FLAG_END_STREAM, FrameReader, FrameType
from sidecar.http.h2server import H2Server


@pytest.fixture(autouse=True)
async def _close_raw_clients() -> AsyncIterator[None]:
    yield
    await RawH2Client.close_all()


def grpc_config(address: str, *, route_extra: str = "", service_extra: str = "") -> str:
    return f"""
    services:
      echo:
        endpoints: ["{address}"]
        protocol: h2c
        {service_extra}
    routes:
      - name: echo
        match: {{ prefix: /{SERVICE}/ }}
        service: echo
        {route_extra}
    """


async def unary_through(
    address: str,
) -> tuple[bytes, list[tuple[str, str | bytes]], list[tuple[str, str | bytes]]]:
    async with grpc_channel(address) as channel:
        call = channel.unary_unary(f"/{SERVICE}/Unary")(
            b"hi", metadata=(("x-app", "a1"), ("x-app-bin", b"\x00\x01\xfe"))
        )
        reply = await call
        assert await call.code() == grpc.StatusCode.OK
        return reply, list(await call.initial_metadata()), list(await call.trailing_metadata())


async def test_unary_call_passes_metadata_and_trailers_byte_for_byte(sidecar):
    async with grpc_server() as up:
        sc = await sidecar(grpc_config(up.address))
        direct = await unary_through(up.address)
        proxied = await unary_through(f"127.0.0.1:{sc.listen}")
        assert proxied[0] == direct[0] == b"echo:hi"
        # The sidecar adds only x-sidecar-attempts and x-request-id to the head.
        added = [m for m in proxied[1] if m not in direct[1]]
        assert sorted(k for k, _ in added) == ["x-request-id", "x-sidecar-attempts"]
        assert [m for m in proxied[1] if m in direct[1]] == direct[1]
        assert ("x-initial-bin", b"\x00\xff") in proxied[1]
        assert proxied[2] == direct[2]  # trailers, -bin ones included, in order
        assert ("x-trailer-bin", b"\x01\x02\x03") in proxied[2]
        _direct_seen, proxied_seen = up.service.calls
        assert ("x-app", "a1") in proxied_seen.metadata
        assert ("x-app-bin", b"\x00\x01\xfe") in proxied_seen.metadata
        assert (
            sc.sample("sidecar_grpc_responses_total", route="echo", service="echo", grpc_code="OK")
            == 1
        )


async def test_streaming_both_ways(sidecar):
    async with grpc_server() as up:
        sc = await sidecar(grpc_config(up.address))
        async with grpc_channel(f"127.0.0.1:{sc.listen}") as channel:
            stream = channel.unary_stream(f"/{SERVICE}/ServerStream")(b"50:1000")
            got = [m async for m in stream]
            assert len(got) == 50 and all(len(m) == 1000 for m in got)

            async def messages():
                for i in range(20):
                    yield f"m{i}".encode()

            result = await channel.stream_unary(f"/{SERVICE}/ClientStream")(messages())
            assert result == b"20:" + str(sum(len(f"m{i}") for i in range(20))).encode()

            bidi = channel.stream_stream(f"/{SERVICE}/Bidi")()
            for i in range(5):
                await bidi.write(f"b{i}".encode())
                assert await bidi.read() == f"echo:b{i}".encode()  # interleaved, one by one
            await bidi.done_writing()
            assert await bidi.code() == grpc.StatusCode.OK


async def test_server_status_reaches_the_client(sidecar):
    async with grpc_server() as up:
        sc = await sidecar(grpc_config(up.address))
        async with grpc_channel(f"127.0.0.1:{sc.listen}") as channel:
            call = channel.unary_unary(f"/{SERVICE}/Unary")(
                b"x", metadata=(("x-abort", "NOT_FOUND"), ("x-message", "no such thing"))
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details() == "no such thing"
        assert (
            sc.sample(
                "sidecar_grpc_responses_total", route="echo", service="echo", grpc_code="NotFound"
            )
            == 1
        )


async def test_deadline_lowers_the_route_timeout_and_reaches_the_server(sidecar):
    async with grpc_server() as up:
        sc = await sidecar(grpc_config(up.address, route_extra="timeout: 10s"))
        async with grpc_channel(f"127.0.0.1:{sc.listen}") as channel:
            await channel.unary_unary(f"/{SERVICE}/Unary")(b"x", timeout=2.0)
        (seen,) = up.service.calls
        assert seen.time_remaining is not None and 0 < seen.time_remaining <= 2.0


async def test_sidecar_errors_are_trailers_only_statuses(sidecar):
    dead = free_port()
    sc = await sidecar(grpc_config(f"127.0.0.1:{dead}", route_extra="retries: { max_retries: 0 }"))
    async with grpc_channel(f"127.0.0.1:{sc.listen}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary(f"/{SERVICE}/Unary")(b"x")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "upstream_unreachable" in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary("/other.Service/Method")(b"x")
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "no_route" in (err.value.details() or "")
        trailing = dict(err.value.trailing_metadata() or ())
        assert trailing.get("x-sidecar-error") == "no_route"


async def test_the_route_timeout_covers_the_whole_stream(sidecar):
    async with grpc_server() as up:
        sc = await sidecar(grpc_config(up.address, route_extra="timeout: 500ms"))
        async with grpc_channel(f"127.0.0.1:{sc.listen}") as channel:
            # The server sends its head, then waits: the stream outlives the route timeout.
            stream = channel.unary_stream(f"/{SERVICE}/ServerStream")(
                b"3:8", metadata=(("x-wait", "1"),)
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stream:
                    pass
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert sc.sample("sidecar_timeouts_total", route="echo", service="echo", kind="route") == 1
        assert (
            sc.sample(
                "sidecar_grpc_responses_total",
                route="echo",
                service="echo",
                grpc_code="DeadlineExceeded",
            )
            == 1
        )


async def test_grpc_health_check_marks_a_not_serving_endpoint_unhealthy(sidecar):
    async with grpc_server() as good, grpc_server() as bad:
        await good.health.set("", "SERVING")
        await bad.health.set("", "NOT_SERVING")
        sc = await sidecar(
            f"""
    services:
      echo:
        endpoints: ["{good.address}", "{bad.address}"]
        protocol: h2c
        health_check: {{ grpc: true, interval: 50ms, timeout: 500ms, unhealthy_threshold: 1 }}
    routes:
      - {{ name: echo, match: {{ prefix: /{SERVICE}/ }}, service: echo }}
    """
        )
        await eventually(
            lambda: (
                [e.state for e in sc.sidecar.runtime.services["echo"].cluster.endpoints]
                == ["healthy", "unhealthy"]
            )
        )
        async with grpc_channel(f"127.0.0.1:{sc.listen}") as channel:
            for _ in range(4):
                await channel.unary_unary(f"/{SERVICE}/Unary")(b"x")
        assert len(good.service.calls) == 4 and bad.service.calls == []


# --------------------------------------------------------------------------- helpers

ONE_FAILURE_OPENS = "circuit_breaker: { failure_threshold: 1, reset_timeout: 30s, probe: false }"
GRPC_HEALTH = "health_check: { grpc: true, interval: 50ms, unhealthy_threshold: 1 }"


def code_count(sc: RunningSidecar, code: str, route: str = "echo", service: str = "echo") -> float:
    return sc.sample("sidecar_grpc_responses_total", route=route, service=service, grpc_code=code)


def requests_count(
    sc: RunningSidecar, code: str, route: str = "echo", service: str = "echo"
) -> float:
    return sc.sample("sidecar_requests_total", route=route, service=service, code=code)


async def raw_call(port: int, path: str, *extra: tuple[bytes, bytes]) -> RawResponse:
    """One gRPC call over a new raw h2 connection; the response, with the frames that
    carried it checked: a Trailers-Only answer is exactly one HEADERS frame."""
    client = await RawH2Client.connect(port)
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(sid, grpc_head(path, *extra))
    client.conn.send_data(sid, frame(b"x"), end_stream=True)
    client.flush()
    response = await client.response(sid)
    if response.head_ended:
        frames = FrameReader(expect_preface=False, max_header_block=2**20).feed(bytes(client.raw))
        mine = [(f.type, f.flags & FLAG_END_STREAM) for f in frames if f.stream_id == sid]
        assert mine == [(FrameType.HEADERS, FLAG_END_STREAM)], mine
    client.close()
    return response


def assert_trailers_only(response: RawResponse, reason: str, code: int) -> str:
    """The sidecar's own answer: HTTP 200, one head that ends the stream, the gRPC
    fields; returns the decoded grpc-message."""
    assert response.status == 200
    assert response.head_ended and response.body == b"" and response.trailers is None
    assert response.header(b"content-type") == b"application/grpc"
    assert response.header(b"grpc-status") == b"%d" % code
    assert response.header(b"x-sidecar-error") == reason.encode()
    raw = response.header(b"grpc-message")
    assert raw is not None
    text = raw.decode("ascii")  # percent-encoded: nothing but printable ASCII on the wire
    message = decode_message(text)
    assert encode_message(message) == text
    assert message.startswith(f"{reason}: "), message
    return message


def dead_config(route_extra: str = "", service_extra: str = "") -> str:
    return grpc_config(
        f"127.0.0.1:{free_port()}", route_extra=route_extra, service_extra=service_extra
    )


def status_only(code: int) -> Callable[..., Awaitable[None]]:
    """A raw h2 handler answering Trailers-Only with grpc-status `code`."""

    async def handler(server: RawH2Server, conn: h2.connection.H2Connection, n: int, sid: int):
        conn.send_headers(
            sid,
            [
                (b":status", b"200"),
                (b"content-type", b"application/grpc"),
                (b"grpc-status", b"%d" % code),
            ],
            end_stream=True,
        )

    return handler


def message_then_status(code: int) -> Callable[..., Awaitable[None]]:
    """A raw h2 handler answering one message, then trailers with grpc-status `code`."""

    async def handler(server: RawH2Server, conn: h2.connection.H2Connection, n: int, sid: int):
        RawH2Server.grpc_answer(conn, sid, b"partial", status=code)

    return handler


def http_only(status: int) -> Callable[..., Awaitable[None]]:
    """A raw h2 handler answering HTTP `status` with no gRPC field at all (a proxy's page)."""

    async def handler(server: RawH2Server, conn: h2.connection.H2Connection, n: int, sid: int):
        conn.send_headers(sid, [(b":status", b"%d" % status), (b"content-type", b"text/plain")])
        conn.send_data(sid, b"not grpc", end_stream=True)

    return handler


async def reset_stream(server: RawH2Server, conn: h2.connection.H2Connection, n: int, sid: int):
    conn.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)


# --------------------------------------------------------------------------- one port


async def test_one_port_serves_http1_and_h2c_and_refuses_upgrade(sidecar, upstream):
    up = await upstream()
    async with grpc_server() as grpc_up:
        sc = await sidecar(
            f"""
    services:
      echo: {{ endpoints: ["{grpc_up.address}"], protocol: h2c }}
      web: {{ endpoints: ["{up.address}"] }}
    routes:
      - {{ name: echo, match: {{ prefix: /{SERVICE}/ }}, service: echo }}
      - {{ name: web, match: {{ prefix: /web }}, service: web }}
    """
        )
        async with aiohttp.ClientSession() as session, session.get(f"{sc.url}/web/page") as resp:
            assert resp.status == 200 and await resp.text() == "ok"
            assert resp.version == aiohttp.HttpVersion11
        async with grpc_channel(f"127.0.0.1:{sc.listen}") as channel:
            assert await channel.unary_unary(f"/{SERVICE}/Unary")(b"one") == b"echo:one"
        assert up.hits == 1 and len(grpc_up.service.calls) == 1

        # Upgrade: h2c over HTTP/1.1 is answered as HTTP/1.1, never switched: the preface
        # sent after it on the same connection is not taken for HTTP/2.
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.listen)
        writer.write(
            b"GET /web/up HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert b"upgrade" not in head.lower()
        declared = re.search(rb"(?i)content-length: (\d+)", head)
        assert declared is not None, head
        length = int(declared.group(1))
        await reader.readexactly(length)
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        rest = await asyncio.wait_for(reader.read(65536), 5)
        assert re.match(rb"HTTP/1\.[01] 400 ", rest), rest[:80]
        assert b"x-sidecar-error: bad_request" in rest
        writer.close()
        assert up.hits == 2
        assert "upgrade" not in up.seen[1].headers and "http2-settings" not in up.seen[1].headers


# --------------------------------------------------------------------------- status mapping


@contextlib.asynccontextmanager
async def _held_call(port: int) -> AsyncIterator[None]:
    """A call that sits on the server (x-sleep) for the duration of the block."""
    client = await RawH2Client.connect(port)
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(sid, grpc_head(f"/{SERVICE}/Unary", (b"x-sleep", b"30")))
    client.conn.send_data(sid, frame(b"held"), end_stream=True)
    client.flush()
    try:
        yield
    finally:
        client.close()


async def test_no_route_is_unimplemented(sidecar):
    sc = await sidecar(dead_config())
    # A percent sign and non-ASCII text in the path: the message is percent-encoded.
    response = await raw_call(sc.listen, "/other.Service/Me%25thöd")
    message = assert_trailers_only(response, "no_route", 12)
    assert message == "no_route: no route for POST /other.Service/Me%25thöd"
    assert response.header(b"x-sidecar-attempts") == b"0"
    assert response.header(b"x-request-id")


async def test_circuit_open_is_unavailable(sidecar):
    sc = await sidecar(
        dead_config(
            route_extra="retries: { max_retries: 0 }",
            service_extra=ONE_FAILURE_OPENS,
        )
    )
    first = await raw_call(sc.listen, f"/{SERVICE}/Unary")
    assert_trailers_only(first, "upstream_unreachable", 14)
    assert first.header(b"x-sidecar-attempts") == b"1"
    second = await raw_call(sc.listen, f"/{SERVICE}/Unary")
    assert_trailers_only(second, "circuit_open", 14)
    assert second.header(b"x-sidecar-attempts") == b"0"
    assert int(second.header(b"retry-after") or 0) >= 1
    assert code_count(sc, "Unavailable") == 2
    assert requests_count(sc, "200") == 2


async def test_overloaded_is_unavailable(sidecar):
    async with grpc_server() as up:
        sc = await sidecar(grpc_config(up.address, service_extra="max_requests: 1"))
        async with _held_call(sc.listen):
            await eventually(lambda: len(up.service.calls) == 1)
            response = await raw_call(sc.listen, f"/{SERVICE}/Unary")
            assert_trailers_only(response, "overloaded", 14)
        assert len(up.service.calls) == 1
        assert sc.sample("sidecar_overloaded_total", service="echo") == 1


async def test_no_healthy_upstream_is_unavailable(sidecar):
    async with grpc_server() as up:
        await up.health.set("", "NOT_SERVING")
        sc = await sidecar(
            grpc_config(
                up.address,
                service_extra=GRPC_HEALTH,
            )
        )
        cluster = sc.sidecar.runtime.services["echo"].cluster
        await eventually(lambda: cluster.endpoints[0].state == "unhealthy")
        response = await raw_call(sc.listen, f"/{SERVICE}/Unary")
        assert_trailers_only(response, "no_healthy_upstream", 14)
        assert up.service.calls == []


async def test_upstream_unreachable_is_unavailable(sidecar):
    sc = await sidecar(dead_config(route_extra="retries: { max_retries: 1 }"))
    response = await raw_call(sc.listen, f"/{SERVICE}/Unary")
    assert_trailers_only(response, "upstream_unreachable", 14)
    assert response.header(b"x-sidecar-attempts") == b"2"  # a connect failure is retried


async def test_upstream_reset_is_unavailable(sidecar):
    async with raw_h2_server(reset_stream) as up:
        sc = await sidecar(grpc_config(up.address))
        response = await raw_call(sc.listen, f"/{SERVICE}/Unary")
        assert_trailers_only(response, "upstream_reset", 14)
        # A POST after a reset is not retried without non_idempotent.
        assert response.header(b"x-sidecar-attempts") == b"1" and up.streams == 1


async def test_timeout_is_deadline_exceeded(sidecar):
    async with grpc_server() as up:
        sc = await sidecar(grpc_config(up.address, route_extra="timeout: 200ms"))
        response = await raw_call(sc.listen, f"/{SERVICE}/Unary", (b"x-sleep", b"5"))
        assert_trailers_only(response, "timeout", 4)
        await eventually(lambda: up.service.cancelled == 1)  # the upstream call was cut
        assert code_count(sc, "DeadlineExceeded") == 1


async def test_bad_request_is_internal(sidecar):
    sc = await sidecar(dead_config())
    response = await raw_call(sc.listen, f"/{SERVICE}%2FUnary")
    message = assert_trailers_only(response, "bad_request", 13)
    assert "encoded slash" in message


@pytest.mark.parametrize(("abort", "code"), [("status: 503", 14), ("grpc_status: 8", 8)])
async def test_fault_injected_uses_the_grpc_status(sidecar, abort, code):
    async with grpc_server() as up:
        sc = await sidecar(
            grpc_config(up.address, route_extra=f"fault: {{ abort: {{ percent: 100, {abort} }} }}")
        )
        response = await raw_call(sc.listen, f"/{SERVICE}/Unary")
        assert_trailers_only(response, "fault_injected", code)
        assert up.service.calls == []


async def test_grpc_to_an_http1_service_is_bad_request(sidecar, upstream):
    up = await upstream()
    sc = await sidecar(
        f"""
    services:
      web: {{ endpoints: ["{up.address}"] }}
    routes:
      - {{ name: web, match: {{ prefix: / }}, service: web }}
    """
    )
    response = await raw_call(sc.listen, f"/{SERVICE}/Unary")
    message = assert_trailers_only(response, "bad_request", 13)
    assert message == "bad_request: service web speaks http1; gRPC needs protocol: h2c"
    assert up.hits == 0
    assert code_count(sc, "Internal", route="web", service="web") == 1


async def test_fallback_is_for_non_grpc_requests_only(sidecar):
    async with grpc_server() as up:
        await up.health.set("", "NOT_SERVING")
        sc = await sidecar(
            grpc_config(
                up.address,
                route_extra="fallback: { status: 200, body: cached }",
                service_extra=GRPC_HEALTH,
            )
        )
        cluster = sc.sidecar.runtime.services["echo"].cluster
        await eventually(lambda: cluster.endpoints[0].state == "unhealthy")
        grpc_answer = await raw_call(sc.listen, f"/{SERVICE}/Unary")
        assert_trailers_only(grpc_answer, "no_healthy_upstream", 14)
        assert grpc_answer.header(b"x-sidecar-fallback") is None
        client = await RawH2Client.connect(sc.listen)
        plain = await client.call(
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", f"/{SERVICE}/Unary".encode()),
                (b":authority", b"sidecar.test"),
                (b"content-type", b"application/json"),
            ],
            b"{}",
        )
        assert (plain.status, plain.body) == (200, b"cached")
        assert plain.header(b"x-sidecar-fallback") == b"no_healthy_upstream"
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{sc.url}/{SERVICE}/Unary", data=b"{}") as resp,
        ):
            assert (resp.status, await resp.read()) == (200, b"cached")


# --------------------------------------------------------------------------- deadlines

TIMEOUT_VALUE = re.compile(rb"[1-9][0-9]{0,7}m")


def millis(value: bytes | None) -> int:
    """The grpc-timeout the upstream saw, in ms (the sidecar always writes `NNNm`)."""
    assert value is not None and TIMEOUT_VALUE.fullmatch(value), value
    return int(value[:-1])


@pytest.mark.parametrize(
    ("route_extra", "client_timeout", "most"),
    [
        # The client's deadline lowers the route's.
        ("timeout: 10s", 2.0, 2000),
        # It never raises it.
        ("timeout: 1s", 30.0, 1000),
        # No client deadline: the route's.
        ("timeout: 700ms", None, 700),
    ],
)
async def test_upstream_grpc_timeout_is_what_is_left(sidecar, route_extra, client_timeout, most):
    async with raw_h2_server() as raw, grpc_server() as up:
        for address in (raw.address, up.address):
            sc = await sidecar(grpc_config(address, route_extra=route_extra))
            async with grpc_channel(f"127.0.0.1:{sc.listen}") as channel:
                reply = await channel.unary_unary(f"/{SERVICE}/Unary")(b"x", timeout=client_timeout)
                assert reply in (b"x", b"echo:x")
        (seen,) = raw.seen
        assert 1 <= millis(seen.header(b"grpc-timeout")) <= most
        assert seen.header(b"x-sidecar-attempt") == b"1"
        (call,) = up.service.calls
        # grpc core keeps deadlines on a millisecond clock and rounds them up: allow it one.
        assert call.time_remaining is not None and 0 < call.time_remaining <= most / 1000 + 0.002


async def test_per_try_timeout_is_the_attempt_deadline(sidecar):
    async with raw_h2_server() as raw:
        sc = await sidecar(
            grpc_config(
                raw.address, route_extra="timeout: 10s\n        retries: { per_try_timeout: 300ms }"
            )
        )
        async with grpc_channel(f"127.0.0.1:{sc.listen}") as channel:
            await channel.unary_unary(f"/{SERVICE}/Unary")(b"x", timeout=5)
        # The smaller of per_try_timeout and what is left: exactly the per-try timeout.
        assert raw.seen[0].header(b"grpc-timeout") == b"300m"


async def test_per_try_timeout_reaches_the_server(sidecar):
    async with grpc_server() as up:
        sc = await sidecar(
            grpc_config(
                up.address, route_extra="timeout: 10s\n        retries: { per_try_timeout: 300ms }"
            )
        )
        async with grpc_channel(f"127.0.0.1:{sc.listen}") as channel:
            await channel.unary_unary(f"/{SERVICE}/Unary")(b"x")
        (seen,) = up.service.calls
        assert seen.time_remaining is not None and 0 < seen.time_remaining <= 0.3


@pytest.mark.parametrize("value", [b"0m", b"0S", b"0n"])
async def test_no_time_left_starts_no_attempt(sidecar, value):
    async with raw_h2_server() as raw:
        sc = await sidecar(grpc_config(raw.address))
        response = await raw_call(sc.listen, f"/{SERVICE}/Unary", (b"grpc-timeout", value))
        message = assert_trailers_only(response, "timeout", 4)
        assert "before an attempt" in message
        assert response.header(b"x-sidecar-attempts") == b"0"
        assert raw.seen == [] and raw.connections == 0
        assert code_count(sc, "DeadlineExceeded") == 1


async def test_an_invalid_client_grpc_timeout_is_ignored(sidecar):
    async with raw_h2_server() as raw:
        sc = await sidecar(grpc_config(raw.address, route_extra="timeout: 800ms"))
        for value in (b"abc", b"123456789m", b"5x", b"m"):
            response = await raw_call(sc.listen, f"/{SERVICE}/Unary", (b"grpc-timeout", value))
            assert response.status == 200 and response.trailers == [(b"grpc-status", b"0")]
        assert len(raw.seen) == 4
        for seen in raw.seen:
            assert 1 <= millis(seen.header(b"grpc-timeout")) <= 800
            assert len(seen.headers) == len({name for name, _ in seen.headers})  # one of each


# --------------------------------------------------------------------------- breaker, outliers


def breaker_state(sc: RunningSidecar, service: str = "echo") -> str:
    return str(sc.sidecar.runtime.services[service].breaker.state)


async def unary_code(port: int, *metadata: tuple[str, str], timeout: float | None = None) -> Any:
    async with grpc_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(f"/{SERVICE}/Unary")(b"x", metadata=metadata, timeout=timeout)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call
        return await call.code()


async def stream_code(port: int, *metadata: tuple[str, str], timeout: float | None = None) -> Any:
    """A server-streaming call of one message; its code (the message arrived too)."""
    async with grpc_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_stream(f"/{SERVICE}/ServerStream")(
            b"1:8", metadata=metadata, timeout=timeout
        )
        got = []
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for message in call:
                got.append(message)
        assert len(got) == 1
        return await call.code()


BREAKER = "circuit_breaker: { failure_threshold: 2, reset_timeout: 30s, probe: false }"
NO_RETRIES = "retries: { max_retries: 0 }"


@pytest.mark.parametrize("call", [unary_code, stream_code], ids=["trailers-only", "in-trailers"])
async def test_failure_grpc_status_opens_the_breaker(sidecar, call):
    async with grpc_server() as up:
        sc = await sidecar(grpc_config(up.address, route_extra=NO_RETRIES, service_extra=BREAKER))
        for _ in range(2):
            code = await call(sc.listen, ("x-abort", "UNAVAILABLE"))
            assert code == grpc.StatusCode.UNAVAILABLE
        assert breaker_state(sc) == "open"
        assert await unary_code(sc.listen) == grpc.StatusCode.UNAVAILABLE  # circuit_open
        assert len(up.service.calls) == 2
        assert code_count(sc, "Unavailable") == 3


@pytest.mark.parametrize("call", [unary_code, stream_code], ids=["trailers-only", "in-trailers"])
async def test_other_statuses_are_not_failures(sidecar, call):
    async with grpc_server() as up:
        sc = await sidecar(grpc_config(up.address, route_extra=NO_RETRIES, service_extra=BREAKER))
        for _ in range(4):
            assert await call(sc.listen, ("x-abort", "NOT_FOUND")) == grpc.StatusCode.NOT_FOUND
        assert breaker_state(sc) == "closed"
        assert len(up.service.calls) == 4
        assert code_count(sc, "NotFound") == 4


async def test_failure_grpc_status_is_configurable(sidecar):
    async with grpc_server() as up:
        sc = await sidecar(
            grpc_config(
                up.address,
                route_extra=NO_RETRIES,
                service_extra=(
                    "circuit_breaker: { failure_threshold: 2, reset_timeout: 30s, probe: false,"
                    " failure_grpc_status: [5] }"
                ),
            )
        )
        for _ in range(3):
            assert (
                await unary_code(sc.listen, ("x-abort", "UNAVAILABLE"))
                == grpc.StatusCode.UNAVAILABLE
            )
        assert breaker_state(sc) == "closed"
        for _ in range(2):
            assert (
                await unary_code(sc.listen, ("x-abort", "NOT_FOUND")) == grpc.StatusCode.NOT_FOUND
            )
        assert breaker_state(sc) == "open"


OUTLIER = (
    "circuit_breaker: { failure_threshold: 100, failure_rate: false }\n"
    "        outlier_detection:"
    " { consecutive_failures: 2, ejection_time: 30s, max_ejection_percent: 50 }"
)


@pytest.mark.parametrize(
    ("handler", "ejected"),
    [
        (status_only(14), True),
        (message_then_status(14), True),
        (status_only(13), True),
        (status_only(5), False),
        (message_then_status(5), False),
    ],
    ids=[
        "14-trailers-only",
        "14-in-trailers",
        "13-trailers-only",
        "5-trailers-only",
        "5-in-trailers",
    ],
)
async def test_outlier_detection_counts_failure_grpc_status(sidecar, handler, ejected):
    async with grpc_server() as good, raw_h2_server(handler) as bad:
        sc = await sidecar(
            f"""
    services:
      echo:
        endpoints: ["{good.address}", "{bad.address}"]
        protocol: h2c
        {OUTLIER}
    routes:
      - {{ name: echo, match: {{ prefix: /{SERVICE}/ }}, service: echo, {NO_RETRIES} }}
    """
        )
        for _ in range(6):
            client = await RawH2Client.connect(sc.listen)
            await client.call(grpc_head(f"/{SERVICE}/Unary"), frame(b"x"))
            client.close()
        states = [e.state for e in sc.sidecar.runtime.services["echo"].cluster.endpoints]
        assert states == (["healthy", "ejected"] if ejected else ["healthy", "healthy"])
        # Round robin: the bad endpoint had two turns before its ejection, or all three.
        assert bad.streams == (2 if ejected else 3)
        assert len(good.service.calls) == (4 if ejected else 3)


# --------------------------------------------------------------------------- retries


async def unary_call(port: int, *metadata: tuple[str, str]) -> tuple[Any, dict[str, Any]]:
    """One unary call: its code and the head's metadata (x-sidecar-attempts)."""
    async with grpc_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(f"/{SERVICE}/Unary")(b"x", metadata=metadata)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call
        code = await call.code()
        head = dict(await call.initial_metadata() or ())
        if code != grpc.StatusCode.OK:  # Trailers-Only: the fields come as trailers
            head.update(dict(await call.trailing_metadata() or ()))
        return code, head


FIRST_FAILS = (("x-abort", "UNAVAILABLE"), ("x-fail-attempts", "1"))


@pytest.mark.parametrize(
    ("condition", "status"),
    [
        ("cancelled", "CANCELLED"),
        ("deadline-exceeded", "DEADLINE_EXCEEDED"),
        ("internal", "INTERNAL"),
        ("resource-exhausted", "RESOURCE_EXHAUSTED"),
        ("unavailable", "UNAVAILABLE"),
    ],
)
async def test_a_listed_grpc_status_is_retried(sidecar, condition, status):
    async with grpc_server() as up:
        sc = await sidecar(
            grpc_config(
                up.address,
                route_extra=f"retries: {{ retry_on: [{condition}], non_idempotent: true }}",
            )
        )
        code, head = await unary_call(sc.listen, ("x-abort", status), ("x-fail-attempts", "1"))
        assert code == grpc.StatusCode.OK
        assert head["x-sidecar-attempts"] == "2"
        assert [dict(c.metadata)["x-sidecar-attempt"] for c in up.service.calls] == ["1", "2"]
        assert sc.sample("sidecar_retries_total", route="echo", service="echo") == 1
        assert code_count(sc, "OK") == 1


@pytest.mark.parametrize(
    "retries",
    [
        # POST: a retry after anything but a connect failure needs non_idempotent.
        "retries: { retry_on: [unavailable] }",
        # The default retry_on holds no gRPC condition.
        "retries: { non_idempotent: true }",
        # Listed, but another status.
        "retries: { retry_on: [internal], non_idempotent: true }",
    ],
    ids=["without-non_idempotent", "default-retry_on", "other-status"],
)
async def test_a_grpc_status_is_not_retried_unless_allowed(sidecar, retries):
    async with grpc_server() as up:
        sc = await sidecar(grpc_config(up.address, route_extra=retries))
        code, head = await unary_call(sc.listen, *FIRST_FAILS)
        assert code == grpc.StatusCode.UNAVAILABLE
        assert head["x-sidecar-attempts"] == "1"
        assert len(up.service.calls) == 1


async def test_a_status_after_a_message_is_not_retried(sidecar):
    async with grpc_server() as up:
        sc = await sidecar(
            grpc_config(
                up.address, route_extra="retries: { retry_on: [unavailable], non_idempotent: true }"
            )
        )
        # The message reached the app before the status: too late to try again.
        assert await stream_code(sc.listen, *FIRST_FAILS) == grpc.StatusCode.UNAVAILABLE
        assert len(up.service.calls) == 1
        assert sc.sample("sidecar_retries_total", route="echo", service="echo") == 0


async def test_a_connect_failure_is_retried_without_non_idempotent(sidecar):
    async with grpc_server() as up:
        dead = f"127.0.0.1:{free_port()}"
        sc = await sidecar(
            f"""
    services:
      echo: {{ endpoints: ["{dead}", "{up.address}"], protocol: h2c }}
    routes:
      - {{ name: echo, match: {{ prefix: /{SERVICE}/ }}, service: echo }}
    """
        )
        code, head = await unary_call(sc.listen)
        assert code == grpc.StatusCode.OK
        assert head["x-sidecar-attempts"] == "2"  # the dead endpoint first, round robin
        assert len(up.service.calls) == 1


@pytest.mark.parametrize(("non_idempotent", "attempts"), [("false", 1), ("true", 2)])
async def test_a_reset_is_retried_only_with_non_idempotent(sidecar, non_idempotent, attempts):
    async def reset_first(server: RawH2Server, conn: h2.connection.H2Connection, n: int, sid: int):
        if server.streams == 1:
            conn.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
        else:
            await grpc_echo(server, conn, n, sid)

    async with raw_h2_server(reset_first) as raw:
        sc = await sidecar(
            grpc_config(raw.address, route_extra=f"retries: {{ non_idempotent: {non_idempotent} }}")
        )
        response = await raw_call(sc.listen, f"/{SERVICE}/Unary")
        assert response.header(b"x-sidecar-attempts") == b"%d" % attempts
        assert raw.streams == attempts
        if attempts == 1:
            assert_trailers_only(response, "upstream_reset", 14)
        else:
            assert unframe(response.body) == [b"x"]


async def test_the_retried_body_is_the_whole_request(sidecar):
    async with grpc_server() as up:
        sc = await sidecar(
            grpc_config(
                up.address, route_extra="retries: { retry_on: [unavailable], non_idempotent: true }"
            )
        )
        async with grpc_channel(f"127.0.0.1:{sc.listen}") as channel:

            async def messages() -> AsyncIterator[bytes]:
                for i in range(10):
                    yield b"m%d" % i

            call = channel.stream_unary(f"/{SERVICE}/ClientStream")(messages())
            assert await call == b"10:20"


# --------------------------------------------------------------------------- the app's deadline

DEADLINE = ("x-abort", "DEADLINE_EXCEEDED")


@pytest.mark.parametrize("call", [unary_code, stream_code], ids=["trailers-only", "in-trailers"])
async def test_deadline_exceeded_under_the_apps_deadline_is_not_a_failure(sidecar, call):
    async with grpc_server() as up:
        sc = await sidecar(
            grpc_config(
                up.address,
                route_extra=f"timeout: 10s\n        {NO_RETRIES}",
                service_extra=ONE_FAILURE_OPENS,
            )
        )
        # The app's grpc-timeout (5 s) made the deadline shorter than the route's (10 s):
        # the upstream keeping it is the app's doing.
        for _ in range(3):
            assert await call(sc.listen, DEADLINE, timeout=5) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert breaker_state(sc) == "closed"
        assert len(up.service.calls) == 3
        # Without the app's deadline, the same status is the upstream's failure.
        assert await call(sc.listen, DEADLINE) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert breaker_state(sc) == "open"


@pytest.mark.parametrize(
    ("route_extra", "client_timeout"),
    [
        # The app's deadline is longer than the route's: the route's own deadline ran out.
        ("timeout: 2s", 5.0),
        # The attempt's deadline was the per-try timeout, not the app's.
        ("timeout: 10s\n        retries: { max_retries: 0, per_try_timeout: 1s }", 5.0),
    ],
    ids=["longer-than-the-route", "per-try"],
)
@pytest.mark.parametrize("call", [unary_code, stream_code], ids=["trailers-only", "in-trailers"])
async def test_deadline_exceeded_under_the_routes_own_deadline_is_a_failure(
    sidecar, route_extra, client_timeout, call
):
    async with grpc_server() as up:
        sc = await sidecar(
            grpc_config(up.address, route_extra=route_extra, service_extra=ONE_FAILURE_OPENS)
        )
        code = await call(sc.listen, DEADLINE, timeout=client_timeout)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert breaker_state(sc) == "open"


@pytest.mark.parametrize("app_deadline", [True, False])
async def test_the_apps_deadline_does_not_eject(sidecar, app_deadline):
    async with grpc_server() as first, grpc_server() as second:
        sc = await sidecar(
            f"""
    services:
      echo:
        endpoints: ["{first.address}", "{second.address}"]
        protocol: h2c
        circuit_breaker: {{ failure_threshold: 100, failure_rate: false }}
        outlier_detection:
          {{ consecutive_failures: 1, ejection_time: 30s, max_ejection_percent: 50 }}
    routes:
      - name: echo
        match: {{ prefix: /{SERVICE}/ }}
        service: echo
        timeout: 10s
        {NO_RETRIES}
    """
        )
        for _ in range(4):
            await unary_code(sc.listen, DEADLINE, timeout=5 if app_deadline else None)
        states = sorted(e.state for e in sc.sidecar.runtime.services["echo"].cluster.endpoints)
        assert states == (["healthy", "healthy"] if app_deadline else ["ejected", "healthy"])


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    ("handler", "http_status", "code"),
    [
        (http_only(503), 503, "Unavailable"),
        (http_only(404), 404, "Unimplemented"),
        (http_only(401), 401, "Unauthenticated"),
        (http_only(200), 200, "Unknown"),
        (status_only(7), 200, "PermissionDenied"),
        (status_only(99), 200, "Unknown"),
        (message_then_status(16), 200, "Unauthenticated"),
    ],
)
async def test_grpc_code_of_every_answer(sidecar, handler, http_status, code):
    async with raw_h2_server(handler) as raw:
        sc = await sidecar(grpc_config(raw.address, route_extra=NO_RETRIES))
        response = await raw_call(sc.listen, f"/{SERVICE}/Unary")
        assert response.status == http_status
        assert response.header(b"x-sidecar-error") is None  # the upstream's own answer
        assert code_count(sc, code) == 1
        assert requests_count(sc, str(http_status)) == 1
        lines = await sc.access_lines()
        assert [(line["status"], line["error"]) for line in lines] == [(http_status, None)]


async def test_grpc_calls_count_in_the_request_metrics(sidecar):
    async with grpc_server() as up:
        sc = await sidecar(grpc_config(up.address))
        for _ in range(3):
            await unary_code(sc.listen)
        await unary_code(sc.listen, ("x-abort", "NOT_FOUND"))
        assert code_count(sc, "OK") == 3 and code_count(sc, "NotFound") == 1
        assert requests_count(sc, "200") == 4
        assert (
            sc.sample("sidecar_request_duration_seconds_count", route="echo", service="echo") == 4
        )
        assert (
            sc.sample(
                "sidecar_upstream_attempts_total", service="echo", endpoint=up.address, result="2xx"
            )
            == 4
        )
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{sc.admin_url}/metrics") as resp,
        ):
            text = await resp.text()
        assert (
            'sidecar_grpc_responses_total{grpc_code="OK",route="echo",service="echo"} 3.0' in text
        )
        assert 'sidecar_requests_total{code="200",route="echo",service="echo"} 4.0' in text


# --------------------------------------------------------------------------- resends


async def _refuse_first(server: RawH2Server, conn: h2.connection.H2Connection, n: int, sid: int):
    if server.streams == 1:
        conn.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
    else:
        RawH2Server.grpc_answer(conn, sid, b"second try")


async def _goaway_first(server: RawH2Server, conn: h2.connection.H2Connection, n: int, sid: int):
    if n == 1:
        conn.close_connection(error_code=ErrorCodes.NO_ERROR, last_stream_id=0)
    else:
        RawH2Server.grpc_answer(conn, sid, b"second try")


@pytest.mark.parametrize("handler", [_refuse_first, _goaway_first], ids=["refused", "goaway"])
async def test_an_unprocessed_stream_is_resent_once_not_as_an_attempt(sidecar, handler):
    async with raw_h2_server(handler) as raw:
        sc = await sidecar(grpc_config(raw.address, route_extra=NO_RETRIES))
        code, head = await unary_call(sc.listen)
        assert code == grpc.StatusCode.OK
        assert head["x-sidecar-attempts"] == "1"
        assert raw.streams == 2 and raw.connections == 2  # resent on a new connection
        assert [s.header(b"x-sidecar-attempt") for s in raw.seen] == [b"1", b"1"]
        assert raw.seen[0].body == raw.seen[1].body == frame(b"x")  # the whole body again
        assert sc.sample("sidecar_retries_total", route="echo", service="echo") == 0


async def test_a_refused_body_larger_than_max_body_bytes_is_not_resent(sidecar):
    async with raw_h2_server(_refuse_first) as raw:
        sc = await sidecar(
            grpc_config(raw.address, route_extra="retries: { max_retries: 0, max_body_bytes: 100 }")
        )
        client = await RawH2Client.connect(sc.listen)
        response = await client.call(grpc_head(f"/{SERVICE}/Unary"), frame(b"m" * 1000))
        message = assert_trailers_only(response, "upstream_reset", 14)
        assert "REFUSED_STREAM" in message and "not sent again" in message
        assert raw.streams == 1


async def test_refused_twice_is_upstream_reset(sidecar):
    async def refuse(server: RawH2Server, conn: h2.connection.H2Connection, n: int, sid: int):
        conn.reset_stream(sid, ErrorCodes.REFUSED_STREAM)

    async with raw_h2_server(refuse) as raw:
        sc = await sidecar(grpc_config(raw.address, route_extra=NO_RETRIES))
        response = await raw_call(sc.listen, f"/{SERVICE}/Unary")
        message = assert_trailers_only(response, "upstream_reset", 14)
        assert "REFUSED_STREAM" in message
        assert raw.streams == 2  # once more, never a third time


# --------------------------------------------------------------------------- flow control


async def test_a_client_that_does_not_read_slows_the_upstream(sidecar):
    total, size = 300, 16384  # 4.7 MiB in all
    async with grpc_server() as up:
        sc = await sidecar(grpc_config(up.address, route_extra="timeout: 60s"))
        client = await RawH2Client.connect(sc.listen)  # windows of 65535, opened only below
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(sid, grpc_head(f"/{SERVICE}/ServerStream"))
        client.conn.send_data(sid, frame(b"%d:%d" % (total, size)), end_stream=True)
        client.flush()
        received = 0
        while received < 65535:  # the client's whole stream window, then nothing more
            events = await client.read_some()
            received += sum(
                len(e.data or b"") for e in events if isinstance(e, h2.events.DataReceived)
            )
        held = -1
        for _ in range(100):  # until the server stops making progress
            await asyncio.sleep(0.02)
            if up.service.streamed == held:
                break
            held = up.service.streamed
        # What the server could hand over is what the windows on the way hold (the
        # client's, the sidecar's towards the server, a socket buffer), not the stream.
        assert received == 65535
        assert up.service.streamed * size <= 16 * 65535 < total * size
        # Reading now lets the whole stream through, in order.
        response = await client.response(sid, timeout=30)
        messages = unframe(response.body)
        assert [int.from_bytes(m[:4], "big") for m in messages] == list(range(total))
        assert response.trailers is not None and (b"grpc-status", b"0") in response.trailers
        assert up.service.streamed == total


# --------------------------------------------------------------------------- byte for byte, breaks


@pytest.mark.parametrize(
    "extra",
    [(), ((b"x-abort", b"NOT_FOUND"), (b"x-message", b"gone: 100% \xc3\xbc"))],
    ids=["messages-and-trailers", "trailers-only"],
)
async def test_the_sidecar_adds_two_fields_and_nothing_else(sidecar, extra):
    async with grpc_server() as up:
        sc = await sidecar(grpc_config(up.address))
        direct = await raw_call(up.port, f"/{SERVICE}/Unary", *extra)
        proxied = await raw_call(sc.listen, f"/{SERVICE}/Unary", *extra)
        names = [name for name, _ in proxied.headers]
        assert names[-2:] == [b"x-sidecar-attempts", b"x-request-id"]
        assert proxied.headers[:-2] == direct.headers
        assert proxied.header(b"x-sidecar-attempts") == b"1"
        assert (proxied.body, proxied.trailers) == (direct.body, direct.trailers)
        assert proxied.head_ended == direct.head_ended == bool(extra)


async def test_an_upstream_that_breaks_mid_stream_resets_the_call(sidecar):
    async def half(server: RawH2Server, conn: h2.connection.H2Connection, n: int, sid: int):
        conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        conn.send_data(sid, frame(b"first")[:4])  # part of a message, then the connection drops

    async with raw_h2_server(half) as raw:
        raw.drop_after_answer = True
        sc = await sidecar(grpc_config(raw.address, route_extra=NO_RETRIES, service_extra=BREAKER))
        for _ in range(2):
            response = await raw_call(sc.listen, f"/{SERVICE}/Unary")
            assert response.reset == ErrorCodes.INTERNAL_ERROR  # never a clean end
        assert code_count(sc, "Internal") == 2
        assert breaker_state(sc) == "open"  # a broken body is the reset it is
        lines = await sc.access_lines()
        assert [line["error"] for line in lines] == ["upstream_reset", "upstream_reset"]


async def test_an_app_that_cancels_cancels_the_upstream_call(sidecar):
    async with grpc_server() as up:
        sc = await sidecar(grpc_config(up.address, service_extra=ONE_FAILURE_OPENS))
        async with grpc_channel(f"127.0.0.1:{sc.listen}") as channel:
            stream = channel.unary_stream(f"/{SERVICE}/ServerStream")(
                b"3:8", metadata=(("x-wait", "1"),)
            )
            await stream.initial_metadata()  # the call is up and waiting
            stream.cancel()
        await eventually(lambda: up.service.cancelled == 1)
        await eventually(lambda: sc.sidecar.proxy.in_flight == 0)
        assert breaker_state(sc) == "closed"  # the app's hang-up is not the upstream's failure
        assert await unary_code(sc.listen) == grpc.StatusCode.OK


# --------------------------------------------------------------------------- the demo


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def _banner_line(proc: Any, needle: str) -> str:
    """The demo banner's line holding `needle` (the banner comes before anything else)."""
    assert proc.proc.stderr is not None
    for _ in range(100):
        line = await asyncio.to_thread(proc.proc.stderr.readline)
        if needle in line:
            return str(line)
        if not line:
            break
    raise AssertionError(f"no banner line with {needle!r}")


async def test_the_demo_banner_grpc_command_calls_the_greeter(spawn, tmp_path):
    ports = (15000, 15001, 19081, 19082, 19083, 19084)
    if any(_listening(p) for p in ports):
        pytest.skip("the demo's fixed ports are in use on this machine")
    proc = spawn("demo", "-c", str(ROOT / "config" / "sidecar.yaml"))
    try:
        command = (await _banner_line(proc, "demo.Echo/Say")).split("#")[0].strip()
        assert "-m sidecar.demo_grpc_call" in command
        await wait_http("http://127.0.0.1:15000/readyz")

        async def run(env: dict[str, str] | None = None) -> str:
            done = await asyncio.to_thread(
                subprocess.run,
                command,
                shell=True,
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            return done.stdout

        outputs = [await run() for _ in range(4)]
        for out in outputs:
            assert "(grpcio): OK" in out
            assert "reply: hello, newcomer (greeter, attempt " in out
        # One call in four is UNAVAILABLE at the greeter; the route retries it.
        found = [re.search(r"x-sidecar-attempts: (\d)", out) for out in outputs]
        attempts = [m.group(1) if m is not None else None for m in found]
        assert attempts == ["1", "1", "1", "2"]

        # Without grpcio, the sidecar's own h2c client makes the same call.
        hidden = tmp_path / "no-grpcio" / "grpc"
        hidden.mkdir(parents=True)
        (hidden / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
        env = dict(os.environ, PYTHONPATH=str(hidden.parent))
        out = await run(env)
        assert "(sidecar h2c client): OK" in out and "reply: hello, newcomer" in out
    finally:
        assert proc.stop() == 0


async def test_the_demo_greeter_is_a_grpc_server_without_grpcio():
    greeter = Greeter()
    server = H2Server(greeter.handle)
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with grpc_channel(f"127.0.0.1:{port}") as channel:
            say = channel.unary_unary(SAY_PATH)
            replies: list[bytes | grpc.StatusCode] = []
            for _ in range(4):
                try:
                    replies.append(await say(b"you"))
                except grpc.aio.AioRpcError as exc:
                    replies.append(exc.code())
            assert replies[:3] == [b"hello, you (greeter, attempt -)"] * 3
            assert replies[3] == grpc.StatusCode.UNAVAILABLE  # one call in four
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary("/demo.Echo/Other")(b"")
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        outcome = await grpc_health_check(Address("127.0.0.1", port), "", 1.0)
        assert outcome.ok, outcome
    finally:
        listener.close()
        await server.close()
