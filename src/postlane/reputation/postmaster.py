"""Google Postmaster Tools API (v1) importer: per domain and day, the domain reputation, the IP
reputation buckets, the user-reported spam ratio, SPF/DKIM/DMARC success ratios and the delivery
errors, as ``ReputationStore.put_postmaster`` rows.

Authentication is a service account's JSON key through ``google-auth`` (JWT bearer grant at the
key's ``token_uri``; scope ``postmaster.readonly``); the HTTP calls go through httpx, and so does
the token request (a small adapter to google-auth's transport interface), so one client with one
timeout serves both. ``base_url`` is configurable: tests point it, and the key's ``token_uri``,
at a loopback server.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import json.decoder
import json.scanner
import logging
import os
import re
from typing import Any

import httpx
from google.auth import exceptions as gexc
from google.auth import transport
from google.oauth2 import service_account

from ..config.model import PostmasterConfig

__all__ = ["SCOPE", "ImportFailed", "drop_future_days", "fetch_postmaster",
           "parse_traffic_stats"]

log = logging.getLogger("postlane.reputation")

SCOPE = "https://www.googleapis.com/auth/postmaster.readonly"
_UNSET = ("REPUTATION_CATEGORY_UNSPECIFIED", "DELIVERY_ERROR_CLASS_UNSPECIFIED",
          "DELIVERY_ERROR_TYPE_UNSPECIFIED")


_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


class ImportFailed(Exception):
    """An import that got nothing: the message is for the operator (never holds a secret)."""


class _Response(transport.Response):
    def __init__(self, resp: httpx.Response) -> None:
        self._resp = resp

    @property
    def status(self) -> int:
        return self._resp.status_code

    @property
    def headers(self) -> Any:
        return self._resp.headers

    @property
    def data(self) -> bytes:
        return self._resp.content


class _Request(transport.Request):
    """google-auth's transport interface over an httpx client (token requests)."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def __call__(self, url: str, method: str = "GET", body: Any = None, headers: Any = None,
                 timeout: Any = None, **kwargs: Any) -> _Response:
        try:
            return _Response(self.client.request(method, url, content=body, headers=headers))
        except httpx.HTTPError as exc:
            raise gexc.TransportError(f"{type(exc).__name__}: {exc}") from None


def _get(client: httpx.Client, path: str, params: dict) -> dict:
    try:
        resp = client.get(path, params=params)
    except httpx.HTTPError as exc:
        raise ImportFailed(f"Postmaster Tools API unreachable: {type(exc).__name__}") from None
    if not resp.is_success:
        try:
            detail = resp.json().get("error", {}).get("message", "")
        except ValueError:
            detail = ""
        raise ImportFailed(f"Postmaster Tools API answered HTTP {resp.status_code} for {path}"
                           + (f": {detail[:200]}" if detail else ""))
    try:
        return resp.json()
    except ValueError:
        raise ImportFailed(f"Postmaster Tools API sent no JSON for {path}") from None


def _pages(client: httpx.Client, path: str, key: str, params: dict) -> list[dict]:
    out: list[dict] = []
    token = None
    for _ in range(100):  # a bound: 100 pages of a day each is three months
        body = _get(client, path, {**params, **({"pageToken": token} if token else {})})
        items = body.get(key) if isinstance(body, dict) else None
        if not isinstance(items, list | None) or not all(isinstance(i, dict)
                                                         for i in items or []):
            raise ImportFailed(f"Postmaster Tools API sent an unexpected {key} list for {path}")
        out.extend(items or [])
        token = body.get("nextPageToken")
        if not token:
            break
    return out


def _day(name: Any) -> str:
    """``domains/example.com/trafficStats/20240131`` -> ``2024-01-31`` (a real date)."""
    stamp = str(name).rsplit("/", 1)[-1]
    try:
        return dt.datetime.strptime(stamp, "%Y%m%d").date().isoformat() if len(stamp) == 8 \
            else ""
    except ValueError:
        return ""


