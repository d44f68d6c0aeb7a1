"""Secrets stay out of what the sidecar shows, through a real in-process sidecar:
/admin/config shows `${VAR}` references instead of their values, and URL passwords are
masked in /admin/config, /admin/state and the log, while the runtime uses the real values."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
import pytest
from helpers import free_port

from sidecar.logs import JsonFormatter

TOKEN = "tok-5ecret-value"
PASSWORD = "s3cr3t-pw"


async def test_admin_config_shows_env_references_not_values(
    upstream: Any,
    sidecar: Any,
    client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SIDECAR_TEST_TOKEN", TOKEN)
    up = await upstream()
    sc = await sidecar(
        f"""
        services:
          api:
            endpoints: ["{up.address}"]
          gone:
            discovery: {{ file: {{ path: no-endpoints-yet.yaml }} }}
        routes:
          - name: api
            match:
              prefix: /api
              headers: {{ authorization: "Bearer ${{SIDECAR_TEST_TOKEN}}" }}
            service: api
          - name: gone
            match: {{ prefix: /gone }}
            service: gone
            fallback:
              status: 200
              headers: {{ x-token: "${{SIDECAR_TEST_TOKEN:-none}}" }}
              body: "${{SIDECAR_TEST_TOKEN}}"
        """
    )
    # The runtime matches and answers with the values...
    async with client.get(f"{sc.url}/api", headers={"authorization": f"Bearer {TOKEN}"}) as resp:
        assert resp.status == 200
    literal = {"authorization": "Bearer ${SIDECAR_TEST_TOKEN}"}
    async with client.get(f"{sc.url}/api", headers=literal) as resp:
        assert resp.status == 404
    async with client.get(f"{sc.url}/gone") as resp:  # no endpoints: the fallback answers
        assert (resp.status, resp.headers["x-token"], await resp.text()) == (200, TOKEN, TOKEN)
    assert up.hits == 1
    # ...and /admin/config shows the references.
    async with client.get(f"{sc.admin_url}/admin/config") as resp:
        assert resp.status == 200
        text = await resp.text()
    assert TOKEN not in text
    routes = json.loads(text)["routes"]
    assert routes[0]["match"]["headers"] == literal
    assert routes[1]["fallback"]["headers"] == {"x-token": "${SIDECAR_TEST_TOKEN:-none}"}
    assert routes[1]["fallback"]["body"] == "${SIDECAR_TEST_TOKEN}"


async def _state_when(
    client: aiohttp.ClientSession, url: str, ready: Any, attempts: int = 200
) -> str:
    """GET /admin/state until `ready(parsed)` holds (bounded); the raw text."""
    for _ in range(attempts):
        async with client.get(url) as resp:
            text = await resp.text()
        if ready(json.loads(text)):
            return text
        await asyncio.sleep(0.05)
    raise AssertionError(f"state never got ready: {text[:500]}")


async def test_url_passwords_never_reach_state_config_or_logs(
    upstream: Any,
    sidecar: Any,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    closed = free_port()  # nothing listens here: every etcd call fails to connect
    etcd = f"http://user:{PASSWORD}@127.0.0.1:{closed}"
    up = await upstream()
    sc = await sidecar(
        f"""
        services:
          api:
            discovery: {{ etcd: {{ endpoints: ["{etcd}"], prefix: /services/api/ }} }}
        routes:
          - {{ name: api, match: {{ prefix: /api }}, service: api }}
        register:
          etcd: {{ endpoints: ["{etcd}"], prefix: /services/ }}
          service: app
          address: "{up.address}"
        """
    )

    def failed(state: dict[str, Any]) -> bool:
        discovery = state["services"]["api"]["discovery"]
        registration = state.get("registration") or {}
        return bool(discovery["last_error"]) and bool(registration.get("last_error"))

    state_text = await _state_when(client, f"{sc.admin_url}/admin/state", failed)
    state = json.loads(state_text)
    assert PASSWORD not in state_text
    masked = f"user:***@127.0.0.1:{closed}"
    assert masked in state["services"]["api"]["discovery"]["last_error"]
    assert masked in state["registration"]["last_error"]
    async with client.get(f"{sc.admin_url}/admin/config") as resp:
        config_text = await resp.text()
    assert PASSWORD not in config_text and masked in config_text

    formatter = JsonFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    assert not [line for line in lines if PASSWORD in line]
    assert any("discovery failed" in line and masked in line for line in lines), lines
