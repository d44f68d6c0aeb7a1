"""Medians, ratios to HAProxy, the targets, and the markdown table."""

from __future__ import annotations

import math
import statistics
from typing import Any

from bench.configs import OUTAGE_VARIANT_RESET, OUTAGE_VARIANT_ROLE, SCALING_ROUTES

MIB = 1048576
ALPHA = 0.05  # below this one-sided p-value, the sidecar's extra failures are not chance
STAT_KEYS = ("rps", "mib_s", "p50", "p90", "p99", "cpu_us_per_req", "cpu_ms_per_mib", "cpu_pct")


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


def compute_derived(
    summary: dict[str, Any], extra: dict[str, Any], runs: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Added latency at c1 and the ratios the targets are judged on."""
    d: dict[str, Any] = {}
    direct = _med(summary, "c1", "direct", "p50")
    xcpu = _med(summary, "c1", "direct-xcpu", "p50")
    added: dict[str, dict[str, float | None]] = {}
    for cfg in ("haproxy", "sidecar"):
        p50 = _med(summary, "c1", cfg, "p50")
        added[cfg] = {
            "vs_direct_ms": None if p50 is None or direct is None else round(p50 - direct, 4),
            "vs_direct_xcpu_ms": None if p50 is None or xcpu is None else round(p50 - xcpu, 4),
        }
    d["c1_added_p50"] = added
    for key in ("vs_direct_ms", "vs_direct_xcpu_ms"):
        d[f"c1_added_ratio_{key}"] = _ratio(added["sidecar"][key], added["haproxy"][key])
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
            "cpu_per_req_ratio": paired_ratio(runs or [], "scaling", cfg, base, "cpu_us_per_req"),
            "rps_ratio": paired_ratio(runs or [], "scaling", cfg, base, "rps"),
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


def evaluate_targets(
    summary: dict[str, Any], derived: dict[str, Any], resilience: dict[str, Any]
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
                "added p50 at c1 vs HAProxy's added p50",
                f"+{s_add:.3f} ms vs +{h_add:.3f} ms = "
                f"{_fmt(derived.get('c1_added_ratio_vs_direct_ms'))}x",
                "<= 2x",
                s_add <= 2 * h_add,
                f"against the cross-core direct call: {_fmt(rx)}x",
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
    for name, res in resilience.items():
        sc, hp = res.get("sidecar", {}), res.get("haproxy", {})
        if sc.get("success_rate") is None or hp.get("success_rate") is None:
            continue
        met = sc["success_rate"] >= hp["success_rate"]
        t.append(
            _target(
                f"resilience {name}: success rate vs HAProxy",
                f"{100 * sc['success_rate']:.2f} % vs {100 * hp['success_rate']:.2f} %",
                ">= HAProxy",
                met,
                "" if met else _chance_note(sc, hp),
            )
        )
    outage = resilience.get("outage")
    if outage:
        probe = outage.get("timeline", {}).get("probe", {})
        lat = probe.get("latency_ms")
        if lat:
            codes = probe.get("codes", {})
            opened = sum(v for k, v in codes.items() if k.endswith("circuit_open"))
            t.append(
                _target(
                    "fail-fast p99 with the breaker open (wrk -c1)",
                    f"{lat['p99']:.3f} ms",
                    "< 1 ms",
                    lat["p99"] < 1.0 and opened > 0,
                    f"{opened} of {probe.get('requests')} answers were circuit_open",
                )
            )
    return t


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
    add(
        "Sidecar config: every feature on: circuit breaker (defaults), retries "
        "(`max_retries: 3`, `retry_on: [connect-failure, reset, 503]`, budget ratio 0.2 "
        "min 10/s), `timeout: 2s`, access log (JSON on stdout → /dev/null), metrics. HAProxy: "
        "`nbthread 1`, keep-alive, `retries 3`, `retry-on conn-failure empty-response "
        "response-timeout 503`, `option redispatch 1`, `timeout server 2s`."
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
        met = "✅ met" if t["met"] else "❌ not met"
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
        for cfg in ("direct", "direct-xcpu", "haproxy", "sidecar"):
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
                f"| {_cell(e1, 'p50', '.3f')} | {_cell(e1, 'p99', '.3f')} | {added} "
                f"| {_fmt(rss, '.1f')} "
                f"| {_x(_ratio(rss, h_rss)) if cfg not in ('direct', 'direct-xcpu') else '-'} |"
            )
        add("")
        add(
            "Added p50 = proxy c1 p50 - direct c1 p50 (same-core direct / cross-core direct, "
            "where wrk runs on CPU 1 so the call crosses cores as a proxied one does). "
            "For `direct` the CPU and RSS are the upstream's."
        )
        add("")

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

    # -- resilience
    res = result.get("resilience", {})
    if res:
        add(
            "## Resilience (open-loop aiohttp driver, fixed rate; same retry policy on both "
            "proxies; success = 2xx seen by the app)"
        )
        add("")
        add(
            "| scenario | proxy | requests | success | p50 ms | p99 ms | max ms | answers "
            "| sidecar metrics: retries / refused by budget / breaker opened |"
        )
        add("|---|---|---|---|---|---|---|---|---|")
        for name, r in res.items():
            for role in ("sidecar", "haproxy", "sidecar+outlier", OUTAGE_VARIANT_ROLE):
                e = r.get(role)
                if not e:
                    continue
                answers = ", ".join(f"{k}: {n}" for k, n in list(e["codes"].items())[:4])
                sm = e.get("sidecar_metrics") or {}
                mtext = (
                    f"{sm['retries']} / {sm['retry_budget_exhausted']} / {sm['breaker_opened']}"
                    if "retries" in sm
                    else "-"
                )
                add(
                    f"| {name} | {role} | {e['requests']} | {100 * e['success_rate']:.2f} % "
                    f"| {_fmt(e['p50_ms'], '.2f')} | {_fmt(e['p99_ms'], '.2f')} "
                    f"| {_fmt(e['max_ms'], '.1f')} | {answers} | {mtext} |"
                )
        add("")
        for name, r in res.items():
            # Driven together, the proxies saw the same upstream at the same time.
            how = "to each proxy at once" if r.get("together") else "to one proxy after the other"
            add(f"- **{name}**: {r['notes']}; {r['rate']:.0f} req/s {how} for {r['duration_s']} s.")
        if any("sidecar+outlier" in r for r in res.values()):
            add(
                "- **sidecar+outlier** (not part of the targets): the same sidecar config plus "
                "`outlier_detection: {consecutive_failures: 5, ejection_time: 30s, "
                "max_ejection_percent: 50}`, which is off unless configured."
            )
        if any(OUTAGE_VARIANT_ROLE in r for r in res.values()):
            add(
                f"- **{OUTAGE_VARIANT_ROLE}** (not part of the targets): the same sidecar config "
                f"with the breaker's `reset_timeout: {OUTAGE_VARIANT_RESET}` instead of "
                f"{s['breaker_reset']}, in an outage of its own, timed like the first: how soon a "
                "tuned breaker lets traffic through again once the upstream is back."
            )
        out = res.get("outage")
        if out:
            add("")
            add("### Outage then recovery")
            add("")
            tl = out["timeline"]
            alone = (
                f"; {OUTAGE_VARIANT_ROLE} (not a target) then went through the same outage "
                "on its own, so its work stays out of the fail-fast probe"
                if OUTAGE_VARIANT_ROLE in out
                else ""
            )
            add(
                f"Upstream killed at {tl['down_at']:.2f} s, listening again at "
                f"{tl['back_at']:.2f} s (both proxies driven at once, {out['rate']:.0f} req/s "
                f"each{alone})."
            )
            add("")
            add(
                "| proxy | success before / during / after | p99 during outage ms "
                "| time to fail fast | time to recover after upstream is back |"
            )
            add("|---|---|---|---|---|")
            for role in ("sidecar", "haproxy", OUTAGE_VARIANT_ROLE):
                e = out.get(role)
                if not e:
                    continue
                rates = " / ".join(
                    "-" if e[k]["success_rate"] is None else f"{100 * e[k]['success_rate']:.1f} %"
                    for k in ("before", "during", "after")
                )
                ff = e.get("fail_fast_after_s")
                ff_text = "n/a (no breaker)" if role == "haproxy" else _fmt(ff, ".3f", " s")
                add(
                    f"| {role} | {rates} | {_fmt(e['during']['p99_ms'], '.2f')} | {ff_text} "
                    f"| {_fmt(e.get('recover_s'), '.2f', ' s')} |"
                )
            probe = tl.get("probe", {})
            if probe.get("latency_ms"):
                lat = probe["latency_ms"]
                answers = ", ".join(f"{k}: {n}" for k, n in probe.get("codes", {}).items())
                add("")
                add(
                    f"Fail-fast probe (wrk -c1, 1 s, breaker open): {probe['rps']:,.0f} req/s, "
                    f"p50 {lat['p50']:.3f} ms, p99 {lat['p99']:.3f} ms, max {lat['max']:.2f} ms; "
                    f"answers {answers}."
                )
            co = out.get("sidecar", {}).get("circuit_open")
            if co:
                add(
                    f"Driver-side circuit_open answers: {co['requests']}, p50 {co['p50_ms']} ms, "
                    f"p99 {co['p99_ms']} ms (includes the Python client's own overhead)."
                )
        add("")
    add(
        f"Raw data: `{meta.get('json_name', 'the JSON next to this file')}` (every run, "
        "with CPU per core, errors and per-status counts)."
    )
    add("")
    return "\n".join(lines)
