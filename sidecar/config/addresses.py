"""Host names and `host:port` addresses: the one parser, for the config and for discovery.

An endpoint read from YAML, from a discovery file or from etcd goes through
`parse_address`, so the same text always gives the same `Address`: surrounding whitespace
is dropped, a DNS name is lower-cased (`Orders.local:80` is `orders.local:80`), an IPv6
literal is written in its canonical short form (`[::0001]:80` is `[::1]:80`). A mistake
raises `AddressError`, whose message the config quotes after the key path.
"""

from __future__ import annotations

import ipaddress
import re

from sidecar.config.model import Address
from sidecar.config.show import clip, quote

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")


class AddressError(ValueError):
    """Text that is not a `host:port` address; the message says why."""


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def valid_hostname(host: str) -> bool:
    if HOSTNAME.fullmatch(host) is None:
        return False
    labels = host.rstrip(".").split(".")
    if all(label.isdigit() for label in labels):  # looks like IPv4: must be one
        return is_ip(host)
    return True


def parse_address(text: str, default_port: int | None = None) -> Address:
    """The `Address` for `host:port` or `[v6]:port` (`default_port` when the port is left
    out, if given); `AddressError` says what is wrong."""
    text = text.strip()
    if not text:
        raise AddressError(f"expected an address 'host:port', got {quote(text)}")
    if text.startswith("["):
        end = text.find("]")
        host, rest = (text[1:end], text[end + 1 :]) if end > 0 else (text[1:], "")
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise AddressError(f"{quote(text)} is not a valid '[IPv6]:port' address") from None
        if rest == "" and default_port is not None:
            return Address(host, default_port)
        if not rest.startswith(":"):
            raise AddressError(
                f"expected an address '[IPv6]:port', got {quote(text)} (missing port)"
            )
        port_text = rest[1:]
    else:
        if text.count(":") > 1:
            raise AddressError(
                f"IPv6 addresses need brackets, e.g. '[::1]:8080', got {quote(text)}"
            )
        host, colon, port_text = text.partition(":")
        if not colon:
            if default_port is None:
                raise AddressError(
                    f"expected an address 'host:port', got {quote(text)} (missing port)"
                )
            port_text = str(default_port)
        if not host:
            raise AddressError(f"expected an address 'host:port', got {quote(text)} (missing host)")
        if not valid_hostname(host):
            raise AddressError(f"{quote(host)} is not a valid host name or IP address")
        host = host.lower()
    if not port_text.isascii() or not port_text.isdigit():
        raise AddressError(f"port must be a number between 1 and 65535, got {quote(port_text)}")
    digits = port_text.lstrip("0") or "0"
    if len(digits) > 5:  # and int() of a megabyte of digits would raise
        raise AddressError(f"port must be between 1 and 65535, got {clip(port_text)}")
    port = int(digits)
    if not 1 <= port <= 65535:
        raise AddressError(f"port must be between 1 and 65535, got {port}")
    return Address(host, port)
