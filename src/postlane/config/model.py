"""The node's configuration as typed objects, validated from one TOML file.

Every field has a default an operator would expect, so a small file is enough; every error names the
field it is about (see ``load.py``).
"""

from __future__ import annotations

import ipaddress
import math
import re
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from .fields import DEFAULT_FIELDS, RECORD_TYPES, resolve_fields

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3,
               "gb": 1024**3}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?b?)\s*$", re.IGNORECASE)
MAX_DURATION = 100 * 365.25 * 86400.0
"""Longest time a field may give: beyond it, deadlines and dates cannot be shown or stored."""
MAX_SIZE = 2**50
"""Largest size a field may give (1 PiB): beyond it no disk or message is meant."""


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like ``"30s"``, ``"2m"``, ``"1d"``."""
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        try:
            seconds = float(value)
        except OverflowError:  # an int past a float's range (JSON's 1e400 written out)
            seconds = math.inf
        if not math.isfinite(seconds):  # also NaN and Infinity, which JSON may carry
            raise ValueError(f"not a duration: {value!r} (too large, or not a number)")
        return seconds
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
            if math.isfinite(seconds):
                return seconds
    raise ValueError(f"not a duration: {value!r} (use seconds or e.g. '30s', '2m', '1h', '3d')")


def parse_size(value: object) -> int:
    """Bytes from a number or a string like ``"10MB"``."""
    size = None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        size = value
    elif isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            size = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if size is not None:
        if size > MAX_SIZE:
            raise ValueError(f"not a size: {value!r} (too large: at most 1 PiB)")
        return size
    raise ValueError(f"not a size: {value!r} (use bytes or e.g. '512KB', '25MB')")


def _ip(value: object) -> str:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise ValueError(f"not an IP address: {value!r}") from None


def parse_instant(value: object) -> float:
    """Epoch seconds from a TOML date or datetime (or ISO text); without a zone it is UTC."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"not a date or time: {value!r} (e.g. 2027-01-01 or "
                             f"2027-01-01T00:00:00Z)") from None
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    raise ValueError(f"not a date or time: {value!r}")


def _domain(value: object) -> str:
    """A domain name in ASCII (a UTF-8 name becomes its IDNA A-label form)."""
    text = str(value).strip().rstrip(".").lower()
    try:
        text = text.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"not a domain name: {value!r}") from None
    if not re.fullmatch(r"[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*", text):
        raise ValueError(f"not a domain name: {value!r}")
    return text


def _bounded(value: float) -> float:
    """A configured time past 100 years is a slip (deadlines and dates past it cannot be shown
    or stored); the API's age filters, which take any finite age, do not use this."""
    if value > MAX_DURATION:
        raise ValueError("too long: at most 100 years")
    return value


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be more than 0s")
    return value


def _positive_size(value: int) -> int:
    if value <= 0:
        raise ValueError("must be more than 0 bytes")
    return value


def _workers(value: object) -> object:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)
                           and 1 <= value <= 256):
        return value
    raise ValueError(f"not 'auto' or a number of processes from 1 to 256: {value!r}")


Duration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_bounded)]
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_bounded),
                             AfterValidator(_positive)]
"""A time that must pass (an SLA, a retry interval, an expiry): 0 is a mistake."""
Instant = Annotated[float, BeforeValidator(parse_instant)]
DomainName = Annotated[str, BeforeValidator(_domain)]
Size = Annotated[int, BeforeValidator(parse_size)]
PositiveSize = Annotated[int, BeforeValidator(parse_size), AfterValidator(_positive_size)]
"""A size something must fit in (a message, a file before rotation): 0 is a mistake."""
IPAddress = Annotated[str, BeforeValidator(_ip)]
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_HOSTNAME = r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$"
_URL = r"^https?://[^\s]+$"
_SELECTOR = r"^[A-Za-z0-9]([A-Za-z0-9-]*)(\.[A-Za-z0-9-]+)*$"
_SCHEMA = r"^[a-z_][a-z0-9_]{0,39}$"
PATTERN_WORDS = {
    _NAME: "not a name (letters, digits, '.', '_' and '-', starting with a letter or digit)",
    _HOSTNAME: "not a host name (letters, digits, '.' and '-')",
    _URL: "not an http(s):// URL",
    _SELECTOR: "not a DKIM selector (letters, digits and '-', labels joined by '.')",
    _SCHEMA: "not a schema name (lower case letters, digits and '_', at most 40, not starting"
             " with a digit)"}
