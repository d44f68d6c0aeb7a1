"""Who may talk to the admin port: the rules against DNS rebinding and cross-site requests.

The admin API can reload the config and shows it, so a web page the operator happens to
have open must not be able to read or drive it. Two ways a browser could:

- DNS rebinding: a page on `evil.example` re-points its own name at 127.0.0.1 and then
  calls `http://evil.example:15000/admin/config` as a same-origin request. The browser
  still sends `Host: evil.example:15000`, so a Host that is a DNS name other than
  `localhost` (or one the operator listed in `admin_hosts`) is refused. IP literals pass:
  kubelet probes and Prometheus scrapes address a pod by its IP.
- Cross-site requests: a page elsewhere submits a form or fires `fetch(..., {mode:
  "no-cors"})` at `http://127.0.0.1:15000/admin/reload`. Browsers mark those with
  `Sec-Fetch-Site` and `Origin`, so a request that says it is cross-site or same-site, or
  whose Origin (`null` included) is not the Host it was sent to, is refused whatever its
  Host. A POST must not be a CORS "simple" request either: the form encodings (`text/plain`,
  urlencoded, multipart) and a body without Content-Type are refused with 415, so what
  is left (no body, `application/json`, ...) needs a preflight the admin port never grants.

Each rule is a pure function from header values to a refusal message (None: allowed), so
the tests can read them one by one; `check_access` (403) and `check_body` (415) apply
them in order.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from multidict import MultiMapping

LOCALHOST: Final = "localhost"

# The methods that cannot change anything; every other one gets the body rule.
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})

# What a browser marks a request with when the page that made it is another site.
CROSS_SITE_FETCHES: Final = frozenset({"cross-site", "same-site"})

# The Content-Types a cross-site page may send without a CORS preflight.
FORM_TYPES: Final = frozenset(
    {"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"}
)

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}

# Echoed header values are cut to this many characters (they are the client's own input).
_ECHO_MAX: Final = 100


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is refused: the HTTP status, the JSON `error` word and a detail line."""

    status: int
    error: str
    detail: str


@dataclass(frozen=True, slots=True)
class HostPort:
    """A parsed Host (or Origin authority): the host lower-cased, IPs in canonical form."""

    host: str
    port: int | None
    is_ip: bool


def _echo(value: str) -> str:
    if len(value) > _ECHO_MAX:
        value = value[:_ECHO_MAX] + "..."
    return repr(value)


def _port(text: str) -> int | None:
    """A port number from its digits, or -1 when it is not one."""
    if not text:
        return None  # "host:" has an empty port, which RFC 3986 allows and means the default
    if not text.isascii() or not text.isdigit() or len(text) > 5 or int(text) > 65535:
        return -1
    return int(text)


