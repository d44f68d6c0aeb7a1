"""The gRPC row: unary calls through the sidecar, through HAProxy (h2c on both sides) and
direct to a real grpcio server, driven by h2load.

h2load (Debian's nghttp2-client) sends gRPC-framed POSTs: `-d` a prebuilt length-prefixed
message, `content-type: application/grpc` and `te: trailers`, 50 concurrent streams over 2
connections, pinned to the load CPU like wrk. Per-call latencies come from its `--log-file`
(one line per call), CPU per call from the proxy's utime+stime, as for wrk.

Before measuring, each target gets one real gRPC call (grpcio's client, the echo checked
byte for byte). A target that fails it is reported as "failed" with the reason and not
measured, and the phase goes on with the others (an A/B base that predates h2c fails its
probe without stopping the run).

The row's target: the sidecar's calls/s per core (1e6 / CPU µs per call) at least 0.10x
HAProxy's, both h2c on both sides in front of the same upstream.
"""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.configs import haproxy_h2c_config, sidecar_grpc_config
from bench.grpc_upstream import PATH
from bench.phases import REPO, Bench, Target
from bench.runner import (
    CLK_TCK,
    core_busy_pct,
    core_times,
    cpu_ticks,
    free_port,
    free_ports,
    log,
    switches_delta,
    thread_switches,
    vm_kib,
    wait_ready,
    which,
)

MESSAGE = bytes(range(32))  # the small message: 32 bytes
CONNECTIONS = 2
STREAMS_PER_CONNECTION = 25  # 50 concurrent streams in all


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: flag 0 (not compressed), 4-byte big-endian length."""
    return struct.pack(">BI", 0, len(message)) + message


def probe(port: int, timeout: float = 5.0) -> str | None:
    """One unary call with grpcio's client; None when it echoed the message, else why not."""
    try:
        import grpc
    except ImportError:
        return "grpcio is not installed (pip install -e '.[dev]')"
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(PATH)  # raw bytes
        try:
            answer = call(MESSAGE, timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            return f"{code}: {details}"
    if answer != MESSAGE:
        return f"echo mismatch: {answer[:40]!r}"
    return None


def parse_h2load(stdout: str, log_file: Path) -> dict[str, Any]:
    """h2load's summary lines, and percentiles from its per-request log."""
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", stdout)
    req = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        stdout,
    )
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", stdout)
    if not (m and req and codes):
        raise RuntimeError(f"h2load printed no summary:\n{stdout[-1500:]}")
    duration = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    lat: list[float] = []
    with open(log_file) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[1].startswith("2"):
                lat.append(int(parts[2]) / 1000.0)  # µs -> ms
    lat.sort()

    def q(p: float) -> float:
        if not lat:
            return 0.0
        return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))], 4)

    done = int(req.group(3))
    return {
        "requests": int(req.group(4)),
        "duration_s": round(duration, 3),
        "bytes": 0,
        "rps": round(int(req.group(4)) / duration, 1) if duration else 0.0,
        "mib_s": 0.0,
        "errors": {
            "failed": int(req.group(5)),
            "errored": int(req.group(6)),
            "timeout": int(req.group(7)),
            "status": done - int(codes.group(1)),
        },
        "latency_ms": {
            "p50": q(50),
            "p90": q(90),
            "p99": q(99),
            "p999": q(99.9),
            "min": lat[0] if lat else 0.0,
            "max": lat[-1] if lat else 0.0,
            "mean": round(sum(lat) / len(lat), 4) if lat else 0.0,
        },
    }


