"""One request's state, independent of the wire it came on.

    AccessRecord  what the access log line and the request metrics say about it
    StreamedBody  a request body too large to buffer for replay: sent once, as it arrives
    Exchange      what the attempt loop reads and writes: what to send, the deadline, the
                  attempts so far and the last outcome

The proxy fills these from an `Inbound` (sidecar.http.base) of either protocol; nothing
here knows about HTTP/1.1 or HTTP/2.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from sidecar.http.base import Inbound
from sidecar.upstream import Attempt
from sidecar.upstream.base import Body, InterimSink
from sidecar.vocab import Reason


@dataclass(slots=True)
class AccessRecord:
    """The access log's line for one request (docs/contract.md, "Logs")."""

    method: str
    request_id: str | None = None
    route: str | None = None
    service: str | None = None
    path: str | None = None
    status: int = 0
    attempts: int = 0
    duration_ms: float = 0.0
    error: str | None = None  # a Reason, or the reason a relayed answer broke


class StreamedBody:
    """A request body too large to buffer: sent once, straight from the app."""

    __slots__ = ("_inbound", "_prefix", "finished", "started")

    def __init__(self, inbound: Inbound, prefix: bytes = b"") -> None:
        self._inbound = inbound
        self._prefix = prefix  # what was read while deciding it was too large to buffer
        self.started = False
        self.finished = False  # the app sent all of it

    async def chunks(self) -> AsyncIterator[bytes]:
        self.started = True
        if self._prefix:
            yield self._prefix
        while chunk := await self._inbound.read_chunk():
            yield chunk
        self.finished = True


@dataclass(slots=True)
class Exchange:
    """One request's state while its attempts are made."""

    method: str
    target: str  # path (rewritten) and query, as sent upstream
    headers: list[tuple[str, str]]  # end-to-end request headers, without Host
    body: bytes | StreamedBody | None
    deadline: float  # loop time
    max_retries: int
    authority: str | None = None  # None: send the endpoint's address as Host
    content_length: int | None = None  # of a streamed body, when the app declared one
    on_interim: InterimSink | None = None  # where 1xx answers (103 Early Hints) go
    attempts: int = 0
    retries: int = 0
    last: Attempt | None = None
    refused: Reason | None = None  # circuit_open / no_healthy_upstream: no attempt could start
    retry_after: float | None = None
    # The app's own override (x-sidecar-timeout-ms) made the deadline shorter than the
    # route's: a timeout then says nothing about the upstream.
    deadline_from_app: bool = False
    # The last attempt, when it is a response still being relayed: its outcome for the
    # breaker, outlier detection and metrics is settled once the body is through.
    unsettled: Attempt | None = None

    def body_replayable(self) -> bool:
        """Whether the body can be sent again: buffered, absent, or streamed but unread."""
        body = self.body
        return not (isinstance(body, StreamedBody) and body.started)

    def body_for_attempt(self) -> Body:
        body = self.body
        return body.chunks() if isinstance(body, StreamedBody) else body
