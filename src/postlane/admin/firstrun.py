"""``postlane init``: a node's first files, ready to serve and to publish in DNS.

One command writes what an operator would otherwise assemble from five pages of docs: a
commented config with the case study's four classes on four pools, DKIM keys for the sending
domain and for the marketing subdomain, a self-signed TLS certificate for STARTTLS, and the API
token. Secrets are 0600 in 0700 folders; nothing that exists is overwritten.

Names it chooses (all derived from ``--domain``, all printed in the DNS checklist):
``news.DOMAIN`` is marketing's own identity (signing domain, so a complaint about a newsletter
never touches the policy notices' domain reputation); ``bounces.DOMAIN`` and
``bounces.news.DOMAIN`` receive the VERP bounces; ``feedback.DOMAIN`` receives DMARC aggregate
reports and ARF complaints. Those three kinds of domain get their MX pointed at this node.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..policy.dkim import generate_key, write_key
from ..secretfile import create_secret, private_dir

__all__ = ["InitOptions", "InitError", "write_node"]

DEFAULT_IPS = [f"127.0.0.{n}" for n in range(10, 18)]
"""Placeholders that run on any machine; the checklist says to replace them."""
POOLS = ("trans-critical-pool", "trans-high-pool", "trans-standard-pool", "admin-pool")


class InitError(ValueError):
    """Bad options, or a folder that already holds a node."""


@dataclass
class InitOptions:
    directory: Path
    hostname: str
    domain: str
    ips: list[str] = field(default_factory=lambda: list(DEFAULT_IPS))
    listen: str = "0.0.0.0:587"
    """The submission listener (applications; STARTTLS, relay for ``relay_from``)."""
    inbound: str = "0.0.0.0:25"
    """The listener the MX records point at (bounces, DMARC reports, complaints)."""
    api: str = "127.0.0.1:8025"
    smarthost: str | None = None
    """Send everything to this host:port instead of the recipients' MX."""
    state_dir: str = "var"
    """Spool and accounting files; relative paths are taken from the config's folder."""
    node_name: str = "postlane-1"