class GrpcRow:
    def __init__(self, bench: Bench) -> None:
        self.b = bench
        self.s = bench.settings
        self.h2load = which("h2load")
        self.body = bench.tmp / "grpc-message.bin"
        self.body.write_bytes(grpc_frame(MESSAGE))

    def measure(self, target: Target, duration: int, round_no: int) -> dict[str, Any]:
        assert self.h2load is not None
        pid = target.proc.pid
        log_file = self.b.tmp / f"h2load-{target.name}-{round_no}.log"
        cmd = [
            self.h2load,
            f"-c{CONNECTIONS}",
            f"-m{STREAMS_PER_CONNECTION}",
            "-t1",
            f"-D{max(1, duration)}",
            "-d",
            str(self.body),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            f"--log-file={log_file}",
            f"http://127.0.0.1:{target.port}{PATH}",
        ]
        if self.b.tools.taskset is not None:
            cmd = [self.b.tools.taskset, "-c", str(self.b.load_cpu), *cmd]
        s0, t0, c0 = thread_switches(pid), cpu_ticks(pid), core_times()
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=duration + 20, check=False
        )
        t1, s1, c1 = cpu_ticks(pid), thread_switches(pid), core_times()
        if out.returncode != 0:
            raise RuntimeError(f"h2load failed ({out.returncode}): {out.stderr[-800:]}")
        res = parse_h2load(out.stdout, log_file)
        log_file.unlink(missing_ok=True)
        cpu_s = (t1 - t0) / CLK_TCK
        n = res["requests"]
        rec: dict[str, Any] = {
            "phase": "grpc",
            "config": target.name,
            "round": round_no,
            "connections": CONNECTIONS,
            "streams": CONNECTIONS * STREAMS_PER_CONNECTION,
            "path": PATH,
            **res,
            "cpu_s": round(cpu_s, 3),
            "cpu_us_per_req": round(cpu_s * 1e6 / n, 2) if n else None,
            "cpu_pct": round(100 * cpu_s / res["duration_s"], 1) if res["duration_s"] else None,
            "cpu_ms_per_mib": None,
            "vmhwm_kib": vm_kib(pid, "VmHWM"),
            "vmrss_kib": vm_kib(pid, "VmRSS"),
            "cores_busy_pct": core_busy_pct(c0, c1),
            "foreign_cpu_pct": 0.0,
            "ctx_switches": switches_delta(pid, s0, s1),
        }
        log(
            f"  grpc       r{round_no} {target.name:<18} {res['rps']:>9.0f} calls/s "
            f"p50 {res['latency_ms']['p50']:.3f} ms p99 {res['latency_ms']['p99']:.3f} ms "
            f"cpu {rec['cpu_us_per_req']} us/call errors {res['errors']}"
        )
        return rec

    def run(self) -> dict[str, Any]:
        s = self.s
        out: dict[str, Any] = {
            "message_bytes": len(MESSAGE),
            "connections": CONNECTIONS,
            "streams": CONNECTIONS * STREAMS_PER_CONNECTION,
            "status": {},
        }
        if self.h2load is None:
            out["skipped"] = "h2load not installed (`bash scripts/install-system-deps.sh bench`)"
            log(f"phase grpc: skipped: {out['skipped']}")
            return out
        log(f"phase grpc: unary, {out['streams']} streams, {s.grpc_rounds} x {s.grpc_duration}s")
        port = free_port()
        server = self.b.procs.start(
            "grpc-upstream",
            [sys.executable, "-m", "bench.grpc_upstream", "--port", str(port)],
            cpu=self.b.load_cpu,
            log_path=self.b.tmp / "grpc-upstream.log",
            cwd=REPO,
        )
        started: list[Target] = []
        try:
            wait_ready(server, port)
            direct = Target("direct", port, server, self.b.load_cpu)
            targets: list[Target] = []
            makers: tuple[tuple[str, Callable[[], Target]], ...] = (
                ("direct", lambda: direct),
                ("haproxy", lambda: self._haproxy(port)),
                ("sidecar", lambda: self._sidecar(port)),
            )
            for name, make in makers:
                try:
                    target = make()
                except RuntimeError as exc:  # the process did not start: say why
                    reason = _first_line(exc).replace(f"{self.b.tmp}/", "")
                    out["status"][name] = f"failed: {reason}"
                    log(f"  grpc: {name} {out['status'][name]}")
                    continue
                if target is not direct:
                    started.append(target)
                why = probe(target.port)
                if why is None:
                    out["status"][target.name] = "ok"
                    targets.append(target)
                else:
                    out["status"][target.name] = f"failed: {why}"
                    log(f"  grpc: {target.name} {out['status'][target.name]}")
            if s.warmup > 0:
                for t in targets:
                    self.measure(t, s.warmup, 0)
            for r in range(1, s.grpc_rounds + 1):
                shift = (r - 1) % max(1, len(targets))
                for t in targets[shift:] + targets[:shift]:
                    self.b.runs.append(self.measure(t, s.grpc_duration, r))
        finally:
            for t in started:
                self.b.procs.stop(t.proc)
            self.b.procs.stop(server)
        return out

    def _haproxy(self, port: int) -> Target:
        listen = free_port()
        cfg = haproxy_h2c_config(self.b.tmp / "haproxy-grpc.cfg", listen, f"127.0.0.1:{port}")
        proc = self.b.procs.start(
            "haproxy-grpc",
            [self.b.tools.haproxy, "-f", str(cfg), "-db"],
            cpu=self.b.proxy_cpu,
            log_path=self.b.tmp / "haproxy-grpc.log",
        )
        wait_ready(proc, listen)
        return Target("haproxy", listen, proc, self.b.load_cpu)

    def _sidecar(self, port: int) -> Target:
        listen, admin = free_ports(2)
        cfg = sidecar_grpc_config(
            self.b.tmp / "sidecar-grpc.yaml", f"127.0.0.1:{port}", listen, admin
        )
        target = self.b.run_sidecar("sidecar-grpc", cfg, listen, admin)
        target.name = "sidecar"
        return target


def _first_line(exc: Exception) -> str:
    """The gist of a start-up failure: the last non-empty line of the process's log."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else type(exc).__name__
