"""Which build of this tree's sidecar the bench runs: the compiled copy, when it is current.

`make bench` builds `build/native` first (scripts/build-native.sh: the request path compiled
with mypyc, in a copy of the package), and that is what `make run` and the image run too, so
the bench measures it. The copy is used only when its recorded source hash is the tree's
(scripts/source-hash.sh): a sidecar edited since the build is measured from source, and the
report says which one ran.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def current_native(repo: Path) -> Path | None:
    """`repo/build/native` when it was built from the tree as it is now, else None."""
    out = repo / "build" / "native"
    recorded = out / "SOURCES"
    if not recorded.is_file() or recorded.read_text().strip() != source_hash(repo):
        return None
    return out


def source_hash(repo: Path) -> str:
    """scripts/source-hash.sh's hash of the tree's sources ("" when it cannot run)."""
    result = subprocess.run(
        ["bash", str(repo / "scripts" / "source-hash.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.stdout.strip() if result.returncode == 0 else ""


def env_with(native: Path | None) -> dict[str, str] | None:
    """The environment that makes `python -m sidecar` import the compiled copy (run it from
    the copy's folder too: `-m` puts the working folder first on the path)."""
    if native is None:
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = str(native)
    env["PYTHONSAFEPATH"] = "1"
    return env


def loads_from(pid: int, native: Path) -> bool:
    """Whether process `pid` has mapped an extension module of the compiled copy."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False
    prefix = str(native.resolve())
    return any(prefix in line and ".so" in line for line in maps.splitlines())
