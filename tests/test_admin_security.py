"""The admin port refuses what a web page could send it: DNS rebinding, cross-site requests,
form posts; and it closes connections whose request head never completes.

Every rule is checked with real requests against a real in-process sidecar: the aiohttp
client where it can set the headers as given, raw sockets where it cannot (no Host, a body
without Content-Type, a trickled head).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest
from conftest import RunningSidecar
from helpers import free_port, one_service, sidecar_yaml
from multidict import CIMultiDict

import sidecar.admin.app as admin_app
from sidecar.admin.guard import (
    Refusal,
    body_refusal,
    check_access,
    host_refusal,
    origin_refusal,
    parse_host,
)
from sidecar.config import load_config
from sidecar.server import Sidecar

ENDPOINTS = [
    ("GET", "/metrics"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/admin/state"),
    ("GET", "/admin/config"),
    ("POST", "/admin/reload"),
    ("GET", "/admin/dashboard.json"),
    ("GET", "/dashboard"),
    ("GET", "/no/such/endpoint"),
]


async def raw(port: int, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send one request as written (CRLFs added) and read the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


def reloads(sc: RunningSidecar) -> float:
    return sc.sample("sidecar_config_reloads_total", result="success") + sc.sample(
        "sidecar_config_reloads_total", result="failure"
    )


async def test_a_dns_name_other_than_localhost_is_refused_on_every_endpoint(
    upstream, sidecar, client
):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    hosts = [
        "evil.example",
        f"evil.example:{sc.admin}",
        f"localhost.evil.example:{sc.admin}",
        f"127.0.0.1.nip.io:{sc.admin}",
        "sidecar:15000",  # a name, even one that could be ours, until admin_hosts lists it
    ]
    for method, path in ENDPOINTS:
        for host in hosts:
            async with client.request(
                method,
                f"{sc.admin_url}{path}",
                headers={"Host": host},
                skip_auto_headers=["Content-Type"],
            ) as resp:
                assert resp.status == 403, (method, path, host)
                assert resp.content_type == "application/json"
                body = await resp.json()
            assert body["error"] == "forbidden"
            assert repr(host) in body["detail"]
            assert "DNS rebinding" in body["detail"]
    assert reloads(sc) == 0  # the refused reloads did nothing


async def test_ip_literals_and_localhost_pass(upstream, sidecar, client):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    # The sidecar listens on 127.0.0.1; the Host is what a client says it dialled, so a
    # pod IP, an IPv6 literal or localhost in any case all reach the same listener.
    for host in [
        f"127.0.0.1:{sc.admin}",
        "127.0.0.1",
        f"10.1.2.3:{sc.admin}",  # kubelet probe or Prometheus scrape by pod IP
        f"[::1]:{sc.admin}",
        "[::1]",
        "[fd00::7]:15000",
        f"localhost:{sc.admin}",
        "localhost",
        f"LocalHost:{sc.admin}",
        f"localhost.:{sc.admin}",
    ]:
        async with client.get(f"{sc.admin_url}/healthz", headers={"Host": host}) as resp:
            assert resp.status == 200, host
    async with client.get(
        f"{sc.admin_url}/metrics", headers={"Host": f"10.244.0.17:{sc.admin}"}
    ) as resp:
        assert resp.status == 200
        assert "sidecar_circuit_breaker_state" in await resp.text()
    async with client.get(
        f"{sc.admin_url}/healthz", headers={"Host": f"localhost:{sc.admin}"}
    ) as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


async def test_no_host_at_all_passes_and_a_malformed_one_is_refused(upstream, sidecar):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    status, _, body = await raw(sc.admin, "GET /healthz HTTP/1.0\n")
    assert status == 200, body
    for bad in ["127.0.0.1:http", "[::1", "[::1]x", "[nothex::1]:80", "host:99999"]:
        status, headers, body = await raw(
            sc.admin, f"GET /healthz HTTP/1.1\nHost: {bad}\nConnection: close\n"
        )
        assert status == 403, bad
        assert headers["content-type"].startswith("application/json")
        assert json.loads(body) == {
            "error": "forbidden",
            "detail": f"malformed Host header {bad!r}",
        }


async def test_admin_hosts_lists_extra_names(upstream, tmp_path: Path, client):
    up = await upstream()
    admin = free_port()
    path = tmp_path / "sidecar.yaml"
    path.write_text(sidecar_yaml(one_service(up.address), free_port(), admin))
    config, _ = load_config(path)
    sc = Sidecar(dataclasses.replace(config, admin_hosts=("sidecar", "Admin.Internal.")))
    await sc.start()
    try:
        for host, status in [
            ("sidecar:15000", 200),
            ("sidecar", 200),
            ("SIDECAR:15000", 200),
            ("admin.internal", 200),
            ("sidecar.evil.example", 403),
            ("other:15000", 403),
            ("localhost", 200),
        ]:
            async with client.get(
                f"http://127.0.0.1:{admin}/metrics", headers={"Host": host}
            ) as resp:
                assert resp.status == status, host
    finally:
        await sc.stop()


@pytest.mark.parametrize("site", ["cross-site", "same-site", "Cross-Site"])
async def test_sec_fetch_site_cross_or_same_site_is_refused_whatever_the_host(
    upstream, sidecar, client, site
):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    for host in [f"127.0.0.1:{sc.admin}", f"localhost:{sc.admin}"]:
        for method, path in [("GET", "/admin/config"), ("POST", "/admin/reload")]:
            async with client.request(
                method,
                f"{sc.admin_url}{path}",
                headers={"Host": host, "Sec-Fetch-Site": site},
                skip_auto_headers=["Content-Type"],
            ) as resp:
                assert resp.status == 403
                body = await resp.json()
            assert body == {
                "error": "forbidden",
                "detail": f"Sec-Fetch-Site: {site}: the admin API answers no other site",
            }
    assert reloads(sc) == 0


async def test_sec_fetch_site_same_origin_and_none_pass(upstream, sidecar, client):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    for site in ["same-origin", "none"]:
        async with client.get(
            f"{sc.admin_url}/admin/state", headers={"Sec-Fetch-Site": site}
        ) as resp:
            assert resp.status == 200, site


async def test_an_origin_that_is_not_the_host_is_refused(upstream, sidecar, client):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    host = f"127.0.0.1:{sc.admin}"
    for origin in [
        "null",
        "http://evil.example",
        f"http://evil.example:{sc.admin}",
        f"http://127.0.0.1:{sc.admin + 1}",
        f"https://127.0.0.1:{sc.admin}",  # another scheme is another origin
        f"http://localhost:{sc.admin}",  # same machine, but not the Host sent
        "http://127.0.0.1",
        "file://",
        "garbage",
    ]:
        for method, path in [("GET", "/admin/state"), ("POST", "/admin/reload")]:
            async with client.request(
                method,
                f"{sc.admin_url}{path}",
                headers={"Host": host, "Origin": origin, "Content-Type": "application/json"},
            ) as resp:
                assert resp.status == 403, (origin, method)
                assert (await resp.json())["error"] == "forbidden"
    assert reloads(sc) == 0
    # A second Origin cannot hide behind a first one that matches.
    status, _, body = await raw(
        sc.admin,
        f"GET /admin/state HTTP/1.1\nHost: {host}\nOrigin: http://{host}\n"
        "Origin: http://evil.example\nConnection: close\n",
    )
    assert status == 403
    assert json.loads(body)["detail"] == "more than one Origin header"
    # The page's own origin passes: the dashboard's fetches and a same-origin POST.
    for host, origin in [
        (f"127.0.0.1:{sc.admin}", f"http://127.0.0.1:{sc.admin}"),
        (f"localhost:{sc.admin}", f"http://localhost:{sc.admin}"),
        (f"[::1]:{sc.admin}", f"http://[::1]:{sc.admin}"),
        ("127.0.0.1", "http://127.0.0.1"),
        ("127.0.0.1:80", "http://127.0.0.1"),
    ]:
        async with client.get(
            f"{sc.admin_url}/admin/dashboard.json", headers={"Host": host, "Origin": origin}
        ) as resp:
            assert resp.status == 200, (host, origin)
    async with client.post(
        f"{sc.admin_url}/admin/reload",
        headers={"Origin": f"http://127.0.0.1:{sc.admin}", "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 200
    assert reloads(sc) == 1


async def test_reload_takes_no_body_or_json_and_refuses_form_encodings(upstream, sidecar, client):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    url = f"{sc.admin_url}/admin/reload"

    # No body and no Content-Type (what `curl -X POST` sends), and application/json.
    async with client.post(url, skip_auto_headers=["Content-Type"]) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["ok"] is True
    status, _, _ = await raw(
        sc.admin,
        f"POST /admin/reload HTTP/1.1\nHost: 127.0.0.1:{sc.admin}\n"
        "Content-Length: 0\nConnection: close\n",
    )
    assert status == 200
    for ctype in ["application/json", "application/json; charset=utf-8", "Application/JSON"]:
        async with client.post(url, data=b"{}", headers={"Content-Type": ctype}) as resp:
            assert resp.status == 200, ctype
    # A type no page can send without a CORS preflight: what aiohttp's client sends bare.
    async with client.post(url) as resp:
        assert resp.status == 200
    assert reloads(sc) == 6

    # What a cross-site form can send, and anything else that is not JSON.
    for ctype in [
        "text/plain",
        "text/plain; charset=utf-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "Multipart/Form-Data",
    ]:
        for data in [b"a=b", b""]:  # an empty form post would still reload
            async with client.post(url, data=data, headers={"Content-Type": ctype}) as resp:
                assert resp.status == 415, ctype
                body = await resp.json()
            mime = ctype.split(";")[0].lower()
            assert body == {
                "error": "unsupported_media_type",
                "detail": f"Content-Type {mime!r} is not accepted: send no body, or "
                "application/json (form encodings are refused so that no web page can post "
                "here)",
            }
    # A body with no Content-Type at all.
    status, headers, body_bytes = await raw(
        sc.admin,
        f"POST /admin/reload HTTP/1.1\nHost: 127.0.0.1:{sc.admin}\n"
        "Content-Length: 3\nConnection: close\n",
        b"a=b",
    )
    assert status == 415
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body_bytes) == {
        "error": "unsupported_media_type",
        "detail": "a request body needs Content-Type: application/json",
    }
    status, _, _ = await raw(
        sc.admin,
        f"POST /admin/reload HTTP/1.1\nHost: 127.0.0.1:{sc.admin}\n"
        "Transfer-Encoding: chunked\nConnection: close\n",
        b"3\r\na=b\r\n0\r\n\r\n",
    )
    assert status == 415
    assert reloads(sc) == 6  # none of the refused posts reloaded


async def test_unknown_paths_and_methods_answer_json(upstream, sidecar, client):
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    async with client.get(f"{sc.admin_url}/nope") as resp:
        assert resp.status == 404
        assert await resp.json() == {
            "error": "not_found",
            "detail": "no admin endpoint GET /nope",
        }
    async with client.get(f"{sc.admin_url}/admin/reload") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"
        assert await resp.json() == {
            "error": "method_not_allowed",
            "detail": "/admin/reload answers POST, not GET",
        }


async def test_a_trickled_request_head_is_cut_off(upstream, sidecar, monkeypatch):
    monkeypatch.setattr(admin_app, "HEAD_TIMEOUT", 0.3)  # a short configured duration
    up = await upstream()
    sc = await sidecar(one_service(up.address))
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.admin)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed = False
        # One header byte every 50 ms, for up to 200 bytes (10 s): the head never ends.
        for _ in range(200):
            try:
                writer.write(b"x")
                await writer.drain()
                data = await asyncio.wait_for(reader.read(1), timeout=0.05)
            except TimeoutError:
                continue
            except ConnectionError:
                closed = True
                break
            assert data == b"", data  # nothing is answered to a head that never ended
            closed = True
            break
        assert closed, "the admin port kept a connection whose head never completed"
    finally:
        writer.close()
    # Others are served as before, and whole requests on a kept-alive connection too.
    status, _, _ = await raw(
        sc.admin, "GET /healthz HTTP/1.1\nHost: 127.0.0.1\nConnection: close\n"
    )
    assert status == 200


# --- the rules as pure functions: the exact words a refused client reads -------------------


def test_parse_host_forms():
    assert parse_host("127.0.0.1:15000") == admin_app_host("127.0.0.1", 15000, True)
    assert parse_host("[::1]:15000") == admin_app_host("::1", 15000, True)
    assert parse_host("[0:0::1]") == admin_app_host("::1", None, True)
    assert parse_host("LOCALHOST.") == admin_app_host("localhost", None, False)
    assert parse_host("host:") == admin_app_host("host", None, False)
    for bad in ["", ":80", "a:b", "[::1", "[::1]:x", "1.2.3.4:123456", "a:1:2"]:
        assert parse_host(bad) is None, bad


def admin_app_host(host: str, port: int | None, is_ip: bool):
    from sidecar.admin.guard import HostPort

    return HostPort(host, port, is_ip)


def test_refusal_messages():
    assert host_refusal("evil.example", ()) == (
        "Host 'evil.example' is not an IP address, localhost or a name listed in admin_hosts "
        "(DNS rebinding protection)"
    )
    assert host_refusal("a" * 300, ()) is not None
    assert "..." in (host_refusal("a" * 300, ()) or "")
    assert host_refusal(None, ()) is None
    assert origin_refusal("null", "127.0.0.1") == (
        "Origin: null (a sandboxed or opaque page) may not use the admin API"
    )
    assert (
        origin_refusal("http://a", None) == "Origin 'http://a' does not match the request's Host ''"
    )
    assert origin_refusal("http://a/path", "a") == "malformed Origin 'http://a/path'"
    assert body_refusal(None, False) is None
    assert body_refusal("application/json", True) is None
    refusal = check_access(CIMultiDict({"Host": "127.0.0.1", "Sec-Fetch-Site": "same-site"}), ())
    assert refusal is not None and refusal.status == 403
    two = CIMultiDict([("Host", "127.0.0.1"), ("Origin", "http://127.0.0.1"), ("origin", "x")])
    assert check_access(two, ()) == Refusal(403, "forbidden", "more than one Origin header")
    assert (
        check_access(CIMultiDict({"Host": "127.0.0.1", "Origin": "http://127.0.0.1"}), ()) is None
    )
