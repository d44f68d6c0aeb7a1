"""Thrift over HTTP through the sidecar: a real generated client and real Thrift servers.

The service (tests/support/thrift/calculator.thrift) is compiled with Debian's thrift
compiler at test time. The app side is thrift's THttpClient (blocking, so it runs in a
worker thread); the upstreams are thrift's own THttpServer and a TServlet-style aiohttp
handler that can answer 503 on purpose. Every Thrift call is an HTTP POST of one
TBinaryProtocol message to the route's path.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web
from helpers import free_port
from support import thriftcalc
from thrift.protocol import TBinaryProtocol
from thrift.Thrift import TApplicationException
from thrift.transport import TTransport

pytestmark = pytest.mark.external  # needs Debian's thrift-compiler


@pytest.fixture(scope="module")
def gen(tmp_path_factory: pytest.TempPathFactory) -> thriftcalc.Generated:
    return thriftcalc.generate(tmp_path_factory.mktemp("thrift-gen"))


@pytest.fixture
def reference_server(gen: thriftcalc.Generated):
    """thrift's THttpServer on a free port, with its handler."""
    handler = thriftcalc.CalcHandler(gen, name="THttpServer")
    port = free_port()
    server = thriftcalc.ThreadedHttpServer(thriftcalc.processor(gen, handler), port)
    try:
        yield f"127.0.0.1:{port}", handler
    finally:
        server.stop()


async def call(gen, url: str, method: str, *args: Any) -> tuple[Any, Any]:
    """One Thrift call from a fresh client in a worker thread: (result, transport)."""

    def run() -> tuple[Any, Any]:
        client, transport = thriftcalc.client(gen, url)
        try:
            return getattr(client, method)(*args), transport
        finally:
            transport.close()

    return await asyncio.to_thread(run)


def thrift_body(gen, pair: Any) -> bytes:
    """The HTTP body a THttpClient sends for add(pair): one TBinaryProtocol message."""
    buffer = TTransport.TMemoryBuffer()
    gen.Calculator.Client(TBinaryProtocol.TBinaryProtocol(buffer)).send_add(pair)
    body: bytes = buffer.getvalue()
    return body


async def test_a_call_round_trips_arguments_result_and_exceptions(
    gen, reference_server, sidecar
) -> None:
    address, handler = reference_server
    sc = await sidecar(
        f"""
        services:
          calc: {{ endpoints: ["{address}"] }}
        routes:
          - name: calc
            match: {{ prefix: /calc }}
            service: calc
        """
    )
    url = f"{sc.url}/calc"
    # i64 at both ends, non-ASCII text, an empty string and a long one in a list.
    pair = gen.ttypes.Pair(a=2**63 - 1, b=-(2**63), label="grüße ✓", tags=["x", "", "z" * 1000])
    result, transport = await call(gen, url, "add", pair)
    assert result == gen.ttypes.Result(
        value=-1, label="grüße ✓ via THttpServer", tags=["x", "", "z" * 1000]
    )
    assert transport.headers["x-sidecar-attempts"] == "1"
    assert transport.headers["content-type"] == "application/x-thrift"

    # A declared exception travels as a Thrift reply (HTTP 200) with its fields.
    with pytest.raises(gen.ttypes.DivideByZero) as declared:
        await call(gen, url, "divide", gen.ttypes.Pair(a=9, b=0, label="", tags=[]))
    assert (declared.value.message, declared.value.dividend) == ("cannot divide by zero", 9)

    # An undeclared error in the handler is a TApplicationException, also HTTP 200.
    with pytest.raises(TApplicationException) as internal:
        await call(gen, url, "add", gen.ttypes.Pair(a=1, b=1, label="crash", tags=[]))
    assert internal.value.type == TApplicationException.INTERNAL_ERROR

    assert handler.calls == ["add", "divide", "add"]
    # Thrift's application errors are answers, not failures: nothing was retried, and the
    # breaker saw three successes.
    assert sc.sample("sidecar_retries_total", route="calc", service="calc") == 0
    assert sc.sidecar.runtime.services["calc"].breaker.snapshot()["state"] == "closed"


