"""The run: settings, the processes under test, and the throughput phases.

Layout: wrk, the upstream, the load driver and this process on
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
from bench.ab import BASE_CONFIG, BaseTree
from bench.configs import (
    SCALING_PATH,
    SCALING_ROUTES,
    HaproxySpec,
    SidecarSpec,
    haproxy_config,
    sidecar_config,
)
from bench.floor import FLOOR_CONFIG
from bench.native import env_with, loads_from
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
    switches_delta,
    thread_switches,
    vm_kib,
    wait_ready,
)
from bench.upstream import make_www, nginx_config

REPO = Path(__file__).resolve().parent.parent
MIB = 1048576

FOREIGN_LIMIT = 10.0  # % of a core used by other processes that makes a run noisy
PHASES = ("small", "c1", "bodies", "scaling", "bigbody", "grpc", "resilience")
SCENARIOS = (
    "errors503",
    "dead_endpoint",
    "outage",
    "slow_endpoint",
    "keepalive",
    "lowtraffic",
    "recovery",
    "amplification",
)


@dataclass
class Settings:
    """Durations (s) and rounds per phase; `full`, `quick` and `smoke` presets."""

    mode: str = "full"
    small_duration: int = 5
    small_rounds: int = 5  # the headline ratios: more rounds, steadier medians
    c1_duration: int = 3
    c1_rounds: int = 5
    body_duration: int = 3
    body_rounds: int = 5  # large loopback transfers are bimodal
    scaling_duration: int = 3
    scaling_rounds: int = 5  # judged on per-round ratios: more, shorter rounds
    bigbody_duration: int = 3
    grpc_duration: int = 3
    grpc_rounds: int = 3
    warmup: int = 1
    repeat: int = 5  # every scenario runs this many times; each run is reported
    scenario_duration: float = 5.0  # dead_endpoint, slow_endpoint (per proxy)
    scenario_rate: float = 200.0
    errors503_duration: float = 12.0  # x 5 repeats = the contract's 60 s
    outage_rate: float = 100.0
    outage_up: float = 2.0
    outage_down: float = 5.0
    # "After recovery" runs from 1 s after the upstream is back, for at least 10 s; the
    # outage also lasts until the breaker's open period has surely ended (its reset_timeout,
    # read from the running sidecar), capped by outage_after_max.
    outage_after_min: float = 11.0
    outage_after_max: float = 40.0
    keepalive_duration: float = 20.0
    lowtraffic_gap: float = 1.0  # 1 request/s
    amplification_duration: float = 10.0
    recovery_idle: float = 1.0  # no traffic between the trip and the upstream's return
    recovery_wait_max: float = 12.0  # polling /admin/state for half_open, at most
    reruns: bool = True  # re-run a throughput run once when other processes took CPU
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
                grpc_duration=2,
                grpc_rounds=2,
                repeat=1,
                scenario_duration=3.0,
                errors503_duration=6.0,
                outage_after_min=4.0,
                outage_after_max=12.0,
                keepalive_duration=8.0,
                amplification_duration=5.0,
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
                grpc_duration=1,
                grpc_rounds=1,
                warmup=0,
                repeat=1,
                scenario_duration=1.0,
                scenario_rate=100.0,
                errors503_duration=2.0,
                outage_up=0.5,
                outage_down=1.5,
                outage_after_min=2.0,
                outage_after_max=2.0,
                keepalive_duration=2.5,
                lowtraffic_gap=0.2,
                amplification_duration=1.0,
                recovery_idle=0.3,
                recovery_wait_max=2.0,
                reruns=False,
            )
        return cls()

    def override(self, duration: int | None, rounds: int | None, repeat: int | None) -> None:
        if duration is not None:
            for key in ("small", "c1", "body", "scaling", "bigbody", "grpc"):
                setattr(self, f"{key}_duration", duration)
            self.scenario_duration = float(duration)
            self.errors503_duration = 2.0 * duration
            self.amplification_duration = float(duration)
        if rounds is not None:
            for key in ("small", "c1", "body", "scaling", "grpc"):
                setattr(self, f"{key}_rounds", rounds)
        if repeat is not None:
            self.repeat = max(1, repeat)


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
    base: BaseTree | None = None  # --base: the sidecar at that revision, beside this one
    native: Path | None = None  # this tree's compiled copy (bench/native.py), when current
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

    def start_haproxy(self, name: str, spec: HaproxySpec) -> Target:
        port = free_port()
        cfg = haproxy_config(self.tmp / f"{name}.cfg", port, spec)
        proc = self.procs.start(
            name,
            [self.tools.haproxy, "-f", str(cfg), "-db"],
            cpu=self.proxy_cpu,
            log_path=self.tmp / f"{name}.log",
        )
        wait_ready(proc, port)
        return Target(name, port, proc, self.load_cpu)

    def start_floor(self, origin: str) -> Target:
        """`python -m bench.floor`: aiohttp's server and the leanest hop, on the proxy CPU."""
        port = free_port()
        proc = self.procs.start(
            FLOOR_CONFIG,
            [sys.executable, "-m", "bench.floor", "--port", str(port), "--upstream", origin],
            cpu=self.proxy_cpu,
            log_path=self.tmp / f"{FLOOR_CONFIG}.log",
            cwd=REPO,
        )
        wait_ready(proc, port)
        return Target(FLOOR_CONFIG, port, proc, self.load_cpu)

    def start_sidecar(
        self, name: str, spec: SidecarSpec, path_prefix: str = "", *, base: bool = False
    ) -> Target:
        """`sidecar run -c CONFIG`, pinned to the proxy CPU, ready once /readyz says 200;
        `base`: the --base revision's sidecar, from its worktree and venv."""
        listen, admin = free_ports(2)
        cfg = sidecar_config(self.tmp / f"{name}.yaml", spec, listen, admin)
        return self.run_sidecar(name, cfg, listen, admin, path_prefix, base=base)

    def run_sidecar(
        self,
        name: str,
        cfg: Path,
        listen: int,
        admin: int,
        path_prefix: str = "",
        *,
        base: bool = False,
    ) -> Target:
        # `python -m` puts its working folder first on the path: the compiled copy's own
        # folder, so that it is what is imported, not the source tree.
        python, cwd, env = sys.executable, self.native or REPO, env_with(self.native)
        if base:
            assert self.base is not None
            python, cwd, env = (
                str(self.base.python),
                self.base.native or self.base.path,
                self.base.env(),
            )
        # The access log (JSON on stdout) stays on and goes to /dev/null; stderr to a file.
        proc = self.procs.start(
            name,
            [python, "-m", "sidecar", "run", "-c", str(cfg)],
            cpu=self.proxy_cpu,
            log_path=self.tmp / f"{name.replace('@', '-')}.log",
            cwd=cwd,
            env=env,
        )
        wait_ready(proc, listen, http_path="/readyz", http_port=admin, timeout=30)
        native = self.base.native if base and self.base is not None else self.native
        if native is not None and not loads_from(proc.pid, native):
            raise RuntimeError(f"{name} did not load the compiled modules of {native}")
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
        s0 = thread_switches(pid)
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
        s1 = thread_switches(pid)
        c1 = core_times()
        foreign = foreign_cpu_pct(f0, foreign_ticks(), time.monotonic() - w0)
        cpu_s = (t1 - t0) / CLK_TCK
        switches = switches_delta(pid, s0, s1)
        total_sw = int(str(switches["total"]))
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
            "ctx_switches": switches,
            "wakeups_per_req": round(total_sw / res.requests, 3) if res.requests else None,
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
                noisy = rec["foreign_cpu_pct"] > FOREIGN_LIMIT
                if noisy and self.settings.reruns and retries_left > 0:
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
            haproxy = self.start_haproxy("haproxy", HaproxySpec((origin,)))
            sidecar = self.start_sidecar("sidecar", SidecarSpec((origin,)))
            main = [direct, haproxy, sidecar]
            # --base: the base revision's sidecar joins the small-body c50 and c1 rotations.
            ab: list[Target] = []
            if self.base is not None:
                ab = [self.start_sidecar(BASE_CONFIG, SidecarSpec((origin,)), base=True)]
            # The yardstick: what the sidecar's server costs with the cheapest hop behind it.
            floor = [self.start_floor(origin)]
            for t in main + ab + floor:
                expect_200(t.name, t.port)
            if "small" in wanted:
                log(f"phase small: 6 B body, -c50, {s.small_rounds} x {s.small_duration}s")
                self.interleaved(
                    "small", main + ab + floor, "/", 50, s.small_duration, s.small_rounds
                )
            if "c1" in wanted:
                log(f"phase c1: 6 B body, -c1, {s.c1_rounds} x {s.c1_duration}s")
                xcpu = Target("direct-xcpu", up_port, upstream, self.proxy_cpu)
                self.interleaved(
                    "c1",
                    [direct, xcpu, haproxy, sidecar, *ab, *floor],
                    "/",
                    1,
                    s.c1_duration,
                    s.c1_rounds,
                )
            for t in ab + floor:
                self.procs.stop(t.proc)
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


def seconds(text: str | float | int) -> float:
    """A duration as the sidecar's config writes it (`500ms`, `5s`, `1m`), or a number."""
    if isinstance(text, int | float):
        return float(text)
    text = text.strip()
    if text.endswith("ms"):
        return float(text[:-2]) / 1000
    if text.endswith("s"):
        return float(text[:-1])
    if text.endswith("m"):
        return float(text[:-1]) * 60
    return float(text)


def settings_dict(s: Settings) -> dict[str, Any]:
    d = asdict(s)
    d["phases"] = list(s.phases)
    d["scenarios"] = list(s.scenarios)
    return d
