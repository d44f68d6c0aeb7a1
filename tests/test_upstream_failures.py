"""Upstreams that misbehave on purpose: the app always gets a clear status, never a hang."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from helpers import free_port, one_service, read_head

NO_RETRY = "retries: { max_retries: 0 }"


async def test_refused_connection_is_upstream_unreachable(sidecar, client):
    dead = f"127.0.0.1:{free_port()}"
    sc = await sidecar(one_service(dead, route_extra=NO_RETRY))
    async with client.get(f"{sc.url}/api") as resp:
        assert resp.status == 502
        assert resp.headers["x-sidecar-error"] == "upstream_unreachable"
        assert resp.headers["x-sidecar-attempts"] == "1"
        body = await resp.json()
        assert body["route"] == "api" and body["service"] == "api"
    assert (
        sc.sample(
            "sidecar_upstream_attempts_total", service="api", endpoint=dead, result="connect_error"
        )
        == 1
    )


async def test_upstream_closing_without_answer_is_upstream_reset(raw_upstream, sidecar, client):
    async def close_at_once(reader, writer) -> None:
        await read_head(reader)

    raw = await raw_upstream(close_at_once)
    sc = await sidecar(one_service(raw.address, route_extra=NO_RETRY))
    async with client.get(f"{sc.url}/api") as resp:
        assert resp.status == 502
        assert resp.headers["x-sidecar-error"] == "upstream_reset"
    assert (
        sc.sample(
            "sidecar_upstream_attempts_total", service="api", endpoint=raw.address, result="reset"
        )
        == 1
    )


async def test_garbage_status_line_is_upstream_reset(raw_upstream, sidecar, client):
    async def garbage(reader, writer) -> None:
        await read_head(reader)
        writer.write(b"SPDY/9 what is this\r\n\r\n\x00\x01\x02")
        await writer.drain()
        await asyncio.sleep(0.5)

    raw = await raw_upstream(garbage)
    sc = await sidecar(one_service(raw.address, route_extra=NO_RETRY))
    async with client.get(f"{sc.url}/api") as resp:
        assert resp.status == 502
        assert resp.headers["x-sidecar-error"] == "upstream_reset"


async def test_malformed_header_is_upstream_reset(raw_upstream, sidecar, client):
    async def bad_head(reader, writer) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\nhello")
        await writer.drain()
        await asyncio.sleep(0.5)

    raw = await raw_upstream(bad_head)
    sc = await sidecar(one_service(raw.address, route_extra=NO_RETRY))
    async with client.get(f"{sc.url}/api") as resp:
        assert resp.status == 502
        assert resp.headers["x-sidecar-error"] == "upstream_reset"


async def test_hanging_upstream_is_timeout_and_counted(upstream, sidecar, client):
    async def hang(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(30)
        return web.Response()

    up = await upstream(hang)
    sc = await sidecar(one_service(up.address, route_extra=f"timeout: 300ms\n        {NO_RETRY}"))
    async with client.get(f"{sc.url}/api") as resp:
        assert resp.status == 504
        assert resp.headers["x-sidecar-error"] == "timeout"
        assert resp.headers["x-sidecar-attempts"] == "1"
    assert sc.sample("sidecar_timeouts_total", route="api", service="api", kind="route") == 1
    assert (
        sc.sample(
            "sidecar_upstream_attempts_total", service="api", endpoint=up.address, result="timeout"
        )
        == 1
    )


async def test_closing_mid_small_body_is_a_clean_502(raw_upstream, sidecar, client):
    async def short_body(reader, writer) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-part")
        await writer.drain()

    raw = await raw_upstream(short_body)
    sc = await sidecar(one_service(raw.address, route_extra=NO_RETRY))
    async with client.get(f"{sc.url}/api") as resp:
        assert resp.status == 502
        assert resp.headers["x-sidecar-error"] == "upstream_reset"


async def test_closing_mid_streamed_body_cuts_the_client_connection(
    raw_upstream, upstream, sidecar, client
):
    async def short_big_body(reader, writer) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 100_000)
        await writer.drain()

    raw = await raw_upstream(short_big_body)
    healthy = await upstream()
    sc = await sidecar(f"""
    services:
      broken: {{ endpoints: ["{raw.address}"] }}
      fine: {{ endpoints: ["{healthy.address}"] }}
    routes:
      - {{ match: {{ prefix: /broken }}, service: broken, retries: {{ max_retries: 0 }} }}
      - {{ match: {{ prefix: /fine }}, service: fine }}
    """)
    import aiohttp

    async with client.get(f"{sc.url}/broken") as resp:
        assert resp.status == 200
        try:
            await resp.read()
            raise AssertionError("a truncated body must not look complete")
        except aiohttp.ClientPayloadError:
            pass
    # Nothing else is disturbed.
    async with client.get(f"{sc.url}/fine") as resp:
        assert resp.status == 200


async def test_one_hanging_upstream_does_not_disturb_another(
    upstream, sidecar, client: aiohttp.ClientSession
):
    async def hang(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(30)
        return web.Response()

    slow, fast = await upstream(hang), await upstream()
    sc = await sidecar(f"""
    services:
      slow: {{ endpoints: ["{slow.address}"] }}
      fast: {{ endpoints: ["{fast.address}"] }}
    routes:
      - {{ match: {{ prefix: /slow }}, service: slow, timeout: 2s }}
      - {{ match: {{ prefix: /fast }}, service: fast }}
    """)

    async def call_slow() -> int:
        async with client.get(f"{sc.url}/slow") as resp:
            return resp.status

    pending = [asyncio.ensure_future(call_slow()) for _ in range(5)]
    await asyncio.sleep(0.1)
    for _ in range(10):
        async with client.get(f"{sc.url}/fast") as resp:
            assert resp.status == 200
    assert not any(p.done() for p in pending)  # the slow ones are still waiting, unharmed
    assert await asyncio.gather(*pending) == [504] * 5


async def test_max_requests_rejects_at_once(upstream, sidecar, client: aiohttp.ClientSession):
    release = asyncio.Event()

    async def held(request: web.Request) -> web.StreamResponse:
        await asyncio.wait_for(release.wait(), 20)
        return web.Response(text="done")

    up = await upstream(held)
    sc = await sidecar(
        one_service(up.address, service_extra="max_requests: 2", route_extra="timeout: 20s")
    )

    async def call() -> int:
        async with client.get(f"{sc.url}/api") as resp:
            return resp.status

    held_calls = [asyncio.ensure_future(call()) for _ in range(2)]
    for _ in range(100):
        if up.hits == 2:
            break
        await asyncio.sleep(0.02)
    assert sc.sample("sidecar_requests_in_flight", service="api") == 2
    async with client.get(f"{sc.url}/api") as resp:
        assert resp.status == 503
        assert resp.headers["x-sidecar-error"] == "overloaded"
        assert resp.headers["x-sidecar-attempts"] == "0"
    assert up.hits == 2
    release.set()
    assert await asyncio.gather(*held_calls) == [200, 200]
    assert sc.sample("sidecar_overloaded_total", service="api") == 1
    assert sc.sample("sidecar_requests_in_flight", service="api") == 0
    assert sc.sample("sidecar_requests_total", route="api", service="api", code="503") == 1


async def test_connect_timeout_when_the_upstream_never_accepts(sidecar, client):
    # A listener whose accept queue is full: the kernel drops further SYNs, so a connect
    # hangs until the sidecar's connect_timeout, exactly like a black-holed address.
    import socket

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex(listener.getsockname())
            fillers.append(s)
        await asyncio.sleep(0.2)
        sc = await sidecar(
            one_service(
                address,
                service_extra="connect_timeout: 200ms",
                route_extra=f"timeout: 10s\n        {NO_RETRY}",
            )
        )
        async with client.get(f"{sc.url}/api") as resp:
            assert resp.status == 502
            assert resp.headers["x-sidecar-error"] == "upstream_unreachable"
            assert "connect" in (await resp.json())["detail"].lower()
        assert (
            sc.sample(
                "sidecar_upstream_attempts_total",
                service="api",
                endpoint=address,
                result="connect_error",
            )
            == 1
        )
        # The route timeout (10 s) was not what ended it.
        assert sc.sample("sidecar_timeouts_total", route="api", service="api", kind="route") == 0
    finally:
        for s in fillers:
            s.close()
        listener.close()