def _host_port(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        if not sep or not 0 <= int(port) <= 65535:
            raise ValueError
    except ValueError:
        raise InitError(f"{what}: {value!r} is not ADDRESS:PORT") from None
    return host, int(port)


def _quarter(now: float) -> str:
    t = time.gmtime(now)
    return f"{t.tm_year}q{(t.tm_mon - 1) // 3 + 1}"


def _pools(opts: InitOptions) -> dict[str, list[tuple[str, str]]]:
    """(address, EHLO name) per pool: the IPs dealt out in turn, so every pool has its own."""
    if len(opts.ips) < len(POOLS):
        raise InitError(f"--ip: give at least {len(POOLS)} addresses (one per pool; an IP"
                        f" serves one pool)")
    if len(set(opts.ips)) != len(opts.ips):
        raise InitError("--ip: an address is given twice (an IP serves one pool)")
    out: dict[str, list[tuple[str, str]]] = {p: [] for p in POOLS}
    counts = {"tx": 0, "news": 0}
    for i, ip in enumerate(opts.ips):
        try:
            address = str(ipaddress.ip_address(ip))
        except ValueError:
            raise InitError(f"--ip: not an IP address: {ip!r}") from None
        pool = POOLS[i % len(POOLS)]
        kind = "news" if pool == "admin-pool" else "tx"
        counts[kind] += 1
        domain = f"news.{opts.domain}" if kind == "news" else opts.domain
        out[pool].append((address, f"{kind}{counts[kind]}.{domain}"))
    return out


def _ip_lines(ips: list[tuple[str, str]], max_out: int) -> str:
    return "\n".join(f'  {{ address = "{a}", ehlo = "{e}", max_smtp_out = {max_out} }},'
                     for a, e in ips)


def config_text(opts: InitOptions, selector: str) -> str:
    """The commented config ``init`` writes (paths relative to its folder)."""
    d, host = opts.domain, opts.hostname
    sub_host, sub_port = _host_port(opts.listen, "--listen")
    in_host, in_port = _host_port(opts.inbound, "--inbound")
    api_host, api_port = _host_port(opts.api, "--api")
    pools = _pools(opts)
    state = opts.state_dir.rstrip("/")
    routes = (f'[routes]\n"*" = "{opts.smarthost}"   # every domain to this host (--smarthost)\n'
              if opts.smarthost else
              '# [routes]\n# "*" = "smarthost.internal:25"   # uncomment to send everything'
              ' through one host\n')
    return f"""\
# Postlane node {host}, written by `postlane init` on {time.strftime('%Y-%m-%d')}.
# Reference: docs/configuration.md. Check it with `postlane config check postlane.toml`;
# print the DNS records with `postlane dns checklist -c postlane.toml`, verify them with
# `postlane dns check -c postlane.toml`. Relative paths are taken from this file's folder.

[node]
# name: unique in a cluster. hostname: greeting, Received, Message-IDs, bounces, and the MX
# target of the bounce and feedback domains. spool: SQLite spool, audit store, suppression
# list, feedback key (a postgresql:// DSN here makes a cluster: docs/cluster.md).
name = "{opts.node_name}"
hostname = "{host}"
postmaster = "postmaster@{d}"  # mail to <postmaster>, and the From of the node's DSNs (signed)
spool = "{state}/spool"
drain_timeout = "30s"         # SIGTERM: deliveries in flight get this long to finish

# Applications submit here. They may relay from relay_from without AUTH. To make every client
# log in: `postlane users add NAME -f users.toml` in this folder, uncomment [security] below
# and require_auth here (docs/security.md).
[listeners.submission]
address = "{sub_host}"
port = {sub_port}
relay_from = ["127.0.0.0/8", "::1/128"]
tls = "starttls"
# require_auth = true
# Mail that names no class (header, AUTH user, rule, MT-PRIORITY) is refused here: 550 5.7.1
# no traffic class. To send a plain client's mail in one class instead, uncomment this
# (docs/configuration.md, "Mail without a class"):
# default_class = "payment-receipts"

# The MX of the bounce and feedback domains points here: bounces, DMARC reports and complaints
# are accepted from anyone; everything else is refused (no open relay).
[listeners.inbound]
address = "{in_host}"
port = {in_port}
relay_from = []
tls = "starttls"

# SMTP AUTH users (`postlane users add`; scrypt hashes, re-read when the file changes)
# [security]
# users_file = "users.toml"

# The listeners' certificate: self-signed by init; replace both files with your CA's (a
# renewed pair under the same paths is served without a restart).
[tls]
cert_file = "tls/cert.pem"
key_file = "tls/key.pem"

[api]                         # dashboard, /metrics, HTTP API: loopback only, bearer token
address = "{api_host}"
port = {api_port}
token_file = "api-token"

# The case study: four traffic classes, each on its own pool of source IPs and connection
# slots. Replace the addresses with the machine's dedicated public IPs (each needs a PTR
# record naming its EHLO name: `postlane dns checklist`).
[pools.trans-critical-pool]   # regulatory policy documents: never paused
pausable = false
bounce_domain = "bounces.{d}"
ips = [
{_ip_lines(pools["trans-critical-pool"], 10)}
]

[pools.trans-high-pool]       # claims confirmations
bounce_domain = "bounces.{d}"
ips = [
{_ip_lines(pools["trans-high-pool"], 8)}
]

[pools.trans-standard-pool]   # payment receipts
bounce_domain = "bounces.{d}"
ips = [
{_ip_lines(pools["trans-standard-pool"], 8)}
]

[pools.admin-pool]            # administrative and marketing mail, under its own domain
signing_domain = "news.{d}"
bounce_domain = "bounces.news.{d}"
ips = [
{_ip_lines(pools["admin-pool"], 6)}
]

[classes.policy-documents]
pool = "trans-critical-pool"
priority = 0
sla = "2m"
retry = ["30s", "1m", "2m", "5m", "10m", "30m"]
expiry = "2d"

[classes.claims]
pool = "trans-high-pool"
priority = 1
sla = "30m"
retry = ["1m", "2m", "5m", "15m", "30m"]
expiry = "3d"

[classes.payment-receipts]
pool = "trans-standard-pool"
priority = 1
sla = "30m"
retry = ["1m", "2m", "5m", "15m", "30m"]
expiry = "3d"

[classes.marketing]
pool = "admin-pool"
priority = 3
retry = ["15m", "30m", "1h", "2h", "4h"]
expiry = "2d"

# Mail says its class in the X-Postlane-Class header (removed before delivery); mail from the
# newsletter domain is marketing. Mail with no class is refused (550), never guessed.
[[classification.rules]]
class = "marketing"
from_domain = "news.{d}"

[dkim]                        # every message is signed at intake; keys rotate quarterly
alignment = "strict"          # (`postlane dkim status|rotate`, docs/dkim.md)
[[dkim.keys]]
domain = "{d}"
selector = "{selector}"
key_file = "keys/{d}.{selector}.pem"
[[dkim.keys]]
domain = "news.{d}"
selector = "{selector}"
key_file = "keys/news.{d}.{selector}.pem"

[feedback]                    # bounces and complaints become suppressions (docs/feedback.md)
fbl_addresses = ["fbl@feedback.{d}"]     # register this address with the providers' FBLs
unsubscribe_url = "https://{host}/unsubscribe"   # route to the API's POST /unsubscribe/{{token}}
[feedback.classes.marketing]
marketing = true              # complaints and unsubscribes stop marketing only

[reputation.dmarc]            # the rua address of the DMARC records below
addresses = ["dmarc@feedback.{d}"]

# PowerMTA-style records of every event (docs/audit.md); add "jsonl" for log shippers
[accounting]
directory = "{state}/accounting"
formats = ["csv"]
rotate = "1d"

# [audit]                     # the hash-chained audit store is on by default (docs/audit.md)
# pseudonymisation_key = "keys/audit-pseudonym.key"
# [audit.retention."*"]
# pseudonymise = "400d"
# delete = "3650d"

[monitor.sla.policy-documents]
lead_time = "60s"             # warn a minute before the first notice would miss its 2 minutes
[monitor.sla.claims]
p95 = "10m"
lead_time = "20m"
[monitor.sla.payment-receipts]
p95 = "10m"
lead_time = "20m"
# [monitor]
# webhook_url = "https://alerts.internal/postlane"
# ops_address = "mail-team@{d}"

[relay]
smtp_port = 25
tls = "opportunistic"

{routes}"""


_OPTIONS = (("node.hostname", "--hostname"), ("node.name", "--node-name"),
            ("routes.", "--smarthost"))


def _check(text: str) -> None:
    """The config the options make is valid, else InitError naming the option (no domain,
    host name or smarthost is half-written into a folder that init then refuses to reuse)."""
    from ..startup import ConfigError, parse_config

    try:
        parse_config(text)
    except ConfigError as exc:
        first: dict[str, str] = {}  # one error per option (--domain is in many fields)
        for e in exc.errors:
            opt = next((o for field, o in _OPTIONS if e.startswith(field)),
                       "--domain" if "domain" in e.partition(":")[0] else "")
            first.setdefault(opt or e, f"{opt}: {e}" if opt else e)
        raise InitError("; ".join(first.values())) from None


def write_node(opts: InitOptions, now: float | None = None) -> list[Path]:
    """Write the node's files into ``opts.directory`` (absent or empty); returns them."""
    from ..api.tokens import load_token

    now = time.time() if now is None else now
    folder = opts.directory
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise InitError(f"{folder} exists and is not empty: init never overwrites a node's"
                        f" files (keys above all)")
    selector = _quarter(now)
    text = config_text(opts, selector)  # every option checked before anything is written
    _check(text)
    private_dir(folder)
    written = [folder / "postlane.toml"]
    written[0].write_text(text, encoding="utf-8")
    # the node's user and group only, whatever the umask (as restore writes it): a config may
    # come to hold a PostgreSQL DSN with its password
    written[0].chmod(0o640)
    for domain in (opts.domain, f"news.{opts.domain}"):
        path = folder / "keys" / f"{domain}.{selector}.pem"
        write_key(path, generate_key("rsa-sha256", 2048))
        written.append(path)
    written += write_certificate(folder / "tls", opts.hostname)
    token = folder / "api-token"
    load_token(token)
    written.append(token)
    private_dir(folder / opts.state_dir)
    return written


def write_certificate(folder: Path, hostname: str) -> list[Path]:
    """A self-signed certificate for ``hostname`` (ten years; key 0600): STARTTLS works from
    the first start, and a CA's certificate replaces it in place."""
    from ..edge.tls import selfsigned

    cert, key = selfsigned(hostname, days=3650)
    private_dir(folder)
    if not create_secret(folder / "key.pem", key):
        raise InitError(f"{folder / 'key.pem'} exists already")
    (folder / "cert.pem").write_bytes(cert)
    return [folder / "cert.pem", folder / "key.pem"]
