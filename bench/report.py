"""Medians, ratios to HAProxy, the targets, and the markdown table."""

from __future__ import annotations

import math
import statistics
from typing import Any

from bench.ab import BASE_CONFIG
from bench.configs import SCALING_ROUTES
from bench.floor import FLOOR_CONFIG

MIB = 1048576
ALPHA = 0.05  # below this one-sided p-value, the sidecar's extra failures are not chance
STAT_KEYS = (
    "rps",
    "mib_s",
    "p50",
    "p90",
    "p99",
    "cpu_us_per_req",
    "cpu_ms_per_mib",
    "cpu_pct",
    "wakeups_per_req",
)


def _stat(values: list[float]) -> dict[str, float] | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {
        "median": round(statistics.median(vals), 4),
        "min": round(min(vals), 4),
        "max": round(max(vals), 4),
    }


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """phase -> config -> {metric: {median, min, max}, vmhwm_mib, errors, rounds}."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["phase"], r["config"]), []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for (phase, config), rs in groups.items():
        entry: dict[str, Any] = {"rounds": len(rs)}
        for key in STAT_KEYS:
            if key in ("p50", "p90", "p99"):
                vals = [r["latency_ms"][key] for r in rs]
            else:
                vals = [r.get(key) for r in rs]
            entry[key] = _stat(vals)
        entry["vmhwm_mib"] = round(max(r["vmhwm_kib"] for r in rs) / 1024, 1)
        errors: dict[str, int] = {}
        for r in rs:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        entry["errors"] = errors
        cores: dict[str, list[float]] = {}
        for r in rs:
            for k, v in r["cores_busy_pct"].items():
                cores.setdefault(k, []).append(v)
        entry["cores_busy_pct"] = {k: round(statistics.median(v), 1) for k, v in cores.items()}
        entry["foreign_cpu_pct_max"] = max(r.get("foreign_cpu_pct", 0.0) for r in rs)
        entry["reruns"] = sum(1 for r in rs if r.get("rerun"))
        out.setdefault(phase, {})[config] = entry
    return out


def _med(summary: dict[str, Any], phase: str, config: str, key: str) -> float | None:
    entry = summary.get(phase, {}).get(config)
    if not entry or not entry.get(key):
        return None
    return float(entry[key]["median"])


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def paired_ratio(
    runs: list[dict[str, Any]], phase: str, config: str, base: str, key: str
) -> float | None:
    """Median over rounds of `config`'s value divided by `base`'s in the same round.

    Rounds are interleaved, so the two runs of one round share the machine's state: on a
    shared VM whose speed drifts by a third from minute to minute, the per-round ratio
    is steady where the ratio of two medians is not."""
    by_round: dict[int, dict[str, float]] = {}
    for r in runs:
        if r["phase"] == phase and r["config"] in (config, base) and r.get(key):
            by_round.setdefault(r["round"], {})[r["config"]] = float(r[key])
    ratios = [v[config] / v[base] for v in by_round.values() if config in v and base in v]
    return round(statistics.median(ratios), 3) if ratios else None


def _wakeups(run: dict[str, Any]) -> tuple[float | None, float | None]:
    """(main thread, all other threads) context switches per request in one run."""
    sw, n = run.get("ctx_switches"), run.get("requests")
    if not sw or not n:
        return None, None
    main = other = 0
    for key, t in sw.get("threads", {}).items():
        count = int(t["voluntary"]) + int(t["nonvoluntary"])
        if key == "main":
            main += count
        else:
            other += count
    return main / n, other / n


def _per_hop(summary: dict[str, Any], runs: list[dict[str, Any]], cfg: str) -> dict[str, Any]:
    """CPU per request at c1 and c50 side by side, and the wake-ups per request."""
    out: dict[str, Any] = {}
    c50 = _med(summary, "small", cfg, "cpu_us_per_req")
    c1 = _med(summary, "c1", cfg, "cpu_us_per_req")
    out["cpu_us_per_req_c50"] = c50
    out["cpu_us_per_req_c1"] = c1
    out["cpu_c1_over_c50"] = _ratio(c1, c50)
    for phase in ("small", "c1"):
        label = "c50" if phase == "small" else "c1"
        out[f"wakeups_per_req_{label}"] = _med(summary, phase, cfg, "wakeups_per_req")
        mains, others = [], []
        for r in runs:
            if r["phase"] == phase and r["config"] == cfg:
                m, o = _wakeups(r)
                if m is not None and o is not None:
                    mains.append(m)
                    others.append(o)
        out[f"wakeups_main_per_req_{label}"] = round(statistics.median(mains), 3) if mains else None
        out[f"wakeups_other_threads_per_req_{label}"] = (
            round(statistics.median(others), 3) if others else None
        )
    return out


def compute_derived(
    summary: dict[str, Any], extra: dict[str, Any], runs: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Added latency at c1 and the ratios the targets are judged on."""
    runs = runs or []
    d: dict[str, Any] = {}
    direct = _med(summary, "c1", "direct", "p50")
    xcpu = _med(summary, "c1", "direct-xcpu", "p50")
    added: dict[str, dict[str, float | None]] = {}
    for cfg in ("haproxy", "sidecar", BASE_CONFIG, FLOOR_CONFIG):
        p50 = _med(summary, "c1", cfg, "p50")
        if p50 is None and cfg in (BASE_CONFIG, FLOOR_CONFIG):
            continue
        added[cfg] = {
            "vs_direct_ms": None if p50 is None or direct is None else round(p50 - direct, 4),
            "vs_direct_xcpu_ms": None if p50 is None or xcpu is None else round(p50 - xcpu, 4),
        }
    d["c1_added_p50"] = added
    for key in ("vs_direct_ms", "vs_direct_xcpu_ms"):
        d[f"c1_added_ratio_{key}"] = _ratio(added["sidecar"][key], added["haproxy"][key])
    d["per_hop"] = {
        cfg: _per_hop(summary, runs, cfg)
        for cfg in ("direct", "direct-xcpu", "haproxy", "sidecar", BASE_CONFIG, FLOOR_CONFIG)
        if cfg in summary.get("small", {}) or cfg in summary.get("c1", {})
    }
    d["small_rps_ratio"] = _ratio(
        _med(summary, "small", "sidecar", "rps"), _med(summary, "small", "haproxy", "rps")
    )
    d["small_cpu_ratio"] = _ratio(
        _med(summary, "small", "sidecar", "cpu_us_per_req"),
        _med(summary, "small", "haproxy", "cpu_us_per_req"),
    )
    for body in ("16k", "1m"):
        d[f"body{body}_mibs_ratio"] = _ratio(
            _med(summary, f"body{body}", "sidecar", "mib_s"),
            _med(summary, f"body{body}", "haproxy", "mib_s"),
        )
    base = "sidecar-1r-1ep"
    for cfg in (f"sidecar-{SCALING_ROUTES}routes", "sidecar-100ep"):
        # Judged per round (paired): the configs differ by a few percent at most, less
        # than the machine drifts between rounds.
        d[f"scaling_{cfg}"] = {
            "cpu_per_req_ratio": paired_ratio(runs, "scaling", cfg, base, "cpu_us_per_req"),
            "rps_ratio": paired_ratio(runs, "scaling", cfg, base, "rps"),
            "cpu_per_req_ratio_of_medians": _ratio(
                _med(summary, "scaling", cfg, "cpu_us_per_req"),
                _med(summary, "scaling", base, "cpu_us_per_req"),
            ),
        }
    bb = extra.get("bigbody")
    if bb and "1m" in bb and "100m" in bb:
        d["bigbody_hwm_delta_mib"] = round(
            (bb["100m"]["vmhwm_kib"] - bb["1m"]["vmhwm_kib"]) / 1024, 1
        )
    grpc = summary.get("grpc", {})
    if grpc:
        h_cpu = _med(summary, "grpc", "haproxy", "cpu_us_per_req")
        s_cpu = _med(summary, "grpc", "sidecar", "cpu_us_per_req")
        d["grpc"] = {
            "rps_ratio": _ratio(
                _med(summary, "grpc", "sidecar", "rps"), _med(summary, "grpc", "haproxy", "rps")
            ),
            "cpu_per_call_ratio": _ratio(s_cpu, h_cpu),
            # Calls per second per core = 1e6 / CPU µs per call; its ratio is the inverse.
            "calls_per_core_ratio": _ratio(h_cpu, s_cpu),
        }
    return d


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def fisher_one_sided(a_ok: int, a_failed: int, b_ok: int, b_failed: int) -> float:
    """One-sided Fisher exact test p-value for "A fails more often than B": the chance, with
    the margins fixed and one failure rate for both, that A gets at least a_failed of the
    failures (hypergeometric upper tail). Summed in log space: the counts reach thousands,
    where the binomial coefficients overflow a float."""
    n_a = a_ok + a_failed
    total = n_a + b_ok + b_failed
    failed = a_failed + b_failed
    log_all = _log_comb(total, n_a)
    logs = [
        _log_comb(failed, x) + _log_comb(total - failed, n_a - x) - log_all
        for x in range(a_failed, min(failed, n_a) + 1)
    ]
    if not logs:
        return 1.0
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(v - top) for v in logs))


