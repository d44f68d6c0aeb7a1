"""Traffic through the sidecar follows discovery and endpoint health (real etcd, dnsmasq)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import textwrap
from typing import Any

import aiohttp
from aiohttp import web
from helpers import free_port, sidecar_yaml, wait_http
from support.dnsmasq import running_dnsmasq
from support.etcd import running_etcd

ROUTE = """
routes:
  - name: r
    match: { prefix: / }
    service: s
    timeout: 5s
"""


def with_route(services: str, route: str = ROUTE) -> str:
    return textwrap.dedent(services) + route


async def send(client, sc, n: int = 1, path: str = "/x") -> list[int]:
    out = []
    for _ in range(n):
        async with client.get(f"{sc.url}{path}") as resp:
            await resp.read()
            out.append(resp.status)
    return out


async def until_only(client, sc, target, others, attempts: int = 100) -> None:
    """Send requests until a burst of them all lands on `target` (bounded)."""
    for _ in range(attempts):
        before = [o.hits for o in others]
        await send(client, sc, 4)
        if [o.hits for o in others] == before:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("traffic never moved to the new endpoint set")


async def test_traffic_follows_a_file_rewrite(upstream, sidecar, client, tmp_path):
    a, b = await upstream(), await upstream()
    eps = tmp_path / "eps.yaml"
    eps.write_text(json.dumps([a.address]))
    sc = await sidecar(
        with_route(
            f"""
        services:
          s: {{ discovery: {{ file: {{ path: {eps} }} }} }}
        """,
        )
    )
    assert await send(client, sc, 3) == [200] * 3
    assert (a.hits, b.hits) == (3, 0)
    tmp = tmp_path / "eps.tmp"
    tmp.write_text(json.dumps([b.address]))
    tmp.replace(eps)
    await until_only(client, sc, b, [a])
    hits_a = a.hits
    assert await send(client, sc, 5) == [200] * 5
    assert a.hits == hits_a


async def test_traffic_follows_etcd_put_and_delete_and_survives_an_outage(
    upstream, sidecar, client, tmp_path
):
    a, b = await upstream(), await upstream()
    with running_etcd(tmp_path) as etcd:
        await etcd.put("/services/s/a", json.dumps({"address": a.address}))
        sc = await sidecar(
            with_route(
                f"""
            services:
              s:
                discovery: {{ etcd: {{ endpoints: ["{etcd.url}"], prefix: /services/s/ }} }}
            """,
            )
        )
        assert await send(client, sc, 2) == [200, 200]
        assert a.hits == 2
        await etcd.put("/services/s/b", b.address)
        await etcd.delete("/services/s/a")
        await until_only(client, sc, b, [a])
        # etcd goes away: the last endpoints stay in use.
        await etcd.astop(signal.SIGKILL)
        hits_b = b.hits
        assert await send(client, sc, 5) == [200] * 5
        assert b.hits == hits_b + 5
        async with client.get(f"{sc.admin_url}/admin/state") as resp:
            discovery = (await resp.json())["services"]["s"]["discovery"]
        assert discovery["source"] == "etcd"


async def test_traffic_follows_a_dns_record_change(sidecar, client, tmp_path):
    port = free_port()
    runners = []
    hits = {"127.0.0.2": 0, "127.0.0.3": 0}
    for host in hits:

        async def handler(request: web.Request, host: str = host) -> web.StreamResponse:
            hits[host] += 1
            return web.Response(text=host)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        runners.append(runner)
    try:
        with running_dnsmasq(tmp_path, "127.0.0.2 orders.test\n") as dns:
            sc = await sidecar(
                with_route(
                    f"""
                services:
                  s:
                    discovery:
                      dns:
                        name: orders.test
                        port: {port}
                        refresh: 100ms
                        nameservers: ["127.0.0.1:{dns.port}"]
                """,
                )
            )
            # The first lookup can fail transiently; the source retries at once.
            await wait_http(f"{sc.url}/x")
            before = hits["127.0.0.2"]
            assert await send(client, sc, 3) == [200] * 3
            assert hits == {"127.0.0.2": before + 3, "127.0.0.3": 0}
            dns.set_hosts("127.0.0.3 orders.test\n")
            for _ in range(100):
                before = hits["127.0.0.2"]
                await send(client, sc, 3)
                if hits["127.0.0.2"] == before:
                    break
                await asyncio.sleep(0.05)
            counted = dict(hits)
            assert await send(client, sc, 4) == [200] * 4
            assert hits["127.0.0.3"] == counted["127.0.0.3"] + 4
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_endpoint_failing_its_health_check_gets_no_traffic(upstream, sidecar, client):
    healthy = {"ok": True}

    async def flaky_health(request: web.Request) -> web.StreamResponse:
        if request.path == "/healthz":
            return web.Response(status=200 if healthy["ok"] else 500)
        return web.Response(text="sick")

    sick, fine = await upstream(flaky_health), await upstream()
    sc = await sidecar(
        with_route(
            f"""
        services:
          s:
            endpoints: ["{sick.address}", "{fine.address}"]
            health_check:
              {{ path: /healthz, interval: 100ms, timeout: 1s,
                unhealthy_threshold: 1, healthy_threshold: 1 }}
        """,
        )
    )
    healthy["ok"] = False
    svc = sc.sidecar.runtime.services["s"]
    for _ in range(100):
        if [e.state for e in svc.cluster.endpoints] == ["unhealthy", "healthy"]:
            break
        await asyncio.sleep(0.05)
    served_before = sum(1 for s in sick.seen if s.path_qs != "/healthz")
    assert await send(client, sc, 10) == [200] * 10
    assert sum(1 for s in sick.seen if s.path_qs != "/healthz") == served_before
    assert sc.sample("sidecar_endpoints", service="s", state="unhealthy") == 1


async def test_outlier_ejected_then_back_after_its_time(upstream, sidecar, client):
    mode = {"fail": True}

    async def sometimes(request: web.Request) -> web.StreamResponse:
        return web.Response(status=503 if mode["fail"] else 200)

    bad, good = await upstream(sometimes), await upstream()
    sc = await sidecar(
        f"""
        services:
          s:
            endpoints: ["{bad.address}", "{good.address}"]
            outlier_detection:
              {{ consecutive_failures: 2, ejection_time: 500ms, max_ejection_percent: 50 }}
            circuit_breaker: {{ failure_threshold: 100 }}
        routes:
          - name: r
            match: {{ prefix: / }}
            service: s
            retries: {{ max_retries: 0 }}
        """
    )
    for _ in range(6):
        await send(client, sc)
    assert bad.hits == 2  # ejected after its second failure
    async with client.get(f"{sc.admin_url}/admin/state") as resp:
        states = {
            e["address"]: e["state"] for e in (await resp.json())["services"]["s"]["endpoints"]
        }
    assert states == {bad.address: "ejected", good.address: "healthy"}
    assert sc.sample("sidecar_endpoints", service="s", state="ejected") == 1
    mode["fail"] = False
    await asyncio.sleep(0.6)
    await send(client, sc, 4)
    assert bad.hits > 2  # back in rotation after its ejection time


async def test_no_healthy_upstream_and_its_fallback(upstream, sidecar, client):
    async def sick(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500 if request.path == "/healthz" else 200)

    up = await upstream(sick)
    sc = await sidecar(
        f"""
        services:
          s:
            endpoints: ["{up.address}"]
            health_check: {{ interval: 100ms, unhealthy_threshold: 1 }}
        routes:
          - {{ name: plain, match: {{ prefix: /plain }}, service: s }}
          - name: soft
            match: {{ prefix: /soft }}
            service: s
            fallback: {{ status: 200, body: "cached" }}
        """
    )
    svc = sc.sidecar.runtime.services["s"]
    for _ in range(100):
        if svc.cluster.endpoints[0].state == "unhealthy":
            break
        await asyncio.sleep(0.05)
    async with client.get(f"{sc.url}/plain") as resp:
        assert resp.status == 503
        assert resp.headers["x-sidecar-error"] == "no_healthy_upstream"
        assert resp.headers["x-sidecar-attempts"] == "0"
    async with client.get(f"{sc.url}/soft") as resp:
        assert resp.status == 200
        assert await resp.text() == "cached"
        assert resp.headers["x-sidecar-fallback"] == "no_healthy_upstream"


async def test_least_request_prefers_the_less_busy_endpoint(upstream, sidecar, client):
    release = asyncio.Event()

    async def held(request: web.Request) -> web.StreamResponse:
        await asyncio.wait_for(release.wait(), 20)
        return web.Response(text="slow")

    busy, idle = await upstream(held), await upstream()
    sc = await sidecar(
        with_route(
            f"""
            services:
              s:
                endpoints: ["{busy.address}", "{idle.address}"]
                load_balancer: least_request
            """,
            ROUTE.replace("timeout: 5s", "timeout: 20s"),
        )
    )
    pending = []
    for _ in range(20):
        if busy.hits:
            break
        pending.append(asyncio.ensure_future(send(client, sc)))
        await asyncio.sleep(0.05)
    assert busy.hits == 1
    idle_before = idle.hits
    assert await send(client, sc, 10) == [200] * 10
    assert idle.hits == idle_before + 10
    assert busy.hits == 1
    release.set()
    await asyncio.gather(*pending)


async def test_registration_key_appears_and_goes_on_sigterm(tmp_path, spawn):
    app = web.Application()

    async def healthz(request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok")

    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    app_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", app_port).start()
    try:
        with running_etcd(tmp_path) as etcd:
            listen, admin = free_port(), free_port()
            path = tmp_path / "reg.yaml"
            path.write_text(
                sidecar_yaml(
                    f"""
                    services: {{}}
                    routes: []
                    register:
                      etcd: {{ endpoints: ["{etcd.url}"], prefix: /services/ }}
                      service: payments
                      address: 127.0.0.1:{app_port}
                      ttl: 5s
                      health_check: {{ path: /healthz, interval: 200ms }}
                    """,
                    listen,
                    admin,
                )
            )
            proc = spawn("run", "-c", str(path), env={"SIDECAR_INSTANCE_ID": "pay-1"})
            await wait_http(f"http://127.0.0.1:{admin}/readyz")
            key = "/services/payments/pay-1"
            for _ in range(100):
                kv = await etcd.get(key)
                if kv is not None:
                    break
                await asyncio.sleep(0.05)
            assert kv is not None
            assert json.loads(kv["value"])["address"] == f"127.0.0.1:{app_port}"
            assert kv["lease"] != 0
            ttl = await etcd.time_to_live(kv["lease"])
            assert 0 < int(ttl["TTL"]) <= 5
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{admin}/admin/state") as resp,
            ):
                registration = (await resp.json())["registration"]
            assert registration["key"] == key
            assert registration["registered"] is True
            assert await asyncio.to_thread(proc.stop) == 0
            assert await etcd.get(key) is None
    finally:
        await runner.cleanup()


async def test_file_discovery_refuses_fifo_device_and_oversized_file_and_exits_on_sigterm(
    upstream, client, tmp_path, spawn
):
    """A sidecar process: each bad file keeps the last endpoints, and SIGTERM still exits.

    Before the regular-file check, a FIFO blocked the poll's worker thread in open() for
    good: SIGTERM logged "stopped" and the process never exited.
    """
    up = await upstream()
    eps = tmp_path / "eps.yaml"
    eps.write_text(json.dumps([up.address]))
    listen, admin = free_port(), free_port()
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        sidecar_yaml(
            with_route(f"services:\n  s: {{ discovery: {{ file: {{ path: {eps} }} }} }}\n"),
            listen,
            admin,
        )
    )
    proc = spawn("run", "-c", str(path))
    await wait_http(f"http://127.0.0.1:{admin}/readyz")

    async def discovery_state() -> dict[str, Any]:
        async with client.get(f"http://127.0.0.1:{admin}/admin/state") as resp:
            state: dict[str, Any] = (await resp.json())["services"]["s"]
            return state

    async def until_error(needle: str) -> dict[str, Any]:
        for _ in range(100):
            state = await discovery_state()
            if needle in (state["discovery"]["last_error"] or ""):
                return state
            await asyncio.sleep(0.05)
        raise AssertionError(f"no discovery error with {needle!r}: {state['discovery']}")

    async def still_served() -> None:
        hits = up.hits
        async with client.get(f"http://127.0.0.1:{listen}/x") as resp:
            assert resp.status == 200
        assert up.hits == hits + 1

    await still_served()
    fifo = tmp_path / "eps.fifo"
    os.mkfifo(fifo)
    os.replace(fifo, eps)
    state = await until_error(f"not a regular file: {eps} (a FIFO)")
    assert [e["address"] for e in state["endpoints"]] == [up.address]
    await still_served()

    link = tmp_path / "eps.link"
    os.symlink("/dev/zero", link)
    os.replace(link, eps)
    state = await until_error(f"not a regular file: {eps} (a character device)")
    assert [e["address"] for e in state["endpoints"]] == [up.address]
    await still_served()

    big = tmp_path / "eps.big"
    big.write_text(json.dumps([up.address] * 100_000))  # valid JSON, over 1 MiB
    os.replace(big, eps)
    state = await until_error("larger than 1048576 bytes")
    assert [e["address"] for e in state["endpoints"]] == [up.address]
    assert state["discovery"]["consecutive_failures"] == 3
    await still_served()

    os.mkfifo(fifo)  # end on the state that used to hang the exit
    os.replace(fifo, eps)
    await until_error("(a FIFO)")
    # A generous bound, not a timing claim: the process must exit, and cleanly.
    assert await asyncio.to_thread(proc.stop, signal.SIGTERM, 30) == 0


async def test_idle_connections_to_a_removed_endpoint_are_closed(
    raw_upstream, upstream, sidecar, client, tmp_path
):
    closed: list[str] = []

    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Answer every request on the connection, then note when the sidecar closes it.
        while await read_request(reader):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        closed.append("closed")

    a = await raw_upstream(keep_alive)
    b = await upstream()
    eps = tmp_path / "eps.yaml"
    eps.write_text(json.dumps([a.address]))
    sc = await sidecar(
        with_route(f"services:\n  s: {{ discovery: {{ file: {{ path: {eps} }} }} }}\n")
    )
    assert await send(client, sc, 2) == [200, 200]
    assert a.connections == 1 and closed == []  # one pooled connection, idle now
    tmp = tmp_path / "eps.tmp"
    tmp.write_text(json.dumps([b.address]))
    tmp.replace(eps)
    for _ in range(100):  # until discovery has switched to `b`
        await send(client, sc, 1)
        if b.hits:
            break
        await asyncio.sleep(0.05)
    assert b.hits
    # Discovery dropped `a`: its idle connection is closed, not left to linger.
    for _ in range(100):
        if closed:
            break
        await asyncio.sleep(0.02)
    assert closed == ["closed"]


async def read_request(reader: asyncio.StreamReader) -> bool:
    """Read one bodiless request head; False at EOF."""
    try:
        await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return False
    return True
