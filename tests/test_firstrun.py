"""First run: ``postlane init`` writes a node that serves and signs as written, and ``postlane dns
check`` judges a published zone (the loopback DNS server, with good and broken records)."""

from __future__ import annotations

import re
import stat

import dns.message
import dns.name
import dns.reversename
import pytest
from typer.testing import CliRunner

from postlane.admin.dnsrecords import expected
from postlane.cli import app
from postlane.startup import load_config
from tests.conftest import send

runner = CliRunner()
IPS = ["127.0.0.50", "127.0.0.51", "127.0.0.52", "127.0.0.53", "127.0.0.54"]


def _init(tmp_path, *extra: str):
    result = runner.invoke(app, ["init", str(tmp_path / "node"), "--hostname", "mta.example",
                                 "--domain", "insurer.example", *[a for ip in IPS
                                                                  for a in ("--ip", ip)],
                                 "--listen", "127.0.0.1:0", "--inbound", "127.0.0.1:0",
                                 "--api", "127.0.0.1:0", *extra])
    assert result.exit_code == 0, result.output
    return result.output


def test_init_writes_a_valid_node_with_private_secrets_and_prints_the_checklist(tmp_path):
    out = _init(tmp_path)
    node = tmp_path / "node"
    cfg = load_config(node / "postlane.toml")
    assert list(cfg.classes) == ["policy-documents", "claims", "payment-receipts", "marketing"]
    assert cfg.pools["trans-critical-pool"].pausable is False
    # five IPs dealt to four pools: the critical pool gets the fifth
    assert [ip.address for ip in cfg.pools["trans-critical-pool"].ips] == IPS[0::4]
    assert cfg.pools["admin-pool"].ips[0].ehlo == "news1.news.insurer.example"
    for secret in ("api-token", "tls/key.pem", *(f"keys/{k.rpartition('/')[2]}"
                                                 for k in (k.key_file for k in cfg.dkim.keys))):
        assert stat.S_IMODE((node / secret).stat().st_mode) == 0o600, secret
    assert stat.S_IMODE((node / "keys").stat().st_mode) == 0o700
    assert "# The case study: four traffic classes" in (node / "postlane.toml").read_text()
    # the config may come to hold a PostgreSQL DSN with its password: the node's user and
    # group only (0644 before; `restore` writes it 0640 too)
    assert stat.S_IMODE((node / "postlane.toml").stat().st_mode) == 0o640
    # the checklist: PTR per IP, SPF with every pool IP, DMARC rua at our own address, MX ...
    assert re.search(r"50\.0\.0\.127\.in-addr\.arpa\.\s+IN PTR\s+tx1\.insurer\.example\.", out)
    assert re.search(r"bounces\.insurer\.example\.\s+IN TXT\s+\"v=spf1 ip4:127\.0\.0\.50 "
                     r"ip4:127\.0\.0\.54 ip4:127\.0\.0\.51 ip4:127\.0\.0\.52 -all\"", out)
    assert "rua=mailto:dmarc@feedback.insurer.example" in out
    assert re.search(r"feedback\.insurer\.example\.\s+IN MX\s+10 mta\.example\.", out)
    assert "_mta-sts.bounces.insurer.example." in out and "v=TLSRPTv1" in out
    assert re.search(r"\d{4}q[1-4]\._domainkey\.insurer\.example\.\s+IN TXT\s+\"v=DKIM1;",
                     out)


