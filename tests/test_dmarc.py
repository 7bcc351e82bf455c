"""DMARC aggregate reports: the real-world corpus (../shared/testdata/dmarc, see its README),
hostile input (an XML bomb, a 200 MB gzip bomb, a zip bomb, external entities), the
pools / forwarders / authorised / unknown split on a crafted report, the store (deduplicated, on
SQLite and PostgreSQL), the CLI, and reports arriving by SMTP at the rua address."""

from __future__ import annotations

import gzip
import io
import json
import time
import tracemalloc
import zipfile
import zlib
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from postlane.cli import app
from postlane.feedback.dmarc import (
    DEFAULT_MAX_SIZE,
    AggregateReport,
    DMARCError,
    parse_aggregate,
)
from postlane.policy.dkim import generate_key, write_key
from postlane.reputation import service as reputation_service
from postlane.reputation.alignment import summarise
from postlane.reputation.service import open_store
from postlane.reputation.store import ReputationStore
from postlane.startup import parse_config
from tests.conftest import SHARED, config_text, records, send
from tests.support.pg import PG_DSN
from tests.support.shared import needs_corpus as shared_corpus

CORPUS = SHARED / "testdata" / "dmarc"
BROKEN = {"invalid_utf_8.xml": "not valid UTF-8: byte 0x91 at offset 706",
          "invalid_xml.xml": "not well-formed XML"}
needs_corpus = shared_corpus(CORPUS)
runner = CliRunner()


def corpus_files() -> list[Path]:
    return sorted(CORPUS.iterdir()) if CORPUS.is_dir() else []


# -- the corpus ----------------------------------------------------------------------------------

@needs_corpus
def test_the_corpus_has_19_reports_and_all_parse_or_fail_with_a_reason():
    files = corpus_files()
    assert len(files) == 19
    result = runner.invoke(app, ["dmarc", "parse", "--json", *map(str, files)])
    assert result.exit_code == 1  # two broken files
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(line["file"]).name for line in lines] == [f.name for f in files]
    for line in lines:
        name = Path(line["file"]).name
        if name in BROKEN:
            assert line["ok"] is False and line["error"].startswith(BROKEN[name]), line
            continue
        assert line["ok"] is True, line
        assert set(line) == {"file", "ok", "org_name", "report_id", "policy_domain", "begin",
                             "end", "records"}
        assert line["report_id"] and line["policy_domain"] and line["begin"] <= line["end"]
        for rec in line["records"]:
            assert set(rec) == {"source_ip", "count", "disposition", "header_from",
                                "dkim_aligned", "spf_aligned"}
            assert rec["count"] >= 0 and isinstance(rec["dkim_aligned"], bool)


@needs_corpus
@pytest.mark.parametrize("name, org, report_id, domain, rows, messages", [
    ("rfc9990-example.net!example.com!1700000000!1700086399.xml", "example.net",
     "dmarcbis-test-report-001", "example.com", 2, 7),
    ("rfc9990-sample.xml", "Sample Reporter", "3v98abbp8ya9n3va8yr8oa3ya", "example.com", 1, 123),
    ("old_draft_from_wiki.xml", "acme.com", "9391651994964116463", "example.com", 1, 2),
    ("ikea.com!example.de!1538690400!1538776800.xml", "ikea.com",
     "aggr_report_2018_10_05_5bc7e9b4f3e8a", "example.de", 1, 1),  # unclosed wrapper element
    ("mimecast-weird-gzip.eml", "Mimecast",
     "157a5fe30ec76f4bc0d8bccfc96c118a167a1280fee7c7465af5115e73082e5e", "ab.id.au", 1, 1),
    ("twilight.eml", "google.com", "1627703331531660819", "twlnet.com", 1, 1),  # zip in a mail
    ("fastmail.com!example.com!1516060800!1516147199!102675056.xml.gz", "FastMail Pty Ltd",
     "102675056", "indemed.com", 1, 1),
    ("estadocuenta1.infonacot.gob.mx!example.com!1536853302!1536939702!2940.xml.zip",
     "XYZ Corporation", "2940", "example.com", 1, 1),
    ("!large-example.com!1711897200!1711983600.xml", "", "example.com:1711897200",
     "example.com", 2286, 2286),
    ("empty_reason.xml", "example.org", "20240125141224705995", "example.com", 1, 2),
])
def test_provider_formats(name, org, report_id, domain, rows, messages):
    report = parse_aggregate((CORPUS / name).read_bytes())
    assert (report.org_name, report.report_id, report.policy_domain) == (org, report_id, domain)
    assert (len(report.rows), report.messages) == (rows, messages)
    assert report.reporter  # org_name, else the reporter's address


@needs_corpus
def test_rfc9990_rows_carry_alignment_and_auth_results():
    report = parse_aggregate((CORPUS / "rfc9990-example.net!example.com!1700000000!"
                                       "1700086399.xml").read_bytes())
    good, spoof = report.rows
    assert (good.dkim_aligned, good.spf_aligned, good.disposition) == (True, True, "none")
    assert good.dkim == [{"domain": "example.com", "selector": "selector1", "result": "pass"}]
    assert (spoof.dkim_aligned, spoof.spf_aligned, spoof.disposition) == (False, False, "reject")
    assert spoof.envelope_from == "spoofed.example.com"
    assert spoof.reasons == [{"type": "other", "comment": "sender not authorized"}]
    assert report.policy["np"] == "reject" and report.policy["testing"] == "y"


# -- hostile input ------------------------------------------------------------------------------

def crafted(rows: list[tuple[str, int, str, str]], report_id: str = "r-1",
            org: str = "mail.example", domain: str = "insurer.test",
            end: int = 4_000_000_000) -> bytes:
    """An aggregate report: rows of (source_ip, count, dkim, spf) with policy_evaluated
    results as a receiver writes them."""
    records = "".join(f"""
  <record><row><source_ip>{ip}</source_ip><count>{n}</count>
    <policy_evaluated><disposition>none</disposition><dkim>{dkim}</dkim><spf>{spf}</spf>
    </policy_evaluated></row>
    <identifiers><header_from>{domain}</header_from><envelope_from>{domain}</envelope_from>
    </identifiers>
    <auth_results><dkim><domain>{domain}</domain><selector>s1</selector><result>{dkim}</result>
    </dkim><spf><domain>{domain}</domain><result>{spf}</result></spf></auth_results></record>"""
                      for ip, n, dkim, spf in rows)
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<feedback xmlns="urn:ietf:params:xml:ns:dmarc-2.0"><version>1.0</version>
  <report_metadata><org_name>{org}</org_name><email>dmarc@{org}</email>
    <report_id>{report_id}</report_id>
    <date_range><begin>{end - 86400}</begin><end>{end}</end></date_range></report_metadata>
  <policy_published><domain>{domain}</domain><adkim>r</adkim><aspf>r</aspf><p>none</p>
  </policy_published>{records}
