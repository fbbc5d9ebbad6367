"""A small authoritative DNS server for tests: real UDP and TCP on 127.0.0.1.

Every mailfort lookup goes through `mailfort.dns.Resolver`; pointing it here exercises the
real wire path (dnspython, truncation, TCP fallback) instead of a mock.

Zone data is a mapping of owner name to a list of entries:

    server.set_zone({
        "example.com": [("TXT", "v=spf1 -all"), ("MX", (10, "mx.example.com")), ("A", "192.0.2.1")],
        "_dmarc.example.com": [("TXT", "v=DMARC1; p=reject")],
        "slow.example.com": ["TIMEOUT"],        # queries get no answer at all
        "broken.example.com": ["SERVFAIL"],
        "half.example.com": [("TXT", "x"), "TIMEOUT"],  # TXT answers, other types time out
        "nodata.example.com": [("NODATA", "TXT"), "TIMEOUT"],  # TXT: NOERROR, empty
        "_25._tcp.mx.example.com": [("TLSA", (3, 1, 1, "ab12...")), "SECURE"],
    })

DNSSEC is simulated, not signed: a name marked "SECURE" (and every name below it) is
answered with the AD bit, as a validating resolver answers for a signed zone, but only
when the query asked for it with the AD or DO bit (RFC 6840 §5.7). A CNAME chain is
authenticated only when every name on it is. Unmarked names never get AD, so an
existing zone keeps its old answers. "SERVFAIL" stands in for a bogus answer.
TLSA values are (usage, selector, matching type, data as bytes or hex).

Answers follow RFC 1035/2308 rather than dnslib's example server: a name that exists
without the asked type is NOERROR with an empty answer (NODATA), not NXDOMAIN, and so is an
empty non-terminal (RFC 8020). SPF void-lookup counting and DMARC's "no record" both depend
on that distinction. CNAMEs are chased inside the zone. UDP answers larger than the
client's advertised size (512 without EDNS) are truncated (TC=1) so clients retry over TCP.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dnslib import (
    AAAA,
    CNAME,
    MX,
    NS,
    PTR,
    QTYPE,
    RCODE,
    RR,
    TLSA,
    TXT,
    A,
    DNSLabel,
    DNSRecord,
)

Entry = tuple[str, Any] | str
Zone = Mapping[str, Iterable[Entry]]

_RDATA = {"A": A, "AAAA": AAAA, "PTR": PTR, "CNAME": CNAME, "NS": NS}


def _key(name: str | DNSLabel) -> str:
    return str(DNSLabel(str(name))).rstrip(".").lower()


def _txt_chunks(value: Any) -> list[bytes]:
    """One TXT record's character-strings; long strings split at 255 octets."""
    parts = [value] if isinstance(value, str | bytes) else list(value)
    out: list[bytes] = []
    for part in parts:
        raw = part.encode("utf-8") if isinstance(part, str) else bytes(part)
        out.extend(raw[i : i + 255] for i in range(0, len(raw), 255))
        if not raw:
            out.append(b"")
    return out


@dataclass
class _Node:
    rrs: dict[str, list[Any]] = field(default_factory=dict)  # type -> rdata objects
    timeout: bool = False
    servfail: bool = False
    secure: bool = False  # "SECURE": answers here carry AD (see the module docstring)
    nodata: set[str] = field(default_factory=set)


