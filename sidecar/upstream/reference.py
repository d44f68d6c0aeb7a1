"""The upstream client seam on aiohttp's ClientSession: the reference for conformance tests.

The hand-written HTTP/1.1 client (`sidecar.upstream.h1`) exists only because it is
cheaper; this one exists so both can be held to one suite (tests/test_upstream_
conformance.py), and so a difference between them is a decision, written down there.

It is aiohttp's client with everything a proxy hop must not have turned off: one
session and one TCPConnector (no per-host limit; names cached 5 s like the h1 client's),
no cookies, no redirects, no automatic decompression, no automatic request headers,
and response headers taken from `raw_headers`, so the exact bytes survive. aiohttp's
own head limits are set to the contract's (64 KiB per line and field, 100 fields).

aiohttp's exceptions are mapped to the seam's errors here, once:

    ConnectionTimeoutError    ConnectTimeout (or TimeoutError when the deadline was shorter)
    ClientConnectorDNSError   ResolveFailed (a ConnectFailed)
    ClientConnectorError      ConnectFailed
    any other ClientError,
    a status outside 200..599,
    a 101, or a control
    character in the head     UpstreamBroken (aiohttp lets the last three through)

Known differences from the h1 client (each is a case in the conformance suite): aiohttp
drops 1xx interim responses instead of forwarding them, keeps no trailers, ignores an
upstream's `Keep-Alive: timeout=N` (its idle limit is one `keepalive_timeout` for all),
resends an idempotent request once by itself when a connection drops under it, and
reuses a connection after HEAD.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Final

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.endpoint import Endpoint
from sidecar.upstream.base import (
    ConnectFailed,
    ConnectTimeout,
    UpstreamBroken,
    UpstreamRequest,
)
from sidecar.upstream.h1.connection import MAX_FIELDS, MAX_HEAD_BYTES
from sidecar.upstream.h1.pool import DEFAULT_IDLE_TIMEOUT
from sidecar.upstream.h1.resolver import DNS_TTL, ResolveFailed

_SKIP_AUTO_HEADERS: Final = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_CONTROL_BYTES: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _broken(exc: BaseException) -> UpstreamBroken:
    text = str(exc) or type(exc).__name__
    return UpstreamBroken(f"{type(exc).__name__}: {text}")


class ReferenceResponse:
    """An aiohttp ClientResponse behind the seam's `UpstreamResponse`."""

    __slots__ = ("_response", "content_length", "headers", "reason", "status", "trailers")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.reason = response.reason or None
        self.headers = CIMultiDictProxy(
            CIMultiDict(
                (n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                for n, v in response.raw_headers
            )
        )
        length = self.headers.get("Content-Length")
        self.content_length = (
            int(length) if length is not None and "Transfer-Encoding" not in self.headers else None
        )
        self.trailers: CIMultiDictProxy[str] | None = None  # aiohttp keeps none

    async def iter_chunks(self, idle_timeout: float | None = None) -> AsyncIterator[bytes]:
        content = self._response.content
        while True:
            try:
                async with asyncio.timeout(idle_timeout):
                    chunk = await content.readany()
            except aiohttp.ClientError as exc:
                raise _broken(exc) from None
            if not chunk:
                return
            yield chunk

    async def read(self, idle_timeout: float | None = None) -> bytes:
        return b"".join([c async for c in self.iter_chunks(idle_timeout)])

    def release(self) -> None:
        # aiohttp pools the connection if the body was read to its end, else closes it.
        self._response.release()


class ReferenceClient:
    """The seam's `UpstreamClient` on one aiohttp ClientSession (made on first use)."""

    def __init__(self, idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        self._idle_timeout = idle_timeout
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None:
            connector = aiohttp.TCPConnector(
                limit=0,
                limit_per_host=0,
                ttl_dns_cache=int(DNS_TTL),
                keepalive_timeout=self._idle_timeout,
            )
            session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=_SKIP_AUTO_HEADERS,
                timeout=aiohttp.ClientTimeout(total=None),
                max_line_size=MAX_HEAD_BYTES,
                max_field_size=MAX_HEAD_BYTES,
                max_headers=MAX_FIELDS,
            )
            self._session = session
        return session

    async def request(
        self,
        endpoint: Endpoint,
        request: UpstreamRequest,
        *,
        connect_timeout: float,
        deadline: float,
    ) -> ReferenceResponse:
        session = self._get_session()
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError("no time left to connect")
        headers = CIMultiDict[str]([("Host", request.authority), *request.headers])
        body = request.body
        if body is not None and not isinstance(body, bytes) and request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)
        url = URL(f"http://{endpoint.key}{request.target}", encoded=True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(connect_timeout, remaining))
        try:
            async with asyncio.timeout_at(deadline):
                response = await session.request(
                    request.method,
                    url,
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    timeout=timeout,
                    compress=None,
                )
        except aiohttp.ConnectionTimeoutError:
            if connect_timeout < remaining:
                raise ConnectTimeout(
                    f"connect timeout after {connect_timeout * 1000:.0f}ms"
                ) from None
            raise TimeoutError("the attempt's deadline passed while connecting") from None
        except aiohttp.ClientConnectorDNSError as exc:
            raise ResolveFailed(f"cannot resolve {endpoint.address.host}: {exc}") from None
        except aiohttp.ClientConnectorError as exc:
            raise ConnectFailed(exc.strerror or str(exc)) from None
        except aiohttp.ClientError as exc:
            raise _broken(exc) from None
        status = response.status
        if status == 101 or not 200 <= status <= 599:
            response.close()
            raise UpstreamBroken(f"upstream status {status} is not a final answer to relay")
        # aiohttp's client accepts control characters in values and the reason phrase;
        # relayed, they would make a malformed head for the app.
        if _CONTROL.search(response.reason or "") or any(
            _CONTROL_BYTES.search(value) for _, value in response.raw_headers
        ):
            response.close()
            raise UpstreamBroken("upstream head has a control character in a value or reason")
        return ReferenceResponse(response)

    def forget(self, endpoint: Endpoint) -> None:
        # aiohttp's connector offers no per-host close; idle connections to a removed
        # endpoint expire with keepalive_timeout.
        return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
