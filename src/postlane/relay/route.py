"""What the relay needs to know of a destination and a source address: the scheduler's lanes and
slots satisfy these protocols, so the relay never imports the scheduler that drives it."""

from __future__ import annotations

from typing import Protocol

from ..config.model import DestinationRule


class Route(Protocol):
    """One destination of one pool (the scheduler's ``Lane``)."""

    @property
    def pool(self) -> str: ...

    @property
    def domain(self) -> str: ...

    @property
    def rule(self) -> DestinationRule | None: ...


class Source(Protocol):
    """One source address of a pool, with its EHLO name (the scheduler's ``SourceSlot``)."""

    @property
    def address(self) -> str: ...

    @property
    def ehlo(self) -> str: ...
