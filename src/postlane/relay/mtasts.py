"""MTA-STS (RFC 8461): a recipient domain's published TLS policy for its MXes.

The ``_mta-sts.DOMAIN`` TXT record says a policy exists and names its ``id``; the policy itself
is fetched from ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt`` (httpx, certificate checked,
no redirects) and cached until ``max_age`` runs out (``MIN_AGE`` at least), refreshed in the
background before that. A changed ``id`` fetches it again; when the fetch fails, a cached policy
that has not expired stays in force (RFC 8461 5.1), which is what protects against an attacker
who blocks the fetch. The cache is a JSON file in the node's folder, so a restart does not
forget a policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import ssl
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from ..secretfile import private_dir, private_open
from .mx import DNSPermError, DNSTempError, MXResolver, txt_strings

log = logging.getLogger("postlane.relay.mtasts")

__all__ = ["MTASTS", "STSPolicy", "parse_policy", "record_id"]

MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 3.3
MAX_AGE = 31_557_600  # one year (RFC 8461 3.2)
MIN_AGE = 300
"""A policy is kept in force this long at least, whatever its ``max_age``: one of 0 expired as
it was fetched, and every delivery to the domain fetched it again (RFC 8461 3.3 lets a sender
rate-limit its fetches). A changed ``id`` still fetches the new policy at once."""
REFRESH_AFTER = 86_400.0  # a cached policy is fetched again (in the background) after a day
RETRY_FETCH = 300.0  # after a failed fetch, the next try for that domain waits this long
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_VERSION = re.compile(r"v=STSv1[ \t]*;")  # RFC 8461 3.1: "v=STSv1;" (WSP before ";": ABNF)
_WSP = " \t"  # RFC 5234 WSP: what may surround a field's value, nothing else
_MAX_AGE = re.compile(r"[0-9]{1,10}")  # ASCII DIGIT: str.isdigit() also takes "²" and "١"


class PolicyError(Exception):
    """A policy that cannot be used; ``result`` is its RFC 8460 result type."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(message)
        self.result = result


@dataclass(slots=True)
class STSPolicy:
    id: str
    mode: str  # enforce | testing | none
    mx: list[str]
    max_age: int
    fetched: float  # epoch seconds
    text: str

    def expired(self, now: float) -> bool:
        return now >= self.fetched + self.max_age

    def refresh_due(self, now: float) -> bool:
        """Past half its ``max_age`` (at most a day): fetched again while still in force, so
        an attacker must block every fetch from then on, not just the one at expiry (RFC 8461
        10.2)."""
        return now >= self.fetched + min(self.max_age / 2, REFRESH_AFTER)

    def matches(self, host: str) -> bool:
        """RFC 8461 4.1: an ``mx`` is a host name, or ``*.`` and a domain standing for exactly
        one more label on the left."""
        host = host.rstrip(".").lower()
        for pattern in self.mx:
            pattern = pattern.rstrip(".").lower()
            if pattern.startswith("*."):
                label, dot, rest = host.partition(".")
                if label and dot and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False

    @property
    def lines(self) -> list[str]:
        """The policy as RFC 8460's ``policy-string``."""
        return [line.strip(_WSP) for line in _lines(self.text) if line.strip(_WSP)]


