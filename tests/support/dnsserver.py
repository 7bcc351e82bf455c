"""A small authoritative DNS server on loopback for tests.

It runs in daemon threads rather than on the test's event loop so that it also serves an MTA
started in a subprocess, and so a test that blocks its loop cannot starve DNS.
"""

from __future__ import annotations

import ipaddress
import socket
import socketserver
import threading
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.reversename
import dns.rrset

__all__ = ["DNSServer"]


def _key(name: str) -> str:
    return name.strip().rstrip(".").lower()


class _UDPHandler(socketserver.BaseRequestHandler):
    server: _UDPServer

    def handle(self) -> None:
        data, sock = self.request
        answer = self.server.dns.answer(data, max_size=None)
        if answer is not None:
            sock.sendto(answer, self.client_address)


class _TCPHandler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(10)
        try:
            while True:
                header = _recv_exact(sock, 2)
                if header is None:
                    return
                data = _recv_exact(sock, int.from_bytes(header, "big"))
                if data is None:
                    return
                answer = self.server.dns.answer(data, max_size=65535)
                if answer is None:
                    return  # a "timeout" name: hang up without answering
                sock.sendall(len(answer).to_bytes(2, "big") + answer)
        except OSError:
            return


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


class _UDPServer(socketserver.ThreadingUDPServer):
    daemon_threads = True
    allow_reuse_address = False
    dns: DNSServer


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    dns: DNSServer


