"""Resilience scenarios: what the app sees through the sidecar and through HAProxy.

Both proxies get the same retry policy (up to 3 retries on connect failure / 503, and on a
per-try timeout in the slow-endpoint scenario) and the same offered load: an open-loop
driver (aiohttp client, fixed rate, bounded count and duration, 10 s client timeout) that
records every request's status and latency. Scenarios:

- errors503:     one upstream, 20 % of its replies are 503
- dead_endpoint: three endpoints, one a closed port
- outage:        one upstream, killed for N s then started again (both proxies at once,
                 so they see the same outage); a wrk -c1 probe measures the sidecar's
                 fail-fast latency while its breaker is open
- slow_endpoint: three endpoints, one answers after 200 ms; per-try timeout 100 ms
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench import wrk
from bench.configs import DEFAULT_RETRY_ON, SidecarSpec
from bench.phases import Bench, Target
from bench.runner import Proc, expect_200, free_ports, log, wait_port_closed, wait_ready

CLIENT_TIMEOUT = 10.0
SLOW_DELAY = 0.2
PER_TRY_TIMEOUT = "100ms"
FLAKY_SHARE = 0.2
T = TypeVar("T")


@dataclass
class Sample:
    t: float  # send time, s since the scenario's start
    latency: float  # s
    status: int  # 0: the client got no HTTP response
    reason: str | None  # x-sidecar-error, or the client's exception name


async def _one(session: aiohttp.ClientSession, url: str, t0: float) -> Sample:
    # perf_counter, not loop.time(): uvloop's clock has only millisecond resolution.
    start = time.perf_counter()
    try:
        async with session.get(url) as resp:
            await resp.read()
            return Sample(
                start - t0,
                time.perf_counter() - start,
                resp.status,
                resp.headers.get("x-sidecar-error"),
            )
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return Sample(start - t0, time.perf_counter() - start, 0, type(exc).__name__)


async def drive(url: str, rate: float, duration: float, t0: float) -> list[Sample]:
    """Open loop: request i is sent at t0 + i/rate (perf_counter time); at most
    rate*duration requests."""
    loop = asyncio.get_running_loop()
    count = max(1, int(rate * duration))
    connector = aiohttp.TCPConnector(limit=2000)
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks: list[asyncio.Task[Sample]] = []
        for i in range(count):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(loop.create_task(_one(session, url, t0)))
        return list(await asyncio.gather(*tasks))


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[idx]


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 3)


def summarize(samples: list[Sample]) -> dict[str, Any]:
    lat = [s.latency for s in samples]
    ok = sum(1 for s in samples if 200 <= s.status < 300)
    codes: dict[str, int] = {}
    for s in samples:
        key = str(s.status) if s.status else "no_response"
        if s.reason:
            key += f":{s.reason}"
        codes[key] = codes.get(key, 0) + 1
    return {
        "requests": len(samples),
        "ok": ok,
        "success_rate": round(ok / len(samples), 5) if samples else None,
        "p50_ms": _ms(_pct(lat, 50)),
        "p90_ms": _ms(_pct(lat, 90)),
        "p99_ms": _ms(_pct(lat, 99)),
        "max_ms": _ms(max(lat) if lat else None),
        "codes": dict(sorted(codes.items(), key=lambda kv: -kv[1])),
    }


def _recovered_at(samples: list[Sample], since: float) -> float | None:
    """Send time of the first request of the final all-2xx streak (sent after `since`)."""
    ordered = sorted((s for s in samples if s.t >= since), key=lambda s: s.t)
    if not ordered or not 200 <= ordered[-1].status < 300:
        return None
    first = ordered[-1].t
    for s in reversed(ordered):
        if not 200 <= s.status < 300:
            break
        first = s.t
    return first


class Resilience:
    def __init__(self, bench: Bench) -> None:
        self.b = bench
        self.s = bench.settings
        self.results: dict[str, Any] = {}

    def run(self) -> dict[str, Any]:
        for name in self.s.scenarios:
            log(f"scenario {name}")
            getattr(self, name)()
        return self.results

    # ------------------------------------------------------------------ helpers

    def _upstream(self, name: str, listens: list[str]) -> Proc:
        proc = self.b.start_python_upstream(listens, name)
        for spec in listens:
            port = int(spec.split(":")[0])
            wait_ready(proc, port)
            if ":" not in spec:  # a plain port answers 200 at once
                expect_200(name, port)
        return proc

    def _sidecar(
        self, name: str, endpoints: list[str], *, per_try: bool = False, outlier: bool = False
    ) -> Target:
        retry_on = DEFAULT_RETRY_ON + (("per-try-timeout",) if per_try else ())
        spec = SidecarSpec(
            tuple(endpoints),
            per_try_timeout=PER_TRY_TIMEOUT if per_try else None,
            retry_on=retry_on,
            reset_timeout=self.s.breaker_reset,
            outlier=outlier,
        )
        return self.b.start_sidecar(name, spec)

    def _haproxy(self, name: str, endpoints: list[str], *, per_try: bool = False) -> Target:
        return self.b.start_haproxy(name, endpoints, PER_TRY_TIMEOUT if per_try else "2s")

    def _steady(
        self,
        name: str,
        endpoints: list[str],
        per_try: bool,
        notes: str,
        *,
        outlier_variant: bool = False,
    ) -> None:
        """Sidecar, then HAProxy (then, if asked, the sidecar with outlier detection on),
        one at a time, each under the same open-loop load."""
        out: dict[str, Any] = {"notes": notes, "rate": self.s.scenario_rate}
        out["duration_s"] = self.s.scenario_duration
        roles = [("sidecar", False), ("haproxy", False)]
        if outlier_variant:
            roles.append(("sidecar+outlier", True))
        for role, outlier in roles:
            if role == "haproxy":
                target = self._haproxy(f"haproxy-{name}", endpoints, per_try=per_try)
            else:
                target = self._sidecar(
                    f"{role.replace('+', '-')}-{name}", endpoints, per_try=per_try, outlier=outlier
                )
            t0 = time.monotonic()
            samples = _run(self._drive_one(target))
            summary = summarize(samples)
            summary["wall_s"] = round(time.monotonic() - t0, 2)
            if target.admin_port is not None:
                summary["sidecar_metrics"] = scrape(target.admin_port)
            out[role] = summary
            log(
                f"  {target.name:<28} success {100 * (summary['success_rate'] or 0):6.2f} % "
                f"p99 {summary['p99_ms']} ms  {summary['codes']} "
                f"{summary.get('sidecar_metrics', '')}"
            )
            self.b.procs.stop(target.proc)
        self.results[name] = out

    async def _drive_one(self, target: Target) -> list[Sample]:
        url = f"http://127.0.0.1:{target.port}/"
        return await drive(url, self.s.scenario_rate, self.s.scenario_duration, time.perf_counter())

    # ------------------------------------------------------------------ scenarios

    def errors503(self) -> None:
        (port,) = free_ports(1)
        up = self._upstream("upstream-flaky", [f"{port}:flaky:{FLAKY_SHARE}"])
        self._steady(
            "errors503",
            [f"127.0.0.1:{port}"],
            False,
            f"one upstream, {FLAKY_SHARE:.0%} of replies are 503",
        )
        self.b.procs.stop(up)

    def dead_endpoint(self) -> None:
        a, dead, c = free_ports(3)
        up = self._upstream("upstream-2of3", [str(a), str(c)])
        self._steady(
            "dead_endpoint",
            [f"127.0.0.1:{a}", f"127.0.0.1:{dead}", f"127.0.0.1:{c}"],
            False,
            "three endpoints, the second a closed port",
            outlier_variant=True,
        )
        self.b.procs.stop(up)

    def slow_endpoint(self) -> None:
        a, slow, c = free_ports(3)
        up = self._upstream("upstream-slow", [str(a), f"{slow}:slow:{SLOW_DELAY}", str(c)])
        self._steady(
            "slow_endpoint",
            [f"127.0.0.1:{a}", f"127.0.0.1:{slow}", f"127.0.0.1:{c}"],
            True,
            f"three endpoints, the second answers after {SLOW_DELAY * 1000:.0f} ms; "
            f"per-try timeout {PER_TRY_TIMEOUT} (HAProxy: timeout server {PER_TRY_TIMEOUT})",
            outlier_variant=True,
        )
        self.b.procs.stop(up)

    def outage(self) -> None:
        s = self.s
        (port,) = free_ports(1)
        listen = [str(port)]
        up: list[Proc] = [self._upstream("upstream-outage", listen)]
        sidecar = self._sidecar("sidecar-outage", [f"127.0.0.1:{port}"])
        haproxy = self._haproxy("haproxy-outage", [f"127.0.0.1:{port}"])
        reset_s = _seconds(s.breaker_reset)
        after = max(3.0, reset_s - s.outage_down + 3.0)
        total = s.outage_up + s.outage_down + after
        probe_at = s.outage_up + max(0.3, min(1.5, s.outage_down - 1.2))
        timeline: dict[str, Any] = {}

        async def scenario() -> tuple[list[Sample], list[Sample]]:
            t0 = time.perf_counter()

            def now() -> float:
                return time.perf_counter() - t0

            async def control() -> None:
                await asyncio.sleep(max(0.0, s.outage_up - now()))
                timeline["down_at"] = round(now(), 3)
                await asyncio.to_thread(self.b.procs.kill, up[0])
                await asyncio.to_thread(wait_port_closed, port)
                await asyncio.sleep(max(0.0, probe_at - now()))
                timeline["probe_at"] = round(now(), 3)
                probe = await asyncio.to_thread(self._probe, sidecar)
                timeline["probe"] = probe
                await asyncio.sleep(max(0.0, s.outage_up + s.outage_down - now()))
                timeline["restart_at"] = round(now(), 3)
                up[0] = await asyncio.to_thread(self._upstream, "upstream-outage-2", listen)
                timeline["back_at"] = round(now(), 3)

            rs, rh, _ = await asyncio.gather(
                drive(f"http://127.0.0.1:{sidecar.port}/", s.outage_rate, total, t0),
                drive(f"http://127.0.0.1:{haproxy.port}/", s.outage_rate, total, t0),
                control(),
            )
            return rs, rh

        log(
            f"  outage: up {s.outage_up}s, down {s.outage_down}s, then {after:.0f}s "
            f"(breaker reset_timeout {s.breaker_reset}); {s.outage_rate:.0f} req/s to each proxy"
        )
        rs, rh = _run(scenario())
        down, back = timeline["down_at"], timeline["back_at"]
        out: dict[str, Any] = {
            "notes": (
                f"one upstream, killed at {down:.1f}s and back at {back:.1f}s; "
                f"sidecar breaker reset_timeout {s.breaker_reset}"
            ),
            "rate": s.outage_rate,
            "duration_s": round(total, 2),
            "timeline": timeline,
            "breaker_reset_timeout_s": reset_s,
        }
        for role, samples in (("sidecar", rs), ("haproxy", rh)):
            summary = summarize(samples)
            summary["before"] = summarize([x for x in samples if x.t < down])
            summary["during"] = summarize([x for x in samples if down <= x.t < back])
            summary["after"] = summarize([x for x in samples if x.t >= back])
            rec = _recovered_at(samples, back)
            summary["recover_s"] = None if rec is None else round(max(0.0, rec - back), 3)
            opened = [x for x in samples if x.reason == "circuit_open"]
            if role == "sidecar":
                first = min((x.t for x in opened if x.t >= down), default=None)
                summary["fail_fast_after_s"] = None if first is None else round(first - down, 3)
                summary["circuit_open"] = summarize(opened) if opened else None
                assert sidecar.admin_port is not None
                summary["sidecar_metrics"] = scrape(sidecar.admin_port)
            out[role] = summary
            log(
                f"  {role:<8} success {100 * (summary['success_rate'] or 0):6.2f} % "
                f"p99 {summary['p99_ms']} ms  during-outage p99 {summary['during']['p99_ms']} ms "
                f"recover {summary['recover_s']} s  {summary['codes']}"
            )
        for t in (sidecar, haproxy):
            self.b.procs.stop(t.proc)
        self.b.procs.stop(up[0])
        self.results["outage"] = out

    def _probe(self, sidecar: Target) -> dict[str, Any]:
        """wrk -c1 for 1 s at the sidecar while its breaker is open: fail-fast latency."""
        try:
            res = wrk.run(
                self.b.tools.wrk,
                f"http://127.0.0.1:{sidecar.port}/",
                connections=1,
                duration=1,
                script=self.b.status_lua,
                taskset=self.b.tools.taskset,
                cpu=self.b.load_cpu,
            )
        except RuntimeError as exc:
            return {"error": str(exc)[:300]}
        return res.as_dict()


def scrape(admin_port: int) -> dict[str, Any]:
    """The sidecar's own account of a scenario, from its /metrics (CONTRACT §5)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=3) as r:
            text = r.read().decode()
    except OSError as exc:
        return {"error": str(exc)}
    out: dict[str, Any] = {
        "retries": 0,
        "retry_budget_exhausted": 0,
        "breaker_opened": 0,
        "breaker_rejected": 0,
        "timeouts": 0,
        "attempts": {},
    }
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            name, labels, value = sample.name, sample.labels, int(sample.value)
            if name == "sidecar_retries_total":
                out["retries"] += value
            elif name == "sidecar_retry_budget_exhausted_total":
                out["retry_budget_exhausted"] += value
            elif name == "sidecar_circuit_breaker_transitions_total":
                if labels.get("to_state") == "open":
                    out["breaker_opened"] += value
            elif name == "sidecar_circuit_breaker_rejected_total":
                out["breaker_rejected"] += value
            elif name == "sidecar_timeouts_total":
                out["timeouts"] += value
            elif name == "sidecar_upstream_attempts_total":
                key = labels.get("result", "?")
                out["attempts"][key] = out["attempts"].get(key, 0) + value
    return out


def _seconds(text: str) -> float:
    text = text.strip()
    if text.endswith("ms"):
        return float(text[:-2]) / 1000
    if text.endswith("s"):
        return float(text[:-1])
    if text.endswith("m"):
        return float(text[:-1]) * 60
    return float(text)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run the driver on uvloop when it is installed (a cheaper client), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
