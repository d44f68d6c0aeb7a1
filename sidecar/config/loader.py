"""Placeholder: being written (YAML with positions -> SidecarConfig)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from sidecar.config.model import Problem, SidecarConfig


def load_config(
    path: str | Path, env: Mapping[str, str] | None = None
) -> tuple[SidecarConfig, list[Problem]]:
    text = Path(path).read_text()
    return load_config_text(text, Path(path), env if env is not None else os.environ)


def load_config_text(
    text: str, path: Path | None = None, env: Mapping[str, str] | None = None
) -> tuple[SidecarConfig, list[Problem]]:
    raise NotImplementedError
