"""The effective config as JSON-ready data, for GET /admin/config.

The shape follows the YAML (so an operator can compare the two), with every default filled
in: durations are numbers of seconds, addresses `host:port` strings, sets sorted lists,
header pairs mappings, the fallback body text, discovery `{kind: settings}`. Passwords in
etcd URLs are masked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sidecar.config.model import (
    Address,
    DnsDiscovery,
    EtcdDiscovery,
    FileDiscovery,
    SidecarConfig,
    StaticDiscovery,
)

_DISCOVERY_KIND = {
    StaticDiscovery: "static",
    DnsDiscovery: "dns",
    FileDiscovery: "file",
    EtcdDiscovery: "etcd",
}


def config_to_dict(cfg: SidecarConfig) -> dict[str, Any]:
    out = _value(cfg)
    assert isinstance(out, dict)
    out["source"] = None if cfg.source is None else str(cfg.source)
    return out


def mask_url(url: str) -> str:
    """`http://user:secret@host:2379` -> `http://user:***@host:2379`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _value(value: object) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Address | Path):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, StaticDiscovery):
        return {"static": [str(a) for a in value.endpoints]}
    if isinstance(value, EtcdDiscovery):
        return {"endpoints": [mask_url(u) for u in value.endpoints], "prefix": value.prefix}
    if isinstance(value, frozenset):
        # Retry conditions first (by name), then statuses in order.
        return sorted(
            value, key=lambda v: (isinstance(v, int), v if isinstance(v, int) else 0, str(v))
        )
    if isinstance(value, Mapping):
        return {str(k): _value(v) for k, v in value.items()}
    if isinstance(value, tuple):
        if all(isinstance(p, tuple) and len(p) == 2 for p in value) and value:
            return {str(k): _value(v) for k, v in value}  # header pairs
        return [_value(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: _value(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(out.get("headers"), list):  # no header pairs: still a mapping
            out["headers"] = {}
        discovery = getattr(value, "discovery", None)
        if discovery is not None and not isinstance(discovery, StaticDiscovery):
            out["discovery"] = {_DISCOVERY_KIND[type(discovery)]: out["discovery"]}
        return out
    raise TypeError(f"cannot dump {type(value).__name__}")