</feedback>""".encode()


def refusal_peak(data: bytes, reason: str, **kwargs: int) -> int:
    """Parse ``data``, expecting a refusal naming ``reason``; the peak of traced memory."""
    tracemalloc.start()
    try:
        with pytest.raises(DMARCError, match=reason):
            parse_aggregate(data, **kwargs)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_an_entity_expansion_bomb_is_refused_at_its_declaration():
    bomb = b'<?xml version="1.0"?>\n<!DOCTYPE feedback [\n<!ENTITY a "' + b"x" * 100 + b'">\n'
    for i in range(1, 12):
        bomb += f'<!ENTITY {chr(97 + i)} "{("&" + chr(96 + i) + ";") * 10}">\n'.encode()
    bomb += b"]>\n<feedback><report_metadata><org_name>&l;</org_name></report_metadata>" \
            b"</feedback>"
    peak = refusal_peak(bomb, "refused XML: DTDForbidden")
    assert peak < 1 << 20  # 10^11 expansions would be 10 TB; nothing was expanded


def test_external_entities_are_refused():
    xxe = b'<?xml version="1.0"?><!DOCTYPE feedback [<!ENTITY x SYSTEM "file:///etc/passwd">]>' \
          b"<feedback>&x;</feedback>"
    with pytest.raises(DMARCError, match="refused XML"):
        parse_aggregate(xxe)


@pytest.mark.parametrize("doctype", [
    b'<!DOCTYPE feedback SYSTEM "http://127.0.0.1:9/report.dtd">',
    b'<!DOCTYPE feedback [<!ATTLIST feedback a CDATA "x">]>'])
def test_a_dtd_without_entities_is_refused_too(doctype):
    # only entity declarations were refused: a DOCTYPE naming an external DTD or declaring
    # attribute defaults was read, though no report needs one (docs: "DTDs ... refused")
    head, _, rest = crafted([("192.0.2.1", 1, "pass", "pass")]).partition(b"\n")
    with pytest.raises(DMARCError, match="refused XML: DTDForbidden"):
        parse_aggregate(head + b"\n" + doctype + b"\n" + rest)


def _gzip_bomb(size: int) -> bytes:
    """``size`` bytes of zeros, gzip-compressed a megabyte at a time (bounded memory)."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9) as gz:
        chunk = b"\0" * (1 << 20)
        for _ in range(size >> 20):
            gz.write(chunk)
    return out.getvalue()


def test_a_200_mb_gzip_bomb_is_refused_in_bounded_memory():
    bomb = _gzip_bomb(200 << 20)
    assert len(bomb) < 1 << 20  # 200 MB in ~200 KB
    peak = refusal_peak(bomb, "gzip data expands beyond the 32 MB limit")
    # the output buffer stops one chunk past the limit (bytearray growth may copy it once):
    # far from the 200 MB the bomb would take
    assert peak < 2 * DEFAULT_MAX_SIZE + (4 << 20), peak


def test_a_zip_bomb_is_refused_in_bounded_memory():
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("r.xml", "w") as member:
        for _ in range(100):
            member.write(b"\0" * (1 << 20))
    peak = refusal_peak(out.getvalue(), "zip member expands beyond the 4 MB limit",
                        max_size=4 << 20)
    assert peak < 3 * (4 << 20), peak  # not the 100 MB it expands to


@pytest.mark.parametrize("data, reason", [
    (b"\x1f\x8b\x08\x00garbage-after-the-magic", "broken gzip data"),
    (gzip.compress(crafted([("192.0.2.1", 1, "pass", "pass")]))[:-40], "broken gzip data"),
    (b"PK\x03\x04 not really a zip", "broken zip archive"),
    (b"%PDF-1.4 a pdf", "not a DMARC report"),
    (b"<html><body>hello</body></html>", "not a DMARC aggregate report: the root element"),
    (b"<feedback><report_metadata/></feedback>", "report_metadata or policy_published"),
    (crafted([("not-an-ip", 1, "pass", "pass")]), "record 1: source_ip 'not-an-ip'"),
    (crafted([("192.0.2.1", 1, "pass", "pass")]).replace(b"<count>1</count>",
                                                           b"<count>-3</count>"),
     "record 1: count is negative"),
    (crafted([]).replace(b"<report_id>r-1</report_id>", b"<report_id></report_id>"),
     "incomplete report: report_id"),
    (b"Subject: hi\r\n\r\nno attachment here\r\n", "carries no DMARC report"),
    # numbers that would crash the parser (inf), overflow the store's BIGINT or its sums
    (crafted([("192.0.2.1", 1, "pass", "pass")]).replace(b"<count>1</count>",
                                                           b"<count>1e400</count>"),
     "record 1: count is not a number: '1e400'"),
    (crafted([("192.0.2.1", 1, "pass", "pass")]).replace(b"<count>1</count>",
                                                           b"<count>9000000000000000000</count>"),
     "record 1: count is implausibly large: 9000000000000000000"),
    (crafted([]).replace(b"<end>4000000000</end>", b"<end>100000000000000000000</end>"),
     "date_range/end is implausibly large"),
    # a megabyte "domain" became a /metrics label, a dashboard row and a primary key
    (crafted([], domain="x" * 300 + ".test"), "domain is longer than 255 characters"),
    (crafted([("192.0.2.1", 1, "pass", "pass")]).replace(
        b"<header_from>insurer.test", b"<header_from>" + b"a" * 1_000_000),
     "header_from is longer than 255 characters"),
    (crafted([]).replace(b"<report_id>r-1", b"<report_id>" + b"7" * 300),
     "report_id is longer than 255 characters"),
    (crafted([]).replace(b"<p>none</p>", b"<p>" + b"n" * 300 + b"</p>"),
     "p is longer than 255 characters"),
])
def test_broken_input_gets_a_clear_reason(data, reason):
    with pytest.raises(DMARCError, match=reason.replace("(", r"\(")):
        parse_aggregate(data)


