"""The one-shot endpoint probes, against real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio

from helpers import free_port, read_head

from sidecar.cluster.probes import http_probe, tcp_probe
from sidecar.config.model import Address


def addr(port: int) -> Address:
    return Address("127.0.0.1", port)


async def test_tcp_probe_passes_when_a_connection_is_accepted(raw_upstream) -> None:
    async def idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await raw_upstream(idle)
    assert await tcp_probe(addr(server.port), 1.0)
    assert await tcp_probe(addr(server.port), 1.0)
    assert server.connections == 2  # a fresh connection each time


async def test_tcp_probe_fails_when_refused() -> None:
    assert not await tcp_probe(addr(free_port()), 1.0)


async def test_http_probe_sends_the_path_and_passes_on_2xx(raw_upstream) -> None:
    heads: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await read_head(reader))
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()

    server = await raw_upstream(answer)
    assert await http_probe(addr(server.port), "/healthz", 1.0)
    [head] = heads
    assert head.startswith(b"GET /healthz HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}\r\n".encode() in head
    assert b"Connection: close\r\n" in head


async def test_http_probe_fails_on_other_statuses_and_on_garbage(raw_upstream) -> None:
    replies = [
        b"HTTP/1.1 503 Service Unavailable\r\n\r\n",
        b"HTTP/1.1 301 Moved\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n",
        b"HTTP/1.1 2000 Nope\r\n\r\n",
        b"",
    ]

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(replies.pop(0))
        await writer.drain()

    server = await raw_upstream(answer)
    results = [await http_probe(addr(server.port), "/", 1.0) for _ in range(5)]
    assert results == [False] * 5
    assert server.connections == 5


async def test_http_probe_fails_when_refused_or_silent(raw_upstream) -> None:
    assert not await http_probe(addr(free_port()), "/", 1.0)

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await raw_upstream(silent)
    assert not await http_probe(addr(server.port), "/", 0.1)
