"""Config files for the proxies under test, rendered from the templates in bench/conf/.

The retry policy is the one thing written out on both sides, and it is the same: the
sidecar's `max_retries` and `retry_on` are HAProxy's `retries` and `retry-on`. The
sidecar's circuit breaker, retry budget and outlier detection are left unwritten (its
defaults); a variant may add a block of its own (`SidecarSpec.extra`), reported beside the
targets but never used for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from string import Template

CONF_DIR = Path(__file__).resolve().parent / "conf"

# The path every scaling config is hit on: the last of the generated prefix routes.
SCALING_ROUTES = 1000
SCALING_PATH = f"/svc{SCALING_ROUTES - 1:04d}"

DEFAULT_RETRY_ON = ("connect-failure", "reset", "503")
# Both proxies make at most 1 + MAX_RETRIES attempts per request: `max_retries` in
# conf/sidecar.yaml.tmpl, `retries` in conf/haproxy.cfg.tmpl.
MAX_RETRIES = 3
# "default retries" where the contract's line says so (errors503): the sidecar's default.
DEFAULT_MAX_RETRIES = 2
# The sidecar's retry conditions, spelled in HAProxy's `retry-on` words.
HAPROXY_RETRY_ON = {
    "connect-failure": "conn-failure",
    "reset": "empty-response",
    "per-try-timeout": "response-timeout",
    "503": "503",
}
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
    max_retries: int = MAX_RETRIES
    extra: str = ""  # YAML lines added to the service (a variant), e.g. OUTLIER


@dataclass(frozen=True)
class HaproxySpec:
    endpoints: tuple[str, ...]
    server_timeout: str = "2s"
    retry_on: tuple[str, ...] = DEFAULT_RETRY_ON
    max_retries: int = MAX_RETRIES


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
        max_retries=spec.max_retries,
        retry_on=", ".join(spec.retry_on),
        per_try_timeout=per_try,
        endpoints=", ".join(f'"{e}"' for e in spec.endpoints),
        service_extra=spec.extra,
        routes=_routes_yaml(spec.routes),
    )
    path.write_text(text)
    return path


def haproxy_retry_on(retry_on: tuple[str, ...]) -> str:
    return " ".join(HAPROXY_RETRY_ON[c] for c in retry_on)


def haproxy_config(path: Path, port: int, spec: HaproxySpec) -> Path:
    servers = "\n".join(f"    server s{i} {ep}" for i, ep in enumerate(spec.endpoints))
    text = Template((CONF_DIR / "haproxy.cfg.tmpl").read_text()).substitute(
        port=port,
        servers=servers,
        server_timeout=spec.server_timeout,
        retries=spec.max_retries,
        retry_on=haproxy_retry_on(spec.retry_on),
    )
    path.write_text(text)
    return path


def haproxy_h2c_config(path: Path, port: int, endpoint: str) -> Path:
    text = Template((CONF_DIR / "haproxy-h2c.cfg.tmpl").read_text()).substitute(
        port=port, endpoint=endpoint
    )
    path.write_text(text)
    return path


def sidecar_grpc_config(path: Path, endpoint: str, listen_port: int, admin_port: int) -> Path:
    text = Template((CONF_DIR / "sidecar-grpc.yaml.tmpl").read_text()).substitute(
        listen_port=listen_port, admin_port=admin_port, endpoint=endpoint
    )
    path.write_text(text)
    return path
