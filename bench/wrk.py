"""wrk: invocation, the lua `done` script that prints exact percentiles as JSON, and parsing."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARK = "BENCHJSON "

# Exact percentiles from wrk's own histogram (µs), like the baseline's report.lua.
REPORT_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50":%.1f,"p90":%.1f,"p99":%.1f,"p999":%.1f,"min":%.1f,"max":%.1f,"mean":%.2f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.min, latency.max, latency.mean))
end
"""

# Same, plus a count per status (and x-sidecar-error reason) across all threads.
STATUS_LUA = r"""
local threads = {}
setup = function(thread) table.insert(threads, thread) end
init = function(args) counts = {} end
response = function(status, headers, body)
  local key = tostring(status)
  for k, v in pairs(headers) do
    if string.lower(k) == "x-sidecar-error" then key = key .. ":" .. v end
  end
  counts[key] = (counts[key] or 0) + 1
end
done = function(summary, latency, requests)
  local all = {}
  for _, t in ipairs(threads) do
    local c = t:get("counts")
    if c then for k, v in pairs(c) do all[k] = (all[k] or 0) + v end end
  end
  local parts = {}
  for k, v in pairs(all) do table.insert(parts, string.format('"%s":%d', k, v)) end
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50":%.1f,"p90":%.1f,"p99":%.1f,"p999":%.1f,"min":%.1f,"max":%.1f,"mean":%.2f,' ..
    '"codes":{%s}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.min, latency.max, latency.mean,
    table.concat(parts, ",")))
end
"""


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    bytes: int
    errors: dict[str, int]
    latency_ms: dict[str, float]  # p50 p90 p99 p999 min max mean
    codes: dict[str, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def mib_s(self) -> float:
        return self.bytes / self.duration_s / 1048576 if self.duration_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "duration_s": round(self.duration_s, 3),
            "bytes": self.bytes,
            "rps": round(self.rps, 1),
            "mib_s": round(self.mib_s, 1),
            "errors": self.errors,
            "latency_ms": self.latency_ms,
            **({"codes": self.codes} if self.codes else {}),
        }


def write_scripts(folder: Path) -> tuple[Path, Path]:
    report = folder / "report.lua"
    report.write_text(REPORT_LUA)
    status = folder / "status.lua"
    status.write_text(STATUS_LUA)
    return report, status


def parse(stdout: str) -> WrkResult:
    for line in stdout.splitlines():
        if line.startswith(MARK):
            data = json.loads(line[len(MARK) :])
            break
    else:
        raise RuntimeError(f"wrk printed no result line:\n{stdout[-1500:]}")
    lat = {k: round(float(data[k]) / 1000.0, 4) for k in ("p50", "p90", "p99", "p999", "min")}
    lat["max"] = round(float(data["max"]) / 1000.0, 3)
    lat["mean"] = round(float(data["mean"]) / 1000.0, 4)
    return WrkResult(
        requests=int(data["requests"]),
        duration_s=int(data["duration_us"]) / 1e6,
        bytes=int(data["bytes"]),
        errors={k: int(data[k]) for k in ("connect", "read", "write", "status", "timeout")},
        latency_ms=lat,
        codes={str(k): int(v) for k, v in data.get("codes", {}).items()},
    )


def run(
    wrk: str,
    url: str,
    *,
    connections: int,
    duration: int,
    script: Path,
    taskset: str | None,
    cpu: int | None,
    timeout_s: int = 5,
    headers: dict[str, str] | None = None,
) -> WrkResult:
    """One bounded wrk run (-t1), pinned to `cpu`; raises if wrk fails or overruns."""
    cmd = [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, duration)}s",
        f"--timeout={timeout_s}s",
        "--latency",
        "-s",
        str(script),
    ]
    for k, v in (headers or {}).items():
        cmd += ["-H", f"{k}: {v}"]
    cmd.append(url)
    if taskset is not None and cpu is not None:
        cmd = [taskset, "-c", str(cpu), *cmd]
    # subprocess.run kills wrk (by its PID) if it overruns the bound.
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration + timeout_s + 15, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr[-1500:]}")
    return parse(out.stdout)
