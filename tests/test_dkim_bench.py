"""``postlane dkim bench`` runs from the harness (``harness/dkimbench.py``), not from inside the
command module: a smoke run with tiny measurements prints every figure docs/performance.md
quotes."""

from __future__ import annotations

from postlane.harness.dkimbench import run_dkim_bench


def test_the_dkim_bench_prints_each_measurement() -> None:
    lines: list[str] = []
    run_dkim_bench(2000, 0.01, 5, lines.append)
    text = "\n".join(lines)
    for wanted in ("rsa-sha256      1 thread(s)", "ed25519-sha256  2 thread(s)",
                   "OpenSSL RSA-2048", "dkimpy.sign", "canonicalization postlane",
                   "canonicalization dkimpy", "Signer, rsa-sha256: 5 campaign signatures"):
        assert wanted in text, (wanted, text)
