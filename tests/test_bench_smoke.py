"""Smoke test of the benchmark harness: `python -m bench --smoke` end to end.

Runs every phase for about a second against real wrk, HAProxy and the sidecar, then checks
the JSON's shape and that load went through. It asserts nothing about speed: the numbers
depend on the machine, and the bench reports them instead. Two fast tests check the report's
Fisher exact test, which qualifies a resilience target that is not met.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def report(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench.report: bench/ is not installed (only sidecar is), so import it from the root."""
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("bench.report")


def _have(name: str) -> bool:
    return shutil.which(name) is not None or Path(f"/usr/sbin/{name}").exists()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_smoke(tmp_path: Path, report: ModuleType) -> None:
    missing = [b for b in ("wrk", "haproxy") if not _have(b)]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not installed "
            "(`bash scripts/install-system-deps.sh test` installs them)"
        )
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--results-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    files = list(tmp_path.glob("bench-*-smoke.json"))
    assert len(files) == 1, out.stderr[-2000:]
    assert not (tmp_path / "latest.md").exists()  # only a full run replaces latest.md
    result = json.loads(files[0].read_text())

    assert {"meta", "summary", "derived", "bigbody", "resilience", "runs", "targets"} <= set(result)
    meta = result["meta"]
    assert meta["mode"] == "smoke"
    assert {"nproc", "cpu_model", "kernel", "versions"} <= set(meta["machine"])

    summary = result["summary"]
    expected = {
        "small": {"direct", "haproxy", "sidecar", "aiohttp-floor"},
        "c1": {"direct", "direct-xcpu", "haproxy", "sidecar", "aiohttp-floor"},
        "body16k": {"direct", "haproxy", "sidecar"},
        "body1m": {"direct", "haproxy", "sidecar"},
        "scaling": {"sidecar-1r-1ep", "sidecar-1000routes", "sidecar-100ep"},
    }
    for phase, configs in expected.items():
        assert set(summary[phase]) == configs, phase
        for config, entry in summary[phase].items():
            assert entry["rps"]["median"] > 0, (phase, config)
            for key in ("p50", "p90", "p99", "cpu_us_per_req", "wakeups_per_req"):
                assert entry[key] is not None, (phase, config, key)
            assert entry["vmhwm_mib"] > 0, (phase, config)

    for run in result["runs"]:
        assert run["requests"] > 0, {k: run[k] for k in ("phase", "config", "path", "errors")}
        assert run["errors"]["status"] == 0, run  # every answer under load was a 2xx
        assert run["ctx_switches"]["total"] > 0, run  # the process under test woke up

    for body in ("1m", "100m"):
        big = result["bigbody"][body]
        assert big["requests"] > 0
        assert big["vmhwm_kib"] >= big["vmhwm_idle_kib"] > 0

    derived = result["derived"]
    assert derived["small_rps_ratio"] is not None
    assert derived["c1_added_p50"]["sidecar"]["vs_direct_ms"] is not None
    hop = derived["per_hop"]["sidecar"]
    assert hop["cpu_c1_over_c50"] is not None
    # The sidecar has threads besides its event loop (the access-log writer).
    assert hop["wakeups_main_per_req_c1"] > 0
    assert hop["wakeups_other_threads_per_req_c1"] is not None

    # gRPC: the sidecar (h2c both sides, as HAProxy) and the direct call are all measured.
    grpc = result["grpc"]
    if _have("h2load"):
        assert grpc["status"] == {"direct": "ok", "haproxy": "ok", "sidecar": "ok"}, grpc
        assert set(summary["grpc"]) == {"direct", "haproxy", "sidecar"}
        assert derived["grpc"]["calls_per_core_ratio"] is not None
    else:
        assert "h2load not installed" in grpc["skipped"]

    resilience = result["resilience"]
    assert set(resilience) == {
        "errors503",
        "dead_endpoint",
        "outage",
        "slow_endpoint",
        "keepalive",
        "lowtraffic",
        "recovery",
        "amplification",
    }
    for name in ("errors503", "dead_endpoint", "outage", "slow_endpoint", "keepalive"):
        scenario = resilience[name]
        assert scenario["repeat"] == 1 and len(scenario["runs"]) == 1, name
        for role in ("sidecar", "haproxy"):
            entry = scenario[role]
            assert entry["requests"] > 0, (name, role)
            assert 0.0 <= entry["success_rate"] <= 1.0, (name, role)
            assert entry["p99_ms"] is not None, (name, role)

    # errors503: both proxies at once, default retries, the same failures by construction.
    errors = resilience["errors503"]
    assert errors["together"] is True
    assert errors["duration_s"] == meta["settings"]["errors503_duration"]
    assert errors["sidecar"]["requests"] == errors["haproxy"]["requests"] > 0
    assert errors["attempts_per_request"] == 3
    run = errors["runs"][0]
    # HAProxy makes every retry it may: it fails exactly on the requests whose attempts
    # all draw a 503, as computed from the seeded hash.
    assert run["roles"]["haproxy"]["failed"] == run["policy_failures"]
    assert run["roles"]["haproxy"]["upstream_attempts"] > errors["haproxy"]["requests"]

    # keep-alive race: the upstream closed idle connections, so the proxies reconnected.
    for role in ("sidecar", "haproxy"):
        up = resilience["keepalive"]["runs"][0]["roles"][role]["upstream"]
        assert up["requests"] == resilience["keepalive"][role]["requests"]
        assert up["idle_closes"] >= 1, up

    low = resilience["lowtraffic"]
    assert low["failure_threshold"] >= 1
    assert len(low["runs"][0]["states"]) == low["failure_threshold"] + 3
    assert low["opened_at_failure_runs"][0] is not None  # it opened at some failure

    rec = resilience["recovery"]
    assert rec["runs"][0]["requests_to_trip"] >= 1
    probe = rec["failfast_probe"]
    assert probe["requests"] > 0
    assert any(code.endswith("circuit_open") for code in probe["codes"])

    amp = resilience["amplification"]
    assert amp["haproxy"]["upstream_attempts"] == 4 * amp["haproxy"]["requests"]
    assert amp["sidecar"]["upstream_attempts"] >= 1

    names = {t["target"] for t in result["targets"]}
    assert any("req/s vs HAProxy" in n for n in names)
    assert "per hop: sidecar CPU per request at c1 vs at c50" in names
    assert "errors503: the breaker never opens" in names
    assert "retry amplification (every attempt 503): upstream attempts per app request" in names
    assert all(isinstance(t["met"], bool) for t in result["targets"])
    assert "| target | value | goal | met |" in out.stdout  # the markdown table was printed
    assert "to both proxies at once" in out.stdout
    assert "### Every run" in out.stdout


