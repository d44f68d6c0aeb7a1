"""File discovery: a YAML (or JSON) list of "host:port" strings, re-read when it changes.

The file is polled every `poll_interval` (0.5 s): a `stat()` each time, and a read plus a
content hash only when mtime, size or inode moved, so an idle poll costs one syscall. All
file access and parsing runs in a worker thread, never on the event loop.

A change is applied as a whole (the new list replaces the old one in one step). A file that
is missing, unreadable, empty or malformed keeps the last good set and counts one failure
per distinct bad state, not one per poll. Writers should replace the file atomically
(write a temporary file, then rename it over the old one); a half-written file is at worst
a malformed one, and is picked up again once complete.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sidecar.config.model import Address, FileDiscovery
from sidecar.discovery import DiscoverySink, parse_address

# Endpoint lists are short; a huge file is a mistake, not something to parse.
MAX_FILE_BYTES = 1 << 20

# How long after a write the mtime alone is not trusted to detect a change.
SETTLE_NS = 2_000_000_000

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

Signature = tuple[int, int, int]  # (mtime_ns, size, inode)


@dataclass(frozen=True, slots=True)
class _Read:
    """One poll's outcome: unchanged, a new endpoint list, or an error."""

    signature: Signature | str  # stat signature, or the error text when stat failed
    digest: str | None = None  # content hash when the file was read
    addresses: tuple[Address, ...] | None = None
    error: str | None = None


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


class FileSource:
    kind = "file"

    def __init__(self, config: FileDiscovery, poll_interval: float = 0.5) -> None:
        self.path = Path(config.path)
        self.poll_interval = poll_interval
        self._signature: Signature | str | None = None
        self._digest: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    async def run(self, sink: DiscoverySink) -> None:
        while True:
            read = await asyncio.to_thread(self._poll, self._signature, self._digest)
            changed = read.signature != self._signature or read.digest != self._digest
            self._signature = read.signature
            if read.digest is not None:
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
        if st.st_size > MAX_FILE_BYTES:
            return _Read(signature=sig, error=f"{self.path}: larger than {MAX_FILE_BYTES} bytes")
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            return _Read(signature=f"{self.path}: {exc.strerror or exc}", error=f"{exc}")
        new_digest = hashlib.sha256(data).hexdigest()
        if new_digest == digest:
            # Touched or rewritten with the same content: nothing to apply.
            return _Read(signature=sig, digest=digest)
        try:
            addresses = parse_endpoint_list(data, str(self.path))
        except ValueError as exc:
            return _Read(signature=sig, digest=new_digest, error=str(exc))
        return _Read(signature=sig, digest=new_digest, addresses=addresses)