def test_an_oversized_plain_report_is_refused():
    with pytest.raises(DMARCError, match="larger than the 1024 bytes limit"):
        parse_aggregate(crafted([("192.0.2.1", 1, "pass", "pass")] * 5), max_size=1024)


def xml_peak(data: bytes) -> tuple[object, int]:
    """Parse ``data``: the report (or the DMARCError) and the peak of traced memory."""
    tracemalloc.start()
    try:
        try:
            result: object = parse_aggregate(data)
        except DMARCError as exc:
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_flood_of_elements_is_read_in_memory_that_follows_the_rows():
    """512 KB of empty elements inside <feedback> took ~12 MB as a tree; streamed, they are
    dropped as they close."""
    report = crafted([("192.0.2.1", 3, "pass", "pass")])
    flood = report.replace(b"</feedback>", b"<x/>" * (1 << 17) + b"</feedback>")
    parsed, peak = xml_peak(flood)
    assert isinstance(parsed, AggregateReport) and parsed.messages == 3
    assert peak < 4 << 20, peak  # the tree took 11.7 MB
    versions = report.replace(b"</feedback>", b"<version/>" * (1 << 16) + b"</feedback>")
    parsed, peak = xml_peak(versions)  # the elements the report keeps: only the first
    assert isinstance(parsed, AggregateReport) and parsed.version == "1.0"
    assert peak < 4 << 20, peak


def test_one_stuffed_record_and_deep_nesting_are_refused():
    stuffed = crafted([("192.0.2.1", 1, "pass", "pass")]).replace(
        b"</row>", b"<x/>" * 5000 + b"</row>")
    with pytest.raises(DMARCError, match="more than 2000 elements in one <record>"):
        parse_aggregate(stuffed)
    with pytest.raises(DMARCError, match="nested deeper than 32"):
        parse_aggregate(b"<feedback>" + b"<x>" * 100_000)


def test_a_flood_of_unclosed_feedback_tags_is_read_once():
    """The old fallback for an unclosed wrapper searched the bytes for <feedback>...</feedback>
    from every <feedback: quadratic (10 s for 32,000 tags, days for a 32 MB report). The
    stream finds the first <feedback> and stops when it closes."""
    flat = b"<wrapper>" + b'<feedback a="1"/>' * 20_000
    with pytest.raises(DMARCError, match="report_metadata or policy_published is missing"):
        parse_aggregate(flat)
    nested = b"<wrapper>" + b"<feedback>" * 20_000
    with pytest.raises(DMARCError, match="nested deeper than 32"):
        parse_aggregate(nested)


@pytest.mark.parametrize("encoding", ["Shift_JIS", "EUC-JP", "GB2312", "windows-1252"])
def test_encodings_python_reads_are_read(encoding):
    """expat reads UTF-8, UTF-16 and single-byte encodings; a multi-byte one (a Japanese or
    Chinese reporter's) raised ValueError, which the listener answered with a 451."""
    org = "\u65e5\u672c" if encoding != "windows-1252" else "Soci\u00e9t\u00e9 \u2019"
    report = crafted([("192.0.2.1", 4, "pass", "pass")]).decode().replace(
        'encoding="UTF-8"', f'encoding="{encoding}"').replace("<org_name>mail.example",
                                                             f"<org_name>{org}")
    parsed = parse_aggregate(report.encode(encoding))
    assert (parsed.org_name, parsed.messages) == (org, 4)


def test_an_encoding_nobody_reads_is_refused_with_its_name():
    report = crafted([]).replace(b'encoding="UTF-8"', b'encoding="x-mac-klingon"')
    with pytest.raises(DMARCError, match="unreadable encoding 'x-mac-klingon'"):
        parse_aggregate(report)


def test_a_mail_nesting_its_parts_too_deep_is_refused():
    """email's parser recurses: 3,000 nested multiparts (170 KB) raised RecursionError."""
    nested = "".join(f"--b{i}\r\nContent-Type: multipart/mixed; boundary=b{i + 1}\r\n\r\n"
                     for i in range(3000))
    mail = ("From: a@mail.example\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/mixed; boundary=b0\r\n\r\n" + nested).encode()
    with pytest.raises(DMARCError, match="nests its MIME parts too deep"):
        parse_aggregate(mail)


def test_bytes_after_the_report_and_utf16_are_tolerated():
    report = crafted([("192.0.2.1", 2, "pass", "pass")])
    assert parse_aggregate(report + b"\r\n-- \r\ntrailer <junk").messages == 2
    utf16 = report.decode().replace('encoding="UTF-8"', 'encoding="UTF-16"').encode("utf-16")
    assert parse_aggregate(utf16).messages == 2
    assert parse_aggregate(gzip.compress(utf16)).messages == 2


# -- the split ----------------------------------------------------------------------------------

SPLIT = [("127.0.0.30", 500, "pass", "pass"),    # our bulk pool, aligned
         ("127.0.0.20", 100, "fail", "pass"),    # our critical pool: DKIM not aligned
         ("198.51.100.7", 40, "pass", "fail"),   # forwarded: the signature survived
         ("198.51.100.8", 10, "pass", "fail"),
         ("192.0.2.5", 20, "fail", "pass"),      # another system in the SPF record
         ("203.0.113.9", 150, "fail", "fail"),   # nobody we know
         ("203.0.113.10", 5, "fail", "fail")]
POOL_IPS = {"127.0.0.30": "bulk", "127.0.0.20": "critical"}


def test_the_split_into_pools_forwarders_authorised_and_unknown():
    report = parse_aggregate(crafted(SPLIT))
    rows = [(r.header_from, r.source_ip, r.dkim_aligned, r.spf_aligned, r.count)
            for r in report.rows]
    summary = summarise(rows, POOL_IPS)
    (dom,) = summary["domains"]
    assert dom["messages"] == 825
    assert {g: v["messages"] for g, v in dom["groups"].items()} == {
        "pools": 600, "forwarders": 50, "authorised": 20, "unknown": 155}
    assert dom["pass_rate"] == round(670 / 825, 6)
    assert [s["source_ip"] for s in dom["groups"]["forwarders"]["top"]] == [
        "198.51.100.7", "198.51.100.8"]
    assert [s["source_ip"] for s in dom["groups"]["unknown"]["top"]] == [
        "203.0.113.9", "203.0.113.10"]
    assert dom["groups"]["pools"]["top"][0] == {
        "source_ip": "127.0.0.30", "pool": "bulk", "messages": 500, "dkim_aligned": 500,
        "spf_aligned": 500}
    pools = {p["pool"]: p for p in summary["pools"]}
    assert pools["bulk"]["dkim_rate"] == 1.0 and pools["critical"]["dkim_rate"] == 0.0
    assert pools["critical"]["pass_rate"] == 1.0  # SPF aligned: DMARC passes all the same


