"""The h2c upstream client's pool: connections per endpoint and the request path.

`H2Pool` picks a connection with a free stream (or dials one, or waits for a slot),
opens the request's stream on it and sends the body; a stream the upstream did not
process is sent once more, on another connection. `_request_fields` builds the
request's HEADERS from the seam's `UpstreamRequest`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final

from sidecar import grpc as grpcwire
from sidecar.config.model import Http2Config
from sidecar.endpoint import Endpoint
from sidecar.tasks import TaskOwner
from sidecar.upstream.base import (
    Body,
    ConnectFailed,
    ConnectTimeout,
    UpstreamBroken,
    UpstreamRequest,
)
from sidecar.upstream.h2.connection import _Connection
from sidecar.upstream.h2.stream import H2Response, _Refused, _StreamGone

if TYPE_CHECKING:
    from sidecar.upstream.base import UpstreamClient, UpstreamResponse

log = logging.getLogger("sidecar.upstream.h2")

MAX_CONNECTIONS_PER_ENDPOINT: Final = 4
_CONNECTION_SPECIFIC: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "http2-settings",
    }
)


def _resendable(body: Body, started: bool) -> bool:
    return body is None or isinstance(body, bytes) or not started


class _Dial:
    """A connect in progress to one endpoint; requests arriving meanwhile wait for it."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.error: ConnectFailed | None = None


class H2Pool:
    """h2c connections per endpoint, shared by every service that speaks h2c."""

    def __init__(
        self,
        config: Http2Config | None = None,
        *,
        max_connections: int = MAX_CONNECTIONS_PER_ENDPOINT,
    ) -> None:
        self.config = config or Http2Config()
        self.max_connections = max_connections
        self._conns: dict[str, list[_Connection]] = {}
        self._dials: dict[str, _Dial] = {}
        self._slots: dict[str, asyncio.Event] = {}
        self._senders = TaskOwner("h2-upstream")
        self._closed = False

    def connections(self, endpoint: Endpoint) -> int:
        """Open connections to `endpoint` taking new streams (for tests and the admin)."""
        return len(self._conns.get(endpoint.key, []))

    async def request(
        self,
        endpoint: Endpoint,
        request: UpstreamRequest,
        *,
        connect_timeout: float,
        deadline: float,
    ) -> H2Response:
        fields = _request_fields(request)
        refused_by: _Connection | None = None
        while True:
            conn = await self._acquire(endpoint, connect_timeout, deadline, avoid=refused_by)
            try:
                return await self._exchange(conn, fields, request, deadline)
            except _Refused as exc:
                started = exc.body_started
                if refused_by is None and started and request.replay is not None:
                    fresh = request.replay()  # the body kept so far, then the rest
                    if fresh is not None:
                        request.body, started = fresh, False
                if refused_by is not None or not _resendable(request.body, started):
                    raise UpstreamBroken(f"{exc}; not sent again", sent=True) from None
                log.debug("upstream %s did not process a stream (%s): sent again", conn.key, exc)
                refused_by = conn  # the resend goes out on another connection

    async def _exchange(
        self,
        conn: _Connection,
        fields: list[tuple[bytes, bytes]],
        request: UpstreamRequest,
        deadline: float,
    ) -> H2Response:
        body = request.body
        stream = conn.open_stream(fields, end=body is None or body == b"")
        stream.on_interim = request.on_interim
        timer = conn.loop.call_at(deadline, conn.expire, stream)
        try:
            if isinstance(body, bytes) and body and len(body) <= conn.window(stream):
                await conn.send_data(stream, body, end=True)  # fits: no task needed
            elif body is not None and body != b"":
                stream.sender = self._senders.spawn(conn.send_body(stream, body), "body")
            await stream.head
        except _Refused as exc:
            conn.finish(stream)
            raise _Refused(str(exc), body_started=stream.body_started) from None
        except _StreamGone:
            conn.finish(stream)
            raise stream.error or UpstreamBroken("the stream closed while sending") from None
        except BaseException:
            conn.finish(stream)
            raise
        finally:
            timer.cancel()
        response = stream.response
        assert response is not None
        return response

    async def _acquire(
        self,
        endpoint: Endpoint,
        connect_timeout: float,
        deadline: float,
        *,
        avoid: _Connection | None = None,
    ) -> _Connection:
        """A connection with room for one more stream; `avoid` (the one that refused a
        stream) only when no other can be had or opened."""
        key = endpoint.key
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise ConnectFailed("the h2c pool is closed")
            conns = self._conns.setdefault(key, [])
            best: _Connection | None = None
            for conn in conns:
                if conn is avoid:
                    continue
                if conn.usable and conn.room() > 0 and (best is None or conn.room() > best.room()):
                    best = conn
            if best is not None:
                return best
            if (
                avoid is not None
                and len(conns) >= self.max_connections
                and avoid.usable
                and avoid.room() > 0
            ):
                return avoid
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError("no free HTTP/2 stream before the attempt's deadline")
            dial = self._dials.get(key)
            if dial is not None:
                async with asyncio.timeout(remaining):
                    await dial.done.wait()
                if dial.error is not None:
                    raise type(dial.error)(str(dial.error))
                continue
            if len(conns) < self.max_connections:
                return await self._dial(endpoint, connect_timeout, deadline)
            slot = self._slots.setdefault(key, asyncio.Event())
            slot.clear()
            async with asyncio.timeout(remaining):
                await slot.wait()

    async def _dial(
        self, endpoint: Endpoint, connect_timeout: float, deadline: float
    ) -> _Connection:
        key = endpoint.key
        loop = asyncio.get_running_loop()
        dial = _Dial()
        self._dials[key] = dial
        try:
            remaining = deadline - loop.time()
            limit = min(connect_timeout, remaining)
            try:
                async with asyncio.timeout(limit):
                    _, protocol = await loop.create_connection(
                        lambda: _Connection(self, key),
                        endpoint.address.host,
                        endpoint.address.port,
                    )
            except TimeoutError:
                if connect_timeout < remaining:
                    dial.error = ConnectTimeout(f"connect timeout after {limit * 1000:.0f}ms")
                    raise dial.error from None
                raise TimeoutError("the attempt's deadline passed while connecting") from None
            except OSError as exc:
                dial.error = ConnectFailed(exc.strerror or str(exc))
                raise dial.error from None
            conn = protocol
            if self._closed:
                conn.close()
                raise ConnectFailed("the h2c pool is closed")
            self._conns.setdefault(key, []).append(conn)
            return conn
        finally:
            del self._dials[key]
            dial.done.set()

    def notify(self, key: str) -> None:
        slot = self._slots.get(key)
        if slot is not None:
            slot.set()

    def retire(self, conn: _Connection) -> None:
        """No new streams on `conn` (GOAWAY, idle, forgotten); its streams finish."""
        conns = self._conns.get(conn.key)
        if conns is not None and conn in conns:
            conns.remove(conn)
        conn.draining = True
        self.notify(conn.key)

    def remove(self, conn: _Connection) -> None:
        self.retire(conn)

    def forget(self, endpoint: Endpoint) -> None:
        """Discovery removed `endpoint`: idle connections close now, busy ones when
        their streams end."""
        for conn in list(self._conns.get(endpoint.key, [])):
            self.retire(conn)
            if not conn.streams:
                conn.close()
        self._conns.pop(endpoint.key, None)
        self._slots.pop(endpoint.key, None)

    async def close(self) -> None:
        """Close every connection; in-flight exchanges fail with UpstreamBroken."""
        self._closed = True
        for conns in list(self._conns.values()):
            for conn in list(conns):
                conn.close()
        self._conns.clear()
        await self._senders.close()


