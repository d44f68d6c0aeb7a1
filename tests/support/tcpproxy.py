"""A real TCP forwarder on 127.0.0.1 that a test can cut or black-hole.

It sits between the code under test and a real server (etcd) to make network faults
happen on cue: `cut()` closes the listener and every connection (connection refused /
reset, as when a server dies), `blackhole()` keeps connections open but drops every byte
(as a partition does: no error, just silence), `restore()` forwards again on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from support import free_port


class TcpProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.mode = "pass"
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.mode = "pass"
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    def blackhole(self) -> None:
        self.mode = "blackhole"

    async def cut(self) -> None:
        self.mode = "cut"
        await self._close_all()

    async def restore(self) -> None:
        await self._close_all()
        await self.start()

    async def close(self) -> None:
        await self._close_all()

    async def _close_all(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for w in list(self._writers):
            w.close()  # each handler then sees EOF and ends on its own
        handlers = list(self._handlers)
        if handlers:
            _, pending = await asyncio.wait(handlers, timeout=5)
            assert not pending, "proxy connections did not close"
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            if self.mode != "pass":
                await reader.read()  # hold the connection open, answer nothing
                return
            try:
                up_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                return
            self._writers.add(upstream)
            await asyncio.gather(self._pump(reader, upstream), self._pump(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    w.close()
                    with contextlib.suppress(Exception):
                        await w.wait_closed()
                    self._writers.discard(w)
            self._handlers.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if self.mode == "pass":  # in blackhole mode bytes vanish, silently
                writer.write(data)
                await writer.drain()
        if self.mode == "pass" and writer.can_write_eof():
            writer.write_eof()
