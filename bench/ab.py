"""`--base REV`: the sidecar at another revision, run beside the working tree's.

The revision is checked out with `git worktree add --detach` into a temporary folder (removed
at the end, also on Ctrl-C or SIGTERM: `BaseTree.remove` runs from the caller's `finally`)
and runs from a virtualenv of its own, since its dependencies may differ from the working
tree's. The venvs are cached under ~/.cache/sidecar-bench/venv-<key>, the key a hash of the
revision's pyproject.toml dependencies and the Python version. They hold the dependencies
only (never the sidecar package itself): the base sidecar runs as `python -m sidecar` with
the worktree as its working directory and PYTHONPATH, so two revisions with the same
dependencies share a venv and each still runs its own code.

The verdict (`verdict`): for each metric, the median over rounds of the per-round ratio
after/before (the working tree over the base, the two measured back to back in the same
round, so they share the machine's speed), with the run's own spread.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.runner import log

BASE_CONFIG = "sidecar@base"
PIP_TIMEOUT_S = 900


def cache_root() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "sidecar-bench"


def _git(repo: Path, *args: str, timeout: float = 120) -> str:
    out = subprocess.run(
        ["git", "-C", str(repo), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed: {out.stderr.strip()[-800:]}")
    return out.stdout.strip()


def head_description(repo: Path) -> dict[str, Any]:
    """The working tree's commit and whether it has uncommitted changes (they are measured)."""
    sha = _git(repo, "rev-parse", "HEAD")
    dirty = bool(_git(repo, "status", "--porcelain", "--untracked-files=no"))
    return {"sha": sha, "dirty": dirty}


def venv_key(pyproject: bytes) -> str:
    """The cache key: the pyproject.toml's runtime dependencies (all the venv holds) and
    the Python version; a change to anything else in the file reuses the venv."""
    version = f"py{sys.version_info.major}.{sys.version_info.minor}"
    deps = "\n".join(sorted(dependencies(pyproject))).encode()
    return f"{hashlib.sha256(deps).hexdigest()[:16]}-{version}"


def dependencies(pyproject: bytes) -> list[str]:
    """The runtime dependencies of a pyproject.toml, and its `native` extra when it has one
    (what compiling its request path needs); the base needs nothing else to run."""
    data = tomllib.loads(pyproject.decode())
    project = data.get("project", {})
    deps = [
        *project.get("dependencies", []),
        *project.get("optional-dependencies", {}).get("native", []),
    ]
    return [str(d) for d in deps]


