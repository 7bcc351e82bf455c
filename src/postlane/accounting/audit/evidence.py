"""Evidence from the audit store: per-recipient trails, regulator exports, the SLA report.

A *trail* is everything that happened to one recipient of one message: received, each
attempt, the outcome, and whether the class's SLA (as configured when it was written) was met.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..records import DEFAULT_FIELDS, format_time
from .chain import PSEUDONYMISED, PURGED, chain_hash, row_cdigest, verify_tuple
from .store import AuditStore, Query, row_record

__all__ = ["Trail", "export", "render_csv", "render_json", "render_text", "sla_report",
           "render_sla", "trails", "verify_export"]

_OUTCOMES = {"d": "delivered", "b": "bounced", "rb": "bounced by the remote side after relay"}
_STATES = {0: "intact", PSEUDONYMISED: "pseudonymised", PURGED: "purged"}


@dataclass
class Trail:
    queue_id: str
    rcpt: str
    rows: list[dict] = field(default_factory=list)

    @property
    def received(self) -> dict | None:
        return next((r for r in self.rows if r["type"] == "r"), None)

    @property
    def attempts(self) -> list[dict]:
        return [r for r in self.rows if r["type"] in ("d", "t", "b") and (
            r["dlv_destination_ip"] or r["bounce_cat"] != "message-expired")]

    @property
    def final(self) -> dict | None:
        return next((r for r in reversed(self.rows) if r["type"] in _OUTCOMES), None)

    @property
    def first(self) -> dict:
        return self.received or self.rows[0]

    @property
    def outcome(self) -> str:
        final = self.final
        if final is None:
            if any(r["type"] == "t" for r in self.rows):
                return "deferred (still queued)"
            return "queued"
        if final["bounce_cat"] == "message-expired":
            return "expired"
        return _OUTCOMES[final["type"]]

    @property
    def sla(self) -> float | None:
        return self.first["sla"]

    @property
    def latency(self) -> float | None:
        """Seconds from injection to delivery (totalSecondsQueued of the delivery)."""
        final = self.final
        return final["total_seconds_queued"] if final and final["type"] == "d" else None

    def sla_met(self, now: float) -> bool | None:
        """True/False, or None when the class has no SLA or the verdict is still open."""
        if self.sla is None:
            return None
        if self.latency is not None:
            return self.latency <= self.sla
        if self.final is not None:
            return False  # bounced or expired: never delivered
        return False if now - self.first["time_queued"] > self.sla else None

    def cause(self, pauses: Sequence[tuple[float, float, str]] = ()) -> str:
        """Why a trail breached its SLA, from what the records show; ``pauses`` are its pool's
        pause windows (start, end, domain) — one overlapping its wait is named first."""
        deferrals = [r for r in self.rows if r["type"] == "t"]
        final = self.final
        start = self.first["time_queued"]
        end = final["time_logged"] if final else float("inf")
        domain = self.rcpt.rpartition("@")[2].lower()
        for p_start, p_end, p_domain in pauses:
            if p_start < end and p_end > start and p_domain in ("*", domain):
                lane = "" if p_domain == "*" else f" (lane to {p_domain})"
                return (f"pool {self.first['vmta_pool']}{lane} paused by an operator from "
                        f"{format_time(p_start)} to {format_time(p_end)}")
        if final is not None and final["type"] != "d":
            what = "expired" if final["bounce_cat"] == "message-expired" else _OUTCOMES[
                final["type"]]
            return f"{what}: {final['dsn_diag']}" + (
                f" after {len(deferrals)} deferral(s), last reply: {deferrals[-1]['dsn_diag']}"
                if deferrals else "")
        if deferrals:
            return (f"{len(deferrals)} deferral(s) with retry backoff; last reply: "
                    f"{deferrals[-1]['dsn_diag']}")
        attempt = next((r for r in self.rows if r["type"] != "r"), None)
        if attempt is None:
            return "not attempted yet (pool paused, backlog or destination suspended)"
        wait = attempt["time_logged"] - self.first["time_queued"]
        return (f"waited {wait:.1f}s before its first attempt (pool paused, backlog or "
                "destination suspended)")

    def as_dict(self, now: float) -> dict:
        first = self.first
        return {
            "queue_id": self.queue_id, "recipient": self.rcpt,
            "message_id": first["message_id"], "correlation_id": first["correlation_id"],
            "env_id": first["env_id"], "class": first["cls"], "pool": first["vmta_pool"],
            "received": _event(self.received) if self.received else None,
            "attempts": [_event(r) for r in self.attempts],
            "outcome": self.outcome, "total_seconds_queued": self.latency,
            "sla_seconds": self.sla, "sla_met": self.sla_met(now),
            "records": [{"seq": r["seq"], "hash": bytes(r["hash"]).hex(),
                         "state": _STATES[r["state"]]} for r in self.rows],
        }


def _event(row: dict) -> dict:
    rec = row_record(row).as_dict()
    rec["seq"] = row["seq"]
    return rec


def trails(rows: Iterable[dict]) -> list[Trail]:
    """Group rows (in chain order) by message and recipient, oldest message first."""
    out: dict[tuple[str, str], Trail] = {}
    for row in rows:
        key = (row["queue_id"] or "", (row["rcpt"] or "").lower())
        trail = out.get(key)
        if trail is None:
            trail = out[key] = Trail(key[0], row["rcpt"] or "(purged)")
        trail.rows.append(row)
    return sorted(out.values(), key=lambda t: (t.first["time_queued"] or 0.0, t.queue_id,
                                               t.rcpt))


# -- rendering ----------------------------------------------------------------------------------

def _t(ts: float | None) -> str:
    return format_time(ts) if ts else "-"


def render_text(items: list[Trail], now: float) -> str:
    lines: list[str] = []
    for trail in items:
        f = trail.first
        lines.append(f"message {trail.queue_id}  Message-ID {f['message_id'] or '-'}  "
                     f"correlation {f['correlation_id'] or '-'}  ENVID {f['env_id'] or '-'}")
        lines.append(f"  class {f['cls']} (pool {f['vmta_pool']})  recipient {trail.rcpt}")
        rec = trail.received
        if rec is not None:
            lines.append(f"  {_t(rec['time_logged'])}  received from {rec['orig'] or '<>'} via "
                         f"{rec['src_type']} {rec['src_mta'] or '-'}, listener "
                         f"{rec['listener'] or '-'}, AUTH {rec['auth_user'] or '-'}, "
                         f"{rec['dlv_size']} bytes; queued")
        for row in trail.rows:
            if row["type"] == "r":
                continue
            if row["type"] == "b" and row["bounce_cat"] == "message-expired" and \
                    not row["dlv_destination_ip"]:
                lines.append(f"  {_t(row['time_logged'])}  expired before delivery: "
                             f"{row['dsn_diag']}")
                continue
            verb = {"d": "delivered", "t": "deferred", "b": "bounced"}.get(row["type"],
                                                                          row["type"])
            tls = _tls_text(row)
            lines.append(f"  {_t(row['time_logged'])}  attempt {row['attempt']}: {verb} from "
                         f"{row['dlv_source_ip'] or '-'} ({row['vmta'] or '-'}) to "
                         f"{row['dsn_mta'] or '-'}, {tls}")
            lines.append(f"      reply: {row['dsn_diag']}  [{row['dsn_status']}]")
        met = trail.sla_met(now)
        sla = "no SLA" if trail.sla is None else (
            f"SLA {trail.sla:g}s " + {True: "met", False: "BREACHED", None: "open"}[met])
        latency = f"{trail.latency:.3f}s" if trail.latency is not None else "-"
        lines.append(f"  outcome: {trail.outcome}; totalSecondsQueued {latency}; {sla}")
        if any(r["state"] == PURGED for r in trail.rows):
            lines.append("  (some records were purged under the retention policy)")
        lines.append("")
    return "\n".join(lines) if lines else "no records found\n"


_AUTHENTICATED = {"pkix": "PKIX", "dane-ee": "DANE-EE", "dane-ta": "DANE-TA"}


def _tls_text(row: dict) -> str:
    """``TLSv1.3 TLS_AES_256_GCM_SHA384, authenticated (DANE-EE), policy dane``: how the
    connection of an attempt was protected (docs/tls.md)."""
    auth, policy = row["dlv_tls_auth"] or "", row["dlv_tls_policy"] or ""
    if not row["dlv_tls_protocol"]:
        text = "no TLS"
    else:
        text = f"{row['dlv_tls_protocol']} {row['dlv_tls_cipher']}".strip()
        if auth:
            text += (f", authenticated ({_AUTHENTICATED[auth]})" if auth in _AUTHENTICATED
                     else ", not authenticated")
    return text + (f", policy {policy}" if policy else "")


def render_json(items: list[Trail], now: float) -> str:
    return json.dumps([t.as_dict(now) for t in items], indent=2, ensure_ascii=False) + "\n"


CSV_FIELDS: tuple[str, ...] = ("seq", "hash", "state", "sla", *DEFAULT_FIELDS)


def _csv_row(row: dict) -> list:
    rec = row_record(row).as_dict()
    head = [row["seq"], bytes(row["hash"]).hex(), _STATES[row["state"]],
            "" if row["sla"] is None else row["sla"]]
    return head + [rec[name] for name in DEFAULT_FIELDS]


def render_csv(items: list[Trail]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(CSV_FIELDS)
    for trail in items:
        for row in trail.rows:
            writer.writerow(_csv_row(row))
    return buf.getvalue()


# -- export -------------------------------------------------------------------------------------

def export(store: AuditStore, out: Path, since: float | None, until: float | None,
           cls: str | None = None) -> dict:
    """Write ``records.csv`` (readable, PowerMTA names), ``chain.jsonl`` (the stored rows with
    every value the hashes cover, to recompute them independently) and ``manifest.json``."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, chain_path = out / "records.csv", out / "chain.jsonl"
    count, first, last = 0, None, None
    with csv_path.open("w", newline="", encoding="utf-8") as fh_csv, \
            chain_path.open("w", encoding="utf-8") as fh_chain:
        writer = csv.writer(fh_csv, lineterminator="\r\n")
        writer.writerow(("day", "prev", *CSV_FIELDS))
        for row in store.rows_between(since, until, cls):
            writer.writerow([row["day"], bytes(row["prev"]).hex(), *_csv_row(row)])
            fh_chain.write(json.dumps({k: (v.hex() if isinstance(v, bytes) else v)
                                       for k, v in row.items()}, ensure_ascii=False) + "\n")
            count += 1
            first = first or row
            last = row
    result = store.verify()
    manifest = {
        "format": "postlane-audit-export/1",
        "generated_at": format_time(time.time()),
        "filter": {"since": _t(since), "until": _t(until), "class": cls},
        "records": count,
        "first": {"seq": first["seq"], "prev": bytes(first["prev"]).hex()} if first else None,
        "last": {"seq": last["seq"], "hash": bytes(last["hash"]).hex()} if last else None,
        "files": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                  for p in (csv_path, chain_path)},
        "store_verification": result.as_dict(),
        "days": [{"day": d["day"], "first_seq": d["first_seq"], "last_seq": d["last_seq"],
                  "records": d["records"], "anchor": bytes(d["anchor"]).hex(),
                  "head": bytes(d["head"]).hex()} for d in store.days()],
        "retention_applied": store.purges(),
        "hash_scheme": (
            "pdigest = SHA256(nonce || JSON[rcpt, orcpt, dsn_diag]); cdigest = SHA256(JSON("
            "other non-default fields, sorted keys, compact) || pdigest); hash = SHA256(prev || "
            "cdigest). Pseudonymised rows keep pdigest, purged rows keep cdigest."),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def verify_export(directory: Path) -> list[str]:
    """Check an export without the store: file digests against the manifest, every row's hash
    against its content, and the links between rows that are consecutive in the chain. Returns
    the problems found (empty: the export is intact)."""
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    problems = [f"{name}: SHA-256 does not match the manifest"
                for name, digest in manifest["files"].items()
                if hashlib.sha256((directory / name).read_bytes()).hexdigest() != digest]
    last: tuple[int, bytes] | None = None
    count = 0
    with (directory / "chain.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            for name in ("prev", "hash", "nonce", "pdigest", "cdigest"):
                if row[name] is not None:
                    row[name] = bytes.fromhex(row[name])
            cdigest, complaint = row_cdigest(verify_tuple(row))
            if complaint or chain_hash(row["prev"], cdigest) != row["hash"]:
                problems.append(f"record seq {row['seq']}: altered "
                                f"({complaint or 'its content does not match its hash'})")
            elif last is not None and row["seq"] == last[0] + 1 and row["prev"] != last[1]:
                problems.append(f"record seq {row['seq']}: does not link to record seq {last[0]}")
            last = (row["seq"], row["hash"])
            count += 1
    if count != manifest["records"]:
        problems.append(f"chain.jsonl has {count} records, the manifest says "
                        f"{manifest['records']}")
    if last is not None and manifest["last"]["hash"] != last[1].hex():
        problems.append("the last record's hash differs from the manifest")
    return problems


# -- SLA report ---------------------------------------------------------------------------------

def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (no interpolation: every figure is a real message's latency)."""
    if not values:
        return None
    ranked = sorted(values)
    return ranked[max(0, math.ceil(q / 100 * len(ranked)) - 1)]


def sla_report(store: AuditStore, since: float, until: float, cls: str | None = None,
               now: float | None = None) -> dict:
    """Per class: recipients queued in [since, until) (one "message" per recipient, as an SLA
    applies to each delivery), share delivered within the SLA,
    latency percentiles and every breach with its ids and cause."""
    now = time.time() if now is None else now
    classes = [cls] if cls else store.classes()
    report: dict = {"from": format_time(since), "to": format_time(until), "classes": {}}
    for name in classes:
        # Bounces the node generates itself (src_type "dsn") are not the sender's messages.
        items = [t for t in trails(store.find(Query(cls=name, since=since, until=until)))
                 if t.received is not None and t.received["src_type"] != "dsn"]
        if not items:
            continue
        pools = {t.first["vmta_pool"] for t in items}
        pauses = {pool: store.pauses(pool, now) for pool in pools}
        latencies = [t.latency for t in items if t.latency is not None]
        deliveries = [t.final for t in items if t.latency is not None]
        encrypted = sum(1 for d in deliveries if d and d["dlv_tls_protocol"])
        authenticated = sum(1 for d in deliveries if d and d["dlv_tls_auth"] in _AUTHENTICATED)
        sla = next((t.sla for t in items if t.sla is not None), None)
        met = sum(1 for t in items if t.sla_met(now))
        breaches = [{"queue_id": t.queue_id, "message_id": t.first["message_id"],
                     "correlation_id": t.first["correlation_id"], "recipient": t.rcpt,
                     "queued": format_time(t.first["time_queued"]), "outcome": t.outcome,
                     "latency_s": t.latency,
                     "cause": t.cause(pauses[t.first["vmta_pool"]])}
                    for t in items if t.sla_met(now) is False]
        report["classes"][name] = {
            "messages": len(items), "delivered": len(latencies), "sla_seconds": sla,
            "within_sla": met if sla is not None else None,
            "within_sla_share": round(met / len(items), 6) if sla is not None else None,
            "latency_s": {f"p{q}": _percentile(latencies, q) for q in (50, 95, 99)},
            "tls": {"encrypted": encrypted, "authenticated": authenticated,
                    "encrypted_share": round(encrypted / len(latencies), 6) if latencies
                    else None,
                    "authenticated_share": round(authenticated / len(latencies), 6)
                    if latencies else None},
            "breaches": breaches,
        }
    return report


def render_sla(report: dict) -> str:
    lines = [f"SLA report {report['from']} .. {report['to']}"]
    for name, c in report["classes"].items():
        lat = c["latency_s"]
        fmt = {k: ("-" if v is None else f"{v:.3f}s") for k, v in lat.items()}
        if c["sla_seconds"] is None:
            share = "no SLA"
        else:
            share = (f"{c['within_sla']}/{c['messages']} within {c['sla_seconds']:g}s "
                     f"({100 * c['within_sla_share']:.2f}%)")
        lines.append(f"{name}: {c['messages']} messages, {c['delivered']} delivered, {share}; "
                     f"p50 {fmt['p50']} p95 {fmt['p95']} p99 {fmt['p99']}")
        tls = c["tls"]
        if c["delivered"]:
            lines.append(f"  delivered over TLS: {tls['encrypted']}/{c['delivered']}"
                         f" ({100 * tls['encrypted_share']:.2f}%), with the server"
                         f" authenticated (PKIX or DANE): {tls['authenticated']}/{c['delivered']}"
                         f" ({100 * tls['authenticated_share']:.2f}%)")
        for b in c["breaches"]:
            lines.append(f"  BREACH {b['queue_id']} {b['recipient']} Message-ID "
                         f"{b['message_id'] or '-'} correlation {b['correlation_id'] or '-'}: "
                         f"{b['outcome']}, {b['cause']}")
    if not report["classes"]:
        lines.append("no messages in this period")
    return "\n".join(lines) + "\n"
