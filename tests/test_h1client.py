"""The upstream HTTP/1.1 client through the sidecar: framing cases real servers produce."""

from __future__ import annotations

import asyncio

from helpers import one_service, read_head

NO_RETRY = "retries: { max_retries: 0 }"


async def test_idle_connection_closed_by_upstream_is_replaced_transparently(
    raw_upstream, sidecar, client
):
    async def one_then_close(reader, writer) -> None:
        # Keep-alive response (no Connection: close), then the server drops the idle socket.
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.1)

    raw = await raw_upstream(one_then_close)
    sc = await sidecar(one_service(raw.address, route_extra=NO_RETRY))
    for _ in range(3):
        async with client.get(f"{sc.url}/api") as resp:
            assert resp.status == 200
            assert resp.headers["x-sidecar-attempts"] == "1"
        await asyncio.sleep(0.3)  # the upstream has closed the pooled connection by now
    assert raw.connections == 3


async def test_interim_responses_are_skipped(raw_upstream, sidecar, client):
    async def early_hints(reader, writer) -> None:
        await read_head(reader)
        writer.write(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\nX-Final: yes\r\n\r\ndone"
        )
        await writer.drain()
        await asyncio.sleep(0.2)

    raw = await raw_upstream(early_hints)
    sc = await sidecar(one_service(raw.address))
    async with client.get(f"{sc.url}/api") as resp:
        assert resp.status == 201
        assert resp.headers["X-Final"] == "yes"
        assert "Link" not in resp.headers
        assert await resp.text() == "done"


async def test_body_delimited_by_close(raw_upstream, sidecar, client):
    async def until_close(reader, writer) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        for part in (b"part-1;", b"part-2;", b"end"):
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.02)

    raw = await raw_upstream(until_close)
    sc = await sidecar(one_service(raw.address))
    async with client.get(f"{sc.url}/api") as resp:
        assert resp.status == 200
        assert await resp.read() == b"part-1;part-2;end"


async def test_chunked_response_is_relayed(raw_upstream, sidecar, client):
    async def chunked(reader, writer) -> None:
        await read_head(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        await writer.drain()
        await asyncio.sleep(0.2)

    raw = await raw_upstream(chunked)
    sc = await sidecar(one_service(raw.address))
    async with client.get(f"{sc.url}/api") as resp:
        assert resp.status == 200
        assert await resp.read() == b"hello world"


async def test_switching_protocols_is_refused(raw_upstream, sidecar, client):
    async def upgrade(reader, writer) -> None:
        await read_head(reader)
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
        )
        await writer.drain()
        await asyncio.sleep(0.5)

    raw = await raw_upstream(upgrade)
    sc = await sidecar(one_service(raw.address, route_extra=NO_RETRY))
    async with client.get(f"{sc.url}/api") as resp:
        assert resp.status == 502
        assert resp.headers["x-sidecar-error"] == "upstream_reset"


async def test_unsolicited_bytes_retire_an_idle_connection(raw_upstream, sidecar, client):
    async def chatty(reader, writer) -> None:
        while True:
            await read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra")  # nobody asked
            await writer.drain()

    raw = await raw_upstream(chatty)
    sc = await sidecar(one_service(raw.address, route_extra=NO_RETRY))
    for _ in range(3):
        async with client.get(f"{sc.url}/api") as resp:
            assert await resp.text() == "ok"
        await asyncio.sleep(0.15)
    # Each stray response got its connection thrown away, never read as the next answer.
    assert raw.connections == 3


async def test_request_head_bytes_are_exact(raw_upstream, sidecar, client):
    seen: list[bytes] = []

    async def record(reader, writer) -> None:
        head = await read_head(reader)
        seen.append(head)
        body = await reader.readexactly(5)
        seen.append(body)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)

    raw = await raw_upstream(record)
    sc = await sidecar(one_service(raw.address))
    async with client.put(
        f"{sc.url}/api/x?q=%C3%A9", data=b"hello", headers={"X-Note": "caf\u00e9"}
    ) as resp:
        assert resp.status == 200
    head, body = seen
    assert head.startswith(b"PUT /api/x?q=%C3%A9 HTTP/1.1\r\n")
    assert b"\r\nContent-Length: 5\r\n" in head
    assert "X-Note: café".encode() in head
    assert b"transfer-encoding" not in head.lower()
    assert body == b"hello"