def parse_policy(text: str, policy_id: str, now: float) -> STSPolicy:
    """RFC 8461 3.2 (raises PolicyError "sts-policy-invalid"). A leading UTF-8 byte order
    mark, which Windows editors write, is skipped (its first field was read as
    "\\ufeffversion"); one anywhere else is not. Field names are case-sensitive, as the ABNF
    writes them (``sts-policy-mode-field = %s"mode"``, RFC 7405 ``%s``): ``Mode`` is an
    extension field and is ignored, as other senders ignore it; it was taken as ``mode``."""
    text = text.removeprefix("\ufeff")
    fields: dict[str, list[str]] = {}
    for line in _lines(text):
        key, colon, value = line.partition(":")
        if colon:
            fields.setdefault(key.strip(_WSP), []).append(value.strip(_WSP))
    version, mode = fields.get("version", [""])[0], fields.get("mode", [""])[0]
    if version != "STSv1":
        raise PolicyError("sts-policy-invalid", f"version is {version!r}, not STSv1")
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError("sts-policy-invalid", f"mode {mode!r}")
    age = fields.get("max_age", [""])[0]
    if not _MAX_AGE.fullmatch(age):
        raise PolicyError("sts-policy-invalid", f"max_age {age!r}")
    mx = fields.get("mx", [])
    if mode != "none" and not mx:
        raise PolicyError("sts-policy-invalid", "no mx")
    return STSPolicy(policy_id, mode, mx, min(max(int(age), MIN_AGE), MAX_AGE), now, text)


def _lines(text: str) -> list[str]:
    """The lines of a policy: each ends at LF or CRLF (RFC 8461 3.2's ``sts-policy-term``);
    ``str.splitlines`` also ended them at CR alone, VT, FF, NEL, U+2028 and more."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def record_id(texts: list[str]) -> str | None:
    """The policy ``id`` that a domain's ``_mta-sts`` TXT records announce, None when they
    announce none (RFC 8461 3.1): also what ``postlane dns check`` holds the node's own to."""
    ours = [t for t in texts if _VERSION.match(t)]  # not "v=STSv10", a later version
    if len(ours) != 1:  # none, or ambiguous: no policy (RFC 8461 3.1)
        return None
    fields = dict(part.strip().partition("=")[::2] for part in ours[0].split(";"))
    policy_id = fields.get("id", "").strip()
    return policy_id if _ID.match(policy_id) else None


