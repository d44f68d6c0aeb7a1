"""The h2c upstream client (`services.NAME.protocol: h2c`): multiplexed streams, pooled.

`H2Pool` implements `sidecar.upstream.base.UpstreamClient` over HTTP/2 with prior
knowledge (no TLS, no Upgrade). Per endpoint it keeps up to `max_connections` (4)
connections and puts each request on a stream of one that has room under the peer's
SETTINGS_MAX_CONCURRENT_STREAMS; it opens another connection only when all are full
(one connect at a time per endpoint; requests arriving meanwhile wait for it), and when
all `max_connections` are full a request waits for a stream to close, until its
deadline (then `TimeoutError`, as any attempt that runs out of time).

A request goes out as HEADERS (`:method`, `:scheme http`, `:path`, `:authority`, then
its headers lower-cased, connection-specific ones dropped, `te: trailers` added to a
gRPC request) and its body. A body given as an iterator is sent by a task of its own,
concurrently with the wait for the response, so bidirectional streaming works; every
DATA frame waits for the peer's stream and connection windows. `request()` returns
once the response HEADERS are in. A Trailers-Only response (HEADERS that end the
stream) is a response with an empty body whose headers carry `grpc-status`.

The response body is acknowledged (WINDOW_UPDATE) only as the caller takes chunks
from `iter_chunks`, so a slow app slows the upstream through our window
(`http2.stream_window`, `http2.connection_window`), and what we hold per stream is
bounded by it.

Resends (docs/contract.md#resends):
a stream the upstream did not process, because it answered RST_STREAM(REFUSED_STREAM)
or its number is above a GOAWAY's last stream id, is sent once more on another
connection, by this client, without counting as an attempt; only when its body can be
sent again (bytes, none, an iterator not yet started, or one the request's `replay`
gives afresh: a gRPC body kept while it fits `max_body_bytes`), else `UpstreamBroken`. Any
other reset is `UpstreamBroken`. GOAWAY frames are read by `connection`, not by `h2`
(see `sidecar.h2frames`), so streams under the last stream id still finish.

The package, by module:

    pool        H2Pool: the `UpstreamClient`; connections per endpoint, stream slots,
                dials, resends, the request's HEADERS
    connection  _Connection: one TCP connection carrying many streams; h2's events,
                GOAWAY, flow-controlled sends, idle close
    stream      _Stream, H2Response: one exchange's state and the response read from it
"""

from sidecar.upstream.h2.connection import IDLE_TIMEOUT, MAX_STREAMS_ASSUMED, WRITE_HIGH_WATER
from sidecar.upstream.h2.pool import MAX_CONNECTIONS_PER_ENDPOINT, H2Pool
from sidecar.upstream.h2.stream import H2Response

__all__ = [
    "IDLE_TIMEOUT",
    "MAX_CONNECTIONS_PER_ENDPOINT",
    "MAX_STREAMS_ASSUMED",
    "WRITE_HIGH_WATER",
    "H2Pool",
    "H2Response",
]
