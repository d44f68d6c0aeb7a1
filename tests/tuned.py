"""A sidecar whose loaded config is edited before it starts: for breaker keys (failure_rate,
slow_call, probe, max_reset_timeout) that YAML cannot set on this branch yet.

Once the config parser knows those keys, the tests calling `tuned_sidecar` can write them
in YAML and use the `sidecar` fixture instead; this is the one place to change.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from conftest import RunningSidecar, _Capture
from helpers import free_port, sidecar_yaml

from sidecar.config import load_config
from sidecar.config.model import SidecarConfig
from sidecar.logs import LineWriter
from sidecar.server import Sidecar

Edit = Callable[[SidecarConfig], SidecarConfig]


def breaker(service: str, **changes: Any) -> Edit:
    """An edit replacing fields of `service`'s circuit_breaker."""

    def edit(config: SidecarConfig) -> SidecarConfig:
        services = dict(config.services)
        svc = services[service]
        services[service] = dataclasses.replace(
            svc, circuit_breaker=dataclasses.replace(svc.circuit_breaker, **changes)
        )
        return dataclasses.replace(config, services=services)

    return edit


@contextlib.asynccontextmanager
async def tuned_sidecar(tmp_path: Path, body: str, edit: Edit) -> AsyncIterator[RunningSidecar]:
    """Like the `sidecar` fixture's factory, with `edit` applied to the loaded config."""
    listen, admin = free_port(), free_port()
    path = tmp_path / f"tuned-{listen}.yaml"
    path.write_text(sidecar_yaml(body, listen, admin))
    config, _warnings = load_config(path)
    capture = _Capture()
    writer = LineWriter(capture)
    sc = Sidecar(edit(config), log_writer=writer)
    await sc.start()
    try:
        yield RunningSidecar(sc, listen, admin, path, capture, writer)
    finally:
        if not sc.draining:
            await sc.stop()
        writer.close()
