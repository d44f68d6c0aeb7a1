"""Command line: `sidecar run | validate | demo` (docs/contract.md#command-line)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from sidecar.config import ConfigError, Problem, SidecarConfig, load_config

DEFAULT_CONFIG = "config/sidecar.yaml"


def _default_config_path() -> str:
    return os.environ.get("SIDECAR_CONFIG") or DEFAULT_CONFIG


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar", description="A small resilience sidecar proxy."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    help_c = "config file (default: $SIDECAR_CONFIG, then config/sidecar.yaml)"
    run = sub.add_parser("run", help="serve with the given config")
    run.add_argument("-c", "--config", default=None, help=help_c)
    validate = sub.add_parser("validate", help="check a config file and exit (0 = valid)")
    validate.add_argument("-c", "--config", default=None, help=help_c)
    demo = sub.add_parser(
        "demo", help="start built-in demo upstreams, then serve the config against them"
    )
    demo.add_argument("-c", "--config", default=None, help=help_c)
    return parser


def load_or_report(path: str) -> SidecarConfig | None:
    """Load a config, printing every problem (and warning) on stderr; None if invalid."""
    try:
        config, warnings = load_config(path)
    except ConfigError as exc:
        _print_problems(exc.problems)
        return None
    _print_problems(warnings)
    return config


def _print_problems(problems: Sequence[Problem]) -> None:
    # Errors first so the reason a config is refused leads the output.
    for problem in sorted(problems, key=lambda p: p.warning):
        print(problem, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    path = args.config or _default_config_path()
    config = load_or_report(path)
    if config is None:
        return 1
    if args.command == "validate":
        print("OK")
        return 0
    from sidecar.server import serve

    if args.command == "demo":
        from sidecar.demo import run_demo

        return run_demo(config)
    return serve(config)
