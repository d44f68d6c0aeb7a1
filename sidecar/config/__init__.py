"""Configuration: YAML in, frozen typed objects out (see `model`), with precise errors."""

from sidecar.config.loader import load_config, load_config_text
from sidecar.config.model import ConfigError, Problem, SidecarConfig

__all__ = ["ConfigError", "Problem", "SidecarConfig", "load_config", "load_config_text"]
