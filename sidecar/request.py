"""One request's state while its attempts are made, independent of the wire.

`Exchange` is what the attempt loop reads and writes: what to send, the deadline, the
attempts so far and the last outcome. `StreamedBody` is a request body too large to
buffer for replay: sent once, straight from the client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict

from sidecar.upstream import Attempt
from sidecar.vocab import Reason


class StreamedBody:
    """A request body too large to buffer: sent once, straight from the client."""

    __slots__ = ("_content", "_prefix", "_wait_ended", "_wait_started", "started")

    def __init__(self, content: aiohttp.StreamReader, prefix: bytes = b"") -> None:
        self._content = content
        self._prefix = prefix  # what was read while deciding it was too large to buffer
        self.started = False
        # Loop times of the latest wait for the app's bytes (end None: still waiting).
        self._wait_started: float | None = None
        self._wait_ended: float | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        self.started = True
        if self._prefix:
            yield self._prefix
        loop = asyncio.get_running_loop()
        while True:
            self._wait_started, self._wait_ended = loop.time(), None
            chunk = await self._content.readany()
            self._wait_ended = loop.time()
            if not chunk:
                return
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
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes | StreamedBody | None
    deadline: float  # loop time
    max_retries: int
    host_header: str | None = None  # None: send the endpoint's address as Host
    attempts: int = 0
    retries: int = 0
    last: Attempt | None = None
    refused: Reason | None = None  # circuit_open / no_healthy_upstream: no attempt could start
    retry_after: float | None = None
    # The deadline the route's own timeout gives, when a per-request override (e.g.
    # x-sidecar-timeout-ms) set an earlier `deadline`; None otherwise. A timeout only the
    # override caused is the app's doing: it counts for neither breaker nor ejection.
    route_deadline: float | None = None

    def body_replayable(self) -> bool:
        """Whether the body can be sent again: buffered, absent, or streamed but unread."""
        body = self.body
        return not (isinstance(body, StreamedBody) and body.started)
