"""Loading a config file: read it, check it, build the model, or say everything that is wrong.

The steps, each in its own module:
`yamlsafe` (bounded, tag-free YAML with positions) -> `build` (schema, defaults merging,
`${VAR}` substitution via `Reader`) -> `checks` (warnings). Problems come back sorted by
position, each printed as `FILE:LINE:COL: key.path: message`, FILE being the path as given.

Only the config file itself is read (plus a stat of a `file:` discovery path); there is no
network I/O. Reading is bounded by `yamlsafe`'s limits, so the worst case is well under a
second; an async caller reloading on a live loop may still prefer `asyncio.to_thread`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from sidecar.config.build import Built, build
from sidecar.config.checks import check
from sidecar.config.model import ConfigError, Problem, SidecarConfig
from sidecar.config.reader import Reader
from sidecar.config.yamlsafe import MAX_BYTES, YamlProblem, YMap, YSeq, compose, to_tree

TEXT_NAME = "<config>"  # FILE in messages when the text did not come from a file


def load_config(
    path: str | Path, env: Mapping[str, str] | None = None
) -> tuple[SidecarConfig, list[Problem]]:
    """Load and validate the file at `path`; return the config and its warnings.

    Raises `ConfigError` with every problem (errors and warnings) when there is any error.
    """
    name = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError([Problem(f"cannot read the config file: {reason}", file=name)]) from None
    if len(data) > MAX_BYTES:
        raise ConfigError(
            [Problem(f"the config file is larger than the limit of {MAX_BYTES} bytes", file=name)]
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(
            [
                Problem(
                    f"the config file is not UTF-8 text (byte 0x{data[err.start]:02x} "
                    f"at offset {err.start})",
                    file=name,
                )
            ]
        ) from None
    return load_config_text(text, path, env)


def load_config_text(
    text: str, path: str | Path | None = None, env: Mapping[str, str] | None = None
) -> tuple[SidecarConfig, list[Problem]]:
    """Validate config text; `path` names it in messages and anchors relative paths.

    Without `path`, relative paths are taken from the current directory.
    """
    name = TEXT_NAME if path is None else str(path)
    base_dir = Path(path).parent.absolute() if path is not None else Path.cwd()
    reader = Reader(name, os.environ if env is None else env)
    try:
        node = compose(text)
    except YamlProblem as err:
        line, column = (err.pos.line, err.pos.column) if err.pos else (None, None)
        raise ConfigError([Problem(err.message, err.path, name, line, column)]) from None
    if node is None:
        raise ConfigError(
            [
                Problem(
                    "the config file is empty; expected a mapping with 'services' and 'routes'",
                    file=name,
                )
            ]
        )
    root, tree_problems = to_tree(node)
    for tp in tree_problems:
        reader.report(tp.pos, tp.path, tp.message)
    if any(tp.fatal for tp in tree_problems):
        raise ConfigError(_tidy(reader.problems))
    if not isinstance(root, YMap):
        what = "a list" if isinstance(root, YSeq) else f"'{root.text}'"
        reader.report(
            root.pos,
            "",
            "the top level must be a mapping of settings (listen, services, routes, ...), "
            f"got {what}",
        )
        raise ConfigError(_tidy(reader.problems))
    built: Built = build(root, reader, base_dir, Path(path) if path is not None else None)
    check(built, reader)
    problems = _tidy(reader.problems)
    if any(not p.warning for p in problems):
        raise ConfigError(problems)
    return built.config, problems


def _tidy(problems: list[Problem]) -> list[Problem]:
    """Drop repeats (a merged default read for every route) and sort by position."""
    unique = list(dict.fromkeys(problems))
    return sorted(unique, key=lambda p: (p.line or 0, p.column or 0))
