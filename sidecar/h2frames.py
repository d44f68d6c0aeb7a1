"""HTTP/2 frames judged on their 9-byte headers, before `h2` sees a byte of them.

`h2` (python-hyper) parses frames only once a frame is whole, so on its own it would
buffer up to 16 MiB for a frame header that announces an oversized frame, and up to 64
CONTINUATION frames of a header block that never ends. It also moves its connection
state to CLOSED on any GOAWAY, sent or received, after which no stream can finish
(python-hyper/h2 issue #1181), which would rule out graceful shutdown both ways.

`FrameReader` sits in front of it, on both sides (the app-facing server and the
upstream client). It splits the byte stream into whole frames and, as soon as a frame's
header is in, checks:

- the connection preface (server side), and that the first frame is SETTINGS;
- that the frame is no larger than our `SETTINGS_MAX_FRAME_SIZE`;
- that a header block is one HEADERS or PUSH_PROMISE frame and CONTINUATION frames of
  the same stream with nothing in between, ended within a bounded size and count;
- anything else the owner asks (`judge`: the server's flood counters).

A failed check raises `FrameError` at once, with the GOAWAY error code to close with.
GOAWAY frames are handed to the owner like any other frame; the owners handle them
themselves instead of feeding them to `h2` (see above).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from enum import IntEnum
from typing import Final, NamedTuple, Protocol

from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_MAX_FRAME_SIZE: Final = 16384  # RFC 9113's initial SETTINGS_MAX_FRAME_SIZE
# h2 refuses a header block of more than 64 frames (CONTINUATION_BACKLOG) with a plain
# PROTOCOL_ERROR; we stop one frame earlier, with ENHANCE_YOUR_CALM.
MAX_BLOCK_FRAMES: Final = 64


class FrameType(IntEnum):
    DATA = 0x0
    HEADERS = 0x1
    PRIORITY = 0x2
    RST_STREAM = 0x3
    SETTINGS = 0x4
    PUSH_PROMISE = 0x5
    PING = 0x6
    GOAWAY = 0x7
    WINDOW_UPDATE = 0x8
    CONTINUATION = 0x9


FLAG_END_STREAM: Final = 0x1
FLAG_ACK: Final = 0x1
FLAG_END_HEADERS: Final = 0x4
FLAG_PADDED: Final = 0x8

Judge = Callable[[int, int, int, int], None]  # (type, flags, stream id, length)


class FrameError(Exception):
    """A connection error: close with GOAWAY(`code`)."""

    def __init__(self, code: ErrorCodes, message: str) -> None:
        super().__init__(message)
        self.code = code


class RawFrame(NamedTuple):
    type: int
    flags: int
    stream_id: int
    length: int
    data: bytes  # the whole frame, header included, as `h2` wants it

    @property
    def payload(self) -> bytes:
        return self.data[9:]

    def data_length(self) -> int:
        """A DATA frame's length without its padding: what counts as content."""
        if self.flags & FLAG_PADDED and self.length:
            return max(0, self.length - 1 - self.data[9])
        return self.length


