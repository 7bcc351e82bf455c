"""pytest fixture for the loopback DNS server; import it into a test module to use it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.dnsserver import DNSServer


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    """A fresh authoritative DNS server on 127.0.0.1, stopped after the test."""
    server = DNSServer().start()
    try:
        yield server
    finally:
        server.stop()
