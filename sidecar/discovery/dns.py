"""DNS discovery: A, AAAA or SRV records, re-resolved every `refresh`.

Resolution goes through aiodns (c-ares), which never blocks the event loop. `nameservers`
(with optional ports, `127.0.0.1:5353`) replace the system resolvers when given.

- A / AAAA: every address in the answer, with the configured `port`.
- SRV: `name` is the full SRV name (`_orders._tcp.example`). The records with the lowest
  priority are used (higher ones are backups, per RFC 2782); weights are ignored, since
  the balancer spreads load anyway. Each target is resolved to its addresses (from the
  answer's additional section when the server sent them, else by an A then AAAA lookup)
  and gets the record's port. A target of "." means "no service" and is skipped.

An error, a timeout or an empty answer (NXDOMAIN, no records) counts as a failure and
keeps the last good set: a DNS blip must not empty a service. After a failure the next
try comes sooner than `refresh` (about 0.5 s, doubling up to `refresh`, with equal jitter),
as with Envoy's `dns_failure_refresh_rate`: a lookup that failed as the sidecar started
(the resolver not up yet, a dropped packet) would otherwise leave the service without
endpoints for a whole refresh.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiodns
import pycares

from sidecar.config.model import Address, DnsDiscovery
from sidecar.discovery import DiscoverySink
from sidecar.resilience.backoff import Backoff

log = logging.getLogger("sidecar.discovery")

FAILURE_RETRY_BASE = 0.5  # s; doubles per consecutive failure, never past `refresh`

_ADDRESS_TYPES = (pycares.ARecordData, pycares.AAAARecordData)


class DnsSource:
    kind = "dns"

    def __init__(self, config: DnsDiscovery) -> None:
        self.config = config
        # One try must fit well inside a refresh, so a dead server does not stall updates.
        self.try_timeout = min(max(config.refresh / 2, 0.2), 2.0)
        self.tries = 2
        self.backoff = Backoff(min(FAILURE_RETRY_BASE, config.refresh), config.refresh)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.config.name,
            "record": self.config.record,
            "refresh": self.config.refresh,
        }

    async def run(self, sink: DiscoverySink) -> None:
        servers = [str(a) for a in self.config.nameservers] or None
        resolver = aiodns.DNSResolver(
            nameservers=servers,
            loop=asyncio.get_running_loop(),
            timeout=self.try_timeout,
            tries=self.tries,
        )
        # Bound a whole refresh (SRV needs follow-up lookups) even if c-ares misbehaves.
        bound = self.try_timeout * self.tries * max(1, len(self.config.nameservers)) * 3 + 1
        try:
            while True:
                if await self._refresh(resolver, bound, sink):
                    self.backoff.reset()
                    delay = self.config.refresh
                else:
                    delay = self.backoff.next()
                await asyncio.sleep(delay)
        finally:
            await resolver.close()

    async def _refresh(
        self, resolver: aiodns.DNSResolver, bound: float, sink: DiscoverySink
    ) -> bool:
        """One lookup, reported to `sink`; True if it gave endpoints."""
        try:
            async with asyncio.timeout(bound):
                addresses = await self.resolve(resolver)
        except aiodns.error.DNSError as exc:
            sink.discovery_failed(self._describe_error(exc))
        except TimeoutError:
            sink.discovery_failed(f"{self._what()}: no answer within {bound:.1f}s")
        except ValueError as exc:
            sink.discovery_failed(str(exc))
        else:
            if addresses:
                sink.discovered(addresses)
                return True
            sink.discovery_failed(f"{self._what()}: no usable records")
        return False

    def _what(self) -> str:
        return f"DNS {self.config.record} {self.config.name}"

    def _describe_error(self, exc: aiodns.error.DNSError) -> str:
        message = exc.args[1] if len(exc.args) > 1 else str(exc)
        return f"{self._what()}: {message}"

    async def resolve(self, resolver: aiodns.DNSResolver) -> list[Address]:
        """The endpoint set the records give, sorted so record rotation is not a change."""
        record = self.config.record
        if record in ("A", "AAAA"):
            port = self.config.port
            if port is None:  # the config loader requires it; guard against a bad object
                raise ValueError(f"{self._what()}: a port is required for {record} records")
            result = await resolver.query_dns(self.config.name, record)
            hosts = {r.data.addr for r in result.answer if isinstance(r.data, _ADDRESS_TYPES)}
            return sorted((Address(h, port) for h in hosts), key=_order)
        return await self._resolve_srv(resolver)

    async def _resolve_srv(self, resolver: aiodns.DNSResolver) -> list[Address]:
        result = await resolver.query_dns(self.config.name, "SRV")
        srvs = [r.data for r in result.answer if isinstance(r.data, pycares.SRVRecordData)]
        srvs = [s for s in srvs if s.target not in ("", ".")]
        if not srvs:
            return []
        best = min(s.priority for s in srvs)
        glue: dict[str, set[str]] = {}
        for r in result.additional:
            if isinstance(r.data, _ADDRESS_TYPES):
                glue.setdefault(_norm(r.name), set()).add(r.data.addr)
        found: set[Address] = set()
        for srv in srvs:
            if srv.priority != best:
                continue
            target = _norm(srv.target)
            hosts = glue.get(target)
            if hosts is None:
                hosts = set(await _lookup(resolver, target, "A"))
                if not hosts:
                    hosts = set(await _lookup(resolver, target, "AAAA"))
            if not hosts:
                log.warning("SRV %s: target %s has no address", self.config.name, target)
            found.update(Address(h, srv.port) for h in hosts)
        return sorted(found, key=_order)


async def _lookup(resolver: aiodns.DNSResolver, name: str, record: str) -> list[str]:
    """Addresses of `name`; an SRV target without this record type gives []."""
    try:
        result = await resolver.query_dns(name, record)
    except aiodns.error.DNSError as exc:
        # ENODATA / ENOTFOUND for a follow-up lookup just means "none of this type".
        if exc.args and exc.args[0] in (aiodns.error.ARES_ENODATA, aiodns.error.ARES_ENOTFOUND):
            return []
        raise
    return [r.data.addr for r in result.answer if isinstance(r.data, _ADDRESS_TYPES)]


def _norm(name: str) -> str:
    return name.rstrip(".").lower()


def _order(a: Address) -> tuple[str, int]:
    return (a.host, a.port)