def test_fisher_one_sided(report: ModuleType) -> None:
    fisher_one_sided = report.fisher_one_sided
    # The lady tasting tea: 3 of 4 failures on one side, 1 of 4 on the other: 17/70.
    assert fisher_one_sided(1, 3, 3, 1) == pytest.approx(17 / 70, rel=1e-9)
    assert fisher_one_sided(0, 4, 4, 0) == pytest.approx(1 / 70, rel=1e-9)
    assert fisher_one_sided(4, 0, 0, 4) == pytest.approx(1.0)
    # All 3 failures on one side of two equal groups: about 0.5^3.
    assert fisher_one_sided(1997, 3, 2000, 0) == pytest.approx(0.125, rel=0.01)
    # Thousands of failures (the outage) stay finite and tiny.
    assert 0.0 <= fisher_one_sided(500, 3000, 3300, 200) < 1e-6


def _scenario(ok: int, requests: int) -> dict[str, object]:
    return {"requests": requests, "ok": ok, "failed": requests - ok, "success_rate": ok / requests}


def test_resilience_target_notes(report: ModuleType) -> None:
    resilience = {
        "dead_endpoint": {"sidecar": _scenario(1997, 2000), "haproxy": _scenario(1999, 2000)},
        "slow_endpoint": {"sidecar": _scenario(500, 3500), "haproxy": _scenario(3300, 3500)},
    }
    targets = {t["target"]: t for t in report.evaluate_targets({}, {}, resilience)}
    chance = targets["dead_endpoint: success rate vs HAProxy"]
    assert chance["met"] is False  # the note qualifies the verdict, it never changes it
    assert chance["note"].startswith("failed 3/2000 vs 1/2000: difference within chance")
    assert "one-sided Fisher p=0.31" in chance["note"]
    slow = targets["slow_endpoint: success rate vs HAProxy"]
    assert slow["met"] is False
    assert "significant (one-sided Fisher p<1e-6)" in slow["note"]


