"""The effective config as JSON-ready data, for GET /admin/config.

The shape follows the YAML (so an operator can compare the two), with every default filled
in: durations are numbers of seconds, addresses `host:port` strings, sets sorted lists,
header pairs mappings, the fallback body text, discovery `{kind: settings}`, and
`max_reset_timeout` the open period's actual cap.

Secrets stay out: a string setting written with `${VAR}` is shown as written
(`${TOKEN}`, `Bearer ${TOKEN}`, `${TOKEN:-default}`), never its value, by looking its key
path up in `SidecarConfig.substituted`; and every URL's password is masked
(`sidecar.redact.mask_url`). Sets of vocabulary words (methods, retry conditions,
statuses) are shown by value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sidecar.config.model import (
    Address,
    CircuitBreakerConfig,
    DiscoveryConfig,
    SidecarConfig,
    StaticDiscovery,
)
from sidecar.config.yamlsafe import join
from sidecar.redact import mask_url

_HIDDEN = frozenset({"source", "substituted"})  # SidecarConfig's own bookkeeping


def config_to_dict(cfg: SidecarConfig) -> dict[str, Any]:
    out = _Dumper(cfg.substituted).value(cfg, "")
    assert isinstance(out, dict)
    for key in _HIDDEN:
        out.pop(key, None)
    out["source"] = None if cfg.source is None else str(cfg.source)
    return out


class _Dumper:
    def __init__(self, substituted: Mapping[str, str]) -> None:
        self.substituted = substituted

    def text(self, value: str, *paths: str) -> str:
        """A string setting: as written if it came from `${VAR}`; its password masked."""
        for path in paths:
            written = self.substituted.get(path)
            if written is not None:
                return mask_url(written)
        return mask_url(value)

    def value(self, value: object, path: str) -> Any:
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, str | Address | Path):
            return self.text(str(value), path)
        if isinstance(value, bytes):
            return self.text(value.decode("utf-8", errors="replace"), path)
        if isinstance(value, frozenset):
            # Retry conditions first (by name), then statuses in order.
            return sorted(
                value, key=lambda v: (isinstance(v, int), v if isinstance(v, int) else 0, str(v))
            )
        if isinstance(value, Mapping):
            return {str(k): self.value(v, join(path, str(k))) for k, v in value.items()}
        if isinstance(value, tuple):
            if value and all(isinstance(p, tuple) and len(p) == 2 for p in value):
                return {str(k): self.value(v, join(path, str(k))) for k, v in value}  # headers
            return [self.value(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return self.block(value, path)
        raise TypeError(f"cannot dump {type(value).__name__}")

    def block(self, value: Any, path: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            if f.name == "discovery":
                out["discovery"] = self.discovery(value.discovery, path)
            else:
                out[f.name] = self.value(getattr(value, f.name), join(path, f.name))
        if isinstance(out.get("headers"), list):  # no header pairs: still a mapping
            out["headers"] = {}
        if isinstance(value, CircuitBreakerConfig):
            out["max_reset_timeout"] = value.open_period_cap
        return out

    def discovery(self, source: DiscoveryConfig, service: str) -> dict[str, Any]:
        path = f"{service}.discovery.{source.kind}"
        if isinstance(source, StaticDiscovery):
            # Written as `endpoints: [...]` or `discovery: {static: [...]}`.
            shorthand = f"{service}.endpoints"
            return {
                source.kind: [
                    self.text(str(a), f"{path}[{i}]", f"{shorthand}[{i}]")
                    for i, a in enumerate(source.endpoints)
                ]
            }
        return {source.kind: self.block(source, path)}