def ensure_venv(pyproject: bytes) -> Path:
    """The cached venv for this pyproject.toml: created (and its dependencies installed) the
    first time, reused after. Built in a temporary folder and renamed when complete, so an
    interrupted build is never taken for a finished one."""
    root = cache_root()
    target = root / f"venv-{venv_key(pyproject)}"
    python = target / "bin" / "python"
    if (target / ".complete").exists() and python.exists():
        log(f"A/B: reusing {target}")
        return python
    root.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f"{target.name}.building-", dir=root))
    try:
        log(f"A/B: creating {target} (pip install of the base's dependencies)")
        # sys._base_executable: the interpreter this venv's python was made from.
        base_python = getattr(sys, "_base_executable", sys.executable)
        subprocess.run(
            [base_python, "-m", "venv", str(building)], check=True, timeout=PIP_TIMEOUT_S
        )
        deps = dependencies(pyproject)
        cmd = [str(building / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        cmd += ["--disable-pip-version-check", *deps]
        subprocess.run(cmd, check=True, timeout=PIP_TIMEOUT_S)
        (building / ".complete").write_text("\n".join(deps) + "\n")
        if target.exists():
            shutil.rmtree(target)
        building.rename(target)
    except (subprocess.SubprocessError, OSError) as exc:
        shutil.rmtree(building, ignore_errors=True)
        raise SystemExit(f"A/B: could not build the base venv: {exc}") from exc
    finally:
        if building.exists() and building != target:
            shutil.rmtree(building, ignore_errors=True)
    # The venv's scripts name their own folder: rebuilt after the rename, they would point
    # at the temporary one; `python -m` does not use them.
    return python


@dataclass
class BaseTree:
    """A revision checked out in a temporary worktree, with the python that runs it."""

    repo: Path
    rev: str
    sha: str = ""
    path: Path = Path()
    python: Path = Path()
    removed: bool = False
    native: Path | None = None  # its compiled copy, when the revision has the build
    info: dict[str, Any] = field(default_factory=dict)

    def add(self) -> None:
        self.sha = _git(self.repo, "rev-parse", "--verify", f"{self.rev}^{{commit}}")
        pyproject = subprocess.run(
            ["git", "-C", str(self.repo), "show", f"{self.sha}:pyproject.toml"],
            capture_output=True,
            timeout=30,
            check=True,
        ).stdout
        self.python = ensure_venv(pyproject)
        self.path = Path(tempfile.mkdtemp(prefix="sidecar-bench-base-"))
        # `git worktree add` wants to create the folder itself.
        self.path.rmdir()
        log(f"A/B: base {self.rev} = {self.sha[:12]} in {self.path}")
        _git(self.repo, "worktree", "add", "--detach", str(self.path), self.sha)
        subject = _git(self.repo, "log", "-1", "--format=%s", self.sha)
        # A revision that compiles its request path is measured compiled, as this tree is:
        # the A/B then compares the code, not the two builds.
        build = self.path / "scripts" / "build-native.sh"
        self.native = None
        if build.is_file():
            log(f"A/B: compiling {self.rev}'s request path (scripts/build-native.sh)")
            out = self.path / "build" / "native"
            subprocess.run(
                ["bash", str(build), str(out), str(self.python)],
                capture_output=True,
                timeout=900,
                check=True,
            )
            self.native = out
        self.info = {
            "rev": self.rev,
            "sha": self.sha,
            "subject": subject,
            "venv": str(self.python.parent.parent),
            "head": head_description(self.repo),
            "build": "native" if self.native is not None else "source",
        }

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.native or self.path)
        env.pop("VIRTUAL_ENV", None)
        return env

    def remove(self) -> None:
        """Remove the worktree (and git's record of it); safe to call twice."""
        if self.removed or self.path == Path():
            return
        self.removed = True
        subprocess.run(
            ["git", "-C", str(self.repo), "worktree", "remove", "--force", str(self.path)],
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(self.path, ignore_errors=True)
        subprocess.run(
            ["git", "-C", str(self.repo), "worktree", "prune"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        log(f"A/B: removed the worktree {self.path}")


# --------------------------------------------------------------------------- verdict


def _per_round(runs: list[dict[str, Any]], phase: str, value: Any) -> dict[int, dict[str, float]]:
    by_round: dict[int, dict[str, float]] = {}
    for r in runs:
        if r["phase"] != phase:
            continue
        v = value(r)
        if v is not None:
            by_round.setdefault(r["round"], {})[r["config"]] = float(v)
    return by_round


def _half_range(values: list[float]) -> float | None:
    med = statistics.median(values)
    if med <= 0:
        return None
    return round((max(values) - min(values)) / (2 * med), 4)


def _compare(
    by_round: dict[int, dict[str, float]],
    after: str,
    before: str,
    higher_is_better: bool,
    reference: str | None = None,
) -> dict[str, Any]:
    """Paired per-round ratios after/before of a value (minus the same round's `reference`
    when given: the added latency over the direct call)."""
    after_vals: list[float] = []
    before_vals: list[float] = []
    ratios: list[float] = []
    for _, vals in sorted(by_round.items()):
        if after not in vals or before not in vals:
            continue
        a, b = vals[after], vals[before]
        if reference is not None:
            if reference not in vals:
                continue
            a, b = a - vals[reference], b - vals[reference]
        after_vals.append(a)
        before_vals.append(b)
        if b > 0:
            ratios.append(a / b)
    out: dict[str, Any] = {
        "rounds": len(ratios),
        "ratios": [round(x, 4) for x in ratios],
        "after": [round(x, 4) for x in after_vals],
        "before": [round(x, 4) for x in before_vals],
        "higher_is_better": higher_is_better,
    }
    if not ratios:
        out.update(median_ratio=None, spread=None, no_worse=None)
        return out
    med = statistics.median(ratios)
    # The run's own spread: half a config's range across rounds, relative to its median
    # (each runs the same code every round, so its range is what the machine did to it),
    # the larger of the two, times sqrt(2): a ratio carries the noise of both its terms.
    # A difference smaller than that is one this run cannot resolve.
    spreads = [_half_range(before_vals), _half_range(after_vals)]
    spread = None if None in spreads else math.sqrt(2) * max(x for x in spreads if x is not None)
    out["median_ratio"] = round(med, 4)
    out["ratio_min"] = round(min(ratios), 4)
    out["ratio_max"] = round(max(ratios), 4)
    out["spread_before"] = spreads[0]
    out["spread_after"] = spreads[1]
    out["spread"] = None if spread is None else round(spread, 4)
    if len(ratios) < 2 or spread is None:
        out["no_worse"] = None  # one round has no spread to judge against
    elif higher_is_better:
        out["no_worse"] = med >= 1 - spread
    else:
        out["no_worse"] = med <= 1 + spread
    return out


def verdict(runs: list[dict[str, Any]], after: str = "sidecar") -> dict[str, Any]:
    """The A/B verdict for small-body c50 req/s and c1 added p50 (over the cross-core
    direct call, or the same-core one when that phase has no cross-core run)."""
    rps = _compare(_per_round(runs, "small", lambda r: r.get("rps")), after, BASE_CONFIG, True)
    p50 = _per_round(runs, "c1", lambda r: r["latency_ms"]["p50"])
    has_x = any("direct-xcpu" in v for v in p50.values())
    ref = "direct-xcpu" if has_x else "direct"
    added = _compare(p50, after, BASE_CONFIG, False, reference=ref)
    added["reference"] = ref
    # Other processes on the machine during the two sidecars' runs: the verdict is only as
    # good as the quiet it was measured in.
    foreign = [
        float(r.get("foreign_cpu_pct") or 0.0)
        for r in runs
        if r["phase"] in ("small", "c1") and r["config"] in (after, BASE_CONFIG)
    ]
    return {
        "c50_rps": rps,
        "c1_added_p50": added,
        "foreign_cpu_pct_max": max(foreign) if foreign else None,
    }