class MTASTS:
    """Policies of recipient domains: looked up, fetched, cached (in memory and on disk)."""

    def __init__(self, resolver: MXResolver, cache_file: Path, *, ca_file: str | None = None,
                 port: int = 443, timeout: float = 10.0,
                 on_error: Callable[[str, str, str], None] | None = None) -> None:
        self.resolver = resolver
        self.cache_file = cache_file
        self.port = port
        self.timeout = timeout
        self._ssl = ssl.create_default_context(cafile=ca_file)
        self._policies: dict[str, STSPolicy] = self._load()
        self._saving = asyncio.Lock()
        self._failed: dict[str, float] = {}  # domain -> when a fetch may be tried again
        self._fetching: dict[str, asyncio.Future[STSPolicy | None]] = {}
        self.on_error: Callable[[str, str, str], None] = (
            on_error if on_error is not None else lambda domain, result, message: None)
        """Called with (domain, RFC 8460 result type, message) for a policy not fetched."""

    def _load(self) -> dict[str, STSPolicy]:
        try:
            data = json.loads(self.cache_file.read_text("utf-8"))
            now = time.time()
            policies = {domain: STSPolicy(**entry) for domain, entry in data.items()}
            return {d: p for d, p in policies.items() if not p.expired(now)}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError) as exc:
            log.error("MTA-STS cache %s not read, starting empty: %s", self.cache_file, exc)
            return {}

    def _save(self, policies: dict[str, STSPolicy]) -> None:
        """Write ``policies`` (a copy: the loop goes on changing the cache) as the cache file
        (blocking, and as large as the cache: call it in a thread, through ``_persist``)."""
        private_dir(self.cache_file.parent)
        tmp = self.cache_file.with_name(self.cache_file.name + ".tmp")
        with private_open(tmp, encoding="utf-8") as fh:
            fh.write(json.dumps({d: asdict(p) for d, p in policies.items()}))
        os.replace(tmp, self.cache_file)

    async def _persist(self) -> None:
        """The cache file rewritten in a thread, one write at a time, each from the cache as it
        is when its turn comes (so the last write holds every policy fetched before it)."""
        async with self._saving:
            now = time.time()  # an expired policy is never used again (RFC 8461 5.1): dropped
            for domain in [d for d, p in self._policies.items() if p.expired(now)]:
                del self._policies[domain]
            try:
                await asyncio.to_thread(self._save, dict(self._policies))
            except OSError as exc:  # a full disk: the policies hold in memory, the next write
                # tries again; only a restart before it starts without them (it fetches again)
                log.error("MTA-STS cache %s not written: %s", self.cache_file, exc)

    async def policy(self, domain: str) -> STSPolicy | None:
        """The policy in force for ``domain`` (None: none, or mode "none")."""
        now = time.time()
        cached = self._policies.get(domain)
        if cached is not None and cached.expired(now):
            cached = None
        try:
            record_id = await self._record_id(domain)
        except DNSTempError:
            record_id = None  # as if there were no record: a cached policy still applies
        may_fetch = record_id is not None and self._failed.get(domain, 0.0) <= now
        if may_fetch and (cached is None or cached.id != record_id):
            assert record_id is not None
            fetched = await self._fetch_once(domain, record_id)
            cached = fetched or cached
        elif may_fetch and cached is not None and cached.refresh_due(now):
            assert record_id is not None
            self._start_fetch(domain, record_id)  # in the background: the cached one holds
        return cached if cached is not None and cached.mode != "none" else None

    async def _record_id(self, domain: str) -> str | None:
        records, _ = await self.resolver.records(f"_mta-sts.{domain}", "TXT")
        return record_id([text.decode("ascii", "replace") for text in txt_strings(records)])

    async def _fetch_once(self, domain: str, record_id: str) -> STSPolicy | None:
        """One fetch per domain at a time; the others wait for its result."""
        return await asyncio.shield(self._start_fetch(domain, record_id))

    def _start_fetch(self, domain: str, record_id: str) -> asyncio.Future[STSPolicy | None]:
        """The fetch of ``domain``'s policy under way, started now if none is."""
        future = self._fetching.get(domain)
        if future is None:
            future = asyncio.ensure_future(self._fetch(domain, record_id))
            self._fetching[domain] = future
            future.add_done_callback(lambda f: self._fetched(domain, f))
        return future

    def _fetched(self, domain: str, future: asyncio.Future[STSPolicy | None]) -> None:
        self._fetching.pop(domain, None)
        if not future.cancelled() and future.exception() is not None:  # a bug: told once
            log.error("MTA-STS fetch of %s failed", domain, exc_info=future.exception())

    async def _fetch(self, domain: str, record_id: str) -> STSPolicy | None:
        try:
            text = await self._get(domain)
            policy = parse_policy(text, record_id, time.time())
        except PolicyError as exc:
            log.warning("MTA-STS policy of %s not usable: %s", domain, exc)
            self.on_error(domain, exc.result, str(exc))
            self._failed[domain] = time.time() + RETRY_FETCH
            return None
        self._failed.pop(domain, None)
        self._policies[domain] = policy
        await self._persist()
        log.info("MTA-STS policy of %s: %s", domain, policy.mode,
                 extra={"id": policy.id, "max_age": policy.max_age})
        return policy

    async def _get(self, domain: str) -> str:
        """The policy file over HTTPS, with the address of ``mta-sts.DOMAIN`` from the node's
        resolver and its certificate checked for that name, all within ``timeout`` seconds
        (RFC 8461 3.3): httpx's timeout is per read, and a server sending a byte now and then
        held the fetch, and every delivery waiting for it, for hours."""
        try:
            async with asyncio.timeout(self.timeout):
                return await self._get_file(domain)
        except TimeoutError:
            raise PolicyError("sts-policy-fetch-error",
                              f"mta-sts.{domain}: not fetched within {self.timeout:g} s") from None

    async def _get_file(self, domain: str) -> str:
        host = f"mta-sts.{domain}"
        try:
            dests = await self.resolver.resolve_host(host, self.port)
        except (DNSPermError, DNSTempError) as exc:
            raise PolicyError("sts-policy-fetch-error", f"{host}: {exc}") from None
        unreachable = PolicyError("sts-policy-fetch-error", f"{host}: no address")
        for dest in dests:  # the next address when one cannot be connected to
            try:
                body = await self._get_from(host, dest.ip)
            except _Unreachable as exc:
                unreachable = PolicyError("sts-policy-fetch-error", f"{host}: {exc}")
                continue
            break
        else:
            raise unreachable
        with contextlib.suppress(UnicodeDecodeError):
            return body.decode("utf-8")
        raise PolicyError("sts-policy-invalid", f"{host}: not UTF-8")

    async def _get_from(self, host: str, ip: str) -> bytes:
        """The policy file's bytes from one address of ``host`` (raises _Unreachable when no
        connection could be made, PolicyError for anything else)."""
        url = f"https://{'[' + ip + ']' if ':' in ip else ip}:{self.port}/.well-known/mta-sts.txt"
        try:
            async with httpx.AsyncClient(verify=self._ssl, timeout=self.timeout,
                                         follow_redirects=False) as client, \
                    client.stream("GET", url, headers={"Host": host, "Accept-Encoding": "identity"},
                                  extensions={"sni_hostname": host}) as resp:
                if resp.status_code != 200:
                    raise PolicyError("sts-policy-fetch-error", f"{host}: HTTP {resp.status_code}")
                ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
                if ctype != "text/plain":
                    raise PolicyError("sts-policy-invalid", f"{host}: content type {ctype!r}")
                inflate = _inflater(resp.headers.get("content-encoding", ""), host)
                body = bytearray()
                async for chunk in resp.aiter_raw():
                    body += inflate(chunk, MAX_POLICY_BYTES + 1 - len(body))
                    if len(body) > MAX_POLICY_BYTES:
                        raise PolicyError("sts-policy-invalid", f"{host}: policy over 64 KB")
                return bytes(body)
        except httpx.ConnectError as exc:
            cause = exc.__context__ or exc.__cause__
            if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY" in str(exc):
                raise PolicyError("sts-webpki-invalid", f"{host}: {exc}") from None
            raise _Unreachable(f"{ip}: {exc}") from None
        except httpx.ConnectTimeout as exc:
            raise _Unreachable(f"{ip}: {exc}") from None
        except httpx.HTTPError as exc:
            raise PolicyError("sts-policy-fetch-error", f"{host}: {exc}") from None


