"""Upstreams: the nginx origin config, and a small raw-asyncio HTTP/1.1 server.

nginx (Debian's, one process, `master_process off`) is the origin for the throughput
phases. The raw server below is the origin for the resilience scenarios, and the fallback
origin for everything when nginx is not installed. Each listening port has a mode:

    PORT                      200 "hello\n" (and /static/ files with --www)
    PORT:flaky:SHARE[:SEED]   503 for SHARE of the attempts (1.0: every one), decided from
                              the request number the driver sends (`x-bench-req: N`) and the
                              attempt number (the k-th arrival of N on this port is attempt
                              k) through a seeded hash: two proxies with the same retry
                              policy, each on its own port, meet exactly the same failures
    PORT:slow:SECONDS         200 after a delay
    PORT:keepalive:SECONDS    200 with `Keep-Alive: timeout=SECONDS`, and every connection
                              closed after exactly SECONDS idle (the keep-alive race)

`GET /__bench/stats` on any port answers JSON: per port, the requests received (attempts,
as an upstream counts them) and their statuses. It is not counted itself.

    python -m bench.upstream --www DIR --listen 18080 --listen 18081:flaky:0.2:1 \
        --listen 18082:slow:0.2
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import mmap
import os
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
KEEPALIVE_HELLO = (
    b"HTTP/1.1 200 OK\r\nServer: bench-upstream\r\nContent-Type: text/plain\r\n"
    b"Connection: keep-alive\r\nKeep-Alive: timeout=%d\r\nContent-Length: 6\r\n\r\nhello\n"
)
UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\nServer: bench-upstream\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 12\r\n\r\nunavailable\n"
)
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nServer: bench-upstream\r\nContent-Length: 0\r\n\r\n"
STATS_PATH = b"/__bench/stats"
REQ_HEADER = b"x-bench-req"
MODES = ("ok", "flaky", "slow", "keepalive")
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


def fails(seed: int, request: int, attempt: int, share: float) -> bool:
    """Whether attempt `attempt` (1, 2, ...) of request number `request` gets a 503: a
    seeded hash, so the answer depends on (seed, request, attempt) alone."""
    if share >= 1.0:
        return True
    digest = hashlib.blake2b(f"{seed}:{request}:{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < share


class PortStats:
    """What one listening port received: requests (attempts) by status, and for flaky
    ports the arrivals per request number (bounded by the driver's request count)."""

    def __init__(self) -> None:
        self.requests = 0
        self.statuses: dict[int, int] = {}
        self.arrivals: dict[int, int] = {}
        self.unnumbered = 0
        self.connections = 0
        self.idle_closes = 0

    def count(self, status: int) -> None:
        self.requests += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1

    def as_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "distinct_requests": len(self.arrivals),
            "unnumbered": self.unnumbered,
            "connections": self.connections,
            "idle_closes": self.idle_closes,
        }


