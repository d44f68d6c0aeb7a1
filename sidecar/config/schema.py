"""The YAML schema, derived from the model: which keys exist where, and which `defaults:`
may set.

Nothing here is written twice: the keys of a mapping are the fields of its dataclass in
`sidecar.config.model` (in field order, which is the order messages list them in), minus
`NOT_A_KEY` fields, with `KEYS` metadata where a field is filled from other keys
(`ServiceConfig.discovery` from `endpoints` or `discovery`). `SCHEMA` walks the model from
`SidecarConfig` down, so a field added there is a key here, is refused by nothing, and is
checked against the reference config and the docs by the tests.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any

from sidecar.config.model import (
    Address,
    DiscoveryConfig,
    RouteConfig,
    ServiceConfig,
    SidecarConfig,
)

DEFAULTS_KEY = "defaults"  # merged away while building: no field of its own


def _key_fields(cls: type) -> list[tuple[tuple[str, ...], dataclasses.Field[Any]]]:
    out = []
    for f in dataclasses.fields(cls):
        keys = f.metadata.get("keys", (f.name,))
        if keys:
            out.append((tuple(keys), f))
    return out


@cache
def keys(cls: type) -> tuple[str, ...]:
    """The YAML keys of the mapping that `cls` is built from, in field order."""
    return tuple(k for ks, _ in _key_fields(cls) for k in ks)


def default(cls: type, name: str) -> Any:
    """The model's default for field `name` of `cls`."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise KeyError(f"{cls.__name__}.{name} has no default")
    raise KeyError(f"{cls.__name__} has no field {name}")


@cache
def inheritable(cls: type) -> tuple[str, ...]:
    """The keys of `cls` that `defaults:` may set for it."""
    return tuple(k for ks, f in _key_fields(cls) if not f.metadata.get("own") for k in ks)


@cache
def own(cls: type) -> tuple[str, ...]:
    """The keys of `cls` that only a route or service itself can write."""
    return tuple(k for k in keys(cls) if k not in inheritable(cls))


@cache
def switches(cls: type) -> tuple[str, ...]:
    """The blocks of `cls` that `true` / `false` (or null) turn on / off."""
    return tuple(k for ks, f in _key_fields(cls) if f.metadata.get("switch") for k in ks)


def choices(literal: Any) -> tuple[str, ...]:
    """The values of a `Literal[...]` type of the model (`LoadBalancerKind`, ...)."""
    return tuple(str(v) for v in typing.get_args(literal))


def _kind(source: Any) -> str:
    return str(source.kind)


DISCOVERY_KINDS: Mapping[str, type] = {
    _kind(c): c for c in typing.get_args(DiscoveryConfig) if isinstance(c, type)
}
TOP_KEYS: tuple[str, ...] = tuple(
    k for key in keys(SidecarConfig) for k in ((DEFAULTS_KEY, key) if key == "services" else (key,))
)
ROUTE_DEFAULT_KEYS = inheritable(RouteConfig)
SERVICE_DEFAULT_KEYS = inheritable(ServiceConfig)
DEFAULT_KEYS = ROUTE_DEFAULT_KEYS + SERVICE_DEFAULT_KEYS


def _block_type(hint: Any) -> type | None:
    """The dataclass a field's value is written as a mapping of, if any."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    blocks = [a for a in args if dataclasses.is_dataclass(a) and a is not Address]
    return blocks[0] if len(blocks) == 1 and isinstance(blocks[0], type) else None


def _walk(cls: type, where: str, out: dict[str, tuple[str, ...]], found: set[str]) -> None:
    out[where] = keys(cls)
    found.update(switches(cls))
    hints = typing.get_type_hints(cls)
    for ks, f in _key_fields(cls):
        hint = hints[f.name]
        for key in ks:
            path = f"{where}.{key}" if where else key
            origin = typing.get_origin(hint)
            if origin in (Mapping, dict):  # services: name -> ServiceConfig
                _walk(typing.get_args(hint)[1], f"{path}.*", out, found)
            elif origin is tuple and _block_type(typing.get_args(hint)[0]) is not None:
                _walk(typing.get_args(hint)[0], f"{path}[*]", out, found)  # routes
            elif hint == DiscoveryConfig and key == "discovery":
                out[path] = tuple(DISCOVERY_KINDS)
                for kind, source in DISCOVERY_KINDS.items():
                    if keys(source):  # `static` is written as the list itself
                        _walk(source, f"{path}.{kind}", out, found)
            elif (block := _block_type(hint)) is not None:
                _walk(block, path, out, found)


def _schema() -> tuple[dict[str, tuple[str, ...]], frozenset[str]]:
    out: dict[str, tuple[str, ...]] = {}
    found: set[str] = set()
    _walk(SidecarConfig, "", out, found)
    out[""] = TOP_KEYS
    out[DEFAULTS_KEY] = DEFAULT_KEYS
    return out, frozenset(found)


# Every mapping of the schema, by where it sits (`routes[*].retries`), with its keys (the
# reference config and the docs are tested against this, so no key goes undocumented);
# and the names of the switchable blocks, wherever they sit (`outlier_detection`, `probe`).
SCHEMA, SWITCH_KEYS = _schema()
