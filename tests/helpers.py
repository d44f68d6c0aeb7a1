"""Small helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import socket
import textwrap
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on, never the same twice in one test run."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


async def read_head(reader: asyncio.StreamReader) -> bytes:
    """Read one HTTP message head from a raw connection."""
    return await reader.readuntil(b"\r\n\r\n")


def sidecar_yaml(body: str, listen: int, admin: int, drain: str = "2s") -> str:
    head = f"listen: 127.0.0.1:{listen}\nadmin: 127.0.0.1:{admin}\ndrain_timeout: {drain}\n"
    return head + textwrap.dedent(body)


def one_service(address: str, route_extra: str = "", service_extra: str = "") -> str:
    """A config body with one service `api` behind one route `api` on /api."""
    return f"""
    services:
      api:
        endpoints: ["{address}"]
        {service_extra}
    routes:
      - name: api
        match: {{ prefix: /api }}
        service: api
        {route_extra}
    """


async def wait_http(url: str, status: int = 200, attempts: int = 200) -> None:
    """Poll a URL until it answers with `status` (bounded)."""
    async with aiohttp.ClientSession() as session:
        for _ in range(attempts):
            try:
                async with session.get(url) as resp:
                    if resp.status == status:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never answered {status}")