async def test_retries_hide_a_flaky_thrift_endpoint(gen, upstream, sidecar) -> None:
    handler = thriftcalc.CalcHandler(gen, name="flaky")

    async def first_attempt_fails(request: web.Request) -> web.StreamResponse | None:
        if request.headers.get("x-sidecar-attempt") == "1":
            return web.Response(status=503, text="warming up")
        return None

    up = await upstream(
        thriftcalc.aiohttp_handler(thriftcalc.processor(gen, handler), first_attempt_fails)
    )
    sc = await sidecar(
        f"""
        services:
          flaky: {{ endpoints: ["{up.address}"] }}
        routes:
          - name: thrift
            match: {{ prefix: /thrift }}
            service: flaky
            retries:
              max_retries: 2
              retry_on: [connect-failure, reset, 503]
              # Every Thrift call is a POST, which by default is retried only after a
              # connect failure (the request never left). A 503 from this server means
              # it did not run the call, so replaying it is safe here.
              non_idempotent: true
          - name: thrift-default
            match: {{ prefix: /default }}
            service: flaky
            retries: {{ max_retries: 2, retry_on: [connect-failure, reset, 503] }}
        """
    )
    pairs = [gen.ttypes.Pair(a=i, b=10, label=f"call {i}", tags=[str(i)]) for i in range(3)]
    for pair in pairs:
        result, transport = await call(gen, f"{sc.url}/thrift", "add", pair)
        assert result == gen.ttypes.Result(
            value=pair.a + 10, label=f"{pair.label} via flaky", tags=[str(pair.a)]
        )
        assert transport.headers["x-sidecar-attempts"] == "2"
    # Each call reached the server twice, with the same body both times; it ran once.
    assert up.hits == 6
    for first, second in zip(up.seen[::2], up.seen[1::2], strict=True):
        assert (first.headers["x-sidecar-attempt"], second.headers["x-sidecar-attempt"]) == (
            "1",
            "2",
        )
        assert first.body == second.body and first.method == second.method == "POST"
    assert handler.calls == ["add"] * 3
    assert sc.sample("sidecar_retries_total", route="thrift", service="flaky") == 3

    # Without non_idempotent the POST is not retried after a 503: the app sees it.
    with pytest.raises(TTransport.TTransportException, match="HTTP Response code: 503"):
        await call(gen, f"{sc.url}/default", "add", pairs[0])
    assert up.hits == 7
    assert handler.calls == ["add"] * 3


async def test_the_breaker_opens_for_a_dead_thrift_endpoint(gen, sidecar, client) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: every connect is refused
    sc = await sidecar(
        f"""
        services:
          dead:
            endpoints: ["{dead}"]
            circuit_breaker: {{ failure_threshold: 2, reset_timeout: 60s }}
        routes:
          - name: dead
            match: {{ prefix: /dead }}
            service: dead
            retries: {{ max_retries: 0 }}
        """
    )
    pair = gen.ttypes.Pair(a=1, b=2, label="", tags=[])
    url = f"{sc.url}/dead"
    for _ in range(2):  # failure_threshold connect failures (502 upstream_unreachable) ...
        with pytest.raises(TTransport.TTransportException, match="HTTP Response code: 502"):
            await call(gen, url, "add", pair)
    # ... open the breaker: from now on 503 circuit_open, without trying the endpoint.
    assert sc.sidecar.runtime.services["dead"].breaker.snapshot()["state"] == "open"
    with pytest.raises(TTransport.TTransportException, match="HTTP Response code: 503"):
        await call(gen, url, "add", pair)

    # The same call as raw HTTP shows which sidecar error the Thrift client saw.
    async with client.post(
        url, data=thrift_body(gen, pair), headers={"content-type": "application/x-thrift"}
    ) as resp:
        assert resp.status == 503
        assert resp.headers["x-sidecar-error"] == "circuit_open"
        assert resp.headers["x-sidecar-attempts"] == "0"
        body = json.loads(await resp.read())
        assert (body["error"], body["service"], body["route"]) == ("circuit_open", "dead", "dead")
    attempts = sc.sample(
        "sidecar_upstream_attempts_total", service="dead", endpoint=dead, result="connect_error"
    )
    assert attempts == 2  # none after the breaker opened