def test_new_scenario_targets(report: ModuleType) -> None:
    """Each new scenario's target, met and not met, on made-up records."""
    errors = {
        "repeat": 5,
        "sidecar": _scenario(9900, 10000),
        "haproxy": _scenario(9906, 10000),
        "breaker_opened_runs": 1,
        "breaker_opened_total": 2,
        "sidecar_failed_total": 100,
        "haproxy_failed_total": 94,
        "policy_failures_total": 94,
    }
    low = {"failure_threshold": 5, "opened_at_failure_runs": [5, 5, 2]}
    rec = {
        "probe_interval_s": 0.5,
        "accept_to_half_open_s_runs": [0.4, 0.9],
        "call_after_runs": [200, 200],
    }
    amp = {
        "budget_min_per_second": 10.0,
        "sidecar": {
            "requests": 2000,
            "upstream_attempts": 2601,
            "bound": 2600.0,
            "attempts_per_request": 1.3,
        },
        "haproxy": {"requests": 2000, "upstream_attempts": 8000, "attempts_per_request": 4.0},
    }
    keep = {"sidecar": _scenario(20, 20), "haproxy": _scenario(18, 20)}
    res = {
        "errors503": errors,
        "lowtraffic": low,
        "recovery": rec,
        "amplification": amp,
        "keepalive": keep,
    }
    t = {x["target"]: x for x in report.resilience_targets(res)}
    never = t["errors503: the breaker never opens"]
    assert never["met"] is False and never["value"] == "opened in 1 of 5 runs (2 openings)"
    summed = t["errors503: failures summed over the runs vs HAProxy's"]
    assert summed["met"] is False and summed["value"].startswith("100 vs 94")
    errors["sidecar_failed_total"] = 99
    assert report.resilience_targets({"errors503": errors})[1]["met"] is True
    opened = t["low traffic (1 req/s, all failing): breaker opens at the threshold-th failure"]
    assert opened["met"] is False and "5, 5, 2" in opened["value"]
    back = t["recovery with no traffic: upstream accepting -> breaker half_open"]
    assert back["met"] is True and back["goal"].startswith("<= 1 s")
    rec["accept_to_half_open_s_runs"] = [0.4, None]  # one run never half-opened
    assert report.resilience_targets({"recovery": rec})[0]["met"] is False
    amp_t = t["retry amplification (every attempt 503): upstream attempts per app request"]
    assert amp_t["met"] is False  # one attempt over the bound
    assert "HAProxy 4.00" in amp_t["value"]
    assert t["keep-alive race: app-visible errors"]["met"] is True


