"""Score the report parser against the real-world corpora in ../shared/testdata (see its README).

Run: ``.venv/bin/python -m tests.support.corpus_score [-v]`` (prints the figures; -v lists misses).
"""

from __future__ import annotations

import json
import sys
from collections import Counter

from postlane.feedback.parse import parse_report
from tests.support.shared import TESTDATA


def _ratio(a: int, b: int) -> float:
    return round(a / b, 4) if b else 1.0


def score_bounces(verbose: bool = False) -> dict:
    """Recall/precision of failed recipients and of permanent/temporary, per recipient, over the
    bounce files; plus how many non-bounces were (wrongly) reported as bounces."""
    manifest = json.loads((TESTDATA / "bounces" / "manifest.json").read_text())
    c: Counter = Counter()
    misses = []
    for entry in manifest:
        report = parse_report((TESTDATA / "bounces" / entry["file"]).read_bytes())
        kind = entry["kind"]
        c[f"kind_total_{kind}"] += 1
        expected_kind = {"bounce": ("bounce", "delay"), "not-bounce": ("not-a-report",),
                         "success-dsn": ("delivered",), "complaint": ("complaint",),
                         "auto-reply": ("auto-reply",)}[kind]
        if report.kind in expected_kind:
            c[f"kind_ok_{kind}"] += 1
        elif verbose:
            misses.append(f"KIND {entry['file']}: {report.kind} != {kind}")
        if kind not in ("bounce", "not-bounce"):
            continue
        failed = {r.address.lower(): r for r in report.recipients if r.permanent is not None}
        want = {x["recipient"].lower(): x for x in entry["expected"] if x.get("recipient")}
        c["rcpt_expected"] += len(want)
        c["rcpt_found"] += len(failed)
        hits = set(failed) & set(want)
        c["rcpt_hit"] += len(hits)
        if verbose and (hits != set(want) or hits != set(failed)):
            misses.append(f"RCPT {entry['file']}: got {sorted(failed)} want {sorted(want)}")
        for addr in hits:
            exp = "permanent" if want[addr]["status"].startswith("5") else "temporary"
            got = "permanent" if failed[addr].permanent else "temporary"
            c[f"pt_expected_{exp}"] += 1
            c[f"pt_got_{got}"] += 1
            if exp == got:
                c[f"pt_hit_{exp}"] += 1
            elif verbose:
                misses.append(f"P/T {entry['file']}: {addr} got {got} ({failed[addr].status})"
                              f" want {exp} ({want[addr]['status']})")
    out = {
        "files": len(manifest),
        "recipient": {"recall": _ratio(c["rcpt_hit"], c["rcpt_expected"]),
                      "precision": _ratio(c["rcpt_hit"], c["rcpt_found"]),
                      "expected": c["rcpt_expected"], "found": c["rcpt_found"],
                      "correct": c["rcpt_hit"]},
        "kind_accuracy": {k: f"{c[f'kind_ok_{k}']}/{c[f'kind_total_{k}']}"
                          for k in ("bounce", "not-bounce", "success-dsn", "complaint",
                                    "auto-reply")},
    }
    for cls in ("permanent", "temporary"):
        out[cls] = {"recall": _ratio(c[f"pt_hit_{cls}"], c[f"pt_expected_{cls}"]),
                    "precision": _ratio(c[f"pt_hit_{cls}"], c[f"pt_got_{cls}"]),
                    "expected": c[f"pt_expected_{cls}"]}
    if verbose:
        out["misses"] = misses
    return out


def score_arf(verbose: bool = False) -> dict:
    """Feedback type accuracy and recall/precision of complained recipients over arf/manifest."""
    manifest = json.loads((TESTDATA / "arf" / "manifest.json").read_text())
    c: Counter = Counter()
    misses = []
    for entry in manifest:
        report = parse_report((TESTDATA / entry["file"]).read_bytes())
        exp = entry["expected"]
        if "feedback_type" in exp:
            types = [exp["feedback_type"]]
            want = {a.strip("<>").lower() for a in [exp.get("original_rcpt_to") or ""] if a}
            ip = exp.get("source_ip")
        else:
            types, want, ip = exp["feedback_types"], {
                a.lower() for a in exp["complained_recipients"]}, None
        got_type = report.complaint.feedback_type if report.complaint else ""
        norm = {t.lower().replace("-", "").replace("_", "") for t in types}
        c["files"] += 1
        if report.kind == "complaint" and got_type.replace("-", "") in norm:
            c["type_ok"] += 1
        elif verbose:
            misses.append(f"TYPE {entry['file']}: {report.kind}/{got_type} want {types}")
        if ip is not None or "source_ip" in exp:
            c["ip_total"] += 1
            c["ip_ok"] += int((report.complaint.source_ip if report.complaint else "") ==
                              (ip or ""))
        got = {r.address.lower() for r in report.recipients}
        c["rcpt_expected"] += len(want)
        c["rcpt_found"] += len(got)
        c["rcpt_hit"] += len(got & want)
        if verbose and got != want:
            misses.append(f"RCPT {entry['file']}: got {sorted(got)} want {sorted(want)}")
    out = {"files": c["files"], "feedback_type_accuracy": _ratio(c["type_ok"], c["files"]),
           "source_ip_accuracy": _ratio(c["ip_ok"], c["ip_total"]),
           "recipient": {"recall": _ratio(c["rcpt_hit"], c["rcpt_expected"]),
                         "precision": _ratio(c["rcpt_hit"], c["rcpt_found"]),
                         "expected": c["rcpt_expected"], "found": c["rcpt_found"]}}
    if verbose:
        out["misses"] = misses
    return out


if __name__ == "__main__":
    verbose = "-v" in sys.argv
    print(json.dumps({"bounces": score_bounces(verbose), "arf": score_arf(verbose)}, indent=1))
