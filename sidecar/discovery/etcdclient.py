"""A small etcd v3 client over etcd's JSON gateway (grpc-gateway), on aiohttp.

Only what discovery and registration need: range, put, delete, watch, and the lease calls.
Keys and values travel base64-encoded and int64s as JSON strings, as the gateway wants.

Errors, one class for callers to handle:

    EtcdError            etcd could not be reached, or answered with an error
      EtcdUnavailable    no endpoint answered (connect error, reset, timeout)

An error's text names the endpoint URL with its password masked (`sidecar.redact`), so it
can go to /admin/state and the log as it is.

With several endpoints the client sticks to the one that last worked and moves to the next
when it fails, so a reconnect goes to another member.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import json
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from sidecar.redact import mask_url

# A watch response larger than this without a complete JSON message is not etcd talking.
MAX_MESSAGE_BYTES = 64 << 20


class EtcdError(Exception):
    """etcd could not be reached, or answered with an error."""

    def __init__(self, message: str) -> None:
        # Every message names a URL, and an endpoint URL may carry a password.
        super().__init__(mask_url(message))


class EtcdUnavailable(EtcdError):
    """No etcd endpoint answered."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: str  # "PUT" or "DELETE"
    key: str
    value: bytes  # empty for DELETE


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_range_end(prefix: bytes) -> bytes:
    """The range end covering every key that starts with `prefix` (etcd's GetPrefixRangeEnd)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"  # every key


class EtcdClient:
    def __init__(
        self, endpoints: Sequence[str], session: aiohttp.ClientSession, timeout: float = 3.0
    ) -> None:
        if not endpoints:
            raise ValueError("etcd needs at least one endpoint")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.session = session
        self.timeout = timeout
        self._current = 0

    @property
    def endpoint(self) -> str:
        """The member currently in use."""
        return self.endpoints[self._current]

    def _advance(self) -> None:
        self._current = (self._current + 1) % len(self.endpoints)

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One unary gateway call, trying each member once; the decoded JSON answer."""
        last = "no endpoint tried"
        for _ in range(len(self.endpoints)):
            url = self.endpoint + path
            try:
                async with asyncio.timeout(self.timeout):
                    async with self.session.post(url, json=body) as resp:
                        text = await resp.text()
                        status = resp.status
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                last = f"{url}: {_describe(exc)}"
                self._advance()
                continue
            try:
                data = _decode(text, url)
            except EtcdError:
                if status < 500:
                    raise
                data = {}
            if status >= 500:
                # This member cannot serve (no leader, shutting down): another may.
                last = f"{url}: {_error_message(data, status)}"
                self._advance()
                continue
            if status != 200 or "error" in data:
                raise EtcdError(f"{url}: {_error_message(data, status)}")
            return data
        raise EtcdUnavailable(last)

    async def range_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """Every key under `prefix`, and the store revision they were read at."""
        key = prefix.encode()
        data = await self.call(
            "/v3/kv/range", {"key": _b64(key), "range_end": _b64(prefix_range_end(key))}
        )
        revision = _int(data.get("header", {}).get("revision"))
        kvs = [
            KeyValue(
                key=_unb64(kv.get("key")).decode("utf-8", "replace"),
                value=_unb64(kv.get("value")),
                mod_revision=_int(kv.get("mod_revision")),
                lease=_int(kv.get("lease")),
            )
            for kv in data.get("kvs", [])
        ]
        return revision, kvs

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Write `key`; returns the new revision."""
        body: dict[str, Any] = {"key": _b64(key.encode()), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        data = await self.call("/v3/kv/put", body)
        return _int(data.get("header", {}).get("revision"))

    async def delete(self, key: str) -> int:
        """Delete `key`; returns how many keys went (0 or 1)."""
        data = await self.call("/v3/kv/deleterange", {"key": _b64(key.encode())})
        return _int(data.get("deleted"))

    async def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: (id, granted ttl). etcd may raise a tiny ttl to its minimum."""
        data = await self.call("/v3/lease/grant", {"TTL": str(ttl)})
        lease = _int(data.get("ID"))
        if not lease:
            raise EtcdError(f"lease grant answered without an ID: {data!r:.200}")
        return lease, _int(data.get("TTL", ttl))

    async def keepalive(self, lease: int) -> int:
        """Refresh a lease once; returns its new TTL, 0 when the lease no longer exists."""
        data = await self.call("/v3/lease/keepalive", {"ID": str(lease)})
        # The gateway wraps stream messages in "result"; an expired lease has no TTL.
        result = data.get("result", data)
        return _int(result.get("TTL"))

    async def revoke(self, lease: int) -> bool:
        """Revoke a lease (its keys go with it); False if it had already expired."""
        try:
            await self.call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdUnavailable:
            raise
        except EtcdError as exc:
            if "lease not found" in str(exc):
                return False
            raise
        return True

    async def watch(
        self, prefix: str, start_revision: int, probe_interval: float = 5.0
    ) -> AsyncGenerator[list[WatchEvent], None]:
        """Yield batches of events under `prefix` from `start_revision` on, until an error.

        The first batch is empty: etcd confirmed the watch (from then on no change is missed).

        A quiet watch is indistinguishable from a dead connection, so after every
        `probe_interval` of silence a cheap range call checks that the member still
        answers; if not, the watch ends with EtcdUnavailable. Use it inside
        `contextlib.aclosing()` so the stream closes when the consumer stops.
        """
        key = prefix.encode()
        body = {
            "create_request": {
                "key": _b64(key),
                "range_end": _b64(prefix_range_end(key)),
                "start_revision": str(start_revision),
            }
        }
        url = self.endpoint + "/v3/watch"
        try:
            async with asyncio.timeout(self.timeout):
                # No total timeout: a watch lives as long as etcd does.
                resp = await self.session.post(
                    url,
                    json=body,
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout),
                )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._advance()
            raise EtcdUnavailable(f"{url}: {_describe(exc)}") from None
        try:
            if resp.status != 200:
                text = await resp.text()
                raise EtcdError(f"{url}: {_error_message(_decode(text, url), resp.status)}")
            decoder = json.JSONDecoder()
            utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            buffer = ""
            while True:
                try:
                    async with asyncio.timeout(probe_interval):
                        chunk = await resp.content.readany()
                except TimeoutError:
                    await self._probe(prefix)
                    continue
                except (aiohttp.ClientError, OSError) as exc:
                    self._advance()
                    raise EtcdUnavailable(f"{url}: watch broke: {_describe(exc)}") from None
                if not chunk:
                    self._advance()
                    raise EtcdUnavailable(f"{url}: watch stream closed")
                buffer += utf8.decode(chunk)
                if len(buffer) > MAX_MESSAGE_BYTES:
                    raise EtcdError(f"{url}: watch message larger than {MAX_MESSAGE_BYTES} bytes")
                # The gateway writes one JSON object per message; a chunk can hold
                # several, or part of one.
                while True:
                    buffer = buffer.lstrip()
                    if not buffer:
                        break
                    try:
                        message, end = decoder.raw_decode(buffer)
                    except json.JSONDecodeError:
                        break  # incomplete: wait for more
                    buffer = buffer[end:]
                    events = _watch_events(message, url)
                    if events or message.get("result", {}).get("created"):
                        yield events  # [] once, when etcd confirms the watch
        finally:
            resp.release()
            resp.close()

    async def _probe(self, prefix: str) -> None:
        """A cheap read that proves the current member answers."""
        key = prefix.encode()
        url = self.endpoint + "/v3/kv/range"
        body = {"key": _b64(key), "range_end": _b64(prefix_range_end(key)), "count_only": True}
        try:
            async with asyncio.timeout(self.timeout):
                async with self.session.post(url, json=body) as resp:
                    await resp.read()
                    if resp.status == 200:
                        return
                    problem = f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            problem = _describe(exc)
        self._advance()
        raise EtcdUnavailable(f"{url}: liveness probe failed during watch: {problem}")


