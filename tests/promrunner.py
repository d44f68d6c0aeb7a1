"""Run a real Prometheus (Debian's /usr/bin/prometheus) on 127.0.0.1 for round-trip tests.

    async with run_prometheus(tmp_path, targets=["127.0.0.1:15000"]) as prom:
        value = await prom.wait_for_value('sidecar_circuit_breaker_state{state="open"}', 1.0)

Prometheus scrapes the given targets every second from a fresh TSDB in `tmp_path`, listens on
a free loopback port, and is stopped by its PID (SIGTERM, then SIGKILL) when the block exits,
whatever happened inside it. Everything here is async so the test's own aiohttp servers keep
being served (and scraped) while a test waits for a value. `prometheus_binary()` returns None
when Prometheus is not installed, for a `pytest.skip` with a clear reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

DEFAULT_BINARY = "/usr/bin/prometheus"


def prometheus_binary() -> str | None:
    """The Prometheus server binary, or None when it is not installed."""
    if os.access(DEFAULT_BINARY, os.X_OK):
        return DEFAULT_BINARY
    return shutil.which("prometheus")


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the usual bind-to-0 probe)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrometheusError(RuntimeError):
    """Prometheus did not start, or a query failed; the message ends with its log."""


@dataclass
class Prometheus:
    """A running Prometheus: its base URL, process and log file."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    session: aiohttp.ClientSession

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query: the `result` list of /api/v1/query (vector results)."""
        async with self.session.get(f"{self.url}/api/v1/query", params={"query": expr}) as resp:
            body = await resp.json(content_type=None)
        if resp.status != 200 or body.get("status") != "success":
            raise PrometheusError(f"query {expr!r} failed: HTTP {resp.status}: {body}")
        data = body["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    async def wait_for(
        self,
        expr: str,
        predicate: Callable[[list[dict[str, Any]]], bool],
        *,
        timeout: float = 30.0,
        interval: float = 0.25,
    ) -> list[dict[str, Any]]:
        """Poll `expr` until `predicate(result)` holds; PrometheusError after `timeout`."""
        deadline = time.monotonic() + timeout
        last: list[dict[str, Any]] = []
        while True:
            last = await self.query(expr)
            if predicate(last):
                return last
            if time.monotonic() >= deadline:
                raise PrometheusError(
                    f"{expr!r} did not reach the expected result in {timeout}s; "
                    f"last result: {last}\n--- prometheus log ---\n{self.log()}"
                )
            await asyncio.sleep(interval)

    async def wait_for_value(
        self, expr: str, expected: float, *, timeout: float = 30.0
    ) -> list[dict[str, Any]]:
        """Poll until `expr` returns at least one series and all of them equal `expected`."""

        def matches(result: list[dict[str, Any]]) -> bool:
            return bool(result) and all(
                math.isclose(float(r["value"][1]), expected) for r in result
            )

        return await self.wait_for(expr, matches, timeout=timeout)

    async def wait_for_targets_up(self, count: int, *, timeout: float = 30.0) -> None:
        """Wait until `count` scrape targets report up == 1."""
        await self.wait_for("up == 1", lambda result: len(result) >= count, timeout=timeout)


def write_config(
    path: Path,
    targets: Sequence[str],
    *,
    job: str = "sidecar",
    scrape_interval: str = "1s",
    rule_files: Sequence[Path] = (),
) -> Path:
    """A minimal prometheus.yml scraping `targets` ("127.0.0.1:PORT") every `scrape_interval`."""
    config = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": scrape_interval,
        },
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {
                "job_name": job,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": list(targets)}],
            }
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


async def _wait_ready(prom: Prometheus, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if prom.process.poll() is not None:
            raise PrometheusError(f"prometheus exited with {prom.process.returncode}\n{prom.log()}")
        with contextlib.suppress(aiohttp.ClientError):
            async with prom.session.get(f"{prom.url}/-/ready") as resp:
                if resp.status == 200:
                    return
        if time.monotonic() >= deadline:
            raise PrometheusError(f"prometheus not ready after {timeout}s\n{prom.log()}")
        await asyncio.sleep(0.1)


async def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM by PID, wait up to `timeout` without blocking the loop, then SIGKILL."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


@contextlib.asynccontextmanager
async def run_prometheus(
    tmp_path: Path,
    targets: Sequence[str],
    *,
    job: str = "sidecar",
    scrape_interval: str = "1s",
    rule_files: Sequence[Path] = (),
    binary: str | None = None,
    ready_timeout: float = 30.0,
) -> AsyncIterator[Prometheus]:
    """Start Prometheus scraping `targets`, yield it once /-/ready answers, stop it by PID."""
    exe = binary or prometheus_binary()
    if exe is None:
        raise PrometheusError("prometheus is not installed")
    workdir = tmp_path / f"prometheus-{free_port()}"
    workdir.mkdir(parents=True)
    config = write_config(
        workdir / "prometheus.yml",
        targets,
        job=job,
        scrape_interval=scrape_interval,
        rule_files=rule_files,
    )
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                exe,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            prom = Prometheus(f"http://127.0.0.1:{port}", process, log_path, session)
            await _wait_ready(prom, ready_timeout)
            yield prom
    finally:
        await stop_process(process)