def _ratio(value: Any) -> float | None:
    """A ratio from 0 to 1, else unknown: JSON may carry ``NaN`` (Python's parser takes it,
    the API's JSON cannot give it back: HTTP 500), ``true`` or ``7``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if 0 <= value <= 1 else None


def _ips(values: Any) -> list[str]:
    """Sample IPs as the pools write them (``ipaddress`` form); anything else is dropped."""
    out = []
    for value in values if isinstance(values, list) else []:
        try:
            out.append(str(ipaddress.ip_address(str(value).strip())))
        except ValueError:
            continue
    return out


def _ip_count(value: Any) -> int:
    """``ipCount`` is an int64 as a string."""
    text = str(value).strip()
    return int(text) if text.isdigit() and len(text) < 19 else 0


def _row(domain: str, stat: dict) -> dict:
    day = _day(stat.get("name", ""))
    if not day:
        raise ImportFailed(f"unexpected trafficStats name {str(stat.get('name'))[:80]!r}")
    rep = stat.get("domainReputation", "")
    return {
        "domain": domain, "day": day,
        "domain_reputation": rep if isinstance(rep, str) and rep not in _UNSET else "",
        "spam_ratio": _ratio(stat.get("userReportedSpamRatio")),
        "spf_ratio": _ratio(stat.get("spfSuccessRatio")),
        "dkim_ratio": _ratio(stat.get("dkimSuccessRatio")),
        "dmarc_ratio": _ratio(stat.get("dmarcSuccessRatio")),
        "ip_reputations": json.dumps([
            {"reputation": r["reputation"], "ip_count": _ip_count(r.get("ipCount")),
             "sample_ips": _ips(r.get("sampleIps"))}
            for r in _dicts(stat.get("ipReputations"))
            if isinstance(r.get("reputation"), str) and r["reputation"] not in _UNSET]),
        "delivery_errors": json.dumps([
            {"class": str(e.get("errorClass", ""))[:100], "type": str(e.get("errorType", ""))[:100],
             "ratio": _ratio(e.get("errorRatio"))} for e in _dicts(stat.get("deliveryErrors"))]),
        "raw": json.dumps(stat)[:20000]}


def _dicts(value: Any) -> list[dict]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def fetch_postmaster(cfg: PostmasterConfig, today: dt.date) -> list[dict]:
    """Every domain's traffic stats from ``history`` ago to today; raises ``ImportFailed``."""
    key_file = cfg.key_file or ""
    try:
        if os.stat(key_file).st_mode & 0o077:
            log.warning("Postmaster Tools key file is readable by group/others; chmod 600 it",
                        extra={"path": key_file})
        creds = service_account.Credentials.from_service_account_file(
            key_file, scopes=[SCOPE], subject=cfg.subject)
    except (OSError, ValueError, KeyError) as exc:
        raise ImportFailed(f"cannot use the service-account key {key_file}:"
                           f" {type(exc).__name__}: {exc}") from None
    start = today - dt.timedelta(seconds=cfg.history)
    end = today + dt.timedelta(days=1)  # endDate is exclusive
    with httpx.Client(base_url=cfg.base_url.rstrip("/"), timeout=cfg.timeout) as client:
        try:
            creds.refresh(_Request(client))
        except gexc.GoogleAuthError as exc:
            raise ImportFailed(f"Google refused the service-account token: {exc}"[:300]) from None
        client.headers["Authorization"] = f"Bearer {creds.token}"
        domains = list(cfg.domains) or [
            name for d in _pages(client, "/v1/domains", "domains", {})
            if _DOMAIN.fullmatch(name := str(d.get("name", "")).removeprefix("domains/"))]
        rows: list[dict] = []
        for domain in domains:
            params = {"startDate.year": start.year, "startDate.month": start.month,
                      "startDate.day": start.day, "endDate.year": end.year,
                      "endDate.month": end.month, "endDate.day": end.day, "pageSize": 200}
            stats = _pages(client, f"/v1/domains/{domain}/trafficStats", "trafficStats", params)
            rows.extend(_row(domain, s) for s in stats)
    return drop_future_days(rows, today)


