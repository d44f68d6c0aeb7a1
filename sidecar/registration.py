"""Registration: announce the local app in etcd while it is healthy.

`register` config: the app at `address` is published as service `service` under
`<prefix><service>/<instance-id>` with the JSON value
`{"address": "host:port", "service": ..., "instance": ..., "registered_at": UNIX_TS}`,
attached to a lease of `ttl` seconds. The lease is kept alive every ttl/3 (one
LeaseKeepAlive call through the gateway each time), so if the sidecar dies the key
disappears within `ttl` on its own.

With a `health_check`, the app's `path` on `address` is checked every `interval` with
`http_probe` (a GET over a new connection; a 2xx within min(interval, 2 s) passes). While
it fails, the lease is revoked (taking the key with it) so discovery stops sending
traffic; when it passes again, a fresh lease is granted and the key is written again.
Without a health check the app counts as healthy.

If etcd is unreachable, the loop keeps trying, 100 ms after the first failure, doubling
(with jitter) up to 1 s or ttl/3, whichever is shorter, so a lease is never left to expire
for want of a try; a lease that expired in the meantime is replaced by a new one as soon
as etcd answers.

instance-id: `SIDECAR_INSTANCE_ID` if set, else `<hostname>-<pid>` (unique per sidecar
process on a host; a restarted sidecar writes a new key and the old one expires with its
lease). Tests and embedders can pass `instance_id=`.

Lifecycle: `start()` registers (waiting briefly for the first attempt), `deregister()`
revokes the lease and stops the loop (the server calls it on SIGTERM before draining, so
peers stop sending new requests first), `close()` deregisters if still needed and closes
the HTTP session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import time
from typing import Any

import aiohttp

from sidecar.cluster.probes import http_check
from sidecar.config.model import RegisterConfig
from sidecar.discovery.etcdclient import EtcdClient, EtcdError
from sidecar.resilience.backoff import Backoff
from sidecar.tasks import TaskOwner

log = logging.getLogger("sidecar.registration")

APP_CHECK_MAX_TIMEOUT = 2.0
FIRST_ATTEMPT_TIMEOUT = 3.0
RETRY_BASE = 0.1  # the first etcd retry after a failure; doubles per failure in a row
RETRY_INTERVAL = 1.0  # the longest wait between etcd attempts while etcd fails


def default_instance_id() -> str:
    return os.environ.get("SIDECAR_INSTANCE_ID") or f"{socket.gethostname()}-{os.getpid()}"


class Registration:
    def __init__(self, config: RegisterConfig, *, instance_id: str | None = None) -> None:
        self.config = config
        self.instance_id = instance_id or default_instance_id()
        self.key = f"{config.etcd.prefix}{config.service}/{self.instance_id}"
        self.lease: int | None = None
        self.granted_ttl: int | None = None
        self.app_healthy: bool | None = None  # None until the first check
        self.last_error: str | None = None
        self.registered_at: float | None = None
        self._owner = TaskOwner(f"registration:{config.service}")
        self._session: aiohttp.ClientSession | None = None
        self._client: EtcdClient | None = None
        self._first_attempt = asyncio.Event()
        self._stopped = False
        self._retry = Backoff(RETRY_BASE, RETRY_INTERVAL)

    @property
    def registered(self) -> bool:
        return self.lease is not None

    async def start(self) -> None:
        """Start the register / keep-alive / health loop; waits briefly for the first try."""
        if self._session is not None:
            return
        self._session = aiohttp.ClientSession()
        self._client = EtcdClient(self.config.etcd.endpoints, self._session)
        self._owner.spawn(self._run(), name="loop")
        try:
            async with asyncio.timeout(FIRST_ATTEMPT_TIMEOUT):
                await self._first_attempt.wait()
        except TimeoutError:
            log.warning("registration of %s: still trying in the background", self.key)

    async def deregister(self) -> None:
        """Stop keeping the registration alive and revoke the lease (removing the key)."""
        self._stopped = True
        await self._owner.close()
        if self.lease is not None and self._client is not None:
            try:
                await self._revoke("deregistered")
            except EtcdError as exc:
                # The lease still expires on its own within ttl.
                log.warning("deregister %s: %s (the lease expires in ttl)", self.key, exc)
                self.lease = None

    async def close(self) -> None:
        """Deregister if still registered, then close the HTTP session."""
        await self.deregister()
        if self._session is not None:
            await self._session.close()

    def snapshot(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "service": self.config.service,
            "address": str(self.config.address),
            "registered": self.registered,
            "lease": self.lease,
            "ttl": self.granted_ttl,
            "app_healthy": self.app_healthy,
            "last_error": self.last_error,
            "consecutive_failures": self._retry.failures,  # etcd attempts failed in a row
        }

    # -- the loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._session is not None
        check = self.config.health_check
        next_check = next_etcd = time.monotonic()
        while not self._stopped:
            now = time.monotonic()
            if check is None:
                self.app_healthy = True
            elif now >= next_check:
                healthy = await self._check_app()
                if healthy != self.app_healthy:
                    next_etcd = now  # the app flipped: act on it at once
                self.app_healthy = healthy
                next_check = now + check.interval
            if now >= next_etcd:
                next_etcd = await self._sync_etcd()
            self._first_attempt.set()
            wake = next_etcd if check is None else min(next_check, next_etcd)
            await asyncio.sleep(max(wake - time.monotonic(), 0.01))

    async def _sync_etcd(self) -> float:
        """Bring etcd in line with the app's health; returns when to act next."""
        try:
            if self.app_healthy and self.lease is None:
                await self._register()
            elif self.app_healthy:
                await self._keepalive()
            elif self.lease is not None:
                await self._revoke("the app's health check failed")
        except EtcdError as exc:
            if str(exc) != self.last_error:
                log.warning("registration of %s: %s", self.key, exc)
            self.last_error = str(exc)
            return time.monotonic() + self._retry_delay()
        except Exception as exc:
            # A bug or a surprising answer must not end the loop: the key would silently
            # expire. Log it loudly and try again like any other failure.
            log.exception("registration of %s: unexpected error", self.key)
            self.last_error = f"unexpected error: {exc!r}"
            return time.monotonic() + self._retry_delay()
        self.last_error = None
        self._retry.reset()
        return time.monotonic() + self._keepalive_interval()

    def _retry_delay(self) -> float:
        """Retry soon, but not in a tight loop, and never later than the next keep-alive."""
        return min(self._retry.next(), self._keepalive_interval())

    def _keepalive_interval(self) -> float:
        ttl = self.granted_ttl or self.config.ttl
        return max(ttl / 3, 0.1)

    async def _check_app(self) -> bool:
        check = self.config.health_check
        assert check is not None
        timeout = min(check.interval, APP_CHECK_MAX_TIMEOUT)
        outcome = await http_check(self.config.address, check.path, timeout)
        if outcome.ok != self.app_healthy:
            level = logging.INFO if outcome.ok else logging.WARNING
            log.log(
                level,
                "registration of %s: app health check http://%s%s: %s",
                self.key,
                self.config.address,
                check.path,
                outcome.detail,
            )
        return outcome.ok

    async def _register(self) -> None:
        assert self._client is not None
        lease, ttl = await self._client.grant(max(1, math.ceil(self.config.ttl)))
        self.registered_at = time.time()
        value = {
            "address": str(self.config.address),
            "service": self.config.service,
            "instance": self.instance_id,
            "registered_at": self.registered_at,
        }
        try:
            await self._client.put(self.key, json.dumps(value).encode(), lease=lease)
        except EtcdError:
            # Without its key the lease is useless; it expires on its own if this fails too.
            with contextlib.suppress(EtcdError):
                await self._client.revoke(lease)
            raise
        self.lease, self.granted_ttl = lease, ttl
        log.info("registered %s -> %s (lease %x, ttl %ds)", self.key, value["address"], lease, ttl)

    async def _keepalive(self) -> None:
        assert self._client is not None and self.lease is not None
        ttl = await self._client.keepalive(self.lease)
        if ttl <= 0:
            # Expired (e.g. etcd was unreachable for longer than ttl): register anew.
            log.warning("registration of %s: lease expired; registering again", self.key)
            self.lease = None
            await self._register()

    async def _revoke(self, why: str) -> None:
        assert self._client is not None and self.lease is not None
        await self._client.revoke(self.lease)
        log.info("deregistered %s: %s", self.key, why)
        self.lease = None
