"""A real Thrift service for the Thrift-over-HTTP tests: generated code, two servers.

`generate(out_dir)` runs Debian's thrift compiler on `thrift/calculator.thrift` and imports
the generated package (`sidecar_test_calc`). The service can be served two ways:

- `ThreadedHttpServer`: thrift's own `THttpServer` (http.server in a thread), the reference
  server: HTTP/1.0 answers, one request per connection.
- `aiohttp_handler(processor, ...)`: a TServlet-style aiohttp handler on the test's loop
  (POST body in, TBinaryProtocol out), which can misbehave on purpose and counts attempts.

`CheckedHttpClient` is THttpClient with the status check the Java and Go Thrift HTTP
clients make: Python's THttpClient (0.25) hands a non-200 body to the protocol, which then
fails decoding it (for the sidecar's JSON error body: TTransportException "Length exceeded
max allowed") instead of saying what happened; only `transport.code` tells.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiohttp import web
from thrift.protocol import TBinaryProtocol
from thrift.server.THttpServer import THttpServer
from thrift.transport import THttpClient, TTransport

IDL = Path(__file__).parent / "thrift" / "calculator.thrift"
THRIFT = shutil.which("thrift")


@dataclass
class Generated:
    Calculator: ModuleType
    ttypes: ModuleType


def generate(out_dir: Path) -> Generated:
    """Compile the IDL with `thrift --gen py` and import the result (skip without thrift)."""
    if THRIFT is None:
        pytest.skip("thrift compiler not installed (apt-get install thrift-compiler)")
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [THRIFT, "--gen", "py", "-out", str(out_dir), str(IDL)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    sys.path.insert(0, str(out_dir))
    try:
        calculator = importlib.import_module("sidecar_test_calc.Calculator")
        ttypes = importlib.import_module("sidecar_test_calc.ttypes")
    finally:
        sys.path.remove(str(out_dir))
    return Generated(calculator, ttypes)


@dataclass
class CalcHandler:
    """The service's implementation; counts the calls it served."""

    gen: Generated
    name: str = "calc"
    calls: list[str] = field(default_factory=list)

    def add(self, pair: Any) -> Any:
        self.calls.append("add")
        if pair.label == "crash":
            raise RuntimeError("the handler broke")  # undeclared: INTERNAL_ERROR
        return self.gen.ttypes.Result(
            value=pair.a + pair.b, label=f"{pair.label} via {self.name}", tags=pair.tags
        )

    def divide(self, pair: Any) -> Any:
        self.calls.append("divide")
        if pair.b == 0:
            raise self.gen.ttypes.DivideByZero(message="cannot divide by zero", dividend=pair.a)
        return self.gen.ttypes.Result(value=pair.a // pair.b, label=pair.label, tags=pair.tags)


def processor(gen: Generated, handler: CalcHandler) -> Any:
    return gen.Calculator.Processor(handler)


class ThreadedHttpServer:
    """thrift's THttpServer on 127.0.0.1:`port`, serving in a thread until `stop()`."""

    def __init__(self, proc: Any, port: int) -> None:
        factory = TBinaryProtocol.TBinaryProtocolFactory()
        self.server = THttpServer(proc, ("127.0.0.1", port), factory)
        self._thread = threading.Thread(target=self.server.serve, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.httpd.shutdown()
        self.server.httpd.server_close()
        self._thread.join(10)


Misbehave = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


def aiohttp_handler(
    proc: Any, misbehave: Misbehave | None = None
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A TServlet-style aiohttp handler: the POST body is one TBinaryProtocol message.

    `misbehave(request)` may answer instead (a 503, say) by returning a response.
    """
    factory = TBinaryProtocol.TBinaryProtocolFactory()

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if misbehave is not None:
            answer = await misbehave(request)
            if answer is not None:
                return answer
        itrans = TTransport.TMemoryBuffer(body)
        otrans = TTransport.TMemoryBuffer()
        proc.process(factory.getProtocol(itrans), factory.getProtocol(otrans))
        return web.Response(body=otrans.getvalue(), content_type="application/x-thrift")

    return handle


# thrift ships no types (the mypy override names it), so its classes are Any to mypy.
class CheckedHttpClient(THttpClient.THttpClient):  # type: ignore[misc]
    """THttpClient that raises TTransportException for a non-200 answer, as Java's does."""

    def flush(self) -> None:
        super().flush()
        if self.code != 200:
            raise TTransport.TTransportException(
                TTransport.TTransportException.UNKNOWN,
                f"HTTP Response code: {self.code} {self.message}",
            )


def client(gen: Generated, url: str, timeout_ms: int = 10_000) -> tuple[Any, CheckedHttpClient]:
    """A generated Calculator client over HTTP to `url`, and its transport."""
    transport = CheckedHttpClient(url)
    transport.setTimeout(timeout_ms)
    protocol = TBinaryProtocol.TBinaryProtocol(transport)
    return gen.Calculator.Client(protocol), transport
