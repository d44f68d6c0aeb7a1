"""The h2c upstream client (H2Pool) against real peers: grpcio's server, and raw h2
servers that refuse streams or send GOAWAY on purpose."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import h2.connection
import pytest
from h2.errors import ErrorCodes
from support import eventually, free_port
from support.grpc_peers import SERVICE, RawH2Server, frame, grpc_server, unframe

from sidecar import grpc as grpcwire
from sidecar.config.model import Address, Http2Config
from sidecar.endpoint import Endpoint
from sidecar.upstream.base import ConnectFailed, UpstreamBroken, UpstreamRequest
from sidecar.upstream.h2 import H2Pool, H2Response

GRPC = [("content-type", "application/grpc"), ("te", "trailers")]


def endpoint(port: int) -> Endpoint:
    return Endpoint(Address("127.0.0.1", port))


def grpc_request(
    method: str,
    port: int,
    body: bytes | AsyncIterator[bytes] | None,
    metadata: list[tuple[str, str]] | None = None,
) -> UpstreamRequest:
    return UpstreamRequest(
        "POST", f"/{SERVICE}/{method}", f"127.0.0.1:{port}", GRPC + (metadata or []), body
    )


async def call(
    pool: H2Pool, port: int, request: UpstreamRequest, timeout: float = 5.0
) -> H2Response:
    loop = asyncio.get_running_loop()
    return await pool.request(
        endpoint(port), request, connect_timeout=1.0, deadline=loop.time() + timeout
    )


@pytest.fixture
async def pool() -> AsyncIterator[H2Pool]:
    p = H2Pool()
    yield p
    await p.close()


async def test_unary_metadata_and_trailers_byte_for_byte(pool: H2Pool) -> None:
    async with grpc_server() as server:
        md = [("x-md", "a b"), ("x-md-bin", base64.b64encode(b"\x00\x01\xfe").decode())]
        response = await call(
            pool, server.port, grpc_request("Unary", server.port, frame(b"hi"), md)
        )
        assert response.status == 200
        assert response.headers["content-type"] == "application/grpc"
        assert response.headers["x-initial"] == "i1"
        assert base64.b64decode(response.headers["x-initial-bin"] + "==") == b"\x00\xff"
        assert unframe(await response.read()) == [b"echo:hi"]
        trailers = response.trailers
        assert trailers is not None
        assert trailers["grpc-status"] == "0"
        assert trailers.getall("x-trailer") == ["t1", "t2"]
        assert base64.b64decode(trailers["x-trailer-bin"] + "==") == b"\x01\x02\x03"
        response.release()
        seen = dict(server.service.calls[0].metadata)
        assert seen["x-md"] == "a b"
        assert seen["x-md-bin"] == b"\x00\x01\xfe"
        assert "content-length" not in seen  # nothing added to the app's metadata


async def test_deadline_is_seen_by_the_server(pool: H2Pool) -> None:
    async with grpc_server() as server:
        request = grpc_request(
            "Unary", server.port, frame(b"x"), [("grpc-timeout", grpcwire.format_timeout(2.0))]
        )
        response = await call(pool, server.port, request)
        await response.read()
        response.release()
        remaining = server.service.calls[0].time_remaining
        assert remaining is not None
        assert 0 < remaining <= 2.0


async def test_server_streaming(pool: H2Pool) -> None:
    async with grpc_server() as server:
        request = grpc_request("ServerStream", server.port, frame(b"50:1000"))
        response = await call(pool, server.port, request)
        messages = unframe(await response.read())
        assert len(messages) == 50
        assert [int.from_bytes(m[:4], "big") for m in messages] == list(range(50))
        assert response.trailers is not None and response.trailers["grpc-status"] == "0"
        response.release()


async def test_client_streaming(pool: H2Pool) -> None:
    async def body() -> AsyncIterator[bytes]:
        for i in range(20):
            yield frame(b"m" * (i + 1))
            await asyncio.sleep(0)

    async with grpc_server() as server:
        response = await call(pool, server.port, grpc_request("ClientStream", server.port, body()))
        assert unframe(await response.read()) == [b"20:210"]
        response.release()


async def test_bidi_streaming_interleaves(pool: H2Pool) -> None:
    """The next request message is sent only after the answer to the previous one
    arrived: this finishes only if the body is sent while the response streams."""
    answered: asyncio.Queue[bytes] = asyncio.Queue()

    async def body() -> AsyncIterator[bytes]:
        for i in range(5):
            yield frame(b"n%d" % i)
            got = await asyncio.wait_for(answered.get(), 5)
            assert got == b"echo:n%d" % i

    async with grpc_server() as server:
        response = await call(pool, server.port, grpc_request("Bidi", server.port, body()))
        pending = b""
        async for chunk in response.iter_chunks(idle_timeout=5):
            pending += chunk
            while len(pending) >= 5 and len(pending) >= 5 + int.from_bytes(pending[1:5], "big"):
                size = int.from_bytes(pending[1:5], "big")
                await answered.put(pending[5 : 5 + size])
                pending = pending[5 + size :]
        assert response.trailers is not None and response.trailers["grpc-status"] == "0"
        response.release()


async def test_status_in_trailers_and_trailers_only(pool: H2Pool) -> None:
    async with grpc_server() as server:
        md = [("x-abort", "NOT_FOUND"), ("x-message", "no such thing: ünï 100%")]
        response = await call(pool, server.port, grpc_request("Unary", server.port, frame(b""), md))
        body = await response.read()
        response.release()
        # Aborted before anything was sent: a Trailers-Only answer, one HEADERS frame.
        assert body == b""
        assert response.trailers is None
        assert response.headers["grpc-status"] == "5"
        message = response.headers["grpc-message"]
        assert message == grpcwire.encode_message("no such thing: ünï 100%")
        assert grpcwire.decode_message(message) == "no such thing: ünï 100%"
        assert grpcwire.status_of(response.status, response.headers.get("grpc-status")) == 5


async def test_unknown_method_is_unimplemented(pool: H2Pool) -> None:
    async with grpc_server() as server:
        request = UpstreamRequest("POST", "/nope.Nope/X", server.address, GRPC, frame(b""))
        response = await call(pool, server.port, request)
        await response.read()
        response.release()
        trailers = response.trailers if response.trailers is not None else {}
        status = response.headers.get("grpc-status") or trailers.get("grpc-status")
        assert status == "12"


async def test_streams_share_one_connection(pool: H2Pool) -> None:
    async with grpc_server() as server:

        async def one(i: int) -> bytes:
            response = await call(
                pool, server.port, grpc_request("Unary", server.port, frame(b"%d" % i))
            )
            data = await response.read()
            response.release()
            return data

        results = await asyncio.gather(*(one(i) for i in range(20)))
        assert [unframe(r) for r in results] == [[b"echo:%d" % i] for i in range(20)]
        assert pool.connections(endpoint(server.port)) == 1


async def test_more_streams_than_the_peer_allows_open_another_connection() -> None:
    pool = H2Pool(max_connections=2)
    try:
        async with grpc_server(**{"grpc.max_concurrent_streams": 2}) as server:
            first = await call(pool, server.port, grpc_request("Unary", server.port, frame(b"")))
            await first.read()
            first.release()  # the peer's SETTINGS (2 streams) are in by now
            waits = [("x-wait", "1")]
            # grpcio sends the response head with the first message: held until release.
            held = [
                asyncio.ensure_future(
                    call(
                        pool,
                        server.port,
                        grpc_request("ServerStream", server.port, frame(b"1:8"), waits),
                    )
                )
                for _ in range(4)
            ]
            await eventually(lambda: len(server.service.calls) == 5)
            assert pool.connections(endpoint(server.port)) == 2
            server.service.release.set()
            for task in held:
                response = await task
                assert len(unframe(await response.read())) == 1
                response.release()
    finally:
        await pool.close()


async def test_deadline_resets_the_stream(pool: H2Pool) -> None:
    async with grpc_server() as server:
        request = grpc_request("Unary", server.port, frame(b"x"), [("x-sleep", "10")])
        with pytest.raises(TimeoutError):
            await call(pool, server.port, request, timeout=0.3)
        # The server's handler is cancelled by our RST_STREAM, long before its sleep ends.
        await eventually(lambda: server.service.cancelled == 1)
        # The connection is still good for the next call.
        response = await call(pool, server.port, grpc_request("Unary", server.port, frame(b"y")))
        assert unframe(await response.read()) == [b"echo:y"]
        response.release()


async def test_release_mid_stream_cancels_upstream(pool: H2Pool) -> None:
    async with grpc_server() as server:
        request = grpc_request("ServerStream", server.port, frame(b"100000:1000"))
        response = await call(pool, server.port, request)
        async for _chunk in response.iter_chunks(idle_timeout=5):
            break
        response.release()
        await eventually(lambda: server.service.cancelled == 1)
        assert server.service.streamed < 100000


async def test_flow_control_slow_reader_slows_the_server() -> None:
    config = Http2Config(stream_window=65535, connection_window=1048576)
    pool = H2Pool(config)
    total = 300
    try:
        async with grpc_server() as server:
            request = grpc_request("ServerStream", server.port, frame(b"%d:65536" % total))
            response = await call(pool, server.port, request)
            # We read nothing: the stream window (64 KiB) fills and stays full.
            await eventually(lambda: response.buffered >= 65535 - 16384)
            held = server.service.streamed
            await asyncio.sleep(0.3)
            assert response.buffered <= 65535  # bounded by our window, not by the stream
            assert server.service.streamed < total  # the server was slowed, not finished
            # Reading now lets the whole stream through, byte for byte.
            messages = unframe(await response.read(idle_timeout=10))
            assert len(messages) == total
            assert server.service.streamed == total >= held
            response.release()
    finally:
        await pool.close()


async def test_graceful_server_shutdown_lets_the_stream_finish(pool: H2Pool) -> None:
    async with grpc_server() as server:
        request = grpc_request("ServerStream", server.port, frame(b"3:100"), [("x-wait", "1")])
        response = await call(pool, server.port, request)
        stopping = asyncio.ensure_future(server.server.stop(grace=5))
        await asyncio.sleep(0.2)  # the server sends GOAWAY while our stream is open
        server.service.release.set()
        messages = unframe(await response.read(idle_timeout=5))
        assert len(messages) == 3
        assert response.trailers is not None and response.trailers["grpc-status"] == "0"
        response.release()
        await stopping


async def _refuse_first(
    server: RawH2Server, conn: h2.connection.H2Connection, n: int, sid: int
) -> None:
    if server.streams == 1:
        conn.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
    else:
        RawH2Server.answer(conn, sid, b"served")


async def test_refused_stream_is_sent_again_once(pool: H2Pool) -> None:
    raw = RawH2Server(_refuse_first)
    await raw.start()
    try:
        request = UpstreamRequest("POST", "/x", "svc", [("content-type", "text/plain")], b"body")
        response = await call(pool, raw.port, request)
        assert response.status == 200
        assert await response.read() == b"served"
        response.release()
        assert raw.streams == 2
    finally:
        await raw.close()


async def _refuse_all(
    server: RawH2Server, conn: h2.connection.H2Connection, n: int, sid: int
) -> None:
    conn.reset_stream(sid, ErrorCodes.REFUSED_STREAM)


async def test_refused_twice_is_an_error(pool: H2Pool) -> None:
    raw = RawH2Server(_refuse_all)
    await raw.start()
    try:
        with pytest.raises(UpstreamBroken, match="REFUSED_STREAM"):
            await call(pool, raw.port, UpstreamRequest("GET", "/x", "svc", [], None))
        assert raw.streams == 2
    finally:
        await raw.close()


async def test_refused_stream_with_a_started_body_is_not_sent_again(pool: H2Pool) -> None:
    raw = RawH2Server(_refuse_first)
    await raw.start()
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(2):
            pulled += 1
            yield b"part"

    try:
        with pytest.raises(UpstreamBroken, match="not sent again"):
            await call(pool, raw.port, UpstreamRequest("POST", "/x", "svc", [], body()))
        assert raw.streams == 1
        assert pulled == 2
    finally:
        await raw.close()


async def _goaway_first(
    server: RawH2Server, conn: h2.connection.H2Connection, n: int, sid: int
) -> None:
    if n == 1:
        conn.close_connection(error_code=ErrorCodes.NO_ERROR, last_stream_id=0)
    else:
        RawH2Server.answer(conn, sid, b"second connection")


async def test_stream_above_goaway_last_stream_is_sent_again(pool: H2Pool) -> None:
    raw = RawH2Server(_goaway_first)
    await raw.start()
    try:
        response = await call(pool, raw.port, UpstreamRequest("GET", "/x", "svc", [], None))
        assert await response.read() == b"second connection"
        response.release()
        assert raw.connections == 2
    finally:
        await raw.close()


async def _reset_internal(
    server: RawH2Server, conn: h2.connection.H2Connection, n: int, sid: int
) -> None:
    conn.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)


async def test_other_resets_are_upstream_broken(pool: H2Pool) -> None:
    raw = RawH2Server(_reset_internal)
    await raw.start()
    try:
        with pytest.raises(UpstreamBroken, match="INTERNAL_ERROR"):
            await call(pool, raw.port, UpstreamRequest("GET", "/x", "svc", [], None))
        assert raw.streams == 1  # not sent again
    finally:
        await raw.close()


async def test_connect_refused(pool: H2Pool) -> None:
    port = free_port()
    with pytest.raises(ConnectFailed):
        await call(pool, port, UpstreamRequest("GET", "/", "svc", [], None))


async def _half_answer(
    server: RawH2Server, conn: h2.connection.H2Connection, n: int, sid: int
) -> None:
    conn.send_headers(sid, [(b":status", b"200")])
    conn.send_data(sid, b"part of it")


async def test_connection_lost_mid_response_is_upstream_broken(pool: H2Pool) -> None:
    raw = RawH2Server(_half_answer)
    raw.drop_after_answer = True
    await raw.start()
    try:
        response = await call(pool, raw.port, UpstreamRequest("GET", "/x", "svc", [], None))
        with pytest.raises(UpstreamBroken, match=r"connection lost|closed the connection"):
            await response.read(idle_timeout=5)
        response.release()
    finally:
        await raw.close()


async def test_forget_closes_idle_connections(pool: H2Pool) -> None:
    async with grpc_server() as server:
        response = await call(pool, server.port, grpc_request("Unary", server.port, frame(b"a")))
        await response.read()
        response.release()
        assert pool.connections(endpoint(server.port)) == 1
        pool.forget(endpoint(server.port))
        assert pool.connections(endpoint(server.port)) == 0
        response = await call(pool, server.port, grpc_request("Unary", server.port, frame(b"b")))
        assert unframe(await response.read()) == [b"echo:b"]
        response.release()
        assert pool.connections(endpoint(server.port)) == 1


async def _hints_first(
    server: RawH2Server, conn: h2.connection.H2Connection, n: int, sid: int
) -> None:
    conn.send_headers(sid, [(b":status", b"103"), (b"link", b"</x>")])
    RawH2Server.answer(conn, sid, b"final")


async def test_interim_heads_reach_the_sink(pool: H2Pool) -> None:
    raw = RawH2Server(_hints_first)
    await raw.start()
    seen: list[tuple[int, list[tuple[str, str]]]] = []
    try:
        request = UpstreamRequest("GET", "/x", "svc", [], None)
        request.on_interim = lambda status, fields: seen.append((status, list(fields)))
        response = await call(pool, raw.port, request)
        assert (response.status, await response.read()) == (200, b"final")
        response.release()
        assert seen == [(103, [("link", "</x>")])]
    finally:
        await raw.close()
