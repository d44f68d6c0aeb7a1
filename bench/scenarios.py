"""Resilience scenarios: what the app sees through the sidecar and through HAProxy.

Both proxies get the same retry policy (up to 3 retries on connect failure / 503, and on a
per-try timeout in the slow-endpoint scenario) and the same offered load: an open-loop
driver (aiohttp client, fixed rate, bounded count and duration, 10 s client timeout) that
records every request's status and latency. Scenarios:

- errors503:     one upstream, 20 % of its replies are 503 (both proxies at once, for
                 twice the scenario duration: the same coin flips, and more of them)
- dead_endpoint: three endpoints, one a closed port
- outage:        one upstream, killed for N s then started again (both proxies at once,
                 so they see the same outage, plus a sidecar with a 2 s breaker
                 reset_timeout as a variant); a wrk -c1 probe measures the sidecar's
                 fail-fast latency while its breaker is open
- slow_endpoint: three endpoints, one answers after 200 ms; per-try timeout 100 ms
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench import wrk
from bench.configs import (
    DEFAULT_RETRY_ON,
    MAX_RETRIES,
    OUTAGE_VARIANT_RESET,
    OUTAGE_VARIANT_ROLE,
    SidecarSpec,
)
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


@dataclass
class OutageRun:
    targets: dict[str, Target]  # role -> proxy, in driving order
    driven: list[list[Sample]]  # per target, same order
    timeline: dict[str, Any]  # down_at, back_at, ... (and the fail-fast probe, if run)
    scraped: dict[str, dict[str, Any]]  # role -> the sidecar's /metrics account


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
        self,
        name: str,
        endpoints: list[str],
        *,
        per_try: bool = False,
        outlier: bool = False,
        reset_timeout: str | None = None,
    ) -> Target:
        """The bench's sidecar config; `reset_timeout` None: the run's breaker_reset."""
        retry_on = DEFAULT_RETRY_ON + (("per-try-timeout",) if per_try else ())
        spec = SidecarSpec(
            tuple(endpoints),
            per_try_timeout=PER_TRY_TIMEOUT if per_try else None,
            retry_on=retry_on,
            reset_timeout=reset_timeout or self.s.breaker_reset,
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
        out["together"] = False
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
            out[role] = self._record(target, samples, round(time.monotonic() - t0, 2))
            self.b.procs.stop(target.proc)
        self.results[name] = out

    def _record(
        self, target: Target, samples: list[Sample], wall: float, expected: str = ""
    ) -> dict[str, Any]:
        """A target's summary, with the sidecar's own metrics when it has them; logged."""
        summary = summarize(samples)
        summary["wall_s"] = wall
        if target.admin_port is not None:
            summary["sidecar_metrics"] = scrape(target.admin_port)
        log(
            f"  {target.name:<28} success {100 * (summary['success_rate'] or 0):6.2f} % "
            f"failed {summary['requests'] - summary['ok']}{expected} "
            f"p99 {summary['p99_ms']} ms  {summary['codes']} "
            f"{summary.get('sidecar_metrics', '')}"
        )
        return summary

    async def _drive_one(self, target: Target) -> list[Sample]:
        url = f"http://127.0.0.1:{target.port}/"
        return await drive(url, self.s.scenario_rate, self.s.scenario_duration, time.perf_counter())

    async def _drive_together(self, targets: list[Target], duration: float) -> list[list[Sample]]:
        """The same open-loop schedule to every target at once (one t0)."""
        t0 = time.perf_counter()
        return list(
            await asyncio.gather(
                *(
                    drive(f"http://127.0.0.1:{t.port}/", self.s.scenario_rate, duration, t0)
                    for t in targets
                )
            )
        )

    # ------------------------------------------------------------------ scenarios

    def errors503(self) -> None:
        """Both proxies at once against one flaky upstream, for twice the scenario duration.

        A request fails only when all 1 + MAX_RETRIES attempts draw a 503 (0.2^4 = 0.16 %),
        so a run sees a handful of failures per proxy and the comparison is mostly chance:
        driving both together gives them the same conditions, the longer run more samples,
        and the report adds a Fisher exact test when the sidecar comes out behind.
        """
        s = self.s
        (port,) = free_ports(1)
        up = self._upstream("upstream-flaky", [f"{port}:flaky:{FLAKY_SHARE}"])
        endpoints = [f"127.0.0.1:{port}"]
        targets = {
            "sidecar": self._sidecar("sidecar-errors503", endpoints),
            "haproxy": self._haproxy("haproxy-errors503", endpoints),
        }
        duration = 2 * s.scenario_duration
        attempts = MAX_RETRIES + 1
        per_proxy = max(1, int(s.scenario_rate * duration))  # drive()'s request count
        expected = per_proxy * FLAKY_SHARE**attempts
        out: dict[str, Any] = {
            "notes": (
                f"one upstream, {FLAKY_SHARE:.0%} of replies are 503; failures expected if "
                f"attempts were independent: {per_proxy} x {FLAKY_SHARE:g}^{attempts} = "
                f"{expected:.2f} per proxy"
            ),
            "rate": s.scenario_rate,
            "duration_s": duration,
            "together": True,
            "attempts_per_request": attempts,
            "expected_failed_per_proxy": round(expected, 3),
        }
        t0 = time.monotonic()
        results = _run(self._drive_together(list(targets.values()), duration))
        wall = round(time.monotonic() - t0, 2)
        for (role, target), samples in zip(targets.items(), results, strict=True):
            out[role] = self._record(target, samples, wall, f" (expected {expected:.2f})")
            self.b.procs.stop(target.proc)
        self.b.procs.stop(up)
        self.results["errors503"] = out

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
        reset_s = _seconds(s.breaker_reset)
        after = max(3.0, reset_s - s.outage_down + 3.0)
        total = s.outage_up + s.outage_down + after
        log(
            f"  outage: up {s.outage_up}s, down {s.outage_down}s, then {after:.0f}s "
            f"(breaker reset_timeout {s.breaker_reset}); {s.outage_rate:.0f} req/s to "
            "sidecar and haproxy at once"
        )
        main = self._outage_run(
            lambda port: {
                "sidecar": self._sidecar("sidecar-outage", [f"127.0.0.1:{port}"]),
                "haproxy": self._haproxy("haproxy-outage", [f"127.0.0.1:{port}"]),
            },
            total,
            probe=True,
        )
        runs = [main]
        timeline = main.timeline
        # The default breaker recovers reset_timeout after it opened, long after the upstream
        # is back; a variant with a short reset_timeout shows what tuning it buys. It gets
        # an outage of its own, after the others: sharing the proxy core with them would
        # put its work in the fail-fast probe's latency. With a reset_timeout already that
        # short (smoke) it would be a duplicate.
        variant = reset_s > _seconds(OUTAGE_VARIANT_RESET)
        if variant:
            log(f"  outage again, for {OUTAGE_VARIANT_ROLE} alone")
            runs.append(
                self._outage_run(
                    lambda port: {
                        OUTAGE_VARIANT_ROLE: self._sidecar(
                            "sidecar-outage-reset",
                            [f"127.0.0.1:{port}"],
                            reset_timeout=OUTAGE_VARIANT_RESET,
                        )
                    },
                    total,
                    probe=False,
                )
            )
        down, back = timeline["down_at"], timeline["back_at"]
        note = (
            f"; variant {OUTAGE_VARIANT_ROLE}: reset_timeout {OUTAGE_VARIANT_RESET}, "
            "in an identical outage of its own"
            if variant
            else ""
        )
        out: dict[str, Any] = {
            "notes": (
                f"one upstream, killed at {down:.1f}s and back at {back:.1f}s; "
                f"sidecar breaker reset_timeout {s.breaker_reset}{note}"
            ),
            "rate": s.outage_rate,
            "duration_s": round(total, 2),
            "together": True,
            "timeline": timeline,
            "breaker_reset_timeout_s": reset_s,
        }
        if variant:
            out["variant_reset_timeout_s"] = _seconds(OUTAGE_VARIANT_RESET)
            out["variant_timeline"] = runs[1].timeline
        for run in runs:
            for (role, target), samples in zip(run.targets.items(), run.driven, strict=True):
                out[role] = self._outage_summary(
                    role, target, samples, run.timeline, run.scraped.get(role)
                )
        self.results["outage"] = out

    def _outage_run(
        self,
        make_targets: Callable[[int], dict[str, Target]],
        total: float,
        *,
        probe: bool,
    ) -> OutageRun:
        """One upstream, the targets in front of it driven at once; the upstream is killed
        after outage_up and started again outage_down later. Everything is stopped after."""
        s = self.s
        (port,) = free_ports(1)
        listen = [str(port)]
        up: list[Proc] = [self._upstream("upstream-outage", listen)]
        targets = make_targets(port)
        probe_at = s.outage_up + max(0.3, min(1.5, s.outage_down - 1.2))
        timeline: dict[str, Any] = {}

        async def scenario() -> list[list[Sample]]:
            t0 = time.perf_counter()

            def now() -> float:
                return time.perf_counter() - t0

            async def control() -> None:
                await asyncio.sleep(max(0.0, s.outage_up - now()))
                timeline["down_at"] = round(now(), 3)
                await asyncio.to_thread(self.b.procs.kill, up[0])
                await asyncio.to_thread(wait_port_closed, port)
                if probe:
                    await asyncio.sleep(max(0.0, probe_at - now()))
                    timeline["probe_at"] = round(now(), 3)
                    timeline["probe"] = await asyncio.to_thread(self._probe, targets["sidecar"])
                await asyncio.sleep(max(0.0, s.outage_up + s.outage_down - now()))
                timeline["restart_at"] = round(now(), 3)
                up[0] = await asyncio.to_thread(self._upstream, "upstream-outage-2", listen)
                timeline["back_at"] = round(now(), 3)

            drives = asyncio.gather(
                *(
                    drive(f"http://127.0.0.1:{t.port}/", s.outage_rate, total, t0)
                    for t in targets.values()
                )
            )
            driven, _ = await asyncio.gather(drives, control())
            return driven

        driven = _run(scenario())
        # Each sidecar's own account, read before its process goes.
        scraped = {
            role: scrape(t.admin_port) for role, t in targets.items() if t.admin_port is not None
        }
        for target in targets.values():
            self.b.procs.stop(target.proc)
        self.b.procs.stop(up[0])
        return OutageRun(targets, driven, timeline, scraped)

    def _outage_summary(
        self,
        role: str,
        target: Target,
        samples: list[Sample],
        timeline: dict[str, Any],
        scraped: dict[str, Any] | None,
    ) -> dict[str, Any]:
        down, back = timeline["down_at"], timeline["back_at"]
        summary = summarize(samples)
        summary["before"] = summarize([x for x in samples if x.t < down])
        summary["during"] = summarize([x for x in samples if down <= x.t < back])
        summary["after"] = summarize([x for x in samples if x.t >= back])
        rec = _recovered_at(samples, back)
        summary["recover_s"] = None if rec is None else round(max(0.0, rec - back), 3)
        opened = [x for x in samples if x.reason == "circuit_open"]
        if target.admin_port is not None:  # a sidecar: it has a breaker and /metrics
            first = min((x.t for x in opened if x.t >= down), default=None)
            summary["fail_fast_after_s"] = None if first is None else round(first - down, 3)
            summary["circuit_open"] = summarize(opened) if opened else None
            summary["sidecar_metrics"] = scraped
        log(
            f"  {role:<15} success {100 * (summary['success_rate'] or 0):6.2f} % "
            f"p99 {summary['p99_ms']} ms  during-outage p99 {summary['during']['p99_ms']} ms "
            f"recover {summary['recover_s']} s  {summary['codes']}"
        )
        return summary

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
