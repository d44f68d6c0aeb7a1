"""Building a service's `discovery:` block (and `endpoints:`, its shorthand) and the etcd
settings that `register:` shares: static lists, DNS, files and etcd.

Each reader reports every mistake through the `Reader` and returns None when the source
cannot be built; the only I/O is a `stat()` of a `file:` path, to say early that it is
missing or is not a regular file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

from sidecar.config.addresses import is_ip, valid_hostname
from sidecar.config.model import (
    Address,
    DiscoveryConfig,
    DnsDiscovery,
    DnsRecord,
    EtcdDiscovery,
    FileDiscovery,
    StaticDiscovery,
)
from sidecar.config.reader import Reader
from sidecar.config.schema import DISCOVERY_KINDS, choices, default, keys
from sidecar.config.show import clip, quote
from sidecar.config.yamlsafe import YNode
from sidecar.redact import mask_url

DNS_RECORDS = choices(DnsRecord)

# What a path that is not a regular file is, for the message.
_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
)


def discovery(r: Reader, node: YNode, eff: str, base_dir: Path) -> DiscoveryConfig | None:
    m = r.mapping(node, tuple(DISCOVERY_KINDS))
    if m is None:
        return None
    kinds = [k for k in m.entries if k in DISCOVERY_KINDS]
    if not kinds:
        r.error(m, "needs exactly one source: static, dns, file or etcd")
        return None
    if len(kinds) > 1:
        second = m.entries[kinds[1]]
        r.report(
            second.key_pos,
            second.owner,
            f"only one discovery source is allowed, got '{kinds[0]}' and '{kinds[1]}'",
        )
        return None
    kind = kinds[0]
    child = r.child(m, kind, eff)
    assert child is not None
    if kind == StaticDiscovery.kind:
        return static(r, child)
    if kind == DnsDiscovery.kind:
        return dns(r, child, f"{eff}.dns")
    if kind == FileDiscovery.kind:
        return file(r, child, f"{eff}.file", base_dir)
    return etcd(r, child, f"{eff}.etcd")


def static(r: Reader, node: YNode) -> StaticDiscovery | None:
    nodes = r.seq(node)
    if nodes is None:
        return None
    if not nodes:
        r.error(node, "must list at least one endpoint 'host:port'")
        return None
    seen: set[Address] = set()
    endpoints: list[Address] = []
    for item in nodes:
        address = r.address(item)
        if address is None:
            continue
        if address in seen:
            r.warn(item, f"endpoint {address} is listed twice; it will get twice the traffic")
        seen.add(address)
        endpoints.append(address)
    if len(endpoints) != len(nodes):
        return None
    return StaticDiscovery(tuple(endpoints))


def dns(r: Reader, node: YNode, eff: str) -> DnsDiscovery | None:
    m = r.mapping(node, keys(DnsDiscovery))
    if m is None:
        return None

    def record_of(n: YNode) -> DnsRecord | None:
        value = r.choice(n, DNS_RECORDS, upper=True)
        return cast(DnsRecord, value) if value in DNS_RECORDS else None  # checked just above

    def hostname(n: YNode) -> str | None:
        value = r.nonempty(n)
        if value is not None and not valid_hostname(value):
            r.error(n, f"{quote(value)} is not a valid DNS name")
            return None
        return value

    def nameserver(n: YNode) -> Address | None:
        address = r.address(n, default_port=53)
        if address is not None and not is_ip(address.host):
            r.error(n, f"a nameserver must be an IP address, got {quote(address.host)}")
            return None
        return address

    def nameservers(n: YNode) -> tuple[Address, ...] | None:
        values = r.items(n, nameserver)
        return None if values is None else tuple(values)

    name = r.required(m, "name", eff, hostname)
    settings = r.block(
        m,
        eff,
        DnsDiscovery,
        {"record": record_of, "refresh": r.duration, "nameservers": nameservers},
        handled=("name", "port"),
    )
    record = settings.get("record", default(DnsDiscovery, "record"))
    port_node = r.child(m, "port", eff)
    port = None
    if record == "SRV":
        if port_node is not None and not r.is_null(port_node):
            r.error(port_node, "must not be set for SRV records: they carry their own ports")
        elif name is not None and not name.startswith("_"):
            r.warn(
                r.spot(f"{eff}.name"),
                f"SRV names usually start with '_' (like '_{name.split('.')[0]}._tcp.example'); "
                f"{quote(name)} will probably have no SRV records",
            )
    elif port_node is None or r.is_null(port_node):
        r.error(m, f"missing required key 'port' ({record} records carry no port)")
    else:
        port = r.integer(port_node, lo=1, hi=65535)
    if name is None or (record != "SRV" and port is None):
        return None
    return DnsDiscovery(name=name, port=port, **settings)


def file(r: Reader, node: YNode, eff: str, base_dir: Path) -> FileDiscovery | None:
    m = r.mapping(node, keys(FileDiscovery))
    if m is None:
        return None
    text = r.required(m, "path", eff, r.nonempty)
    if text is None:
        return None
    # normpath, not resolve(): no symlink lookups, and `..` reads as the user wrote it.
    path = Path(os.path.normpath(base_dir / Path(text).expanduser()))
    try:
        mode = os.stat(path).st_mode  # a stat opens nothing: safe on a FIFO or a device
    except FileNotFoundError:
        r.warn(
            r.spot(f"{eff}.path"),
            f"{clip(str(path))} does not exist (yet); the service has no endpoints until it does",
        )
        return FileDiscovery(path)
    except OSError as err:
        r.error(r.spot(f"{eff}.path"), f"cannot look at {clip(str(path))}: {err.strerror}")
        return None
    if not stat.S_ISREG(mode):
        what = next((name for test, name in _FILE_KINDS if test(mode)), "not a file")
        r.error(r.spot(f"{eff}.path"), f"must be a regular file, got {what}: {clip(str(path))}")
        return None
    return FileDiscovery(path)


def etcd(r: Reader, node: YNode, eff: str) -> EtcdDiscovery | None:
    m = r.mapping(node, keys(EtcdDiscovery))
    if m is None:
        return None

    def url(n: YNode) -> str | None:
        value = r.string(n)
        if value is None:
            return None
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError:
            parts, port = None, None
        if (
            parts is None
            or parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.query
            or parts.fragment
            or (port is not None and not 1 <= port <= 65535)
        ):
            r.error(
                n,
                f"expected an etcd URL like 'http://127.0.0.1:2379', got {quote(mask_url(value))}",
            )
            return None
        return value.rstrip("/")

    def urls(n: YNode) -> list[str] | None:
        values = r.items(n, url)
        if values == []:
            r.error(n, "must list at least one etcd URL")
            return None
        return values

    endpoints = r.required(m, "endpoints", eff, urls)
    prefix = r.required(m, "prefix", eff, r.nonempty)
    if prefix is not None and not prefix.endswith("/"):
        r.warn(
            r.spot(f"{eff}.prefix"),
            f"prefix {quote(prefix)} does not end with '/', so it also matches the keys of "
            f"{quote(prefix + '-other/...')} and the like",
        )
    if endpoints is None or prefix is None:
        return None
    return EtcdDiscovery(tuple(endpoints), prefix)
