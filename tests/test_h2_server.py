"""The app-facing h2c server (H2Server) on 127.0.0.1, driven by grpcio's client and by
raw frames for every hostile input; and the HTTP/1.1-or-h2 sniffing listener."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import grpc
import h2.events
import h2.settings
import pytest
from aiohttp import web
from h2.errors import ErrorCodes
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame, SettingsFrame
from support import eventually
from support.grpc_peers import RawH2Client, RawResponse, frame, grpc_channel, unframe

from sidecar.config.model import Http2Config
from sidecar.h2frames import FLAG_END_STREAM, PREFACE, FrameReader, FrameType
from sidecar.http.base import Inbound, Responder
from sidecar.http.h2server import WRITE_HIGH_WATER, FloodLimits, H2Server
from sidecar.http.sniff import SniffingFactory

Headers = list[tuple[bytes, bytes]]


def get(path: str = "/", *extra: tuple[bytes, bytes], method: bytes = b"GET") -> Headers:
    return [
        (b":method", method),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", b"app.local"),
        *extra,
    ]


class App:
    """The test handler: what it was asked, and how far it got."""

    def __init__(self) -> None:
        self.calls = 0
        self.seen: list[Inbound] = []
        self.written = 0
        self.running = 0
        self.cancelled = 0
        self.release = asyncio.Event()

    async def handle(self, inbound: Inbound, responder: Responder) -> None:
        self.calls += 1
        self.seen.append(inbound)
        path = inbound.target
        if path.startswith("/test.Echo/"):
            # gRPC echo: each piece of the request body goes back as it is read.
            await responder.start(200, None, [("content-type", "application/grpc")])
            while chunk := await inbound.read_chunk():
                await responder.write(chunk)
            await responder.finish([("grpc-status", "0"), ("x-trailer", "t1")])
        elif path == "/big":
            await responder.start(200, None, [("content-type", "application/octet-stream")])
            for _ in range(64):
                await responder.write(b"z" * 16384)
                self.written += 16384
            await responder.finish()
        elif path in ("/hang", "/wait"):
            self.running += 1
            try:
                if path == "/hang":
                    await asyncio.Event().wait()
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            await responder.send_whole(200, None, [("x-waited", "yes")], b"done", bodyless=False)
        elif path == "/echo":
            body = b""
            while chunk := await inbound.read_chunk():
                body += chunk
            await responder.send_whole(200, None, [("x-len", str(len(body)))], body, bodyless=False)
        elif path == "/early":
            responder.send_interim(103, [("link", "</a.css>; rel=preload")])
            await responder.send_whole(200, None, [], b"after hints", bodyless=False)
        elif path == "/boom":
            raise RuntimeError("the handler broke")
        elif path == "/trailers-only":
            fields = [("content-type", "application/grpc"), ("grpc-status", "14")]
            await responder.send_whole(200, None, fields, b"", bodyless=False)
        else:
            await responder.send_whole(
                200,
                None,
                [("content-type", "text/plain"), ("Content-Length", "99")],
                b"ok",
                bodyless=False,
            )


Started = tuple[App, H2Server, int]


@pytest.fixture
async def h2app() -> AsyncIterator[Callable[..., Awaitable[Started]]]:
    made: list[tuple[asyncio.Server, H2Server]] = []

    async def make(config: Http2Config | None = None, limits: FloodLimits | None = None) -> Started:
        app = App()
        server = H2Server(app.handle, config, limits=limits)
        listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
        made.append((listener, server))
        return app, server, listener.sockets[0].getsockname()[1]

    yield make
    await RawH2Client.close_all()
    for listener, server in made:
        listener.close()
        await server.close()


async def request(client: RawH2Client, headers: Headers, body: bytes | None = None) -> RawResponse:
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(sid, headers, end_stream=body is None)
    if body is not None:
        client.conn.send_data(sid, body, end_stream=True)
    client.flush()
    return await client.response(sid)


async def assert_served(port: int) -> None:
    """Another connection is served while (or after) one was refused."""
    client = await RawH2Client.connect(port)
    try:
        response = await request(client, get("/"))
        assert response.status == 200 and response.body == b"ok"
    finally:
        client.close()


# --------------------------------------------------------------------------- real clients


async def test_grpcio_unary_and_trailers(h2app: Callable[..., Awaitable[Started]]) -> None:
    app, _, port = await h2app()
    async with grpc_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/test.Echo/Unary")(b"hello", timeout=5)
        assert await call == b"hello"
        trailing = await call.trailing_metadata()
        assert ("x-trailer", "t1") in list(trailing or ())
        assert await call.code() == grpc.StatusCode.OK
    inbound = app.seen[0]
    assert inbound.method == "POST"
    assert inbound.version == "2"
    assert inbound.headers["content-type"] == "application/grpc"
    assert inbound.headers["host"] == f"127.0.0.1:{port}"
    assert inbound.headers["te"] == "trailers"


async def test_grpcio_bidi_streaming(h2app: Callable[..., Awaitable[Started]]) -> None:
    _, _, port = await h2app()
    answers: asyncio.Queue[bytes] = asyncio.Queue()

    async def requests() -> AsyncIterator[bytes]:
        for i in range(5):
            yield b"m%d" % i
            assert await asyncio.wait_for(answers.get(), 5) == b"m%d" % i  # interleaved

    async with grpc_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream("/test.Echo/Bidi")(requests(), timeout=10)
        got = []
        async for message in call:
            got.append(message)
            await answers.put(message)
        assert got == [b"m%d" % i for i in range(5)]
        assert await call.code() == grpc.StatusCode.OK


async def test_grpcio_server_streaming_large(h2app: Callable[..., Awaitable[Started]]) -> None:
    _, _, port = await h2app()

    async def requests() -> AsyncIterator[bytes]:
        for i in range(40):
            yield bytes([i]) * 50_000

    async with grpc_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream("/test.Echo/Bidi")(requests(), timeout=20)
        got = [m async for m in call]
        assert got == [bytes([i]) * 50_000 for i in range(40)]


async def test_inbound_fields_and_whole_answer(h2app: Callable[..., Awaitable[Started]]) -> None:
    app, _, port = await h2app()
    client = await RawH2Client.connect(port)
    response = await request(client, get("/x?q=1", (b"x-a", b"1"), (b"x-a", b"2")))
    assert response.status == 200 and response.body == b"ok"
    assert response.header(b"content-type") == b"text/plain"
    assert response.header(b"content-length") is None  # framing is HTTP/2's own
    inbound = app.seen[0]
    assert (inbound.method, inbound.target, inbound.version) == ("GET", "/x?q=1", "2")
    assert inbound.headers.getall("x-a") == ["1", "2"]
    assert next(iter(inbound.headers)) == "host"
    assert inbound.headers["host"] == "app.local"
    assert not inbound.has_body
    echoed = await request(client, get("/echo", method=b"POST"), b"payload")
    assert echoed.body == b"payload" and echoed.header(b"x-len") == b"7"
    assert app.seen[1].has_body and app.seen[1].content_length is None
    client.close()


async def test_trailers_only_is_one_headers_frame(h2app: Callable[..., Awaitable[Started]]) -> None:
    _, _, port = await h2app()
    client = await RawH2Client.connect(port)
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(sid, get("/trailers-only"), end_stream=True)
    client.flush()
    event = await client.until(lambda e: isinstance(e, h2.events.ResponseReceived))
    assert isinstance(event, h2.events.ResponseReceived)
    assert event.stream_ended is not None  # END_STREAM on the HEADERS frame itself
    assert (b"grpc-status", b"14") in (event.headers or [])
    client.close()


async def test_interim_head_before_the_answer(h2app: Callable[..., Awaitable[Started]]) -> None:
    _, _, port = await h2app()
    client = await RawH2Client.connect(port)
    response = await request(client, get("/early"))
    assert response.body == b"after hints"
    (hint,) = [e for e in client.events if isinstance(e, h2.events.InformationalResponseReceived)]
    assert (b":status", b"103") in (hint.headers or [])
    assert (b"link", b"</a.css>; rel=preload") in (hint.headers or [])


async def test_handler_error_resets_the_stream(h2app: Callable[..., Awaitable[Started]]) -> None:
    _, _, port = await h2app()
    client = await RawH2Client.connect(port)
    response = await request(client, get("/boom"))
    assert response.reset == ErrorCodes.INTERNAL_ERROR
    assert (await request(client, get("/"))).status == 200  # the connection goes on
    client.close()


async def test_client_reset_cancels_the_handler(h2app: Callable[..., Awaitable[Started]]) -> None:
    app, server, port = await h2app()
    client = await RawH2Client.connect(port)
    client.conn.send_headers(1, get("/hang"), end_stream=True)
    client.flush()
    await eventually(lambda: app.running == 1)
    client.conn.reset_stream(1, ErrorCodes.CANCEL)
    client.flush()
    await eventually(lambda: app.cancelled == 1)
    await eventually(lambda: server.in_flight == 0)
    client.close()


# --------------------------------------------------------------------------- malformed

MALFORMED = [
    (get("/", (b"connection", b"keep-alive")), "connection-specific header 'connection'"),
    (get("/", (b"keep-alive", b"5")), "connection-specific header 'keep-alive'"),
    (get("/", (b"proxy-connection", b"x")), "connection-specific header 'proxy-connection'"),
    (get("/", (b"transfer-encoding", b"chunked")), "connection-specific header"),
    (get("/", (b"upgrade", b"h2c")), "connection-specific header 'upgrade'"),
    (get("/", (b"te", b"gzip")), "te other than trailers"),
    (get("/", (b"x-a", b"a\rb")), "invalid character in the value of 'x-a'"),
    (get("/", (b"x-a", b"a\nb")), "invalid character in the value of 'x-a'"),
    (get("/", (b"x-a", b"a\x00b")), "invalid character in the value of 'x-a'"),
    (get("/", (b"X-Upper", b"1")), "invalid header name 'X-Upper'"),
    (get("nopath"), ":path does not start with /"),
    (get("/", (b"host", b"other.local")), "host and :authority differ"),
    (get("/", (b"content-length", b"5")), "content-length 5 but no body"),
    ([(b":method", b"GET"), (b":path", b"/")], "missing :method, :scheme or :path"),
    ([*get("/"), (b":status", b"200")], "pseudo-header ':status' is not allowed"),
    ([(b"x-a", b"1"), *get("/")], "pseudo-header after a regular header"),
]


@pytest.mark.parametrize(("headers", "detail"), MALFORMED)
async def test_malformed_request_is_answered_400(
    h2app: Callable[..., Awaitable[Started]], headers: Headers, detail: str
) -> None:
    app, _, port = await h2app()
    client = await RawH2Client.connect(port)
    response = await request(client, headers)
    assert response.status == 400
    assert response.header(b"x-sidecar-error") == b"bad_request"
    body = json.loads(response.body)
    assert body["error"] == "bad_request"
    assert detail in body["detail"]
    assert app.calls == 0  # never reached the handler
    assert (await request(client, get("/"))).status == 200  # a stream error only
    client.close()


async def test_malformed_grpc_request_gets_trailers_only(
    h2app: Callable[..., Awaitable[Started]],
) -> None:
    app, _, port = await h2app()
    client = await RawH2Client.connect(port)
    headers = get("/test.Echo/Unary", (b"content-type", b"application/grpc"), (b"te", b"gzip"))
    response = await request(client, headers)
    assert response.status == 200 and response.body == b""
    assert response.header(b"grpc-status") == b"13"
    assert response.header(b"x-sidecar-error") == b"bad_request"
    assert response.header(b"grpc-message") == b"bad_request: te other than trailers"
    assert app.calls == 0
    client.close()


@pytest.mark.parametrize(("declared", "sent"), [(3, b"12345"), (10, b"123")])
async def test_body_unequal_to_content_length_resets_the_stream(
    h2app: Callable[..., Awaitable[Started]], declared: int, sent: bytes
) -> None:
    _, _, port = await h2app()
    client = await RawH2Client.connect(port)
    headers = get("/echo", (b"content-length", b"%d" % declared), method=b"POST")
    # h2 (client side) checks lengths too; go around it with a hand-made DATA frame.
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(sid, headers)
    client.flush()
    client.write(len(sent).to_bytes(3, "big") + b"\x00\x01" + sid.to_bytes(4, "big") + sent)
    event = await client.until(lambda e: isinstance(e, h2.events.StreamReset))
    assert isinstance(event, h2.events.StreamReset)
    assert event.error_code == ErrorCodes.PROTOCOL_ERROR
    assert not any(isinstance(e, h2.events.ResponseReceived) for e in client.events)
    await assert_served(port)


# --------------------------------------------------------------------------- limits


async def test_settings_advertise_the_limits(h2app: Callable[..., Awaitable[Started]]) -> None:
    config = Http2Config(
        max_concurrent_streams=7,
        max_header_list_size=32768,
        stream_window=70000,
        connection_window=2000000,
    )
    _, _, port = await h2app(config)
    client = await RawH2Client.connect(port)
    await client.until(lambda e: isinstance(e, h2.events.RemoteSettingsChanged))
    remote = client.conn.remote_settings
    assert remote.max_concurrent_streams == 7
    assert remote.max_header_list_size == 32768
    assert remote.initial_window_size == 70000
    assert remote.max_frame_size == 16384
    window = await client.until(
        lambda e: isinstance(e, h2.events.WindowUpdated) and e.stream_id == 0
    )
    assert isinstance(window, h2.events.WindowUpdated)
    assert window.delta == 2000000 - 65535
    client.close()


async def test_streams_beyond_the_limit_are_refused(
    h2app: Callable[..., Awaitable[Started]],
) -> None:
    app, _, port = await h2app(Http2Config(max_concurrent_streams=5))
    client = await RawH2Client.connect(port)
    for i in range(6):
        client.conn.send_headers(1 + 2 * i, get("/wait"), end_stream=True)
    client.flush()
    event = await client.until(lambda e: isinstance(e, h2.events.StreamReset))
    assert isinstance(event, h2.events.StreamReset)
    assert (event.stream_id, event.error_code) == (11, ErrorCodes.REFUSED_STREAM)
    await eventually(lambda: app.running == 5)
    app.release.set()
    for i in range(5):
        assert (await client.response(1 + 2 * i)).body == b"done"
    assert (await request(client, get("/"))).status == 200
    client.close()


async def test_oversized_header_list(h2app: Callable[..., Awaitable[Started]]) -> None:
    app, _, port = await h2app()
    client = await RawH2Client.connect(port)
    # Over the advertised 64 KiB: answered 431 on the stream.
    response = await request(client, get("/", (b"x-big", b"v" * 70_000)))
    assert response.status == 431
    assert "header list of" in json.loads(response.body)["detail"]
    assert app.calls == 0
    # Over twice the limit: the connection is closed.
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(sid, get("/", (b"x-big", b"v" * 140_000)), end_stream=True)
    client.flush()
    goaway = await client.goaway()
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    await client.closed()
    await assert_served(port)


@pytest.mark.parametrize(("frames", "size"), [(80, 0), (12, 16384)])
async def test_continuation_flood(
    h2app: Callable[..., Awaitable[Started]], frames: int, size: int
) -> None:
    _, _, port = await h2app()
    client = await RawH2Client.connect(port)
    client.write(HeadersFrame(1, data=b"\x82", flags=["END_STREAM"]).serialize())
    for _ in range(frames):
        client.write(ContinuationFrame(1, data=b"\x00" * size).serialize())
    goaway = await client.goaway()
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    await client.closed()
    await assert_served(port)


async def test_window_never_opened_bounds_what_is_buffered(
    h2app: Callable[..., Awaitable[Started]],
) -> None:
    app, server, port = await h2app()
    client = await RawH2Client.connect(port)  # windows of 65535, never opened again
    client.conn.send_headers(1, get("/big"), end_stream=True)
    client.flush()
    received = 0
    while received < 65535:
        for event in await client.read_some():
            if isinstance(event, h2.events.DataReceived):
                received += len(event.data or b"")
    # The handler is held at its fourth 16 KiB chunk: three went out whole, and the
    # fourth up to the window's last byte. Nothing more is written or buffered.
    await eventually(lambda: app.written == 3 * 16384)
    (connection,) = server.connections
    assert connection.transport is not None
    assert connection.transport.get_write_buffer_size() == 0
    assert received == 65535
    assert app.written == 3 * 16384 < 64 * 16384
    await assert_served(port)
    client.close()


async def test_app_not_reading_the_socket_bounds_what_is_buffered(
    h2app: Callable[..., Awaitable[Started]],
) -> None:
    """Windows wide open, but the app reads nothing from its socket: the handler waits
    on the socket's write buffer instead of the sidecar buffering the stream."""
    app, server, port = await h2app()
    big = 2**31 - 1
    client = await RawH2Client.connect(
        port, settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: big}, rcvbuf=4096
    )
    client.conn.increment_flow_control_window(big - 65535)
    await eventually(lambda: len(server.connections) == 1)
    (connection,) = server.connections
    assert connection.transport is not None
    sock = connection.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.stop_reading()  # from here on, nothing is read from the socket
    client.conn.send_headers(1, get("/big"), end_stream=True)
    client.flush()
    held = -1
    for _ in range(100):  # until the handler stops making progress
        await asyncio.sleep(0.02)
        if app.written == held:
            break
        held = app.written
    assert app.written < 64 * 16384  # the handler is held, mid-stream
    assert connection.transport.get_write_buffer_size() <= WRITE_HIGH_WATER + 16384 + 9
    await assert_served(port)