def _compile(zone: Zone) -> tuple[dict[str, _Node], set[str]]:
    nodes: dict[str, _Node] = {}
    for name, entries in zone.items():
        node = nodes.setdefault(_key(name), _Node())
        for entry in entries:
            if isinstance(entry, str):
                marker = entry.upper()
                if marker == "TIMEOUT":
                    node.timeout = True
                elif marker == "SERVFAIL":
                    node.servfail = True
                elif marker == "SECURE":
                    node.secure = True
                else:
                    raise ValueError(f"unknown marker {entry!r} at {name}")
                continue
            rtype, value = entry
            rtype = rtype.upper()
            if rtype == "NODATA":
                node.nodata.add(str(value).upper())
                continue
            if rtype == "TXT":
                rdata: Any = TXT(_txt_chunks(value))
            elif rtype == "MX":
                pref, exchange = value
                rdata = MX(str(exchange), int(pref))
            elif rtype == "TLSA":
                usage, selector, mtype, data = value
                raw = bytes.fromhex(data) if isinstance(data, str) else bytes(data)
                rdata = TLSA(int(usage), int(selector), int(mtype), raw)
            elif rtype in _RDATA:
                rdata = _RDATA[rtype](str(value))
            else:
                raise ValueError(f"unsupported record type {rtype} at {name}")
            node.rrs.setdefault(rtype, []).append(rdata)
    # Every proper suffix of an owner name exists as an empty non-terminal (RFC 8020).
    existing = set(nodes)
    for name in nodes:
        labels = name.split(".")
        existing.update(".".join(labels[i:]) for i in range(1, len(labels)))
    return nodes, existing


