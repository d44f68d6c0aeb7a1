"""The field rules of the HTTP/2 server, apart from any connection state.

`parse_request` checks one request header block (RFC 9113 §8.2, §8.3) and splits it into
a `RequestHead`, or says why it is `Malformed`; `_check_trailers` does the same for a
request's trailers, `_encode_fields` for the fields of a response. `h2`'s own header
validation is off (see the package docstring), so these are the only checks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from sidecar import grpc as grpcwire
from sidecar.http.base import Fields

_CONNECTION_SPECIFIC: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_RESPONSE_DROPPED: Final = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te"}
)
# RFC 9110 token characters, lower case only: anything else in a name is malformed.
_BAD_NAME: Final = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9a-z]")
_BAD_VALUE: Final = re.compile(rb"[\x00\r\n]")


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    path: str
    authority: str | None
    scheme: str
    fields: list[tuple[str, str]]  # regular fields, `host` first when there is one
    content_length: int | None
    grpc: bool


@dataclass(frozen=True, slots=True)
class Malformed:
    detail: str
    status: int = 400
    grpc: bool = False


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def _bad_value(value: bytes) -> bool:
    if _BAD_VALUE.search(value) is not None:
        return True
    return bool(value) and (value[0] in b" \t" or value[-1] in b" \t")


def parse_request(
    raw: Iterable[tuple[bytes, bytes]], *, ended: bool, max_list_size: int
) -> RequestHead | Malformed:
    """Check one request header block (RFC 9113 §8.2, §8.3) and split it."""
    method = scheme = path = authority = host = None
    content_length: int | None = None
    regular = False
    size = 0
    fields: list[tuple[str, str]] = []
    problem: str | None = None
    grpc = False
    for name, value in raw:
        size += len(name) + len(value) + 32
        if problem is not None:
            continue
        if not name:
            problem = "empty header name"
        elif name[0] == 0x3A:  # ":"
            if regular:
                problem = "pseudo-header after a regular header"
            elif _bad_value(value):
                problem = f"invalid character in {_text(name)}"
            elif name == b":method":
                problem = "duplicate :method" if method is not None else None
                method = value
            elif name == b":scheme":
                problem = "duplicate :scheme" if scheme is not None else None
                scheme = value
            elif name == b":path":
                problem = "duplicate :path" if path is not None else None
                path = value
            elif name == b":authority":
                problem = "duplicate :authority" if authority is not None else None
                authority = value
            else:
                problem = f"pseudo-header {_text(name)!r} is not allowed in a request"
        else:
            regular = True
            if _BAD_NAME.search(name) is not None:
                problem = f"invalid header name {_text(name)!r}"
            elif _bad_value(value):
                problem = f"invalid character in the value of {_text(name)!r}"
            elif name in _CONNECTION_SPECIFIC:
                problem = f"connection-specific header {_text(name)!r}"
            elif name == b"te" and value.lower() != b"trailers":
                problem = "te other than trailers"
            elif name == b"host":
                if host is not None and host != value:
                    problem = "more than one host"
                host = value
            elif name == b"content-length":
                # h2 has already refused a non-numeric or conflicting value.
                content_length = int(value)
            elif name == b"content-type":
                grpc = grpcwire.is_grpc(_text(value))
            if problem is None and name != b"host":
                fields.append((_text(name), _text(value)))
    if problem is not None:
        return Malformed(problem, grpc=grpc)
    if size > max_list_size:
        return Malformed(f"header list of {size} bytes, limit {max_list_size}", 431, grpc)
    if method is None or scheme is None or path is None:
        if method == b"CONNECT":
            return Malformed("CONNECT is not supported", grpc=grpc)
        return Malformed("missing :method, :scheme or :path", grpc=grpc)
    if method == b"CONNECT":
        return Malformed("CONNECT is not supported", grpc=grpc)
    if not path.startswith(b"/"):
        return Malformed(":path does not start with /", grpc=grpc)
    if authority is not None and host is not None and authority != host:
        return Malformed("host and :authority differ", grpc=grpc)
    if ended and content_length:
        return Malformed(f"content-length {content_length} but no body", grpc=grpc)
    if method == b"HEAD":
        content_length = None  # describes the GET answer's body, not this request
    host_value = authority if authority is not None else host
    if host_value is not None:
        fields.insert(0, ("host", _text(host_value)))
    return RequestHead(
        method=_text(method),
        path=_text(path),
        authority=None if authority is None else _text(authority),
        scheme=_text(scheme),
        fields=fields,
        content_length=content_length,
        grpc=grpc,
    )


def _encode_fields(headers: Fields, drop_length: bool) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        lname = name.lower()
        if lname in _RESPONSE_DROPPED or (drop_length and lname == "content-length"):
            continue
        if "\r" in value or "\n" in value or "\0" in value:
            raise ValueError(f"response header {name!r} contains CR, LF or NUL")
        out.append(
            (lname.encode("utf-8", "surrogateescape"), value.encode("utf-8", "surrogateescape"))
        )
    return out


def _check_trailers(raw: Iterable[tuple[bytes, bytes]]) -> str | None:
    for name, value in raw:
        if not name or name[0] == 0x3A:
            return "pseudo-header in trailers"
        if _BAD_NAME.search(name) is not None:
            return f"invalid trailer name {_text(name)!r}"
        if _bad_value(value):
            return f"invalid character in trailer {_text(name)!r}"
    return None
