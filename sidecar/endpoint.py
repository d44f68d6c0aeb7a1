"""One upstream instance of a service, and what each owner knows about it.

A leaf: everything that handles endpoints (balancers, health checks, outlier detection,
the attempt loop, the upstream clients) imports this module and nothing above it. The
state is split by owner, so each piece writes only its own part:

    health     active health checks (sidecar.cluster.health)
    ejection   passive outlier detection (sidecar.cluster.outlier)
    in_flight  the attempt loop, around each attempt

An endpoint is `available` to the balancers when it is healthy and not ejected.
"""

from __future__ import annotations

from sidecar.config.model import Address
from sidecar.vocab import EndpointState


class HealthState:
    """Active health checks' view: passes and failures in a row, and the verdict."""

    __slots__ = ("fails", "healthy", "passes")

    def __init__(self) -> None:
        self.healthy = True  # new endpoints take traffic at once
        self.passes = 0
        self.fails = 0


class EjectionState:
    """Outlier detection's view: the current run of failures and past ejections."""

    __slots__ = ("ejected", "ejections", "failures", "returned_at")

    def __init__(self) -> None:
        self.ejected = False
        self.failures = 0  # consecutive failed attempts
        self.ejections = 0  # how many times ejected (scales the ejection time)
        self.returned_at: float | None = None  # monotonic time of the last return


class Endpoint:
    """One upstream address of a service."""

    __slots__ = ("address", "ejection", "health", "in_flight", "key")

    def __init__(self, address: Address) -> None:
        self.address = address
        self.key = str(address)  # the `endpoint` metric label and admin address
        self.in_flight = 0
        self.health = HealthState()
        self.ejection = EjectionState()

    @property
    def state(self) -> EndpointState:
        # Unhealthy wins over ejected: it is the condition that outlasts the other.
        if not self.health.healthy:
            return EndpointState.UNHEALTHY
        if self.ejection.ejected:
            return EndpointState.EJECTED
        return EndpointState.HEALTHY

    @property
    def available(self) -> bool:
        return self.health.healthy and not self.ejection.ejected

    def __repr__(self) -> str:
        return f"<Endpoint {self.key} {self.state} in_flight={self.in_flight}>"