def test_an_ipv4_mapped_source_ip_is_our_pool_ip(tmp_path):
    """Reporters that store addresses as IPv6 write our IPv4 pool address as ``::ffff:…``: the
    daily review put our own mail with the unknown senders (spoofing) and left the pool out."""
    cfg = _write_config(tmp_path, RUA)
    path = tmp_path / "mapped.xml"
    path.write_bytes(crafted([("::ffff:127.0.0.30", 500, "pass", "pass"),
                              ("::FFFF:7f00:14", 100, "fail", "pass"),
                              ("203.0.113.9", 3, "fail", "fail")]))
    assert runner.invoke(app, ["dmarc", "import", "-c", str(cfg), str(path)]).exit_code == 0
    out = runner.invoke(app, ["dmarc", "report", "-c", str(cfg), "--days", "3660", "--json"])
    (dom,) = json.loads(out.stdout)["domains"]
    assert {g: v["messages"] for g, v in dom["groups"].items()} == {
        "pools": 600, "forwarders": 0, "authorised": 0, "unknown": 3}
    assert [(s["source_ip"], s["pool"]) for s in dom["groups"]["pools"]["top"]] == [
        ("127.0.0.30", "bulk"), ("127.0.0.20", "critical")]


def test_report_for_one_domain_counts_the_reports_about_it(tmp_path):
    """``dmarc report --domain D`` said "N reports" counting every domain's reports: with a
    typo in D it read "17 reports" over an empty review, as if they had nothing to say."""
    cfg = _write_config(tmp_path, RUA + 'domains = ["other.test"]\n')
    for i, domain in enumerate(("insurer.test", "other.test", "other.test")):
        path = tmp_path / f"{i}.xml"
        path.write_bytes(crafted(SPLIT[:2], report_id=f"r-{i}", domain=domain))
        assert runner.invoke(app, ["dmarc", "import", "-c", str(cfg), str(path)]).exit_code == 0

    def reports(*args: str) -> int:
        out = runner.invoke(app, ["dmarc", "report", "-c", str(cfg), "--days", "3660",
                                  "--json", *args])
        return json.loads(out.stdout)["reports"]

    assert reports() == 3
    assert reports("--domain", "INSURER.test") == 1
    assert reports("--domain", "other.test") == 2
    assert reports("--domain", "insurer.tset") == 0
    text = runner.invoke(app, ["dmarc", "report", "-c", str(cfg), "--days", "3660",
                               "--domain", "insurer.tset"])
    assert text.stdout.startswith("0 reports about insurer.tset in the last 3660 days")


def test_report_text_escapes_control_characters_a_reporter_wrote(tmp_path):
    """Anyone can mail the rua address; XML carries C1 controls (``&#x9b;`` is CSI to a
    terminal) and line separators: ``dmarc report`` printed the header From domain raw."""
    cfg = _write_config(tmp_path, RUA)
    path = tmp_path / "c1.xml"  # about our insurer.test; a row's header From is the reporter's
    path.write_bytes(crafted(SPLIT[:1], domain="evil&#x9b;2J&#x2028;.test").replace(
        b"<policy_published><domain>evil&#x9b;2J&#x2028;.test",
        b"<policy_published><domain>insurer.test"))
    assert runner.invoke(app, ["dmarc", "import", "-c", str(cfg), str(path)]).exit_code == 0
    out = runner.invoke(app, ["dmarc", "report", "-c", str(cfg), "--days", "3660"]).stdout
    assert "\x9b" not in out and "\u2028" not in out
    assert "evil\\x9b2j\\u2028.test: 500 messages" in out  # stored in lower case