def _p_text(p: float) -> str:
    if p < 1e-6:
        return "p<1e-6"
    return f"p={p:.1e}" if p < 0.001 else f"p={p:.2g}"


def _chance_note(sc: dict[str, Any], hp: dict[str, Any]) -> str:
    """Whether the sidecar's lower success rate is more than chance (it never changes `met`)."""
    s_failed, h_failed = sc["requests"] - sc["ok"], hp["requests"] - hp["ok"]
    p = fisher_one_sided(sc["ok"], s_failed, hp["ok"], h_failed)
    verdict = "difference within chance" if p >= ALPHA else "significant"
    return (
        f"failed {s_failed}/{sc['requests']} vs {h_failed}/{hp['requests']}: "
        f"{verdict} (one-sided Fisher {_p_text(p)})"
    )


def _target(name: str, value: str, goal: str, met: bool | None, note: str = "") -> dict[str, Any]:
    return {"target": name, "value": value, "goal": goal, "met": met, "note": note}


def _fmt(v: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def _all_within(values: list[float | None], limit: float) -> bool:
    return bool(values) and all(v is not None and v <= limit for v in values)


def _runs_text(values: list[Any], spec: str = ".3f") -> str:
    return ", ".join("-" if v is None else f"{v:{spec}}" for v in values)


def evaluate_targets(
    summary: dict[str, Any],
    derived: dict[str, Any],
    resilience: dict[str, Any],
    grpc: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    t: list[dict[str, Any]] = []
    r = derived.get("small_rps_ratio")
    if r is not None:
        t.append(
            _target(
                "small body c50 req/s vs HAProxy",
                f"{r:.3f}x",
                ">= 0.15x (stretch 0.20x)",
                r >= 0.15,
                "stretch met" if r >= 0.20 else "stretch not met",
            )
        )
    added = derived.get("c1_added_p50", {})
    s_add = added.get("sidecar", {}).get("vs_direct_ms")
    h_add = added.get("haproxy", {}).get("vs_direct_ms")
    if s_add is not None and h_add is not None:
        rx = derived.get("c1_added_ratio_vs_direct_xcpu_ms")
        t.append(
            _target(
                "added p50 at c1 vs HAProxy's added p50 (same-core direct)",
                f"+{s_add:.3f} ms vs +{h_add:.3f} ms = "
                f"{_fmt(derived.get('c1_added_ratio_vs_direct_ms'))}x",
                "<= 2x",
                s_add <= 2 * h_add,
                f"against the cross-core direct call: {_fmt(rx)}x",
            )
        )
    sx = added.get("sidecar", {}).get("vs_direct_xcpu_ms")
    hx = added.get("haproxy", {}).get("vs_direct_xcpu_ms")
    if sx is not None and hx is not None:
        rx = derived.get("c1_added_ratio_vs_direct_xcpu_ms")
        t.append(
            _target(
                "per hop: added p50 at c1 vs HAProxy's, against the cross-core direct call",
                f"+{sx:.3f} ms vs +{hx:.3f} ms = {_fmt(rx)}x",
                "<= 2x",
                hx > 0 and sx <= 2 * hx,
            )
        )
    hop = derived.get("per_hop", {}).get("sidecar", {})
    ratio = hop.get("cpu_c1_over_c50")
    if ratio is not None:
        t.append(
            _target(
                "per hop: sidecar CPU per request at c1 vs at c50",
                f"{hop['cpu_us_per_req_c1']:.1f} vs {hop['cpu_us_per_req_c50']:.1f} µs "
                f"= {ratio:.2f}x",
                "<= 1.3x",
                ratio <= 1.3,
                f"wake-ups per request: c1 {_fmt(hop.get('wakeups_per_req_c1'))}, "
                f"c50 {_fmt(hop.get('wakeups_per_req_c50'))}",
            )
        )
    r = derived.get("body1m_mibs_ratio")
    if r is not None:
        t.append(_target("1 MiB body MiB/s vs HAProxy", f"{r:.3f}x", ">= 0.5x", r >= 0.5))
    delta = derived.get("bigbody_hwm_delta_mib")
    if delta is not None:
        t.append(
            _target(
                "peak RSS, 100 MiB body minus 1 MiB body",
                f"{delta:+.1f} MiB",
                "<= 10 MiB",
                delta <= 10,
            )
        )
    for cfg, label in (
        (f"sidecar-{SCALING_ROUTES}routes", f"{SCALING_ROUTES:,} routes vs 1"),
        ("sidecar-100ep", "100 endpoints vs 1"),
    ):
        sc = derived.get(f"scaling_{cfg}", {})
        cpu, rps = sc.get("cpu_per_req_ratio"), sc.get("rps_ratio")
        if cpu is not None:
            t.append(
                _target(
                    f"{label}: CPU per request",
                    f"{cpu:.3f}x (req/s {_fmt(rps, '.3f')}x)",
                    "within 10 % (<= 1.10x)",
                    cpu <= 1.10,
                )
            )
    if grpc is not None:
        t.extend(_grpc_targets(derived, grpc))
    t.extend(resilience_targets(resilience))
    return t


def ab_targets(ab: dict[str, Any] | None) -> list[dict[str, Any]]:
    """--base: the A/B verdicts as targets (n/a with a single round: no spread to judge)."""
    if not ab:
        return []
    t = []
    for key, label in (
        ("c50_rps", "A/B small body c50 req/s, after ÷ before"),
        ("c1_added_p50", "A/B c1 added p50, after ÷ before"),
    ):
        v = ab.get(key, {})
        spread = v.get("spread")
        pct = _fmt(None if spread is None else 100 * spread, ".1f")
        t.append(
            _target(
                label,
                f"{_fmt(v.get('median_ratio'), '.3f')}x (per round "
                f"{_fmt(v.get('ratio_min'), '.3f')}-{_fmt(v.get('ratio_max'), '.3f')})",
                f"no worse beyond the run's spread (±{pct} %)",
                v.get("no_worse"),
            )
        )
    return t


def _grpc_targets(derived: dict[str, Any], grpc: dict[str, Any]) -> list[dict[str, Any]]:
    name = "gRPC unary: calls/s per core vs HAProxy"
    status = grpc.get("status", {})
    if grpc.get("skipped"):
        return [_target(name, "not run", ">= 0.10x", False, grpc["skipped"])]
    if status.get("sidecar") != "ok":
        why = status.get("sidecar", "not measured")
        return [_target(name, "not measured", ">= 0.10x", False, f"sidecar: {why}")]
    g = derived.get("grpc", {})
    r = g.get("calls_per_core_ratio")
    return [
        _target(
            name,
            f"{_fmt(r, '.3f')}x",
            ">= 0.10x",
            r is not None and r >= 0.10,
            f"calls/s {_fmt(g.get('rps_ratio'), '.3f')}x",
        )
    ]


def resilience_targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The resilience scenarios' targets: sidecar vs HAProxy with the same retry policy, in
    one run; every scenario repeated, p99 targets on the runs' samples pooled."""
    t: list[dict[str, Any]] = []
    e = res.get("errors503")
    if e and "sidecar" in e:
        n = e["repeat"]
        opened = e.get("breaker_opened_runs", 0)
        t.append(
            _target(
                "errors503: the breaker never opens",
                f"opened in {opened} of {n} runs ({e.get('breaker_opened_total', 0)} openings)",
                f"never, in any of {n} runs",
                opened == 0,
            )
        )
        sf, hf = e.get("sidecar_failed_total", 0), e.get("haproxy_failed_total", 0)
        t.append(
            _target(
                "errors503: failures summed over the runs vs HAProxy's",
                f"{sf} vs {hf} of {e['sidecar']['requests']} each",
                "<= HAProxy's + 5",
                sf <= hf + 5,
                f"a proxy making every retry its policy allows fails "
                f"{e.get('policy_failures_total')}",
            )
        )
    for name in ("dead_endpoint", "slow_endpoint"):
        d = res.get(name)
        if not d or "sidecar" not in d or "haproxy" not in d:
            continue
        sc, hp = d["sidecar"], d["haproxy"]
        met = sc["success_rate"] >= hp["success_rate"]
        t.append(
            _target(
                f"{name}: success rate vs HAProxy",
                f"{100 * sc['success_rate']:.2f} % vs {100 * hp['success_rate']:.2f} %",
                ">= HAProxy",
                met,
                "" if met else _chance_note(sc, hp),
            )
        )
        sp, hpp = sc.get("p99_ms"), hp.get("p99_ms")
        if sp is not None and hpp is not None:
            t.append(
                _target(
                    f"{name}: p99 vs HAProxy (runs pooled)",
                    f"{sp:.2f} ms vs {hpp:.2f} ms = {_fmt(_ratio(sp, hpp))}x",
                    "<= 1.5x",
                    sp <= 1.5 * hpp,
                )
            )
    t.extend(_outage_targets(res.get("outage")))
    k = res.get("keepalive")
    if k and "sidecar" in k:
        sc, hp = k["sidecar"], k.get("haproxy", {})
        t.append(
            _target(
                "keep-alive race: app-visible errors",
                f"{sc['failed']} of {sc['requests']} (HAProxy: {hp.get('failed', '-')} of "
                f"{hp.get('requests', '-')})",
                "0",
                sc["failed"] == 0,
            )
        )
    low = res.get("lowtraffic")
    if low and "opened_at_failure_runs" in low:
        at = low["opened_at_failure_runs"]
        thr = low.get("failure_threshold")
        t.append(
            _target(
                "low traffic (1 req/s, all failing): breaker opens at the threshold-th failure",
                f"opened at consecutive failure {_runs_text(at, 'd')} (per run)",
                f"= failure_threshold ({thr}) in every run",
                bool(at) and all(a == thr for a in at),
            )
        )
    rec = res.get("recovery")
    if rec and "accept_to_half_open_s_runs" in rec:
        vals = rec["accept_to_half_open_s_runs"]
        interval = rec.get("probe_interval_s") or 0.5
        limit = interval + 0.5
        calls = rec.get("call_after_runs", [])
        t.append(
            _target(
                "recovery with no traffic: upstream accepting -> breaker half_open",
                f"{_runs_text(vals)} s (per run); then a call: {_runs_text(calls, 'd')}",
                f"<= {limit:g} s (one probe interval + 0.5 s) and the call succeeds",
                _all_within(vals, limit) and all(c == 200 for c in calls),
            )
        )
        probe = rec.get("failfast_probe", {})
        lat = probe.get("latency_ms")
        if lat:
            codes = probe.get("codes", {})
            opened = sum(v for c, v in codes.items() if c.endswith("circuit_open"))
            t.append(
                _target(
                    "fail-fast p99 with the breaker open (wrk -c1)",
                    f"{lat['p99']:.3f} ms",
                    "< 1 ms",
                    lat["p99"] < 1.0 and opened > 0,
                    f"{opened} of {probe.get('requests')} answers were circuit_open",
                )
            )
    a = res.get("amplification")
    if a and "sidecar" in a:
        sc, hp = a["sidecar"], a.get("haproxy", {})
        floor = a.get("budget_min_per_second")
        t.append(
            _target(
                "retry amplification (every attempt 503): upstream attempts per app request",
                f"{sc['upstream_attempts']} for {sc['requests']} = "
                f"{_fmt(sc.get('attempts_per_request'))} per request, bound {sc['bound']:.0f} "
                f"(HAProxy {_fmt(hp.get('attempts_per_request'))})",
                f"<= 1.25 x requests + {floor:g}/s x 10 per 10 s",
                sc["upstream_attempts"] <= sc["bound"],
            )
        )
    return t


def _outage_targets(o: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not o or "sidecar" not in o:
        return []
    t: list[dict[str, Any]] = []
    sc, hp = o["sidecar"], o.get("haproxy", {})
    opened = sc.get("open_after_first_failure_s_runs", [])
    t.append(
        _target(
            "outage: breaker open after the first failure",
            f"{_runs_text(opened)} s (per run)",
            "within 1 s in every run",
            _all_within(opened, 1.0),
        )
    )
    ans, h_ans = sc.get("answers_during", {}), hp.get("answers_during", {})
    p99 = ans.get("p99_ms")
    t.append(
        _target(
            "outage: answers from 1 s after the first failure until the upstream is back, p99",
            f"{_fmt(p99)} ms over {ans.get('requests', 0)} answers "
            f"(HAProxy {_fmt(h_ans.get('p99_ms'))} ms)",
            "< 5 ms (runs pooled)",
            p99 is not None and p99 < 5.0,
        )
    )
    rec = sc.get("recover_s_runs", [])
    t.append(
        _target(
            "outage: traffic back after the upstream accepts connections",
            f"{_runs_text(rec)} s (per run; HAProxy {_runs_text(hp.get('recover_s_runs', []))})",
            "within 1 s in every run",
            _all_within(rec, 1.0),
        )
    )
    after = sc.get("after_recovery", {})
    rate = after.get("success_rate")
    t.append(
        _target(
            "outage: success after recovery (from 1 s after the upstream is back)",
            f"{_fmt(None if rate is None else 100 * rate, '.2f')} % of {after.get('requests', 0)}"
            f" (HAProxy {_fmt(_pct_of(hp.get('after_recovery', {})), '.2f')} %)",
            ">= 99.9 % (runs pooled)",
            rate is not None and rate >= 0.999,
            f"each run's window: {o['runs'][0]['roles']['sidecar'].get('after_recovery_s')} s",
        )
    )
    return t


def _pct(fraction: float | None) -> str:
    return _fmt(None if fraction is None else 100 * fraction, ".1f")


def _pct_of(summary: dict[str, Any]) -> float | None:
    rate = summary.get("success_rate")
    return None if rate is None else 100 * rate


# --------------------------------------------------------------------------- markdown


def _cell(entry: dict[str, Any] | None, key: str, spec: str = ",.0f", rng: bool = False) -> str:
    if not entry or not entry.get(key):
        return "-"
    st = entry[key]
    text = f"{st['median']:{spec}}"
    if rng and entry.get("rounds", 1) > 1:
        text += f" [{st['min']:{spec}}-{st['max']:{spec}}]"
    return text


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    summary = result["summary"]
    derived = result["derived"]
    m = meta["machine"]
    v = m["versions"]
    lines: list[str] = []
    add = lines.append
    add(f"# sidecar benchmark ({meta['mode']} run, {meta['started']})")
    add("")
    add(
        f"Machine: {m['nproc']} CPUs, {m['cpu_model']}, kernel {m['kernel']}, "
        f"{m['mem_total_mib']} MiB RAM. Python {v.get('python')}, aiohttp {v.get('aiohttp')}, "
        f"uvloop {v.get('uvloop')}, pybreaker {v.get('pybreaker')}, HAProxy {v.get('haproxy')}, "
        f"wrk {v.get('wrk')}, nginx {v.get('nginx', 'n/a')} (upstream: {meta['upstream']})."
    )
    add(
        f"Pinning: wrk, the upstream and the load driver on CPU {meta['load_cpu']}; "
        f"the proxy under test on CPU {meta['proxy_cpu']}. All traffic on 127.0.0.1. Wall time "
        f"{meta['wall_s']:.0f} s. Cores busy in the second before the run: "
        f"{meta.get('cores_busy_before_pct', {})}."
    )
    add("")
    add(
        "**Caveat:** absolute numbers move by tens of percent between runs on a shared VM; only "
        "ratios from the same run compare. Cells are medians of interleaved rounds "
        "[min-max]. wrk is closed-loop: at c50 a saturated proxy's latency is queueing "
        "(p50 ≈ 50 / req/s); use c1 for per-hop latency and CPU µs/request for cost."
    )
    add("")
    s = meta["settings"]
    build = meta.get("sidecar_build", "source")
    add(
        f"Sidecar build: {build}"
        + (
            " (the request path compiled with mypyc, scripts/build-native.sh)."
            if build == "native"
            else " (interpreted; `make native` builds the compiled copy)."
        )
    )
    add("")
    add(
        "Sidecar config: retries `max_retries: 3`, `retry_on: [connect-failure, reset, 503]`, "
        "`timeout: 2s`; the circuit breaker, the retry budget and outlier detection left "
        "unwritten (the defaults); access log (JSON on stdout → /dev/null) and metrics on. "
        "HAProxy: `nbthread 1`, keep-alive, `retries 3`, `retry-on conn-failure "
        "empty-response 503`, `option redispatch 1`, `timeout server 2s`."
    )
    add("")

    noisy = sorted(
        {
            f"{phase}/{cfg} ({e['foreign_cpu_pct_max']:.0f} %)"
            for phase, cfgs in summary.items()
            for cfg, e in cfgs.items()
            if e.get("foreign_cpu_pct_max", 0) > 10
        }
    )
    if noisy:
        add(
            "**Noise:** other processes used more than 10 % of a core during: "
            + ", ".join(noisy)
            + " (each such run was re-run once; the quieter one is kept)."
        )
    else:
        add("Other processes used under 10 % of a core in every measured run.")
    add("")

    # -- targets
    add("## Targets")
    add("")
    add("| target | value | goal | met |")
    add("|---|---|---|---|")
    for t in result["targets"]:
        met = "n/a" if t["met"] is None else "✅ met" if t["met"] else "❌ not met"
        note = f" ({t['note']})" if t.get("note") else ""
        add(f"| {t['target']} | {t['value']}{note} | {t['goal']} | {met} |")
    add("")

    # -- small body
    small, c1 = summary.get("small", {}), summary.get("c1", {})
    if small or c1:
        add(
            f"## Small body (6 B): c50 ({s['small_rounds']} x {s['small_duration']} s) and c1 "
            f"({s['c1_rounds']} x {s['c1_duration']} s)"
        )
        add("")
        add(
            "| config | c50 req/s | c50 p50 ms | p90 | p99 | req/s ÷ HAProxy | CPU µs/req "
            "| CPU ÷ HAProxy | c1 p50 ms | c1 p99 | c1 added p50 (vs direct / x-core) "
            "| peak RSS MiB | RSS ÷ HAProxy |"
        )
        add("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        h_rps = _med(summary, "small", "haproxy", "rps")
        h_cpu = _med(summary, "small", "haproxy", "cpu_us_per_req")
        h_rss = (small.get("haproxy") or {}).get("vmhwm_mib")
        for cfg in ("direct", "direct-xcpu", "haproxy", "sidecar", BASE_CONFIG, FLOOR_CONFIG):
            e, e1 = small.get(cfg), c1.get(cfg)
            if e is None and e1 is None:
                continue
            add_ = derived["c1_added_p50"].get(cfg, {})
            added = "-"
            if add_.get("vs_direct_ms") is not None:
                added = (
                    f"+{add_['vs_direct_ms']:.3f} / +{_fmt(add_.get('vs_direct_xcpu_ms'), '.3f')}"
                )
            rss = (e or e1 or {}).get("vmhwm_mib")
            names = {"direct": "direct (upstream CPU)", "direct-xcpu": "direct, wrk on CPU 1"}
            add(
                f"| {names.get(cfg, cfg)} | {_cell(e, 'rps', ',.0f', True)} "
                f"| {_cell(e, 'p50', '.3f')} | {_cell(e, 'p90', '.3f')} | {_cell(e, 'p99', '.3f')} "
                f"| {_x(_ratio(_med(summary, 'small', cfg, 'rps'), h_rps))} "
                f"| {_cell(e, 'cpu_us_per_req', '.1f')} "
                f"| {_x(_ratio(_med(summary, 'small', cfg, 'cpu_us_per_req'), h_cpu))} "
                f"| {_cell(e1, 'p50', '.3f', True)} | {_cell(e1, 'p99', '.3f')} | {added} "
                f"| {_fmt(rss, '.1f')} "
                f"| {_x(_ratio(rss, h_rss)) if cfg not in ('direct', 'direct-xcpu') else '-'} |"
            )
        add("")
        add(
            "Added p50 = proxy c1 p50 - direct c1 p50 (same-core direct / cross-core direct, "
            "where wrk runs on CPU 1 so the call crosses cores as a proxied one does). "
            "For `direct` the CPU and RSS are the upstream's. `aiohttp-floor` "
            "(`bench/floor.py`) is aiohttp's low-level server with the leanest possible hop "
            "behind it and no features: the floor of a Python hop on the sidecar's server."
        )
        add("")
        _per_hop_table(add, derived, summary)
    if result.get("ab"):
        _ab_section(add, result["ab"])

    # -- bodies
    if any(f"body{b}" in summary for b in ("16k", "1m")):
        add(f"## Bodies (-c10, {s['body_rounds']} x {s['body_duration']} s)")
        add("")
        add(
            "| body | config | req/s | MiB/s [min-max] | p50 ms | p99 ms | MiB/s ÷ HAProxy "
            "| CPU % | CPU ms/MiB | CPU/MiB ÷ HAProxy | peak RSS MiB |"
        )
        add("|---|---|---|---|---|---|---|---|---|---|---|")
        for b, label in (("16k", "16 KiB"), ("1m", "1 MiB")):
            ph = summary.get(f"body{b}", {})
            h_mib = _med(summary, f"body{b}", "haproxy", "mib_s")
            h_cpm = _med(summary, f"body{b}", "haproxy", "cpu_ms_per_mib")
            for cfg in ("direct", "haproxy", "sidecar"):
                e = ph.get(cfg)
                if e is None:
                    continue
                add(
                    f"| {label} | {cfg} | {_cell(e, 'rps')} | {_cell(e, 'mib_s', ',.0f', True)} "
                    f"| {_cell(e, 'p50', '.3f')} | {_cell(e, 'p99', '.3f')} "
                    f"| {_x(_ratio(_med(summary, f'body{b}', cfg, 'mib_s'), h_mib))} "
                    f"| {_cell(e, 'cpu_pct', '.0f')} | {_cell(e, 'cpu_ms_per_mib', '.2f')} "
                    f"| {_x(_ratio(_med(summary, f'body{b}', cfg, 'cpu_ms_per_mib'), h_cpm))} "
                    f"| {e['vmhwm_mib']:.1f} |"
                )
        add("")

    # -- scaling
    sc = summary.get("scaling", {})
    if sc:
        add(
            f"## Scaling (sidecar, 6 B body, -c50, {s['scaling_rounds']} x "
            f"{s['scaling_duration']} s; path `/svc0999`, the last route)"
        )
        add("")
        add(
            "| config | req/s | p50 ms | p99 ms | CPU µs/req | req/s ÷ base | "
            "CPU/req ÷ base | peak RSS MiB |"
        )
        add("|---|---|---|---|---|---|---|---|")
        for cfg, e in sc.items():
            ratios = derived.get(f"scaling_{cfg}", {})
            base_row = cfg == "sidecar-1r-1ep"
            add(
                f"| {cfg} | {_cell(e, 'rps', ',.0f', True)} | {_cell(e, 'p50', '.3f')} "
                f"| {_cell(e, 'p99', '.3f')} | {_cell(e, 'cpu_us_per_req', '.1f', True)} "
                f"| {'1.00x' if base_row else _x(ratios.get('rps_ratio'))} "
                f"| {'1.00x' if base_row else _x(ratios.get('cpu_per_req_ratio'))} "
                f"| {e['vmhwm_mib']:.1f} |"
            )
        add("")
        add(
            "Ratios to the base are medians of per-round ratios: the runs of one round are "
            "back to back, so they share the machine's speed, which drifts between rounds."
        )
        add("")

    # -- big bodies
    bb = result.get("bigbody")
    if bb:
        add(
            f"## Big bodies through the sidecar (-c10, {s['bigbody_duration']} s, "
            "a fresh process each)"
        )
        add("")
        add("| body | req/s | MiB/s | p99 ms | VmHWM idle MiB | VmHWM after MiB | growth MiB |")
        add("|---|---|---|---|---|---|---|")
        for b, label in (("1m", "1 MiB"), ("100m", "100 MiB")):
            r = bb.get(b)
            if not r:
                continue
            idle, peak = r["vmhwm_idle_kib"] / 1024, r["vmhwm_kib"] / 1024
            add(
                f"| {label} | {r['rps']:,.1f} | {r['mib_s']:,.0f} | "
                f"{r['latency_ms']['p99']:.1f} | {idle:.1f} | {peak:.1f} | {peak - idle:+.1f} |"
            )
        add("")

    # -- gRPC
    if result.get("grpc") is not None:
        _grpc_section(add, result["grpc"], summary, derived, s)

    # -- resilience
    res = result.get("resilience", {})
    if res:
        _resilience_sections(add, res)
    add(
        f"Raw data: `{meta.get('json_name', 'the JSON next to this file')}` (every run, "
        "with CPU per core, errors and per-status counts)."
    )
    add("")
    return "\n".join(lines)


def _per_hop_table(add: Any, derived: dict[str, Any], summary: dict[str, Any]) -> None:
    hops = derived.get("per_hop", {})
    if not hops:
        return
    add("### Per hop at low load: latency, CPU and wake-ups")
    add("")
    add(
        "| config | c1 p50 ms | added p50 vs same-core / cross-core direct "
        "| CPU µs/req c1 | CPU µs/req c50 | c1 ÷ c50 "
        "| wake-ups/req c1 (main + other threads) | wake-ups/req c50 (main + other) |"
    )
    add("|---|---|---|---|---|---|---|---|")
    for cfg, h in hops.items():
        a = derived["c1_added_p50"].get(cfg, {})
        added = "-"
        if a.get("vs_direct_ms") is not None:
            added = f"+{a['vs_direct_ms']:.3f} / +{_fmt(a.get('vs_direct_xcpu_ms'), '.3f')}"
        wake = {}
        for label in ("c1", "c50"):
            wake[label] = (
                f"{_fmt(h.get(f'wakeups_per_req_{label}'))} "
                f"({_fmt(h.get(f'wakeups_main_per_req_{label}'))} + "
                f"{_fmt(h.get(f'wakeups_other_threads_per_req_{label}'))})"
            )
        add(
            f"| {cfg} | {_fmt(_med(summary, 'c1', cfg, 'p50'), '.3f')} | {added} "
            f"| {_fmt(h.get('cpu_us_per_req_c1'), '.1f')} "
            f"| {_fmt(h.get('cpu_us_per_req_c50'), '.1f')} | {_x(h.get('cpu_c1_over_c50'))} "
            f"| {wake['c1']} | {wake['c50']} |"
        )
    add("")
    add(
        "CPU per request from the process's utime+stime over the run; wake-ups = voluntary + "
        "nonvoluntary context switches of all its threads (/proc/PID/task/*/status) over the "
        "run, per request; `main` is the thread whose id is the PID (the event loop), "
        "`other` every other thread (the sidecar's access-log writer among them). For "
        "`direct` the numbers are the upstream's."
    )
    add("")


def _ab_section(add: Any, ab: dict[str, Any]) -> None:
    base = ab["base"]
    head = base.get("head", {})
    dirty = " plus uncommitted changes" if head.get("dirty") else ""
    add(f"### A/B: this tree vs `{base['rev']}` ({BASE_CONFIG})")
    add("")
    add(
        f"Before: `{base['rev']}` = {base['sha'][:12]} ({base.get('subject', '')}), from a "
        f"temporary worktree and its own venv, run from {base.get('build', 'source')}. After: "
        f"the working tree at {str(head.get('sha', ''))[:12]}{dirty}. Both in the same "
        "interleaved rounds."
    )
    add("")
    add(
        "| metric | before, per round | after, per round | after ÷ before, per round "
        "| median ratio [min-max] | spread: before / after / run | no worse beyond the spread |"
    )
    add("|---|---|---|---|---|---|---|")
    for key, name, spec in (
        ("c50_rps", "small body c50 req/s (higher is better)", ",.0f"),
        ("c1_added_p50", "c1 added p50 ms (lower is better)", ".3f"),
    ):
        v = ab.get(key, {})
        label = name
        if key == "c1_added_p50":
            label += f", over `{v.get('reference', 'direct')}`"
        verdict = (
            "n/a (needs 2 rounds)"
            if v.get("no_worse") is None
            else ("yes" if v["no_worse"] else "**no**")
        )
        add(
            f"| {label} | {', '.join(f'{x:{spec}}' for x in v.get('before', []))} "
            f"| {', '.join(f'{x:{spec}}' for x in v.get('after', []))} "
            f"| {', '.join(f'{x:.3f}' for x in v.get('ratios', []))} "
            f"| {_fmt(v.get('median_ratio'), '.3f')} [{_fmt(v.get('ratio_min'), '.3f')}-"
            f"{_fmt(v.get('ratio_max'), '.3f')}] "
            f"| ±{_pct(v.get('spread_before'))} / ±{_pct(v.get('spread_after'))} / "
            f"±{_pct(v.get('spread'))} % "
            f"| {verdict} |"
        )
    add("")
    add(
        "Per round, the two sidecars run back to back, so a ratio compares them on the same "
        "machine state. A config's spread is half its range across rounds relative to its "
        "median (the same code every round: what the machine did to it); the run's spread is "
        "the larger of the two times √2 (a ratio carries the noise of both its terms). No "
        "worse: the median ratio is at least 1 - spread (req/s) or at most 1 + spread (added "
        "latency)."
    )
    add("")
    foreign = ab.get("foreign_cpu_pct_max")
    if foreign is not None and foreign > 10:
        add(
            f"**Noise:** other processes used up to {foreign:.0f} % of a core during these "
            "runs; a verdict measured on a busy machine is weak either way: run it again."
        )
        add("")


def _grpc_section(
    add: Any, g: dict[str, Any], summary: dict[str, Any], derived: dict[str, Any], s: Any
) -> None:
    add(
        f"## gRPC unary (h2load, {g.get('streams')} streams over {g.get('connections')} "
        f"connections, {g.get('message_bytes')}-byte message; {s['grpc_rounds']} x "
        f"{s['grpc_duration']} s)"
    )
    add("")
    if g.get("skipped"):
        add(f"Not run: {g['skipped']}.")
        add("")
        return
    add(
        "| config | status | calls/s [min-max] | p50 ms | p99 ms | CPU µs/call "
        "| calls/s ÷ HAProxy | CPU/call ÷ HAProxy | calls/s per core ÷ HAProxy |"
    )
    add("|---|---|---|---|---|---|---|---|---|")
    ph = summary.get("grpc", {})
    h_rps = _med(summary, "grpc", "haproxy", "rps")
    h_cpu = _med(summary, "grpc", "haproxy", "cpu_us_per_req")
    for cfg in ("direct", "haproxy", "sidecar"):
        e = ph.get(cfg)
        status = g.get("status", {}).get(cfg, "-")
        cpu = _med(summary, "grpc", cfg, "cpu_us_per_req")
        add(
            f"| {cfg} | {status} | {_cell(e, 'rps', ',.0f', True)} | {_cell(e, 'p50', '.3f')} "
            f"| {_cell(e, 'p99', '.3f')} | {_cell(e, 'cpu_us_per_req', '.1f')} "
            f"| {_x(_ratio(_med(summary, 'grpc', cfg, 'rps'), h_rps))} "
            f"| {_x(_ratio(cpu, h_cpu))} | {_x(_ratio(h_cpu, cpu))} |"
        )
    add("")
    add(
        "HAProxy speaks h2c on both sides (`proto h2` on the bind and server lines); the "
        "upstream is a grpcio server echoing the raw bytes. For `direct` the CPU is the "
        "upstream's. A config whose probe call (grpcio client, echo checked) failed is not "
        "measured; its status says why."
    )
    add("")


def _rate(e: dict[str, Any]) -> str:
    r = e.get("success_rate")
    return "-" if r is None else f"{100 * r:.2f} %"


def _resilience_sections(add: Any, res: dict[str, Any]) -> None:
    add(
        "## Resilience (open-loop aiohttp driver unless said; the same retry policy on both "
        "proxies; success = 2xx seen by the app)"
    )
    add("")
    add(
        "Both proxies: `max_retries: 3` / `retries 3` on connect failure, reset and 503 "
        "(errors503: `max_retries: 2`, the default); the sidecar's breaker, budget and outlier "
        "detection unwritten (defaults). Every scenario ran "
        f"{max(r.get('repeat', 1) for r in res.values())} time(s), each with fresh processes; "
        "the first table pools the runs, the second lists every run."
    )
    add("")
    add(
        "| scenario | proxy | runs | requests | success | p50 ms | p99 ms | max ms | answers "
        "| sidecar metrics: retries / refused by budget / breaker opened |"
    )
    add("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in res.items():
        for role in ("sidecar", "haproxy", "sidecar+outlier"):
            e = r.get(role)
            if not e or not e.get("requests"):
                continue
            answers = ", ".join(f"{k}: {n}" for k, n in list(e["codes"].items())[:4])
            runs = [x["roles"].get(role, {}) for x in r.get("runs", [])]
            sms = [x.get("sidecar_metrics") for x in runs if x.get("sidecar_metrics")]
            mtext = "-"
            if sms and all("retries" in m for m in sms):
                mtext = (
                    f"{sum(m['retries'] for m in sms)} / "
                    f"{sum(m['retry_budget_exhausted'] for m in sms)} / "
                    f"{sum(m['breaker_opened'] for m in sms)}"
                )
            add(
                f"| {name} | {role} | {e.get('runs', 1)} | {e['requests']} | {_rate(e)} "
                f"| {_fmt(e['p50_ms'], '.2f')} | {_fmt(e['p99_ms'], '.2f')} "
                f"| {_fmt(e['max_ms'], '.1f')} | {answers} | {mtext} |"
            )
    add("")
    for name, r in res.items():
        together = r.get("together")
        how = (
            "the sidecar alone"
            if together is None
            else "to both proxies at once"
            if together
            else "one proxy after the other"
        )
        rate = r.get("rate")
        load = f"{rate:g} req/s, {how}" if rate else how
        took = f", {r['duration_s']} s per run" if r.get("duration_s") else ""
        add(f"- **{name}**: {r.get('notes', '')}; {load}{took}.")
    if any("sidecar+outlier" in r for r in res.values()):
        add(
            "- **sidecar+outlier** (first run only, not part of the targets): the same sidecar "
            "config plus `outlier_detection: {consecutive_failures: 5, ejection_time: 30s, "
            "max_ejection_percent: 50}` written out."
        )
    add("")
    add("### Every run")
    add("")
    add("| scenario | run | sidecar | HAProxy |")
    add("|---|---|---|---|")
    for name, r in res.items():
        for run in r.get("runs", []):
            sc, hp = _run_cells(name, run)
            add(f"| {name} | {run['run']} | {sc} | {hp} |")
    add("")


def _run_cells(name: str, run: dict[str, Any]) -> tuple[str, str]:
    """One run of a scenario in two cells: what the sidecar and HAProxy did."""
    roles = run.get("roles", {})
    sc, hp = roles.get("sidecar", {}), roles.get("haproxy", {})

    def basic(e: dict[str, Any]) -> str:
        if not e.get("requests"):
            return "-"
        return f"failed {e['failed']}/{e['requests']}, p99 {_fmt(e.get('p99_ms'), '.2f')} ms"

    if name == "errors503":
        sm = sc.get("sidecar_metrics", {})
        return (
            f"{basic(sc)}, breaker opened {sm.get('breaker_opened')}, attempts "
            f"{sc.get('upstream_attempts')} (policy-exact failures {run.get('policy_failures')})",
            f"{basic(hp)}, attempts {hp.get('upstream_attempts')}",
        )
    if name == "outage":

        def cell(e: dict[str, Any]) -> str:
            ans = e.get("answers_during", {})
            text = (
                f"{basic(e)}; answers during p99 {_fmt(ans.get('p99_ms'), '.2f')} ms; recover "
                f"{_fmt(e.get('recover_s'), '.2f', ' s')}; after recovery "
                f"{_rate(e.get('after_recovery', {}))}"
            )
            if "open_after_first_failure_s" in e:
                text = f"open after {_fmt(e['open_after_first_failure_s'], '.3f', ' s')}; " + text
            return text

        return cell(sc), cell(hp)
    if name == "keepalive":

        def ka(e: dict[str, Any]) -> str:
            up = e.get("upstream", {})
            return (
                f"{basic(e)}, errors by method {e.get('errors_by_method')}, upstream "
                f"connections {up.get('connections')} (idle closes {up.get('idle_closes')})"
            )

        return ka(sc), ka(hp)
    if name == "lowtraffic":
        return (
            f"opened at consecutive failure {run.get('opened_at_failure')} (threshold "
            f"{run.get('failure_threshold')}); first circuit_open: request "
            f"{run.get('first_circuit_open_request')}; trips "
            f"{sc.get('sidecar_metrics', {}).get('trips')}; answers {', '.join(run['answers'])}",
            "n/a (no breaker)",
        )
    if name == "recovery":
        if "error" in run:
            return run["error"], "n/a"
        return (
            f"tripped by {run.get('requests_to_trip')} requests; upstream back "
            f"{run.get('open_to_accept_s')} s after open; half_open "
            f"{_fmt(run.get('accept_to_half_open_s'), '.3f', ' s')} after it accepted (seen: "
            f"{run.get('state_seen')}, polled up to {run.get('waited_s')} s; reset_timeout "
            f"{run.get('breaker_reset_timeout_s')} s, probe interval "
            f"{run.get('probe_interval_s')} s); call after: {run.get('call_after')}; probes "
            f"{sc.get('sidecar_metrics', {}).get('probes')}",
            "n/a (no breaker)",
        )
    if name == "amplification":

        def amp(e: dict[str, Any]) -> str:
            return (
                f"{e.get('upstream_attempts')} attempts for {e.get('requests')} requests = "
                f"{_fmt(e.get('attempts_per_request'))} per request (bound {e.get('bound')})"
            )

        return amp(sc), amp(hp)
    return basic(sc), basic(hp)
