"""Configuration: one TOML file, validated into typed objects."""

from .load import ConfigError, load_config, parse_config
from .model import ClassConfig, Config, ListenerConfig, PoolConfig, SourceIP

__all__ = ["ClassConfig", "Config", "ConfigError", "ListenerConfig", "PoolConfig", "SourceIP",
           "load_config", "parse_config"]
