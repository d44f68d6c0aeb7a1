"""Processes, CPU pinning and /proc sampling for the benchmark.

Every process the bench starts goes through `Procs.start`, which records its PID; `Procs.stop_all`
(called from a `finally`, and from SIGTERM/SIGINT handlers) ends each of them by PID: SIGTERM,
a short wait, then SIGKILL. Nothing is ever killed by name.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

CLK_TCK = os.sysconf("SC_CLK_TCK")
LOAD_CPU = 0  # wrk, the upstream, the load driver and this orchestrator
PROXY_CPU = 1  # the proxy under test


def log(msg: str) -> None:
    """Progress on stderr, with a wall-clock stamp."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ncpu() -> int:
    return os.cpu_count() or 1


def cpus() -> tuple[int, int]:
    """(load CPU, proxy CPU): 0 and 1, or 0 and 0 on a single-core machine."""
    if ncpu() >= 2:
        return LOAD_CPU, PROXY_CPU
    return LOAD_CPU, LOAD_CPU


def pin_self(cpu: int) -> None:
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {cpu})


def which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        path = Path(folder) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together while choosing, so no repeats)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def http_status(port: int, path: str, timeout: float = 1.0) -> int | None:
    """Status of a bare GET on 127.0.0.1:port, or None if it fails."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
            )
            data = s.recv(64)
    except OSError:
        return None
    m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return int(m.group(1)) if m else None


def expect_200(name: str, port: int, path: str = "/") -> None:
    """A sanity check before measuring: a GET through `name` must answer 200."""
    status = http_status(port, path, timeout=3.0)
    if status != 200:
        raise RuntimeError(f"{name}: GET {path} on port {port} answered {status}, expected 200")


# --------------------------------------------------------------------------- /proc


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rfind(")") + 2 :].split()
    # fields[0] is field 3 (state); utime is field 14, stime field 15.
    return int(fields[11]) + int(fields[12])


def thread_switches(pid: int) -> dict[int, tuple[str, int, int]]:
    """Per thread of `pid`: (name, voluntary, nonvoluntary context switches), from
    /proc/PID/task/TID/status (PID/status alone counts the main thread only). A voluntary
    switch is the thread going to sleep (waiting for I/O or a lock): each one is followed
    by a wake-up, so voluntary + nonvoluntary over a run counts the wake-ups."""
    out: dict[int, tuple[str, int, int]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        vol = nonvol = 0
        name = "?"
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("Name:"):
                        name = line[5:].strip() or "?"
                    elif line.startswith("voluntary_ctxt_switches:"):
                        vol = int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        nonvol = int(line.split()[1])
        except OSError:
            continue  # the thread ended between listdir and open
        out[int(tid)] = (name, vol, nonvol)
    return out


def switches_delta(
    pid: int, before: dict[int, tuple[str, int, int]], after: dict[int, tuple[str, int, int]]
) -> dict[str, object]:
    """Context switches over a run: total, and per thread (`main` = the thread whose TID
    is the PID; the others by TID and name). Threads that ended during the run are lost."""
    threads: dict[str, dict[str, int | str]] = {}
    total = 0
    for tid, (name, vol, nonvol) in after.items():
        _, vol0, nonvol0 = before.get(tid, (name, 0, 0))
        dv, dn = vol - vol0, nonvol - nonvol0
        total += dv + dn
        key = "main" if tid == pid else f"tid{tid}"
        threads[key] = {"name": name, "voluntary": dv, "nonvoluntary": dn}
    return {"total": total, "threads": threads}


def vm_kib(pid: int, key: str = "VmHWM") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def foreign_ticks() -> dict[int, int]:
    """CPU ticks (own + reaped children) of every process that is not this bench's:
    not this process, not its children (wrk, the upstream, the proxies), not a kernel
    thread. Other jobs on the machine show up here and make a run noisy."""
    me = os.getpid()
    out: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid in (me, 2):
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        ppid = int(fields[1])
        if ppid in (me, 2):
            continue
        out[pid] = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return out


def foreign_cpu_pct(before: dict[int, int], after: dict[int, int], seconds: float) -> float:
    """CPU used by other processes between two `foreign_ticks` snapshots, in % of a core."""
    ticks = sum(t - before.get(pid, 0) for pid, t in after.items())
    return round(100.0 * max(0, ticks) / CLK_TCK / max(seconds, 1e-3), 1)


def core_times() -> dict[int, tuple[int, int]]:
    """Per core: (busy ticks, total ticks) from /proc/stat."""
    out: dict[int, tuple[int, int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            m = re.match(r"cpu(\d+) (.*)", line)
            if not m:
                continue
            vals = [int(v) for v in m.group(2).split()]
            idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
            total = sum(vals[:8])
            out[int(m.group(1))] = (total - idle, total)
    return out


def core_busy_pct(
    before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]
) -> dict[str, float]:
    busy: dict[str, float] = {}
    for cpu, (b1, t1) in after.items():
        b0, t0 = before.get(cpu, (0, 0))
        busy[f"cpu{cpu}"] = round(100.0 * (b1 - b0) / max(1, t1 - t0), 1)
    return busy


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    cmd: list[str]
    log_path: Path | None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-n:]


class Procs:
    """The processes this run started, ended by PID."""

    def __init__(self, taskset: str | None) -> None:
        self.taskset = taskset
        self.running: list[Proc] = []

    def start(
        self,
        name: str,
        cmd: list[str],
        *,
        cpu: int | None,
        log_path: Path | None = None,
        stdout_devnull: bool = True,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        full = list(cmd)
        if cpu is not None and self.taskset is not None:
            # taskset execs the command: the PID we get is the process itself.
            full = [self.taskset, "-c", str(cpu), *full]
        err: IO[bytes] | int = subprocess.DEVNULL
        if log_path is not None:
            err = open(log_path, "ab")  # noqa: SIM115 - closed right after Popen dups it
        try:
            popen = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if stdout_devnull else err,
                stderr=err,
                env=env,
                cwd=cwd,
                start_new_session=True,  # a Ctrl-C to the bench does not hit it first
            )
        finally:
            if not isinstance(err, int):
                err.close()
        proc = Proc(name, popen, full, log_path)
        self.running.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float = 3.0) -> None:
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.popen.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(grace)
        if proc in self.running:
            self.running.remove(proc)

    def kill(self, proc: Proc) -> None:
        """SIGKILL by PID (a crash, for the outage scenario), then reap it."""
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(5)
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.running)):
            self.stop(proc)


def wait_ready(
    proc: Proc,
    port: int,
    *,
    timeout: float = 15.0,
    http_path: str | None = None,
    http_port: int | None = None,
) -> None:
    """Wait until `port` accepts (and, if given, `http_path` on `http_port` answers 200)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited with {proc.popen.returncode} while starting:\n"
                f"{proc.log_tail()}"
            )
        if port_open(port):
            if http_path is None:
                return
            if http_status(http_port or port, http_path) == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} not ready on port {port} after {timeout}s:\n{proc.log_tail()}")