class CountingDomain(str):
    """A header From domain that counts how often it is compared."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        CountingDomain.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_the_split_costs_its_rows_not_domains_times_sources():
    """Anyone may mail the rua address a report naming thousands of header From domains: the
    top sources were found by scanning every source for every domain (2,000 domains: 15 s)."""
    rows = [(CountingDomain(f"d{i}.example"), f"192.0.2.{i % 250}", False, False, 1)
            for i in range(1000)]
    CountingDomain.compared = 0
    summary = summarise(rows, {})
    assert len(summary["domains"]) == 1000
    assert summary["domains"][0]["groups"]["unknown"]["top"][0]["source_ip"] == "192.0.2.0"
    assert CountingDomain.compared < 10 * len(rows), CountingDomain.compared


# -- the store ----------------------------------------------------------------------------------

def _store_contract(store: ReputationStore) -> None:
    report = parse_aggregate(crafted(SPLIT))
    assert store.add_report(report, "test", 1.0) is True
    assert store.add_report(report, "test again", 2.0) is False  # reporter + report id
    other = parse_aggregate(crafted(SPLIT[:1], org="other.example"))  # same id, other reporter
    assert store.add_report(other, "test", 3.0) is True
    assert store.dmarc_report_count(0) == 2
    rows = store.dmarc_sources(0, "insurer.test")
    assert sum(r[4] for r in rows) == 825 + 500
    assert store.dmarc_sources(4_000_000_001) == []  # reports that ended earlier
    store.record_import("snds", 10.0, "", 3)
    store.record_import("snds", 20.0, "SNDS unreachable", 0)
    assert store.imports()["snds"] == {"last_attempt": 20.0, "last_success": 10.0,
                                       "last_error": "SNDS unreachable", "rows": 3}
    store.add_review("gmail", "ops", "ok", 100.0)
    store.add_review("gmail", "ops2", "lowered", 200.0)
    assert store.last_reviews() == {"gmail": {"reviewed_at": 200.0, "reviewer": "ops2",
                                              "note": "lowered"}}


def test_a_report_dated_in_the_future_ages_out(tmp_path):
    """Anyone can mail the rua address a report "ending" in 2096: it stayed in every window, its
    unknown senders alerting, until someone edited the database."""
    store = ReputationStore(tmp_path / "rep.sqlite3")
    try:
        assert store.add_report(parse_aggregate(crafted(SPLIT, end=4_000_000_000)), "t", 1000.0)
        assert sum(r[4] for r in store.dmarc_sources(999)) == 825
        assert store.dmarc_sources(1001) == [] and store.dmarc_report_count(1001) == 0
    finally:
        store.close()


def test_reports_stored_before_dated_in_the_future_are_brought_back(tmp_path, monkeypatch):
    """Migration 2: what version 1 stored as ending in 2096 ends when it arrived."""
    import postlane.reputation.store as store_module

    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:1])
    old = ReputationStore(tmp_path / "rep.sqlite3")
    report = parse_aggregate(crafted(SPLIT, end=4_000_000_000))
    with old._tx() as conn:  # as version 1 wrote it
        old._exec(conn, "INSERT INTO dmarc_reports VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                  (report.reporter, report.report_id, "", "", report.policy_domain,
                   report.begin, report.end, "{}", "", 7, 825, "t", 1000.0))
        for i, r in enumerate(report.rows):
            old._exec(conn, "INSERT INTO dmarc_rows VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                      (report.reporter, report.report_id, i, report.end, r.source_ip, r.count,
                       "none", 1, 1, r.header_from, "", "", "[]", "[]", "[]"))
    assert old.dmarc_report_count(1001) == 1
    old.close()
    monkeypatch.undo()
    new = ReputationStore(tmp_path / "rep.sqlite3")
    try:
        assert new.dmarc_report_count(1001) == 0 and new.dmarc_sources(1001) == []
        assert sum(r[4] for r in new.dmarc_sources(1000)) == 825
    finally:
        new.close()


def test_store_on_sqlite(tmp_path):
    store = ReputationStore(tmp_path / "rep.sqlite3")
    try:
        _store_contract(store)
    finally:
        store.close()
    again = ReputationStore(tmp_path / "rep.sqlite3")  # reopened: migrations are idempotent
    assert again.dmarc_report_count(0) == 2
    again.close()


async def test_store_on_postgresql_in_the_cluster_schema(tmp_path, pg_schema):
    cfg = parse_config(config_text(tmp_path, 2525).replace(
        f'spool = "{tmp_path}/spool"', f'spool = "{PG_DSN}"') +
        f'[cluster]\nschema_name = "{pg_schema}"\n')
    store = open_store(cfg)  # node.spool is a DSN: the same database and schema
    try:
        assert store.pg and store.schema == pg_schema
        _store_contract(store)
        twin = open_store(cfg)  # a second node of the cluster sees the same reports
        assert twin.add_report(parse_aggregate(crafted(SPLIT)), "node 2", 5.0) is False
        twin.close()
    finally:
        store.close()


RUA = '[reputation.dmarc]\naddresses = ["dmarc-rua@insurer.test"]\n'
"""The rua address: also makes insurer.test (its domain) one of the node's."""


# -- the CLI ------------------------------------------------------------------------------------

def _write_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "postlane.toml"
    path.write_text(config_text(tmp_path, 2525, extra))
    return path


