"""A seeded fuzz of upstream responses through the sidecar.

Each case starts from a valid response (Content-Length, chunked with extensions and
trailers, read-until-close, 1xx then final, 204/304, HTTP/1.0, a large body) and applies
a few mutations: flipped, inserted or deleted bytes, truncation, duplicated or oversized
headers, many fields, bad chunk sizes, changed lengths and codings, obs-fold, and extra
(ghost) responses behind it. The upstream then keeps the connection, closes it or resets
it. Every response carries unique markers (`mk<kind><case>q<crc>`: header, body and
trailer), so a byte of one response showing up in another's answer is caught.

For every case the app (a strict HTTP/1.1 reader) must get an answer before the deadline;
the head it gets must be well-formed; any marker in it must be the case's own. Every few
hundred cases a canary request must still be served normally, and at the end nothing is
left in flight. Many cases share one sidecar and one upstream, so pooled connections
carry cases after one another: that is where leaks between responses would show.

    make test                                  2,000 cases, seed 20261201 (a few seconds)
    SIDECAR_FUZZ_CASES=200000 SIDECAR_FUZZ_SEED=7 .venv/bin/pytest tests/test_upstream_fuzz.py
    SIDECAR_FUZZ_CLIENT=reference ...          the same against aiohttp's client

A failing case names its index and seed; `SIDECAR_FUZZ_ONLY=<index>` reruns just that one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from helpers import one_service
from support.scripted import After, Reply, SeenRequest, response, scripted_upstream
from support.strictclient import Answer, call

from sidecar.upstream.base import UpstreamClient
from sidecar.upstream.h1 import UpstreamPool
from sidecar.upstream.reference import ReferenceClient

SEED = int(os.environ.get("SIDECAR_FUZZ_SEED", "20261201"))
CASES = int(os.environ.get("SIDECAR_FUZZ_CASES", "2000"))
ONLY = os.environ.get("SIDECAR_FUZZ_ONLY")
CLIENT = os.environ.get("SIDECAR_FUZZ_CLIENT", "h1")
PARALLEL = 8
CANARY_EVERY = 250
CLIENTS: dict[str, Callable[[], UpstreamClient]] = {
    "h1": UpstreamPool,
    "reference": ReferenceClient,
}
ROUTE = "timeout: 400ms\n        retries: { max_retries: 0 }"
# Failing attempts are the point here: the breaker must not stop the run.
# The fuzz is about the client: no breaker rule or ejection may refuse a case.
SERVICE = (
    "circuit_breaker: { failure_threshold: 1000000000, failure_rate: false }\n"
    "        outlier_detection: false"
)
APP_DEADLINE = 5.0  # far past the route timeout: an answer later than this is a hang

_MARKER = re.compile(r"mk([cgk])(\d+)q([0-9a-f]{4})")


def marker(kind: str, n: int) -> str:
    return f"mk{kind}{n}q{zlib.crc32(f'{kind}{n}'.encode()) & 0xFFFF:04x}"


def markers_in(text: str) -> set[tuple[str, int]]:
    """The intact markers in `text` (a mutated one fails its checksum and is ignored)."""
    found = set()
    for kind, n, crc in _MARKER.findall(text):
        if marker(kind, int(n)) == f"mk{kind}{n}q{crc}":
            found.add((kind, int(n)))
    return found


# --------------------------------------------------------------------------- generation


def _cl(status: bytes, m: str, body: bytes, *extra: bytes) -> bytes:
    fields = b"".join(e + b"\r\n" for e in extra)
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\nX-Marker: "
        + m.encode()
        + b"\r\nContent-Type: text/plain\r\n"
        + fields
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


def _chunked(m: str, body: bytes) -> bytes:
    half = len(body) // 2
    a, b = body[:half], body[half:]
    return (
        b"HTTP/1.1 200 OK\r\nX-Marker: "
        + m.encode()
        + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x;ext=1\r\n" % len(a)
        + a
        + b"\r\n"
        + b"%x\r\n" % len(b)
        + b
        + b"\r\n"
        + b"0\r\nX-Trailer: "
        + m.encode()
        + b"\r\n\r\n"
    )


def base_response(rng: random.Random, m: str) -> tuple[bytes, After | None]:
    """A valid response for marker `m`, and the after-action it needs (None: any)."""
    body = f"body of {m} ".encode() * rng.randint(1, 4)
    kind = rng.randrange(9)
    if kind == 0:
        return _cl(b"200 OK", m, body), None
    if kind == 1:
        return _chunked(m, body), None
    if kind == 2:
        head = b"HTTP/1.1 200 OK\r\nX-Marker: " + m.encode() + b"\r\nConnection: close\r\n\r\n"
        return head + body, "close"
    if kind == 3:
        hint = b"HTTP/1.1 103 Early Hints\r\nLink: </" + m.encode() + b".css>\r\n\r\n"
        return hint + _cl(b"201 Created", m, body), None
    if kind == 4:
        return b"HTTP/1.1 204 No Content\r\nX-Marker: " + m.encode() + b"\r\n\r\n", None
    if kind == 5:
        return (
            b"HTTP/1.1 304 Not Modified\r\nX-Marker: " + m.encode() + b'\r\nETag: "e"\r\n\r\n',
            None,
        )
    if kind == 6:
        status = rng.choice(
            [b"404 Not Found", b"500 Internal Server Error", b"503 Service Unavailable"]
        )
        return _cl(status, m, body), None
    if kind == 7:
        old = b"HTTP/1.0 200 OK\r\nX-Marker: " + m.encode()
        if rng.random() < 0.5:
            return old + b"\r\nConnection: keep-alive\r\nContent-Length: %d\r\n\r\n" % len(
                body
            ) + body, None
        return old + b"\r\n\r\n" + body, "close"
    big = m.encode() + b"B" * 100_000 + m.encode()
    return _cl(b"200 OK", m, big), None


INTERESTING = b"\r\n\x00: \t;,0x9fF\x7f\x80\xff"


def mutate(rng: random.Random, data: bytes, ghost: str) -> bytes:
    ops = rng.choice([0, 1, 1, 2, 2, 3])
    for _ in range(ops):
        op = rng.randrange(13)
        pos = rng.randrange(len(data) + 1)
        if op == 0:  # flip a byte
            if data:
                pos = min(pos, len(data) - 1)
                byte = rng.choice(INTERESTING) if rng.random() < 0.6 else rng.randrange(256)
                data = data[:pos] + bytes([byte]) + data[pos + 1 :]
        elif op == 1:  # insert a byte
            data = data[:pos] + bytes([rng.choice(INTERESTING)]) + data[pos:]
        elif op == 2:  # delete a span
            data = data[:pos] + data[pos + rng.randint(1, 8) :]
        elif op == 3:  # truncate
            data = data[:pos]
        elif op == 4:  # duplicate a field line
            lines = data.split(b"\r\n")
            head_end = lines.index(b"") if b"" in lines else len(lines)
            if head_end > 1:
                i = rng.randrange(1, head_end)
                lines.insert(i, lines[i])
                data = b"\r\n".join(lines)
        elif op == 5:  # an oversized field
            size = rng.choice([8_000, 60_000, 70_000, 200_000])
            data = data.replace(b"\r\n", b"\r\nX-Big: " + b"v" * size + b"\r\n", 1)
        elif op == 6:  # many fields
            count = rng.choice([50, 99, 101, 500])
            data = data.replace(b"\r\n", b"\r\n" + b"X-Many: v\r\n" * count, 1)
        elif op == 7:  # a bad chunk size
            bad = rng.choice([b"zz", b"f" * 20, b"-1", b"5 5", b"", b"0x5", b"1" * 40])
            data = re.sub(rb"\r\n\r\n[0-9a-f]+", b"\r\n\r\n" + bad, data, count=1)
        elif op == 8:  # a ghost response behind it, whole or partial
            ghost_bytes = _cl(
                b"200 OK", ghost, f"ghost {ghost}".encode(), b"Set-Cookie: " + ghost.encode()
            )
            if rng.random() < 0.3:
                ghost_bytes = ghost_bytes[: rng.randrange(1, len(ghost_bytes))]
            data += ghost_bytes
        elif op == 9:  # change a length
            data = re.sub(
                rb"Content-Length: (\d+)",
                lambda mt: (
                    b"Content-Length: %d" % max(0, int(mt.group(1)) + rng.choice([-5, -1, 1, 7]))
                ),
                data,
                count=1,
            )
        elif op == 10:  # a transfer coding
            coding = rng.choice([b"gzip, chunked", b"chunked, gzip", b"identity", b"chunked"])
            data = data.replace(b"\r\n", b"\r\nTransfer-Encoding: " + coding + b"\r\n", 1)
        elif op == 11:  # another status
            status = rng.choice(
                [b"099", b"100", b"101", b"199", b"600", b"999", b"20", b"2000", b"abc"]
            )
            data = re.sub(rb"^HTTP/1\.[01] \d+", b"HTTP/1.1 " + status, data, count=1)
        else:  # obs-fold
            data = data.replace(b"\r\nX-Marker: ", b"\r\nX-Fold: a\r\n b\r\nX-Marker: ", 1)
    return data


@dataclass
class FuzzCase:
    index: int
    reply: Reply
    method: str

    def describe(self) -> str:
        data = self.reply.data
        shown = data if len(data) < 600 else data[:300] + b"..." + data[-240:]
        return (
            f"case {self.index} (seed {SEED}, {self.method}, after={self.reply.after}): {shown!r}"
        )


def make_case(index: int) -> FuzzCase:
    rng = random.Random(SEED * 1_000_003 + index)
    data, forced = base_response(rng, marker("c", index))
    data = mutate(rng, data, marker("g", index))
    afters: list[After] = ["keep", "close", "reset"]
    after = forced or rng.choices(afters, [55, 35, 10])[0]
    method = rng.choices(["GET", "POST"], [85, 15])[0]
    return FuzzCase(index, Reply(data, after=after), method)


# --------------------------------------------------------------------------- the run


def _canary(n: int) -> bytes:
    m = marker("k", n)
    return response(200, f"canary {m}".encode(), [("X-Marker", m)])


def _short(answer: Answer) -> str:
    text = repr(answer)
    return text if len(text) < 1500 else text[:1000] + " ... " + text[-400:]


def check_answer(case: FuzzCase, answer: Answer) -> None:
    why = case.describe()
    assert answer.violations == [], f"{why}\nmalformed answer: {answer.violations}"
    # The case's own ghost may rightly be in its answer (bytes after a body read until
    # close are body); a marker of any other case is a leak between responses.
    leaked = {m for m in markers_in(answer.text()) if m[1] != case.index}
    assert not leaked, f"{why}\nanswer carries another response's bytes: {leaked}\n{_short(answer)}"
    for status, _ in answer.interim:
        assert status not in (100, 101), f"{why}\ninterim {status} relayed"


@pytest.mark.slow
@pytest.mark.timeout(90 + CASES // 20)
async def test_fuzzed_upstream_responses(sidecar, caplog) -> None:
    cases = [make_case(int(ONLY))] if ONLY else [make_case(i) for i in range(CASES)]
    by_index = {str(c.index): c for c in cases}
    canaries = 0

    def answer(request: SeenRequest) -> Reply | bytes:
        name = request.headers.get("x-case", "")
        if name.startswith("canary"):
            return _canary(int(name[6:]))
        return by_index[name].reply

    caplog.set_level(logging.ERROR)
    async with scripted_upstream(answer) as up:
        sc = await sidecar(
            one_service(up.address, route_extra=ROUTE, service_extra=SERVICE),
            upstream_client=CLIENTS[CLIENT],
        )
        queue: asyncio.Queue[FuzzCase] = asyncio.Queue()
        for case in cases:
            queue.put_nowait(case)
        failures: list[str] = []

        async def canary() -> None:
            nonlocal canaries
            canaries += 1
            got = await call(sc.listen, "/api/canary", headers=[("x-case", f"canary{canaries}")])
            assert got.status == 200, f"canary {canaries} after a fuzz batch: {got}"
            assert got.body == f"canary {marker('k', canaries)}".encode()

        async def worker() -> None:
            while not queue.empty() and len(failures) < 5:
                case = queue.get_nowait()
                body = b"fuzz body" if case.method == "POST" else None
                try:
                    got = await call(
                        sc.listen,
                        "/api/fuzz",
                        method=case.method,
                        headers=[("x-case", str(case.index))],
                        body=body,
                        timeout=APP_DEADLINE,
                    )
                    check_answer(case, got)
                except TimeoutError:
                    failures.append(f"{case.describe()}\nno answer within {APP_DEADLINE}s")
                except AssertionError as exc:
                    failures.append(str(exc))
                if case.index % CANARY_EVERY == CANARY_EVERY - 1:
                    await canary()

        await asyncio.gather(*(worker() for _ in range(PARALLEL)))
        assert not failures, "\n\n".join(failures)
        await canary()
        for _ in range(100):
            if sc.sidecar.proxy.in_flight == 0:
                break
            await asyncio.sleep(0.05)
        assert sc.sidecar.proxy.in_flight == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors[:5]]
    assert len(up.requests) >= len(cases)  # every case reached the upstream


def test_markers_survive_only_intact() -> None:
    m = marker("c", 42)
    assert markers_in(f"x {m} y") == {("c", 42)}
    assert markers_in(m.replace("42", "43")) == set()  # a mutated marker is nobody's
    assert markers_in(m[:-1] + ("0" if m[-1] != "0" else "1")) == set()


def test_generation_is_reproducible() -> None:
    assert make_case(7).reply == make_case(7).reply
    assert {make_case(i).reply.data for i in range(50)} != {make_case(0).reply.data}
