"""Addresses for upstream connections: IP literals as they are, host names from a small cache.

Without a cache every new upstream connection to `orders.internal:8080` asked the system
resolver again (a thread-pool round trip each, and a burst of them after a restart or an
idle period). The system resolver gives no TTL, so names are kept for a short fixed `ttl`
(5 s): short enough that a changed record is followed within seconds, long enough that a
burst of new connections costs one lookup. The cache is bounded (`max_entries`); lookups
run off the event loop (`loop.getaddrinfo`); concurrent lookups of one name share one
resolution. Failures are not cached: a name that does not resolve is asked again on the
next connection (each is a connect failure the attempt loop already paces).

IP literals never touch the resolver or the cache.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Final

from sidecar.upstream.base import NameNotResolved

# (family, sockaddr) pairs to connect to, in the resolver's order.
Addresses = list[tuple[int, Any]]
GetAddrInfo = Callable[..., Awaitable[list[tuple[Any, ...]]]]

DNS_TTL: Final = 5.0
MAX_ENTRIES: Final = 1024


class ResolveFailed(NameNotResolved):
    """The host name did not resolve: no connection could be attempted."""


def literal_addresses(host: str, port: int) -> Addresses | None:
    """The address of an IP literal, or None when `host` is a name."""
    try:
        socket.inet_pton(socket.AF_INET, host)
    except OSError:
        pass
    else:
        return [(socket.AF_INET, (host, port))]
    try:
        socket.inet_pton(socket.AF_INET6, host)
    except OSError:
        return None
    return [(socket.AF_INET6, (host, port, 0, 0))]


class HostCache:
    """Host name -> addresses, each kept `ttl` seconds; at most `max_entries` names.

    `getaddrinfo` and `clock` are parameters so a unit test can count lookups and move
    time; by default they are the running loop's.
    """

    def __init__(
        self,
        *,
        ttl: float = DNS_TTL,
        max_entries: int = MAX_ENTRIES,
        getaddrinfo: GetAddrInfo | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._getaddrinfo = getaddrinfo
        self._clock = clock
        self._entries: dict[tuple[str, int], tuple[float, Addresses]] = {}
        # One shared resolution per name in progress: the result, or the error it raised.
        self._pending: dict[tuple[str, int], asyncio.Future[Addresses | BaseException]] = {}
        self.lookups = 0  # resolutions started (what the cache saves is visible here)

    def __len__(self) -> int:
        return len(self._entries)

    async def resolve(self, host: str, port: int) -> Addresses:
        literal = literal_addresses(host, port)
        if literal is not None:
            return literal
        loop = asyncio.get_running_loop()
        now = self._clock() if self._clock is not None else loop.time()
        key = (host, port)
        entry = self._entries.get(key)
        if entry is not None:
            if entry[0] > now:
                return entry[1]
            del self._entries[key]
        while True:
            shared = self._pending.get(key)
            if shared is None:
                return await self._lookup(key, loop)
            # Our own cancellation must not cancel the lookup others wait for.
            result = await asyncio.shield(shared)
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    continue  # its owner was cancelled, not the lookup's fault: ask again
                raise result
            return result

    async def _lookup(self, key: tuple[str, int], loop: asyncio.AbstractEventLoop) -> Addresses:
        shared: asyncio.Future[Addresses | BaseException] = loop.create_future()
        self._pending[key] = shared
        self.lookups += 1
        host, port = key
        getaddrinfo = self._getaddrinfo or loop.getaddrinfo
        try:
            infos = await getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except asyncio.CancelledError as exc:
            shared.set_result(exc)
            raise
        except OSError as exc:
            error = ResolveFailed(f"cannot resolve {host}: {exc.strerror or exc}")
            shared.set_result(error)
            raise error from None
        finally:
            self._pending.pop(key, None)
        addresses: Addresses = []
        for family, _type, _proto, _name, sockaddr in infos:
            pair = (family, sockaddr)
            if pair not in addresses:
                addresses.append(pair)
        if not addresses:
            error = ResolveFailed(f"cannot resolve {host}: no addresses")
            shared.set_result(error)
            raise error
        now = self._clock() if self._clock is not None else loop.time()
        self._store(key, now + self.ttl, addresses, now)
        shared.set_result(addresses)
        return addresses

    def _store(
        self, key: tuple[str, int], expires: float, addresses: Addresses, now: float
    ) -> None:
        entries = self._entries
        if len(entries) >= self.max_entries:
            for old in [k for k, (until, _) in entries.items() if until <= now]:
                del entries[old]
            while len(entries) >= self.max_entries:
                del entries[next(iter(entries))]  # the oldest insertion
        entries[key] = (expires, addresses)
