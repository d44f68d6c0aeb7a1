"""Discovery sources: where a service's endpoint addresses come from.

A source runs as one background task of its cluster (`run(sink)`) and reports every
refresh or watch event to the sink: `discovered(addresses)` with the complete new set, or
`discovery_failed(reason)`. A failure never empties the cluster; the sink keeps the last
good set. Sources own and close whatever they open (resolvers, HTTP sessions) when their
task is cancelled.

    static  the configured list; applied once, nothing runs      (static.py)
    file    a YAML/JSON list of "host:port", polled for changes  (file.py)
    dns     A / AAAA / SRV records, re-resolved every `refresh`  (dns.py)
    etcd    one key per instance under a prefix, range + watch   (etcd.py)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from sidecar.config.model import (
    Address,
    DiscoveryConfig,
    DnsDiscovery,
    EtcdDiscovery,
    FileDiscovery,
    StaticDiscovery,
)


class DiscoverySink(Protocol):
    """What a source reports to (the cluster)."""

    def discovered(self, addresses: Sequence[Address]) -> None:
        """A complete, valid endpoint set; replaces the previous one."""
        ...

    def discovery_failed(self, reason: str) -> None:
        """A refresh that failed; the previous set stays."""
        ...


class DiscoverySource(Protocol):
    """One way of finding endpoints; `kind` is the `discovery.source` in /admin/state."""

    kind: str

    async def run(self, sink: DiscoverySink) -> None:
        """Report endpoint sets until cancelled (a static source returns at once)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Source details for /admin/state (name, path, revision, ...)."""
        ...


def parse_address(text: str) -> Address:
    """Parse `host:port` or `[v6]:port`; ValueError says what is wrong."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"expected '[ipv6]:port', got {text!r}")
        host, port_text = text[1:end], text[end + 2 :]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"expected 'host:port', got {text!r}")
        if ":" in host:
            raise ValueError(f"an IPv6 address needs brackets, as in '[::1]:8080'; got {text!r}")
    if not host or any(c.isspace() or c in "/?#@" for c in host):
        raise ValueError(f"bad host in {text!r}")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"port must be 1..65535, got {text!r}")
    return Address(host, int(port_text))


def make_source(config: DiscoveryConfig) -> DiscoverySource:
    """The source for a service's `discovery` block."""
    if isinstance(config, StaticDiscovery):
        from sidecar.discovery.static import StaticSource

        return StaticSource(config)
    if isinstance(config, FileDiscovery):
        from sidecar.discovery.file import FileSource

        return FileSource(config)
    if isinstance(config, DnsDiscovery):
        from sidecar.discovery.dns import DnsSource

        return DnsSource(config)
    if isinstance(config, EtcdDiscovery):
        from sidecar.discovery.etcd import EtcdSource

        return EtcdSource(config)
    raise TypeError(f"unknown discovery config {config!r}")
