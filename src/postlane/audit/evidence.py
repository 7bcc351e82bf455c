"""Evidence from the audit store: per-recipient trails, regulator exports, the SLA report.

A *trail* is everything that happened to one recipient of one message: received, each
attempt, the outcome, and whether the class's SLA (as configured when it was written) was met.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..accounting.records import DEFAULT_FIELDS, format_time
from ..secretfile import private_dir, private_open
from .chain import PSEUDONYMISED, PURGED, chain_hash, row_cdigest, verify_tuple
from .queries import row_record
from .store import KEY_COLUMNS, AuditStore

__all__ = ["Trail", "export", "render_csv", "render_json", "render_text", "trails", "visible",
           "verify_export"]

_OUTCOMES = {"d": "delivered", "b": "bounced", "rb": "bounced by the remote side after relay",
             "s": "suppressed: not sent (the suppression list stopped it while it was queued)"}
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
        return [r for r in self.rows if r["type"] in ("d", "t", "b", "u") and (
            r["dlv_destination_ip"] or r["bounce_cat"] not in ("message-expired", "purged"))]

    @property
    def operations(self) -> list[dict]:
        """What operators did to it: hold, release, retry ("o" records), purge or delete."""
        return [r for r in self.rows if _by_operator(r)]

    @property
    def unknown(self) -> list[dict]:
        """Attempts whose outcome is unknown ("u": the node stopped after the attempt was
        marked and before its reply was recorded). Its totalSecondsQueued is when it started:
        had it been delivered, it was no sooner."""
        return [r for r in self.rows if r["type"] == "u"]

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
            held = [r for r in self.rows if r["type"] == "o"
                    and r["dsn_action"] in ("hold", "release")]
            if held and held[-1]["dsn_action"] == "hold":
                return f"{held[-1]['dsn_diag']} (still queued)"
            if any(r["type"] == "t" for r in self.rows):
                return "deferred (still queued)"
            return "queued"
        if final["bounce_cat"] == "message-expired":
            return "expired"
        if final["type"] == "s" and self.unknown:  # the node stopped mid-attempt before
            return ("suppressed: not sent again (an earlier attempt's outcome is unknown: it"
                    " may have been delivered)")
        if final["bounce_cat"] == "purged":
            return final["dsn_diag"] or "purged by operator"
        if final["type"] == "d" and self.confirmed:
            if any(r["dsn_action"] == "delivered" for r in self.confirmed):
                return "delivered, confirmed by the receiving side's delivery report"
            # "relayed" (RFC 3464 2.3.3): passed on to a system that does not report
            return "delivered; the receiving side's report says it relayed it onward, not that it" \
                " reached the mailbox"
        return _OUTCOMES[final["type"]]

    @property
    def confirmed(self) -> list[dict]:
        """The receiving side's success DSNs ("rd": NOTIFY=SUCCESS was passed on, and the
        report came back to the VERP address): delivery to the mailbox, in its own words."""
        return [r for r in self.rows if r["type"] == "rd" and r["dsn_action"] != "delayed"]

    @property
    def not_deliverable(self) -> str | None:
        """Why the SLA does not apply to this recipient: an operator purged it
        (``operator-purge``), the suppression list stopped it while queued (``suppressed``) or
        the destination refused it for good (``remote-permanent``: no such user, no such
        domain, a bounce after relay); None otherwise."""
        final = self.final
        if final is None or final["type"] == "d":
            return None
        if final["bounce_cat"] == "purged":
            return "operator-purge"
        if final["type"] == "s":
            return "suppressed"
        if final["type"] == "rb" or (final["bounce_cat"] != "message-expired"
                                     and (final["dsn_status"] or "").startswith("5")):
            return "remote-permanent"
        return None

    @property
    def sla(self) -> float | None:
        return self.first["sla"]

    @property
    def latency(self) -> float | None:
        """Seconds from injection to delivery (totalSecondsQueued of the delivery)."""
        final = self.final
        return final["total_seconds_queued"] if final and final["type"] == "d" else None

    def sla_met(self, now: float) -> bool | None:
        """True/False, or None when the class has no SLA, the recipient was not deliverable
        (``not_deliverable``) or the verdict is still open."""
        if self.sla is None or self.not_deliverable:
            return None
        if self.latency is not None:
            return self.latency <= self.sla
        if self.final is not None:
            return False  # bounced or expired: never delivered
        return False if now - self.first["time_queued"] > self.sla else None

    def as_dict(self, now: float) -> dict:
        first = self.first
        return {
            "queue_id": self.queue_id, "recipient": self.rcpt,
            "message_id": first["message_id"], "correlation_id": first["correlation_id"],
            "env_id": first["env_id"], "class": first["cls"], "pool": first["vmta_pool"],
            "received": _event(self.received) if self.received else None,
            "attempts": [_event(r) for r in self.attempts],
            "operations": [{"time": format_time(r["time_logged"]), "type": r["type"],
                            "operator": r["operator"], "detail": r["dsn_diag"]}
                           for r in self.operations],
            "delivery_reports": [_event(r) for r in self.confirmed],
            "outcome": self.outcome, "total_seconds_queued": self.latency,
            "unknown_attempts": [{"attempt": r["attempt"],
                                  "started_after_s": r["total_seconds_queued"]}
                                 for r in self.unknown],
            "sla_seconds": self.sla, "sla_met": self.sla_met(now),
            "records": [{"seq": r["seq"], "hash": bytes(r["hash"]).hex(),
                         "state": _STATES[r["state"]]} for r in self.rows],
        }


def _by_operator(row: dict) -> bool:
    return row["type"] == "o" or (row["type"] == "b" and row["bounce_cat"] == "purged")


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

_INVISIBLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def visible(line: str) -> str:
    """One line of a text report with its control characters and line separators escaped
    (``\\n``, ``\\x1b``, ``\\u2028``): a remote reply, a Message-ID or a correlation id is
    shown as it was, but cannot write a line of its own into the report nor move a terminal's
    cursor over it."""
    if not _INVISIBLE.search(line):
        return line
    return _INVISIBLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), line)


def _t(ts: float | None) -> str:
    return format_time(ts) if ts else "-"


def render_text(items: list[Trail], now: float) -> str:
    lines: list[str] = []
    for trail in items:
        f = trail.first
        if not trail.queue_id:  # actions on an address, not on a message of it
            lines.append(f"address {trail.rcpt} on the suppression list")
            lines += [f"  {_t(r['time_logged'])}  {r['dsn_diag']} (via {r['src_type']})"
                      for r in trail.rows]
            lines.append("")
            continue
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
            if _by_operator(row):
                via = f" (via {row['src_type']})" if row["src_type"] in ("api", "cli") else ""
                lines.append(f"  {_t(row['time_logged'])}  {row['dsn_diag'] or row['type']}{via}")
                continue
            if row["type"] == "b" and row["bounce_cat"] == "message-expired" and \
                    not row["dlv_destination_ip"]:
                lines.append(f"  {_t(row['time_logged'])}  expired before delivery: "
                             f"{row['dsn_diag']}")
                continue
            if row["type"] in ("rb", "rd"):  # a report of the receiving side, after relay
                what = "bounced it" if row["type"] == "rb" else f"reports it {row['dsn_action']}"
                lines.append(f"  {_t(row['time_logged'])}  the receiving side"
                             f" ({row['dsn_mta'] or row['src_mta'] or '-'}) {what}:"
                             f" {row['dsn_diag'] or '-'}  [{row['dsn_status']}]")
                continue
            verb = {"d": "delivered", "t": "deferred", "b": "bounced",
                    "u": "OUTCOME UNKNOWN (node stopped)"}.get(row["type"], row["type"])
            tls = _tls_text(row)
            lines.append(f"  {_t(row['time_logged'])}  attempt {row['attempt']}: {verb} from "
                         f"{row['dlv_source_ip'] or '-'} ({row['vmta'] or '-'}) to "
                         f"{row['dsn_mta'] or '-'}, {tls}")
            lines.append(f"      reply: {row['dsn_diag']}  [{row['dsn_status']}]")
        met = trail.sla_met(now)
        sla = "no SLA" if trail.sla is None else f"SLA {trail.sla:g}s " + (
            f"does not apply ({trail.not_deliverable})" if trail.not_deliverable else
            {True: "met", False: "BREACHED", None: "open"}[met])
        latency = f"{trail.latency:.3f}s" if trail.latency is not None else "-"
        lines.append(f"  outcome: {trail.outcome}; totalSecondsQueued {latency}; {sla}")
        if any(r["state"] == PURGED for r in trail.rows):
            lines.append("  (some records were purged under the retention policy)")
        lines.append("")
    return "\n".join(map(visible, lines)) if lines else "no records found\n"


AUTHENTICATED = {"pkix": "PKIX", "dane-ee": "DANE-EE", "dane-ta": "DANE-TA"}
"""``dlv_tls_auth`` values that mean the server was authenticated, and how they are shown."""


def _tls_text(row: dict) -> str:
    """``TLSv1.3 TLS_AES_256_GCM_SHA384, authenticated (DANE-EE), policy dane``: how the
    connection of an attempt was protected (docs/tls.md)."""
    auth, policy = row["dlv_tls_auth"] or "", row["dlv_tls_policy"] or ""
    if not row["dlv_tls_protocol"]:
        text = "no TLS"
    else:
        text = f"{row['dlv_tls_protocol']} {row['dlv_tls_cipher']}".strip()
        if auth:
            text += (f", authenticated ({AUTHENTICATED[auth]})" if auth in AUTHENTICATED
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
    private_dir(out)  # the evidence holds addresses: 0600 files in a 0700 folder
    csv_path, chain_path = out / "records.csv", out / "chain.jsonl"
    count, first, last = 0, None, None
    with private_open(csv_path, newline="", encoding="utf-8") as fh_csv, \
            private_open(chain_path, encoding="utf-8") as fh_chain:
        writer = csv.writer(fh_csv, lineterminator="\r\n")
        writer.writerow(("day", "prev", *CSV_FIELDS))
        for row in store.rows_between(since, until, cls):
            writer.writerow([row["day"], bytes(row["prev"]).hex(), *_csv_row(row)])
            fh_chain.write(json.dumps({k: (v.hex() if isinstance(v, bytes) else v)
                                       for k, v in row.items() if k not in KEY_COLUMNS},
                                      ensure_ascii=False) + "\n")
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
        "seals": [seal.as_dict() for seal in store.seals()],
        "hash_scheme": (
            "pdigest = SHA256(nonce || JSON[rcpt, orcpt, dsn_diag]); cdigest = SHA256(JSON["
            "the HASHED values of the row's scheme, in order] || pdigest); hash = SHA256(prev || "
            "cdigest). Pseudonymised rows keep pdigest, purged rows keep cdigest. A seal is an "
            "Ed25519 signature over JSON[\"postlane-seal/1\", day, last_seq, records, head hex];"
            " its tsa is an RFC 3161 TimeStampResp over that JSON followed by the signature."),
    }
    with private_open(out / "manifest.json", encoding="utf-8") as fh:
        fh.write(json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify_export(directory: Path, public=None, tsa_roots: list | None = None) -> list[str]:
    """Check an export without the store: file digests against the manifest, every row's hash
    against its content, the links between rows that are consecutive in the chain and, with the
    seal key's ``public`` half, every seal against the exported rows. Returns the problems found
    (empty: the export is intact)."""
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    problems = [f"{name}: SHA-256 does not match the manifest"
                for name, digest in manifest["files"].items()
                if hashlib.sha256((directory / name).read_bytes()).hexdigest() != digest]
    last: tuple[int, bytes] | None = None
    count = 0
    seen: dict[int, tuple[bytes, str]] = {}
    per_day: dict[str, list[int]] = {}
    with (directory / "chain.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            per_day.setdefault(row["day"], []).append(row["seq"])
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
            seen[row["seq"]] = (row["hash"], row["day"])
            count += 1
    if count != manifest["records"]:
        problems.append(f"chain.jsonl has {count} records, the manifest says "
                        f"{manifest['records']}")
    if last is not None and manifest["last"]["hash"] != last[1].hex():
        problems.append("the last record's hash differs from the manifest")
    if public is not None:
        from .seal import Seal, check_seals

        def row_at(seq: int) -> tuple | None:  # as the store answers, from the export
            if seq not in seen:
                return None
            digest, day = seen[seq]
            return digest, day, sum(1 for s in per_day.get(day, ()) if s <= seq)

        # a filtered export may hold part of a day: its seals are checked where it is whole
        whole = [d for d in manifest["days"]
                 if len(per_day.get(d["day"], ())) == d["last_seq"] - d["first_seq"] + 1]
        names = {d["day"] for d in whole}
        seals = [Seal.from_dict(d) for d in manifest.get("seals", []) if d["day"] in names]
        problems += check_seals(seals, whole, row_at, public, tsa_roots,
                                manifest["generated_at"][:10])
    return problems
