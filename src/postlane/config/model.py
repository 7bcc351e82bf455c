"""The node's configuration as typed objects, validated from one TOML file.

Every field has a default an operator would expect, so a small file is enough; every error names the
field it is about (see ``load.py``).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3,
               "gb": 1024**3}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?b?)\s*$", re.IGNORECASE)


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like ``"30s"``, ``"2m"``, ``"1d"``."""
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2) or "s"]
    raise ValueError(f"not a duration: {value!r} (use seconds or e.g. '30s', '2m', '1h', '3d')")


def parse_size(value: object) -> int:
    """Bytes from a number or a string like ``"10MB"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    raise ValueError(f"not a size: {value!r} (use bytes or e.g. '512KB', '25MB')")


def _ip(value: object) -> str:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise ValueError(f"not an IP address: {value!r}") from None


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
IPAddress = Annotated[str, BeforeValidator(_ip)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class NodeConfig(Strict):
    name: Name = "postlane-1"
    hostname: str = "localhost"
    spool: str = "var/spool"
    """Directory of the embedded SQLite spool, or a ``postgresql://`` DSN (cluster mode)."""
    drain_timeout: Duration = 30.0


class ListenerConfig(Strict):
    address: IPAddress = "127.0.0.1"
    port: int = Field(2525, ge=0, le=65535)
    default_class: str | None = None
    max_message_size: Size = 25 * 1024 * 1024
    max_recipients: int = Field(1000, ge=1)
    relay_from: list[str] = ["127.0.0.0/8", "::1/128"]
    """Client networks allowed to relay without authentication."""

    @field_validator("relay_from")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"not a network: {item!r}") from None
        return value


class SourceIP(Strict):
    address: IPAddress
    ehlo: str
    max_smtp_out: int = Field(10, ge=1, le=10000)


class PoolConfig(Strict):
    ips: list[SourceIP] = Field(min_length=1)
    pausable: bool = True
    max_messages_per_connection: int = Field(1000, ge=1)


class ClassConfig(Strict):
    pool: str
    priority: int = Field(5, ge=0, le=9)
    sla: Duration | None = None
    retry: list[Duration] = [60.0, 300.0, 900.0, 1800.0, 3600.0]
    expiry: Duration = 5 * 86400.0

    @field_validator("retry")
    @classmethod
    def _retry(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("needs at least one interval")
        return value


class DNSConfig(Strict):
    nameserver: IPAddress | None = None
    port: int = Field(53, ge=1, le=65535)
    timeout: Duration = 5.0


class RelayConfig(Strict):
    smtp_port: int = Field(25, ge=1, le=65535)
    """Port of remote MXes; tests and demos point it at a loopback sink."""
    tls: Literal["opportunistic", "required", "disabled"] = "opportunistic"
    tls_verify: bool = False
    connect_timeout: Duration = 30.0
    command_timeout: Duration = 60.0
    data_timeout: Duration = 600.0
    idle_timeout: Duration = 2.0
    """How long an open connection waits for more mail to its destination before QUIT."""
    max_recipients_per_transaction: int = Field(100, ge=1)


class AccountingConfig(Strict):
    directory: str = "var/accounting"
    formats: list[Literal["csv", "jsonl"]] = ["csv"]
    rotate: Duration = 86400.0
    rotate_size: Size = 100 * 1024 * 1024


class ClusterConfig(Strict):
    """Cluster mode (``node.spool`` is a PostgreSQL DSN): how nodes share the queue."""

    schema_name: str = Field("postlane", pattern=r"^[a-z_][a-z0-9_]{0,39}$")
    """PostgreSQL schema holding the shared spool; every node of one cluster names the same.
    Lower case, digits and ``_``, at most 40 characters (it also names the NOTIFY channels)."""
    lease: Duration = 30.0
    """How long claimed work stays a node's without renewal: a dead node's mail is taken over
    by the others after at most this long (renewed every third of it)."""
    claim_ahead: int = Field(2, ge=1, le=1000)
    """Ready recipients a node keeps claimed per outbound connection slot of a pool."""
    poll: Duration = 1.0
    """How often a node looks for due retries and expired leases without being notified."""

    @field_validator("lease")
    @classmethod
    def _lease(cls, value: float) -> float:
        if value < 1.0:
            raise ValueError("must be at least 1s")
        return value


class Config(Strict):
    node: NodeConfig = NodeConfig()
    listeners: dict[Name, ListenerConfig] = {"default": ListenerConfig()}
    pools: dict[Name, PoolConfig] = Field(min_length=1)
    classes: dict[Name, ClassConfig] = Field(min_length=1)
    default_class: str | None = None
    dns: DNSConfig = DNSConfig()
    relay: RelayConfig = RelayConfig()
    routes: dict[str, str] = {}
    """Recipient domain -> "host:port" (a smarthost, or a sink in tests); skips MX lookup."""
    accounting: AccountingConfig = AccountingConfig()
    correlation_header: str = "X-Correlation-ID"
    cluster: ClusterConfig = ClusterConfig()
    scheduler: Literal["lanes", "fifo"] = "lanes"
    """``fifo`` serves every message in arrival order through one queue: the baseline to beat."""

    def class_for(self, name: str | None) -> ClassConfig | None:
        return self.classes.get(name) if name else None