"""What each pattern a field must match means, for the error (never the regular expression)."""
Name = Annotated[str, Field(pattern=_NAME, max_length=64)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, strict=True)


class NodeConfig(Strict):
    name: Name = "postlane-1"
    hostname: Annotated[str, Field(pattern=_HOSTNAME, max_length=253)] = "localhost"
    """Name in the greeting, ``Received``, Message-IDs and bounces (a header value: LDH only)."""
    postmaster: str | None = None
    """Where mail to ``<postmaster>`` goes (RFC 5321 4.5.1: accepted from anyone), and the
    From of the node's DSNs (signed, aligned, with its domain's key); default ``postmaster@``
    the hostname, and DSNs from ``MAILER-DAEMON@`` it."""
    spool: str = "var/spool"
    """Directory of the embedded SQLite spool, or a ``postgresql://`` DSN (cluster mode)."""
    drain_timeout: Duration = 30.0
    workers: Annotated[Literal["auto"] | int, BeforeValidator(_workers)] = 1
    """SMTP intake processes: ``"auto"`` is one per core, 1 keeps intake in the main process.
    With more than one, the workers share the listening sockets and run the SMTP edge; the
    main process keeps the spool writer, the scheduler and the relay (docs/architecture.md,
    *Processes*)."""


class ListenerLimits(Strict):
    """Per-listener intake limits; each refusal carries an RFC 3463 enhanced status code."""

    max_connections: int = Field(500, ge=1)
    """Concurrent connections in total (421 4.7.0 beyond); ``relay_from`` clients have as many
    again of their own."""
    max_connections_per_ip: int = Field(50, ge=1)
    """Concurrent connections from one client IP, an IPv6 client's /64 (421 4.7.0 beyond)."""
    max_line_length: int = Field(1000, ge=80, le=1_000_000)
    """Longest DATA line in octets including CRLF (RFC 5321 4.5.3.1.6: 1000); 500 5.5.2."""
    command_timeout: PositiveDuration = 300.0
    """Idle time allowed between commands and during DATA (RFC 5321 4.5.3.2.7: 5 min)."""
    stress_timeout: PositiveDuration = 10.0
    """Idle time allowed between commands to clients not in ``relay_from`` while they hold 80 %
    of ``max_connections`` (Postfix's smtpd_timeout under stress is 10 s too): idle strangers
    cannot keep every slot for ``command_timeout``."""
    max_bad_commands: int = Field(20, ge=1)
    """Syntax errors, unknown commands and failed AUTH before 421 4.7.0 and disconnect
    (Postfix's smtpd_hard_error_limit is 20 too)."""
    max_junk_commands: int = Field(100, ge=1)
    """NOOP, RSET, VRFY, EXPN and HELP since the last accepted message; each one beyond counts
    as a bad command, so a client cannot hold a connection slot for ever with commands that
    cost nothing (Postfix's smtpd_junk_command_limit is 100 too)."""
    messages_per_minute: int = Field(6000, ge=0)
    """Messages per minute per AUTH user, else per client IP (0 = unlimited); 450 4.7.1.
    Clients in ``relay_from`` are exempt, as is their count of connections per IP."""
    listen_backlog: int = Field(1024, ge=16, le=65535)
    """Connections the kernel queues before the node accepts them (capped by somaxconn): a burst
    beyond it is not even answered with 421."""
    data_deadline: PositiveDuration = 600.0
    """Longest a DATA phase may take however steadily it flows: 421 4.4.2, then close."""
    min_data_rate: int = Field(500, ge=0)
    """Bytes per second a DATA phase must average (Postfix's smtpd_min_data_rate): each packet
    buys len/rate seconds, banked up to ``command_timeout``; 0 = off."""
    max_header_size: PositiveSize = 1024 * 1024
    """Largest header block of a message (Exim's header_maxsize): 552 5.3.4."""
    pregreet_wait: Duration = 1.0
    """Clients not in ``relay_from`` get the first line of a two-line greeting and this pause:
    one that talks before the greeting ends gets 554 5.5.1 (Postfix's postscreen pregreet
    test). 0 = only what arrived before the greeting is checked. Not on ``require_auth``
    listeners, where every client must authenticate anyway."""