# --------------------------------------------------------------------------- floods


async def test_rapid_reset_flood(h2app: Callable[..., Awaitable[Started]]) -> None:
    _, server, port = await h2app()
    client = await RawH2Client.connect(port)
    for i in range(1100):
        sid = 1 + 2 * i
        client.conn.send_headers(sid, get("/hang"), end_stream=True)
        client.conn.reset_stream(sid, ErrorCodes.CANCEL)
        if i % 100 == 99:
            client.flush()
            await asyncio.sleep(0)
    client.flush()
    goaway = await client.goaway()
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    await client.closed()
    await eventually(lambda: server.in_flight == 0)
    await assert_served(port)


@pytest.mark.parametrize("kind", ["ping", "settings"])
async def test_ping_and_settings_floods(
    h2app: Callable[..., Awaitable[Started]], kind: str
) -> None:
    _, _, port = await h2app()
    client = await RawH2Client.connect(port)
    one = (
        PingFrame(0, opaque_data=b"12345678").serialize()
        if kind == "ping"
        else SettingsFrame(0, settings={h2.settings.SettingCodes.ENABLE_PUSH: 0}).serialize()
    )
    client.write(one * 1001)
    goaway = await client.goaway()
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    await client.closed()
    await assert_served(port)


async def test_answers_left_unread(
    h2app: Callable[..., Awaitable[Started]], caplog: pytest.LogCaptureFixture
) -> None:
    limits = FloodLimits(pings=10**9, settings=10**9)  # only the unread rule applies
    _, server, port = await h2app(limits=limits)
    client = await RawH2Client.connect(port, rcvbuf=4096)
    await eventually(lambda: len(server.connections) == 1)
    (connection,) = server.connections
    assert connection.transport is not None
    sock = connection.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # our kernel buffer: small
    client.stop_reading()  # never read an answer
    ping = PingFrame(0, opaque_data=b"abcdefgh").serialize()
    caplog.set_level(logging.INFO, logger="sidecar.h2")
    with pytest.raises(ConnectionError):
        for _ in range(100):  # at most 100,000 PINGs, never reading an answer
            client.write(ping * 1000)
            await client.writer.drain()
            await asyncio.sleep(0.01)  # let the server read and answer
            if not server.connections:
                raise ConnectionResetError("closed")
    await eventually(lambda: not server.connections)
    assert "answers to PING/SETTINGS left unread" in caplog.text
    await assert_served(port)