def wait_accepting(port: int, timeout: float = 15.0, proc: Proc | None = None) -> float | None:
    """Poll `port` every 5 ms until it accepts a connection; the time.perf_counter() at
    which it first did (None after `timeout`, or when `proc` exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            return None
        if port_open(port, 0.05):
            return time.perf_counter()
        time.sleep(0.005)
    return None


def wait_port_closed(port: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and port_open(port, 0.1):
        time.sleep(0.05)


# --------------------------------------------------------------------------- machine


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unavailable"


def machine_info(tools: dict[str, str | None]) -> dict[str, object]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {"python": platform.python_version()}
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("aiohttp", "uvloop", "pybreaker", "prometheus-client", "sidecar"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = "unavailable"
    if tools.get("haproxy"):
        line = _first_line([str(tools["haproxy"]), "-v"])
        m = re.search(r"version (\S+)", line)
        versions["haproxy"] = m.group(1) if m else line
    if tools.get("wrk"):
        line = _first_line([str(tools["wrk"]), "-v"])
        m = re.search(r"wrk (\S+)", line)
        versions["wrk"] = m.group(1) if m else line
    if tools.get("nginx"):
        line = _first_line([str(tools["nginx"]), "-v"])
        m = re.search(r"nginx/(\S+)", line)
        versions["nginx"] = m.group(1) if m else line
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError):
        mem_kib = vm_kib_meminfo()
    return {
        "nproc": ncpu(),
        "cpu_model": model,
        "kernel": platform.release(),
        "mem_total_mib": round(mem_kib / 1024),
        "versions": versions,
    }


def vm_kib_meminfo() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    return 0
