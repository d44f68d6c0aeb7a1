"""An app-side HTTP/1.1 client that checks every byte the sidecar sends back.

aiohttp's client tolerates and normalises; a test that asks "did a malformed head reach
the app?" needs one that does not. `call()` sends one request on a new connection and
reads the answer with RFC 9112's grammar, strictly:

- interim (1xx) heads are collected, then the final head;
- the status line must be `HTTP/1.1 NNN reason` with NNN in 100..599 and no control
  characters; each field a token name and a value without CR, LF, NUL or other CTLs;
- framing must be unambiguous: not both Content-Length and Transfer-Encoding, at most one
  Content-Length, Transfer-Encoding exactly `chunked`;
- the body is read by that framing; a connection that ends early is `cut`.

Anything else is recorded in `violations`: a test asserts there are none.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass, field

_STATUS = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) ([\t\x20-\x7e\x80-\xff]*)")
_FIELD = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[\t ]*([\t\x20-\x7e\x80-\xff]*?)[\t ]*")
MAX_HEAD = 256 * 1024


@dataclass
class Answer:
    status: int = 0
    reason: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    interim: list[tuple[int, list[tuple[str, str]]]] = field(default_factory=list)
    cut: bool = False  # the connection ended before the answer was complete
    violations: list[str] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        name = name.lower()
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None

    def all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n.lower() == name]

    def text(self) -> str:
        """Everything of the answer as text, for marker searches."""
        parts = [f"{n}: {v}" for n, v in self.headers]
        for _, fields in self.interim:
            parts.extend(f"{n}: {v}" for n, v in fields)
        parts.append(self.reason.decode("latin-1"))
        parts.append(self.body.decode("latin-1"))
        return "\n".join(parts)


async def call(
    port: int,
    target: str = "/api",
    *,
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    body: bytes | None = None,
    timeout: float = 10.0,
) -> Answer:
    """One request on a fresh connection to 127.0.0.1:`port`; TimeoutError past `timeout`."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=MAX_HEAD)
        try:
            lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
            lines.extend(f"{n}: {v}" for n, v in headers or [])
            if body is not None:
                lines.append(f"Content-Length: {len(body)}")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
            await writer.drain()
            return await _read_answer(reader, method)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


async def _read_answer(reader: asyncio.StreamReader, method: str) -> Answer:
    answer = Answer()
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            answer.cut = True
            if exc.partial:
                answer.violations.append(f"incomplete head: {exc.partial[:80]!r}")
            return answer
        except (asyncio.LimitOverrunError, ValueError):
            answer.violations.append("head over 256 KiB")
            return answer
        except ConnectionError:
            answer.cut = True
            return answer
        status, reason, fields = _parse_head(head, answer.violations)
        if 100 <= status < 200:
            answer.interim.append((status, fields))
            if len(answer.interim) > 20:
                answer.violations.append("too many interim heads")
                return answer
            continue
        answer.status, answer.reason, answer.headers = status, reason, fields
        break
    await _read_body(reader, method, answer)
    return answer


def _parse_head(head: bytes, violations: list[str]) -> tuple[int, bytes, list[tuple[str, str]]]:
    lines = head[:-4].split(b"\r\n")
    match = _STATUS.fullmatch(lines[0])
    if match is None:
        violations.append(f"malformed status line {lines[0][:80]!r}")
        return 0, b"", []
    fields = []
    for line in lines[1:]:
        if b"\n" in line or b"\r" in line:
            violations.append(f"bare CR or LF in a field line {line[:80]!r}")
            continue
        m = _FIELD.fullmatch(line)
        if m is None:
            violations.append(f"malformed field line {line[:80]!r}")
            continue
        fields.append((m.group(1).decode("ascii"), m.group(2).decode("utf-8", "surrogateescape")))
    return int(match.group(1)), match.group(2), fields


async def _read_body(reader: asyncio.StreamReader, method: str, answer: Answer) -> None:
    lengths = answer.all("Content-Length")
    codings = answer.all("Transfer-Encoding")
    if lengths and codings:
        answer.violations.append("both Content-Length and Transfer-Encoding")
    if len(lengths) > 1:
        answer.violations.append(f"several Content-Length fields {lengths}")
    if codings and [c.strip().lower() for c in ",".join(codings).split(",")] != ["chunked"]:
        answer.violations.append(f"Transfer-Encoding {codings}")
    if method == "HEAD" or answer.status in (204, 304):
        return
    try:
        if codings:
            answer.body = await _read_chunked(reader, answer)
        elif lengths:
            if not lengths[0].isdigit():
                answer.violations.append(f"Content-Length {lengths[0]!r}")
                return
            answer.body = await reader.readexactly(int(lengths[0]))
        else:
            answer.body = await reader.read()
    except asyncio.IncompleteReadError as exc:
        answer.body = exc.partial
        answer.cut = True
    except ConnectionError:
        answer.cut = True


async def _read_chunked(reader: asyncio.StreamReader, answer: Answer) -> bytes:
    parts: list[bytes] = []
    while True:
        line = await reader.readuntil(b"\r\n")
        size_text = line[:-2].split(b";")[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            answer.violations.append(f"bad chunk size {line[:40]!r}")
            raise asyncio.IncompleteReadError(b"".join(parts), None) from None
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass  # trailers (the sidecar sends none over HTTP/1.1)
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            answer.violations.append("chunk not followed by CRLF")