def drop_future_days(rows: list[dict], today: dt.date) -> list[dict]:
    """Days up to tomorrow: a day after (a broken stamp) would stay "the latest day" and its
    alerts for ever."""
    last = (today + dt.timedelta(days=1)).isoformat()
    return [r for r in rows if r["day"] <= last]


_NAME = re.compile(r"domains/([^/]+)/trafficStats/[^/]*")
_WS = re.compile(r"[ \t\n\r]*")  # JSON's whitespace


def parse_traffic_stats(text: str) -> list[dict]:
    """Rows from ``trafficStats.list`` answers saved to a file (``{"trafficStats": [...]}``,
    several of them one after the other or in a JSON array, or single ``trafficStats.get``
    objects), each entry read by the importer's own ``_row``; the domain is the one the
    entry's ``name`` gives. Raises ``ImportFailed`` naming the line."""
    starts: dict[int, int] = {}
    """Where each JSON object began (``id`` -> offset), to name an entry's line."""

    def parse_object(s_and_end: tuple[str, int], *args: Any) -> tuple[Any, int]:
        value, end = json.decoder.JSONObject(s_and_end, *args)  # type: ignore[attr-defined]
        starts[id(value)] = s_and_end[1] - 1
        return value, end

    decoder = json.JSONDecoder()
    decoder.parse_object = parse_object  # type: ignore[attr-defined]
    decoder.scan_once = json.scanner.py_make_scanner(decoder)  # type: ignore[attr-defined]

    def line(offset: int) -> int:
        return text.count("\n", 0, offset) + 1

    text = text.removeprefix("\ufeff")
    docs: list[Any] = []
    pos = 0
    while True:
        pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
        if pos >= len(text):
            break
        try:
            doc, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise ImportFailed(f"line {exc.lineno}, column {exc.colno}: not JSON:"
                               f" {exc.msg}") from None
        except RecursionError:
            raise ImportFailed(f"line {line(pos)}: the JSON nests too deep") from None
        if not isinstance(doc, dict | list):  # "127.0.0.1,..." starts with a number
            raise ImportFailed(f"line {line(pos)}: not Postmaster Tools JSON (trafficStats"
                               f" answers are JSON objects)")
        docs.extend(doc if isinstance(doc, list) else [doc])
        pos = end
    rows: list[dict] = []
    for doc in docs:
        where = f"line {line(starts[id(doc)])}" if id(doc) in starts else "the file"
        if not isinstance(doc, dict):
            raise ImportFailed(f"{where}: {type(doc).__name__} where a trafficStats answer"
                               f" (a JSON object) belongs")
        if isinstance(doc.get("error"), dict):
            raise ImportFailed(f"{where}: an error answer, not traffic stats:"
                               f" {str(doc['error'].get('message', ''))[:200]!r}")
        if "name" in doc:
            entries: Any = [doc]
        elif "trafficStats" in doc or not doc:  # {} is the answer for days without data
            entries = doc.get("trafficStats", [])
        else:
            raise ImportFailed(f"{where}: neither a trafficStats.list answer (no"
                               f" \"trafficStats\") nor a TrafficStats (no \"name\")")
        if not isinstance(entries, list):
            raise ImportFailed(f"{where}: \"trafficStats\" is not a list")
        for stat in entries:
            at = f"line {line(starts[id(stat)])}" if id(stat) in starts else where
            if not isinstance(stat, dict):
                raise ImportFailed(f"{at}: a trafficStats entry is {type(stat).__name__},"
                                   f" not an object")
            name = stat.get("name")
            match = _NAME.fullmatch(name) if isinstance(name, str) else None
            if match is None or not _DOMAIN.fullmatch(match.group(1)):
                raise ImportFailed(f"{at}: trafficStats name {str(name)[:80]!r} is not"
                                   f" domains/DOMAIN/trafficStats/YYYYMMDD")
            try:
                rows.append(_row(match.group(1).lower(), stat))
            except ImportFailed as exc:
                raise ImportFailed(f"{at}: {exc}") from None
    return rows
