"""The run: settings, the processes under test, and the throughput phases.

Layout (as in perf/BASELINES.md): wrk, the upstream, the load driver and this process on
CPU 0; the proxy under test on CPU 1. Every phase runs its configs interleaved,
each round starting one config later (A B C, B C A, C A B, ...), and the report takes
medians with min-max.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import wrk
from bench.configs import SCALING_PATH, SCALING_ROUTES, SidecarSpec, haproxy_config, sidecar_config
from bench.runner import (
    CLK_TCK,
    Proc,
    Procs,
    core_busy_pct,
    core_times,
    cpu_ticks,
    expect_200,
    foreign_cpu_pct,
    foreign_ticks,
    free_port,
    free_ports,
    log,
    vm_kib,
    wait_ready,
)
from bench.upstream import make_www, nginx_config

REPO = Path(__file__).resolve().parent.parent
MIB = 1048576

FOREIGN_LIMIT = 10.0  # % of a core used by other processes that makes a run noisy
PHASES = ("small", "c1", "bodies", "scaling", "bigbody", "resilience")
SCENARIOS = ("errors503", "dead_endpoint", "outage", "slow_endpoint")


@dataclass
class Settings:
    """Durations (s) and rounds per phase; `full`, `quick` and `smoke` presets."""

    mode: str = "full"
    small_duration: int = 5
    small_rounds: int = 5  # the headline ratios: more rounds, steadier medians
    c1_duration: int = 3
    c1_rounds: int = 5
    body_duration: int = 3
    body_rounds: int = 5  # large loopback transfers are bimodal (BASELINES.md)
    scaling_duration: int = 3
    scaling_rounds: int = 5  # judged on per-round ratios: more, shorter rounds
    bigbody_duration: int = 3
    warmup: int = 1
    scenario_duration: float = 5.0
    scenario_rate: float = 200.0
    outage_rate: float = 100.0
    outage_up: float = 2.0
    outage_down: float = 5.0
    breaker_reset: str = "30s"  # the sidecar's default; smoke shortens it (recorded)
    phases: tuple[str, ...] = PHASES
    scenarios: tuple[str, ...] = SCENARIOS

    @classmethod
    def preset(cls, mode: str) -> Settings:
        if mode == "quick":
            return cls(
                mode="quick",
                small_duration=2,
                small_rounds=2,
                c1_duration=2,
                c1_rounds=2,
                body_duration=2,
                body_rounds=2,
                scaling_duration=2,
                scaling_rounds=2,
                bigbody_duration=2,
                scenario_duration=3.0,
            )
        if mode == "smoke":
            return cls(
                mode="smoke",
                small_duration=1,
                small_rounds=1,
                c1_duration=1,
                c1_rounds=1,
                body_duration=1,
                body_rounds=1,
                scaling_duration=1,
                scaling_rounds=1,
                # Ten 100 MiB transfers share the loopback: at ~1 GiB/s none finishes
                # inside one second, and a run with no whole response proves nothing.
                bigbody_duration=3,
                warmup=0,
                scenario_duration=1.0,
                scenario_rate=100.0,
                outage_up=0.5,
                outage_down=1.5,
                breaker_reset="2s",
            )
        return cls()

    def override(self, duration: int | None, rounds: int | None) -> None:
        if duration is not None:
            for key in ("small", "c1", "body", "scaling", "bigbody"):
                setattr(self, f"{key}_duration", duration)
            self.scenario_duration = float(duration)
        if rounds is not None:
            for key in ("small", "c1", "body", "scaling"):
                setattr(self, f"{key}_rounds", rounds)


@dataclass
class Target:
    """One thing wrk is pointed at: a proxy (or the upstream itself, for `direct`)."""

    name: str
    port: int
    proc: Proc  # the process whose CPU and memory are measured
    wrk_cpu: int | None
    path_prefix: str = ""
    admin_port: int | None = None  # the sidecar's admin listener (/metrics)


@dataclass
class Tools:
    wrk: str
    haproxy: str
    taskset: str | None
    nginx: str | None


@dataclass
class Bench:
    settings: Settings
    tools: Tools
    tmp: Path
    procs: Procs
    load_cpu: int
    proxy_cpu: int
    runs: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    upstream_kind: str = "nginx"
    report_lua: Path = Path()
    status_lua: Path = Path()

    def __post_init__(self) -> None:
        self.report_lua, self.status_lua = wrk.write_scripts(self.tmp)
        self.www = self.tmp / "www"

    # ------------------------------------------------------------------ processes

    def start_upstream(self, extra_ports: int) -> tuple[Proc, int, list[int]]:
        """The origin for the throughput phases: nginx, or the raw server without nginx."""
        files = ["16k.bin", "1m.bin"]
        if "bigbody" in self.settings.phases:
            files.append("100m.bin")
        make_www(self.www, files)
        ports = free_ports(1 + extra_ports)
        if self.tools.nginx is not None:
            self.upstream_kind = "nginx"
            conf = nginx_config(self.tmp, self.www, ports)
            cmd = [self.tools.nginx, "-p", str(self.tmp), "-c", str(conf)]
            cmd += ["-e", str(self.tmp / "upstream-nginx-error.log")]
            proc = self.procs.start(
                "upstream-nginx", cmd, cpu=self.load_cpu, log_path=self.tmp / "upstream.log"
            )
        else:
            self.upstream_kind = "python-raw"
            proc = self.start_python_upstream([str(p) for p in ports], "upstream-raw")
        for p in ports:
            wait_ready(proc, p)
        return proc, ports[0], ports[1:]

    def start_python_upstream(self, listens: list[str], name: str) -> Proc:
        cmd = [sys.executable, "-m", "bench.upstream", "--www", str(self.www)]
        for spec in listens:
            cmd += ["--listen", spec]
        return self.procs.start(
            name, cmd, cpu=self.load_cpu, log_path=self.tmp / f"{name}.log", cwd=REPO
        )

    def start_haproxy(self, name: str, endpoints: list[str], server_timeout: str = "2s") -> Target:
        port = free_port()
        cfg = haproxy_config(self.tmp / f"{name}.cfg", port, endpoints, server_timeout)
        proc = self.procs.start(
            name,
            [self.tools.haproxy, "-f", str(cfg), "-db"],
            cpu=self.proxy_cpu,
            log_path=self.tmp / f"{name}.log",
        )
        wait_ready(proc, port)
        return Target(name, port, proc, self.load_cpu)

    def start_sidecar(self, name: str, spec: SidecarSpec, path_prefix: str = "") -> Target:
        """`sidecar run -c CONFIG`, pinned to the proxy CPU, ready once /readyz says 200."""
        listen, admin = free_ports(2)
        cfg = sidecar_config(self.tmp / f"{name}.yaml", spec, listen, admin)
        # The access log (JSON on stdout) stays on and goes to /dev/null; stderr to a file.
        proc = self.procs.start(
            name,
            [sys.executable, "-m", "sidecar", "run", "-c", str(cfg)],
            cpu=self.proxy_cpu,
            log_path=self.tmp / f"{name}.log",
            cwd=REPO,
        )
        wait_ready(proc, listen, http_path="/readyz", http_port=admin, timeout=30)
        return Target(name, listen, proc, self.load_cpu, path_prefix, admin)

    # ------------------------------------------------------------------ measuring

    def measure(
        self,
        phase: str,
        target: Target,
        path: str,
        connections: int,
        duration: int,
        round_no: int,
        *,
        record: bool = True,
    ) -> dict[str, Any]:
        """One wrk run at `target`, with the process's CPU and memory from /proc; the
        caller keeps the record (`record=False`: a warm-up, not even logged)."""
        pid = target.proc.pid
        if not target.proc.alive():
            raise RuntimeError(f"{target.name} died:\n{target.proc.log_tail()}")
        f0 = foreign_ticks()
        t0 = cpu_ticks(pid)
        c0 = core_times()
        w0 = time.monotonic()
        res = wrk.run(
            self.tools.wrk,
            f"http://127.0.0.1:{target.port}{target.path_prefix}{path}",
            connections=connections,
            duration=duration,
            script=self.report_lua,
            taskset=self.tools.taskset,
            cpu=target.wrk_cpu,
        )
        t1 = cpu_ticks(pid)
        c1 = core_times()
        foreign = foreign_cpu_pct(f0, foreign_ticks(), time.monotonic() - w0)
        cpu_s = (t1 - t0) / CLK_TCK
        rec: dict[str, Any] = {
            "phase": phase,
            "config": target.name,
            "round": round_no,
            "connections": connections,
            "path": path,
            **res.as_dict(),
            "cpu_s": round(cpu_s, 3),
            "cpu_us_per_req": round(cpu_s * 1e6 / res.requests, 2) if res.requests else None,
            "cpu_pct": round(100 * cpu_s / res.duration_s, 1) if res.duration_s else None,
            "cpu_ms_per_mib": round(cpu_s * 1000 / (res.bytes / MIB), 3) if res.bytes else None,
            "vmhwm_kib": vm_kib(pid, "VmHWM"),
            "vmrss_kib": vm_kib(pid, "VmRSS"),
            "cores_busy_pct": core_busy_pct(c0, c1),
            "foreign_cpu_pct": foreign,
        }
        bad = sum(res.errors.values())
        if bad:
            log(f"  ! {target.name} {phase}: errors {res.errors}")
        if record:
            log(
                f"  {phase:<10} r{round_no} {target.name:<18} {res.rps:>9.0f} req/s "
                f"{res.mib_s:>8.1f} MiB/s p50 {res.latency_ms['p50']:.3f} ms "
                f"p99 {res.latency_ms['p99']:.3f} ms cpu {rec['cpu_us_per_req']} us/req"
                + (f"  [other processes: {foreign:.0f} % CPU]" if foreign >= 1 else "")
            )
        return rec

    def interleaved(
        self,
        phase: str,
        targets: list[Target],
        path: str,
        connections: int,
        duration: int,
        rounds: int,
    ) -> None:
        if self.settings.warmup > 0:
            for t in targets:
                self.measure(phase, t, path, connections, self.settings.warmup, 0, record=False)
        retries_left = rounds  # bounded: at most one extra run per round on average
        for r in range(1, rounds + 1):
            # Each round starts one config later (A B C, B C A, C A B, ...): a config that
            # always ran first, say, would carry whatever that slot does to it.
            shift = (r - 1) % len(targets)
            for t in targets[shift:] + targets[:shift]:
                rec = self.measure(phase, t, path, connections, duration, r)
                if rec["foreign_cpu_pct"] > FOREIGN_LIMIT and retries_left > 0:
                    # Another job on the machine took CPU during this run: run it again,
                    # once, and keep the quieter of the two.
                    retries_left -= 1
                    log(f"  ! other processes used {rec['foreign_cpu_pct']} % CPU: running again")
                    again = self.measure(phase, t, path, connections, duration, r)
                    again["rerun"] = True
                    if again["foreign_cpu_pct"] < rec["foreign_cpu_pct"]:
                        rec = again
                self.runs.append(rec)

    # ------------------------------------------------------------------ phases

    def throughput_phases(self) -> None:
        s = self.settings
        wanted = set(s.phases)
        need_main = wanted & {"small", "c1", "bodies"}
        if not (need_main or wanted & {"scaling", "bigbody"}):
            return
        extra = 100 if "scaling" in wanted else 0
        log(f"starting the upstream ({'nginx' if self.tools.nginx else 'raw asyncio'})")
        upstream, up_port, extra_ports = self.start_upstream(extra)
        self.extra["upstream_ports"] = 1 + len(extra_ports)
        origin = f"127.0.0.1:{up_port}"
        direct = Target("direct", up_port, upstream, self.load_cpu)
        if need_main:
            haproxy = self.start_haproxy("haproxy", [origin])
            sidecar = self.start_sidecar("sidecar", SidecarSpec((origin,)))
            main = [direct, haproxy, sidecar]
            for t in main:
                expect_200(t.name, t.port)
            if "small" in wanted:
                log(f"phase small: 6 B body, -c50, {s.small_rounds} x {s.small_duration}s")
                self.interleaved("small", main, "/", 50, s.small_duration, s.small_rounds)
            if "c1" in wanted:
                log(f"phase c1: 6 B body, -c1, {s.c1_rounds} x {s.c1_duration}s")
                xcpu = Target("direct-xcpu", up_port, upstream, self.proxy_cpu)
                self.interleaved(
                    "c1", [direct, xcpu, haproxy, sidecar], "/", 1, s.c1_duration, s.c1_rounds
                )
            if "bodies" in wanted:
                for body in ("16k", "1m"):
                    log(f"phase body{body}: -c10, {s.body_rounds} x {s.body_duration}s")
                    self.interleaved(
                        f"body{body}",
                        main,
                        f"/static/{body}.bin",
                        10,
                        s.body_duration,
                        s.body_rounds,
                    )
            self.procs.stop(haproxy.proc)
            self.procs.stop(sidecar.proc)
        if "scaling" in wanted:
            self.scaling(origin, [f"127.0.0.1:{p}" for p in extra_ports])
        if "bigbody" in wanted:
            self.bigbody(origin)
        self.procs.stop(upstream)

    def scaling(self, origin: str, many: list[str]) -> None:
        s = self.settings
        log(
            f"phase scaling: 1 vs {SCALING_ROUTES} routes, 1 vs {len(many)} endpoints, -c50, "
            f"{s.scaling_rounds} x {s.scaling_duration}s"
        )
        base = self.start_sidecar("sidecar-1r-1ep", SidecarSpec((origin,), routes=1))
        routes = self.start_sidecar(
            f"sidecar-{SCALING_ROUTES}routes", SidecarSpec((origin,), routes=SCALING_ROUTES)
        )
        eps = self.start_sidecar(f"sidecar-{len(many)}ep", SidecarSpec(tuple(many), routes=1))
        targets = [base, routes, eps]
        for t in targets:
            expect_200(t.name, t.port, SCALING_PATH)
        self.interleaved("scaling", targets, SCALING_PATH, 50, s.scaling_duration, s.scaling_rounds)
        for t in targets:
            self.procs.stop(t.proc)

    def bigbody(self, origin: str) -> None:
        """A fresh sidecar per body size, so VmHWM is that size's peak alone."""
        s = self.settings
        log(f"phase bigbody: 1 MiB vs 100 MiB through the sidecar, -c10, {s.bigbody_duration}s")
        out: dict[str, Any] = {}
        for body in ("1m", "100m"):
            target = self.start_sidecar(f"sidecar-bigbody-{body}", SidecarSpec((origin,)))
            time.sleep(0.3)
            idle = vm_kib(target.proc.pid, "VmHWM")
            rec = self.measure("bigbody", target, f"/static/{body}.bin", 10, s.bigbody_duration, 1)
            rec["vmhwm_idle_kib"] = idle
            self.runs.append(rec)
            out[body] = rec
            self.procs.stop(target.proc)
        self.extra["bigbody"] = out


def settings_dict(s: Settings) -> dict[str, Any]:
    d = asdict(s)
    d["phases"] = list(s.phases)
    d["scenarios"] = list(s.scenarios)
    return d
