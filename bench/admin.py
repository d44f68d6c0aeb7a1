"""The sidecar's own account, read from its admin listener: /metrics, /admin/state and
/admin/config (the effective config, every default filled in).

Blocking (urllib) on purpose: the harness calls these between or beside driver runs, never
from the driver's event loop (the async scenarios run them in a thread).
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


def _get(port: int, path: str, timeout: float = 3.0) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        data: bytes = r.read()
        return data


def state(port: int, timeout: float = 1.0) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(_get(port, "/admin/state", timeout))
    return data


def breaker_state(port: int, service: str = "origin", timeout: float = 1.0) -> str | None:
    """closed / open / half_open, or None when the admin API does not answer."""
    try:
        snap = state(port, timeout)
    except (OSError, ValueError):
        return None
    svc = snap.get("services", {}).get(service, {})
    value = svc.get("breaker", {}).get("state")
    return str(value) if value is not None else None


def effective_config(port: int) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(_get(port, "/admin/config"))
    return data


def breaker_config(port: int, service: str = "origin") -> dict[str, Any]:
    """The service's circuit_breaker block as the running sidecar sees it."""
    cfg = effective_config(port)
    block: dict[str, Any] = cfg.get("services", {}).get(service, {}).get("circuit_breaker", {})
    return block


def route_retries(port: int, index: int = 0) -> dict[str, Any]:
    cfg = effective_config(port)
    routes = cfg.get("routes", [])
    if not routes:
        return {}
    block: dict[str, Any] = routes[index].get("retries", {})
    return block


def scrape(port: int) -> dict[str, Any]:
    """The sidecar's counters that the scenarios report, summed over labels (a metric this
    revision does not have yet leaves `trips` / `probes` empty)."""
    try:
        text = _get(port, "/metrics").decode()
    except OSError as exc:
        return {"error": str(exc)}
    out: dict[str, Any] = {
        "retries": 0,
        "retry_budget_exhausted": 0,
        "breaker_opened": 0,
        "breaker_rejected": 0,
        "timeouts": 0,
        "attempts": {},
        "breaker_state": None,
        "trips": {},
        "probes": {},
    }
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            name, labels, value = sample.name, sample.labels, int(sample.value)
            if name == "sidecar_retries_total":
                out["retries"] += value
            elif name == "sidecar_retry_budget_exhausted_total":
                out["retry_budget_exhausted"] += value
            elif name == "sidecar_circuit_breaker_transitions_total":
                if labels.get("to_state") == "open":
                    out["breaker_opened"] += value
            elif name == "sidecar_circuit_breaker_rejected_total":
                out["breaker_rejected"] += value
            elif name == "sidecar_circuit_breaker_state" and value == 1:
                out["breaker_state"] = labels.get("state")
            elif name == "sidecar_circuit_breaker_trips_total":
                key = labels.get("reason", "?")
                out["trips"][key] = out["trips"].get(key, 0) + value
            elif name == "sidecar_circuit_breaker_probes_total":
                key = labels.get("result", "?")
                out["probes"][key] = out["probes"].get(key, 0) + value
            elif name == "sidecar_timeouts_total":
                out["timeouts"] += value
            elif name == "sidecar_upstream_attempts_total":
                key = labels.get("result", "?")
                out["attempts"][key] = out["attempts"].get(key, 0) + value
    return out


def upstream_stats(port: int) -> dict[str, Any]:
    """The raw upstream's per-port counters (bench/upstream.py), asked on `port`."""
    try:
        data: dict[str, Any] = json.loads(_get(port, "/__bench/stats"))
    except (OSError, ValueError) as exc:
        return {"error": str(exc)}
    return data