class FrameReader:
    """Splits received bytes into whole frames, judging each header as it completes."""

    def __init__(
        self,
        *,
        expect_preface: bool,
        max_header_block: int,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        judge: Judge | None = None,
    ) -> None:
        self.max_frame_size = max_frame_size
        self.max_header_block = max_header_block
        self._judge = judge
        self._buf = bytearray()
        self._preface_left = len(PREFACE) if expect_preface else 0
        self._first = True
        self._pending: tuple[int, int, int, int] | None = None  # a judged, incomplete frame
        self._block_stream: int | None = None
        self._block_bytes = 0
        self._block_frames = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> Iterator[RawFrame]:
        """The whole frames `data` completes, in order; `FrameError` on a bad one."""
        buf = self._buf
        buf += data
        if self._preface_left:
            seen = len(PREFACE) - self._preface_left
            take = min(self._preface_left, len(buf))
            if buf[:take] != PREFACE[seen : seen + take]:
                raise FrameError(ErrorCodes.PROTOCOL_ERROR, "invalid connection preface")
            del buf[:take]
            self._preface_left -= take
            if self._preface_left:
                return
        while True:
            pending = self._pending
            if pending is None:
                if len(buf) < 9:
                    return
                length = int.from_bytes(buf[0:3], "big")
                ftype = buf[3]
                flags = buf[4]
                stream_id = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                self._check(ftype, flags, stream_id, length)
                pending = (ftype, flags, stream_id, length)
                self._pending = pending
            ftype, flags, stream_id, length = pending
            end = 9 + length
            if len(buf) < end:
                return
            frame = bytes(buf[:end])
            del buf[:end]
            self._pending = None
            yield RawFrame(ftype, flags, stream_id, length, frame)

    def _check(self, ftype: int, flags: int, stream_id: int, length: int) -> None:
        if length > self.max_frame_size:
            raise FrameError(
                ErrorCodes.FRAME_SIZE_ERROR,
                f"frame of {length} bytes announced, SETTINGS_MAX_FRAME_SIZE is "
                f"{self.max_frame_size}",
            )
        if self._first:
            self._first = False
            if ftype != FrameType.SETTINGS or flags & FLAG_ACK or stream_id != 0:
                raise FrameError(ErrorCodes.PROTOCOL_ERROR, "the first frame is not SETTINGS")
        if self._block_stream is not None:
            if ftype != FrameType.CONTINUATION or stream_id != self._block_stream:
                raise FrameError(
                    ErrorCodes.PROTOCOL_ERROR, "a frame other than CONTINUATION in a header block"
                )
            self._block_bytes += length
            self._block_frames += 1
            if self._block_bytes > self.max_header_block or self._block_frames >= MAX_BLOCK_FRAMES:
                raise FrameError(
                    ErrorCodes.ENHANCE_YOUR_CALM,
                    f"header block not ended within {self.max_header_block} bytes "
                    f"or {MAX_BLOCK_FRAMES} frames",
                )
            if flags & FLAG_END_HEADERS:
                self._block_stream = None
        elif ftype == FrameType.CONTINUATION:
            raise FrameError(ErrorCodes.PROTOCOL_ERROR, "CONTINUATION without a header block")
        elif ftype in (FrameType.HEADERS, FrameType.PUSH_PROMISE) and not flags & FLAG_END_HEADERS:
            self._block_stream = stream_id
            self._block_bytes = length
            self._block_frames = 1
        if self._judge is not None:
            self._judge(ftype, flags, stream_id, length)


def parse_goaway(frame: RawFrame) -> tuple[int, int]:
    """(last stream id, error code) of a GOAWAY frame."""
    if frame.stream_id != 0 or frame.length < 8:
        raise FrameError(ErrorCodes.PROTOCOL_ERROR, "malformed GOAWAY frame")
    payload = frame.data[9:17]
    last = int.from_bytes(payload[0:4], "big") & 0x7FFFFFFF
    code = int.from_bytes(payload[4:8], "big")
    return last, code


def goaway_bytes(last_stream_id: int, code: int, message: str = "") -> bytes:
    """A serialised GOAWAY frame, written around `h2` (see the module docstring)."""
    frame = GoAwayFrame(
        0,
        last_stream_id=last_stream_id,
        error_code=int(code),
        additional_data=message.encode("utf-8", "replace")[:256],
    )
    return bytes(frame.serialize())


class Writer(Protocol):
    """A stream that waits, on `window_event`, for flow-control window to send into."""

    @property
    def window_event(self) -> asyncio.Event: ...


def wake_writers(streams: Mapping[int, Writer], stream_id: int) -> None:
    """A WINDOW_UPDATE arrived: wake the writers it may unblock (stream 0: every one)."""
    if not stream_id:
        for stream in streams.values():
            stream.window_event.set()
    elif (one := streams.get(stream_id)) is not None:
        one.window_event.set()
