"""Seals: days signed with a key kept apart from the store and time-stamped by an RFC 3161
authority (a real one made with ``openssl ts``, on loopback), so that a rewritten chain or a
forged seal is caught, in the store and in an export, with the public key alone."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from postlane.audit.chain import (
    GENESIS,
    PERSONAL,
    chain_hash,
    personal_digest,
    row_cdigest,
    verify_tuple,
)
from postlane.cli import app
from tests.support.audit import AuditBackend
from tests.test_audit_chain import make_store

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="the time-stamp authority of these tests is openssl ts")


def cli(*args: str):
    return CliRunner().invoke(app, ["audit", *args])


@pytest.fixture
def key(tmp_path) -> Path:
    path = tmp_path / "keys" / "seal.key"
    res = cli("seal-key", "--out", str(path))
    assert res.exit_code == 0 and "key id" in res.output, res.output
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    return path


def _cert(subject: str, key, issuer=None, issuer_key=None, *, ca: bool) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer.subject if issuer else name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=1))
               .not_valid_after(now + dt.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True)
    return builder.sign(issuer_key or key, hashes.SHA256())


class TSA(ThreadingHTTPServer):
    """An RFC 3161 time-stamp authority: HTTP on loopback in front of ``openssl ts -reply``.
    Its tokens carry the signer's certificate alone: with the root as well, openssl writes the
    certificate SET out of DER order, which the verifier (rfc3161-client) refuses."""

    def __init__(self, directory: Path) -> None:
        super().__init__(("127.0.0.1", 0), _TSAHandler)
        self.dir = directory
        ca_key, tsa_key = ec.generate_private_key(ec.SECP256R1()), \
            ec.generate_private_key(ec.SECP256R1())
        self.ca = _cert("Test TSA Root", ca_key, ca=True)
        tsa = _cert("Test TSA", tsa_key, self.ca, ca_key, ca=False)
        pem = serialization.Encoding.PEM
        (directory / "ca.pem").write_bytes(self.ca.public_bytes(pem))
        (directory / "tsa.pem").write_bytes(tsa.public_bytes(pem))
        (directory / "tsa.key").write_bytes(tsa_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (directory / "serial").write_text("01\n")
        (directory / "tsa.cnf").write_text(f"""
[ tsa ]
default_tsa = tsa_config
[ tsa_config ]
dir = {directory}
serial = $dir/serial
crypto_device = builtin
signer_cert = $dir/tsa.pem
signer_key = $dir/tsa.key
signer_digest = sha256
default_policy = 1.2.3.4.1
digests = sha256
accuracy = secs:1
ordering = yes
tsa_name = yes
ess_cert_id_chain = no
ess_cert_id_alg = sha256
""")
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/tsa"


class _TSAHandler(BaseHTTPRequestHandler):
    server: TSA

    def do_POST(self) -> None:  # noqa: N802 (stdlib name)
        query = self.rfile.read(int(self.headers["Content-Length"]))
        d = self.server.dir
        with self.server.lock, tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "q.der").write_bytes(query)
            subprocess.run(["openssl", "ts", "-reply", "-config", str(d / "tsa.cnf"),
                            "-queryfile", f"{tmp}/q.der", "-out", f"{tmp}/r.der"],
                           check=True, capture_output=True)
            answer = (Path(tmp) / "r.der").read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/timestamp-reply")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def tsa(tmp_path):
    directory = tmp_path / "tsa"
    directory.mkdir()
    srv = TSA(directory)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def rewrite(db: AuditBackend, seq: int, diag: str) -> None:
    """What an insider with write access does: change a record, then recompute every hash
    after it and every day's seal, so that the chain verifies again."""
    store = db.open(readonly=True)
    try:
        rows = list(store.rows_between(None, None))
        days = store.days()
    finally:
        store.close()
    prev, statements = GENESIS, []
    for row in rows:
        if row["seq"] == seq:
            row["dsn_diag"] = diag
            row["pdigest"] = personal_digest(bytes(row["nonce"]),
                                             [row[c] for c in PERSONAL])
        cdigest, _ = row_cdigest(verify_tuple(row))
        row["prev"], row["hash"] = prev, chain_hash(prev, cdigest)
        prev = row["hash"]
        statements.append(("UPDATE audit_records SET dsn_diag = ?, pdigest = ?, prev = ?,"
                           " hash = ? WHERE seq = ?", (row["dsn_diag"], row["pdigest"],
                                                       row["prev"], row["hash"], row["seq"])))
    anchor = GENESIS
    for day in days:
        head = next(r["hash"] for r in rows if r["seq"] == day["last_seq"])
        statements.append(("UPDATE audit_days SET anchor = ?, head = ? WHERE day = ?",
                           (anchor, head, day["day"])))
        anchor = head
    db.sql(*statements)


