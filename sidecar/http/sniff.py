"""One listening port for HTTP/1.1 and HTTP/2: the first bytes decide.

`SniffingFactory` is the protocol factory given to `loop.create_server`. Each connection
starts with a `Sniffer`, which holds the first bytes (at most the 24 of the HTTP/2
connection preface, `PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n`). As soon as they match the
preface the connection is handed to the HTTP/2 protocol; at the first byte that differs
it goes to the HTTP/1.1 protocol (aiohttp's `RequestHandler` in production). The new
protocol replaces the sniffer on the transport (`transport.set_protocol`, which both
asyncio's and uvloop's transports implement), is told `connection_made`, and is given
the bytes held so far, so neither protocol knows a sniffer was there.

A connection that closes or sends EOF before deciding goes to HTTP/1.1 with what it
sent, which answers or closes it as it would any short request. A connection that has
not decided within `timeout` (60 s, as the HTTP/1.1 side's head timeout) is closed, and
those still undecided when the listener stops are closed by `close_undecided()`. `Upgrade: h2c`
over HTTP/1.1 is refused by the HTTP/1.1 side as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from sidecar.h2frames import PREFACE

ProtocolFactory = Callable[[], asyncio.BaseProtocol]


class Sniffer(asyncio.Protocol):
    """A connection's protocol until its first bytes say which HTTP it speaks."""

    def __init__(self, factory: SniffingFactory) -> None:
        self._factory = factory
        self._transport: asyncio.Transport | None = None
        self._held = b""
        self.decided = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._factory.undecided.add(self)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._factory.timeout, self.close)

    def data_received(self, data: bytes) -> None:
        if self.decided:  # pragma: no cover - the transport calls the new protocol
            return
        held = self._held + data
        probe = held[: len(PREFACE)]
        if not PREFACE.startswith(probe):
            self._hand_over(self._factory.h1_factory(), held)
        elif len(probe) == len(PREFACE):
            self._hand_over(self._factory.h2_factory(), held)
        else:
            self._held = held  # a prefix of the preface: wait for more

    def eof_received(self) -> bool | None:
        if self.decided:  # pragma: no cover
            return None
        protocol = self._hand_over(self._factory.h1_factory(), self._held)
        if protocol is None:
            return None
        return protocol.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._settle()

    def _settle(self) -> None:
        self._factory.undecided.discard(self)
        self._held = b""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _hand_over(self, protocol: asyncio.BaseProtocol, held: bytes) -> asyncio.Protocol | None:
        self.decided = True
        self._settle()
        transport = self._transport
        if transport is None or transport.is_closing():
            return None
        stream = cast(asyncio.Protocol, protocol)
        transport.set_protocol(stream)
        stream.connection_made(transport)
        if held and not transport.is_closing():
            stream.data_received(held)
        return stream

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class SniffingFactory:
    """Protocol factory for a listener serving both HTTP/1.1 and h2c."""

    def __init__(
        self, h1_factory: ProtocolFactory, h2_factory: ProtocolFactory, *, timeout: float = 60.0
    ) -> None:
        self.h1_factory = h1_factory
        self.h2_factory = h2_factory
        self.timeout = timeout
        self.undecided: set[Sniffer] = set()

    def __call__(self) -> Sniffer:
        return Sniffer(self)

    def close_undecided(self) -> None:
        """Close connections that have not said which HTTP they speak (drain)."""
        for sniffer in list(self.undecided):
            sniffer.close()
        self.undecided.clear()
