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

from sidecar.config import addresses as config_addresses
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
    """Parse `host:port` or `[v6]:port` exactly as the config does (one normalisation, so
    an address from a file or etcd equals the same address written in YAML); ValueError
    says what is wrong."""
    return config_addresses.parse_address(text)


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
