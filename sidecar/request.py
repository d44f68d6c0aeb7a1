"""One request's state, independent of the wire it came on.

    AccessRecord  what the access log line and the request metrics say about it
    StreamedBody  a request body too large to buffer for replay: sent once, as it arrives
    Exchange      what the attempt loop reads and writes: what to send, the deadline, the
                  attempts so far and the last outcome

The proxy fills these from an `Inbound` (sidecar.http.base) of either protocol; nothing
here knows about HTTP/1.1 or HTTP/2.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from sidecar.upstream import Attempt
from sidecar.upstream.base import Body, InterimSink
from sidecar.vocab import Reason


@dataclass(slots=True)
class AccessRecord:
    """The access log's line for one request (docs/contract.md#logs)."""

    method: str
    grpc: bool = False  # a gRPC call (content-type application/grpc...)
    request_id: str | None = None
    trace_id: str | None = None
    traced: bool = False  # the app sent a valid traceparent (its trace is known elsewhere)
    route: str | None = None
    service: str | None = None
    path: str | None = None
    status: int = 0
    attempts: int = 0
    duration_ms: float = 0.0
    error: str | None = None  # a Reason, or the reason a relayed answer broke
    grpc_code: int | None = None  # a gRPC call's final status, as the app saw it


class BodySource(Protocol):
    """What a `StreamedBody` reads: the app's body in chunks (every `Inbound` is one)."""

    async def read_chunk(self) -> bytes:
        """The next piece of the body; b"" at its end."""
        ...


class StreamedBody:
    """A request body sent as it arrives, straight from the app.

    With `keep` > 0 (gRPC calls, which stream both ways and cannot wait for the whole
    body), what was sent is also kept, up to `keep` bytes, so a retry can send it again:
    then the body stays replayable while it is within that bound. Without it the body is
    sent once (it is larger than a route lets the sidecar buffer).
    """

    __slots__ = (
        "_inbound",
        "_keep",
        "_kept",
        "_kept_bytes",
        "_prefix",
        "_wait_ended",
        "_wait_started",
        "started",
    )

    def __init__(self, inbound: BodySource, prefix: bytes = b"", *, keep: int = 0) -> None:
        self._inbound = inbound
        self._prefix = prefix  # what was read while deciding it was too large to buffer
        self._keep = keep
        # What was sent so far, while within `keep`; None once it is not (or never kept).
        self._kept: list[bytes] | None = None
        self._kept_bytes = len(prefix)
        if keep > 0:
            self._kept = [prefix] if prefix else []
        self.started = False
        # Loop times of the latest wait for the app's bytes (end None: still waiting).
        self._wait_started: float | None = None
        self._wait_ended: float | None = None

    @property
    def replayable(self) -> bool:
        """Whether another attempt can send this body whole: nothing of it went out
        yet, or all that went out was kept."""
        return not self.started or self._kept is not None

    async def chunks(self) -> AsyncIterator[bytes]:
        kept = self._kept
        if self.started and kept is not None:
            # A retry: first what the earlier attempt sent, then the rest as it comes.
            for piece in list(kept):
                yield piece
        else:
            self.started = True
            if self._prefix:
                yield self._prefix
        loop = asyncio.get_running_loop()
        while True:
            self._wait_started, self._wait_ended = loop.time(), None
            chunk = await self._inbound.read_chunk()
            self._wait_ended = loop.time()
            if not chunk:
                return
            kept = self._kept
            if kept is not None:
                self._kept_bytes += len(chunk)
                if self._kept_bytes <= self._keep:
                    kept.append(chunk)
                else:
                    self._kept = None  # too large to replay: this is its only attempt
            yield chunk

    def waiting_for_app_at(self, when: float) -> bool:
        """Whether the sidecar was waiting for the app's next body bytes at loop time
        `when` (an attempt's deadline): then the app, not the upstream, was slow."""
        start, end = self._wait_started, self._wait_ended
        return start is not None and start <= when and (end is None or end >= when)


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
    grpc: bool = False  # a gRPC call: grpc-timeout per attempt, statuses in trailers
    attempts: int = 0
    retries: int = 0
    last: Attempt | None = None
    refused: Reason | None = None  # circuit_open / no_healthy_upstream: no attempt could start
    retry_after: float | None = None
    # The deadline the route's own timeout gives, when a per-request override (e.g.
    # x-sidecar-timeout-ms) set an earlier `deadline`; None otherwise. A timeout only the
    # override caused is the app's doing: it counts for neither breaker nor ejection.
    route_deadline: float | None = None
    # Whether the latest attempt's own timeout is one only such an override made shorter
    # (then an upstream's DEADLINE_EXCEEDED in its trailers is the app's doing too).
    apps_deadline: bool = False
    # The last attempt, when it is a response still being relayed: its outcome for the
    # breaker, outlier detection and metrics is settled once the body is through.
    unsettled: Attempt | None = None

    def body_replayable(self) -> bool:
        """Whether the body can be sent again: buffered, absent, or streamed but unread
        (or kept whole while it streamed)."""
        body = self.body
        return not isinstance(body, StreamedBody) or body.replayable

    def replay_body(self) -> AsyncIterator[bytes] | None:
        """The streamed body once more, for a client's resend of a stream the upstream
        did not process; None when it can no longer be sent whole."""
        body = self.body
        if isinstance(body, StreamedBody) and body.replayable:
            return body.chunks()
        return None

    def body_for_attempt(self) -> Body:
        body = self.body
        return body.chunks() if isinstance(body, StreamedBody) else body
