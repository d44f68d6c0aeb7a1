"""W3C trace context through the sidecar: kept when valid, started when not, in the access
log, and as exemplars on the duration histogram when OpenMetrics is asked for."""

from __future__ import annotations

import re

import pytest
from aiohttp import web
from helpers import one_service

from sidecar.tracing import trace_context, valid_trace_id

VALID = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize(
    "value",
    [
        VALID,
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
        # A later version may add fields after a dash; they are ignored.
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-comes-next",
        "cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-09",
    ],
)
def test_valid_traceparents(value):
    assert valid_trace_id(value) == "0af7651916cd43dd8448eb211c80319c"
    trace = trace_context(value)
    assert (trace.trace_id, trace.traceparent, trace.replaced) == (
        valid_trace_id(value),
        value,
        False,
    )


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        VALID.upper(),  # hex must be lower-case
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # version ff
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # zero trace id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # zero parent id
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",  # 00 is exact
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01x",  # no dash after
        "00_0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331_01",
        "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0",
    ],
)
def test_invalid_traceparents_start_a_new_trace(value):
    assert valid_trace_id(value) is None
    trace = trace_context(value)
    assert trace.replaced
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", trace.traceparent)
    assert valid_trace_id(trace.traceparent) == trace.trace_id


async def test_a_valid_traceparent_and_its_tracestate_go_upstream_as_received(
    upstream, sidecar, client
):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    headers = {"traceparent": VALID, "tracestate": "vendor=abc,other=1"}
    async with client.get(f"{sc.url}/api", headers=headers) as resp:
        assert resp.status == 200
    (seen,) = up.seen
    assert seen.headers["traceparent"] == VALID
    assert seen.headers["tracestate"] == "vendor=abc,other=1"
    (line,) = await sc.access_lines()
    assert line["trace_id"] == "0af7651916cd43dd8448eb211c80319c"


@pytest.mark.parametrize(
    "traceparent", [None, "00-00000000000000000000000000000000-b7ad6b7169203331-01"]
)
async def test_an_absent_or_invalid_traceparent_starts_a_trace_and_drops_tracestate(
    traceparent, upstream, sidecar, client
):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    headers = {"tracestate": "vendor=abc"}
    if traceparent is not None:
        headers["traceparent"] = traceparent
    async with client.get(f"{sc.url}/api", headers=headers) as resp:
        assert resp.status == 200
    (seen,) = up.seen
    sent = seen.headers["traceparent"]
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", sent), sent
    assert "tracestate" not in seen.headers
    assert [k for k, _ in seen.raw_headers if k.lower() == "traceparent"] == ["traceparent"]
    (line,) = await sc.access_lines()
    assert line["trace_id"] == sent[3:35]


async def test_every_attempt_carries_the_same_trace(upstream, sidecar, client):
    calls = [0]

    async def fail_once(request: web.Request) -> web.StreamResponse:
        calls[0] += 1
        return web.Response(status=503 if calls[0] == 1 else 200)

    up = await upstream(fail_once)
    sc = await sidecar(one_service(up.address, route_extra="retries: { max_retries: 1 }"))
    async with client.get(f"{sc.url}/api", headers={"traceparent": VALID}) as resp:
        assert resp.status == 200
        assert resp.headers["x-sidecar-attempts"] == "2"
    assert [s.headers["traceparent"] for s in up.seen] == [VALID, VALID]


async def test_duration_buckets_carry_trace_id_exemplars_with_openmetrics(
    upstream, sidecar, client
):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    async with client.get(f"{sc.url}/api", headers={"traceparent": VALID}) as resp:
        assert resp.status == 200
    accept = {"Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"}
    async with client.get(f"{sc.admin_url}/metrics", headers=accept) as resp:
        text = await resp.text()
    exemplars = [
        line
        for line in text.splitlines()
        if line.startswith("sidecar_request_duration_seconds_bucket") and " # {" in line
    ]
    assert exemplars, "no exemplar on any duration bucket"
    assert all('trace_id="0af7651916cd43dd8448eb211c80319c"' in line for line in exemplars)
    async with client.get(f"{sc.admin_url}/metrics") as resp:  # plain text: no exemplars
        assert " # {" not in await resp.text()


async def test_a_trace_the_sidecar_started_gets_no_exemplar(upstream, sidecar, client):
    # It is exported nowhere (the sidecar sends no spans): an exemplar would lead nowhere.
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    async with client.get(f"{sc.url}/api") as resp:
        assert resp.status == 200
    accept = {"Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"}
    async with client.get(f"{sc.admin_url}/metrics", headers=accept) as resp:
        text = await resp.text()
    buckets = [
        line
        for line in text.splitlines()
        if line.startswith("sidecar_request_duration_seconds_bucket")
    ]
    assert buckets and not any(" # {" in line for line in buckets)