class ListenerConfig(Strict):
    address: IPAddress = "127.0.0.1"
    port: int = Field(2525, ge=0, le=65535)
    default_class: str | None = None
    max_message_size: PositiveSize = 25 * 1024 * 1024
    max_recipients: int = Field(1000, ge=1)
    relay_from: list[str] = []
    """Client networks allowed to relay without authentication (default none: AUTH required)."""
    tls: Literal["none", "starttls", "implicit"] = "starttls"
    """``starttls`` offers STARTTLS; ``implicit`` speaks TLS from the first byte (port 465)."""
    tls_cert: str | None = None
    tls_key: str | None = None
    """This listener's own certificate; default: ``[tls]``'s (or the generated one)."""
    require_tls: bool = False
    """MAIL before STARTTLS gets 530 5.7.0."""
    require_auth: bool = False
    """Every client must authenticate; ``relay_from`` no longer lets anyone relay."""
    limits: ListenerLimits = ListenerLimits()

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
    bounce_domain: str | None = None
    """Send with a VERP return path on this domain (one recipient per transaction) and accept
    bounces to it on the listeners (docs/feedback.md)."""
    return_path_domain: DomainName | None = None
    """Envelope sender (Return-Path) domain of this pool's mail; bounces come back there."""
    signing_domain: DomainName | None = None
    """DKIM ``d=`` of this pool's mail; the From domain must align with it (see [dkim])."""


OutboundTLS = Literal["opportunistic", "required", "verified"]


