"""W3C trace context (https://www.w3.org/TR/trace-context/): keep it, or start one.

A request's `traceparent` is `version-traceid-parentid-flags`:
`00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01`. A valid one goes upstream as
received (the sidecar exports no spans, so it has no span of its own to put there), with
its `tracestate` untouched. An absent or invalid one is replaced by a new trace whose
flags are `00` (not sampled: nobody recorded its root), and any `tracestate` is dropped,
since it described a trace that is no longer the one sent on. Either way the trace id is
the request's, for the access log and the duration histogram's exemplars.

Validation follows the spec's parsing rules: lower-case hex only; version `ff` is invalid;
an all-zero trace id or parent id is invalid; version `00` is exactly 55 characters, and a
later version may carry more fields after a `-`, which are ignored (forward compatible).
"""

from __future__ import annotations

import random
import re
from typing import Final

# version-traceid-parentid-flags, lower-case hex; a later version may add "-..." fields.
_TRACEPARENT: Final = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-.*)?")
_ZERO_TRACE: Final = "0" * 32
_ZERO_PARENT: Final = "0" * 16
_random_bits = random.getrandbits  # module-level: one lookup less per request


class TraceContext:
    """A request's trace (a plain slotted class: made once per request)."""

    __slots__ = ("replaced", "trace_id", "traceparent")

    def __init__(self, trace_id: str, traceparent: str, replaced: bool) -> None:
        self.trace_id = trace_id
        self.traceparent = traceparent  # the value sent upstream
        self.replaced = replaced  # the app's was absent or invalid: tracestate is dropped


def trace_context(traceparent: str | None) -> TraceContext:
    """The request's trace: the app's `traceparent` when valid, else a new one."""
    if traceparent is not None:
        trace_id = valid_trace_id(traceparent)
        if trace_id is not None:
            return TraceContext(trace_id, traceparent, False)
    # 128 bits of trace id and 64 of parent id in one draw; all-zero ids are invalid, and
    # a draw of zero (2^-128) would make one: the low bit of each is then set.
    ids = "%048x" % (_random_bits(192) | (1 << 64) | 1)
    trace_id = ids[:32]
    return TraceContext(trace_id, f"00-{trace_id}-{ids[32:]}-00", True)


def valid_trace_id(value: str) -> str | None:
    """The trace id of a valid `traceparent`, else None."""
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    version, trace_id, parent_id, rest = match.groups()
    if version == "ff" or (rest is not None and version == "00"):
        return None
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_PARENT:
        return None
    return trace_id
