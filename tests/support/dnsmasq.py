"""A real dnsmasq on 127.0.0.1 for DNS discovery tests.

dnsmasq answers from a hosts file (`--addn-hosts`) and from `--srv-host` records, with no
upstream servers and nothing from the machine's own config. `set_hosts()` rewrites the
hosts file and sends SIGHUP, on which dnsmasq clears its cache and re-reads it. Records
from hosts files carry TTL 0 (dnsmasq's default `local-ttl`), so no resolver caches them.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from support import free_port

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"


def require_dnsmasq() -> None:
    if not os.access(DNSMASQ, os.X_OK):
        pytest.skip("dnsmasq is not installed (apt-get install dnsmasq-base; `make test` does it)")


def _query(port: int, name: str, timeout: float = 0.5) -> bool:
    """True when something answers a DNS query for `name` on 127.0.0.1:`port` (UDP)."""
    header = struct.pack(">HHHHHH", 0x5EED, 0x0100, 1, 0, 0, 0)
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    packet = header + qname + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(packet, ("127.0.0.1", port))
            reply = s.recv(512)
        except OSError:
            return False
    return reply[:2] == b"\x5e\xed"


class Dnsmasq:
    def __init__(self, tmp: Path, hosts: str = "", srv: Sequence[str] = ()) -> None:
        self.tmp = tmp
        self.hosts_path = tmp / "dns-hosts"
        self.log_path = tmp / "dnsmasq.log"
        self.port = free_port()
        self.srv = list(srv)  # --srv-host values: "_svc._tcp.domain,target,port[,prio[,weight]]"
        self.hosts_path.write_text(hosts)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        args = [
            DNSMASQ,
            "--no-daemon",
            f"--port={self.port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--pid-file=",
            f"--addn-hosts={self.hosts_path}",
            "--log-facility=-",
            "--log-queries",
            *(f"--srv-host={s}" for s in self.srv),
        ]
        if os.geteuid() == 0:
            # Stay as the test's user, who can read the hosts file again on SIGHUP.
            args.append(f"--user={getpass.getuser()}")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"dnsmasq exited with {code}: {self.log_path.read_text()}")
            if _query(self.port, "ready.invalid"):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"dnsmasq not answering within {timeout}s")

    def set_hosts(self, hosts: str) -> None:
        """Replace the hosts file atomically and make dnsmasq re-read it (SIGHUP)."""
        tmp = self.hosts_path.with_suffix(".tmp")
        tmp.write_text(hosts)
        tmp.replace(self.hosts_path)
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGHUP)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def running_dnsmasq(tmp: Path, hosts: str = "", srv: Sequence[str] = ()) -> Iterator[Dnsmasq]:
    require_dnsmasq()
    server = Dnsmasq(tmp, hosts, srv)
    server.start()
    try:
        yield server
    finally:
        server.stop()
