"""A raw HTTP/1.1 upstream that answers each request with bytes the test chose.

`ScriptedUpstream(responder)` parses each request it gets (head and body, by
Content-Length or chunked, as the sidecar sends them) and asks `responder(request)` what
to send back: a `Reply` (bytes, when to send them, what to do after) or plain bytes
(sent at once; the connection stays open for the next request). It records what it saw
(`requests`, `connections`), so tests count on the upstream side instead of timing.

What a `Reply` can do after writing: keep the connection for the next request, close it
(FIN; an RST when request bytes were left unread, as the kernel does), reset it
(SO_LINGER 0), or hang (neither answer more nor close). `idle_close` closes connections
that wait longer than that for their next request, as servers with a keep-alive timeout do.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal

After = Literal["keep", "close", "reset", "hang"]


@dataclass
class SeenRequest:
    connection: int  # 1 for the upstream's first connection
    method: str
    target: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    raw_head: bytes


@dataclass
class Reply:
    data: bytes = b""
    after: After = "keep"
    read_body: bool = True  # False (with answer_before_body): leave the body unread
    delay: float = 0.0  # before answering
    pieces: list[bytes] | None = None  # sent one by one, `pause` apart (instead of data)
    pause: float = 0.0


Responder = Callable[[SeenRequest], "Reply | bytes"]


@dataclass
class ScriptedUpstream:
    responder: Responder
    idle_close: float | None = None
    # True: ask the responder right after the head (the body is not read yet, and is only
    # read if its Reply says `read_body`); False: after the body, which it then sees.
    answer_before_body: bool = False
    port: int = 0
    connections: int = 0
    idle_closed: int = 0  # connections this upstream closed for being idle
    closed_by_client: int = 0  # connections the client closed while they were idle
    bytes_written: int = 0  # response bytes handed to the kernel
    requests: list[SeenRequest] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> ScriptedUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=1 << 20)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        # Handlers end by themselves once their connections close (cancelling them makes
        # asyncio's stream callback log the cancellation as an error).
        self._stopping.set()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2)
            for task in pending:
                task.cancel()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        number = self.connections
        try:
            await self._conversation(number, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def _conversation(
        self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            try:
                async with asyncio.timeout(self.idle_close):
                    head = await reader.readuntil(b"\r\n\r\n")
            except TimeoutError:
                self.idle_closed += 1
                return
            except asyncio.IncompleteReadError as exc:
                if not exc.partial:
                    self.closed_by_client += 1
                return
            request = _parse_head(number, head)
            if self.answer_before_body:
                reply = self.responder(request)
                if isinstance(reply, bytes):
                    reply = Reply(reply)
                if reply.read_body:
                    request.body = await _read_body(reader, request.headers)
            else:
                request.body = await _read_body(reader, request.headers)
                reply = self.responder(request)
                if isinstance(reply, bytes):
                    reply = Reply(reply)
            self.requests.append(request)
            if reply.delay:
                await asyncio.sleep(reply.delay)
            if reply.pieces is not None:
                for piece in reply.pieces:
                    writer.write(piece)
                    await writer.drain()
                    self.bytes_written += len(piece)
                    if reply.pause:
                        await asyncio.sleep(reply.pause)
            elif reply.data:
                writer.write(reply.data)
                await writer.drain()
                self.bytes_written += len(reply.data)
            if reply.after == "keep":
                continue
            if reply.after == "reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            if reply.after == "hang":
                await self._stopping.wait()
            return  # close


@contextlib.asynccontextmanager
async def scripted_upstream(
    responder: Responder, *, idle_close: float | None = None, answer_before_body: bool = False
) -> AsyncIterator[ScriptedUpstream]:
    upstream = await ScriptedUpstream(
        responder, idle_close=idle_close, answer_before_body=answer_before_body
    ).start()
    try:
        yield upstream
    finally:
        await upstream.close()


def _parse_head(number: int, head: bytes) -> SeenRequest:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return SeenRequest(number, method, target, headers, b"", head)


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() != "chunked":
        return b""
    parts: list[bytes] = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers from the sidecar
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


def response(
    status: int = 200,
    body: bytes = b"",
    headers: list[tuple[str, str]] | None = None,
    *,
    reason: str = "OK",
    length: bool = True,
) -> bytes:
    """A well-formed response's bytes (Content-Length unless `length` is False)."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines.extend(f"{n}: {v}" for n, v in headers or [])
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
