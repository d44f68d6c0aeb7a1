"""`sidecar run` and `sidecar demo` as real processes: refusal, serving, JSON logs, draining."""

from __future__ import annotations

import asyncio
import json
import signal
import socket

import aiohttp
import pytest
from aiohttp import web
from helpers import ROOT, free_port, sidecar_yaml, wait_http


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_run_refuses_an_invalid_config_and_listens_on_nothing(tmp_path, spawn):
    listen, admin = free_port(), free_port()
    path = tmp_path / "bad.yaml"
    path.write_text(
        sidecar_yaml(
            """
            services:
              s: { endpoints: ["127.0.0.1:1"] }
            routes:
              - match: { prefix: / }
                service: nope
                retries: { max_retries: -1 }
            """,
            listen,
            admin,
        )
    )
    proc = spawn("run", "-c", str(path))
    code = await asyncio.to_thread(proc.proc.wait, 30)
    stderr = proc.proc.stderr.read() if proc.proc.stderr else ""
    assert code == 1
    lines = stderr.strip().splitlines()
    assert any("routes[0].service" in line for line in lines), stderr
    assert any("routes[0].retries.max_retries: must be >= 0, got -1" in line for line in lines)
    assert all(line.startswith(str(path)) or line.startswith("warning:") for line in lines)
    assert not _listening(listen) and not _listening(admin)


async def test_config_path_from_environment(tmp_path, spawn):
    listen, admin = free_port(), free_port()
    path = tmp_path / "env.yaml"
    path.write_text(sidecar_yaml("services: {}\nroutes: []\n", listen, admin))
    proc = spawn("validate", env={"SIDECAR_CONFIG": str(path)})
    code = await asyncio.to_thread(proc.proc.wait, 30)
    assert code == 0
    assert proc.proc.stdout is not None and proc.proc.stdout.read().strip() == "OK"


async def _start_upstream(handler) -> tuple[web.AppRunner, int]:
    port = free_port()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_drains_in_flight_requests_then_exits_zero(tmp_path, spawn, sig):
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        if request.path == "/api/slow":
            started.set()
            await asyncio.wait_for(release.wait(), 20)
        return web.Response(text="done")

    runner, up_port = await _start_upstream(slow)
    listen, admin = free_port(), free_port()
    path = tmp_path / "ok.yaml"
    path.write_text(
        sidecar_yaml(
            f"""
            services:
              api: {{ endpoints: ["127.0.0.1:{up_port}"] }}
            routes:
              - {{ name: api, match: {{ prefix: /api }}, service: api, timeout: 20s }}
            """,
            listen,
            admin,
            drain="15s",
        )
    )
    proc = spawn("run", "-c", str(path))
    try:
        await wait_http(f"http://127.0.0.1:{admin}/readyz")
        async with aiohttp.ClientSession() as session:
            slow_call = asyncio.ensure_future(session.get(f"http://127.0.0.1:{listen}/api/slow"))
            await asyncio.wait_for(started.wait(), 10)
            proc.proc.send_signal(sig)
            # Draining: not ready any more, admin still up, new connections refused.
            await wait_http(f"http://127.0.0.1:{admin}/readyz", status=503)
            for _ in range(100):
                if not _listening(listen):
                    break
                await asyncio.sleep(0.05)
            assert not _listening(listen)
            assert proc.proc.poll() is None, "must wait for the in-flight request"
            release.set()
            resp = await asyncio.wait_for(slow_call, 20)
            assert resp.status == 200
            assert await resp.text() == "done"
            resp.release()
        code = await asyncio.to_thread(proc.proc.wait, 20)
        assert code == 0
        assert proc.proc.stdout is not None
        lines = [json.loads(line) for line in proc.proc.stdout.read().splitlines() if line]
        access = [e for e in lines if e.get("logger") == "sidecar.access"]
        assert len(access) == 1
        assert access[0]["status"] == 200 and access[0]["path"] == "/api/slow"
        assert all("ts" in e for e in lines)
    finally:
        release.set()
        await runner.cleanup()


async def test_drain_timeout_bounds_shutdown(tmp_path, spawn):
    async def hang(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(60)
        return web.Response()

    runner, up_port = await _start_upstream(hang)
    listen, admin = free_port(), free_port()
    path = tmp_path / "hang.yaml"
    path.write_text(
        sidecar_yaml(
            f"""
            services:
              api: {{ endpoints: ["127.0.0.1:{up_port}"] }}
            routes:
              - {{ match: {{ prefix: / }}, service: api, timeout: 60s }}
            """,
            listen,
            admin,
            drain="300ms",
        )
    )
    proc = spawn("run", "-c", str(path))
    try:
        await wait_http(f"http://127.0.0.1:{admin}/readyz")
        async with aiohttp.ClientSession() as session:
            call = asyncio.ensure_future(session.get(f"http://127.0.0.1:{listen}/x"))
            await asyncio.sleep(0.3)
            proc.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.proc.wait, 20)
            assert code == 0
            with pytest.raises(aiohttp.ClientError):
                resp = await asyncio.wait_for(call, 10)
                await resp.read()
    finally:
        await runner.cleanup()


async def test_demo_serves_the_shipped_config(spawn):
    ports = (15000, 15001, 19081, 19082, 19083)
    if any(_listening(p) for p in ports):
        pytest.skip("the demo's fixed ports are in use on this machine")
    proc = spawn("demo", "-c", str(ROOT / "config" / "sidecar.yaml"))
    try:
        await wait_http("http://127.0.0.1:15000/readyz")
        async with aiohttp.ClientSession() as session:
            async with session.get("http://127.0.0.1:15001/catalog/items") as resp:
                assert resp.status == 200
                assert (await resp.json())["service"] == "catalog"
            # orders fails one call in three; retries hide it from the app.
            for _ in range(9):
                async with session.get("http://127.0.0.1:15001/orders/1") as resp:
                    assert resp.status == 200
            statuses = []
            for _ in range(6):
                async with session.get("http://127.0.0.1:15001/payments/charge") as resp:
                    statuses.append((resp.status, resp.headers.get("x-sidecar-fallback")))
            # Three real 503s open the breaker; then the fallback answers.
            assert statuses[:3] == [(503, None)] * 3
            assert statuses[3:] == [(200, "circuit_open")] * 3
            async with session.get("http://127.0.0.1:15000/admin/state") as resp:
                state = await resp.json()
            assert state["services"]["payments"]["breaker"]["state"] == "open"
    finally:
        assert proc.stop() == 0
    assert proc.proc.stderr is not None
    assert "curl" in proc.proc.stderr.read()
