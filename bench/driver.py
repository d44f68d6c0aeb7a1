"""The resilience scenarios' app: an aiohttp client that records what it sees.

Two ways of calling, both bounded in count and time:
- `drive`: open loop, request i sent at t0 + i/rate whatever the answers do (the load does
  not back off when a proxy gets slow, as a real population of callers does not);
- `paced`: one call at a time, each sent a given gap after the previous answer (the
  low-traffic and keep-alive scenarios, where the gap itself is the point).

Every request carries `x-bench-req: N` (its number in the schedule); both proxies forward
it, and the flaky upstream decides each attempt from it (bench/upstream.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

CLIENT_TIMEOUT = 10.0
REQ_HEADER = "x-bench-req"
POST_BODY = b"bench-post-body\n" * 4  # 64 bytes
T = TypeVar("T")


@dataclass
class Sample:
    t: float  # send time, s since the scenario's start
    latency: float  # s
    status: int  # 0: the client got no HTTP response
    reason: str | None  # x-sidecar-error, or the client's exception name
    n: int = 0  # the request number (x-bench-req)
    method: str = "GET"

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


async def call(
    session: aiohttp.ClientSession, url: str, t0: float, n: int, method: str = "GET"
) -> Sample:
    # perf_counter, not loop.time(): uvloop's clock has only millisecond resolution.
    start = time.perf_counter()
    headers = {REQ_HEADER: str(n)}
    data = POST_BODY if method == "POST" else None
    try:
        async with session.request(method, url, headers=headers, data=data) as resp:
            await resp.read()
            return Sample(
                start - t0,
                time.perf_counter() - start,
                resp.status,
                resp.headers.get("x-sidecar-error"),
                n,
                method,
            )
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return Sample(start - t0, time.perf_counter() - start, 0, type(exc).__name__, n, method)


def session(limit: int = 2000) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit),
        timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT),
    )


async def drive(url: str, rate: float, duration: float, t0: float) -> list[Sample]:
    """Open loop: request i is sent at t0 + i/rate (perf_counter time); at most
    rate*duration requests."""
    loop = asyncio.get_running_loop()
    count = max(1, int(rate * duration))
    async with session() as s:
        tasks: list[asyncio.Task[Sample]] = []
        for i in range(count):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(loop.create_task(call(s, url, t0, i)))
        return list(await asyncio.gather(*tasks))


async def paced(
    url: str,
    gaps: Sequence[float],
    t0: float,
    methods: Sequence[str] = ("GET",),
    after_each: Callable[[Sample], Awaitable[None]] | None = None,
) -> list[Sample]:
    """One call at a time over one keep-alive connection: call i+1 is sent gaps[i] s after
    call i was answered; methods cycle. `after_each` runs after each answer (outside the
    gap's timing: the gap starts once it is done). len(gaps) + 1 calls."""
    out: list[Sample] = []
    async with session(limit=1) as s:
        for i in range(len(gaps) + 1):
            sample = await call(s, url, t0, i, methods[i % len(methods)])
            out.append(sample)
            if after_each is not None:
                await after_each(sample)
            if i < len(gaps):
                await asyncio.sleep(gaps[i])
    return out


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[idx]


def ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 3)


def summarize(samples: list[Sample]) -> dict[str, Any]:
    lat = [s.latency for s in samples]
    ok = sum(1 for s in samples if s.ok)
    codes: dict[str, int] = {}
    for s in samples:
        key = str(s.status) if s.status else "no_response"
        if s.reason:
            key += f":{s.reason}"
        codes[key] = codes.get(key, 0) + 1
    return {
        "requests": len(samples),
        "ok": ok,
        "failed": len(samples) - ok,
        "success_rate": round(ok / len(samples), 5) if samples else None,
        "p50_ms": ms(pct(lat, 50)),
        "p90_ms": ms(pct(lat, 90)),
        "p99_ms": ms(pct(lat, 99)),
        "max_ms": ms(max(lat) if lat else None),
        "codes": dict(sorted(codes.items(), key=lambda kv: -kv[1])),
    }


def recovered_at(samples: list[Sample], since: float) -> float | None:
    """Send time of the first request of the final all-2xx streak (sent after `since`)."""
    ordered = sorted((s for s in samples if s.t >= since), key=lambda s: s.t)
    if not ordered or not ordered[-1].ok:
        return None
    first = ordered[-1].t
    for s in reversed(ordered):
        if not s.ok:
            break
        first = s.t
    return first


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run the driver on uvloop when it is installed (a cheaper client), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
