"""Config files for the proxies under test, rendered from the templates in bench/conf/."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from string import Template

CONF_DIR = Path(__file__).resolve().parent / "conf"

# The path every scaling config is hit on: the last of the generated prefix routes.
SCALING_ROUTES = 1000
SCALING_PATH = f"/svc{SCALING_ROUTES - 1:04d}"

DEFAULT_RETRY_ON = ("connect-failure", "reset", "503")
DEFAULT_RESET_TIMEOUT = "30s"  # the circuit breaker's default
# Both proxies make at most 1 + MAX_RETRIES attempts per request: `max_retries: 3` in
# conf/sidecar.yaml.tmpl, `retries 3` in conf/haproxy.cfg.tmpl (keep the three in step).
MAX_RETRIES = 3
# The outage scenario's variant, reported beside the targets but not judged: the same
# sidecar with a short breaker reset_timeout, to show the recovery that tuning buys over
# the default (30 s) the targets are judged on.
OUTAGE_VARIANT_RESET = "2s"
OUTAGE_VARIANT_ROLE = f"sidecar+reset{OUTAGE_VARIANT_RESET}"
OUTLIER = (
    "    outlier_detection: { consecutive_failures: 5, ejection_time: 30s, "
    "max_ejection_percent: 50 }"
)


@dataclass(frozen=True)
class SidecarSpec:
    """What varies between the sidecar configs of one run."""

    endpoints: tuple[str, ...]
    routes: int = 0  # 0: one catch-all `/` route; N: the last N of /svc0000 ... /svc0999
    per_try_timeout: str | None = None
    retry_on: tuple[str, ...] = DEFAULT_RETRY_ON
    reset_timeout: str = DEFAULT_RESET_TIMEOUT
    outlier: bool = False  # passive outlier detection (a variant in two resilience scenarios)


def _routes_yaml(count: int) -> str:
    if count == 0:
        return "  - name: all\n    match: { prefix: / }\n    service: origin\n"
    # Always ending with /svc0999, so every scaling config is hit on the same last route.
    out = []
    for i in range(SCALING_ROUTES - count, SCALING_ROUTES):
        out.append(
            f"  - name: r{i:04d}\n"
            f"    match: {{ prefix: /svc{i:04d} }}\n"
            "    service: origin\n"
            "    rewrite_prefix: /\n"
        )
    return "".join(out)


def sidecar_config(path: Path, spec: SidecarSpec, listen_port: int, admin_port: int) -> Path:
    per_try = f"    per_try_timeout: {spec.per_try_timeout}" if spec.per_try_timeout else ""
    text = Template((CONF_DIR / "sidecar.yaml.tmpl").read_text()).substitute(
        listen_port=listen_port,
        admin_port=admin_port,
        retry_on=", ".join(spec.retry_on),
        per_try_timeout=per_try,
        endpoints=", ".join(f'"{e}"' for e in spec.endpoints),
        reset_timeout=spec.reset_timeout,
        service_extra=OUTLIER if spec.outlier else "",
        routes=_routes_yaml(spec.routes),
    )
    path.write_text(text)
    return path


def haproxy_config(path: Path, port: int, endpoints: list[str], server_timeout: str = "2s") -> Path:
    servers = "\n".join(f"    server s{i} {ep}" for i, ep in enumerate(endpoints))
    text = Template((CONF_DIR / "haproxy.cfg.tmpl").read_text()).substitute(
        port=port, servers=servers, server_timeout=server_timeout
    )
    path.write_text(text)
    return path