def test_flaky_upstream_is_seeded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The errors503 upstream's answer depends on (seed, request, attempt) alone, so two
    proxies with the same policy meet the same failures; the share is about right."""
    monkeypatch.syspath_prepend(str(ROOT))
    fails = importlib.import_module("bench.upstream").fails
    draws = [fails(3, n, k, 0.2) for n in range(2000) for k in (1, 2, 3)]
    assert draws == [fails(3, n, k, 0.2) for n in range(2000) for k in (1, 2, 3)]
    assert 0.17 < sum(draws) / len(draws) < 0.23
    assert draws != [fails(4, n, k, 0.2) for n in range(2000) for k in (1, 2, 3)]
    assert all(fails(1, n, 1, 1.0) for n in range(100))


def test_ab_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    ab = importlib.import_module("bench.ab")

    def runs(after_rps: list[float], after_p50: list[float]) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for r, (a_rps, a_p50) in enumerate(zip(after_rps, after_p50, strict=True), 1):
            for cfg, rps, p50 in (("sidecar@base", 5000.0, 0.40), ("sidecar", a_rps, a_p50)):
                out.append(
                    {
                        "phase": "small",
                        "config": cfg,
                        "round": r,
                        "rps": rps,
                        "latency_ms": {"p50": 9.0},
                    }
                )
                out.append(
                    {
                        "phase": "c1",
                        "config": cfg,
                        "round": r,
                        "rps": 1.0,
                        "latency_ms": {"p50": p50},
                    }
                )
            out.append(
                {
                    "phase": "c1",
                    "config": "direct-xcpu",
                    "round": r,
                    "rps": 1.0,
                    "latency_ms": {"p50": 0.10},
                }
            )
        return out

    # 10 % slower in every round, with a steady machine: worse beyond the spread.
    v = ab.verdict(runs([4500.0, 4510.0, 4490.0], [0.43, 0.43, 0.43]))
    assert v["c50_rps"]["median_ratio"] == pytest.approx(0.9)
    assert v["c50_rps"]["no_worse"] is False
    assert v["c1_added_p50"]["reference"] == "direct-xcpu"
    assert v["c1_added_p50"]["median_ratio"] == pytest.approx(1.1)  # 0.33 / 0.30
    assert v["c1_added_p50"]["no_worse"] is False
    # The same median ratio on a run whose rounds swing by a third: within the spread.
    v = ab.verdict(runs([3000.0, 4500.0, 6000.0], [0.31, 0.40, 0.43]))
    assert v["c50_rps"]["median_ratio"] == pytest.approx(0.9)
    assert v["c50_rps"]["no_worse"] is True
    assert v["c1_added_p50"]["no_worse"] is True
    # One round: no spread to judge against.
    assert ab.verdict(runs([4500.0], [0.43]))["c50_rps"]["no_worse"] is None


def test_base_worktree_is_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    """--base checks the revision out in a temporary worktree and removes it again (the
    venv is stubbed: building one is pip's job, not this test's)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    monkeypatch.syspath_prepend(str(ROOT))
    ab = importlib.import_module("bench.ab")
    monkeypatch.setattr(ab, "ensure_venv", lambda pyproject: Path(sys.executable))

    def worktrees() -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "list", "--porcelain"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    before = worktrees()
    tree = ab.BaseTree(ROOT, "HEAD")
    try:
        tree.add()
        assert (tree.path / "sidecar" / "__init__.py").exists()
        assert str(tree.path) in worktrees()
        assert (
            tree.info["sha"]
            == subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    finally:
        tree.remove()
    assert not tree.path.exists()
    assert worktrees() == before
    with pytest.raises(SystemExit, match="rev-parse"):
        ab.BaseTree(ROOT, "no-such-revision-xyz").add()


def test_parse_h2load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    row = importlib.import_module("bench.grpc_row")
    assert row.grpc_frame(b"abc") == b"\x00\x00\x00\x00\x03abc"
    log = tmp_path / "h2load.log"
    log.write_text("".join(f"17961628187{i:05d}\t200\t{1000 + i}\n" for i in range(100)))
    stdout = (
        "finished in 1.00s, 2916.00 req/s, 271.97KB/s\n"
        "requests: 2916 total, 2966 started, 2916 done, 2910 succeeded, 6 failed, "
        "0 errored, 0 timeout\n"
        "status codes: 2910 2xx, 0 3xx, 0 4xx, 6 5xx\n"
    )
    res = row.parse_h2load(stdout, log)
    assert res["requests"] == 2910 and res["rps"] == 2910.0
    assert res["errors"] == {"failed": 6, "errored": 0, "timeout": 0, "status": 6}
    assert res["latency_ms"]["p50"] == pytest.approx(1.050)
    assert res["latency_ms"]["p99"] == pytest.approx(1.099)
    with pytest.raises(RuntimeError, match="no summary"):
        row.parse_h2load("connect failed", log)
