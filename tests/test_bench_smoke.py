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
        "small": {"direct", "haproxy", "sidecar"},
        "c1": {"direct", "direct-xcpu", "haproxy", "sidecar"},
        "body16k": {"direct", "haproxy", "sidecar"},
        "body1m": {"direct", "haproxy", "sidecar"},
        "scaling": {"sidecar-1r-1ep", "sidecar-1000routes", "sidecar-100ep"},
    }
    for phase, configs in expected.items():
        assert set(summary[phase]) == configs, phase
        for config, entry in summary[phase].items():
            assert entry["rps"]["median"] > 0, (phase, config)
            for key in ("p50", "p90", "p99", "cpu_us_per_req"):
                assert entry[key] is not None, (phase, config, key)
            assert entry["vmhwm_mib"] > 0, (phase, config)

    for run in result["runs"]:
        assert run["requests"] > 0, {k: run[k] for k in ("phase", "config", "path", "errors")}
        assert run["errors"]["status"] == 0, run  # every answer under load was a 2xx

    for body in ("1m", "100m"):
        big = result["bigbody"][body]
        assert big["requests"] > 0
        assert big["vmhwm_kib"] >= big["vmhwm_idle_kib"] > 0

    derived = result["derived"]
    assert derived["small_rps_ratio"] is not None
    assert derived["c1_added_p50"]["sidecar"]["vs_direct_ms"] is not None

    resilience = result["resilience"]
    assert set(resilience) == {"errors503", "dead_endpoint", "outage", "slow_endpoint"}
    for name, scenario in resilience.items():
        for role in ("sidecar", "haproxy"):
            entry = scenario[role]
            assert entry["requests"] > 0, (name, role)
            assert 0.0 <= entry["success_rate"] <= 1.0, (name, role)
            assert entry["p99_ms"] is not None, (name, role)
    probe = resilience["outage"]["timeline"]["probe"]
    assert probe["requests"] > 0
    assert any(code.endswith("circuit_open") for code in probe["codes"])

    # errors503: both proxies driven together, for twice the scenario duration.
    errors = resilience["errors503"]
    assert errors["together"] is True
    assert errors["duration_s"] == 2 * meta["settings"]["scenario_duration"]
    assert errors["sidecar"]["requests"] == errors["haproxy"]["requests"] > 0
    assert errors["attempts_per_request"] == 4
    assert errors["expected_failed_per_proxy"] > 0
    assert "expected if attempts were independent" in errors["notes"]
    # outage: smoke's breaker reset_timeout is already 2 s, so the variant would duplicate it.
    assert meta["settings"]["breaker_reset"] == "2s"
    assert report.OUTAGE_VARIANT_ROLE not in resilience["outage"]

    names = {t["target"] for t in result["targets"]}
    assert any("req/s vs HAProxy" in n for n in names)
    assert all(isinstance(t["met"], bool) for t in result["targets"])
    res_targets = [t for t in result["targets"] if t["target"].startswith("resilience ")]
    assert len(res_targets) == len(resilience)
    for t in res_targets:  # a target not met says whether the gap is more than chance
        assert ("one-sided Fisher p" in t["note"]) is not t["met"], t
    assert "| target | value | goal | met |" in out.stdout  # the markdown table was printed
    assert "to each proxy at once" in out.stdout


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
    return {"requests": requests, "ok": ok, "success_rate": ok / requests}


def test_resilience_target_notes(report: ModuleType) -> None:
    resilience = {
        "errors503": {"sidecar": _scenario(1997, 2000), "haproxy": _scenario(1999, 2000)},
        "outage": {"sidecar": _scenario(500, 3500), "haproxy": _scenario(3300, 3500)},
        "dead_endpoint": {"sidecar": _scenario(1000, 1000), "haproxy": _scenario(1000, 1000)},
    }
    targets = {t["target"]: t for t in report.evaluate_targets({}, {}, resilience)}
    chance = targets["resilience errors503: success rate vs HAProxy"]
    assert chance["met"] is False  # the note qualifies the verdict, it never changes it
    assert chance["note"].startswith("failed 3/2000 vs 1/2000: difference within chance")
    assert "one-sided Fisher p=0.31" in chance["note"]
    outage = targets["resilience outage: success rate vs HAProxy"]
    assert outage["met"] is False
    assert "significant (one-sided Fisher p<1e-6)" in outage["note"]
    met = targets["resilience dead_endpoint: success rate vs HAProxy"]
    assert met["met"] is True
    assert met["note"] == ""
