"""Masking secrets in text the sidecar shows: the password part of URLs.

A URL with credentials (`http://user:secret@127.0.0.1:2379`) is config an operator wrote,
but its password must not reach /admin/config, /admin/state, an error message or a log
line. `mask_url` masks every such URL inside a text, wherever it sits
(`etcd: http://u:***@127.0.0.1:2379/v3/kv/range: Connection refused`); the user name
stays, so the operator can still tell which credentials were used.
"""

from __future__ import annotations

import re

MASK = "***"

# scheme://userinfo@ ; the userinfo runs to the last '@' before the host part ends, so a
# password holding a raw '@' is masked whole.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s]*)@")


def _mask(match: re.Match[str]) -> str:
    user, colon, _password = match.group("userinfo").partition(":")
    if not colon:
        return match.group(0)  # a user name alone is not a secret
    return f"{match.group('scheme')}{user}:{MASK}@"


def mask_url(text: str) -> str:
    """`text` with the password of every URL in it replaced by `***`."""
    if "@" not in text:
        return text
    return _USERINFO.sub(_mask, text)
