"""Smoke test of the benchmark harness: `python -m bench --smoke` end to end.

Runs every phase for about a second against real wrk, HAProxy and the sidecar, then checks
the JSON's shape and that load went through. It asserts nothing about speed: the numbers
depend on the machine, and the bench reports them instead.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _have(name: str) -> bool:
    return shutil.which(name) is not None or Path(f"/usr/sbin/{name}").exists()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_smoke(tmp_path: Path) -> None:
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

    names = {t["target"] for t in result["targets"]}
    assert any("req/s vs HAProxy" in n for n in names)
    assert all(isinstance(t["met"], bool) for t in result["targets"])
    assert "| target | value | goal | met |" in out.stdout  # the markdown table was printed