class ClassConfig(Strict):
    pool: str
    priority: int = Field(5, ge=0, le=9)
    tls: OutboundTLS | None = None
    """Outbound TLS of this class: ``required`` never sends in clear text, ``verified`` also
    checks the MX certificate; default ``relay.tls``. Classes that share a pool share its
    connections, so the pool applies the strictest of its classes."""
    sla: PositiveDuration | None = None
    retry: list[PositiveDuration] = [60.0, 300.0, 900.0, 1800.0, 3600.0]
    expiry: PositiveDuration = 5 * 86400.0

    @field_validator("retry")
    @classmethod
    def _retry(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("needs at least one interval")
        return value


def parse_rate(value: object) -> float:
    """Messages per second from a number or ``"N/s"``, ``"N/m"``, ``"N/h"``."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    if isinstance(value, str):
        count, _, unit = value.partition("/")
        per = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}.get(unit.strip() or "s")
        try:
            if per and float(count) > 0:
                return float(count) / per
        except ValueError:
            pass
    raise ValueError(f"not a rate: {value!r} (use e.g. '20/s', '600/m', '3600/h')")


Rate = Annotated[float, BeforeValidator(parse_rate)]


class DestinationRule(Strict):
    """ISP-specific delivery settings (PowerMTA's <domain> blocks, KumoMTA's shaping)."""

    domains: list[str] = []
    """Recipient domains this rule covers (exact, or ``*.example.com``)."""
    mx: list[str] = []
    """MX host patterns, e.g. ``*.google.com``: covers every domain hosted there."""
    max_connections_per_ip: int = Field(20, ge=1)
    max_messages_per_connection: int = Field(1000, ge=1)
    max_rate_per_ip: Rate | None = None
    max_rate_per_pool: Rate | None = None
    """Messages per second from one pool to this destination, over all its IPs and, in a
    cluster, over every node (one token bucket per rule and pool, shared in PostgreSQL)."""
    burst_per_pool: float | None = Field(None, ge=1)
    """Messages the pool's bucket holds when full: what may go at once after a quiet spell.
    Default: one second of ``max_rate_per_pool`` (at least 1)."""
    backoff_on: list[str] = ["421", "4.7.0", "4.7.28", "try again later", "rate limit",
                             "too many", "temporarily deferred", "throttl"]
    """Reply fragments (codes, enhanced codes or text, case-insensitive) that mean "slow down"."""
    backoff_max_connections_per_ip: int = Field(1, ge=1)
    backoff_rate_per_ip: Rate | None = None
    backoff_retry: Duration = 600.0
    """While backing off: pause before the lane is tried again, and the retry interval."""
    backoff_duration: Duration = 1800.0
    """Back to normal limits after this long (or at the first success, see below)."""
    backoff_until_success: bool = True
    tls: OutboundTLS | None = None
    """Outbound TLS to these domains/MXes at least (the stricter of this and the class's)."""
    reason: str = ""

    @model_validator(mode="after")
    def _burst_needs_rate(self) -> DestinationRule:
        if self.burst_per_pool is not None and self.max_rate_per_pool is None:
            raise ValueError("burst_per_pool needs max_rate_per_pool")
        return self

    @property
    def pool_burst(self) -> float:
        """The per-pool bucket's size: ``burst_per_pool``, else one second of the rate."""
        if self.burst_per_pool is not None:
            return self.burst_per_pool
        return max(1.0, self.max_rate_per_pool or 1.0)


class ClassRule(Strict):
    """First matching rule wins; every condition given must hold."""

    cls: str = Field(alias="class")
    sender_domain: str | None = None
    from_domain: str | None = None
    recipient_domain: str | None = None


class ClassificationConfig(Strict):
    mt_priority: dict[str, str] = {}
    """RFC 6710 MT-PRIORITY (-9..9) -> class: the class of the highest key not above the value."""
    rules: list[ClassRule] = []


class DNSConfig(Strict):
    nameserver: IPAddress | None = None
    port: int = Field(53, ge=1, le=65535)
    timeout: PositiveDuration = 5.0
    dnssec: bool = False
    """Trust the resolver's AD bit (it validates DNSSEC and the path to it is safe, e.g. on
    the same host): enables DANE (Postfix's ``smtp_dns_support_level = dnssec``)."""


class RelayConfig(Strict):
    smtp_port: int = Field(25, ge=1, le=65535)
    """Port of remote MXes; tests and demos point it at a loopback sink."""
    tls: Literal["opportunistic", "required", "verified", "disabled"] = "opportunistic"
    """Default outbound TLS of the classes (``disabled``: never STARTTLS, tests only)."""
    ca_file: str | None = None
    """CA bundle (PEM) for ``verified``, MTA-STS and its policy fetch; default the system's."""
    mta_sts: bool = True
    """Look up and apply recipient domains' MTA-STS policies (RFC 8461)."""
    mta_sts_port: int = Field(443, ge=1, le=65535)
    """Port of ``https://mta-sts.DOMAIN``; tests point it at a loopback server."""
    dane: bool = True
    """Apply DANE TLSA records (RFC 7672); needs ``dns.dnssec``."""
    connect_timeout: PositiveDuration = 30.0
    command_timeout: PositiveDuration = 60.0
    data_timeout: PositiveDuration = 600.0
    idle_timeout: Duration = 2.0
    """How long an open connection waits for more mail to its destination before QUIT."""
    max_recipients_per_transaction: int = Field(100, ge=1)
    mx_address_limit: int = Field(5, ge=1)
    """Addresses tried per delivery attempt, over all MX hosts in preference order
    (Postfix's ``smtp_mx_address_limit``)."""
    mx_session_limit: int = Field(2, ge=1)
    """Sessions per delivery attempt that got through the greeting, EHLO and STARTTLS and then
    failed before the transaction, after which the attempt is deferred (Postfix's
    ``smtp_mx_session_limit``)."""


class AccountingConfig(Strict):
    directory: str = "var/accounting"
    formats: list[Literal["csv", "jsonl"]] = ["csv"]
    rotate: PositiveDuration = 86400.0
    rotate_size: PositiveSize = 100 * 1024 * 1024
    fields: list[str] = list(DEFAULT_FIELDS)
    """Columns of the accounting files, in order (PowerMTA names, plus ``header_<Name>``)."""

    @field_validator("fields")
    @classmethod
    def _fields(cls, value: list[str]) -> list[str]:
        resolve_fields(value)  # raises ValueError naming the bad field
        return value


class RetentionConfig(Strict):
    """How long a class's audit records keep personal data (GDPR storage limitation)."""

    pseudonymise: Duration | None = None
    """After this long, recipient addresses become keyed hashes."""
    delete: Duration | None = None
    """After this long, only a tombstone (the record's digest) remains."""


class WebhookConfig(Strict):
    url: Annotated[str, Field(pattern=_URL)]
    name: Name | None = None
    """Key of the delivery cursor (default: the URL); renaming restarts from the beginning."""
    types: list[str] = []
    """Record types to send (empty: all), e.g. ["d", "b"]."""
    classes: list[str] = []
    """Traffic classes to send (empty: all)."""
    batch: int = Field(100, ge=1, le=10000)
    timeout: PositiveDuration = 10.0
    retry_min: PositiveDuration = 1.0
    retry_max: PositiveDuration = 300.0
    headers: dict[str, str] = {}
    """Extra request headers, e.g. Authorization (never logged)."""

    @field_validator("types")
    @classmethod
    def _types(cls, value: list[str]) -> list[str]:
        for item in value:
            if item not in RECORD_TYPES:
                raise ValueError(f"unknown record type {item!r}"
                                 f" (one of {', '.join(sorted(RECORD_TYPES))})")
        return value


class AuditConfig(Strict):
    enabled: bool = True
    path: str | None = None
    """The audit store: a SQLite file or a PostgreSQL DSN. Default: the spool's database when
    ``node.spool`` is a DSN (one chain for the cluster), else audit.sqlite in the spool
    directory."""
    retention: dict[str, RetentionConfig] = {}
    """Per class name, or "*" for every class not listed. No entry: kept forever."""
    pseudonymisation_key: str | None = None
    """File with the secret key (at least 16 bytes, mode 0600) for recipient pseudonyms."""
    purge_interval: PositiveDuration = 3600.0
    webhooks: list[WebhookConfig] = []
    max_backlog: int = Field(200_000, ge=1000)
    """Records waiting in the spool for the audit store (it is away or slow) beyond which intake
    answers 451 4.3.0 until it catches up: nothing more is accepted whose evidence could not
    follow. Deliveries go on meanwhile."""
    seal_key: str | None = None
    """Ed25519 private key (mode 0600, kept apart from the store) that seals each day's head
    (``postlane audit seal-key`` makes one); none: days are not sealed."""
    seal_interval: PositiveDuration = 3600.0
    """How often a node seals the days that have closed (UTC)."""
    tsa_url: str | None = None
    """An RFC 3161 time-stamp authority: each seal also gets a time-stamp token from it."""
    tsa_timeout: PositiveDuration = 10.0


class ClassFeedbackConfig(Strict):
    marketing: bool = False
    """Complaints and unsubscribes stop it, and List-Unsubscribe is added."""
    suppressed: Literal["refuse", "drop"] = "refuse"
    """A suppressed recipient: refused at RCPT (550 5.7.1) or accepted and dropped (an "s"
    accounting record)."""


class BounceSuppressionConfig(Strict):
    """When hard bounces suppress an address (docs/feedback.md). Domain-level failures (no such
    domain, no MX) never do: a resolver that misbehaves must not block a customer's mail."""

    suppress_after: int = Field(3, ge=1)
    """Address-level hard bounces (user unknown, mailbox disabled) within ``window`` before the
    address is suppressed for every class, those with an SLA included; a single one suppresses
    it for classes without an SLA."""
    window: Duration = 7 * 86400.0
    expiry: Duration = 30 * 86400.0
    """How long a bounce suppression lasts (0: until removed); mailboxes come back."""


class FeedbackConfig(Strict):
    bounce_rules: str | None = None
    """An operator's rules file extending data/bounce-rules.toml."""
    suppression_db: str | None = None
    """SQLite file of the suppression list; default <node.spool>/suppression.sqlite3."""
    key_file: str | None = None
    """Secret for VERP and unsubscribe tokens; default <node.spool>/feedback.key (created 0600)."""
    fbl_addresses: list[str] = []
    """Addresses on the listeners that receive ARF complaint reports (not relayed)."""
    classes: dict[Name, ClassFeedbackConfig] = {}
    unsubscribe_url: str | None = None
    """Public HTTPS base URL routed to the node's POST /unsubscribe/{token}."""
    unsubscribe_mailto: str | None = None
    unsubscribe_ttl: Duration = 60 * 86400.0
    complaint_alert_rate: float = Field(0.001, ge=0, le=1)
    complaint_min_delivered: int = Field(100, ge=1)
    """Deliveries to a pool/domain before its complaint rate can raise an alert."""
    bounces: BounceSuppressionConfig = BounceSuppressionConfig()


_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")
DKIM_SIGNED_HEADERS = [
    "from", "sender", "reply-to", "to", "cc", "subject", "date", "message-id", "in-reply-to",
    "references", "mime-version", "content-type", "content-transfer-encoding",
    "content-disposition", "list-id", "list-unsubscribe", "list-unsubscribe-post"]
DKIM_OVERSIGNED_HEADERS = [
    "from", "to", "cc", "reply-to", "subject", "date", "sender", "list-unsubscribe",
    "list-unsubscribe-post"]
"""The fields whose addition in transit changes a message's meaning (OpenDKIM's
OversignHeaders, M3AAWG's advice): a Reply-To or Cc added later must break the signature."""


class DKIMKeyConfig(Strict):
    domain: DomainName
    selector: str = Field(pattern=_SELECTOR,
                          max_length=63)
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = "rsa-sha256"
    key_file: str
    not_before: Instant | None = None
    """Signing with this key starts here (a later key of the same domain takes over)."""
    retire_after: Instant | None = None
    """No signing after this; the DNS record may be removed then."""
    pools: list[str] = []
    classes: list[str] = []
    """Restrict the key to these pools/classes (overrides the domain's unrestricted keys)."""


class DKIMConfig(Strict):
    keys: list[DKIMKeyConfig] = []
    """Signing is on as soon as one key is configured."""
    alignment: Literal["strict", "relaxed"] = "strict"
    on_missing_key: Literal["auto", "refuse", "unsigned"] = "auto"
    """``auto``: refuse mail of classes with an SLA, send best-effort classes unsigned."""
    class_on_missing_key: dict[str, Literal["refuse", "unsigned"]] = {}
    canonicalization: Literal["relaxed/relaxed", "relaxed/simple", "simple/relaxed",
                              "simple/simple"] = "relaxed/relaxed"
    headers: list[str] = DKIM_SIGNED_HEADERS
    oversign: list[str] = DKIM_OVERSIGNED_HEADERS
    """Signed once more than present, so the field added in transit breaks the signature."""
    rotation_period: Duration = 91 * 86400.0
    key_check_interval: Duration = 10.0
    """How often key files are checked for replacement or removal while running."""
    priority_signers: int = Field(1, ge=1, le=16)
    """Signing processes for classes with an SLA (docs/dkim.md)."""
    bulk_signers: int = Field(2, ge=1, le=16)
    """Signing processes for everything else: two, so that a campaign's messages are not
    signed one at a time while the SMTP clients wait for their 250."""

    @field_validator("headers", "oversign")
    @classmethod
    def _lower(cls, value: list[str]) -> list[str]:
        """Field names (RFC 5322 section 3.6.8: printable ASCII but the colon): anything else
        makes an h= tag that no verifier can read."""
        names = [h.strip().lower() for h in value]
        for name in names:
            if not _FIELD_NAME.fullmatch(name):
                raise ValueError(f"not a header field name: {name!r}")
        return names

    @field_validator("headers")
    @classmethod
    def _from_signed(cls, value: list[str]) -> list[str]:
        if "from" not in value:
            raise ValueError("must name from: RFC 6376 section 5.4 requires From to be signed,"
                             " and verifiers ignore a signature without it")
        return value


class SecurityConfig(Strict):
    users_file: str | None = None
    """TOML file of SMTP AUTH users (``postlane users add``); no file, no AUTH."""
    auth_failures_per_minute: int = Field(10, ge=1)
    """Failed AUTH attempts per client IP; beyond, AUTH answers 454 4.7.0 without checking."""
    auth_concurrency: int = Field(2, ge=1, le=64)
    """Password checks (scrypt, ~50 ms of CPU each) running at once, node-wide, in threads off
    the event loop; more waiting than 16 times this get 454 4.7.0 at once."""
    min_free_space: Size = 256 * 1024 * 1024
    """Below this much free space on the file system of the spool, the accounting folder or
    the audit store, intake answers 452 4.3.1 (room kept for the records of accepted mail)."""


class TLSConfig(Strict):
    """The node's certificate for its listeners (a listener's tls_cert/tls_key override it)."""

    cert_file: str | None = None
    key_file: str | None = None
    """PEM files; none: a self-signed certificate for ``node.hostname`` is made at first start
    (``<spool>/tls/``, key mode 0600) and ``postlane status`` says so."""
    reload_interval: PositiveDuration = 10.0
    """How often the files are checked; a changed pair is loaded without a restart."""


class TLSRPTConfig(Strict):
    """Daily SMTP TLS reports (RFC 8460) to the domains that publish a ``_smtp._tls`` record."""

    enabled: bool = True
    organization: str | None = None
    """``organization-name`` of the reports; default ``node.hostname``."""
    contact: str | None = None
    """``contact-info``; default ``postmaster@`` the hostname."""
    mail_from: str | None = None
    """Sender of mailed reports; default ``noreply-tlsrpt@`` the hostname."""
    report_class: str | None = Field(None, alias="class")
    """Class (and so pool) mailed reports go out in; default the node's ``default_class``."""
    send_delay: Duration = 3600.0
    """Reports for a UTC day go out at a random moment within this long after it ends."""


class APIConfig(Strict):
    """The management/injection HTTP API, /metrics and the dashboard (docs/monitoring.md)."""

    enabled: bool = True
    address: IPAddress = "127.0.0.1"
    port: int = Field(8025, ge=0, le=65535)
    token_file: str = "var/api-token"
    """Bearer token, one line; created with mode 0600 if missing. Its name is "admin"."""
    tokens_file: str | None = None
    """Named tokens (``postlane api token add``): name, SHA-256, read-only (docs/api.md).
    Default: ``api-tokens.json`` beside ``token_file``."""
    read_timeout: PositiveDuration = 30.0
    """How long a client may take to send a request's head (from connecting, or from the end
    of its previous answer: then the connection is closed) and, counted again from the head,
    its body (408, then closed): a client that stops half way held its connection, and a
    handler, for ever. Also how long a client may stop reading an answer before it is
    dropped (a streamed export waits for it)."""
    max_connections: int = Field(100, ge=1)
    """Connections open at once; a new one beyond is closed at once (each is a file descriptor
    the SMTP listeners need too)."""

    def named_tokens_file(self) -> str:
        return self.tokens_file or str(Path(self.token_file).with_name("api-tokens.json"))


class SLARule(Strict):
    """Alert rules of one traffic class; defaults derive from the class SLA."""

    p95: Duration | None = None
    """Threshold rule: alert when p95 delivery latency over ``window`` exceeds this
    (default: a third of the SLA, the case study's 10 minutes for a 30-minute SLA)."""
    window: Duration = 300.0
    lead_time: Duration | None = None
    """Predictive rule: alert when the first breach is estimated closer than this
    (default: half the SLA)."""


class MonitorConfig(Strict):
    evaluate_every: PositiveDuration = 1.0
    sample_every: PositiveDuration = 5.0
    """Dashboard history resolution (one hour is kept)."""
    rate_window: PositiveDuration = 60.0
    """Drain rate = final outcomes of a pool over this window."""
    resolve_after: Duration = 30.0
    """An alert resolves once its condition has been clear this long (no flapping)."""
    sla: dict[str, SLARule] = {}
    """Per class name; classes with an SLA and no entry get the default rules."""
    webhook_url: str | None = None
    webhook_retries: int = Field(5, ge=0, le=20)
    webhook_backoff: Duration = 2.0
    webhook_timeout: PositiveDuration = 5.0
    ops_address: str | None = None
    """Alerts are also e-mailed here, through the highest-priority class."""
    ops_from: str = "postlane-monitor@localhost"
    metrics_top_domains: int = Field(20, ge=1, le=1000)
    """/metrics shows queue depth and oldest age for this many domains (the deepest); the rest
    are summed as domain="other", so a campaign to many domains cannot blow up the series."""


class ClusterConfig(Strict):
    """Cluster mode (``node.spool`` is a PostgreSQL DSN): how nodes share the queue."""

    schema_name: str = Field("postlane", pattern=_SCHEMA)
    """PostgreSQL schema holding the shared spool and audit store; every node of one cluster
    names the same.
    Lower case, digits and ``_``, at most 40 characters (it also names the NOTIFY channels)."""
    lease: Duration = 10.0
    """How long claimed work stays a node's without renewal (renewed every third of it): the
    takeover time of a node that stalls with its database session still open."""
    dead_after: Duration = 4.0
    """A node whose database session has closed (process killed, machine gone, cut off) is dead
    once its heartbeat is this old, and its work is taken over at once. Nodes heartbeat every
    quarter of it and stop delivering after three quarters without one."""
    claim_ahead: int = Field(2, ge=1, le=1000)
    """Ready recipients a node keeps claimed per outbound connection slot of a pool."""
    poll: PositiveDuration = 1.0
    """How often a node looks for due retries and dead nodes without being notified."""

    @field_validator("lease", "dead_after")
    @classmethod
    def _at_least_a_second(cls, value: float) -> float:
        if value < 1.0:
            raise ValueError("must be at least 1s")
        return value

    @model_validator(mode="after")
    def _lease_outlasts_the_fence(self) -> ClusterConfig:
        # a node stops delivering 0.75 x dead_after after its last heartbeat; its leases must
        # still be current then (renewed every lease / 3): lease >= 2 x dead_after holds that
        if self.lease < 2 * self.dead_after:
            raise ValueError(f"cluster.lease ({self.lease:g}s) must be at least twice"
                             f" cluster.dead_after ({self.dead_after:g}s)")
        return self

    @property
    def heartbeat(self) -> float:
        """Seconds between a node's heartbeats."""
        return self.dead_after / 4

    @property
    def fence(self) -> float:
        """Seconds without a heartbeat after which a node stops starting deliveries: one
        heartbeat before the others may call it dead."""
        return self.dead_after - self.heartbeat


class DMARCConfig(Strict):
    """DMARC aggregate reports (docs/reputation.md)."""

    addresses: list[str] = []
    """The ``rua`` addresses published in the domains' DMARC records: accepted on every
    listener from anyone (like the FBL addresses), stored, never relayed."""
    domains: list[DomainName] = []
    """Policy domains whose reports are kept besides those the config already names (the DKIM
    keys', the pools', the classification rules', the node's and the rua addresses' domains),
    each with its organisation: a report about any other domain is answered 250 and dropped."""
    max_report_size: PositiveSize = 32 * 1024 * 1024
    """Bytes of XML a report may decompress to; beyond, it is refused as a bomb."""
    window: Duration = 7 * 86400.0
    """Reports that ended within this span feed the gauges, the dashboard and the alerts."""
    dkim_alignment_alert: float = Field(0.95, ge=0, le=1)
    """A pool whose DKIM alignment (share of its messages that pass aligned DKIM) falls below
    this raises an alert."""
    unknown_alert: int = Field(100, ge=1)
    """Messages from unknown senders (neither SPF nor DKIM aligned) for one domain within the
    window that raise an alert."""
    min_messages: int = Field(100, ge=1)
    """Messages a pool needs in the window before its alignment can raise an alert."""


class PostmasterConfig(Strict):
    """Google Postmaster Tools API importer (off while ``key_file`` is unset)."""

    key_file: str | None = None
    """The service account's JSON key (mode 0600); the account must be a user of the domains
    in Postmaster Tools."""
    subject: str | None = None
    """With domain-wide delegation: the user to act as."""
    base_url: str = "https://gmailpostmastertools.googleapis.com"
    domains: list[DomainName] = []
    """Domains to import; empty: every domain the account can read."""
    interval: PositiveDuration = 6 * 3600.0
    history: Duration = 30 * 86400.0
    """How far back each import reads (Google revises recent days)."""
    timeout: PositiveDuration = 30.0


class SNDSConfig(Strict):
    """Microsoft SNDS automated-access importer (off while ``url`` is unset)."""

    url: str | None = None
    """The data URL with its access key, as the SNDS "Automated Access" page shows it; the key
    is a secret and never logged."""
    interval: PositiveDuration = 6 * 3600.0
    timeout: PositiveDuration = 30.0


class ReputationConfig(Strict):
    """DMARC reports, Postmaster Tools, SNDS and the rules review (docs/reputation.md)."""

    store: str | None = None
    """A SQLite file or a PostgreSQL DSN. Default: the spool's database in cluster mode, else
    reputation.sqlite3 in the node's folder."""
    dmarc: DMARCConfig = DMARCConfig()
    postmaster: PostmasterConfig = PostmasterConfig()
    snds: SNDSConfig = SNDSConfig()
    spam_ratio_warning: float = Field(0.001, ge=0, le=1)
    """Gmail user-reported spam ratio that raises a warning (0.1 %)."""
    spam_ratio_critical: float = Field(0.003, ge=0, le=1)
    """... and a critical alert (0.3 %, Google's published limit for bulk senders)."""
    review_after: Duration = 30 * 86400.0
    """A destination rule not reviewed for this long is stale (``postlane rules review``)."""


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
    dkim: DKIMConfig = DKIMConfig()
    security: SecurityConfig = SecurityConfig()
    tls: TLSConfig = TLSConfig()
    tlsrpt: TLSRPTConfig = TLSRPTConfig()
    audit: AuditConfig = AuditConfig()
    correlation_header: str = "X-Correlation-ID"
    classification: ClassificationConfig = ClassificationConfig()
    destinations: dict[Name, DestinationRule] = {}
    """ISP rules by name; the shipped defaults (data/destinations.toml) apply unless
    ``default_destinations = false``, and a rule here with the same name replaces the default."""
    default_destinations: bool = True

    api: APIConfig = APIConfig()
    monitor: MonitorConfig = MonitorConfig()
    cluster: ClusterConfig = ClusterConfig()
    scheduler: Literal["lanes", "fifo"] = "lanes"
    """``fifo`` serves every message in arrival order through one queue: the baseline to beat."""
    feedback: FeedbackConfig = FeedbackConfig()
    reputation: ReputationConfig = ReputationConfig()
