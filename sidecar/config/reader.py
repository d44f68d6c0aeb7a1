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
import math
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

from sidecar.config.addresses import AddressError, parse_address
from sidecar.config.durations import MAX_SECONDS, format_duration, parse_duration
from sidecar.config.envsubst import has_reference
from sidecar.config.model import GRPC_STATUS_MAX, Address, Problem
from sidecar.config.schema import keys
from sidecar.config.show import clip, quote
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
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MAX_SUGGESTED = 200
_PERCENT = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*%")


class _Bad:
    """A value that could not be computed; its problem is already reported."""


BAD = _Bad()


class _Off:
    """A reader's answer for a block switched off (`false`): the field is None."""


OFF = _Off()

Read = Callable[[YNode], object]  # a value; None after reporting a problem; or OFF


def suggest(word: str, choices: Collection[str]) -> str | None:
    """The choice closest to `word`, if one is close; case does not count (`HTTP1`)."""
    if len(word) > MAX_SUGGESTED:  # nobody mistypes this much; and difflib is quadratic
        return None
    by_lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[close[0]] if close else None


def _num(x: float) -> str:
    """A bound as written: 2147483647, not 2.14748e+09; 0.5 as 0.5."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def parent_path(path: str) -> str:
    if path.endswith("]"):
        return path[: path.rindex("[")]
    return path.rpartition(".")[0]


class Reader:
    def __init__(self, file: str, env: Mapping[str, str]) -> None:
        self.file = file
        self.env = env
        self.problems: list[Problem] = []
        self.where: dict[str, YNode] = {}
        # Effective path -> text as written, for values with a ${VAR} reference
        # (`SidecarConfig.substituted`).
        self.substituted: dict[str, str] = {}
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

    @property
    def errors(self) -> int:
        """How many errors were reported so far (to tell whether a block read cleanly)."""
        return sum(not p.warning for p in self.problems)

    def spot(self, eff: str) -> YNode:
        """The node behind an effective path, or its nearest recorded ancestor."""
        while eff not in self.where and eff:
            eff = parent_path(eff)
        return self.where[eff]

    # -- structure ---------------------------------------------------------------------

    def child(self, m: YMap, key: str, eff: str) -> YNode | None:
        node = m.get(key)
        if node is not None:
            path = join(eff, key)
            self.where[path] = node
            self.note(path, node)
        return node

    def note(self, eff: str, node: YNode) -> None:
        """Remember where a scalar (or a list's scalar item) was written with `${VAR}`."""
        if isinstance(node, YScalar):
            if has_reference(node.text):
                self.substituted[eff] = node.text
        elif isinstance(node, YSeq):
            for i, item in enumerate(node.items):
                if isinstance(item, YScalar) and has_reference(item.text):
                    self.substituted[f"{eff}[{i}]"] = item.text

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
        return quote(text) if isinstance(value, str) else clip(text)

    def text(self, node: YNode) -> str:
        """A scalar's text after substitution (as written if that fails); whole: use
        `show` or `quote` to put it in a message."""
        assert isinstance(node, YScalar)
        try:
            return scalar_text(node, self.env)
        except ScalarError:
            return node.text

    def show(self, node: YNode) -> str:
        """A scalar's text for a message, unquoted (numbers): escaped and bounded."""
        return clip(self.text(node))

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
                self.report(entry.key_pos, join(entry.owner, key), f"unknown key ({hint})")
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

    def block(
        self,
        m: YMap,
        eff: str,
        cls: type,
        readers: Mapping[str, Read],
        *,
        handled: Collection[str] = (),
        switches: Collection[str] = (),
    ) -> dict[str, Any]:
        """Keyword arguments for `cls` from the keys `m` wrote, each read with its reader.

        A key left out, null or in error is not passed, so the dataclass default applies:
        defaults live in the model only. The keys of `readers` are the field names.
        `switches` are the switchable blocks, for which a null means off (their readers use
        `switch`). `handled` keys are read by the caller; between them and `readers` every
        key of `cls` must be covered, so a field added to the model cannot go unread.
        """
        if set(readers) | set(handled) != set(keys(cls)):
            raise TypeError(f"{cls.__name__}: keys {keys(cls)} but readers for {list(readers)}")
        kwargs: dict[str, Any] = {}
        for key, read in readers.items():
            node = self.child(m, key, eff)
            if node is None:
                continue
            if self.is_null(node):
                if key in switches:
                    kwargs[key] = None
                continue
            value = read(node)
            if value is OFF:
                kwargs[key] = None
            elif value is not None:
                kwargs[key] = value
        return kwargs

    def switch(
        self, node: YNode, on: Callable[[], T], read: Callable[[YNode], T | None]
    ) -> T | _Off | None:
        """A block that `true` turns on with its defaults and `false` (or null) turns off."""
        value = self.value(node)
        if value is BAD:
            return None
        if value is True:
            return on()
        if value is False or value is None:
            return OFF
        if isinstance(node, YMap):
            return read(node)
        self.expected(node, "a mapping, true or false", value)
        return None

    def required(self, m: YMap, key: str, eff: str, read: Callable[[YNode], T | None]) -> T | None:
        node = self.child(m, key, eff)
        if node is None:
            self.error(m, f"missing required key '{key}'")
            return None
        return read(node)

    # -- scalars -----------------------------------------------------------------------

    def _range(self, node: YNode, value: float, lo: float | None, hi: float | None) -> bool:
        shown = self.show(node)
        if lo is not None and hi is not None and not lo <= value <= hi:
            self.error(node, f"must be between {_num(lo)} and {_num(hi)}, got {shown}")
            return False
        if lo is not None and value < lo:
            self.error(node, f"must be >= {_num(lo)}, got {shown}")
            return False
        if hi is not None and value > hi:
            self.error(node, f"must be <= {_num(hi)}, got {shown}")
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
                f"{quote(value)} is not a valid name (use letters, digits, '.', '_' and '-', "
                "starting with a letter or digit)",
            )
            return None
        return value

    def slash_path(self, node: YNode) -> str | None:
        value = self.string(node)
        if value is not None and not value.startswith("/"):
            self.error(node, f"must start with '/', got {quote(value)}")
            return None
        return value

    def http_path(self, node: YNode) -> str | None:
        """A path to match or request: absolute, without query and dot segments."""
        value = self.slash_path(node)
        if value is None:
            return None
        if "?" in value or "#" in value:
            self.error(node, f"must be a path without query or fragment, got {quote(value)}")
            return None
        if any(seg in (".", "..") for seg in value.split("/")):
            self.error(node, f"must not contain '.' or '..' segments, got {quote(value)}")
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
            self.error(node, f"must be > 0, got {self.show(node)}")
            return None
        if seconds > MAX_SECONDS:
            self.error(
                node, f"must be at most {format_duration(MAX_SECONDS)}, got {self.show(node)}"
            )
            return None
        return seconds

    def share(self, node: YNode) -> float | None:
        """A share of calls: `N%` (0 < N <= 100) or a number 0 < x <= 1, as 0..1."""
        value = self.value(node)
        if value is BAD:
            return None
        if isinstance(value, str):
            match = _PERCENT.fullmatch(value.strip())
            if match is None:
                self.expected(node, "a share like '50%' or 0.5", value)
                return None
            percent = float(match.group(1))
            if not 0 < percent <= 100:
                self.error(node, f"must be a share above 0% and at most 100%, got {quote(value)}")
                return None
            return percent / 100
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            self.expected(node, "a share like '50%' or 0.5", value)
            return None
        if 1 < value <= 100:
            shown = self.show(node)
            self.error(
                node, f"must be a share: '50%' or 0.5, got {shown} (did you mean '{shown}%'?)"
            )
            return None
        if not 0 < value <= 1:
            self.error(
                node, f"must be a share above 0 and at most 1 ('50%' or 0.5), got {self.show(node)}"
            )
            return None
        return float(value)

    def address(self, node: YNode, default_port: int | None = None) -> Address | None:
        value = self.value(node)
        if value is BAD:
            return None
        if not isinstance(value, str):
            self.expected(node, "an address 'host:port'", value)
            return None
        try:
            return parse_address(value, default_port)
        except AddressError as err:
            self.error(node, str(err))
            return None

    def status(self, node: YNode, lo: int = 100) -> int | None:
        value = self.value(node)
        if value is BAD:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.expected(node, "an HTTP status", value)
            return None
        if not lo <= value <= 599:
            self.error(node, f"must be an HTTP status between {lo} and 599, got {self.show(node)}")
            return None
        return value

    def grpc_status(self, node: YNode) -> int | None:
        value = self.value(node)
        if value is BAD:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.expected(node, f"a gRPC status (0..{GRPC_STATUS_MAX})", value)
            return None
        if not 0 <= value <= GRPC_STATUS_MAX:
            self.error(
                node,
                f"must be a gRPC status between 0 and {GRPC_STATUS_MAX}, got {self.show(node)}",
            )
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
        self.error(node, f"must be one of {', '.join(choices)}, got {quote(value)}{hint}")
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
