"""Logs: one JSON object per line on stdout (docs/contract.md#logs), written off the event loop.

A write to a stdout pipe can block when the reader is slow, so the event loop only puts
finished lines on a queue; one writer thread does the writing. The access log skips the
`logging` machinery entirely (it is the per-request hot path); every other logger goes
through `logging` with a JSON formatter into the same queue, so lines never interleave.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import sys
import threading
import time
from json.encoder import encode_basestring_ascii as _encode_str
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

if TYPE_CHECKING:
    from sidecar.request import AccessRecord

_STOP = object()


class TextSink(Protocol):
    """Where the writer thread writes lines: stdout, or any text stream."""

    def write(self, text: str, /) -> int: ...
    def flush(self) -> None: ...


class LineWriter:
    """Writes queued lines to a stream from one daemon thread."""

    def __init__(self, stream: TextSink | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="sidecar-log-writer", daemon=True)
        self._thread.start()

    def put(self, line: str) -> None:
        self._queue.put(line)

    def flush(self, timeout: float = 2.0) -> bool:
        """Block until every line put so far is written (False if `timeout` passed).

        Blocking: call it from a thread (`asyncio.to_thread`), never on the event loop."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def _run(self) -> None:
        q = self._queue
        stream = self._stream
        while True:
            item = q.get()
            batch: list[str] = []
            while True:
                if item is _STOP:
                    self._write(stream, batch)
                    return
                if isinstance(item, threading.Event):
                    self._write(stream, batch)
                    batch = []
                    item.set()
                    break
                batch.append(cast(str, item))  # the queue holds lines and the two markers
                if len(batch) >= 512:
                    break
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
            self._write(stream, batch)

    @staticmethod
    def _write(stream: TextSink, batch: list[str]) -> None:
        if not batch:
            return
        try:
            stream.write("".join(batch))
            stream.flush()
        except (OSError, ValueError):
            pass  # stdout went away (closed pipe); logging must never take the proxy down

    def close(self, timeout: float = 2.0) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        return json.dumps(entry, default=str)


class _QueueLineHandler(logging.Handler):
    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._writer.put(self.format(record) + "\n")
        except Exception:  # formatting must not raise into the caller
            self.handleError(record)


class AccessLog:
    """One JSON line per proxied request, handed to the writer thread in batches.

    The line is built by hand (the keys are fixed; strings go through json's C escaper),
    which costs a fraction of `json.dumps` on a dict. Lines wait up to `FLUSH_INTERVAL`
    (or until `MAX_PENDING` of them) and go to the writer thread together: at low load a
    flush per request woke that thread, and with it the loop's GIL hand-off, on every
    request (two context switches each, measured with the bench's wake-up column).
    """

    FLUSH_INTERVAL: Final = 0.05
    MAX_PENDING: Final = 512

    def __init__(self, writer: LineWriter | None) -> None:
        self._writer = writer
        self._pending: list[str] = []
        self._timer: asyncio.TimerHandle | None = None

    def emit(self, record: AccessRecord) -> None:
        if self._writer is None:
            return
        enc = _encode_str
        route, service, error = record.route, record.service, record.error
        line = (
            f'{{"request_id":{enc(record.request_id or "")},'
            f'"trace_id":{enc(record.trace_id or "")},'
            f'"route":{"null" if route is None else enc(route)},'
            f'"service":{"null" if service is None else enc(service)},'
            f'"method":{enc(record.method)},"path":{enc(record.path or "")},'
            f'"status":{int(record.status)},"attempts":{int(record.attempts)},'
            f'"duration_ms":{float(record.duration_ms)!r},'
            f'"error":{"null" if error is None else enc(error)},'
            f'"ts":{time.time():.6f},"logger":"sidecar.access"}}\n'
        )
        pending = self._pending
        if not pending and self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a test calling emit directly): write now
                self._writer.put(line)
                return
            self._timer = loop.call_later(self.FLUSH_INTERVAL, self.flush)
        pending.append(line)
        if len(pending) >= self.MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        """Hand every pending line to the writer thread now (shutdown, tests)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writer is not None and self._pending:
            self._writer.put("".join(self._pending))
        self._pending = []


def setup_logging(level: int = logging.INFO) -> LineWriter:
    """Route all `logging` output through one JSON line writer on stdout."""
    writer = LineWriter()
    handler = _QueueLineHandler(writer)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # aiohttp's own access log duplicates ours; its error log stays.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return writer
