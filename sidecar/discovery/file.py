"""File discovery: a YAML (or JSON) list of "host:port" strings, re-read when it changes.

The file is polled every `poll_interval` (0.5 s): a `stat()` each time, and a read plus a
content hash only when mtime, size or inode moved, so an idle poll costs one syscall. All
file access and parsing runs in a worker thread, never on the event loop.

A change is applied as a whole (the new list replaces the old one in one step). A file that
is missing, unreadable, empty or malformed keeps the last good set and counts one failure
per distinct bad state, not one per poll. Writers should replace the file atomically
(write a temporary file, then rename it over the old one); a half-written file is at worst
a malformed one, and is picked up again once complete.

Only a regular file is read, and never more than `MAX_FILE_BYTES` of it. A path that names
a device (`/dev/zero`, `/dev/urandom`), a FIFO, a directory or a socket is a failure ("not a
regular file"): a device's size says nothing about how much it yields, and reading a FIFO
blocks until some writer comes. The file is opened with O_NONBLOCK and checked with
`fstat()` on the opened descriptor before any read, so neither the open nor a read can wait
on another process, and the worker thread always finishes: a cancelled poll never leaves a
thread behind that would hold up the process's exit.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from sidecar.config.model import Address, FileDiscovery
from sidecar.discovery import DiscoverySink, parse_address

# Endpoint lists are short; a huge file is a mistake, not something to parse.
MAX_FILE_BYTES: Final = 1 << 20

# How long after a write the mtime alone is not trusted to detect a change.
SETTLE_NS: Final = 2_000_000_000

_READ_CHUNK: Final = 64 << 10
_OPEN_FLAGS: Final = (
    os.O_RDONLY
    | os.O_NONBLOCK
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_BINARY", 0)
)

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

Signature = tuple[int, int, int]  # (mtime_ns, size, inode)


@dataclass(frozen=True, slots=True)
class _Read:
    """One poll's outcome: unchanged, a new endpoint list, or an error."""

    signature: Signature | str  # stat signature, or the error text when stat failed
    digest: str | None = None  # content hash when the file was read
    addresses: tuple[Address, ...] | None = None
    error: str | None = None


class FileRefused(Exception):
    """The path is not something the sidecar reads as an endpoint list."""


def parse_endpoint_list(data: bytes, source: str = "file") -> tuple[Address, ...]:
    """Parse a YAML/JSON list of "host:port" strings; ValueError names the bad entry."""
    try:
        doc = yaml.load(data, Loader=_Loader)  # a SafeLoader (C or Python), chosen above
    except yaml.YAMLError as exc:
        raise ValueError(f"{source}: not valid YAML/JSON: {exc}".replace("\n", " ")) from None
    if doc is None:
        # Most likely caught mid-write (truncated); an intentionally empty set is `[]`.
        raise ValueError(f"{source}: empty file (write [] for no endpoints)")
    if not isinstance(doc, list):
        raise ValueError(f'{source}: expected a list of "host:port", got {type(doc).__name__}')
    addresses: list[Address] = []
    for i, item in enumerate(doc):
        if not isinstance(item, str):
            raise ValueError(f'{source}[{i}]: expected a "host:port" string, got {item!r:.60}')
        try:
            addresses.append(parse_address(item))
        except ValueError as exc:
            raise ValueError(f"{source}[{i}]: {exc}") from None
    return tuple(addresses)


def file_kind(mode: int) -> str:
    """What a stat mode names, in words, for messages."""
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a file"


def check_regular(path: Path, st: os.stat_result, limit: int = MAX_FILE_BYTES) -> None:
    """FileRefused unless `st` is a regular file of at most `limit` bytes."""
    if not stat.S_ISREG(st.st_mode):
        raise FileRefused(f"not a regular file: {path} ({file_kind(st.st_mode)})")
    if st.st_size > limit:
        raise FileRefused(f"{path}: larger than {limit} bytes, the limit for an endpoint list")


def read_at_most(fd: int, limit: int) -> bytes:
    """Read from `fd` until EOF, but never more than `limit` + 1 bytes.

    The extra byte tells "exactly at the limit" from "over it" without reading on. Works on
    any descriptor; the caller has already made sure it is a regular file, so no read waits.
    """
    chunks: list[bytes] = []
    total = 0
    while total <= limit:
        chunk = os.read(fd, min(_READ_CHUNK, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def read_endpoint_file(path: Path, limit: int = MAX_FILE_BYTES) -> tuple[os.stat_result, bytes]:
    """The stat and content of the regular file at `path`, bounded by `limit` bytes.

    Raises FileRefused (not a regular file, too large) or OSError (missing, unreadable).
    Never blocks on a FIFO or a device: opened with O_NONBLOCK, checked with fstat() on
    the descriptor actually opened (the path may have been swapped since any earlier stat).
    """
    fd = os.open(path, _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        check_regular(path, st, limit)
        data = read_at_most(fd, limit)
    finally:
        os.close(fd)
    if len(data) > limit:
        # It grew after the fstat (or its size lied, as procfs files do).
        raise FileRefused(f"{path}: larger than {limit} bytes, the limit for an endpoint list")
    return st, data


class FileSource:
    kind = "file"

    def __init__(
        self, config: FileDiscovery, poll_interval: float = 0.5, max_bytes: int = MAX_FILE_BYTES
    ) -> None:
        self.path = Path(config.path)
        self.poll_interval = poll_interval
        self.max_bytes = max_bytes
        self._signature: Signature | str | None = None
        self._digest: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    async def run(self, sink: DiscoverySink) -> None:
        while True:
            # The worker cannot block (see the module docstring), so a cancellation here
            # leaves at most one short read running, never a stuck thread.
            read = await asyncio.to_thread(self._poll, self._signature, self._digest)
            changed = read.signature != self._signature or read.digest != self._digest
            self._signature = read.signature
            # None after a failure that read no content, so the next good read applies
            # even if it brings back exactly the last good content.
            self._digest = read.digest
            if changed:
                if read.error is not None:
                    sink.discovery_failed(read.error)
                elif read.addresses is not None:
                    sink.discovered(read.addresses)
            await asyncio.sleep(self.poll_interval)

    def _poll(self, signature: Signature | str | None, digest: str | None) -> _Read:
        """Runs in a worker thread: stat, and read + parse only if the file moved."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            return _Read(signature=f"{self.path}: {exc.strerror or exc}", error=f"{exc}")
        sig: Signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        # File timestamps tick coarsely (a few ms), so two same-size writes in one tick look
        # alike; while the mtime is recent, compare the content too.
        settled = time.time_ns() - st.st_mtime_ns > SETTLE_NS
        if sig == signature and settled:
            return _Read(signature=sig, digest=digest)
        try:
            # Refuse by the path's stat first, so a device is not even opened.
            check_regular(self.path, st, self.max_bytes)
            st, data = read_endpoint_file(self.path, self.max_bytes)
        except FileRefused as exc:
            return _Read(signature=sig, error=str(exc))
        except OSError as exc:
            return _Read(signature=f"{self.path}: {exc.strerror or exc}", error=f"{exc}")
        sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        new_digest = hashlib.sha256(data).hexdigest()
        if new_digest == digest:
            # Touched or rewritten with the same content: nothing to apply.
            return _Read(signature=sig, digest=digest)
        try:
            addresses = parse_endpoint_list(data, str(self.path))
        except ValueError as exc:
            return _Read(signature=sig, digest=new_digest, error=str(exc))
        return _Read(signature=sig, digest=new_digest, addresses=addresses)
