"""Typed reads from the positioned YAML tree, collecting every problem instead of stopping.

A `Reader` is the one place that turns a node into an int, a duration, an address... and
that words the messages: what was expected, what was given (as written, after `${VAR}`
substitution) and how to fix it. Each read returns None after reporting a problem, so the
builder carries on and the user sees every mistake in one run.

Problems carry the path and position where the value was *written*: a value merged in from
`defaults:` is reported under `defaults...`, once. `where` maps the *effective* paths the
builder read (`routes[0].retries.per_try_timeout`) to their nodes, so the checks that run
on the built model can point back into the file.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Callable, Collection, Mapping
from typing import TypeVar

from sidecar.config.durations import MAX_SECONDS, format_duration, parse_duration
from sidecar.config.model import Address, Problem
from sidecar.config.yamlsafe import (
    Pos,
    ScalarError,
    YMap,
    YNode,
    YScalar,
    YSeq,
    join,
    scalar_text,
    scalar_value,
)

T = TypeVar("T")

# RFC 9110 token: methods and header names.
TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class _Bad:
    """A value that could not be computed; its problem is already reported."""


BAD = _Bad()


def suggest(word: str, choices: Collection[str]) -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def parent_path(path: str) -> str:
    if path.endswith("]"):
        return path[: path.rindex("[")]
    return path.rpartition(".")[0]


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def valid_hostname(host: str) -> bool:
    if HOSTNAME.fullmatch(host) is None:
        return False
    labels = host.rstrip(".").split(".")
    if all(label.isdigit() for label in labels):  # looks like IPv4: must be one
        return is_ip(host)
    return True


def parse_address(text: str, default_port: int | None = None) -> Address | str:
    """An `Address`, or a message saying what is wrong with `host:port` text."""
    if not text or text != text.strip():
        return f"expected an address 'host:port', got '{text}'"
    if text.startswith("["):
        end = text.find("]")
        host, rest = (text[1:end], text[end + 1 :]) if end > 0 else (text[1:], "")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"'{text}' is not a valid '[IPv6]:port' address"
        if rest == "" and default_port is not None:
            return Address(host, default_port)
        if not rest.startswith(":"):
            return f"expected an address '[IPv6]:port', got '{text}' (missing port)"
        port_text = rest[1:]
    else:
        if text.count(":") > 1:
            return f"IPv6 addresses need brackets, e.g. '[::1]:8080', got '{text}'"
        host, colon, port_text = text.partition(":")
        if not colon:
            if default_port is None:
                return f"expected an address 'host:port', got '{text}' (missing port)"
            port_text = str(default_port)
        if not host:
            return f"expected an address 'host:port', got '{text}' (missing host)"
        if not valid_hostname(host):
            return f"'{host}' is not a valid host name or IP address"
    if not port_text.isascii() or not port_text.isdigit():
        return f"port must be a number between 1 and 65535, got '{port_text}'"
    port = int(port_text)
    if not 1 <= port <= 65535:
        return f"port must be between 1 and 65535, got {port}"
    return Address(host.lower(), port)


class Reader:
    def __init__(self, file: str, env: Mapping[str, str]) -> None:
        self.file = file
        self.env = env
        self.problems: list[Problem] = []
        self.where: dict[str, YNode] = {}
        self._values: dict[int, object] = {}  # id(scalar) -> value: report each problem once

    # -- reporting ---------------------------------------------------------------------

    def report(self, pos: Pos, path: str, message: str, *, warning: bool = False) -> None:
        self.problems.append(Problem(message, path, self.file, pos.line, pos.column, warning))

    def error(self, node: YNode, message: str) -> None:
        self.report(node.pos, node.path, message)

    def warn(self, node: YNode, message: str) -> None:
        self.report(node.pos, node.path, message, warning=True)

    @property
    def failed(self) -> bool:
        return any(not p.warning for p in self.problems)

    def spot(self, eff: str) -> YNode:
        """The node behind an effective path, or its nearest recorded ancestor."""
        while eff not in self.where and eff:
            eff = parent_path(eff)
        return self.where[eff]

    # -- structure ---------------------------------------------------------------------

    def child(self, m: YMap, key: str, eff: str) -> YNode | None:
        node = m.get(key)
        if node is not None:
            self.where[join(eff, key)] = node
        return node

    def value(self, node: YNode) -> object:
        """A scalar's typed value (BAD after reporting); collections come back as they are."""
        if not isinstance(node, YScalar):
            return node
        if id(node) in self._values:
            return self._values[id(node)]
        try:
            value = scalar_value(node, self.env)
        except ScalarError as err:
            self.error(node, str(err))
            value = BAD
        self._values[id(node)] = value
        return value

    def is_null(self, node: YNode) -> bool:
        return isinstance(node, YScalar) and self.value(node) is None

    def describe(self, node: YNode, value: object) -> str:
        if isinstance(node, YMap):
            return "a mapping"
        if isinstance(node, YSeq):
            return "a list"
        if value is None:
            return "null"
        text = self.text(node)
        return f"'{text}'" if isinstance(value, str) else text

    def text(self, node: YNode) -> str:
        assert isinstance(node, YScalar)
        try:
            return scalar_text(node, self.env)
        except ScalarError:
            return node.text

    def expected(self, node: YNode, what: str, value: object, hint: str = "") -> None:
        self.error(node, f"expected {what}, got {self.describe(node, value)}{hint}")

    def mapping(self, node: YNode, allowed: Collection[str] | None = None) -> YMap | None:
        if not isinstance(node, YMap):
            value = self.value(node)
            if value is not BAD:
                self.expected(node, "a mapping", value)
            return None
        if allowed is not None:
            for key, entry in node.entries.items():
                if key in allowed:
                    continue
                close = suggest(key, allowed)
                hint = f"did you mean '{close}'?" if close else "valid keys: " + ", ".join(allowed)
                self.report(entry.key_pos, entry.owner, f"unknown key '{key}' ({hint})")
        return node

    def seq(self, node: YNode) -> list[YNode] | None:
        if not isinstance(node, YSeq):
            value = self.value(node)
            if value is not BAD:
                self.expected(node, "a list", value)
            return None
        return node.items

    def field(
        self, m: YMap, key: str, eff: str, read: Callable[[YNode], T | None], default: T
    ) -> T:
        """An optional key: absent or null gives `default`, so does a value in error."""
        node = self.child(m, key, eff)
        if node is None or self.is_null(node):
            return default
        value = read(node)
        return default if value is None else value

    def required(self, m: YMap, key: str, eff: str, read: Callable[[YNode], T | None]) -> T | None:
        node = self.child(m, key, eff)
        if node is None:
            self.error(m, f"missing required key '{key}'")
            return None
        return read(node)

    # -- scalars -----------------------------------------------------------------------

    def _range(self, node: YNode, value: float, lo: float | None, hi: float | None) -> bool:
        shown = self.text(node)
        if lo is not None and hi is not None and not lo <= value <= hi:
            self.error(node, f"must be between {lo:g} and {hi:g}, got {shown}")
            return False
        if lo is not None and value < lo:
            self.error(node, f"must be >= {lo:g}, got {shown}")
            return False
        if hi is not None and value > hi:
            self.error(node, f"must be <= {hi:g}, got {shown}")
            return False
        return True

    def integer(self, node: YNode, lo: int | None = None, hi: int | None = None) -> int | None:
        value = self.value(node)
        if value is BAD:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.expected(node, "an integer", value)
            return None
        return value if self._range(node, value, lo, hi) else None

    def number(self, node: YNode, lo: float | None = None, hi: float | None = None) -> float | None:
        value = self.value(node)
        if value is BAD:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            self.expected(node, "a number", value)
            return None
        return float(value) if self._range(node, value, lo, hi) else None

    def boolean(self, node: YNode) -> bool | None:
        value = self.value(node)
        if value is BAD:
            return None
        if not isinstance(value, bool):
            self.expected(node, "true or false", value)
            return None
        return value

    def string(self, node: YNode, *, lenient: bool = False, hint: str = "") -> str | None:
        """A string; `lenient` also takes any other scalar as written (`x-version: 2`)."""
        value = self.value(node)
        if value is BAD:
            return None
        if isinstance(value, str):
            return value
        if lenient and isinstance(node, YScalar) and value is not None:
            return self.text(node)
        self.expected(node, "a string", value, hint)
        return None

    def nonempty(self, node: YNode, *, lenient: bool = False) -> str | None:
        value = self.string(node, lenient=lenient)
        if value == "":
            self.error(node, "must not be empty")
            return None
        return value

    def name(self, node: YNode) -> str | None:
        value = self.string(node, lenient=True)
        if value is not None and NAME.fullmatch(value) is None:
            self.error(
                node,
                f"'{value}' is not a valid name (use letters, digits, '.', '_' and '-', "
                "starting with a letter or digit)",
            )
            return None
        return value

    def slash_path(self, node: YNode) -> str | None:
        value = self.string(node)
        if value is not None and not value.startswith("/"):
            self.error(node, f"must start with '/', got '{value}'")
            return None
        return value

    def http_path(self, node: YNode) -> str | None:
        """A path to match or request: absolute, without query and dot segments."""
        value = self.slash_path(node)
        if value is None:
            return None
        if "?" in value or "#" in value:
            self.error(node, f"must be a path without query or fragment, got '{value}'")
            return None
        if any(seg in (".", "..") for seg in value.split("/")):
            self.error(node, f"must not contain '.' or '..' segments, got '{value}'")
            return None
        return value

    def duration(self, node: YNode) -> float | None:
        value = self.value(node)
        if value is BAD:
            return None
        seconds = parse_duration(value)
        if seconds is None:
            self.expected(node, "a duration like '250ms' or '2s'", value)
            return None
        if seconds <= 0:
            self.error(node, f"must be > 0, got {self.text(node)}")
            return None
        if seconds > MAX_SECONDS:
            self.error(
                node, f"must be at most {format_duration(MAX_SECONDS)}, got {self.text(node)}"
            )
            return None
        return seconds

    def address(self, node: YNode, default_port: int | None = None) -> Address | None:
        value = self.value(node)
        if value is BAD:
            return None
        if not isinstance(value, str):
            self.expected(node, "an address 'host:port'", value)
            return None
        parsed = parse_address(value, default_port)
        if isinstance(parsed, str):
            self.error(node, parsed)
            return None
        return parsed

    def status(self, node: YNode, lo: int = 100) -> int | None:
        value = self.value(node)
        if value is BAD:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.expected(node, "an HTTP status", value)
            return None
        if not lo <= value <= 599:
            self.error(node, f"must be an HTTP status between {lo} and 599, got {value}")
            return None
        return value

    def choice(self, node: YNode, choices: Collection[str], *, upper: bool = False) -> str | None:
        value = self.value(node)
        if value is BAD:
            return None
        if not isinstance(value, str):
            self.expected(node, "one of " + ", ".join(choices), value)
            return None
        key = value.upper() if upper else value
        if key in choices:
            return key
        close = suggest(key, choices)
        hint = f" (did you mean '{close}'?)" if close else ""
        self.error(node, f"must be one of {', '.join(choices)}, got '{value}'{hint}")
        return None

    def items(self, node: YNode, read: Callable[[YNode], T | None]) -> list[T] | None:
        """Every item of a list read with `read`; None when the list or any item is wrong."""
        nodes = self.seq(node)
        if nodes is None:
            return None
        values = [read(item) for item in nodes]
        if any(v is None for v in values):
            return None
        return [v for v in values if v is not None]
