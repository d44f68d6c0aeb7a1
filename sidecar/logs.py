"""Logs: one JSON object per line on stdout (CONTRACT §1), written off the event loop.

A write to a stdout pipe can block when the reader is slow, so the event loop only puts
finished lines on a queue; one writer thread does the writing. The access log skips the
`logging` machinery entirely (it is the per-request hot path); every other logger goes
through `logging` with a JSON formatter into the same queue, so lines never interleave.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
from typing import IO, Any

_STOP = object()


class LineWriter:
    """Writes queued lines to a stream from one daemon thread."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="sidecar-log-writer", daemon=True)
        self._thread.start()

    def put(self, line: str) -> None:
        self._queue.put(line)

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
                batch.append(item)  # type: ignore[arg-type]
                if len(batch) >= 512:
                    break
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
            self._write(stream, batch)

    @staticmethod
    def _write(stream: IO[str], batch: list[str]) -> None:
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
    """One JSON line per proxied request."""

    def __init__(self, writer: LineWriter | None) -> None:
        self._writer = writer

    def emit(self, entry: dict[str, Any]) -> None:
        if self._writer is None:
            return
        entry["ts"] = round(time.time(), 6)
        entry["logger"] = "sidecar.access"
        self._writer.put(json.dumps(entry, separators=(",", ":")) + "\n")


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
