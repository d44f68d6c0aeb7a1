"""The core proxy against real upstreams: forwarding, headers, routing, bodies, streaming."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os

import aiohttp
from aiohttp import web
from helpers import free_port, one_service, read_head


async def test_forwards_method_path_query_headers_and_body(upstream, sidecar, client):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    async with client.post(
        f"{sc.url}/api/items?q=1&b=%20x",
        data=b"hello",
        headers={"X-Custom": "yes", "Content-Type": "text/plain"},
    ) as resp:
        assert resp.status == 200
        assert await resp.text() == "ok"
        assert resp.headers["x-sidecar-attempts"] == "1"
        rid = resp.headers["x-request-id"]
    seen = up.seen[0]
    assert seen.method == "POST"
    assert seen.path_qs == "/api/items?q=1&b=%20x"
    assert seen.body == b"hello"
    assert seen.headers["x-custom"] == "yes"
    assert seen.headers["content-type"] == "text/plain"
    assert seen.headers["x-sidecar-attempt"] == "1"
    assert seen.headers["x-request-id"] == rid
    assert seen.headers["x-forwarded-for"] == "127.0.0.1"
    assert seen.headers["x-forwarded-proto"] == "http"
    assert seen.headers["x-forwarded-host"] == f"127.0.0.1:{sc.listen}"
    assert int(seen.headers["x-sidecar-timeout-ms"]) > 0
    # The app called the sidecar on loopback: the upstream sees its own address as Host.
    assert seen.headers["host"] == up.address
    # Beyond what the app's client sent (aiohttp's defaults included), the upstream sees
    # only the headers the contract adds: the proxy's HTTP client invents none.
    sent_by_app = {
        "host",
        "x-custom",
        "content-type",
        "content-length",
        "accept",
        "accept-encoding",
        "user-agent",
    }
    assert {k.lower() for k, _ in seen.raw_headers} - sent_by_app == {
        "x-sidecar-attempt",
        "x-sidecar-timeout-ms",
        "x-request-id",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "traceparent",  # the app sent none, so the sidecar started a trace
    }


async def test_request_id_kept_and_forwarded_for_appended(upstream, sidecar, client):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    headers = {"X-Request-Id": "abc-123", "X-Forwarded-For": "10.1.2.3"}
    async with client.get(f"{sc.url}/api", headers=headers) as resp:
        assert resp.headers["x-request-id"] == "abc-123"
    assert up.seen[0].headers["x-request-id"] == "abc-123"
    assert up.seen[0].headers["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"


async def test_hop_by_hop_headers_are_not_forwarded_either_way(upstream, sidecar, client):
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.Response(text="ok")
        resp.headers["Connection"] = "keep-alive, X-Upstream-Private"
        resp.headers["X-Upstream-Private"] = "secret"
        resp.headers["Keep-Alive"] = "timeout=5"
        resp.headers["Proxy-Authenticate"] = "Basic"
        resp.headers["X-Kept"] = "1"
        return resp

    up = await upstream(handler)
    sc = await sidecar(one_service(up.address))
    headers = {
        "Connection": "keep-alive, X-App-Private",
        "X-App-Private": "secret",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Trailer": "X-T",
        "Proxy-Authorization": "Basic Zm9v",
        "Upgrade": "h2c",
        "X-Kept": "1",
    }
    async with client.get(f"{sc.url}/api", headers=headers) as resp:
        assert resp.status == 200
        assert "X-Upstream-Private" not in resp.headers
        assert "Proxy-Authenticate" not in resp.headers
        assert resp.headers["X-Kept"] == "1"
    seen = up.seen[0].headers
    for name in ("x-app-private", "keep-alive", "te", "trailer", "proxy-authorization", "upgrade"):
        assert name not in seen, name
    assert seen["x-kept"] == "1"


async def test_unknown_path_is_no_route_with_json_error(upstream, sidecar, client):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    async with client.get(f"{sc.url}/other") as resp:
        assert resp.status == 404
        assert resp.headers["x-sidecar-error"] == "no_route"
        assert resp.headers["x-sidecar-attempts"] == "0"
        body = await resp.json()
        assert body["error"] == "no_route"
        assert body["route"] is None and body["service"] is None
        assert "detail" in body
    # A prefix matches whole segments only.
    async with client.get(f"{sc.url}/apix") as resp:
        assert resp.status == 404
    assert up.hits == 0


async def test_absolute_form_target_is_never_proxied(upstream, sidecar):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.listen)
    writer.write(f"GET http://{up.address}/api HTTP/1.1\r\nHost: {up.address}\r\n\r\n".encode())
    await writer.drain()
    head = await read_head(reader)
    writer.close()
    assert head.startswith(b"HTTP/1.1 404"), head
    assert b"x-sidecar-error: no_route" in head.lower()
    assert up.hits == 0


async def test_connect_method_is_refused(upstream, sidecar):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.listen)
    writer.write(f"CONNECT {up.address} HTTP/1.1\r\nHost: {up.address}\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.read(4096), 10)
    writer.close()
    assert head.startswith((b"HTTP/1.1 404", b"HTTP/1.1 400")), head
    assert up.hits == 0


async def test_match_on_methods_headers_host_and_exact_path(upstream, sidecar, client):
    a, b, c, d = await upstream(), await upstream(), await upstream(), await upstream()
    sc = await sidecar(f"""
    services:
      a: {{ endpoints: ["{a.address}"] }}
      b: {{ endpoints: ["{b.address}"] }}
      c: {{ endpoints: ["{c.address}"] }}
      d: {{ endpoints: ["{d.address}"] }}
    routes:
      - name: exact
        match: {{ path: /exact }}
        service: d
      - name: reads
        match: {{ prefix: /x, methods: [GET] }}
        service: a
      - name: tenant
        match: {{ prefix: /x, headers: {{ x-tenant: acme }} }}
        service: b
      - name: host
        match: {{ prefix: /x, host: orders.internal }}
        service: c
    """)
    async with client.get(f"{sc.url}/x/1") as resp:
        assert resp.status == 200
    async with client.post(f"{sc.url}/x/1", headers={"x-tenant": "acme"}) as resp:
        assert resp.status == 200
    async with client.post(f"{sc.url}/x/1", headers={"Host": "orders.internal:8080"}) as resp:
        assert resp.status == 200
    # No route matches a POST without the header or host: 404, not 405.
    async with client.post(f"{sc.url}/x/1") as resp:
        assert resp.status == 404
        assert resp.headers["x-sidecar-error"] == "no_route"
    async with client.get(f"{sc.url}/exact") as resp:
        assert resp.status == 200
    async with client.get(f"{sc.url}/exact/more") as resp:
        assert resp.status == 404
    assert (a.hits, b.hits, c.hits, d.hits) == (1, 1, 1, 1)
    # A real host name the app used is forwarded as the Host header.
    assert c.seen[0].headers["host"] == "orders.internal:8080"


async def test_first_match_wins(upstream, sidecar, client):
    a, b = await upstream(), await upstream()
    sc = await sidecar(f"""
    services:
      a: {{ endpoints: ["{a.address}"] }}
      b: {{ endpoints: ["{b.address}"] }}
    routes:
      - {{ match: {{ prefix: /api/v1 }}, service: a }}
      - {{ match: {{ prefix: /api }}, service: b }}
      - {{ match: {{ prefix: /api/v1/special }}, service: b }}
    """)
    for path in ("/api/v1/special", "/api/v1", "/api/v2"):
        async with client.get(f"{sc.url}{path}") as resp:
            assert resp.status == 200
    assert a.hits == 2
    assert b.hits == 1
    assert sc.sample("sidecar_requests_total", route="0", service="a", code="200") == 2


async def test_path_is_normalised_before_routing_and_forwarded_as_routed(upstream, sidecar, client):
    public, admin = await upstream(), await upstream()
    sc = await sidecar(f"""
    services:
      public: {{ endpoints: ["{public.address}"] }}
      admin: {{ endpoints: ["{admin.address}"] }}
    routes:
      - {{ name: admin, match: {{ prefix: /admin }}, service: admin }}
      - {{ name: public, match: {{ prefix: /public }}, service: public }}
    """)
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.listen)
    # /public/../admin must be routed (and forwarded) as /admin, never as /public.
    for target in ("/public/../admin/x", "/public/%2e%2e/admin/x", "/public/./%61dmin"):
        writer.write(f"GET {target} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        await writer.drain()
        head = await read_head(reader)
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
    writer.close()
    assert [s.path_qs for s in admin.seen] == ["/admin/x", "/admin/x"]
    assert [s.path_qs for s in public.seen] == ["/public/admin"]
    # Encoded slashes are refused by default (listen_path_escaped_slashes: reject), so no
    # backend that decodes them can read another route's path.
    async with client.get(f"{sc.url}/public/a%2fb") as resp:
        assert resp.status == 400
    assert len(public.seen) == 1


async def test_broken_percent_escape_is_bad_request(upstream, sidecar):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.listen)
    writer.write(b"GET /api/%zz HTTP/1.1\r\nHost: a\r\n\r\n")
    await writer.drain()
    head = await read_head(reader)
    writer.close()
    assert head.startswith(b"HTTP/1.1 400"), head
    assert b"bad_request" in head
    assert up.hits == 0


async def test_rewrite_prefix_never_doubles_slashes(upstream, sidecar, client):
    up = await upstream()
    sc = await sidecar(f"""
    services:
      s: {{ endpoints: ["{up.address}"] }}
    routes:
      - {{ match: {{ prefix: /orders }}, service: s, rewrite_prefix: / }}
      - {{ match: {{ prefix: /v1 }}, service: s, rewrite_prefix: /v2 }}
    """)
    for path in ("/orders/42", "/orders", "/orders/", "/v1/x?y=1", "/v1"):
        async with client.get(f"{sc.url}{path}") as resp:
            assert resp.status == 200
    assert [s.path_qs for s in up.seen] == ["/42", "/", "/", "/v2/x?y=1", "/v2"]


async def test_round_robin_over_static_endpoints(upstream, sidecar, client):
    ups = [await upstream() for _ in range(3)]
    endpoints = ", ".join(f'"{u.address}"' for u in ups)
    sc = await sidecar(f"""
    services:
      s: {{ endpoints: [{endpoints}] }}
    routes:
      - {{ match: {{ prefix: / }}, service: s }}
    """)
    for _ in range(30):
        async with client.get(f"{sc.url}/x") as resp:
            assert resp.status == 200
    assert [u.hits for u in ups] == [10, 10, 10]


async def test_five_mib_bodies_both_ways_intact(upstream, sidecar, client):
    payload = os.urandom(5 * 1024 * 1024)

    async def echo_hash(request: web.Request) -> web.StreamResponse:
        data = await request.read()
        return web.Response(
            body=io.BytesIO(data[::-1]), headers={"x-sha": hashlib.sha256(data).hexdigest()}
        )

    up = await upstream(echo_hash, read_body=False)
    sc = await sidecar(one_service(up.address))
    async with client.post(f"{sc.url}/api/upload", data=io.BytesIO(payload)) as resp:
        assert resp.status == 200
        assert resp.headers["x-sha"] == hashlib.sha256(payload).hexdigest()
        body = await resp.read()
    assert body == payload[::-1]


async def test_chunked_request_body_streams_through(upstream, sidecar, client):
    async def echo(request: web.Request) -> web.StreamResponse:
        data = await request.read()
        return web.Response(body=hashlib.sha256(data).hexdigest().encode())

    up = await upstream(echo, read_body=False)
    sc = await sidecar(one_service(up.address))
    parts = [os.urandom(300_000) for _ in range(5)]

    async def gen():
        for p in parts:
            yield p

    async with client.put(f"{sc.url}/api/x", data=gen()) as resp:
        assert resp.status == 200
        assert (await resp.text()) == hashlib.sha256(b"".join(parts)).hexdigest()


async def test_streamed_response_reaches_client_before_upstream_finishes(upstream, sidecar, client):
    release = asyncio.Event()

    async def slow_stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"first-chunk")
        # Finish only once the test has seen the first chunk through the sidecar.
        await asyncio.wait_for(release.wait(), 20)
        await resp.write(b"second-chunk")
        await resp.write_eof()
        return resp

    up = await upstream(slow_stream)
    sc = await sidecar(one_service(up.address, route_extra="timeout: 30s"))
    async with client.get(f"{sc.url}/api/stream") as resp:
        assert resp.status == 200
        first = await asyncio.wait_for(resp.content.readany(), 20)
        assert first == b"first-chunk"
        release.set()
        rest = await resp.content.read()
    assert rest == b"second-chunk"


async def test_head_and_204_pass_through(upstream, sidecar, client):
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/empty"):
            return web.Response(status=204)
        return web.Response(body=b"x" * 1000)

    up = await upstream(handler)
    sc = await sidecar(one_service(up.address))
    async with client.head(f"{sc.url}/api/x") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "1000"
        assert await resp.read() == b""
    async with client.get(f"{sc.url}/api/empty") as resp:
        assert resp.status == 204
    async with client.get(f"{sc.url}/api/x") as resp:
        assert len(await resp.read()) == 1000


async def test_upstream_error_status_passes_through_unchanged(upstream, sidecar, client):
    async def teapot(request: web.Request) -> web.StreamResponse:
        return web.Response(status=418, text="short and stout", headers={"X-Tea": "1"})

    up = await upstream(teapot)
    sc = await sidecar(one_service(up.address))
    async with client.get(f"{sc.url}/api") as resp:
        assert resp.status == 418
        assert await resp.text() == "short and stout"
        assert resp.headers["X-Tea"] == "1"
        assert "x-sidecar-error" not in resp.headers


async def test_gzip_body_is_not_decoded(upstream, sidecar, client):
    import gzip

    raw = gzip.compress(b"compressed payload")

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=raw, headers={"Content-Encoding": "gzip"})

    up = await upstream(handler)
    sc = await sidecar(one_service(up.address))
    async with client.get(f"{sc.url}/api", headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert await resp.read() == raw


async def test_keep_alive_reuses_upstream_connections(raw_upstream, sidecar, client):
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    raw = await raw_upstream(handler)
    sc = await sidecar(one_service(raw.address))
    for _ in range(20):
        async with client.get(f"{sc.url}/api") as resp:
            assert await resp.text() == "ok"
    assert raw.connections == 1


async def test_access_log_has_one_json_line_per_request(upstream, sidecar, client):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    async with client.get(f"{sc.url}/api/x", headers={"x-request-id": "rid-1"}) as resp:
        assert resp.status == 200
    async with client.get(f"{sc.url}/nope") as resp:
        assert resp.status == 404
    lines = await sc.access_lines()
    assert len(lines) == 2
    ok, missing = lines
    for key in (
        "request_id",
        "route",
        "service",
        "method",
        "path",
        "status",
        "attempts",
        "duration_ms",
        "error",
    ):
        assert key in ok
    assert ok["request_id"] == "rid-1"
    assert (ok["route"], ok["service"], ok["method"], ok["path"]) == ("api", "api", "GET", "/api/x")
    assert (ok["status"], ok["attempts"], ok["error"]) == (200, 1, None)
    assert (missing["status"], missing["error"], missing["route"]) == (404, "no_route", None)


async def test_client_sees_many_concurrent_requests_served(
    upstream, sidecar, client: aiohttp.ClientSession
):
    async def slowish(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.01)
        return web.Response(text=request.path)

    up = await upstream(slowish)
    sc = await sidecar(one_service(up.address))

    async def one(i: int) -> str:
        async with client.get(f"{sc.url}/api/{i}") as resp:
            return await resp.text()

    results = await asyncio.gather(*(one(i) for i in range(100)))
    assert results == [f"/api/{i}" for i in range(100)]
    assert sc.sample("sidecar_requests_in_flight", service="api") == 0


async def test_upstream_keepalive_closed_by_server_is_not_an_error_for_next_request(
    raw_upstream, sidecar, client
):
    async def one_per_connection(reader, writer) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()

    raw = await raw_upstream(one_per_connection)
    sc = await sidecar(one_service(raw.address))
    for _ in range(5):
        async with client.get(f"{sc.url}/api") as resp:
            assert resp.status == 200
    assert raw.connections == 5


async def test_unused_client_session_timeout(client):  # guards the fixture itself
    assert isinstance(client, aiohttp.ClientSession)


async def test_expect_100_continue_is_answered_and_not_forwarded(upstream, sidecar):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.listen)
    writer.write(
        b"POST /api HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    await writer.drain()
    # A client that honours Expect waits for the interim answer before sending the body.
    interim = await asyncio.wait_for(read_head(reader), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    await writer.drain()
    head = await asyncio.wait_for(read_head(reader), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200")
    assert up.seen[0].body == b"hello"
    assert "expect" not in up.seen[0].headers


async def _read_response(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, list[str]], bytes]:
    head = await asyncio.wait_for(read_head(reader), 5)
    status, *lines = head.decode("latin-1").split("\r\n")[:-2]
    headers: dict[str, list[str]] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers.setdefault(name.lower(), []).append(value.strip())
    length = int(headers.get("content-length", ["0"])[0])
    body = await asyncio.wait_for(reader.readexactly(length), 5) if length else b""
    return status.encode(), headers, body


async def test_small_responses_on_the_wire_pipelined_and_http10(raw_upstream, sidecar):
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_head(reader)
            if b" /api/nocontent " in head:
                writer.write(b"HTTP/1.1 204 No Content\r\nX-Up: 1\r\n\r\n")
            elif b" /api/cached " in head:
                writer.write(
                    b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 9\r\n\r\n'
                )
            else:
                writer.write(
                    b"HTTP/1.1 200 OK\r\nX-Up: a\r\nX-Up: b\r\n"
                    b"Date: Tue, 01 Jan 2030 00:00:00 GMT\r\nContent-Length: 5\r\n\r\nhello"
                )
            await writer.drain()

    raw = await raw_upstream(handler)
    sc = await sidecar(one_service(raw.address))
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.listen)
    # Three requests pipelined in one write: three answers, in order, on one connection.
    writer.write(
        b"GET /api/a HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /api/nocontent HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /api/cached HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    status, headers, body = await _read_response(reader)
    assert status == b"HTTP/1.1 200 OK"
    assert body == b"hello"
    assert headers["content-length"] == ["5"]  # exactly one
    assert "transfer-encoding" not in headers and "connection" not in headers
    assert headers["x-up"] == ["a", "b"]  # repeated headers kept, in order
    assert headers["date"] == ["Tue, 01 Jan 2030 00:00:00 GMT"]  # the upstream's, not ours
    assert headers["x-sidecar-attempts"] == ["1"]
    status, headers, body = await _read_response(reader)
    assert status == b"HTTP/1.1 204 No Content"
    assert "content-length" not in headers and headers["x-up"] == ["1"]
    assert len(headers["date"]) == 1  # the sidecar adds one when the upstream gave none
    head = await asyncio.wait_for(read_head(reader), 5)
    assert head.startswith(b"HTTP/1.1 304 Not Modified\r\n")
    assert b"Content-Length: 9\r\n" in head  # a 304 describes the cached body: kept as sent
    writer.close()

    # HTTP/1.0 without keep-alive: answered in 1.0, then the sidecar closes.
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.listen)
    writer.write(b"GET /api/a HTTP/1.0\r\nHost: x\r\n\r\n")
    status, headers, body = await _read_response(reader)
    assert status == b"HTTP/1.0 200 OK" and body == b"hello"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()

    # HTTP/1.0 asking for keep-alive gets it, said out loud, and the connection stays.
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.listen)
    for _ in range(2):
        writer.write(b"GET /api/a HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        status, headers, body = await _read_response(reader)
        assert headers["connection"] == ["keep-alive"] and body == b"hello"
    writer.close()

    # An HTTP/1.1 client asking to close gets `Connection: close`, then EOF.
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.listen)
    writer.write(b"GET /api/a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, headers, body = await _read_response(reader)
    assert headers["connection"] == ["close"] and body == b"hello"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_request_id_and_attempts_are_never_doubled_by_an_echoing_upstream(
    raw_upstream, sidecar
):
    # Services often echo x-request-id; one behind its own sidecar adds x-sidecar-attempts.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_head(reader)
            echo = b"X-Request-Id: from-upstream\r\nx-sidecar-attempts: 7\r\n"
            if b" /api/stream " in head:  # no length: streamed back chunked
                writer.write(
                    b"HTTP/1.1 200 OK\r\n" + echo + b"Transfer-Encoding: chunked\r\n\r\n"
                    b"2\r\nok\r\n0\r\n\r\n"
                )
            else:
                writer.write(b"HTTP/1.1 200 OK\r\n" + echo + b"Content-Length: 2\r\n\r\nok")
            await writer.drain()

    raw = await raw_upstream(handler)
    sc = await sidecar(one_service(raw.address))
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.listen)
    for path in (b"/api/small", b"/api/stream"):
        writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nX-Request-Id: mine\r\n\r\n")
        head = (await asyncio.wait_for(read_head(reader), 5)).lower()
        assert head.count(b"x-request-id:") == 1 and b"x-request-id: mine\r\n" in head
        assert head.count(b"x-sidecar-attempts:") == 1 and b"x-sidecar-attempts: 1\r\n" in head
        if b"chunked" in head:
            await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
        else:
            await asyncio.wait_for(reader.readexactly(2), 5)
    writer.close()


async def test_sidecar_errors_carry_proxy_status(upstream, raw_upstream, sidecar, client):
    up = await upstream()
    dead = free_port()

    async def garbage(reader, writer) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 abc nonsense\r\n\r\n")
        await writer.drain()

    async def hang_up(reader, writer) -> None:
        await read_head(reader)  # then close without a word

    async def silent(reader, writer) -> None:
        await read_head(reader)
        await asyncio.sleep(1)

    bad, gone, slow = (
        await raw_upstream(garbage),
        await raw_upstream(hang_up),
        await raw_upstream(silent),
    )
    no_retry = "retries: { max_retries: 0 }"
    sc = await sidecar(
        f"""
    services:
      api: {{ endpoints: ["{up.address}"] }}
      dead: {{ endpoints: ["127.0.0.1:{dead}"] }}
      unnamed: {{ endpoints: ["no-such-host.invalid:80"] }}
      bad: {{ endpoints: ["{bad.address}"] }}
      gone: {{ endpoints: ["{gone.address}"] }}
      slow: {{ endpoints: ["{slow.address}"] }}
    routes:
      - {{ name: dead, match: {{ prefix: /dead }}, service: dead, {no_retry} }}
      - {{ name: unnamed, match: {{ prefix: /unnamed }}, service: unnamed, {no_retry} }}
      - {{ name: bad, match: {{ prefix: /bad }}, service: bad, {no_retry} }}
      - {{ name: gone, match: {{ prefix: /gone }}, service: gone, {no_retry} }}
      - {{ name: slow, match: {{ prefix: /slow }}, service: slow, timeout: 200ms, {no_retry} }}
      - {{ name: api, match: {{ prefix: /api }}, service: api }}
    """
    )
    cases = {
        "/nowhere": ("no_route", "destination_not_found"),
        "/api/a%5Cb": ("bad_request", "http_request_error"),
        "/dead/x": ("upstream_unreachable", "connection_refused"),
        "/unnamed/x": ("upstream_unreachable", "dns_error"),
        "/bad/x": ("upstream_reset", "http_protocol_error"),
        "/gone/x": ("upstream_reset", "connection_terminated"),
        "/slow/x": ("timeout", "http_response_timeout"),
    }
    for path, (reason, error_type) in cases.items():
        async with client.get(f"{sc.url}{path}") as resp:
            assert resp.headers.get("x-sidecar-error") == reason, (path, resp.status)
            assert resp.headers["Proxy-Status"] == (
                f'sidecar; error={error_type}; details="{reason}"'
            ), path
    async with client.get(f"{sc.url}/api") as resp:  # a relayed answer carries none
        assert resp.status == 200
        assert "Proxy-Status" not in resp.headers
