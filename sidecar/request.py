"""One request's state while its attempts are made, independent of the wire.

`Exchange` is what the attempt loop reads and writes: what to send, the deadline, the
attempts so far and the last outcome. `StreamedBody` is a request body too large to
buffer for replay: sent once, straight from the client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict

from sidecar.upstream import Attempt
from sidecar.vocab import Reason


class StreamedBody:
    """A request body too large to buffer: sent once, straight from the client."""

    __slots__ = ("_content", "_prefix", "started")

    def __init__(self, content: aiohttp.StreamReader, prefix: bytes = b"") -> None:
        self._content = content
        self._prefix = prefix  # what was read while deciding it was too large to buffer
        self.started = False

    async def chunks(self) -> AsyncIterator[bytes]:
        self.started = True
        if self._prefix:
            yield self._prefix
        while chunk := await self._content.readany():
            yield chunk


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

    def body_replayable(self) -> bool:
        """Whether the body can be sent again: buffered, absent, or streamed but unread."""
        body = self.body
        return not (isinstance(body, StreamedBody) and body.started)
