"""The app-facing HTTP/2 side (h2c with prior knowledge): one protocol per connection.

`H2Server` is the listener's HTTP/2 protocol factory and the owner of every stream task.
Each connection (`H2ServerProtocol`) drives `h2`'s sans-IO `H2Connection` and serves
each request stream by calling `handler(inbound, responder)` with an `Inbound` and a
`Responder` (`sidecar.http.base`), so the proxy's request path is the same for both
protocols. Modelled on hypercorn's `protocol/h2.py` and grpclib's `protocol.py`.

What it guarantees:

- Flow control end to end. Received DATA is acknowledged (WINDOW_UPDATE) only as the
  handler reads it (`read_chunk`), so what the app may send us is bounded by our
  windows (`http2.stream_window`, `http2.connection_window`), never by the body.
  `write` waits while the app's window for the stream or connection is closed, and
  while the socket's write buffer is above `WRITE_HIGH_WATER`: a reader that never
  opens its window makes the upstream wait, not the sidecar buffer.
- Limits advertised in SETTINGS: `max_concurrent_streams` (streams beyond it get
  RST_STREAM REFUSED_STREAM), `max_header_list_size` (a request over it gets 431; over
  twice it, or a header block not ended within twice it, the connection gets
  GOAWAY ENHANCE_YOUR_CALM), the windows; frames larger than 16384 bytes are a
  connection error judged from the frame header (`sidecar.h2frames`).
- Floods (`FloodLimits`): more than 1,000 RST_STREAM, PING or SETTINGS frames within
  10 s, or more than 64 KiB of PING/SETTINGS answers written while the app does not
  read, end the connection with GOAWAY ENHANCE_YOUR_CALM.
- Malformed requests (RFC 9113 §8.2 and §8.3) never reach the handler: they are
  answered 400 `bad_request` (a gRPC request: Trailers-Only, grpc-status 13), or, once
  the handler runs (a body longer or shorter than its content-length), the stream is
  reset with PROTOCOL_ERROR. `h2`'s own header validation is off because it makes every
  malformed request a connection error, which would fail the other streams of the
  connection; the checks are here instead (`parse_request`). A `content-length` that is
  not a number is still refused by `h2` itself, as a connection error.
- Graceful shutdown: `goaway()` sends GOAWAY(NO_ERROR) with the last stream taken and
  lets those streams finish; the connection closes when the last one ends. The frame is
  written around `h2`, whose state machine would otherwise refuse to send on open streams
  after a GOAWAY (python-hyper/h2 #1181); a GOAWAY from the app is handled the same way.

Request trailers are read and dropped (the seam has no place for them; gRPC never sends
them). Server push is never used.

The package, by module:

    protocol  H2ServerProtocol: one connection, frames in (events, requests, flood
              checks), the stream tasks; H2Server: the listener's factory and drain
    output    H2Output: what the connection sends (heads, data, trailers, resets under
              flow control and write back-pressure) and how it closes (GOAWAY, grace)
    stream    _Stream, H2Inbound, H2Responder: one stream's state and its two seam ends
    fields    parse_request and the field rules for requests, trailers and responses
    flood     FloodLimits and the sliding-window counter behind them
"""

from sidecar.http.h2server.fields import Malformed, RequestHead, parse_request
from sidecar.http.h2server.flood import PING_ANSWER, SETTINGS_ANSWER, FloodLimits
from sidecar.http.h2server.output import CLOSE_GRACE, H2Output
from sidecar.http.h2server.protocol import (
    MAX_FRAME_SIZE,
    WRITE_HIGH_WATER,
    H2Server,
    H2ServerProtocol,
    Handler,
)
from sidecar.http.h2server.stream import H2Inbound, H2Responder, StreamReset

__all__ = [
    "CLOSE_GRACE",
    "MAX_FRAME_SIZE",
    "PING_ANSWER",
    "SETTINGS_ANSWER",
    "WRITE_HIGH_WATER",
    "FloodLimits",
    "H2Inbound",
    "H2Output",
    "H2Responder",
    "H2Server",
    "H2ServerProtocol",
    "Handler",
    "Malformed",
    "RequestHead",
    "StreamReset",
    "parse_request",
]
