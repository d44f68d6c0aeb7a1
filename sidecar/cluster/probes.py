"""One-shot probes of an endpoint: can we connect, and does a health path answer 2xx?

Each probe opens a fresh connection (never a pooled one: the question is whether the
endpoint accepts connections *now*), is bounded by `timeout` as a whole, and closes the
connection before returning. Neither ever raises for a network failure: the answer is a
bool. `CancelledError` passes through untouched.

Used by the breaker's recovery task (`sidecar.cluster.recovery`), which decides which
probe the evidence calls for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sidecar.config.model import Address

log = logging.getLogger("sidecar.probes")

# A status line is short; anything longer than this without a line end is not HTTP.
_MAX_STATUS_LINE = 1024


# The signatures are the probes' shared interface; the timeout is applied inside, with
# asyncio.timeout(), as ASYNC109 asks.
async def tcp_probe(address: Address, timeout: float) -> bool:  # noqa: ASYNC109
    """True if a TCP connection to `address` is accepted within `timeout` seconds."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(address.host, address.port)
        return True
    except (OSError, TimeoutError) as exc:
        log.debug("tcp probe %s: %r", address, exc)
        return False
    finally:
        if writer is not None:
            _close(writer)


async def http_probe(address: Address, path: str, timeout: float) -> bool:  # noqa: ASYNC109
    """True if `GET path` on a fresh connection to `address` answers 2xx within `timeout`."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(address.host, address.port)
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {address}\r\n"
                "User-Agent: sidecar-probe\r\nConnection: close\r\n\r\n".encode("latin-1")
            )
            await writer.drain()
            line = await reader.readuntil(b"\n")
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        log.debug("http probe %s%s: %r", address, path, exc)
        return False
    finally:
        if writer is not None:
            _close(writer)
    status = _status(line)
    if status is None:
        log.debug("http probe %s%s: not an HTTP status line: %r", address, path, line[:80])
        return False
    return 200 <= status < 300


def _status(line: bytes) -> int | None:
    """The status code of an HTTP/1.x status line, or None."""
    if len(line) > _MAX_STATUS_LINE:
        return None
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        return None
    code = parts[1]
    if len(code) != 3 or not code.isdigit():
        return None
    return int(code)


def _close(writer: asyncio.StreamWriter) -> None:
    # No wait_closed(): the answer is known, and a peer slow to acknowledge the close must
    # not hold the probe; the transport finishes closing on its own.
    with contextlib.suppress(OSError, RuntimeError):
        writer.close()
