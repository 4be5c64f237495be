"""Config-first loading: YAML with ``extends:`` overlays -> validated ``RunSettings``."""

from ..errors import ConfigError, ConfigErrors, DataError
from .loader import COMMAND_LINE, RESOLVED_CONFIG_NAME, ConfigLoader, ResolvedConfig
from .schema import AnchorRlhfKnobs, CustomConfig, MonitorConfig, VisualKDConfig
from .settings import AnchorSettings, RunSettings

__all__ = [
    "COMMAND_LINE",
    "RESOLVED_CONFIG_NAME",
    "AnchorRlhfKnobs",
    "AnchorSettings",
    "ConfigError",
    "ConfigErrors",
    "ConfigLoader",
    "CustomConfig",
    "DataError",
    "MonitorConfig",
    "ResolvedConfig",
    "RunSettings",
    "VisualKDConfig",
]
