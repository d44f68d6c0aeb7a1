"""Real HTTP/2 and gRPC peers for the h2 tests: grpcio servers and clients, raw h2 peers.

The gRPC service `test.Echo` is served by grpcio's asyncio server through generic
handlers with no (de)serializers, so messages are raw bytes both ways and no .proto is
compiled. `RawH2Server` is a small h2 (python-hyper) server for what grpcio will not do
on purpose (refuse a stream, send GOAWAY before processing). `RawH2Client` writes and
reads frames for the hostile-input tests. All on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_async
from h2.errors import ErrorCodes

SERVICE = "test.Echo"


def frame(message: bytes) -> bytes:
    """One gRPC Length-Prefixed-Message, uncompressed."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def unframe(data: bytes) -> list[bytes]:
    """The messages of a gRPC body (asserts it is whole)."""
    out = []
    while data:
        assert len(data) >= 5, data
        size = int.from_bytes(data[1:5], "big")
        assert len(data) >= 5 + size
        out.append(data[5 : 5 + size])
        data = data[5 + size :]
    return out


@dataclass
class SeenCall:
    method: str
    metadata: list[tuple[str, str | bytes]]
    time_remaining: float | None


@dataclass
class EchoService:
    """What the grpcio server saw and did, for the tests to count."""

    calls: list[SeenCall] = field(default_factory=list)
    streamed: int = 0  # messages the server-streaming handler has handed to grpcio
    cancelled: int = 0  # handlers that saw their call cancelled
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def _seen(self, name: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        metadata = [(key, value) for key, value in context.invocation_metadata() or ()]
        self.calls.append(SeenCall(name, metadata, context.time_remaining()))

    @staticmethod
    def _control(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
        return {
            key: value
            for key, value in context.invocation_metadata() or ()
            if key.startswith("x-") and isinstance(value, str)
        }

    @staticmethod
    def _fails(control: dict[str, str]) -> bool:
        """Whether this attempt aborts: `x-abort` names the code, and `x-fail-attempts`
        (a comma list of the sidecar's x-sidecar-attempt numbers) limits it to those."""
        if "x-abort" not in control:
            return False
        only = control.get("x-fail-attempts")
        return only is None or control.get("x-sidecar-attempt") in only.split(",")

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        self._seen("Unary", context)
        control = self._control(context)
        try:
            if "x-sleep" in control:
                await asyncio.sleep(float(control["x-sleep"]))
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self._fails(control):
            await context.abort(grpc.StatusCode[control["x-abort"]], control.get("x-message", ""))
        await context.send_initial_metadata((("x-initial", "i1"), ("x-initial-bin", b"\x00\xff")))
        context.set_trailing_metadata(
            (("x-trailer", "t1"), ("x-trailer-bin", b"\x01\x02\x03"), ("x-trailer", "t2"))
        )
        return b"echo:" + request

    async def server_stream(
        self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        self._seen("ServerStream", context)
        count, size = (int(x) for x in request.decode().split(":"))
        control = self._control(context)
        finished = False
        try:
            if "x-wait" in control:
                await context.send_initial_metadata((("x-waiting", "1"),))  # the head, now
                await self.release.wait()
            for i in range(count):
                yield i.to_bytes(4, "big") + b"x" * (size - 4)
                self.streamed += 1
            finished = True
        finally:
            # A cancelled call reaches a suspended generator as CancelledError or, when
            # grpcio closes it, GeneratorExit.
            if not finished:
                self.cancelled += 1
        if self._fails(control):
            # After the messages: the status comes in the trailers, not Trailers-Only.
            await context.abort(grpc.StatusCode[control["x-abort"]], control.get("x-message", ""))

    async def client_stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        self._seen("ClientStream", context)
        total = 0
        count = 0
        async for message in requests:
            total += len(message)
            count += 1
        return f"{count}:{total}".encode()

    async def bidi(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        self._seen("Bidi", context)
        async for message in requests:
            yield b"echo:" + message

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
                "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
                "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
            },
        )


class Health:
    """The server's real grpc.health.v1 service (grpcio-health-checking)."""

    def __init__(self) -> None:
        self.servicer = health_async.HealthServicer()

    async def set(self, service: str, status: str) -> None:
        """`status`: SERVING, NOT_SERVING, ... (HealthCheckResponse.ServingStatus)."""
        value = health_pb2.HealthCheckResponse.ServingStatus.Value(status)
        await self.servicer.set(service, value)


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    port: int
    service: EchoService
    health: Health

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def grpc_server(**options: Any) -> AsyncIterator[GrpcServer]:
    """A grpcio asyncio server with `test.Echo` and grpc.health.v1 on a free loopback port."""
    service = EchoService()
    health = Health()
    server = grpc.aio.server(options=list(options.items()))
    server.add_generic_rpc_handlers((service.handler(),))
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield GrpcServer(server, port, service, health)
    finally:
        await server.stop(0)


@dataclass(frozen=True)
class RawChannel:
    """A grpcio channel whose calls carry raw bytes both ways: no (de)serializers, so
    grpcio hands the messages through as they are (and the types say so)."""

    channel: grpc.aio.Channel

    def unary_unary(self, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
        return self.channel.unary_unary(method)

    def unary_stream(self, method: str) -> grpc.aio.UnaryStreamMultiCallable[bytes, bytes]:
        return self.channel.unary_stream(method)

    def stream_unary(self, method: str) -> grpc.aio.StreamUnaryMultiCallable[bytes, bytes]:
        return self.channel.stream_unary(method)

    def stream_stream(self, method: str) -> grpc.aio.StreamStreamMultiCallable[bytes, bytes]:
        return self.channel.stream_stream(method)


@contextlib.asynccontextmanager
async def grpc_channel(address: str) -> AsyncIterator[RawChannel]:
    """An insecure grpcio channel to `address` for raw-bytes calls."""
    async with grpc.aio.insecure_channel(address) as channel:
        yield RawChannel(channel)


# --------------------------------------------------------------------------- raw h2


RawHandler = Callable[["RawH2Server", h2.connection.H2Connection, int, int], Awaitable[None]]


@dataclass
class RawSeen:
    """One request a `RawH2Server` received: its header block as sent, and its body."""

    connection: int
    stream_id: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    ended: bool = False

    def header(self, name: bytes) -> bytes | None:
        return dict(self.headers).get(name)


class RawH2Server:
    """An h2 server whose behaviour per stream is scripted by `on_request`.

    `on_request(server, conn, connection_number, stream_id)` runs for each request once
    it has ended; `connections` and `streams` count what arrived, `seen` lists every
    request (its raw header block and body) from the moment its HEADERS arrive."""

    def __init__(self, on_request: RawHandler) -> None:
        self.on_request = on_request
        self.connections = 0
        self.streams = 0
        self.port = 0
        self.seen: list[RawSeen] = []
        self.drop_after_answer = False  # cut the TCP connection after on_request wrote
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._open: dict[tuple[int, int], RawSeen] = {}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def request(self, connection: int, stream_id: int) -> RawSeen:
        """The request on `stream_id` of connection number `connection`."""
        return self._open[(connection, stream_id)]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self._writers.append(writer)
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        assert event.stream_id is not None
                        seen = RawSeen(number, event.stream_id, list(event.headers or []))
                        self._open[(number, event.stream_id)] = seen
                        self.seen.append(seen)
                    elif isinstance(event, h2.events.DataReceived):
                        opened = self._open.get((number, event.stream_id or 0))
                        if opened is not None:
                            opened.body += event.data or b""
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.StreamEnded):
                        assert event.stream_id is not None
                        self.streams += 1
                        opened = self._open.get((number, event.stream_id))
                        if opened is not None:
                            opened.ended = True
                        task = asyncio.get_running_loop().create_task(
                            self._run(conn, writer, number, event.stream_id)
                        )
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
                writer.write(conn.data_to_send())
        except (ConnectionError, h2.exceptions.ProtocolError):
            return
        finally:
            writer.close()

    async def _run(
        self, conn: h2.connection.H2Connection, writer: asyncio.StreamWriter, n: int, sid: int
    ) -> None:
        await self.on_request(self, conn, n, sid)
        with contextlib.suppress(ConnectionError):
            writer.write(conn.data_to_send())
        if self.drop_after_answer:
            await writer.drain()
            writer.transport.abort()

    @staticmethod
    def answer(conn: h2.connection.H2Connection, stream_id: int, body: bytes) -> None:
        conn.send_headers(stream_id, [(b":status", b"200"), (b"x-served", b"yes")])
        conn.send_data(stream_id, body, end_stream=True)

    @staticmethod
    def grpc_answer(
        conn: h2.connection.H2Connection, stream_id: int, message: bytes, status: int = 0
    ) -> None:
        """A gRPC answer: one message, then trailers with `grpc-status`."""
        conn.send_headers(stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        conn.send_data(stream_id, frame(message))
        conn.send_headers(stream_id, [(b"grpc-status", b"%d" % status)], end_stream=True)


async def grpc_echo(
    server: RawH2Server, conn: h2.connection.H2Connection, n: int, sid: int
) -> None:
    """A `RawH2Server` handler answering every call with its own request body's messages."""
    RawH2Server.grpc_answer(conn, sid, b"".join(unframe(server.request(n, sid).body)))


@contextlib.asynccontextmanager
async def raw_h2_server(on_request: RawHandler = grpc_echo) -> AsyncIterator[RawH2Server]:
    server = RawH2Server(on_request)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


class RawH2Client:
    """A client connection that writes whatever it is told, and reads h2 events.

    Every client made is listed in `opened`; `close_all()` (a fixture's teardown)
    closes what a test left open."""

    opened: ClassVar[list[RawH2Client]] = []

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: h2.connection.H2Connection,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = conn
        self.events: list[h2.events.Event] = []
        self.raw = bytearray()  # everything received, for tests that parse frames
        self.eof = False

    @classmethod
    async def connect(
        cls,
        port: int,
        *,
        settings: dict[h2.settings.SettingCodes, int] | None = None,
        preface: bool = True,
        rcvbuf: int | None = None,
    ) -> RawH2Client:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=2**20)
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        if settings:
            conn.local_settings = h2.settings.Settings(client=True, initial_values=settings)
        client = cls(reader, writer, conn)
        cls.opened.append(client)
        if preface:
            conn.initiate_connection()
            client.flush()
        return client

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def stop_reading(self) -> None:
        """Read nothing more from the socket: what the server sends stays in the kernel."""
        # open_connection's transport reads and writes; StreamWriter types it write-only.
        cast(asyncio.Transport, self.writer.transport).pause_reading()

    async def read_some(self, timeout: float = 5.0) -> list[h2.events.Event]:
        """Whatever arrives next (at least one read), as h2 events."""
        try:
            async with asyncio.timeout(timeout):
                data = await self.reader.read(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return []
        self.raw += data
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            events = []
        self.events.extend(events)
        self.flush()
        return events

    async def until(
        self, predicate: Callable[[h2.events.Event], bool], timeout: float = 5.0
    ) -> h2.events.Event:
        """The first event (already seen or next) matching `predicate`."""
        for event in self.events:
            if predicate(event):
                return event
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not self.eof:
            for event in await self.read_some(max(0.01, end - loop.time())):
                if predicate(event):
                    return event
        raise AssertionError(f"connection closed before the event; saw {self.events}")

    async def closed(self, timeout: float = 5.0) -> None:
        """Read until the server closes the connection."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not self.eof:
            await self.read_some(max(0.01, end - loop.time()))

    async def goaway(self, timeout: float = 5.0) -> h2.events.ConnectionTerminated:
        event = await self.until(lambda e: isinstance(e, h2.events.ConnectionTerminated), timeout)
        assert isinstance(event, h2.events.ConnectionTerminated)
        return event

    async def response(self, stream_id: int, timeout: float = 5.0) -> RawResponse:
        """The whole response on `stream_id` (acknowledging its data)."""
        result = RawResponse()
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                seen += 1
                if getattr(event, "stream_id", None) != stream_id:
                    continue
                if isinstance(event, h2.events.ResponseReceived):
                    result.headers = list(event.headers or [])
                    result.head_ended = event.stream_ended is not None
                elif isinstance(event, h2.events.DataReceived):
                    result.body += event.data or b""
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length or 0, stream_id
                    )
                    self.flush()
                elif isinstance(event, h2.events.TrailersReceived):
                    result.trailers = list(event.headers or [])
                elif isinstance(event, h2.events.StreamEnded):
                    return result
                elif isinstance(event, h2.events.StreamReset):
                    result.reset = ErrorCodes(event.error_code or 0)
                    return result
            if self.eof:
                raise AssertionError(f"connection closed; saw {self.events}")
            await self.read_some(max(0.01, end - loop.time()))

    async def call(
        self, headers: list[tuple[bytes, bytes]], body: bytes | None = None, timeout: float = 5.0
    ) -> RawResponse:
        """Send one request on the next stream (its body in one DATA frame) and read the
        whole response."""
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, headers, end_stream=body is None)
        if body is not None:
            self.conn.send_data(sid, body, end_stream=True)
        self.flush()
        return await self.response(sid, timeout)

    def close(self) -> None:
        self.writer.close()

    @classmethod
    async def close_all(cls) -> None:
        for client in cls.opened:
            client.writer.close()
            with contextlib.suppress(ConnectionError):
                await client.writer.wait_closed()
        cls.opened.clear()


def grpc_head(
    path: str, *extra: tuple[bytes, bytes], authority: bytes = b"sidecar.test"
) -> list[tuple[bytes, bytes]]:
    """The header block of a gRPC call, as grpcio's client writes it."""
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", authority),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        *extra,
    ]


@dataclass
class RawResponse:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] | None = None
    reset: ErrorCodes | None = None
    head_ended: bool = False  # END_STREAM on the response HEADERS: Trailers-Only

    @property
    def status(self) -> int:
        return int(dict(self.headers)[b":status"])

    def header(self, name: bytes) -> bytes | None:
        return dict(self.headers).get(name)
