"""Upstreams: the nginx origin config, and a small raw-asyncio HTTP/1.1 server.

nginx (Debian's, one process, `master_process off`) is the origin for the throughput
phases, configured like perf/conf/upstream-nginx.conf. The raw server below is the origin
for the resilience scenarios (a port can answer 503 at a given rate, or answer slowly),
and the fallback origin for everything when nginx is not installed.

    python -m bench.upstream --www DIR --listen 18080 --listen 18081:flaky:0.2 \
        --listen 18082:slow:0.2
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import random
import signal
import sys
from collections import deque
from pathlib import Path
from string import Template
from typing import cast

CONF_DIR = Path(__file__).resolve().parent / "conf"

HELLO = (
    b"HTTP/1.1 200 OK\r\nServer: bench-upstream\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 6\r\n\r\nhello\n"
)
UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\nServer: bench-upstream\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 12\r\n\r\nunavailable\n"
)
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nServer: bench-upstream\r\nContent-Length: 0\r\n\r\n"
FILE_CHUNK = 256 * 1024

# Body files served under /static/ (name -> size); 100m is only made when asked for.
BODY_FILES = {"16k.bin": 16 * 1024, "1m.bin": 1024 * 1024, "100m.bin": 100 * 1024 * 1024}


def make_www(folder: Path, names: list[str]) -> Path:
    """Write the static body files (random-ish bytes, so nothing compresses them)."""
    folder.mkdir(parents=True, exist_ok=True)
    block = os.urandom(1024 * 1024)
    for name in names:
        size = BODY_FILES[name]
        path = folder / name
        if path.exists() and path.stat().st_size == size:
            continue
        with open(path, "wb") as f:
            left = size
            while left > 0:
                n = min(left, len(block))
                f.write(block[:n])
                left -= n
    return folder


def nginx_config(tmp: Path, www: Path, ports: list[int]) -> Path:
    """The origin's nginx.conf for `ports` (first is the main one), from conf/ template."""
    for sub in ("up_body", "up_proxy", "up_fcgi", "up_uwsgi", "up_scgi"):
        (tmp / "nginx-tmp" / sub).mkdir(parents=True, exist_ok=True)
    listens = "\n".join(f"        listen 127.0.0.1:{p} backlog=4096;" for p in ports)
    text = Template((CONF_DIR / "upstream-nginx.conf.tmpl").read_text()).substitute(
        tmp=str(tmp), www=str(www), listens=listens.lstrip()
    )
    path = tmp / "upstream-nginx.conf"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- raw server


class _Conn(asyncio.Protocol):
    def __init__(self, mode: str, arg: float, www: Path | None, files: dict[str, mmap.mmap]):
        self.mode = mode
        self.arg = arg
        self.www = www
        self.files = files
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.skip = 0
        self.pending: deque[tuple[bytes, bool]] = deque()
        self.busy = False
        self.writable = asyncio.Event()
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.skip:
                n = min(self.skip, len(self.buf))
                del self.buf[:n]
                self.skip -= n
                if self.skip:
                    break
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536 and self.transport is not None:
                    self.transport.close()
                break
            head = bytes(self.buf[:end])
            del self.buf[: end + 4]
            lines = head.split(b"\r\n")
            parts = lines[0].split(b" ")
            path = parts[1] if len(parts) > 1 else b"/"
            close = False
            for line in lines[1:]:
                key, _, value = line.partition(b":")
                key = key.strip().lower()
                if key == b"content-length":
                    self.skip = int(value.strip() or b"0")
                elif key == b"connection" and value.strip().lower() == b"close":
                    close = True
            self.pending.append((path, close))
        self._pump()

    def _pump(self) -> None:
        while self.pending and not self.busy and self.transport is not None:
            path, close = self.pending.popleft()
            self._respond(path, close)

    def _respond(self, path: bytes, close: bool) -> None:
        t = self.transport
        assert t is not None
        if self.mode == "flaky" and random.random() < self.arg:
            self._send(UNAVAILABLE, close)
            return
        if self.mode == "slow":
            self.busy = True
            asyncio.get_running_loop().call_later(self.arg, self._finish_slow, path, close)
            return
        if path.startswith(b"/static/"):
            self.busy = True
            asyncio.get_running_loop().create_task(self._send_file(path[8:].decode(), close))
            return
        self._send(HELLO, close)

    def _finish_slow(self, path: bytes, close: bool) -> None:
        self.busy = False
        if self.transport is None or self.transport.is_closing():
            return
        self._send(HELLO, close)
        self._pump()

    def _send(self, data: bytes, close: bool) -> None:
        t = self.transport
        if t is None:
            return
        t.write(data)
        if close:
            t.close()

    async def _send_file(self, name: str, close: bool) -> None:
        try:
            body = self.files.get(name)
            if body is None and self.www is not None and "/" not in name:
                body = _map_file(self.www / name)
                if body is not None:
                    self.files[name] = body
            if body is None:
                self._send(NOT_FOUND, close)
                return
            size = len(body)
            head = (
                b"HTTP/1.1 200 OK\r\nServer: bench-upstream\r\n"
                b"Content-Type: application/octet-stream\r\n"
                b"Content-Length: %d\r\n\r\n" % size
            )
            self._send(head, False)
            view = memoryview(body)
            for start in range(0, size, FILE_CHUNK):
                await self.writable.wait()
                t = self.transport
                if t is None or t.is_closing():
                    return
                t.write(view[start : start + FILE_CHUNK])
            view.release()
            if close and self.transport is not None:
                self.transport.close()
        finally:
            self.busy = False
            self._pump()


def _map_file(path: Path) -> mmap.mmap | None:
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


async def serve(listens: list[tuple[int, str, float]], www: Path | None) -> None:
    loop = asyncio.get_running_loop()
    files: dict[str, mmap.mmap] = {}
    servers = []
    for port, mode, arg in listens:

        def factory(mode: str = mode, arg: float = arg) -> _Conn:
            return _Conn(mode, arg, www, files)

        servers.append(
            await loop.create_server(factory, "127.0.0.1", port, backlog=4096, reuse_address=True)
        )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"bench upstream listening on {[p for p, _, _ in listens]}", file=sys.stderr)
    await stop.wait()
    for s in servers:
        s.close()


def parse_listen(text: str) -> tuple[int, str, float]:
    """`PORT`, `PORT:flaky:0.2` (503 share) or `PORT:slow:0.2` (seconds)."""
    parts = text.split(":")
    port = int(parts[0])
    mode = parts[1] if len(parts) > 1 else "ok"
    if mode not in ("ok", "flaky", "slow"):
        raise argparse.ArgumentTypeError(f"unknown mode {mode!r}")
    arg = float(parts[2]) if len(parts) > 2 else 0.0
    return port, mode, arg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.upstream")
    p.add_argument("--listen", action="append", type=parse_listen, required=True)
    p.add_argument("--www", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.listen, args.www))
    else:
        uvloop.run(serve(args.listen, args.www))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