def test_cli_import_deduplicates_and_report_splits(tmp_path):
    cfg = _write_config(tmp_path, RUA)  # insurer.test is ours
    files = []
    for i, (name, data) in enumerate([("a.xml", crafted(SPLIT)),
                                      ("a.xml.gz", gzip.compress(crafted(SPLIT))),
                                      ("b.zip", None), ("bomb.xml.gz", _gzip_bomb(64 << 20))]):
        if data is None:
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
                zf.writestr("b.xml", crafted(SPLIT[2:4], report_id="r-2"))
            data = buf.getvalue()
        files.append(tmp_path / f"{i}-{name}")
        files[-1].write_bytes(data)
    result = runner.invoke(app, ["dmarc", "import", "-c", str(cfg), *map(str, files)])
    assert result.exit_code == 1, result.output  # the bomb
    lines = result.stdout.splitlines()
    assert "stored (mail.example r-1, 7 records, 825 messages)" in lines[0]
    assert "already stored, skipped" in lines[1]
    assert "stored (mail.example r-2, 2 records, 50 messages)" in lines[2]
    assert "refused: gzip data expands beyond the 32 MB limit" in lines[3]
    out = runner.invoke(app, ["dmarc", "report", "-c", str(cfg), "--days", "3660", "--json"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout)
    assert summary["reports"] == 2
    (dom,) = summary["domains"]
    assert dom["groups"]["forwarders"]["messages"] == 100
    assert dom["groups"]["unknown"]["messages"] == 155
    text = runner.invoke(app, ["dmarc", "report", "-c", str(cfg), "--days", "3660",
                               "--domain", "insurer.test"])
    assert "forwarders" in text.stdout and "198.51.100.7" in text.stdout
    assert "(pool bulk)" in text.stdout


@pytest.mark.parametrize("days", ["inf", "1e300", "nan", "0"])
def test_cli_report_refuses_impossible_periods(tmp_path, days):
    """``--days inf`` and ``--days 1e300`` ended in a traceback (OverflowError)."""
    cfg = _write_config(tmp_path)
    result = runner.invoke(app, ["dmarc", "report", "-c", str(cfg), "--days", days])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "--days" in result.output


# -- by SMTP to the rua address -----------------------------------------------------------------

def report_mail(attachment: bytes, name: str, ctype: str = "application/gzip") -> bytes:
    msg = EmailMessage()
    msg["From"] = "noreply-dmarc@mail.example"
    msg["To"] = "dmarc-rua@insurer.test"
    msg["Subject"] = "Report domain: insurer.test Submitter: mail.example Report-ID: r-1"
    msg.set_content("This is an aggregate report from mail.example.")
    maintype, subtype = ctype.split("/")
    msg.add_attachment(attachment, maintype=maintype, subtype=subtype, filename=name)
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


async def test_reports_by_smtp_are_stored_exactly_once_and_never_relayed(tmp_path, sink,
                                                                          make_node):
    node = await make_node(config_text(tmp_path, sink.port, RUA).replace(
        "max_message_size = 100000", "max_message_size = 1000000"))  # the bomb's 270 KB
    port = node.listeners[0].port
    mail = report_mail(gzip.compress(crafted(SPLIT)),
                       "mail.example!insurer.test!3999913600!4000000000.xml.gz")
    assert await send(port, "noreply-dmarc@mail.example", ["dmarc-rua@insurer.test"], mail) == {}
    assert await send(port, "noreply-dmarc@mail.example", ["DMARC-RUA@insurer.test"], mail) == {}
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("r2.xml", crafted(SPLIT[5:], report_id="r-2"))
    await send(port, "noreply-dmarc@mail.example", ["dmarc-rua@insurer.test"],
               report_mail(zipped.getvalue(), "r2.zip", "application/zip"))
    # hostile and broken reports: accepted (250), logged, not stored, nothing relayed
    await send(port, "x@mail.example", ["dmarc-rua@insurer.test"],
               report_mail(_gzip_bomb(200 << 20), "bomb.xml.gz"))
    await send(port, "x@mail.example", ["dmarc-rua@insurer.test"],
               report_mail(b"<feedback>&x;</feedback>", "bad.xml", "text/xml"))
    store = node.reputation.store
    assert store.dmarc_report_count(0) == 2
    assert sum(r[4] for r in store.dmarc_sources(0)) == 825 + 155
    view = node.reputation.view["dmarc"]
    assert view["reports"] == 2
    assert {d["domain"]: d["groups"]["unknown"]["messages"] for d in view["domains"]} == {
        "insurer.test": 310}
    assert sink.arrivals == [] and not [r for r in records(tmp_path) if r["type"] == "r"]
    assert node.scheduler.queued() == 0



async def test_a_report_for_a_domain_not_ours_is_answered_250_and_dropped(tmp_path, sink,
                                                                           make_node, caplog):
    """One forged report to the rua address for a domain the node does not send for was stored
    and raised ``dmarc-unknown-senders`` for it (for up to 100 domains). Ours are the
    organisational domains of what the config names: here the DKIM key's mail.insurer.test
    makes reports for insurer.test (its organisation) and news.insurer.test ours."""
    key = tmp_path / "keys" / "mail.insurer.test.pem"
    write_key(key, generate_key("ed25519-sha256"))
    extra = (f'[[dkim.keys]]\ndomain = "mail.insurer.test"\nselector = "s1"\n'
             f'algorithm = "ed25519-sha256"\nkey_file = "{key}"\n'
             '[reputation.dmarc]\naddresses = ["rua@reports.test"]\nunknown_alert = 50\n')
    node = await make_node(config_text(tmp_path, sink.port, extra))
    port = node.listeners[0].port
    now = int(time.time())
    unknown = [("203.0.113.9", 150, "fail", "fail")]
    for domain in ("spoofed.test", "insurer.test", "news.insurer.test"):
        mail = report_mail(crafted(unknown, report_id=f"r-{domain}", domain=domain, end=now),
                           "r.xml", "text/xml")
        assert await send(port, "noreply-dmarc@mail.example", ["rua@reports.test"],
                          mail) == {}  # 250: the reporter did nothing wrong, no retry
    store = node.reputation.store
    assert store.dmarc_report_count(0) == 2
    assert {row[0] for row in store.dmarc_sources(0)} == {"insurer.test", "news.insurer.test"}
    alerts = {c.cls for c in node.reputation.conditions(time.time())
              if c.rule == "dmarc-unknown-senders"}
    assert alerts == {"insurer.test", "news.insurer.test"}
    dropped = [r for r in caplog.records if r.getMessage().startswith("DMARC report for")]
    assert len(dropped) == 1 and getattr(dropped[0], "policy_domain", None) == "spoofed.test"
    token = (tmp_path / "api-token").read_text().strip()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.api.port}",
                                 headers={"Authorization": f"Bearer {token}"}) as api:
        view = (await api.get("/api/v1/reputation")).json()["dmarc"]
        report = (await api.get("/api/v1/dmarc/report", params={"days": 3})).json()
    assert view["reports"] == 2
    assert {d["domain"] for d in view["domains"]} == {"insurer.test", "news.insurer.test"}
    assert {d["domain"] for d in report["domains"]} == {"insurer.test", "news.insurer.test"}
    assert sink.arrivals == [] and node.scheduler.queued() == 0

REAL = Path(__file__).parent / "data" / "dmarc"  # a copy of real reports, see its README


async def test_real_report_mails_by_smtp_are_stored_once_each(tmp_path, sink, make_node):
    """Google's, Mimecast's (a gzip with trailing bytes) and another reporter's real mails, sent
    twice over SMTP to the rua address: three reports, each counted once, nothing relayed. Their
    domains are not the node's own: the operator lists them in ``reputation.dmarc.domains``."""
    node = await make_node(config_text(tmp_path, sink.port, RUA + 'domains = ["borschow.com",'
                                       ' "ab.id.au", "twlnet.com"]\n'))
    port = node.listeners[0].port
    mails = sorted(REAL.glob("*.eml"))
    assert len(mails) == 3
    for _ in range(2):
        for path in mails:
            assert await send(port, "noreply-dmarc@mail.example", ["dmarc-rua@insurer.test"],
                              path.read_bytes()) == {}
    store = node.reputation.store
    assert store.dmarc_report_count(0) == 3
    assert {row[0] for row in store.dmarc_sources(0)} == {"borschow.com", "ab.id.au",
                                                           "twlnet.com"}
    assert sink.arrivals == [] and node.scheduler.queued() == 0


def test_real_report_files_through_the_cli_import(tmp_path):
    """The import path with real xml, gzip, zip and mail files; a second run skips them all;
    the refused file is named with its reason. Their domains are not the node's own: the
    operator lists them in ``reputation.dmarc.domains``."""
    cfg = _write_config(tmp_path, '[reputation.dmarc]\ndomains = ["indemed.com", "borschow.com",'
                        ' "example.de", "example.com", "ab.id.au", "twlnet.com"]\n')
    files = sorted(map(str, REAL.iterdir()))
    files.remove(str(REAL / "README.md"))
    first = runner.invoke(app, ["dmarc", "import", "-c", str(cfg), "--json", *files])
    assert first.exit_code == 1  # invalid_utf_8.xml
    lines = [json.loads(line) for line in first.stdout.splitlines()]
    refused = [line for line in lines if not line["ok"]]
    assert [Path(line["file"]).name for line in refused] == ["invalid_utf_8.xml"]
    assert refused[0]["error"].startswith("not valid UTF-8: byte 0x91")
    assert all(line["stored"] for line in lines if line["ok"]) and len(lines) == 8
    again = runner.invoke(app, ["dmarc", "import", "-c", str(cfg), "--json", *files])
    assert not [line for line in map(json.loads, again.stdout.splitlines())
                if line["ok"] and line["stored"]]
    store = open_store(parse_config(cfg.read_text()))
    try:
        assert store.dmarc_report_count(0) == 7
    finally:
        store.close()


