"""gRPC through the sidecar, end to end: a real grpcio client calls 127.0.0.1:<listen>
with an insecure channel, the sidecar routes it over h2c to a real grpcio server.

Every case counts what the server saw (calls, metadata, deadlines) and what the client
got (messages, metadata, trailers, status), with short configured durations.
"""

from __future__ import annotations

import grpc
import pytest
from helpers import free_port
from support import eventually
from support.grpc_peers import SERVICE, grpc_channel, grpc_server

RAW = {"request_serializer": None, "response_deserializer": None}


def grpc_config(address: str, *, route_extra: str = "", service_extra: str = "") -> str:
    return f"""
    services:
      echo:
        endpoints: ["{address}"]
        protocol: h2c
        {service_extra}
    routes:
      - name: echo
        match: {{ prefix: /{SERVICE}/ }}
        service: echo
        {route_extra}
    """


async def unary_through(address: str) -> tuple[bytes, list, list]:
    async with grpc_channel(address) as channel:
        call = channel.unary_unary(f"/{SERVICE}/Unary", **RAW)(
            b"hi", metadata=(("x-app", "a1"), ("x-app-bin", b"\x00\x01\xfe"))
        )
        reply = await call
        assert await call.code() == grpc.StatusCode.OK
        return reply, list(await call.initial_metadata()), list(await call.trailing_metadata())


async def test_unary_call_passes_metadata_and_trailers_byte_for_byte(sidecar):
    async with grpc_server() as up:
        sc = await sidecar(grpc_config(up.address))
        direct = await unary_through(up.address)
        proxied = await unary_through(f"127.0.0.1:{sc.listen}")
        assert proxied[0] == direct[0] == b"echo:hi"
        # The sidecar adds only x-sidecar-attempts and x-request-id to the head.
        added = [m for m in proxied[1] if m not in direct[1]]
        assert sorted(k for k, _ in added) == ["x-request-id", "x-sidecar-attempts"]
        assert [m for m in proxied[1] if m in direct[1]] == direct[1]
        assert ("x-initial-bin", b"\x00\xff") in proxied[1]
        assert proxied[2] == direct[2]  # trailers, -bin ones included, in order
        assert ("x-trailer-bin", b"\x01\x02\x03") in proxied[2]
        _direct_seen, proxied_seen = up.service.calls
        assert ("x-app", "a1") in proxied_seen.metadata
        assert ("x-app-bin", b"\x00\x01\xfe") in proxied_seen.metadata
        assert (
            sc.sample("sidecar_grpc_responses_total", route="echo", service="echo", grpc_code="OK")
            == 1
        )


async def test_streaming_both_ways(sidecar):
    async with grpc_server() as up:
        sc = await sidecar(grpc_config(up.address))
        async with grpc_channel(f"127.0.0.1:{sc.listen}") as channel:
            stream = channel.unary_stream(f"/{SERVICE}/ServerStream", **RAW)(b"50:1000")
            got = [m async for m in stream]
            assert len(got) == 50 and all(len(m) == 1000 for m in got)

            async def messages():
                for i in range(20):
                    yield f"m{i}".encode()

            result = await channel.stream_unary(f"/{SERVICE}/ClientStream", **RAW)(messages())
            assert result == b"20:" + str(sum(len(f"m{i}") for i in range(20))).encode()

            bidi = channel.stream_stream(f"/{SERVICE}/Bidi", **RAW)()
            for i in range(5):
                await bidi.write(f"b{i}".encode())
                assert await bidi.read() == f"echo:b{i}".encode()  # interleaved, one by one
            await bidi.done_writing()
            assert await bidi.code() == grpc.StatusCode.OK


async def test_server_status_reaches_the_client(sidecar):
    async with grpc_server() as up:
        sc = await sidecar(grpc_config(up.address))
        async with grpc_channel(f"127.0.0.1:{sc.listen}") as channel:
            call = channel.unary_unary(f"/{SERVICE}/Unary", **RAW)(
                b"x", metadata=(("x-abort", "NOT_FOUND"), ("x-message", "no such thing"))
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details() == "no such thing"
        assert (
            sc.sample(
                "sidecar_grpc_responses_total", route="echo", service="echo", grpc_code="NotFound"
            )
            == 1
        )


async def test_deadline_lowers_the_route_timeout_and_reaches_the_server(sidecar):
    async with grpc_server() as up:
        sc = await sidecar(grpc_config(up.address, route_extra="timeout: 10s"))
        async with grpc_channel(f"127.0.0.1:{sc.listen}") as channel:
            await channel.unary_unary(f"/{SERVICE}/Unary", **RAW)(b"x", timeout=2.0)
        (seen,) = up.service.calls
        assert seen.time_remaining is not None and 0 < seen.time_remaining <= 2.0


async def test_sidecar_errors_are_trailers_only_statuses(sidecar):
    dead = free_port()
    sc = await sidecar(grpc_config(f"127.0.0.1:{dead}", route_extra="retries: { max_retries: 0 }"))
    async with grpc_channel(f"127.0.0.1:{sc.listen}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary(f"/{SERVICE}/Unary", **RAW)(b"x")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "upstream_unreachable" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary("/other.Service/Method", **RAW)(b"x")
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "no_route" in err.value.details()
        trailing = dict(err.value.trailing_metadata() or ())
        assert trailing.get("x-sidecar-error") == "no_route"


async def test_the_route_timeout_covers_the_whole_stream(sidecar):
    async with grpc_server() as up:
        sc = await sidecar(grpc_config(up.address, route_extra="timeout: 500ms"))
        async with grpc_channel(f"127.0.0.1:{sc.listen}") as channel:
            # The server sends its head, then waits: the stream outlives the route timeout.
            stream = channel.unary_stream(f"/{SERVICE}/ServerStream", **RAW)(
                b"3:8", metadata=(("x-wait", "1"),)
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stream:
                    pass
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert sc.sample("sidecar_timeouts_total", route="echo", service="echo", kind="route") == 1
        assert (
            sc.sample(
                "sidecar_grpc_responses_total",
                route="echo",
                service="echo",
                grpc_code="DeadlineExceeded",
            )
            == 1
        )


async def test_grpc_health_check_marks_a_not_serving_endpoint_unhealthy(sidecar):
    async with grpc_server() as good, grpc_server() as bad:
        await good.health.set("", "SERVING")
        await bad.health.set("", "NOT_SERVING")
        sc = await sidecar(
            f"""
    services:
      echo:
        endpoints: ["{good.address}", "{bad.address}"]
        protocol: h2c
        health_check: {{ grpc: true, interval: 50ms, timeout: 500ms, unhealthy_threshold: 1 }}
    routes:
      - {{ name: echo, match: {{ prefix: /{SERVICE}/ }}, service: echo }}
    """
        )
        await eventually(
            lambda: (
                [e.state for e in sc.sidecar.runtime.services["echo"].cluster.endpoints]
                == ["healthy", "unhealthy"]
            )
        )
        async with grpc_channel(f"127.0.0.1:{sc.listen}") as channel:
            for _ in range(4):
                await channel.unary_unary(f"/{SERVICE}/Unary", **RAW)(b"x")
        assert len(good.service.calls) == 4 and bad.service.calls == []