def test_init_and_checklist_answer_in_json(tmp_path):
    import json

    result = runner.invoke(app, ["init", str(tmp_path / "n"), "--hostname", "mta.example",
                                 "--domain", "insurer.example", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["config"].endswith("postlane.toml") and len(data["files"]) == 6
    listed = runner.invoke(app, ["dns", "checklist", "-c", data["config"], "--json"])
    assert json.loads(listed.stdout)["records"] == data["dns"]


def test_init_refuses_a_folder_in_use_and_bad_options(tmp_path):
    _init(tmp_path)
    again = runner.invoke(app, ["init", str(tmp_path / "node"), "--hostname", "m.example",
                                "--domain", "insurer.example"])
    assert again.exit_code == 2 and "not empty" in again.output
    few = runner.invoke(app, ["init", str(tmp_path / "n2"), "--hostname", "m.example",
                              "--domain", "insurer.example", "--ip", "127.0.0.9"])
    assert few.exit_code == 2 and "at least 4" in few.output
    assert not (tmp_path / "n2").exists()  # nothing written for bad options
    bad = runner.invoke(app, ["init", str(tmp_path / "n3"), "--hostname", "m.example",
                              "--domain", "insurer.example", "--listen", "localhost"])
    assert bad.exit_code == 2 and "--listen" in bad.output


async def test_a_node_from_init_delivers_signed_mail_through_its_smarthost(tmp_path, sink,
                                                                           make_node):
    from postlane.node import Node

    _init(tmp_path, "--smarthost", f"127.0.0.1:{sink.port}")
    cfg = load_config(tmp_path / "node" / "postlane.toml")
    node = Node(cfg)
    await node.start()
    try:
        msg = (b"From: notices@insurer.example\r\nTo: anna@example.com\r\nSubject: renewal\r\n"
               b"X-Postlane-Class: policy-documents\r\n\r\nDear Anna\r\n")
        await send(node.listeners[0].port, "notices@insurer.example", ["anna@example.com"], msg)
        arrival = (await sink.wait_for(1, timeout=20))[0]
    finally:
        await node.stop()
    assert arrival.data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
    assert b" d=insurer.example;" in arrival.data
    assert arrival.mail_from.endswith("@bounces.insurer.example")  # VERP on the bounce domain
    assert arrival.peer == "127.0.0.50"


async def test_a_first_run_refuses_mail_without_a_class_and_its_config_says_how_to_give_one(
        tmp_path, sink):
    """The decision for a first run (docs/configuration.md, *Mail without a class*): a plain
    client's message with no X-Postlane-Class is refused with "no traffic class", never put in
    a class by guess; the written config shows the one line that gives the submission
    listener's unclassified mail a class, and with that line uncommented the same message is
    delivered in that class. (The config said "refused" but not how to choose otherwise.)"""
    import smtplib

    from postlane.node import Node

    _init(tmp_path, "--smarthost", f"127.0.0.1:{sink.port}")
    path = tmp_path / "node" / "postlane.toml"
    msg = (b"From: notices@insurer.example\r\nTo: anna@example.com\r\nSubject: plain\r\n"
           b"\r\nfrom a client that sets no class\r\n")

    async def submit(cfg_path) -> None:
        node = Node(load_config(cfg_path))
        await node.start()
        try:
            await send(node.listeners[0].port, "notices@insurer.example", ["anna@example.com"],
                       msg)
        finally:
            await node.stop()

    with pytest.raises(smtplib.SMTPDataError) as refused:
        await submit(path)
    assert refused.value.smtp_code == 550 and b"no traffic class" in refused.value.smtp_error
    text = path.read_text()
    line = '# default_class = "payment-receipts"'
    assert line in text.split("[listeners.inbound]")[0].split("[listeners.submission]")[1]
    path.write_text(text.replace(line, line[2:]))
    await submit(path)
    arrival = (await sink.wait_for(1, timeout=20))[0]
    assert b"Subject: plain" in arrival.data
    acct = "\n".join(p.read_text() for p in (tmp_path / "node" / "var" / "accounting")
                     .glob("acct-*.csv"))
    assert ",payment-receipts," in acct


def _publish(server, cfg, *, skip=(), replace=None) -> None:
    """Put the expected records into the loopback zone, leaving out or replacing some."""
    replace = replace or {}
    for rec in expected(cfg):
        key = (rec.name, rec.rtype)
        if key in skip:
            continue
        value = replace.get(key, rec.value)
        if rec.rtype in ("A", "AAAA"):
            server.add_a(rec.name, value)
        elif rec.rtype == "PTR":
            server.add_ptr(dns.reversename.to_address(dns.name.from_text(rec.name)), value)
        elif rec.rtype == "MX":
            pref, host = value.split()
            server.add_mx(rec.name, int(pref), host)
        else:
            server.add_txt(rec.name, "".join(re.findall(r'"([^"]*)"', value)))


def _check(tmp_path, server) -> tuple[int, dict]:
    import json

    result = runner.invoke(app, ["dns", "check", "-c", str(tmp_path / "node" / "postlane.toml"),
                                 "--nameserver", f"127.0.0.1:{server.port}", "--json"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    data = json.loads(result.output)
    return result.exit_code, {(r["name"], r["type"]): r for r in data["records"]}


def test_dns_check_passes_a_good_zone(tmp_path, dns_server):
    _init(tmp_path)
    cfg = load_config(tmp_path / "node" / "postlane.toml")
    _publish(dns_server, cfg)
    code, records = _check(tmp_path, dns_server)
    assert code == 0, [r for r in records.values() if r["status"] != "ok"]
    kinds = {r["kind"] for r in records.values()}
    assert kinds == {"a", "ptr", "spf", "dkim", "dmarc", "mx", "mta-sts", "tlsrpt"}


def test_dns_check_names_what_is_missing_or_wrong(tmp_path, dns_server):
    _init(tmp_path)
    cfg = load_config(tmp_path / "node" / "postlane.toml")
    selector = cfg.dkim.keys[0].selector
    dkim_name = f"{selector}._domainkey.insurer.example"
    ptr = dns.reversename.from_address(IPS[1]).to_text(omit_final_dot=True)
    _publish(dns_server, cfg, skip={(ptr, "PTR"), ("feedback.insurer.example", "MX")},
             replace={("tx1.insurer.example", "A"): "127.0.0.99",
                      ("bounces.insurer.example", "TXT"):
                          '"v=spf1 ip4:127.0.0.50 ip4:127.0.0.51 -all"',
                      (dkim_name, "TXT"): '"v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOC"',
                      ("_dmarc.insurer.example", "TXT"): '"v=DMARC1; p=reject"'})
    code, records = _check(tmp_path, dns_server)
    assert code == 1
    assert records[(ptr, "PTR")]["status"] == "MISSING"
    assert records[("feedback.insurer.example", "MX")]["status"] == "MISSING"
    assert records[("tx1.insurer.example", "A")]["status"] == "WRONG"
    spf = records[("bounces.insurer.example", "TXT")]
    assert spf["status"] == "WRONG" and "127.0.0.54: fail" in spf["detail"]
    assert records[(dkim_name, "TXT")]["status"] == "WRONG"
    dmarc = records[("_dmarc.insurer.example", "TXT")]
    assert dmarc["status"] == "WRONG" and "dmarc@feedback.insurer.example" in dmarc["detail"]
    assert records[("bounces.news.insurer.example", "MX")]["status"] == "ok"


@pytest.mark.parametrize("record", ['"v=STSv1; id=2026-12-07"', '"v=STSv1; id=ab cd"',
                                    '"v=STSv1; id=' + "a" * 33 + '"', '"v=stsv1; id=1"',
                                    '"v=STSv1 id=1"'],
                         ids=["hyphen", "space", "33 characters", "lower case", "no ;"])
def test_dns_check_says_wrong_for_an_mta_sts_record_senders_ignore(tmp_path, dns_server, record):
    """RFC 8461 3.1: ``v=STSv1`` then ``;``, and ``id`` is 1 to 32 letters and digits;
    a sender (Postlane's own relay included) ignores any other record, so the domain has no
    policy. ``dns check`` read the record with its own loose parser and said "ok"."""
    _init(tmp_path)
    cfg = load_config(tmp_path / "node" / "postlane.toml")
    name = "_mta-sts.bounces.insurer.example"
    _publish(dns_server, cfg, replace={(name, "TXT"): record})
    code, records = _check(tmp_path, dns_server)
    assert code == 1
    assert records[(name, "TXT")]["status"] == "WRONG", records[(name, "TXT")]


def test_dns_check_reports_a_failing_resolver_as_an_error_not_a_verdict(tmp_path, dns_server):
    _init(tmp_path)
    cfg = load_config(tmp_path / "node" / "postlane.toml")
    _publish(dns_server, cfg)
    dns_server.set_rcode("bounces.insurer.example", "SERVFAIL")
    code, records = _check(tmp_path, dns_server)
    assert code == 1
    assert records[("bounces.insurer.example", "MX")]["status"] == "ERROR"


@pytest.mark.parametrize("cmd", [["dns", "checklist"], ["dns", "check"]])
def test_dns_commands_need_a_valid_config(tmp_path, cmd):
    (tmp_path / "bad.toml").write_text("[node]\nbogus = 1\n")
    result = runner.invoke(app, [*cmd, "-c", str(tmp_path / "bad.toml")])
    assert result.exit_code == 2


@pytest.mark.parametrize(("option", "value"), [("--hostname", "bad host"),
                                               ("--domain", "bad domain"),
                                               ("--smarthost", "bogus")])
def test_init_writes_nothing_when_the_options_make_no_valid_config(tmp_path, option, value):
    """A bad --hostname, --domain or --smarthost used to leave a folder with keys, a token and
    an invalid config behind, so that init with the option corrected refused: 'not empty'."""
    args = {"--hostname": "m.example", "--domain": "insurer.example", option: value}
    result = runner.invoke(app, ["init", str(tmp_path / "n"),
                                 *[a for kv in args.items() for a in kv]])
    assert result.exit_code == 2 and f"error: {option}: " in result.output, result.output
    assert not (tmp_path / "n").exists()


def test_the_dmarc_record_asks_for_the_dkim_alignment_the_node_signs_with(tmp_path):
    """Under ``dkim.alignment = "relaxed"`` mail from mail.insurer.example is signed d=
    insurer.example; the checklist's ``adkim=s`` made DMARC fail every such message."""
    _init(tmp_path)
    path = tmp_path / "node" / "postlane.toml"
    dmarc = [r.value for r in expected(load_config(path)) if r.kind == "dmarc"]
    assert dmarc and all("adkim=s;" in v for v in dmarc)
    text = path.read_text()
    assert 'alignment = "strict"' in text
    path.write_text(text.replace('alignment = "strict"', 'alignment = "relaxed"', 1))
    dmarc = [r.value for r in expected(load_config(path)) if r.kind == "dmarc"]
    assert dmarc and all("adkim=r;" in v for v in dmarc)


def test_dns_check_stops_asking_a_resolver_that_does_not_answer(tmp_path):
    """`dns check --nameserver` with an address where no resolver answers asked it for each
    of the 40 records in turn (5 s each, 20 s for pyspf's), printing nothing for minutes. After
    two unanswered queries in a row the rest are reported ERROR without asking."""
    import json
    import socket

    _init(tmp_path)
    cfg_path = tmp_path / "node" / "postlane.toml"
    cfg_path.write_text(cfg_path.read_text() + '\n[dns]\ntimeout = "0.3s"\n')
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        result = runner.invoke(app, ["dns", "check", "-c", str(cfg_path), "--nameserver",
                                     f"127.0.0.1:{silent.getsockname()[1]}", "--json"])
        silent.setblocking(False)
        names = set()
        while True:
            try:
                packet = silent.recv(4096)
            except BlockingIOError:
                break
            names.add(dns.message.from_wire(packet).question[0].name)
    records = json.loads(result.output)["records"]
    assert result.exit_code == 1 and len(records) > 30
    assert {r["status"] for r in records} == {"ERROR"}
    skipped = [r for r in records if "not looked up" in r["detail"]]
    assert len(skipped) == len(records) - 2, records[:3]
    assert len(names) <= 2, names


def test_the_config_init_writes_says_every_step_to_require_auth(tmp_path):
    """The submission listener's comment said "add users with `postlane users add` and set
    require_auth = true"; done so, `config check` refused the config ("require_auth: needs
    security.users_file"): the users file was never named. The config now carries the
    commented ``[security]`` lines and the ``users add`` command to run."""
    _init(tmp_path)
    path = tmp_path / "node" / "postlane.toml"
    text = path.read_text()
    assert "postlane users add NAME -f users.toml" in text
    users = tmp_path / "node" / "users.toml"
    pw = tmp_path / "pw"
    pw.write_text("a long enough password\n")
    added = runner.invoke(app, ["users", "add", "alice", "-f", str(users), "--password-file",
                                str(pw), "--class", "claims"])
    assert added.exit_code == 0, added.output
    assert '# [security]\n# users_file = "users.toml"' in text
    text = text.replace('# [security]\n# users_file = "users.toml"',
                        '[security]\nusers_file = "users.toml"')
    text = text.replace('# require_auth = true', 'require_auth = true', 1)
    path.write_text(text)
    check = runner.invoke(app, ["config", "check", str(path)])
    assert check.exit_code == 0, check.output
    cfg = load_config(path)
    assert cfg.listeners["submission"].require_auth