async def test_impossible_counts_and_encodings_are_answered_250_not_451(tmp_path, sink,
                                                                          make_node):
    """``<count>1e400</count>`` raised OverflowError, which the listener took for a store
    failure: 451, and the reporter would resend it for days."""
    node = await make_node(config_text(tmp_path, sink.port, RUA))
    bad = crafted([("192.0.2.1", 1, "pass", "pass")]).replace(b"<count>1</count>",
                                                             b"<count>1e400</count>")
    assert await send(node.listeners[0].port, "x@mail.example", ["dmarc-rua@insurer.test"],
                      report_mail(bad, "r.xml", "text/xml")) == {}
    # an encoding expat cannot read raised LookupError: 451 as well
    unknown = crafted([]).replace(b'encoding="UTF-8"', b'encoding="x-mac-klingon"')
    assert await send(node.listeners[0].port, "x@mail.example", ["dmarc-rua@insurer.test"],
                      report_mail(unknown, "r.xml", "text/xml")) == {}
    assert node.reputation.store.dmarc_report_count(0) == 0


async def test_a_parser_failure_is_not_a_store_failure(tmp_path, sink, make_node, monkeypatch,
                                                        caplog):
    """Whatever else the parser may raise (a bug: RecursionError, KeyError) is logged and the
    report dropped with a 250; only the store failing gives a 451, which a resend can cure."""
    node = await make_node(config_text(tmp_path, sink.port, RUA))

    def broken(data, max_size):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(reputation_service, "parse_aggregate", broken)
    assert await send(node.listeners[0].port, "x@mail.example", ["dmarc-rua@insurer.test"],
                      report_mail(crafted([]), "r.xml", "text/xml")) == {}
    assert "DMARC report parser failed" in caplog.text
    assert node.reputation.store.dmarc_report_count(0) == 0


async def test_a_mail_to_rua_and_a_customer_delivers_only_the_customer_copy(tmp_path, sink,
                                                                             make_node):
    node = await make_node(config_text(tmp_path, sink.port, RUA))
    mail = report_mail(crafted(SPLIT[:1]), "r.xml", "text/xml")
    await send(node.listeners[0].port, "s@insurer.test",
               ["dmarc-rua@insurer.test", "someone@example.com"], mail)
    await sink.wait_for(1)
    assert [m.rcpts for m in sink.arrivals] == [["someone@example.com"]]
    assert node.reputation.store.dmarc_report_count(0) == 1


def test_gzip_with_trailing_bytes_and_two_members():
    xml = crafted(SPLIT[:1])
    assert parse_aggregate(gzip.compress(xml) + b"\r\n").messages == 500
    half = len(xml) // 2
    assert parse_aggregate(gzip.compress(xml[:half]) + gzip.compress(xml[half:])).messages == 500
    raw = zlib.compress(xml)  # zlib, not gzip: refused clearly, not misread
    with pytest.raises(DMARCError, match="not a DMARC report"):
        parse_aggregate(raw)


# -- one report once, whoever receives it, and no report suppressed by a forgery ----------------

async def test_a_report_sent_again_after_a_restart_is_counted_once(tmp_path, sink, make_node):
    """The reporter did not see our 250 and sends the report again, to the node restarted in
    between: the store decides, not the node's memory."""
    text = config_text(tmp_path, sink.port, RUA)
    mail = report_mail(crafted(SPLIT[:2]), "r.xml", "text/xml")
    first = await make_node(text)
    assert await send(first.listeners[0].port, "x@mail.example", ["dmarc-rua@insurer.test"],
                      mail) == {}
    await first.stop()
    again = await make_node(text)
    assert await send(again.listeners[0].port, "x@mail.example", ["dmarc-rua@insurer.test"],
                      mail) == {}
    assert again.reputation.store.dmarc_report_count(0) == 1
    assert again.reputation.view["dmarc"]["reports"] == 1
    assert sum(r[4] for r in again.reputation.store.dmarc_sources(0)) == 600


async def test_a_report_that_reaches_two_nodes_of_a_cluster_is_counted_once(tmp_path, sink,
                                                                            pg_schema):
    from tests.test_cluster import cluster_text, start_node

    nodes = [await start_node(cluster_text(tmp_path, sink.port, pg_schema, name, RUA))
             for name in ("a", "b")]
    try:
        mail = report_mail(crafted(SPLIT[:2]), "r.xml", "text/xml")
        for node in nodes:
            assert await send(node.listeners[0].port, "x@mail.example",
                              ["dmarc-rua@insurer.test"], mail) == {}
        for node in nodes:
            await node.reputation.refresh()
            assert node.reputation.view["dmarc"]["reports"] == 1
            assert sum(r[4] for r in node.reputation.store.dmarc_sources(0)) == 600
    finally:
        for node in nodes:
            await node.stop()


async def test_a_forged_report_reusing_a_real_report_id_suppresses_nothing(tmp_path, sink,
                                                                           make_node, caplog):
    """Anyone can mail the rua address. A forger who guesses the id Google will give its next
    report (they are sequential numbers) sends one first, under Google's name: the genuine report
    was then "already stored" and dropped, its figures replaced by the forger's. The key is the
    reporter's name, its address and the report id; a report with the same key and other
    content is kept beside the first and both are flagged as conflicting."""
    node = await make_node(config_text(tmp_path, sink.port, RUA))
    port = node.listeners[0].port
    genuine = crafted(SPLIT[:2], report_id="17")  # 600 messages from our pools
    other_address = crafted([("203.0.113.9", 9000, "fail", "fail")], report_id="17").replace(
        b"<email>dmarc@mail.example</email>", b"<email>dmarc@forger.test</email>")
    same_address = crafted([("203.0.113.9", 7000, "fail", "fail")], report_id="17")
    for data in (other_address, same_address, genuine, genuine):
        assert await send(port, "x@mail.example", ["dmarc-rua@insurer.test"],
                          report_mail(data, "r.xml", "text/xml")) == {}
    store = node.reputation.store
    assert store.dmarc_report_count(0) == 3  # the genuine one once, beside both forgeries
    figures = {ip: n for _, ip, _, _, n in store.dmarc_sources(0)}
    assert figures == {"127.0.0.30": 500, "127.0.0.20": 100, "203.0.113.9": 16000}
    assert store.dmarc_conflicts(0) == 2  # same reporter, address and id, other content
    assert node.reputation.view["dmarc"]["conflicting_reports"] == 2
    assert "DMARC report conflicts with one stored" in caplog.text
    result = runner.invoke(app, ["dmarc", "report", "-c", str(_write_config(tmp_path, RUA)),
                                 "--days", "3660", "--json"])
    assert json.loads(result.stdout)["conflicting_reports"] == 2, result.output


