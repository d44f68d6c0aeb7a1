"""`python -m bench` (= `make bench`): the sidecar against HAProxy and a direct call.

    python -m bench                      # the full run (< 10 min on a 2-core box)
    python -m bench --quick              # shorter rounds
    python -m bench --smoke              # ~1 s per phase, for the test suite
    python -m bench --only small,c1 --duration 3 --rounds 2
    python -m bench --base HEAD~1 --only small,c1   # A/B: that revision beside this tree

Prints a markdown table on stdout (progress on stderr) and writes JSON under bench/results/;
a full run also writes bench/results/latest.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from bench import ab, report
from bench.grpc_row import GrpcRow
from bench.native import current_native
from bench.phases import PHASES, SCENARIOS, Bench, Settings, Tools, settings_dict
from bench.runner import (
    Procs,
    core_busy_pct,
    core_times,
    cpus,
    log,
    machine_info,
    pin_self,
    which,
)
from bench.scenarios import Resilience

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="2 rounds x 2 s per phase")
    mode.add_argument("--smoke", action="store_true", help="1 round x 1 s per phase (tests)")
    p.add_argument("--duration", type=int, default=None, help="seconds per run, every phase")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per phase")
    p.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="runs of every resilience scenario (default 5; 1 with --quick/--smoke)",
    )
    p.add_argument(
        "--base",
        metavar="REV",
        default=None,
        help="A/B: run the sidecar at git revision REV (own worktree and venv) as "
        f"`{ab.BASE_CONFIG}` beside this tree's in the small and c1 phases",
    )
    p.add_argument(
        "--only",
        default=None,
        help=f"comma list of phases ({', '.join(PHASES)}) and/or scenarios "
        f"({', '.join(SCENARIOS)})",
    )
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where JSON/markdown go")
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    return p.parse_args(argv)


def select(settings: Settings, only: str | None) -> None:
    if not only:
        return
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in PHASES and n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown phase/scenario: {', '.join(unknown)}")
    scenarios = [n for n in names if n in SCENARIOS]
    phases = [n for n in names if n in PHASES]
    if scenarios:
        phases.append("resilience")
        settings.scenarios = tuple(scenarios)
    settings.phases = tuple(dict.fromkeys(phases))


def find_tools() -> Tools:
    wrk_bin, haproxy = which("wrk"), which("haproxy")
    missing = [n for n, b in (("wrk", wrk_bin), ("haproxy", haproxy)) if b is None]
    if missing:
        raise SystemExit(
            f"missing: {', '.join(missing)}; install with "
            "`bash scripts/install-system-deps.sh bench` (Debian packages wrk, haproxy)"
        )
    assert wrk_bin is not None and haproxy is not None
    taskset = which("taskset")
    if taskset is None:
        log("warning: taskset not found (util-linux); processes are not pinned")
    nginx = which("nginx")
    if nginx is None:
        log("nginx not found: the raw asyncio upstream stands in for it")
    return Tools(wrk=wrk_bin, haproxy=haproxy, taskset=taskset, nginx=nginx)


def idle_check() -> dict[str, float]:
    """Busy % of each core over one second before the run: other work skews everything."""
    before = core_times()
    time.sleep(1.0)
    busy = core_busy_pct(before, core_times())
    if any(v > 10 for v in busy.values()):
        log(f"warning: the machine is busy before the run ({busy}); numbers will be noisy")
    return busy


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except KeyboardInterrupt as exc:
        # Everything was stopped and removed on the way out (the `finally` in run).
        log(f"interrupted ({exc or 'Ctrl-C'}): processes stopped, temporary files removed")
        return 130


def run(argv: list[str] | None) -> int:
    args = parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    settings = Settings.preset(mode)
    settings.override(args.duration, args.rounds, args.repeat)
    select(settings, args.only)
    custom = bool(args.only or args.duration or args.rounds or args.repeat or args.base)
    if args.base and not {"small", "c1"} & set(settings.phases):
        raise SystemExit("--base compares the small and c1 phases: add one of them to --only")
    tools = find_tools()
    load_cpu, proxy_cpu = cpus()
    if load_cpu == proxy_cpu:
        log("warning: one CPU only; the load and the proxy share it")
    pin_self(load_cpu)  # this process (and the in-process load driver) lives on the load CPU

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    tmp = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    procs = Procs(tools.taskset)
    bench = Bench(settings, tools, tmp, procs, load_cpu, proxy_cpu)
    bench.native = current_native(REPO)
    if bench.native is None:
        log("no current compiled copy (make native): the sidecar runs from source")
    base = ab.BaseTree(REPO, args.base) if args.base else None
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    wall0 = time.monotonic()
    resilience: dict[str, Any] = {}
    grpc: dict[str, Any] | None = None
    try:
        if base is not None:
            base.add()  # inside the try: a Ctrl-C while pip runs still removes the worktree
            bench.base = base
        quiet = idle_check()
        log(f"{mode} run: phases {', '.join(settings.phases)}; tmp {tmp}")
        bench.throughput_phases()
        if "grpc" in settings.phases:
            grpc = GrpcRow(bench).run()
        if "resilience" in settings.phases:
            resilience = Resilience(bench).run()
    finally:
        procs.stop_all()
        if base is not None:
            base.remove()
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    wall = time.monotonic() - wall0

    summary = report.summarize_runs(bench.runs)
    derived = report.compute_derived(summary, bench.extra, bench.runs)
    result: dict[str, Any] = {
        "meta": {
            "started": started,
            "wall_s": round(wall, 1),
            "mode": mode + (" (custom)" if custom else ""),
            "argv": sys.argv[1:] if argv is None else argv,
            "settings": settings_dict(settings),
            "machine": machine_info(
                {"haproxy": tools.haproxy, "wrk": tools.wrk, "nginx": tools.nginx}
            ),
            "upstream": bench.upstream_kind,
            "sidecar_build": "native" if bench.native is not None else "source",
            "load_cpu": load_cpu,
            "proxy_cpu": proxy_cpu,
            "pinned": tools.taskset is not None,
            "cores_busy_before_pct": quiet,
        },
        "summary": summary,
        "derived": derived,
        "bigbody": bench.extra.get("bigbody"),
        "grpc": grpc,
        "resilience": resilience,
        "runs": bench.runs,
    }
    if base is not None:
        result["ab"] = {"base": base.info, **ab.verdict(bench.runs)}
    result["targets"] = report.evaluate_targets(summary, derived, resilience, grpc)
    result["targets"] += report.ab_targets(result.get("ab"))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = args.results_dir / f"bench-{stamp}-{mode}.json"
    result["meta"]["json_name"] = json_path.name
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md = report.markdown(result)
    if mode == "full" and not custom:
        (args.results_dir / "latest.md").write_text(md)
    print(md)
    log(f"wrote {json_path} (wall {wall:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