def _request_fields(request: UpstreamRequest) -> list[tuple[bytes, bytes]]:
    fields: list[tuple[bytes, bytes]] = [
        (b":method", request.method.encode("ascii")),
        (b":scheme", b"http"),
        (b":path", request.target.encode("utf-8", "surrogateescape")),
        (b":authority", request.authority.encode("utf-8", "surrogateescape")),
    ]
    has_te = False
    grpc = False
    declared = False
    for name, value in request.headers:
        lname = name.lower()
        if lname in _CONNECTION_SPECIFIC:
            declared = declared or lname == "content-length"
            continue
        if lname == "te":
            if value.strip().lower() != "trailers":
                continue
            has_te = True
        elif lname == "content-type":
            grpc = grpcwire.is_grpc(value)
        fields.append(
            (lname.encode("utf-8", "surrogateescape"), value.encode("utf-8", "surrogateescape"))
        )
    if grpc and not has_te:
        fields.append((b"te", b"trailers"))
    # A length only where the app declared one: HTTP/2 frames bodies by itself, and a
    # gRPC server would hand an added content-length to the service as metadata.
    body = request.body
    if isinstance(body, bytes):
        if declared:
            fields.append((b"content-length", b"%d" % len(body)))
    elif body is not None and request.content_length is not None:
        fields.append((b"content-length", b"%d" % request.content_length))
    return fields


if TYPE_CHECKING:

    def _implements_the_seam(pool: H2Pool, response: H2Response) -> None:
        # mypy checks here that both classes satisfy the client seam's Protocols.
        client: UpstreamClient = pool
        head: UpstreamResponse = response
        del client, head