def _inflater(encoding: str, host: str) -> Callable[[bytes, int], bytes]:
    """(chunk, room) -> at most ``room`` bytes of the body for a ``Content-Encoding``: the
    fetch asks for ``identity``, but a server may compress anyway, and httpx inflates each
    chunk whole (50 KB of gzip is 50 MB) before the 64 KB cap could be checked. gzip and
    deflate (zlib or raw) are inflated here, never past the cap; others are refused."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return lambda chunk, room: chunk
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise PolicyError("sts-policy-invalid", f"{host}: content encoding {encoding!r}")
    wbits = zlib.MAX_WBITS | (16 if "gzip" in encoding else 32)  # 32: zlib or gzip header
    inflater, first = zlib.decompressobj(wbits), True

    def inflate(chunk: bytes, room: int) -> bytes:
        nonlocal inflater, first
        retry, first = first and encoding == "deflate", False
        try:
            return inflater.decompress(chunk, max(room, 1))
        except zlib.error as exc:
            if retry:  # raw deflate, without the zlib header, as some servers send it
                inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                return inflate(chunk, room)
            raise PolicyError("sts-policy-invalid", f"{host}: {encoding}: {exc}") from None

    return inflate


class _Unreachable(Exception):
    """No connection to one address of the policy host: the next address is tried."""