def test_sealed_days_verify_and_a_rewritten_chain_is_caught(audit_backend, key):
    db = make_store(audit_backend)
    res = cli("seal", *db.cli(), "--key", str(key))
    assert res.exit_code == 0, res.output
    assert "sealed 2026-11-19 up to seq 10 (10 records)" in res.output
    assert "sealed 2026-11-20 up to seq 20 (10 records)" in res.output
    assert cli("seal", *db.cli(), "--key", str(key)).output == "nothing to seal\n"
    public = f"{key}.pub"
    res = cli("verify", *db.cli(), "--public-key", public)
    assert res.exit_code == 0 and "sealed: every closed day" in res.output, res.output
    rewrite(db, 8, "smtp;250 it was never sent")
    res = cli("verify", *db.cli())  # the chain alone: consistent again
    assert res.exit_code == 0, res.output
    res = cli("verify", *db.cli(), "--public-key", public)
    assert res.exit_code == 1, res.output
    assert "SEAL: seal of 2026-11-19 (seq 10): the chain does not have the sealed head" \
        in res.output


def test_a_forged_seal_and_a_day_without_one_are_caught(audit_backend, key, tmp_path):
    db = make_store(audit_backend)
    other = tmp_path / "other.key"
    assert cli("seal-key", "--out", str(other)).exit_code == 0
    assert cli("seal", *db.cli(), "--key", str(other)).exit_code == 0  # someone else's key
    res = cli("verify", *db.cli(), "--public-key", f"{key}.pub")
    assert res.exit_code == 1 and "the signature does not verify with public key" in res.output
    db.sql(("DELETE FROM audit_seals",))
    assert cli("seal", *db.cli(), "--key", str(key)).exit_code == 0
    db.sql(("UPDATE audit_seals SET signature = ? WHERE day = '2026-11-20'", (bytes(64),)))
    res = cli("verify", *db.cli(), "--public-key", f"{key}.pub")
    assert res.exit_code == 1, res.output
    assert "seal of 2026-11-20 (seq 20): the signature does not verify" in res.output
    db.sql(("DELETE FROM audit_seals WHERE day = '2026-11-20'",))
    res = cli("verify", *db.cli(), "--public-key", f"{key}.pub")
    assert "SEAL: day 2026-11-20 (seq 11..20) has no seal" in res.output


def test_a_seal_key_others_can_read_is_refused(audit_backend, key):
    db = make_store(audit_backend)
    os.chmod(key, 0o644)
    res = cli("seal", *db.cli(), "--key", str(key))
    assert res.exit_code == 2 and "chmod 600" in res.output


def test_time_stamped_seals_verify_offline_from_an_export(audit_backend, key, tsa, tmp_path):
    db = make_store(audit_backend)
    res = cli("seal", *db.cli(), "--key", str(key), "--tsa-url", tsa.url)
    assert res.exit_code == 0 and res.output.count("time-stamped") == 2, res.output
    ca = str(tsa.dir / "ca.pem")
    res = cli("verify", *db.cli(), "--public-key", f"{key}.pub", "--tsa-ca", ca)
    assert res.exit_code == 0, res.output
    out = tmp_path / "export"
    assert cli("export", *db.cli(), "--out", str(out)).exit_code == 0
    res = cli("verify", "--export", str(out), "--public-key", f"{key}.pub", "--tsa-ca", ca)
    assert res.exit_code == 0, res.output
    # a seal of the rewritten chain, forged with the key and a new signature, still fails the
    # time-stamp: the token covers the old seal
    rewrite(db, 4, "smtp;250 forged")
    store = db.open()
    try:
        [seal] = [s for s in store.seals() if s.day == "2026-11-19"]
    finally:
        store.close()
    from postlane.audit.seal import load_private, payload

    day = db.open(readonly=True)
    try:
        info = next(d for d in day.days() if d["day"] == "2026-11-19")
    finally:
        day.close()
    body = payload(seal.day, seal.last_seq, seal.records, bytes(info["head"]))
    signature = load_private(key).sign(body)
    db.sql(("UPDATE audit_seals SET head = ?, signature = ? WHERE day = '2026-11-19'",
            (bytes(info["head"]), signature)))
    res = cli("verify", *db.cli(), "--public-key", f"{key}.pub", "--tsa-ca", ca)
    assert res.exit_code == 1, res.output
    assert "seal of 2026-11-19: the time-stamp does not verify" in res.output
