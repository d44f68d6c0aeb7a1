"""Safe, bounded YAML reading: text in, a tree of positioned values out.

This module owns everything that touches PyYAML. It composes the document to nodes (never
constructs Python objects from tags), so no tag can execute anything, and it refuses what
would cost unbounded time or memory before paying for it:

- files larger than `MAX_BYTES`,
- nesting deeper than `MAX_DEPTH` (the composer recurses; this also protects the stack),
- documents whose aliases expand to more than `MAX_NODES` values (billion laughs): each
  composed node's expanded size is counted as it is built, so an alias costs its whole
  subtree without the subtree being copied, and a recursive alias is refused outright.

The result is a `YMap` / `YSeq` / `YScalar` tree where every node and key keeps its 1-based
line and column and the dotted path where it was written (`routes[0].retries`). Scalars
keep their source text: typing happens later, in `scalar_value`, after `${VAR}`
substitution, so `${N}` with N=3 types as the integer 3 exactly as if 3 had been written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.error import MarkedYAMLError
from yaml.events import AliasEvent, Event
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from sidecar.config.envsubst import EnvError, substitute
from sidecar.config.show import path_key, quote

MAX_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 64
MAX_NODES = 100_000

_TAG = "tag:yaml.org,2002:"
T_NULL, T_BOOL, T_INT, T_FLOAT, T_STR = (_TAG + t for t in ("null", "bool", "int", "float", "str"))
T_SEQ, T_MAP, T_MERGE = _TAG + "seq", _TAG + "map", _TAG + "merge"
# Dates and `=` have no meaning in this config; keep their text as a string.
_AS_TEXT = {T_STR, _TAG + "timestamp", _TAG + "value"}
SCALAR_TAGS = {T_NULL, T_BOOL, T_INT, T_FLOAT} | _AS_TEXT


@dataclass(frozen=True, slots=True)
class Pos:
    line: int  # 1-based
    column: int  # 1-based


@dataclass(eq=False, slots=True)
class YScalar:
    text: str  # as written, before substitution
    tag: str
    plain: bool  # untagged and unquoted: its type is resolved from its (substituted) text
    pos: Pos
    path: str


@dataclass(eq=False, slots=True)
class YSeq:
    items: list[YNode]
    pos: Pos
    path: str


@dataclass(eq=False, slots=True)
class YEntry:
    key: str
    key_pos: Pos
    owner: str  # path of the mapping the key was written in
    value: YNode


@dataclass(eq=False, slots=True)
class YMap:
    entries: dict[str, YEntry] = field(default_factory=dict)
    pos: Pos = Pos(1, 1)
    path: str = ""

    def get(self, key: str) -> YNode | None:
        entry = self.entries.get(key)
        return None if entry is None else entry.value


YNode = YScalar | YSeq | YMap


class YamlProblem(Exception):
    """The document cannot be read at all: one message, with a position when known."""

    def __init__(self, message: str, pos: Pos | None = None, path: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.pos = pos
        self.path = path


@dataclass(slots=True)
class TreeProblem:
    """A readable document with a defect in one place (bad tag, duplicate key, ...)."""

    message: str
    pos: Pos
    path: str
    fatal: bool  # a fatal one stops validation: what follows would only add noise


class _LimitError(yaml.YAMLError):
    """A limit was hit; raised from inside the composer to stop it at once."""

    def __init__(self, problem: str, problem_mark: Any) -> None:
        super().__init__(problem)
        self.problem = problem
        self.problem_mark = problem_mark


class _TrackedScalar(ScalarNode):
    plain: bool = False


class _BoundedComposer(Composer):
    """PyYAML's composer with depth and expanded-size accounting around `compose_node`."""

    if TYPE_CHECKING:  # provided by the parser and resolver it is mixed with

        def check_event(self, *choices: type[Event]) -> bool: ...
        def peek_event(self) -> Event: ...
        def get_event(self) -> Event: ...
        def resolve(self, kind: type[Node], value: str | None, implicit: Any) -> str: ...

    def __init__(self) -> None:
        super().__init__()
        self._depth = 0
        self._expanded = 0
        self._aliased = False
        self._sizes: dict[int, int] = {}  # id(node) -> expanded size, once complete

    def _count(self, n: int, mark: Any, *, alias: bool = False) -> None:
        self._expanded += n
        self._aliased = self._aliased or alias
        if self._expanded > MAX_NODES:
            if self._aliased:
                problem = (
                    f"the document expands to more than {MAX_NODES} values "
                    "(aliases repeat their whole anchor; is this an alias bomb?)"
                )
            else:
                problem = f"the document has more than {MAX_NODES} values"
            raise _LimitError(problem=problem, problem_mark=mark)

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        if self.check_event(AliasEvent):
            event = self.peek_event()
            assert isinstance(event, AliasEvent)
            node = self.anchors.get(event.anchor)
            if node is not None:
                size = self._sizes.get(id(node))
                if size is None:  # the anchored collection is still open
                    raise _LimitError(
                        problem=f"alias '*{event.anchor}' refers to a collection that "
                        "contains it (recursive aliases are not allowed)",
                        problem_mark=event.start_mark,
                    )
                self._count(size, event.start_mark, alias=True)
            return super().compose_node(parent, index)
        event = self.peek_event()
        mark = event.start_mark if event is not None else None
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _LimitError(
                problem=f"nesting is deeper than {MAX_DEPTH} levels", problem_mark=mark
            )
        start = self._expanded
        self._count(1, mark)
        node = super().compose_node(parent, index)
        self._depth -= 1
        self._sizes[id(node)] = self._expanded - start
        return node

    def compose_scalar_node(self, anchor: Any) -> ScalarNode:
        event = self.get_event()
        assert isinstance(event, yaml.ScalarEvent)
        tag = event.tag
        plain = tag is None and bool(event.implicit[0])
        if tag is None or tag == "!":
            tag = self.resolve(ScalarNode, event.value, event.implicit)
        start: Any = event.start_mark
        end: Any = event.end_mark
        node = _TrackedScalar(tag, event.value, start, end, event.style)
        node.plain = plain
        if anchor is not None:
            self.anchors[anchor] = node
        return node


