"""Shared fixtures: real upstreams on 127.0.0.1 and a real sidecar, in-process or as a process.

Fixtures return factories, so a test says what it needs in a line. Nothing here mocks the
network or the clock: upstreams are aiohttp servers (or raw TCP servers when a test needs
broken HTTP) on free loopback ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import ROOT, free_port, sidecar_yaml

from sidecar.config import load_config
from sidecar.logs import LineWriter
from sidecar.server import Sidecar

# --------------------------------------------------------------------------- upstreams


@dataclass
class SeenRequest:
    method: str
    path_qs: str
    headers: dict[str, str]
    raw_headers: list[tuple[str, str]]
    body: bytes


@dataclass
class Upstream:
    port: int
    runner: web.AppRunner
    seen: list[SeenRequest] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def hits(self) -> int:
        return len(self.seen)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _ok(request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok")


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    """Factory: `await upstream(handler, read_body=True)` -> a running recording upstream."""
    made: list[Upstream] = []

    async def make(handler: Handler = _ok, *, read_body: bool = True) -> Upstream:
        port = free_port()
        holder: list[Upstream] = []

        async def recording(request: web.Request) -> web.StreamResponse:
            body = await request.read() if read_body else b""
            holder[0].seen.append(
                SeenRequest(
                    request.method,
                    request.raw_path,
                    {k.lower(): v for k, v in request.headers.items()},
                    [(k, v) for k, v in request.headers.items()],
                    body,
                )
            )
            return await handler(request)

        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", recording)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        up = Upstream(port, runner)
        holder.append(up)
        made.append(up)
        return up

    yield make
    for up in made:
        await up.runner.cleanup()


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawUpstream:
    port: int
    server: asyncio.Server
    connections: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[RawHandler], Awaitable[RawUpstream]]]:
    """Factory for a TCP server that speaks broken HTTP on purpose."""
    made: list[RawUpstream] = []
    handlers: set[asyncio.Task[None]] = set()

    async def make(handler: RawHandler) -> RawUpstream:
        holder: list[RawUpstream] = []

        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            holder[0].connections += 1
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                handlers.discard(task)
                writer.close()

        server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        raw = RawUpstream(port, server)
        holder.append(raw)
        made.append(raw)
        return raw

    yield make
    for raw in made:
        raw.server.close()
    for task in list(handlers):
        task.cancel()
    for raw in made:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(raw.server.wait_closed(), 2)


# --------------------------------------------------------------------------- the sidecar


class _Capture:
    """A text stream the log writer thread writes to; tests read parsed lines."""

    def __init__(self) -> None:
        self._buf = io.StringIO()
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            return self._buf.write(text)

    def flush(self) -> None:
        pass

    def lines(self) -> list[dict[str, Any]]:
        with self._lock:
            text = self._buf.getvalue()
        return [json.loads(line) for line in text.splitlines() if line.strip()]


@dataclass
class RunningSidecar:
    sidecar: Sidecar
    listen: int
    admin: int
    config_path: Path
    capture: _Capture
    writer: LineWriter

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin}"

    @property
    def metrics(self) -> Any:
        return self.sidecar.metrics

    def sample(self, name: str, **labels: str) -> float:
        value = self.sidecar.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def access_lines(self) -> list[dict[str, Any]]:
        # Lines are emitted when a request ends, batched to the end of the loop iteration,
        # then written by the writer thread: wait for all three, boundedly.
        for _ in range(200):
            if self.sidecar.proxy.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        self.sidecar.proxy.access_log.flush()
        await asyncio.to_thread(self.writer.flush)
        return [e for e in self.capture.lines() if e.get("logger") == "sidecar.access"]


@pytest.fixture
async def sidecar(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[RunningSidecar]]]:
    """Factory: `await sidecar(yaml_body)` -> an in-process sidecar serving that config.

    `yaml_body` holds services/routes/defaults; listen, admin and drain_timeout are added.
    """
    running: list[RunningSidecar] = []

    async def make(
        body: str, *, drain: str = "2s", upstream_client: Callable[[], Any] | None = None
    ) -> RunningSidecar:
        listen, admin = free_port(), free_port()
        path = tmp_path / f"sidecar-{len(running)}.yaml"
        path.write_text(sidecar_yaml(body, listen, admin, drain))
        config, _warnings = load_config(path)
        capture = _Capture()
        writer = LineWriter(capture)
        if upstream_client is None:
            sc = Sidecar(config, log_writer=writer)
        else:  # the conformance suite runs every case over each client
            sc = Sidecar(config, log_writer=writer, upstream_client=upstream_client)
        await sc.start()
        rs = RunningSidecar(sc, listen, admin, path, capture, writer)
        running.append(rs)
        return rs

    yield make
    for rs in running:
        if not rs.sidecar.draining:
            await rs.sidecar.stop()
        rs.writer.close()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        auto_decompress=False, timeout=aiohttp.ClientTimeout(total=30)
    ) as session:
        yield session


# --------------------------------------------------------------------------- subprocesses


@dataclass
class Process:
    proc: subprocess.Popen[str]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@pytest.fixture
def spawn() -> Iterator[Callable[..., Process]]:
    """Factory: run `python -m sidecar ARGS` as a process; killed by PID at teardown."""
    procs: list[Process] = []

    def make(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> Process:
        full_env = dict(os.environ)
        full_env.update(env or {})
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", *args],
            cwd=cwd,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        p = Process(proc)
        procs.append(p)
        return p

    yield make
    for p in procs:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(10)
        for stream in (p.proc.stdout, p.proc.stderr):
            if stream is not None:
                stream.close()
