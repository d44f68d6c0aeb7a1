"""Static discovery: the endpoints written in the config (`static:` or `endpoints:`).

The cluster applies them when it is built, so a static service can pick endpoints before
`start()`; nothing runs in the background.
"""

from __future__ import annotations

from typing import Any

from sidecar.config.model import Address, StaticDiscovery
from sidecar.discovery import DiscoverySink


class StaticSource:
    kind = "static"

    def __init__(self, config: StaticDiscovery) -> None:
        self.addresses: tuple[Address, ...] = config.endpoints

    async def run(self, sink: DiscoverySink) -> None:
        """Nothing to watch: the cluster applied `addresses` when it was built."""

    def describe(self) -> dict[str, Any]:
        return {}
