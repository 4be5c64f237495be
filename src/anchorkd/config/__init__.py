"""Config-first loading: YAML with ``extends:`` overlays -> validated ms-swift arguments."""

from ..errors import ConfigError, ConfigErrors, DataError
from .loader import RESOLVED_CONFIG_NAME, ConfigLoader, LoadedConfig, ResolvedConfig
from .schema import AnchorRlhfKnobs, CustomConfig, MonitorConfig, VisualKDConfig

__all__ = [
    "RESOLVED_CONFIG_NAME",
    "AnchorRlhfKnobs",
    "ConfigError",
    "ConfigErrors",
    "ConfigLoader",
    "CustomConfig",
    "DataError",
    "LoadedConfig",
    "MonitorConfig",
    "ResolvedConfig",
    "VisualKDConfig",
]
