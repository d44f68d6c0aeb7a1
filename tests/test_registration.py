"""Registration in a real etcd: lease, keep-alive, health-driven removal, deregister."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from support import HealthApp, eventually, free_port, serve, service, started
from support.etcd import EtcdServer, running_etcd

from sidecar.config.model import (
    Address,
    EtcdDiscovery,
    RegisterConfig,
    RegisterHealthCheck,
)
from sidecar.registration import Registration, default_instance_id

KEY = "/services/payments/test-1"


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    with running_etcd(tmp_path) as server:
        yield server


def register_config(
    etcd_url: str, address: Address, ttl: float = 2.0, check: RegisterHealthCheck | None = None
) -> RegisterConfig:
    return RegisterConfig(
        etcd=EtcdDiscovery(endpoints=(etcd_url,), prefix="/services/"),
        service="payments",
        address=address,
        ttl=ttl,
        health_check=check,
    )


async def test_key_with_lease_appears_is_kept_alive_and_goes_on_deregister(
    etcd: EtcdServer,
) -> None:
    reg = Registration(register_config(etcd.url, Address("127.0.0.1", 8080)), instance_id="test-1")
    assert reg.key == KEY
    try:
        began = time.time()
        await reg.start()
        kv = await etcd.get(KEY)
        assert kv is not None and kv["lease"] != 0
        value = json.loads(kv["value"])
        assert value["address"] == "127.0.0.1:8080"
        assert value["service"] == "payments"
        assert began <= value["registered_at"] <= time.time()
        ttl = await etcd.time_to_live(kv["lease"])
        assert int(ttl["grantedTTL"]) == 2
        assert 0 < int(ttl["TTL"]) <= 2
        assert [base64.b64decode(k).decode() for k in ttl["keys"]] == [KEY]
        assert reg.snapshot()["registered"] is True

        # Well past the 2 s TTL the key is still there: keep-alives every ttl/3 hold it.
        await asyncio.sleep(3)
        still = await etcd.get(KEY)
        assert still is not None and still["lease"] == kv["lease"]

        await reg.deregister()
        assert await etcd.get(KEY) is None
        assert int((await etcd.time_to_live(kv["lease"]))["TTL"]) == -1  # revoked
        assert reg.snapshot()["registered"] is False
    finally:
        await reg.close()


async def test_app_health_check_failure_removes_and_recovery_restores(etcd: EtcdServer) -> None:
    app = HealthApp()
    async with serve(app.app) as address:
        check = RegisterHealthCheck(path="/healthz", interval=0.1)
        reg = Registration(register_config(etcd.url, address, check=check), instance_id="test-1")
        try:
            await reg.start()
            first = await etcd.get(KEY)
            assert first is not None
            assert json.loads(first["value"])["address"] == str(address)

            app.status = 500
            await eventually(lambda: not reg.registered)
            assert await etcd.get(KEY) is None
            assert int((await etcd.time_to_live(first["lease"]))["TTL"]) == -1

            app.status = 200
            await eventually(lambda: reg.registered)
            again = await etcd.get(KEY)
            assert again is not None and again["lease"] not in (0, first["lease"])
        finally:
            await reg.close()
        assert await etcd.get(KEY) is None  # close() deregisters too


async def test_app_down_at_start_registers_once_it_comes_up(etcd: EtcdServer) -> None:
    port = free_port()
    check = RegisterHealthCheck(path="/healthz", interval=0.1)
    address = Address("127.0.0.1", port)
    reg = Registration(register_config(etcd.url, address, check=check), instance_id="test-1")
    try:
        await reg.start()
        assert reg.app_healthy is False
        assert await etcd.get(KEY) is None
        app = HealthApp()
        runner = web.AppRunner(app.app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        try:
            await eventually(lambda: reg.registered)
            assert await etcd.get(KEY) is not None
        finally:
            await runner.cleanup()
    finally:
        await reg.close()


async def test_registration_survives_an_etcd_restart(etcd: EtcdServer) -> None:
    reg = Registration(register_config(etcd.url, Address("127.0.0.1", 8080)), instance_id="test-1")
    try:
        await reg.start()
        assert await etcd.get(KEY) is not None
        await etcd.astop()
        await eventually(lambda: reg.snapshot()["consecutive_failures"] >= 2)
        assert reg.snapshot()["last_error"] is not None
        await etcd.astart()
        # Whether the old lease survived the restart or a new one was granted, the key is
        # back and alive.
        for _ in range(100):
            kv = await etcd.get(KEY)
            if kv is not None and reg.snapshot()["last_error"] is None:
                break
            await asyncio.sleep(0.05)
        assert kv is not None
        assert reg.snapshot()["consecutive_failures"] == 0  # a success ends the streak
        await asyncio.sleep(2.5)  # longer than the TTL
        assert await etcd.get(KEY) is not None
    finally:
        await reg.close()
    assert await etcd.get(KEY) is None


async def test_discovery_sees_what_registration_writes(etcd: EtcdServer) -> None:
    reg = Registration(register_config(etcd.url, Address("127.0.0.1", 8080)), instance_id="i-1")
    cfg = service(EtcdDiscovery(endpoints=(etcd.url,), prefix="/services/payments/"))
    try:
        async with started(cfg) as cluster:
            assert cluster.endpoints == []
            await reg.start()
            await eventually(lambda: [e.key for e in cluster.endpoints] == ["127.0.0.1:8080"], 1)
            await reg.deregister()
            await eventually(lambda: cluster.endpoints == [], 1)
    finally:
        await reg.close()


def test_default_instance_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIDECAR_INSTANCE_ID", raising=False)
    assert default_instance_id() == f"{socket.gethostname()}-{os.getpid()}"
    monkeypatch.setenv("SIDECAR_INSTANCE_ID", "pod-7")
    assert default_instance_id() == "pod-7"


async def test_a_lease_lost_behind_its_back_is_replaced(etcd: EtcdServer) -> None:
    reg = Registration(register_config(etcd.url, Address("127.0.0.1", 8080)), instance_id="test-1")
    try:
        await reg.start()
        kv = await etcd.get(KEY)
        assert kv is not None
        # Someone (an operator, or expiry during a long partition) kills the lease.
        await etcd.acall("/v3/lease/revoke", {"ID": str(kv["lease"])})
        assert await etcd.get(KEY) is None
        # The next keep-alive (every ttl/3) finds the lease gone and registers anew.
        await eventually(lambda: reg.lease not in (None, kv["lease"]), timeout=5)
        again = await etcd.get(KEY)
        assert again is not None and again["lease"] == reg.lease
    finally:
        await reg.close()
