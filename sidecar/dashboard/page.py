"""The dashboard page: dashboard.html, read once from the package, and the headers it is
served with.

The page is self-contained (inline CSS and script, no fonts, images or CDNs) so it works
offline and behind any firewall. Its Content-Security-Policy allows exactly that one inline
script, by hash, and network access to its own origin only: even a value that slipped past
the page's `textContent`-only rendering could not run script or load anything.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources
from typing import Final

BODY: Final = resources.files("sidecar.dashboard").joinpath("dashboard.html").read_bytes()


def _script_hashes(html: bytes) -> list[str]:
    scripts = re.findall(rb"<script>(.*?)</script>", html, flags=re.DOTALL)
    return [
        "'sha256-" + base64.b64encode(hashlib.sha256(s).digest()).decode("ascii") + "'"
        for s in scripts
    ]


CSP: Final = "; ".join(
    [
        "default-src 'none'",
        "script-src " + " ".join(_script_hashes(BODY)),
        "style-src 'unsafe-inline'",
        "connect-src 'self'",
        "img-src data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)

HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
