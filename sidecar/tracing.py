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
from typing import Final, NamedTuple

_HEX: Final = frozenset("0123456789abcdef")
_ZERO_TRACE: Final = "0" * 32
_ZERO_PARENT: Final = "0" * 16
_LENGTH: Final = 55  # 2 + 1 + 32 + 1 + 16 + 1 + 2


class TraceContext(NamedTuple):
    trace_id: str
    traceparent: str  # the value sent upstream
    replaced: bool  # True: the app's was absent or invalid (tracestate is dropped)


def trace_context(traceparent: str | None) -> TraceContext:
    """The request's trace: the app's `traceparent` when valid, else a new one."""
    if traceparent is not None:
        trace_id = valid_trace_id(traceparent)
        if trace_id is not None:
            return TraceContext(trace_id, traceparent, False)
    trace_id = f"{random.getrandbits(128) or 1:032x}"
    parent_id = f"{random.getrandbits(64) or 1:016x}"
    return TraceContext(trace_id, f"00-{trace_id}-{parent_id}-00", True)


def valid_trace_id(value: str) -> str | None:
    """The trace id of a valid `traceparent`, else None."""
    if len(value) < _LENGTH:
        return None
    version = value[:2]
    if (
        value[2] != "-"
        or value[35] != "-"
        or value[52] != "-"
        or version == "ff"
        or not _HEX.issuperset(version)
    ):
        return None
    if len(value) > _LENGTH and (version == "00" or value[_LENGTH] != "-"):
        return None
    trace_id = value[3:35]
    parent_id = value[36:52]
    flags = value[53:55]
    if not (_HEX.issuperset(trace_id) and _HEX.issuperset(parent_id) and _HEX.issuperset(flags)):
        return None
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_PARENT:
        return None
    return trace_id
