"""Routing: which configured route a request belongs to, and the path it is forwarded with.

The path is normalised before matching (docs/contract.md#hostile-input): percent-encoded
unreserved characters are decoded, other escapes are kept (with upper-case hex) and dot
segments are removed, so `/api/%2e%2e/admin` can never slip past a route on `/api`. The
normalised path is the one that is forwarded, so what was routed is what the upstream sees.

Prefixes match whole path segments: `/orders` matches `/orders` and `/orders/42`, never
`/orders-admin`; a prefix ending in `/` matches only below it. Routes are indexed by prefix
and exact path so a lookup costs a few dict probes whatever the number of routes; the
first configured route that matches still wins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sidecar.config.model import RouteConfig

_HEX = "0123456789ABCDEFabcdef"
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


class BadPath(ValueError):
    """A request target that cannot be normalised (not origin-form, or broken escapes)."""


def normalize_path(raw: str) -> str:
    """Normalise an origin-form path (no query). Raises BadPath for anything else."""
    if not raw.startswith("/"):
        raise BadPath("request target must be an absolute path")
    if "%" in raw:
        raw = _decode_unreserved(raw)
    if "/." in raw:
        raw = _remove_dot_segments(raw)
    return raw


def has_escaped_slash(path: str) -> bool:
    """Whether a normalised path holds `%2F` or `%5C` (normalisation upper-cases hex)."""
    return "%" in path and ("%2F" in path or "%5C" in path)


def _decode_unreserved(path: str) -> str:
    out: list[str] = []
    i = 0
    n = len(path)
    while i < n:
        ch = path[i]
        if ch != "%":
            out.append(ch)
            i += 1
            continue
        if i + 2 >= n:
            raise BadPath("truncated percent-escape in path")
        h1, h2 = path[i + 1], path[i + 2]
        if h1 not in _HEX or h2 not in _HEX:
            raise BadPath("invalid percent-escape in path")
        decoded = chr(int(h1 + h2, 16))
        out.append(decoded if decoded in _UNRESERVED else "%" + (h1 + h2).upper())
        i += 3
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    # RFC 3986 §5.2.4 on an absolute path: '.' segments vanish, '..' pops one segment and
    # never climbs above the root; a trailing '.'/'..' leaves a trailing slash.
    segments = path.split("/")
    out: list[str] = []
    for seg in segments[1:]:
        if seg == ".":
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    if segments[-1] in (".", ".."):
        out.append("")
    return "/" + "/".join(out)


def rewrite(path: str, route: RouteConfig) -> str:
    """Replace the matched prefix with `rewrite_prefix`, never doubling a slash."""
    new = route.rewrite_prefix
    if new is None:
        return path
    match = route.match
    if match.path is not None:
        return new
    prefix = match.prefix or "/"
    rest = path[len(prefix) :]
    if new.endswith("/") and rest.startswith("/"):
        rest = rest[1:]
    elif rest and not new.endswith("/") and not rest.startswith("/"):
        rest = "/" + rest
    return new + rest or "/"


@dataclass(frozen=True, slots=True)
class _Entry:
    order: int
    route: RouteConfig
    strict: bool  # prefix ended with '/': the bare prefix itself does not match

    def matches(self, method: str, host: str | None, headers: Mapping[str, str]) -> bool:
        m = self.route.match
        if m.methods is not None and method not in m.methods:
            return False
        if m.host is not None and host != m.host:
            return False
        return all(headers.get(name) == value for name, value in m.headers)


class RouteTable:
    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        self._exact: dict[str, list[_Entry]] = {}
        self._prefix: dict[str, list[_Entry]] = {}
        for order, route in enumerate(routes):
            if route.match.path is not None:
                self._exact.setdefault(route.match.path, []).append(_Entry(order, route, False))
                continue
            prefix = route.match.prefix or "/"
            key = prefix.rstrip("/") or "/"
            strict = prefix.endswith("/") and prefix != "/"
            self._prefix.setdefault(key, []).append(_Entry(order, route, strict))

    def match(
        self, path: str, method: str, host: str | None, headers: Mapping[str, str]
    ) -> RouteConfig | None:
        best: _Entry | None = None
        for entry in self._exact.get(path, ()):
            if entry.matches(method, host, headers):
                best = entry
                break
        # Probe every segment boundary: '/', '/a', '/a/b', ... each is a candidate prefix.
        prefix_map = self._prefix
        for key in _prefix_keys(path):
            entries = prefix_map.get(key)
            if not entries:
                continue
            for entry in entries:
                if best is not None and entry.order > best.order:
                    break
                if entry.strict and len(path) == len(key):
                    continue
                if entry.matches(method, host, headers):
                    best = entry
                    break
        return best.route if best is not None else None


def _prefix_keys(path: str) -> list[str]:
    keys = ["/"]
    start = 1
    n = len(path)
    while start <= n:
        end = path.find("/", start)
        if end == -1:
            if start < n:
                keys.append(path)
            break
        keys.append(path[:end])
        start = end + 1
    return keys