try:
    from yaml._yaml import CParser

    # libyaml scans about four times faster; the composer above stays in Python.
    class _Loader(_BoundedComposer, CParser, Resolver):
        def __init__(self, text: str) -> None:
            CParser.__init__(self, text)
            _BoundedComposer.__init__(self)
            Resolver.__init__(self)

except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    # mypy sees the libyaml branch's _Loader too, and PyYAML's pure classes are untyped.
    class _Loader(_BoundedComposer, Reader, Scanner, Parser, Resolver):  # type: ignore[no-redef, misc]
        def __init__(self, text: str) -> None:
            Reader.__init__(self, text)
            Scanner.__init__(self)
            Parser.__init__(self)
            _BoundedComposer.__init__(self)
            Resolver.__init__(self)


def _pos(mark: Any) -> Pos | None:
    return None if mark is None else Pos(mark.line + 1, mark.column + 1)


def _yaml_message(err: yaml.YAMLError) -> tuple[str, Pos | None]:
    if isinstance(err, _LimitError):
        return str(err.problem), _pos(err.problem_mark)
    if isinstance(err, MarkedYAMLError):
        message = f"invalid YAML: {err.problem}"
        if err.context and str(err.problem).startswith("but "):  # the composer's wording
            message = f"invalid YAML: {err.context}, {err.problem}"
        elif err.context:
            message += f" ({err.context}"
            cm, pm = err.context_mark, err.problem_mark
            if cm is not None and pm is not None and cm.line != pm.line:
                message += f" at line {cm.line + 1}"
            message += ")"
        return message, _pos(err.problem_mark or err.context_mark)
    return f"invalid YAML: {err}", None


def compose(text: str) -> Node | None:
    """Compose one YAML document to nodes within the limits; None for an empty document."""
    if len(text) > MAX_BYTES:
        raise YamlProblem(f"the config is larger than the limit of {MAX_BYTES} characters")
    loader = _Loader(text)
    try:
        return loader.get_single_node()
    except yaml.YAMLError as err:
        message, pos = _yaml_message(err)
        raise YamlProblem(message, pos) from None
    finally:
        loader.dispose()


def tag_name(tag: str) -> str:
    return "!!" + tag.removeprefix(_TAG) if tag.startswith(_TAG) else tag


def join(path: str, key: str) -> str:
    """`path.key`; a key from the file is shown escaped and cut (`show.path_key`)."""
    key = path_key(key)
    return f"{path}.{key}" if path else key


def to_tree(node: Node) -> tuple[YNode, list[TreeProblem]]:
    """Turn composed nodes into a positioned tree; aliases are expanded (size was bounded)."""
    problems: list[TreeProblem] = []
    return _convert(node, "", problems), problems