# --------------------------------------------------------------------------- framing


async def test_invalid_first_frame(h2app: Callable[..., Awaitable[Started]]) -> None:
    _, _, port = await h2app()
    client = await RawH2Client.connect(port, preface=False)
    client.write(PREFACE + PingFrame(0, opaque_data=b"12345678").serialize())
    goaway = await client.goaway()
    assert goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    await client.closed()
    await assert_served(port)


async def test_oversized_frame_header_is_judged_at_once(
    h2app: Callable[..., Awaitable[Started]],
) -> None:
    _, _, port = await h2app()
    client = await RawH2Client.connect(port)
    client.conn.send_headers(1, get("/echo", method=b"POST"))
    client.flush()
    # A DATA frame header announcing 1 MB, and not one byte of its payload.
    client.write((1_000_000).to_bytes(3, "big") + b"\x00\x00" + (1).to_bytes(4, "big"))
    goaway = await client.goaway()
    assert goaway.error_code == ErrorCodes.FRAME_SIZE_ERROR
    await client.closed()
    await assert_served(port)


# --------------------------------------------------------------------------- drain


async def test_goaway_lets_streams_in_flight_finish(
    h2app: Callable[..., Awaitable[Started]],
) -> None:
    app, server, port = await h2app()
    client = await RawH2Client.connect(port)
    client.conn.send_headers(1, get("/wait"), end_stream=True)
    client.flush()
    await eventually(lambda: app.running == 1)
    server.goaway()
    goaway = await client.goaway()
    assert (goaway.error_code, goaway.last_stream_id) == (ErrorCodes.NO_ERROR, 1)
    # A stream opened after the GOAWAY is refused, unprocessed.
    client.write(
        HeadersFrame(3, data=b"\x82\x86\x84", flags=["END_HEADERS", "END_STREAM"]).serialize()
    )
    (connection,) = server.connections
    await eventually(lambda: connection.highest_stream_id == 3)
    app.release.set()
    await client.closed()
    # h2 (client side) stops at a GOAWAY, as our server would without sidecar.h2frames:
    # read the frames ourselves.
    frames = list(FrameReader(expect_preface=False, max_header_block=2**20).feed(bytes(client.raw)))
    kinds = [(f.type, f.stream_id) for f in frames if f.stream_id]
    assert (FrameType.DATA, 1) in kinds  # stream 1 answered in full
    ended = [f for f in frames if f.stream_id == 1 and f.flags & FLAG_END_STREAM]
    assert len(ended) == 1
    (rst,) = [f for f in frames if f.type == FrameType.RST_STREAM]
    assert rst.stream_id == 3
    assert int.from_bytes(rst.payload[:4], "big") == ErrorCodes.REFUSED_STREAM
    assert app.calls == 1
    assert server.in_flight == 0
    await asyncio.wait_for(server.wait_idle(), 5)