def parse_host(value: str) -> HostPort | None:
    """`Host` header syntax: `name`, `1.2.3.4`, `[v6]`, each with an optional `:port`.

    None when it is malformed. A bare IPv6 address (no brackets) is not valid Host syntax,
    but no browser sends one and it names no DNS host, so it is read as an IP too.
    """
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        rest = value[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port = _port(rest[1:])
        try:
            ip = ipaddress.IPv6Address(value[1:end])
        except ValueError:
            return None
        return None if port == -1 else HostPort(str(ip), port, True)
    if value.count(":") > 1:
        try:
            return HostPort(str(ipaddress.IPv6Address(value)), None, True)
        except ValueError:
            return None
    host, _, port_text = value.partition(":")
    port = _port(port_text)
    if not host or port == -1:
        return None
    try:
        return HostPort(str(ipaddress.IPv4Address(host)), port, True)
    except ValueError:
        pass
    return HostPort(_dns_name(host), port, False)


def _dns_name(name: str) -> str:
    # Names are case-insensitive, and `localhost.` is the same name written absolute.
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


def host_refusal(host: str | None, allowed: Collection[str]) -> str | None:
    """A Host that is a DNS name must be `localhost` or listed in `allowed` (admin_hosts)."""
    if host is None or not host.strip():
        return None  # no authority at all (HTTP/1.0): nothing a browser sends
    parsed = parse_host(host)
    if parsed is None:
        return f"malformed Host header {_echo(host)}"
    if parsed.is_ip or parsed.host == LOCALHOST:
        return None
    if parsed.host in {_dns_name(a) for a in allowed}:
        return None
    return (
        f"Host {_echo(host)} is not an IP address, localhost or a name listed in admin_hosts "
        "(DNS rebinding protection)"
    )


def fetch_site_refusal(sec_fetch_site: str | None) -> str | None:
    if sec_fetch_site is not None and sec_fetch_site.strip().lower() in CROSS_SITE_FETCHES:
        return f"Sec-Fetch-Site: {sec_fetch_site.strip()}: the admin API answers no other site"
    return None


def origin_refusal(origin: str | None, host: str | None) -> str | None:
    """An Origin, when sent, must name the very host:port the request was sent to."""
    if origin is None:
        return None
    text = origin.strip()
    if text.lower() == "null":
        return "Origin: null (a sandboxed or opaque page) may not use the admin API"
    try:
        parts = urlsplit(text)
        scheme = parts.scheme.lower()
        origin_host = parts.hostname
        origin_port = parts.port
    except ValueError:
        return f"malformed Origin {_echo(origin)}"
    if scheme not in _DEFAULT_PORTS or not origin_host or parts.path or parts.query:
        return f"malformed Origin {_echo(origin)}"
    ours = parse_host(host) if host else None
    if ours is None:
        return f"Origin {_echo(origin)} does not match the request's Host {_echo(host or '')}"
    theirs = parse_host(f"[{origin_host}]" if ":" in origin_host else origin_host)
    if theirs is None:
        return f"malformed Origin {_echo(origin)}"
    their_port = origin_port if origin_port is not None else _DEFAULT_PORTS[scheme]
    our_port = ours.port if ours.port is not None else _DEFAULT_PORTS["http"]
    # The admin port speaks plain HTTP, so a page of its own origin is always http://.
    if (scheme, theirs.host, their_port) != ("http", ours.host, our_port):
        return f"Origin {_echo(origin)} does not match the request's Host {_echo(host or '')}"
    return None


def body_refusal(content_type: str | None, has_body: bool) -> str | None:
    """An unsafe method must not look like something a page on any site can send.

    Those are exactly the CORS "simple" requests: a Content-Type of `text/plain`,
    `application/x-www-form-urlencoded` or `multipart/form-data` (refused even with an
    empty body: the POST itself is the action), or a body with no Content-Type at all (a
    typeless Blob). Any other type, `application/json` first, needs a CORS preflight, which
    the admin port never grants, so it can only come from a non-browser client.
    """
    if content_type is None:
        if has_body:
            return "a request body needs Content-Type: application/json"
        return None
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime in FORM_TYPES:
        return (
            f"Content-Type {_echo(mime)} is not accepted: send no body, or application/json "
            "(form encodings are refused so that no web page can post here)"
        )
    return None


def check_access(headers: MultiMapping[str], admin_hosts: Collection[str]) -> Refusal | None:
    """403 for a request a web page could have made: Host, Sec-Fetch-Site, Origin."""
    message = None
    for name in ("Sec-Fetch-Site", "Origin"):
        if len(headers.getall(name, ())) > 1:
            message = f"more than one {name} header"  # no browser sends two
    host = headers.get("Host")
    if message is None:
        message = host_refusal(host, admin_hosts)
    if message is None:
        message = fetch_site_refusal(headers.get("Sec-Fetch-Site"))
    if message is None:
        message = origin_refusal(headers.get("Origin"), host)
    return Refusal(403, "forbidden", message) if message is not None else None


def check_body(method: str, headers: Mapping[str, str], has_body: bool) -> Refusal | None:
    """415 for an unsafe method whose body a browser form could have sent."""
    if method.upper() in SAFE_METHODS:
        return None
    message = body_refusal(headers.get("Content-Type"), has_body)
    return Refusal(415, "unsupported_media_type", message) if message is not None else None