def _watch_events(message: Any, url: str) -> list[WatchEvent]:
    if not isinstance(message, dict):
        raise EtcdError(f"{url}: unexpected watch message {message!r:.200}")
    if "error" in message:
        raise EtcdError(f"{url}: watch error: {_error_message(message, 200)}")
    result = message.get("result", {})
    if result.get("canceled"):
        reason = result.get("cancel_reason") or "canceled"
        compact = result.get("compact_revision")
        if compact:
            reason = f"revision compacted (oldest available {compact})"
        raise EtcdError(f"{url}: watch canceled: {reason}")
    events = []
    for ev in result.get("events", ()):
        kv = ev.get("kv", {})
        events.append(
            WatchEvent(
                # PUT is the enum's zero value, which the gateway leaves out.
                kind=ev.get("type", "PUT"),
                key=_unb64(kv.get("key")).decode("utf-8", "replace"),
                value=_unb64(kv.get("value")),
            )
        )
    return events


def _int(value: Any) -> int:
    """An int64 field (the gateway sends them as strings); absent means 0."""
    if value is None:
        return 0
    try:
        return int(value)
    except (TypeError, ValueError):
        raise EtcdError(f"expected an integer from etcd, got {value!r:.50}") from None


def _decode(text: str, url: str) -> dict[str, Any]:
    try:
        data = json.loads(text) if text else {}
    except ValueError:
        raise EtcdError(f"{url}: not JSON: {text[:200]!r}") from None
    if not isinstance(data, dict):
        raise EtcdError(f"{url}: unexpected answer {text[:200]!r}")
    return data


def _error_message(data: dict[str, Any], status: int) -> str:
    error = data.get("error")
    if isinstance(error, dict):  # stream errors nest the details
        return str(error.get("message") or error)
    return str(data.get("message") or error or f"HTTP {status}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
