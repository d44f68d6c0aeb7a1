"""A real etcd (Debian's /usr/bin/etcd) on 127.0.0.1 for tests, plus a tiny raw client.

`running_etcd(tmp_path)` starts a single-member etcd on free ports with its data in a
temporary folder, waits for /health, and kills it by PID at the end. `stop()` / `start()`
(and the async `astop()` / `astart()`) restart it on the same ports and data, for outage
tests. The raw client calls the v3 JSON gateway with urllib, independently of the code
under test, in a worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import free_port

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def require_etcd() -> None:
    if not os.access(ETCD, os.X_OK):
        pytest.skip("etcd is not installed (apt-get install etcd-server; `make test` does it)")


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


class EtcdServer:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.data_dir = tmp / "etcd-data"
        self.log_path = tmp / "etcd.log"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 20.0) -> None:
        assert self.proc is None, "already running"
        peer = f"http://127.0.0.1:{self.peer_port}"
        args = [
            ETCD,
            "--name=default",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            # Fast elections: the single member leads within ~100 ms of starting.
            "--heartbeat-interval=10",
            "--election-timeout=100",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"etcd exited with {code}: {self._log_tail()}")
            if self._healthy():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd not healthy within {timeout}s: {self._log_tail()}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as resp:
                return bool(json.load(resp).get("health") == "true")
        except (OSError, ValueError):
            return False

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the process by its PID (SIGKILL if it lingers) and reap it."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)

    async def astop(self, sig: int = signal.SIGTERM) -> None:
        await asyncio.to_thread(self.stop, sig)

    # -- a raw client over the JSON gateway (urllib, in a worker thread) ------------------

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                data: dict[str, Any] = json.load(resp)
        except urllib.error.HTTPError as exc:
            data = json.loads(exc.read() or b"{}")
        return data

    async def acall(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await asyncio.to_thread(self.call, path, body)

    async def put(self, key: str, value: str, lease: int = 0) -> None:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        await self.acall("/v3/kv/put", body)

    async def delete(self, key: str) -> None:
        await self.acall("/v3/kv/deleterange", {"key": _b64(key)})

    async def get(self, key: str) -> dict[str, Any] | None:
        """The key's kv (with decoded `value` and int `lease`), or None."""
        data = await self.acall("/v3/kv/range", {"key": _b64(key)})
        for kv in data.get("kvs", []):
            return {
                "value": base64.b64decode(kv.get("value", "")).decode(),
                "lease": int(kv.get("lease", 0)),
            }
        return None

    async def time_to_live(self, lease: int) -> dict[str, Any]:
        return await self.acall("/v3/lease/timetolive", {"ID": str(lease), "keys": True})


@contextlib.contextmanager
def running_etcd(tmp: Path) -> Iterator[EtcdServer]:
    """A started etcd, killed and reaped at the end whatever happens."""
    require_etcd()
    server = EtcdServer(tmp)
    for attempt in range(3):
        try:
            server.start()
            break
        except RuntimeError:
            # A "free" port can be taken between choosing and binding: pick new ones.
            if attempt == 2:
                raise
            server = EtcdServer(tmp / f"retry{attempt}")
            server.tmp.mkdir()
    try:
        yield server
    finally:
        server.stop(signal.SIGKILL)