def _bad_tag(node: Node, path: str, problems: list[TreeProblem]) -> None:
    problems.append(
        TreeProblem(
            f"the YAML tag {quote(tag_name(node.tag))} is not allowed (only plain mappings, lists, "
            "strings, numbers, booleans and null)",
            _pos(node.start_mark) or Pos(1, 1),
            path,
            fatal=True,
        )
    )


def _convert(node: Node, path: str, problems: list[TreeProblem]) -> YNode:
    pos = _pos(node.start_mark) or Pos(1, 1)
    if isinstance(node, ScalarNode):
        if node.tag not in SCALAR_TAGS:
            _bad_tag(node, path, problems)
        plain = bool(getattr(node, "plain", False))
        return YScalar(str(node.value), node.tag, plain, pos, path)
    if isinstance(node, SequenceNode):
        if node.tag != T_SEQ:
            _bad_tag(node, path, problems)
        return YSeq(
            [_convert(n, f"{path}[{i}]", problems) for i, n in enumerate(node.value)], pos, path
        )
    assert isinstance(node, MappingNode)
    if node.tag != T_MAP:
        _bad_tag(node, path, problems)
    result = YMap({}, pos, path)
    merges: list[YMap] = []
    for key_node, value_node in node.value:
        key_pos = _pos(key_node.start_mark) or pos
        if isinstance(key_node, ScalarNode) and key_node.tag == T_MERGE:
            merges.extend(_merge_sources(value_node, path, problems))
            continue
        if not isinstance(key_node, ScalarNode) or key_node.tag not in SCALAR_TAGS:
            problems.append(
                TreeProblem("mapping keys must be plain names", key_pos, path, fatal=True)
            )
            continue
        # The raw text, not the typed value: `on:` or `200:` are names here, not True or 200.
        key = str(key_node.value)
        first = result.entries.get(key)
        if first is not None:
            problems.append(
                TreeProblem(
                    f"duplicate key {quote(key)} (first written at line {first.key_pos.line})",
                    key_pos,
                    path,
                    fatal=False,
                )
            )
            continue
        value = _convert(value_node, join(path, key), problems)
        result.entries[key] = YEntry(key, key_pos, path, value)
    for source in merges:  # `<<: *base`: written keys win, then earlier sources
        for key, entry in source.entries.items():
            result.entries.setdefault(key, entry)
    return result


def _merge_sources(node: Node, path: str, problems: list[TreeProblem]) -> list[YMap]:
    nodes = node.value if isinstance(node, SequenceNode) else [node]
    sources: list[YMap] = []
    for item in nodes:
        converted = _convert(item, path, problems)
        if isinstance(converted, YMap):
            sources.append(converted)
        else:
            problems.append(
                TreeProblem(
                    "a merge key '<<' needs a mapping or a list of mappings",
                    _pos(item.start_mark) or Pos(1, 1),
                    path,
                    fatal=True,
                )
            )
    return sources


_constructor = SafeConstructor()
_resolver = Resolver()


class ScalarError(ValueError):
    """A scalar whose value cannot be computed (unset variable, bad explicit tag)."""


def scalar_text(scalar: YScalar, env: Mapping[str, str]) -> str:
    """The scalar's text after `${VAR}` substitution."""
    if "$" not in scalar.text:
        return scalar.text
    try:
        return substitute(scalar.text, env)
    except EnvError as err:
        raise ScalarError(str(err)) from None


def scalar_value(scalar: YScalar, env: Mapping[str, str]) -> object:
    """The typed value: substituted, then typed as YAML types a scalar written that way."""
    text = scalar_text(scalar, env)
    tag = scalar.tag
    if scalar.plain and text != scalar.text:
        # PyYAML's Resolver is untyped.
        tag = _resolver.resolve(ScalarNode, text, (True, False))  # type: ignore[no-untyped-call]
    if tag in _AS_TEXT:
        return text
    node = ScalarNode(tag, text)
    try:
        if tag == T_NULL:
            return None
        if tag == T_BOOL:
            return _constructor.construct_yaml_bool(node)
        if tag == T_INT:
            return _constructor.construct_yaml_int(node)
        return _constructor.construct_yaml_float(node)
    except (ValueError, KeyError, ConstructorError):
        raise ScalarError(f"{quote(text)} is not a valid {tag_name(tag)}") from None
