"""How text from a config file appears in a message: escaped, bounded, on one line.

`validate` prints one line per problem, and a key or value can be anything a file holds:
a megabyte of `a`, a newline, a NUL, a terminal escape sequence. So every key or value a
message quotes goes through `quote` (or `clip` for an unquoted one): control characters
are escaped (`\\n`, `\\t`, `\\x00`, `\\u2028`, ...), at most `MAX_SHOWN` characters are
shown, and a cut one says how long it was: `'aaaa...' (1048576 characters)`.
`bounded` is the backstop applied to whole lines when they are printed.
"""

from __future__ import annotations

import re

MAX_SHOWN = 80
# A whole message or key path; only text that escaped `quote` can make one this long.
MAX_LINE_PART = 400

# C0 and C1 controls, DEL, line and paragraph separators, and the bidi controls that can
# make a terminal show text in another order than it is stored.
_CONTROL = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match[str]) -> str:
    ch = match.group(0)
    if ch in _SHORT:
        return _SHORT[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """`text` with every control character written as an escape; printable text as is."""
    return _CONTROL.sub(_escape_one, text)


def _cut(text: str, limit: int) -> tuple[str, bool]:
    """The escaped text, or its first `limit` displayed characters; and whether it was cut."""
    head = text[: limit + 1]
    shown = escape(head)
    if len(text) <= limit and len(shown) <= limit:
        return shown, False
    out: list[str] = []
    used = 0
    for ch in head:
        piece = escape(ch)
        if used + len(piece) > limit:
            break
        out.append(piece)
        used += len(piece)
    return "".join(out), True


def quote(text: str, limit: int = MAX_SHOWN) -> str:
    """`'text'`, escaped; a long one as `'first 80 characters...' (N characters)`."""
    shown, cut = _cut(text, limit)
    if cut:
        return f"'{shown}...' ({len(text)} characters)"
    return f"'{shown}'"


def clip(text: str, limit: int = MAX_SHOWN) -> str:
    """Like `quote`, without the quotes: for numbers and other values shown bare."""
    shown, cut = _cut(text, limit)
    if cut:
        return f"{shown}... ({len(text)} characters)"
    return shown


def path_key(key: str) -> str:
    """A mapping key as one part of a dotted key path (`services.<key>.endpoints`)."""
    shown, cut = _cut(key, MAX_SHOWN)
    return f"{shown}...({len(key)} characters)" if cut else shown


def bounded(text: str) -> str:
    """A part of a printed line, escaped and cut at `MAX_LINE_PART` characters."""
    return clip(text, MAX_LINE_PART)