def _resent_after_migration_3(location: str, schema: str, monkeypatch) -> None:
    """Reports stored at schema 2 have no digest: one sent again after the upgrade is the
    same report (as it was), one from another address is not. Migration 3 rebuilds the tables
    on both backends."""
    from postlane.reputation import store as store_module

    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:2])
    old = ReputationStore(location, schema)
    report = parse_aggregate(crafted(SPLIT[:1]))
    with old._tx() as conn:
        old._exec(conn, "INSERT INTO dmarc_reports VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                  (report.reporter, report.report_id, report.org_name, report.email,
                   report.policy_domain, 1, 2, "{}", "1.0", 1, 500, "smtp:", 3.0))
        old._exec(conn, "INSERT INTO dmarc_rows VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                  (report.reporter, report.report_id, 0, 2, "127.0.0.30", 500, "none", 1, 1,
                   "insurer.test", "insurer.test", "", "[]", "[]", "[]"))
    old.close()
    monkeypatch.undo()
    store = ReputationStore(location, schema)
    try:
        assert store.store_report(report, "again", 10.0) == "duplicate"
        other = parse_aggregate(crafted(SPLIT[:1]).replace(b"dmarc@mail.example",
                                                             b"dmarc@forger.test"))
        assert store.store_report(other, "forged", 10.0) == "stored"
        assert store.dmarc_report_count(0) == 2 and store.dmarc_conflicts(0) == 0
        assert sum(r[4] for r in store.dmarc_sources(0)) == 1000
    finally:
        store.close()


def test_a_report_stored_before_the_digest_is_still_a_duplicate_when_resent(tmp_path,
                                                                             monkeypatch):
    _resent_after_migration_3(str(tmp_path / "rep.sqlite3"), "postlane", monkeypatch)


async def test_the_same_after_migration_3_on_postgresql(pg_schema, monkeypatch):
    _resent_after_migration_3(PG_DSN, pg_schema, monkeypatch)


def test_cli_import_leaves_out_reports_for_domains_not_ours_and_counts_them(tmp_path):
    """``postlane dmarc import`` stored every file, a report about someone else's domain as if
    it were ours (its unknown senders alerting for that domain); the SMTP intake drops those.
    The import now keeps the same rule, says so per file and counts them."""
    cfg = _write_config(tmp_path, RUA)  # insurer.test is ours: the rua address's domain
    files = []
    for name, domain in (("ours.xml", "insurer.test"), ("sub.xml", "news.insurer.test"),
                         ("foreign.xml", "spoofed.test")):
        files.append(tmp_path / name)
        files[-1].write_bytes(crafted(SPLIT[5:6], report_id=f"r-{domain}", domain=domain))
    result = runner.invoke(app, ["dmarc", "import", "-c", str(cfg), *map(str, files)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "foreign.xml: not ours, skipped: the policy domain spoofed.test is not one of" \
           " this node's" in lines[2]
    assert lines[-1] == "2 stored, 0 already stored, 1 not ours (skipped), 0 refused"
    as_json = runner.invoke(app, ["dmarc", "import", "-c", str(cfg), "--json", str(files[2])])
    (line,) = map(json.loads, as_json.stdout.splitlines())
    assert line["not_ours"] is True and line["policy_domain"] == "spoofed.test"
    store = open_store(parse_config(cfg.read_text()))
    try:
        assert store.dmarc_report_count(0) == 2
        assert {row[0] for row in store.dmarc_sources(0)} == {"insurer.test",
                                                               "news.insurer.test"}
    finally:
        store.close()


# -- posted to the API ----------------------------------------------------------------------------

async def test_a_report_posted_to_feedback_reports_reaches_the_dmarc_store(tmp_path, sink,
                                                                           make_node):
    """``POST /api/v1/feedback/reports`` parsed every body as a bounce or ARF report: an
    aggregate report posted there (a provider's webhook, an operator) was answered 200 and
    never stored. It goes where mail to the rua address goes, with the same own-domains
    filter, and the answer says what happened."""
    from tests.test_api import api_client

    node = await make_node(config_text(tmp_path, sink.port, RUA))
    now = int(time.time())
    mail = report_mail(gzip.compress(crafted(SPLIT, end=now)), "r.xml.gz")
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("r2.xml", crafted(SPLIT[:2], report_id="r-2", end=now))
    async with api_client(node, tmp_path) as api:
        resp = await api.post("/api/v1/feedback/reports", content=mail)
        assert resp.status_code == 200, resp.text
        got = resp.json()
        assert (got["kind"], got["outcome"], got["report_id"], got["policy_domain"]) == (
            "dmarc", "stored", "r-1", "insurer.test"), got
        resp = await api.post("/api/v1/feedback/reports", content=mail)
        assert (resp.status_code, resp.json()["outcome"]) == (200, "already stored")
        resp = await api.post("/api/v1/feedback/reports", content=zipped.getvalue())
        assert (resp.status_code, resp.json()["outcome"]) == (200, "stored"), resp.text
        resp = await api.post("/api/v1/feedback/reports",
                              content=crafted(SPLIT[:1], report_id="r-3", domain="spoofed.test",
                                              end=now))
        assert resp.status_code == 422 and "spoofed.test" in resp.text, resp.text
        assert "not one of this node's" in resp.text
        resp = await api.post("/api/v1/feedback/reports", content=b"<feedback>&x;</feedback>")
        assert resp.status_code == 422 and "DMARC" in resp.text, resp.text
        view = (await api.get("/api/v1/reputation")).json()["dmarc"]
    store = node.reputation.store
    assert store.dmarc_report_count(0) == 2
    assert {row[0] for row in store.dmarc_sources(0)} == {"insurer.test"}
    assert view["reports"] == 2
    assert not [r for r in records(tmp_path) if r["type"] in ("rb", "f")]