class DNSServer:
    """Serves one replaceable zone over UDP and TCP on the same loopback port."""

    def __init__(self, host: str = "127.0.0.1", ttl: int = 60) -> None:
        self.host = host
        self.ttl = ttl
        self.queries: list[tuple[str, str, str]] = []  # (name, type, transport)
        self._lock = threading.Lock()
        self._source: dict[str, list[Entry]] = {}
        self._nodes: dict[str, _Node] = {}
        self._existing: set[str] = set()
        self._udp, self._tcp = self._bind()
        self.port: int = self._udp.server_address[1]
        self._threads = [
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            for srv in (self._udp, self._tcp)
        ]
        for thread in self._threads:
            thread.start()

    # -- zone management ---------------------------------------------------------------

    def set_zone(self, records: Zone) -> None:
        """Replace all zone data at once (atomic for concurrent queries)."""
        source = merge(records)
        nodes, existing = _compile(source)
        with self._lock:
            self._source, self._nodes, self._existing = source, nodes, existing

    def add_records(self, records: Zone) -> None:
        """Merge entries into the current zone."""
        with self._lock:
            source = merge(self._source, records)
            nodes, existing = _compile(source)
            self._source, self._nodes, self._existing = source, nodes, existing

    def clear(self) -> None:
        self.set_zone({})
        self.queries.clear()

    # -- answering ---------------------------------------------------------------------

    def answer(self, data: bytes, transport: str) -> bytes | None:
        """The wire reply for one query, or None to stay silent (a timeout)."""
        try:
            request = DNSRecord.parse(data)
        except Exception:
            return None
        reply = request.reply()
        reply.header.ra = 0
        # dnslib's reply() copies the query's flag bits, AD included; AD is ours to set.
        reply.header.ad = 0
        if not request.questions:
            reply.header.rcode = RCODE.FORMERR
            return bytes(reply.pack())
        q = request.q
        qtype = QTYPE.get(q.qtype, str(q.qtype))
        name = _key(q.qname)
        self.queries.append((name, qtype, transport))
        with self._lock:
            nodes, existing = self._nodes, self._existing
        owner = q.qname
        seen: set[str] = set()
        secure = True  # every name on the (CNAME) chain is in a "SECURE" subtree
        while True:
            if name in seen:  # a CNAME loop: what a recursive resolver reports as SERVFAIL
                reply = request.reply()
                reply.header.rcode = RCODE.SERVFAIL
                break
            seen.add(name)
            secure = secure and _is_secure(nodes, name)
            node = nodes.get(name)
            if node is None:
                if name not in existing:
                    reply.header.rcode = RCODE.NXDOMAIN
                break
            if qtype in node.rrs:
                for rdata in node.rrs[qtype]:
                    reply.add_answer(RR(owner, getattr(QTYPE, qtype), rdata=rdata, ttl=self.ttl))
                break
            if "CNAME" in node.rrs and qtype != "CNAME":
                target = node.rrs["CNAME"][0]
                reply.add_answer(RR(owner, QTYPE.CNAME, rdata=target, ttl=self.ttl))
                owner = target.label
                name = _key(owner)
                continue
            if qtype in node.nodata:
                break
            if node.timeout:
                return None
            if node.servfail:
                reply.header.rcode = RCODE.SERVFAIL
            break
        if secure and _wants_ad(request) and reply.header.rcode in (RCODE.NOERROR, RCODE.NXDOMAIN):
            reply.header.ad = 1
        wire = bytes(reply.pack())
        if transport == "udp":
            limit = 512
            for rr in request.ar:
                if rr.rtype == QTYPE.OPT:
                    limit = max(512, int(rr.rclass))
            if len(wire) > limit:
                truncated = request.reply()
                truncated.header.tc = 1
                truncated.header.rcode = reply.header.rcode
                truncated.header.ad = reply.header.ad
                wire = bytes(truncated.pack())
        return wire

    # -- plumbing ----------------------------------------------------------------------

    def _bind(self) -> tuple[socketserver.UDPServer, socketserver.TCPServer]:
        owner = self

        class UDPHandler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                wire = owner.answer(data, "udp")
                if wire is not None:
                    sock.sendto(wire, self.client_address)

        class TCPHandler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn: socket.socket = self.request
                conn.settimeout(5)
                try:
                    while True:
                        head = _recv_exact(conn, 2)
                        if head is None:
                            return
                        data = _recv_exact(conn, struct.unpack("!H", head)[0])
                        if data is None:
                            return
                        wire = owner.answer(data, "tcp")
                        if wire is None:
                            return  # drop the connection: the client times out or retries
                        conn.sendall(struct.pack("!H", len(wire)) + wire)
                except OSError:
                    return

        class UDP(socketserver.ThreadingUDPServer):
            daemon_threads = True

        class TCP(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        for _ in range(50):
            udp = UDP((self.host, 0), UDPHandler)
            port = udp.server_address[1]
            try:
                tcp = TCP((self.host, port), TCPHandler)
            except OSError:
                udp.server_close()
                continue
            return udp, tcp
        raise RuntimeError("no free port for both UDP and TCP")

    def close(self) -> None:
        for srv in (self._udp, self._tcp):
            srv.shutdown()
            srv.server_close()


def _is_secure(nodes: dict[str, _Node], name: str) -> bool:
    """Whether ``name`` lies at or below a name marked "SECURE" (a signed zone)."""
    labels = name.split(".")
    for i in range(len(labels)):
        node = nodes.get(".".join(labels[i:]))
        if node is not None and node.secure:
            return True
    return False


def _wants_ad(request: DNSRecord) -> bool:
    """RFC 6840 §5.7/§5.8: AD is set in a reply only for a query with AD or DO set."""
    if request.header.ad:
        return True
    # The DO bit is the top bit of the OPT record's flags, carried in its TTL field.
    return any(rr.rtype == QTYPE.OPT and rr.ttl & 0x8000 for rr in request.ar)


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def zone_from_text(text: str) -> dict[str, list[Entry]]:
    """Entries from zone-file lines such as RFC 8463's ``name. IN TXT "..."``."""
    zone: dict[str, list[Entry]] = {}
    for rr in RR.fromZone(text):
        rtype = QTYPE[rr.rtype]
        value: Any
        if rtype == "TXT":
            value = list(rr.rdata.data)
        elif rtype == "MX":
            value = (rr.rdata.preference, str(rr.rdata.label))
        elif rtype == "TLSA":
            d = rr.rdata
            value = (d.cert_usage, d.selector, d.matching_type, bytes(d.cert_data))
        else:
            value = str(rr.rdata)
        zone.setdefault(str(rr.rname), []).append((rtype, value))
    return zone


def merge(*zones: Zone) -> dict[str, list[Entry]]:
    out: dict[str, list[Entry]] = {}
    for zone in zones:
        for name, entries in zone.items():
            out.setdefault(_key(name), []).extend(entries)
    return out


__all__: Sequence[str] = ("DNSServer", "merge", "zone_from_text")