# --------------------------------------------------------------------------- sniffing


async def _h1_handler(request: web.BaseRequest) -> web.StreamResponse:
    return web.Response(text=f"h1 {request.path}")


async def _sniffing_round(loop_kind: str) -> None:
    app = App()
    h2server = H2Server(app.handle)
    h1server = web.Server(_h1_handler)
    factory = SniffingFactory(h1server, h2server)
    listener = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/hello") as resp:
                assert resp.status == 200
                assert await resp.text() == "h1 /hello"
            # HTTP/1.1 starting like the preface ("P...") still goes to HTTP/1.1.
            async with session.post(f"http://127.0.0.1:{port}/posted", data=b"x") as resp:
                assert await resp.text() == "h1 /posted"
        client = await RawH2Client.connect(port)
        response = await request(client, get("/"))
        assert (response.status, response.body) == (200, b"ok"), loop_kind
        async with grpc_channel(f"127.0.0.1:{port}") as channel:
            assert await channel.unary_unary("/test.Echo/Unary")(b"g", timeout=5) == b"g"
        assert not factory.undecided
    finally:
        await RawH2Client.close_all()
        listener.close()
        factory.close_undecided()
        await h1server.shutdown(1)
        await h2server.close()


async def test_one_listener_serves_http1_and_h2() -> None:
    await _sniffing_round("asyncio")


def test_one_listener_serves_http1_and_h2_on_uvloop() -> None:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_sniffing_round("uvloop"))


async def test_grpc_message_roundtrip_helpers() -> None:
    assert unframe(frame(b"abc") + frame(b"")) == [b"abc", b""]
