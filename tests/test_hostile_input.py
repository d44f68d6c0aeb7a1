"""Crafted requests get 400 and a closed connection; nothing reaches an upstream.

docs/contract.md#hostile-input.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from helpers import one_service
from support import eventually

from sidecar import server as sidecar_server


async def raw_exchange(port: int, data: bytes) -> tuple[bytes, bool]:
    """Send raw bytes; return what came back and whether the server closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    chunks = []
    closed = False
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            if not chunk:
                closed = True
                break
            chunks.append(chunk)
    except TimeoutError:
        pass
    writer.close()
    return b"".join(chunks), closed


REFUSED = tuple(f"HTTP/1.{v} {s}".encode() for v in (0, 1) for s in (400, 414, 431))

SMUGGLING = {
    "cl_and_te": (
        b"POST /api HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "two_content_lengths": (
        b"POST /api HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde"
    ),
    "bad_content_length": b"POST /api HTTP/1.1\r\nHost: a\r\nContent-Length: 4x\r\n\r\nabcd",
    "negative_content_length": b"POST /api HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    "te_not_ending_in_chunked": (
        b"POST /api HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n"
    ),
    "te_identity": b"POST /api HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n",
    "bad_chunk_size": (
        b"POST /api HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n"
    ),
    "space_before_colon": b"GET /api HTTP/1.1\r\nHost: a\r\nContent-Length : 0\r\n\r\n",
    "bare_lf_garbage": b"GET /api HTTP/1.1\nHost: a\n\x00\x01\n\n",
    "not_http": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
async def test_ambiguous_framing_is_refused(name, upstream, sidecar, client):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    data, closed = await raw_exchange(sc.listen, SMUGGLING[name])
    # aiohttp answers a request it could not parse as HTTP/1.0; the status is what counts.
    assert data.startswith((b"HTTP/1.1 400", b"HTTP/1.0 400")), data[:200]
    assert closed, "the connection must be closed after a framing error"
    assert b"bad_request" in data
    assert up.hits == 0
    # The sidecar keeps serving others.
    async with client.get(f"{sc.url}/api") as resp:
        assert resp.status == 200


async def test_oversized_head_is_refused_and_next_request_served(upstream, sidecar, client):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    long_line = b"GET /api/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    data, _closed = await raw_exchange(sc.listen, long_line)
    assert data.startswith(REFUSED), data[:100]
    many = b"GET /api HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(500)) + b"\r\n"
    data, _closed = await raw_exchange(sc.listen, many)
    assert data.startswith(REFUSED), data[:100]
    huge_value = b"GET /api HTTP/1.1\r\nX-Big: " + b"v" * 100_000 + b"\r\n\r\n"
    data, _closed = await raw_exchange(sc.listen, huge_value)
    assert data.startswith(REFUSED), data[:100]
    assert up.hits == 0
    async with client.get(f"{sc.url}/api") as resp:
        assert resp.status == 200


async def test_slow_client_does_not_starve_others(upstream, sidecar, client):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    slow = []
    for _ in range(20):
        _reader, writer = await asyncio.open_connection("127.0.0.1", sc.listen)
        writer.write(b"GET /api HTTP/1.1\r\nHost: a\r\nX-Slow: ")  # never finishes the head
        await writer.drain()
        slow.append(writer)
    for _ in range(10):
        async with client.get(f"{sc.url}/api") as resp:
            assert resp.status == 200
    for writer in slow:
        writer.close()
    assert up.hits == 10


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("x-sidecar-timeout-ms", "soon"),
        ("x-sidecar-timeout-ms", "-5"),
        ("x-sidecar-timeout-ms", "0"),
        ("x-sidecar-timeout-ms", "1e9"),
        ("x-sidecar-max-retries", "lots"),
        ("x-sidecar-max-retries", "-1"),
        ("x-sidecar-max-retries", "99999999999999999999"),
    ],
)
async def test_garbage_override_headers_are_bad_request(header, value, upstream, sidecar, client):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    async with client.get(f"{sc.url}/api", headers={header: value}) as resp:
        assert resp.status == 400
        assert resp.headers["x-sidecar-error"] == "bad_request"
        assert (await resp.json())["error"] == "bad_request"
    assert up.hits == 0


async def test_override_headers_only_lower_the_configured_values(upstream, sidecar, client):
    up = await upstream()
    sc = await sidecar(one_service(up.address, route_extra="timeout: 2s"))
    async with client.get(f"{sc.url}/api", headers={"x-sidecar-timeout-ms": "999999"}) as resp:
        assert resp.status == 200
    async with client.get(f"{sc.url}/api", headers={"x-sidecar-timeout-ms": "500"}) as resp:
        assert resp.status == 200
    first, second = (int(s.headers["x-sidecar-timeout-ms"]) for s in up.seen)
    assert first <= 2000
    assert second <= 500
    assert "x-sidecar-max-retries" not in up.seen[0].headers


