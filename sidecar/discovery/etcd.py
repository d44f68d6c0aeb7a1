"""etcd discovery: one key per instance under `prefix`, read once, then watched.

Layout (shared with `register`): `<prefix><instance-id>` = `{"address": "host:port", ...}`
(other fields are ignored), or a bare `host:port`. A key whose value cannot be parsed is
left out of the set (and logged); the other instances stay.

The loop: range-read the prefix (applied as one update), then watch from the revision
after that read, applying each watch message as one update, so changes land within
milliseconds. When etcd goes away (connection refused, stream closed, a liveness probe
failing during a quiet watch) the last endpoints stay, a failure is counted, and the loop
reconnects after a back-off (100 ms doubling to 5 s, with jitter), re-reading the whole
range: whatever changed during the outage is picked up in one step.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import aclosing
from typing import Any

import aiohttp

from sidecar.config.model import Address, EtcdDiscovery
from sidecar.discovery import DiscoverySink, parse_address
from sidecar.discovery.etcdclient import EtcdClient, EtcdError
from sidecar.redact import mask_url
from sidecar.resilience.backoff import Backoff

log = logging.getLogger("sidecar.discovery")

BACKOFF_BASE = 0.1
BACKOFF_MAX = 5.0


def parse_instance(value: bytes) -> Address:
    """An instance value: JSON `{"address": "host:port", ...}`, a JSON string, or bare text."""
    text = value.decode("utf-8", "replace").strip()
    if text.startswith(("{", '"')):
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not valid JSON: {exc}") from None
        if isinstance(doc, dict):
            address = doc.get("address")
            if not isinstance(address, str):
                raise ValueError('JSON value needs an "address": "host:port" string')
            return parse_address(address)
        if isinstance(doc, str):
            return parse_address(doc)
        raise ValueError("expected a JSON object or string")
    return parse_address(text)


class EtcdSource:
    kind = "etcd"

    def __init__(self, config: EtcdDiscovery, probe_interval: float = 5.0) -> None:
        self.config = config
        self.probe_interval = probe_interval
        self.revision: int | None = None
        self.connected = False
        self.watching = False
        self.endpoint: str | None = None
        self._members: dict[str, Address] = {}

    def describe(self) -> dict[str, Any]:
        return {
            "prefix": self.config.prefix,
            "endpoint": None if self.endpoint is None else mask_url(self.endpoint),
            "connected": self.connected,
            "watching": self.watching,
            "revision": self.revision,
        }

    async def run(self, sink: DiscoverySink) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=3.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            client = EtcdClient(self.config.endpoints, session)
            # Equal jitter: never hammer, never wait much longer than planned.
            backoff = Backoff(BACKOFF_BASE, BACKOFF_MAX)
            while True:
                try:
                    await self._sync(client, sink)
                except EtcdError as exc:
                    if self.connected:
                        # A working connection just broke: the first retry comes quickly.
                        backoff.reset()
                    self.connected = self.watching = False
                    sink.discovery_failed(mask_url(f"etcd: {exc}"))
                    await asyncio.sleep(backoff.next())

    async def _sync(self, client: EtcdClient, sink: DiscoverySink) -> None:
        """Range, apply, watch; raises EtcdError when the connection is lost."""
        revision, kvs = await client.range_prefix(self.config.prefix)
        self.endpoint = client.endpoint
        self.connected = True
        self.revision = revision
        members: dict[str, Address] = {}
        for kv in kvs:
            address = self._parse(kv.key, kv.value)
            if address is not None:
                members[kv.key] = address
        self._members = members
        sink.discovered(self._addresses())
        stream = client.watch(self.config.prefix, revision + 1, self.probe_interval)
        async with aclosing(stream) as batches:
            async for batch in batches:
                if not batch:
                    self.watching = True  # etcd confirmed the watch
                    continue
                for event in batch:
                    if event.kind == "DELETE":
                        self._members.pop(event.key, None)
                        continue
                    address = self._parse(event.key, event.value)
                    if address is None:
                        self._members.pop(event.key, None)
                    else:
                        self._members[event.key] = address
                sink.discovered(self._addresses())
        raise EtcdError("watch ended")  # watch() ends by raising; this is a backstop

    def _addresses(self) -> list[Address]:
        # Key order: stable across updates, whatever order etcd sent the events in.
        return [self._members[k] for k in sorted(self._members)]

    def _parse(self, key: str, value: bytes) -> Address | None:
        try:
            return parse_instance(value)
        except ValueError as exc:
            log.warning("etcd key %s: ignored: %s", key, exc)
            return None
