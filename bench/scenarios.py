"""Resilience scenarios: what the app sees through the sidecar and through HAProxy.

Common setup (the same for every scenario unless its line says otherwise): both proxies
make at most 1 + 3 attempts (`max_retries: 3`, HAProxy `retries 3`) on connect failure,
reset and 503; the sidecar's circuit breaker, retry budget and outlier detection are left
unwritten (its defaults), and the scenario timing that depends on them (the outage's
length, the breaker's threshold, the budget's floor) is read from the running sidecar's
/admin/config. Each scenario runs `repeat` times (fresh processes each time) and every run
is reported; p99 targets pool the runs' samples.

- errors503:     20 % of attempts get a 503, decided per (request number, attempt number)
                 by a seeded hash, so both proxies meet the same failures; default retries
                 (max_retries 2) on both; both proxies driven at once
- dead_endpoint: three endpoints, the second a closed port
- slow_endpoint: three endpoints, the second answers after 200 ms; per-try timeout 100 ms
- outage:        one upstream killed, then back; both proxies driven at once
- keepalive:     an upstream that says `Keep-Alive: timeout=1` and closes idle connections
                 after exactly 1 s, called about once a second, GET and POST alternating
- lowtraffic:    1 request/s to a dead upstream: at which failure the breaker opens
- recovery:      the breaker tripped on a dead upstream, then the upstream comes back while
                 the app is idle: how soon /admin/state says half_open
- amplification: every attempt answered 503: attempts reaching the upstream per request
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from bench import admin, driver, wrk
from bench.configs import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_RETRY_ON,
    MAX_RETRIES,
    OUTLIER,
    HaproxySpec,
    SidecarSpec,
)
from bench.driver import Sample, summarize
from bench.phases import Bench, Target, seconds
from bench.runner import (
    Proc,
    expect_200,
    free_ports,
    http_status,
    log,
    wait_accepting,
    wait_port_closed,
    wait_ready,
)
from bench.upstream import fails

SLOW_DELAY = 0.2
PER_TRY_TIMEOUT = "100ms"
FLAKY_SHARE = 0.2
KEEPALIVE_TIMEOUT = 1.0  # the upstream's Keep-Alive: timeout=1, and its idle close
KEEPALIVE_JITTER = (0.9, 1.1)
OUTLIER_ROLE = "sidecar+outlier"
# Targets (the contract's numbers); report.py judges them.
OPEN_WITHIN_S = 1.0
RECOVER_WITHIN_S = 1.0
AFTER_RECOVERY_FROM_S = 1.0  # "after recovery" starts this long after the upstream is back
DURING_FROM_S = 1.0  # outage answers are timed from this long after the first failure
AMPLIFICATION_RATIO = 1.25
# What every run of a scenario has in common, copied to its combined record.
SHARED_KEYS = (
    "notes",
    "rate",
    "duration_s",
    "together",
    "attempts_per_request",
    "failure_threshold",
    "breaker_reset_timeout_s",
    "probe_interval_s",
    "budget_min_per_second",
    "after_s",
)


def _ep(port: int) -> str:
    return f"127.0.0.1:{port}"


def _pool(runs: list[list[Sample]]) -> list[Sample]:
    return [s for run in runs for s in run]


class Resilience:
    def __init__(self, bench: Bench) -> None:
        self.b = bench
        self.s = bench.settings
        self.results: dict[str, Any] = {}
        # scenario -> role -> one list of samples per run (for the pooled summaries)
        self.samples: dict[str, dict[str, list[list[Sample]]]] = {}

    def run(self) -> dict[str, Any]:
        for name in self.s.scenarios:
            runs: list[dict[str, Any]] = []
            for i in range(self.s.repeat):
                log(f"scenario {name} (run {i + 1} of {self.s.repeat})")
                rec = getattr(self, name)(i)
                rec["run"] = i + 1
                runs.append(rec)
            self.results[name] = self._combine(name, runs)
        return self.results

    # ------------------------------------------------------------------ helpers

    def _upstream(self, name: str, listens: list[str]) -> Proc:
        """The raw upstream on `listens` (bench/upstream.py specs). Counters are read with
        `admin.upstream_stats` on a plain port of its own (the scenarios add one), so the
        harness's own connections stay off the proxies' ports."""
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
        max_retries: int = MAX_RETRIES,
        extra: str = "",
    ) -> Target:
        retry_on = DEFAULT_RETRY_ON + (("per-try-timeout",) if per_try else ())
        spec = SidecarSpec(
            tuple(endpoints),
            per_try_timeout=PER_TRY_TIMEOUT if per_try else None,
            retry_on=retry_on,
            max_retries=max_retries,
            extra=extra,
        )
        return self.b.start_sidecar(name, spec)

    def _haproxy(
        self,
        name: str,
        endpoints: list[str],
        *,
        per_try: bool = False,
        max_retries: int = MAX_RETRIES,
    ) -> Target:
        retry_on = DEFAULT_RETRY_ON + (("per-try-timeout",) if per_try else ())
        spec = HaproxySpec(
            tuple(endpoints),
            server_timeout=PER_TRY_TIMEOUT if per_try else "2s",
            retry_on=retry_on,
            max_retries=max_retries,
        )
        return self.b.start_haproxy(name, spec)

    def _keep(self, name: str, role: str, samples: list[Sample]) -> None:
        self.samples.setdefault(name, {}).setdefault(role, []).append(samples)

    def _record(
        self, name: str, role: str, target: Target, samples: list[Sample]
    ) -> dict[str, Any]:
        """A target's summary, with the sidecar's own metrics when it has them; logged."""
        self._keep(name, role, samples)
        summary = summarize(samples)
        if target.admin_port is not None:
            summary["sidecar_metrics"] = admin.scrape(target.admin_port)
        sm = summary.get("sidecar_metrics", {})
        log(
            f"  {role:<16} success {100 * (summary['success_rate'] or 0):6.2f} % "
            f"failed {summary['failed']} p99 {summary['p99_ms']} ms  {summary['codes']}"
            + (
                f"  retries {sm.get('retries')} budget-refused "
                f"{sm.get('retry_budget_exhausted')} breaker-opened {sm.get('breaker_opened')}"
                if sm
                else ""
            )
        )
        return summary

    async def _together(
        self, targets: list[Target], rate: float, duration: float
    ) -> list[list[Sample]]:
        """The same open-loop schedule to every target at once (one t0)."""
        t0 = time.perf_counter()
        return list(
            await asyncio.gather(
                *(driver.drive(f"http://127.0.0.1:{t.port}/", rate, duration, t0) for t in targets)
            )
        )

    def _stop(self, *procs: Proc) -> None:
        for p in procs:
            self.b.procs.stop(p)

    def _combine(self, name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
        """The scenario's record: every run, and per role the runs' samples pooled."""
        first = runs[0]
        out: dict[str, Any] = {k: first[k] for k in SHARED_KEYS if k in first}
        out["repeat"] = len(runs)
        out["runs"] = runs
        for role, per_run in self.samples.get(name, {}).items():
            pooled = summarize(_pool(per_run))
            pooled["runs"] = len(per_run)
            out[role] = pooled
        combine = getattr(self, f"_combine_{name}", None)
        if combine is not None:
            combine(out, runs)
        return out

    # ------------------------------------------------------------------ errors503

    def errors503(self, i: int) -> dict[str, Any]:
        """Both proxies at once, each on its own port of one flaky upstream (same seed:
        request N's attempt k gets the same answer on both ports), default retries."""
        s = self.s
        duration, rate, seed = s.errors503_duration, s.scenario_rate, i + 1
        *ports, control = free_ports(3)
        flaky = [f"{p}:flaky:{FLAKY_SHARE}:{seed}" for p in ports]
        up = self._upstream("upstream-flaky", [*flaky, str(control)])
        roles = {
            "sidecar": self._sidecar(
                "sidecar-errors503", [_ep(ports[0])], max_retries=DEFAULT_MAX_RETRIES
            ),
            "haproxy": self._haproxy(
                "haproxy-errors503", [_ep(ports[1])], max_retries=DEFAULT_MAX_RETRIES
            ),
        }
        attempts = DEFAULT_MAX_RETRIES + 1
        count = max(1, int(rate * duration))  # drive()'s request count
        # The failures a proxy that makes every retry its policy allows must see: request N
        # fails when its attempts 1..attempts all draw a 503.
        exact = sum(
            1
            for n in range(count)
            if all(fails(seed, n, k, FLAKY_SHARE) for k in range(1, attempts + 1))
        )
        results = driver.run(self._together(list(roles.values()), rate, duration))
        stats = admin.upstream_stats(control)
        rec: dict[str, Any] = {
            "notes": (
                f"{FLAKY_SHARE:.0%} of attempts get a 503 (seeded per request and attempt "
                f"number, the same for both proxies); max_retries {DEFAULT_MAX_RETRIES} on "
                "both"
            ),
            "rate": rate,
            "duration_s": duration,
            "together": True,
            "attempts_per_request": attempts,
            "policy_failures": exact,
            "roles": {},
        }
        for (role, target), samples, port in zip(roles.items(), results, ports, strict=True):
            summary = self._record("errors503", role, target, samples)
            summary["upstream_attempts"] = stats.get(str(port), {}).get("requests")
            rec["roles"][role] = summary
        sm = rec["roles"]["sidecar"].get("sidecar_metrics", {})
        rec["breaker_opened"] = sm.get("breaker_opened")
        log(f"  policy-exact failures: {exact} of {count}")
        self._stop(*(t.proc for t in roles.values()), up)
        return rec

    def _combine_errors503(self, out: dict[str, Any], runs: list[dict[str, Any]]) -> None:
        out["breaker_opened_runs"] = sum(1 for r in runs if (r.get("breaker_opened") or 0) > 0)
        out["breaker_opened_total"] = sum(r.get("breaker_opened") or 0 for r in runs)
        out["policy_failures_total"] = sum(r["policy_failures"] for r in runs)
        for role in ("sidecar", "haproxy"):
            out[f"{role}_failed_total"] = sum(r["roles"][role]["failed"] for r in runs)

    # ------------------------------------------------------------------ steady: dead, slow

    def _steady(
        self, name: str, i: int, endpoints: list[str], per_try: bool, notes: str
    ) -> dict[str, Any]:
        """Sidecar and HAProxy one at a time under the same open-loop load (the order
        alternates between runs, so neither always runs first); in the first run of a full
        or quick bench, the sidecar with outlier detection written out as a variant."""
        rec: dict[str, Any] = {
            "notes": notes,
            "rate": self.s.scenario_rate,
            "duration_s": self.s.scenario_duration,
            "together": False,
            "roles": {},
        }
        roles = ["sidecar", "haproxy"] if i % 2 == 0 else ["haproxy", "sidecar"]
        if i == 0 and self.s.mode != "smoke":
            roles.append(OUTLIER_ROLE)
        for role in roles:
            if role == "haproxy":
                target = self._haproxy(f"haproxy-{name}", endpoints, per_try=per_try)
            else:
                target = self._sidecar(
                    f"{role.replace('+', '-')}-{name}",
                    endpoints,
                    per_try=per_try,
                    extra=OUTLIER if role == OUTLIER_ROLE else "",
                )
            t0 = time.perf_counter()
            url = f"http://127.0.0.1:{target.port}/"
            samples = driver.run(
                driver.drive(url, self.s.scenario_rate, self.s.scenario_duration, t0)
            )
            rec["roles"][role] = self._record(name, role, target, samples)
            self._stop(target.proc)
        return rec

    def dead_endpoint(self, i: int) -> dict[str, Any]:
        a, dead, c = free_ports(3)
        up = self._upstream("upstream-2of3", [str(a), str(c)])
        rec = self._steady(
            "dead_endpoint",
            i,
            [_ep(a), _ep(dead), _ep(c)],
            False,
            "three endpoints, the second a closed port",
        )
        self._stop(up)
        return rec

    def slow_endpoint(self, i: int) -> dict[str, Any]:
        a, slow, c = free_ports(3)
        up = self._upstream("upstream-slow", [str(a), f"{slow}:slow:{SLOW_DELAY}", str(c)])
        rec = self._steady(
            "slow_endpoint",
            i,
            [_ep(a), _ep(slow), _ep(c)],
            True,
            f"three endpoints, the second answers after {SLOW_DELAY * 1000:.0f} ms; "
            f"per-try timeout {PER_TRY_TIMEOUT} (HAProxy: timeout server {PER_TRY_TIMEOUT}, "
            "retry-on response-timeout)",
        )
        self._stop(up)
        return rec

    # ------------------------------------------------------------------ outage

    def outage(self, i: int) -> dict[str, Any]:
        """One upstream, killed (SIGKILL: its connections reset, then new ones are refused)
        after outage_up and started again outage_down later; both proxies at once."""
        s = self.s
        (port,) = free_ports(1)
        up: list[Proc] = [self._upstream("upstream-outage", [str(port)])]
        roles = {
            "sidecar": self._sidecar("sidecar-outage", [_ep(port)]),
            "haproxy": self._haproxy("haproxy-outage", [_ep(port)]),
        }
        sidecar = roles["sidecar"]
        assert sidecar.admin_port is not None
        cb = admin.breaker_config(sidecar.admin_port)
        reset = seconds(cb.get("reset_timeout", 5.0))
        # Long enough for the default breaker's open period to end (reset_timeout after it
        # opened, about when the upstream went down), and for the 10 s "after recovery".
        after = min(s.outage_after_max, max(s.outage_after_min, reset - s.outage_down + 2.0))
        total = s.outage_up + s.outage_down + after
        log(
            f"  up {s.outage_up}s, down {s.outage_down}s, then {after:.1f}s (breaker "
            f"reset_timeout {reset:g}s, read from the sidecar); {s.outage_rate:.0f} req/s to "
            "both proxies at once"
        )
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
                await asyncio.sleep(max(0.0, s.outage_up + s.outage_down - now()))
                timeline["restart_at"] = round(now(), 3)
                up[0] = await asyncio.to_thread(
                    self.b.start_python_upstream, [str(port)], "upstream-outage-2"
                )
                accepted = await asyncio.to_thread(wait_accepting, port, 15.0, up[0])
                timeline["back_at"] = round((accepted or time.perf_counter()) - t0, 3)

            drives = asyncio.gather(
                *(
                    driver.drive(f"http://127.0.0.1:{t.port}/", s.outage_rate, total, t0)
                    for t in roles.values()
                )
            )
            driven, _ = await asyncio.gather(drives, control())
            return list(driven)

        driven = driver.run(scenario())
        rec: dict[str, Any] = {
            "notes": "one upstream, killed (SIGKILL) and started again",
            "rate": s.outage_rate,
            "duration_s": round(total, 2),
            "together": True,
            "breaker_reset_timeout_s": reset,
            "after_s": round(after, 2),
            "timeline": timeline,
            "roles": {},
        }
        for (role, target), samples in zip(roles.items(), driven, strict=True):
            rec["roles"][role] = self._outage_summary(role, target, samples, timeline, total)
        self._stop(*(t.proc for t in roles.values()), up[0])
        return rec

    def _outage_summary(
        self,
        role: str,
        target: Target,
        samples: list[Sample],
        timeline: dict[str, Any],
        total: float,
    ) -> dict[str, Any]:
        self._keep("outage", role, samples)
        down, back = timeline["down_at"], timeline["back_at"]
        summary = summarize(samples)
        summary["before"] = summarize([x for x in samples if x.t < down])
        summary["during"] = summarize([x for x in samples if down <= x.t < back])
        summary["after"] = summarize([x for x in samples if x.t >= back])
        first_fail = min((x.t for x in samples if x.t >= down and not x.ok), default=None)
        summary["first_failure_s"] = None if first_fail is None else round(first_fail - down, 3)
        # Answers from 1 s after the first failure until the upstream is back: with the
        # breaker open, these are the sidecar's fail-fast answers.
        # A proxy that never failed (its retries outlasted the outage) is timed from the
        # kill instead.
        since = (down if first_fail is None else first_fail) + DURING_FROM_S
        window = [x for x in samples if since <= x.t < back]
        self._keep("outage:answers", role, window)
        summary["answers_during"] = summarize(window)
        after_rec = [x for x in samples if x.t >= back + AFTER_RECOVERY_FROM_S]
        self._keep("outage:after_recovery", role, after_rec)
        summary["after_recovery"] = summarize(after_rec)
        summary["after_recovery_s"] = round(total - back - AFTER_RECOVERY_FROM_S, 2)
        rec = driver.recovered_at(samples, back)
        summary["recover_s"] = None if rec is None else round(max(0.0, rec - back), 3)
        if target.admin_port is not None:  # a sidecar: it has a breaker and /metrics
            opened = [x for x in samples if x.reason == "circuit_open"]
            first_open = min((x.t for x in opened if x.t >= down), default=None)
            summary["open_after_first_failure_s"] = (
                None
                if first_open is None or first_fail is None
                else round(first_open - first_fail, 3)
            )
            summary["circuit_open"] = summarize(opened) if opened else None
            summary["sidecar_metrics"] = admin.scrape(target.admin_port)
        ans = summary.get("answers_during", {})
        log(
            f"  {role:<16} success {100 * (summary['success_rate'] or 0):6.2f} %  "
            f"open after {summary.get('open_after_first_failure_s', 'n/a')} s  answers during "
            f"outage p99 {ans.get('p99_ms')} ms  recover {summary['recover_s']} s  after "
            f"recovery {100 * (summary['after_recovery']['success_rate'] or 0):.2f} %  "
            f"{summary['codes']}"
        )
        return summary

    def _combine_outage(self, out: dict[str, Any], runs: list[dict[str, Any]]) -> None:
        out["timeline"] = runs[0]["timeline"]
        for role in ("sidecar", "haproxy"):
            pooled = out.get(role)
            if pooled is None:
                continue
            answers = self.samples.get("outage:answers", {}).get(role, [])
            pooled["answers_during"] = summarize(_pool(answers))
            after = self.samples.get("outage:after_recovery", {}).get(role, [])
            pooled["after_recovery"] = summarize(_pool(after))
            per_run = [r["roles"][role] for r in runs]
            pooled["recover_s_runs"] = [e.get("recover_s") for e in per_run]
            if role == "sidecar":
                pooled["open_after_first_failure_s_runs"] = [
                    e.get("open_after_first_failure_s") for e in per_run
                ]

    # ------------------------------------------------------------------ keep-alive race

    def keepalive(self, i: int) -> dict[str, Any]:
        """An upstream announcing `Keep-Alive: timeout=1` that closes every connection
        after exactly 1 s idle; the app calls about once a second (the same jittered gaps
        for both proxies, each gap starting when the previous answer came), GET and POST
        alternating, both proxies at once, each on its own port of the upstream."""
        s = self.s
        *ports, control = free_ports(3)
        up = self._upstream(
            "upstream-keepalive",
            [*(f"{p}:keepalive:{KEEPALIVE_TIMEOUT:g}" for p in ports), str(control)],
        )
        roles = {
            "sidecar": self._sidecar("sidecar-keepalive", [_ep(ports[0])]),
            "haproxy": self._haproxy("haproxy-keepalive", [_ep(ports[1])]),
        }
        rng = random.Random(1000 + i)
        gaps = [rng.uniform(*KEEPALIVE_JITTER) for _ in range(max(1, int(s.keepalive_duration)))]

        async def both() -> list[list[Sample]]:
            t0 = time.perf_counter()
            return list(
                await asyncio.gather(
                    *(
                        driver.paced(f"http://127.0.0.1:{t.port}/", gaps, t0, ("GET", "POST"))
                        for t in roles.values()
                    )
                )
            )

        before = admin.upstream_stats(control)  # the readiness check's connections
        driven = driver.run(both())
        stats = admin.upstream_stats(control)
        rec: dict[str, Any] = {
            "notes": (
                f"upstream says Keep-Alive: timeout={KEEPALIVE_TIMEOUT:g} and closes idle "
                f"connections after exactly {KEEPALIVE_TIMEOUT:g} s; calls "
                f"{KEEPALIVE_JITTER[0]}-{KEEPALIVE_JITTER[1]} s apart, GET and POST alternating"
            ),
            "rate": 1.0,
            "duration_s": round(sum(gaps), 1),
            "together": True,
            "roles": {},
        }
        for (role, target), samples, port in zip(roles.items(), driven, ports, strict=True):
            summary = self._record("keepalive", role, target, samples)
            summary["errors_by_method"] = {
                m: sum(1 for x in samples if x.method == m and not x.ok) for m in ("GET", "POST")
            }
            now, then = stats.get(str(port), {}), before.get(str(port), {})
            summary["upstream"] = {
                k: int(now.get(k, 0)) - int(then.get(k, 0))
                for k in ("requests", "connections", "idle_closes")
            }
            rec["roles"][role] = summary
        self._stop(*(t.proc for t in roles.values()), up)
        return rec

    # ------------------------------------------------------------------ low traffic

    def lowtraffic(self, i: int) -> dict[str, Any]:
        """1 request/s to an upstream that refuses connections: after each answer the
        harness reads the breaker's state from /admin/state; the breaker should open on the
        failure_threshold-th consecutive failed request, not before or after."""
        s = self.s
        (dead,) = free_ports(1)
        sidecar = self._sidecar("sidecar-lowtraffic", [_ep(dead)])
        assert sidecar.admin_port is not None
        port = sidecar.admin_port
        threshold = int(admin.breaker_config(port).get("failure_threshold", 5))
        count = threshold + 3
        states: list[str | None] = []

        async def after_each(sample: Sample) -> None:
            states.append(await asyncio.to_thread(admin.breaker_state, port))

        samples = driver.run(
            driver.paced(
                f"http://127.0.0.1:{sidecar.port}/",
                [s.lowtraffic_gap] * (count - 1),
                time.perf_counter(),
                after_each=after_each,
            )
        )
        self._keep("lowtraffic", "sidecar", samples)
        opened_at: int | None = None
        consecutive = 0
        for sample, state in zip(samples, states, strict=True):
            consecutive = 0 if sample.ok else consecutive + 1
            if state == "open" and opened_at is None:
                opened_at = consecutive
        first_rejected = next(
            (j + 1 for j, x in enumerate(samples) if x.reason == "circuit_open"), None
        )
        metrics = admin.scrape(port)
        rec: dict[str, Any] = {
            "notes": (
                f"one endpoint refusing connections, one request every {s.lowtraffic_gap:g} s, "
                f"{count} requests; breaker failure_threshold {threshold} (read from the sidecar)"
            ),
            "rate": round(1 / s.lowtraffic_gap, 2),
            "duration_s": round(s.lowtraffic_gap * (count - 1), 1),
            "together": None,  # the sidecar alone
            "failure_threshold": threshold,
            "opened_at_failure": opened_at,
            "first_circuit_open_request": first_rejected,
            "states": states,
            "answers": [f"{x.status}:{x.reason}" if x.reason else str(x.status) for x in samples],
            "roles": {"sidecar": {**summarize(samples), "sidecar_metrics": metrics}},
        }
        log(
            f"  breaker opened at consecutive failure {opened_at} (threshold {threshold}); "
            f"first circuit_open answer: request {first_rejected}; states {states}; "
            f"trips {metrics.get('trips')}"
        )
        self._stop(sidecar.proc)
        return rec

    def _combine_lowtraffic(self, out: dict[str, Any], runs: list[dict[str, Any]]) -> None:
        out["opened_at_failure_runs"] = [r["opened_at_failure"] for r in runs]

    # ------------------------------------------------------------------ recovery

    def recovery(self, i: int) -> dict[str, Any]:
        """Trip the breaker on a refused port, stop the traffic, start the upstream while
        the app is idle, and poll /admin/state (not the proxy) until half_open or closed.
        In the first run, a wrk -c1 probe measures the fail-fast latency while it is open."""
        s = self.s
        (port,) = free_ports(1)
        sidecar = self._sidecar("sidecar-recovery", [_ep(port)])
        assert sidecar.admin_port is not None
        aport = sidecar.admin_port
        cb = admin.breaker_config(aport)
        reset = seconds(cb.get("reset_timeout", 5.0))
        probe_cfg = cb.get("probe")
        interval = seconds(probe_cfg["interval"]) if isinstance(probe_cfg, dict) else None
        rec: dict[str, Any] = {
            "notes": (
                "one endpoint, refusing connections until the breaker opens; then no traffic, "
                "and the upstream starts while the app is idle"
            ),
            "rate": 0.0,
            "together": None,  # the sidecar alone
            "breaker_reset_timeout_s": reset,
            "probe_interval_s": interval,
            "roles": {},
        }
        # 1. trip it: requests (one connection each) until the state reads open.
        tripped_by = 0
        t_open: float | None = None
        deadline = time.perf_counter() + 10.0
        while time.perf_counter() < deadline and tripped_by < 200:
            http_status(sidecar.port, "/", timeout=3.0)
            tripped_by += 1
            if admin.breaker_state(aport) == "open":
                t_open = time.perf_counter()
                break
            time.sleep(0.02)
        rec["requests_to_trip"] = tripped_by
        if t_open is None:
            rec["error"] = f"the breaker did not open after {tripped_by} failed requests"
            log(f"  ! {rec['error']}")
            self._stop(sidecar.proc)
            return rec
        # 2. the fail-fast probe, while open and before the open period can end.
        if i == 0 and reset >= 2.5:
            rec["failfast_probe"] = self._probe(sidecar)
        # 3. idle, then the upstream comes back.
        time.sleep(max(0.0, s.recovery_idle - (time.perf_counter() - t_open)))
        state_before = admin.breaker_state(aport)
        up = self.b.start_python_upstream([str(port)], "upstream-recovery")
        t_accept = wait_accepting(port, 15.0, up)
        if t_accept is None:
            rec["error"] = "the upstream did not start"
            self._stop(sidecar.proc, up)
            return rec
        # 4. poll the admin API until the breaker lets a trial through.
        wait_max = min(s.recovery_wait_max, max(0.5, reset - (t_accept - t_open) + 1.0))
        t_half: float | None = None
        state = state_before
        until = t_accept + wait_max
        while time.perf_counter() < until:
            state = admin.breaker_state(aport, timeout=0.5)
            if state in ("half_open", "closed"):
                t_half = time.perf_counter()
                break
            time.sleep(0.01)
        # 5. then one call goes through.
        call = http_status(sidecar.port, "/", timeout=3.0) if t_half is not None else None
        metrics = admin.scrape(aport)
        rec.update(
            {
                "state_before_upstream": state_before,
                "open_to_accept_s": round(t_accept - t_open, 3),
                "accept_to_half_open_s": None if t_half is None else round(t_half - t_accept, 3),
                "open_to_half_open_s": None if t_half is None else round(t_half - t_open, 3),
                "state_seen": state,
                "waited_s": round(wait_max, 2),
                # Half-open before the open period could have ended: a probe did it.
                "before_open_period_end": None if t_half is None else (t_half - t_open) < reset,
                "call_after": call,
                "roles": {"sidecar": {"sidecar_metrics": metrics}},
            }
        )
        log(
            f"  tripped by {tripped_by} requests; upstream back {rec['open_to_accept_s']} s "
            f"after open; half_open {rec['accept_to_half_open_s']} s after it accepted "
            f"(state {state}; reset_timeout {reset:g}s, probe interval {interval}); "
            f"then a call: {call}; probes {metrics.get('probes')}"
        )
        self._stop(sidecar.proc, up)
        return rec

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
        out = res.as_dict()
        log(
            f"  fail-fast probe (wrk -c1, 1 s): p50 {res.latency_ms['p50']} ms "
            f"p99 {res.latency_ms['p99']} ms {res.codes}"
        )
        return out

    def _combine_recovery(self, out: dict[str, Any], runs: list[dict[str, Any]]) -> None:
        out["accept_to_half_open_s_runs"] = [r.get("accept_to_half_open_s") for r in runs]
        out["call_after_runs"] = [r.get("call_after") for r in runs]
        probe = next((r["failfast_probe"] for r in runs if "failfast_probe" in r), None)
        if probe is not None:
            out["failfast_probe"] = probe

    # ------------------------------------------------------------------ amplification

    def amplification(self, i: int) -> dict[str, Any]:
        """Every attempt answered 503 (connections accepted), both proxies at once, each on
        its own port: attempts counted at the upstream per request the app made."""
        s = self.s
        rate, duration = s.scenario_rate, s.amplification_duration
        *ports, control = free_ports(3)
        up = self._upstream("upstream-all503", [*(f"{p}:flaky:1.0" for p in ports), str(control)])
        roles = {
            "sidecar": self._sidecar("sidecar-amplification", [_ep(ports[0])]),
            "haproxy": self._haproxy("haproxy-amplification", [_ep(ports[1])]),
        }
        aport = roles["sidecar"].admin_port
        assert aport is not None
        budget = admin.route_retries(aport).get("budget") or {}
        floor_rate = float(budget.get("min_per_second", 10.0))
        results = driver.run(self._together(list(roles.values()), rate, duration))
        stats = admin.upstream_stats(control)
        rec: dict[str, Any] = {
            "notes": "every attempt answered 503, connections accepted",
            "rate": rate,
            "duration_s": duration,
            "together": True,
            "budget_min_per_second": floor_rate,
            "roles": {},
        }
        for (role, target), samples, port in zip(roles.items(), results, ports, strict=True):
            summary = self._record("amplification", role, target, samples)
            attempts = int(stats.get(str(port), {}).get("requests", 0))
            n = summary["requests"]
            summary["upstream_attempts"] = attempts
            summary["attempts_per_request"] = round(attempts / n, 3) if n else None
            summary["bound"] = round(AMPLIFICATION_RATIO * n + floor_rate * duration, 1)
            summary["attempts_per_request_beyond_floor"] = (
                round((attempts - floor_rate * duration) / n, 3) if n else None
            )
            rec["roles"][role] = summary
            log(
                f"  {role:<16} {attempts} attempts at the upstream for {n} requests "
                f"({summary['attempts_per_request']} per request; sidecar bound "
                f"{summary['bound']})"
            )
        self._stop(*(t.proc for t in roles.values()), up)
        return rec

    def _combine_amplification(self, out: dict[str, Any], runs: list[dict[str, Any]]) -> None:
        for role in ("sidecar", "haproxy"):
            per = [r["roles"][role] for r in runs]
            req = sum(e["requests"] for e in per)
            att = sum(e["upstream_attempts"] for e in per)
            pooled = out[role]
            pooled["upstream_attempts"] = att
            pooled["attempts_per_request"] = round(att / req, 3) if req else None
            pooled["bound"] = round(sum(e["bound"] for e in per), 1)
            pooled["attempts_per_request_runs"] = [e["attempts_per_request"] for e in per]
