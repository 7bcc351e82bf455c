"""Configuration: one TOML file, validated into typed objects. Data and validation of data only:
the checks that need other parts run in ``postlane/startup.py``, which reads configs.

The names below load on first use (PEP 562): the node's child processes (the recorder, the DKIM
signer) import ``config.fields`` and ``config.locations`` without pulling in pydantic and the
models (≈ 12 MB each)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .load import ConfigError
    from .model import ClassConfig, Config, ListenerConfig, PoolConfig, SourceIP

__all__ = ["ClassConfig", "Config", "ConfigError", "ListenerConfig", "PoolConfig", "SourceIP"]

_WHERE = {"ConfigError": "load", "ClassConfig": "model", "Config": "model",
          "ListenerConfig": "model", "PoolConfig": "model", "SourceIP": "model"}


def __getattr__(name: str) -> object:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{where}"), name)
