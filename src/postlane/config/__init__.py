"""Configuration: one TOML file, validated into typed objects. Data and validation of data only:
the checks that need other parts run in ``postlane/startup.py``, which reads configs."""

from .load import ConfigError
from .model import ClassConfig, Config, ListenerConfig, PoolConfig, SourceIP

__all__ = ["ClassConfig", "Config", "ConfigError", "ListenerConfig", "PoolConfig", "SourceIP"]