async def test_h2c_upgrade_is_not_forwarded(upstream, sidecar):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    data, _ = await raw_exchange(
        sc.listen,
        b"GET /api HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    # Served as plain HTTP/1.1 (the upgrade is declined), never switched to a tunnel.
    assert not data.startswith(b"HTTP/1.1 101")
    for seen in up.seen:
        assert "upgrade" not in seen.headers
        assert "http2-settings" not in seen.headers


async def test_request_body_that_stalls_gets_504_at_the_route_timeout(upstream, sidecar):
    up = await upstream()
    sc = await sidecar(one_service(up.address, route_extra="timeout: 300ms"))
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.listen)
    # Ten bytes announced, three sent, then nothing: the body never completes.
    writer.write(b"POST /api HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 504 ")
    assert b"x-sidecar-error: timeout" in head
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    error = json.loads(await asyncio.wait_for(reader.readexactly(length), 5))
    assert error["error"] == "timeout"
    assert "request body" in error["detail"]
    writer.close()
    assert up.hits == 0  # nothing of a half-received request goes upstream


async def test_streamed_upload_that_stalls_is_cut_at_the_deadline_and_frees_its_slot(
    upstream, sidecar
):
    up = await upstream()  # reads the whole body before answering: it waits with us
    route = "timeout: 400ms\n        retries: { max_body_bytes: 16 }"
    sc = await sidecar(one_service(up.address, route_extra=route))
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.listen)
    # Larger than max_body_bytes, so it is streamed upstream as it comes; then it stalls.
    writer.write(b"POST /api HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + b"x" * 500)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 504 "), head
    assert b"x-sidecar-error: timeout" in head
    writer.close()
    assert sc.sample("sidecar_timeouts_total", route="api", service="api", kind="route") == 1
    await eventually(lambda: sc.sidecar.runtime.services["api"].in_flight == 0)
    # The app stalled, not the upstream: neither the breaker nor outlier detection count it.
    service = sc.sidecar.runtime.services["api"]
    assert service.breaker.snapshot()["failures"] == 0
    assert service.cluster.endpoints[0].ejection.failures == 0


async def test_a_head_trickled_past_the_head_timeout_is_cut_off(
    upstream, sidecar, client, monkeypatch
):
    monkeypatch.setattr(sidecar_server, "HEAD_TIMEOUT", 0.3)  # a short configured duration
    up = await upstream()
    sc = await sidecar(one_service(up.address, route_extra="timeout: 5s"))

    # Slowloris: a byte of head every 50 ms, never finishing. Closed after ~0.3 s,
    # while another client is served normally.
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.listen)
    writer.write(b"GET /api HTTP/1.1\r\nHost: a\r\n")
    closed = False
    for _ in range(100):  # at most 5 s
        await asyncio.sleep(0.05)
        if reader.at_eof() or writer.is_closing():
            closed = True
            break
        try:
            writer.write(b"X")
            await writer.drain()
        except ConnectionError:
            closed = True
            break
        with contextlib.suppress(TimeoutError):
            if await asyncio.wait_for(reader.read(1), 0.001) == b"":
                closed = True
                break
    writer.close()
    assert closed
    async with client.get(f"{sc.url}/api") as resp:
        assert resp.status == 200

    # A keep-alive connection idle for longer than the head timeout is not a slow head.
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.listen)
    for _ in range(2):
        writer.write(b"GET /api HTTP/1.1\r\nHost: a\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await asyncio.wait_for(reader.readexactly(length), 5)
        await asyncio.sleep(0.6)

    # Nor is a whole head followed by a body that takes longer than the head timeout.
    writer.write(b"POST /api HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\nab")
    for part in (b"cd", b"ef"):
        await asyncio.sleep(0.25)
        writer.write(part)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()
    assert up.seen[-1].body == b"abcdef"


async def test_http10_request_with_transfer_encoding_is_refused_and_closed(
    upstream, sidecar, client
):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    # Keep-alive asked for, and a second request smuggled behind a chunked body.
    smuggled = (
        b"POST /api HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        b"GET /api/second HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    data, closed = await raw_exchange(sc.listen, smuggled)
    assert data.startswith(b"HTTP/1.0 400"), data[:200]
    assert b"bad_request" in data and b"HTTP/1.0 request" in data
    assert data.count(b"\r\n\r\n") == 1, "the bytes behind it were read as a request"
    assert closed
    assert up.hits == 0
    async with client.get(f"{sc.url}/api") as resp:
        assert resp.status == 200


@pytest.mark.parametrize(
    "path",
    ["/api/..%2fadmin/x", "/api/..%2Fadmin", "/api/a%5cb", "/api/a%5Cb", "/api%2F..%2Fadmin"],
)
async def test_escaped_slashes_are_refused_by_default(path, upstream, sidecar, client):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    async with client.get(f"{sc.url}{path}") as resp:
        assert resp.status == 400
        assert resp.headers["x-sidecar-error"] == "bad_request"
        assert "encoded slash" in (await resp.json())["detail"]
    assert up.hits == 0


async def test_escaped_slashes_kept_are_forwarded_as_written_and_never_separate(
    upstream, sidecar, client
):
    api, admin = await upstream(), await upstream()
    sc = await sidecar(
        f"""
    listen_path_escaped_slashes: keep
    services:
      api: {{ endpoints: ["{api.address}"] }}
      admin: {{ endpoints: ["{admin.address}"] }}
    routes:
      - {{ name: admin, match: {{ prefix: /api/admin }}, service: admin }}
      - {{ name: api, match: {{ prefix: /api }}, service: api }}
    """
    )
    async with client.get(f"{sc.url}/api/admin%2Fx", allow_redirects=False) as resp:
        assert resp.status == 200
    # One segment 'admin%2Fx', not '/api/admin' + '/x': the api route, not the admin one.
    assert admin.hits == 0
    assert [r.path_qs for r in api.seen] == ["/api/admin%2Fx"]
