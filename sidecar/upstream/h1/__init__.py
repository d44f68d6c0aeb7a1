"""A lean HTTP/1.1 client for the upstream hop: keep-alive pools, streaming, strict parsing.

Why not aiohttp's ClientSession? On the proxy's hot path it was the largest single cost
(about 40 % of a request's CPU): cookie jars, redirects, traces, URL objects and timers
that a proxy hop never uses. This client does only what the hop needs, and refuses what
a proxy must not relay (docs/upstream-client.md lists each refusal and why):

    pool        UpstreamPool: the `UpstreamClient`; idle connections per endpoint, idle
                limits (service idle_timeout, the upstream's Keep-Alive), reuse checks
    connection  H1Connection: one exchange at a time; llhttp (httptools) in strict mode,
                bounded heads, interim responses, trailers, early answers to uploads
    response    H1Response: the body streamed with read flow control
    resolver    HostCache: host names resolved off the loop, cached briefly

`sidecar.upstream.reference` is the same seam on aiohttp's client; both pass one
conformance suite (tests/test_upstream_conformance.py).
"""

from sidecar.upstream.h1.connection import MAX_FIELDS, MAX_HEAD_BYTES, H1Connection
from sidecar.upstream.h1.pool import DEFAULT_IDLE_TIMEOUT, UpstreamPool, build_head
from sidecar.upstream.h1.resolver import HostCache
from sidecar.upstream.h1.response import H1Response

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "MAX_FIELDS",
    "MAX_HEAD_BYTES",
    "H1Connection",
    "H1Response",
    "HostCache",
    "UpstreamPool",
    "build_head",
]
