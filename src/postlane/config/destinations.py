"""The shipped destination rules for the big mailbox providers (data/destinations.toml): config
data, merged under the operator's own ``[destinations]`` unless ``default_destinations = false``."""

from __future__ import annotations

import tomllib
from importlib import resources

from .model import DestinationRule

DEFAULTS_FILE = "destinations.toml"


def default_rules() -> dict[str, DestinationRule]:
    """The shipped rules for the big mailbox providers (data/destinations.toml)."""
    text = resources.files("postlane.data").joinpath(DEFAULTS_FILE).read_text(encoding="utf-8")
    return {name: DestinationRule.model_validate(body)
            for name, body in tomllib.loads(text).items()}