class _Conn(asyncio.Protocol):
    def __init__(
        self,
        mode: str,
        arg: float,
        seed: int,
        www: Path | None,
        files: dict[str, mmap.mmap],
        stats: dict[int, PortStats],
        port: int,
    ):
        self.mode = mode
        self.arg = arg
        self.seed = seed
        self.www = www
        self.files = files
        self.all_stats = stats
        self.stats = stats[port]
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.skip = 0
        self.chunked = False
        self.pending: deque[tuple[bytes, bool, int | None]] = deque()
        self.busy = False
        self.writable = asyncio.Event()
        self.writable.set()
        self.idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.stats.connections += 1
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.writable.set()
        if self.idle is not None:
            self.idle.cancel()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    # The keep-alive race: the connection closes exactly `arg` seconds after it went idle
    # (its last response written, nothing pending), as an upstream with that keep-alive
    # timeout does. Any byte received cancels the timer.
    def _arm_idle(self) -> None:
        if self.mode != "keepalive" or self.busy or self.pending or self.buf:
            return
        if self.idle is not None:
            self.idle.cancel()
        self.idle = asyncio.get_running_loop().call_later(self.arg, self._idle_close)

    def _idle_close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.stats.idle_closes += 1
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        self.buf += data
        while True:
            if self.chunked:
                # Only the driver's own small bodies come chunked: skip to the last chunk.
                end = self.buf.find(b"0\r\n\r\n")
                if end < 0:
                    break
                del self.buf[: end + 5]
                self.chunked = False
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
            number: int | None = None
            for line in lines[1:]:
                key, _, value = line.partition(b":")
                key = key.strip().lower()
                value = value.strip()
                if key == b"content-length":
                    self.skip = int(value or b"0")
                elif key == b"transfer-encoding" and value.lower() == b"chunked":
                    self.chunked = True
                elif key == b"connection" and value.lower() == b"close":
                    close = True
                elif key == REQ_HEADER and value.isdigit():
                    number = int(value)
            self.pending.append((path, close, number))
        self._pump()
        self._arm_idle()

    def _pump(self) -> None:
        while self.pending and not self.busy and self.transport is not None:
            path, close, number = self.pending.popleft()
            self._respond(path, close, number)

    def _respond(self, path: bytes, close: bool, number: int | None) -> None:
        if path == STATS_PATH:
            body = json.dumps({str(p): s.as_dict() for p, s in self.all_stats.items()}).encode()
            self._send(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
                close,
            )
            return
        if self.mode == "flaky":
            if number is None:
                self.stats.unnumbered += 1
                attempt = 1
                number = -self.stats.unnumbered
            else:
                attempt = self.stats.arrivals.get(number, 0) + 1
            self.stats.arrivals[number] = attempt
            if fails(self.seed, number, attempt, self.arg):
                self.stats.count(503)
                self._send(UNAVAILABLE, close)
                return
        if self.mode == "slow":
            self.busy = True
            asyncio.get_running_loop().call_later(self.arg, self._finish_slow, path, close)
            return
        if path.startswith(b"/static/"):
            self.busy = True
            self.stats.count(200)
            asyncio.get_running_loop().create_task(self._send_file(path[8:].decode(), close))
            return
        self.stats.count(200)
        if self.mode == "keepalive":
            self._send(KEEPALIVE_HELLO % int(self.arg), close)
            return
        self._send(HELLO, close)

    def _finish_slow(self, path: bytes, close: bool) -> None:
        self.busy = False
        if self.transport is None or self.transport.is_closing():
            return
        self.stats.count(200)
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


Listen = tuple[int, str, float, int]


async def serve(listens: list[Listen], www: Path | None) -> None:
    loop = asyncio.get_running_loop()
    files: dict[str, mmap.mmap] = {}
    stats = {port: PortStats() for port, _, _, _ in listens}
    servers = []
    for port, mode, arg, seed in listens:

        def factory(
            mode: str = mode, arg: float = arg, seed: int = seed, port: int = port
        ) -> _Conn:
            return _Conn(mode, arg, seed, www, files, stats, port)

        servers.append(
            await loop.create_server(factory, "127.0.0.1", port, backlog=4096, reuse_address=True)
        )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"bench upstream listening on {[p for p, _, _, _ in listens]}", file=sys.stderr)
    await stop.wait()
    for s in servers:
        s.close()


def parse_listen(text: str) -> Listen:
    """`PORT`, `PORT:flaky:SHARE[:SEED]`, `PORT:slow:SECONDS` or `PORT:keepalive:SECONDS`."""
    parts = text.split(":")
    port = int(parts[0])
    mode = parts[1] if len(parts) > 1 else "ok"
    if mode not in MODES:
        raise argparse.ArgumentTypeError(f"unknown mode {mode!r}")
    arg = float(parts[2]) if len(parts) > 2 else 0.0
    seed = int(parts[3]) if len(parts) > 3 else 0
    return port, mode, arg, seed


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