class DNSServer:
    """Authoritative answers from in-memory records, over UDP and TCP on one port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError("the test DNS server only binds loopback addresses")
        self.host = host
        self.port = port
        self.queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        # name -> rdtype -> list of (ttl, rdata)
        self._records: dict[str, dict[int, list[tuple[int, dns.rdata.Rdata]]]] = {}
        self._rcodes: dict[str, dns.rcode.Rcode] = {}
        self._silent: set[str] = set()
        self._secure: set[str] = set()
        self._held: set[str] = set()
        self._asked: set[str] = set()
        self._all_asked = threading.Event()
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> DNSServer:
        """Bind UDP and TCP on the same port (retrying if an ephemeral port clashes)."""
        family = socket.AF_INET6 if ipaddress.ip_address(self.host).version == 6 else \
            socket.AF_INET
        udp_class = type("UDP", (_UDPServer,), {"address_family": family})
        tcp_class = type("TCP", (_TCPServer,), {"address_family": family})
        for _ in range(20):
            udp = udp_class((self.host, self.port), _UDPHandler)
            port = udp.server_address[1]
            try:
                tcp = tcp_class((self.host, port), _TCPHandler)
            except OSError:
                udp.server_close()
                if self.port:
                    raise
                continue
            break
        else:
            raise OSError("could not bind UDP and TCP on one port")
        self.port = port
        for server in (udp, tcp):
            server.dns = self
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _add(self, name: str, rdtype: dns.rdatatype.RdataType, rdata: Any, ttl: int) -> None:
        with self._lock:
            self._records.setdefault(_key(name), {}).setdefault(rdtype, []).append((ttl, rdata))

    def add_mx(self, domain: str, preference: int, exchange: str, ttl: int = 60) -> None:
        exchange = exchange if exchange.endswith(".") else exchange + "."
        rdata = dns.rdata.from_text("IN", "MX", f"{preference} {exchange}")
        self._add(domain, dns.rdatatype.MX, rdata, ttl)

    def add_a(self, name: str, address: str, ttl: int = 60) -> None:
        """Add an A record, or an AAAA record when ``address`` is IPv6."""
        rdtype = "AAAA" if ipaddress.ip_address(address).version == 6 else "A"
        rdata = dns.rdata.from_text("IN", rdtype, address)
        self._add(name, dns.rdatatype.from_text(rdtype), rdata, ttl)

    def add_cname(self, name: str, target: str, ttl: int = 60) -> None:
        """Add a CNAME record; a query of another type for ``name`` is answered as a recursive
        resolver does: the CNAME, then the target's records of that type."""
        target = target if target.endswith(".") else target + "."
        self._add(name, dns.rdatatype.CNAME, dns.rdata.from_text("IN", "CNAME", target), ttl)

    def add_ptr(self, address: str, target: str, ttl: int = 60) -> None:
        """Add the PTR record of ``address`` (its in-addr.arpa / ip6.arpa name)."""
        target = target if target.endswith(".") else target + "."
        rdata = dns.rdata.from_text("IN", "PTR", target)
        self._add(dns.reversename.from_address(address).to_text(), dns.rdatatype.PTR, rdata, ttl)

    def add_txt(self, name: str, text: str, ttl: int = 60) -> None:
        """Add one TXT record; text longer than 255 bytes is split into several strings."""
        raw = text.encode("utf-8")
        strings = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
        rdata = dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, strings)
        self._add(name, dns.rdatatype.TXT, rdata, ttl)

    def add_tlsa(self, name: str, usage: int, selector: int, mtype: int, data: str,
                 ttl: int = 60) -> None:
        """Add a TLSA record (``data``: the association data in hex)."""
        rdata = dns.rdata.from_text("IN", "TLSA", f"{usage} {selector} {mtype} {data}")
        self._add(name, dns.rdatatype.TLSA, rdata, ttl)

    def add_raw(self, name: str, rdtype: str, rdata: bytes, ttl: int = 60) -> None:
        """Add a record of ``rdtype`` from its rdata bytes, as they go on the wire: for one
        dnspython would refuse to build (a TLSA record whose digest has the wrong length)."""
        generic = dns.rdata.GenericRdata(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype),
                                         rdata)
        self._add(name, dns.rdatatype.from_text(rdtype), generic, ttl)

    def set_secure(self, zone: str) -> None:
        """Answers for ``zone`` and the names under it carry the AD bit, as a validating
        resolver sets it for DNSSEC-signed data; an answer through a CNAME chain carries it
        only when every name of the chain is signed."""
        with self._lock:
            self._secure.add(_key(zone))

    def set_rcode(self, name: str, rcode: str, rdtype: str | None = None) -> None:
        """Answer every query for ``name`` (of ``rdtype`` only, when given) with this rcode,
        e.g. "SERVFAIL"."""
        with self._lock:
            self._rcodes[_key(name) if rdtype is None else f"{_key(name)}/{rdtype.upper()}"] = \
                dns.rcode.from_text(rcode)

    def set_timeout(self, name: str) -> None:
        """Never answer queries for ``name``."""
        with self._lock:
            self._silent.add(_key(name))

    def hold_until_all_asked(self, names: list[str]) -> None:
        """Answer a query for one of ``names`` only once every one of them has been asked (at
        most 20 s later): a client that asks them one after the other, each waiting for its
        answer, times out on all but the last."""
        with self._lock:
            self._held = {_key(n) for n in names}
            self._asked = set()
            self._all_asked.clear()

    def clear(self) -> None:
        with self._lock:
            self._records.clear()
            self._rcodes.clear()
            self._silent.clear()
            self._secure.clear()
            self.queries.clear()

    def _follow_cname(self, response: dns.message.Message, name: dns.name.Name,
                      rdtype: int, records: dict[int, list[tuple[int, dns.rdata.Rdata]]]
                      ) -> None:
        """The CNAME chain from ``name`` (at most 8 links) and the records at its end."""
        for _ in range(8):
            cnames = records.get(dns.rdatatype.CNAME) if rdtype != dns.rdatatype.CNAME else None
            if not cnames:
                return
            ttl, rdata = cnames[0]
            rrset = dns.rrset.RRset(name, dns.rdataclass.IN, dns.rdatatype.CNAME)
            rrset.add(rdata, ttl)
            response.answer.append(rrset)
            name = rdata.target
            with self._lock:
                records = dict(self._records.get(_key(name.to_text()), {}))
            entries = records.get(rdtype, [])
            if entries:
                rrset = dns.rrset.RRset(name, dns.rdataclass.IN, rdtype)
                for ttl, rdata in entries:
                    rrset.add(rdata, ttl)
                response.answer.append(rrset)
                return

    def answer(self, wire: bytes, max_size: int | None) -> bytes | None:
        """The response to one query in wire form, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        key = _key(question.name.to_text())
        self.queries.append((key, dns.rdatatype.to_text(question.rdtype)))
        with self._lock:
            held = key in self._held
            if held:
                self._asked.add(key)
                if self._asked >= self._held:
                    self._all_asked.set()
        if held:
            self._all_asked.wait(timeout=20)
        with self._lock:
            if key in self._silent:
                return None
            rcode = self._rcodes.get(
                f"{key}/{dns.rdatatype.to_text(question.rdtype)}", self._rcodes.get(key))
            records = self._records.get(key)
            entries = list(records.get(question.rdtype, [])) if records else []
        if rcode is not None:
            response.set_rcode(rcode)
        elif records is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif entries:
            rrset = dns.rrset.RRset(question.name, dns.rdataclass.IN, question.rdtype)
            for ttl, rdata in entries:
                rrset.add(rdata, ttl)
            response.answer.append(rrset)
        else:
            self._follow_cname(response, question.name, question.rdtype, records)
        # AD as a validating resolver sets it: every name of the answer (the CNAME chain's
        # links and its target) is signed, not only the name asked for
        owners = {key} | {_key(rrset.name.to_text()) for rrset in response.answer}
        with self._lock:
            if all(any(o == z or o.endswith("." + z) for z in self._secure) for o in owners):
                response.flags |= dns.flags.AD
        if max_size is None:
            max_size = query.payload if query.edns >= 0 else 512
        # Records go out in the order they were added (no round-robin), so tests can assert it;
        # an oversized UDP answer is truncated with TC set, making the client retry over TCP.
        return response.to_wire(max_size=max_size, prefer_truncation=True, want_shuffle=False)
