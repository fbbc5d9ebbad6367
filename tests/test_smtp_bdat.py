"""CHUNKING (RFC 3030 BDAT) on the MX, end to end: `mailfort dev` with DNS from a real
server and a raw-socket client that sends the octets exactly as the RFC frames them.

What matters beyond delivery: a chunk's octets are never read as commands, whatever the
reply to the BDAT (refused, over SIZE, malformed), and DATA and BDAT do not mix.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailfort.smtp.server import DATA_SIZE_LIMIT

from conftest import run_cli, start_dev, stop_dev
from dnsserver import DNSServer
from tests_support import read_folder

PASSWORD = "a long test passphrase"


@dataclass
class MX:
    data_dir: Path
    port: int

    def inbox(self) -> list[bytes]:
        return read_folder(self.data_dir, "alice@example.test", PASSWORD)


@pytest.fixture(scope="module")
def mx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MX]:
    data_dir = tmp_path_factory.mktemp("bdat") / "var"
    dns = DNSServer()
    dns.set_zone({"plain.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")]})
    proc, info = start_dev(data_dir, dns.port)
    try:
        run_cli(
            data_dir, "user", "add", "alice@example.test", "--password-stdin", stdin=PASSWORD + "\n"
        )
        yield MX(data_dir, info["ports"]["smtp"])
    finally:
        stop_dev(proc)
        dns.close()


class Client:
    """A raw SMTP client: bytes out, one reply (all its lines) in."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""
        assert self.reply().startswith("220 ")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> str:
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                more = self.sock.recv(65536)
                if not more:
                    raise ConnectionError(f"closed after {lines!r}")
                self.buf += more
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode())
            if line[3:4] != b"-":
                return "\n".join(lines)

    def command(self, line: str) -> str:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def start(self, subject: str) -> bytes:
        assert "CHUNKING" in self.command("EHLO mta.plain.test")
        assert self.command("MAIL FROM:<news@plain.test>").startswith("250")
        assert self.command("RCPT TO:<alice@example.test>").startswith("250")
        return (
            f"From: <news@plain.test>\r\nTo: <alice@example.test>\r\nSubject: {subject}\r\n"
            "Date: Sat, 28 Nov 2026 10:00:00 +0000\r\n\r\n"
        ).encode()

    def close(self) -> None:
        self.sock.close()


def _body_of(stored: bytes) -> bytes:
    return stored.split(b"\r\n\r\n", 1)[1]


def test_chunks_are_joined_and_filed_exactly(mx: MX) -> None:
    c = Client(mx.port)
    head = c.start("bdat-joined")
    # The body holds what DATA would have ended at, and a command: octets, not commands.
    body = b"line one\r\n.\r\nMAIL FROM:<evil@plain.test>\r\n..dots stay\r\nend\r\n"
    c.send(b"BDAT %d\r\n" % len(head) + head)
    assert c.reply() == f"250 2.0.0 {len(head)} octets received"
    c.send(b"BDAT %d LAST\r\n" % len(body) + body)
    assert c.reply().startswith("250 2.6.0")
    assert c.command("QUIT").startswith("221")
    c.close()
    [stored] = [m for m in mx.inbox() if b"bdat-joined" in m]
    assert _body_of(stored) == body  # no dot-unstuffing, nothing cut
    assert b"Authentication-Results:" in stored.split(b"\r\n\r\n", 1)[0]


def test_pipelined_chunks_and_commands(mx: MX) -> None:
    c = Client(mx.port)
    head = c.start("bdat-pipelined")
    body = b"pipelined body\r\n"
    c.send(
        b"BDAT %d\r\n%sBDAT 0\r\nBDAT %d LAST\r\n%sNOOP\r\n" % (len(head), head, len(body), body)
    )
    assert c.reply().startswith("250 2.0.0")
    assert c.reply() == "250 2.0.0 0 octets received"
    assert c.reply().startswith("250 2.6.0")
    assert c.reply().startswith("250")  # NOOP, read after the last chunk's octets
    c.close()
    [stored] = [m for m in mx.inbox() if b"bdat-pipelined" in m]
    assert _body_of(stored) == body


def test_refused_bdat_still_consumes_its_octets(mx: MX) -> None:
    c = Client(mx.port)
    assert "CHUNKING" in c.command("EHLO mta.plain.test")
    # No transaction yet: refused, and the octets (which look like commands) are skipped.
    payload = b"RCPT TO:<alice@example.test>\r\n"
    c.send(b"BDAT %d LAST\r\n" % len(payload) + payload)
    assert c.reply().startswith("503 5.5.1")
    assert c.command("NOOP").startswith("250")
    assert c.command("MAIL FROM:<news@plain.test>").startswith("250")
    c.send(b"BDAT %d\r\n" % len(payload) + payload)  # still no RCPT
    assert c.reply().startswith("503 5.5.1")
    assert c.command("RSET").startswith("250")
    c.close()


def test_data_and_bdat_do_not_mix(mx: MX) -> None:
    c = Client(mx.port)
    head = c.start("bdat-then-data")
    c.send(b"BDAT %d\r\n" % len(head) + head)
    assert c.reply().startswith("250 2.0.0")
    assert c.command("DATA").startswith("503 5.5.1")
    assert c.command("RSET").startswith("250")
    head = c.start("data-after-rset")  # a new transaction may use DATA
    assert c.command("DATA").startswith("354")
    c.send(head + b"by DATA\r\n.\r\n")
    assert c.reply().startswith("250 2.6.0")
    c.close()
    assert [m for m in mx.inbox() if b"data-after-rset" in m]
    assert not [m for m in mx.inbox() if b"bdat-then-data" in m]


def test_over_size_is_refused_without_losing_the_framing(mx: MX) -> None:
    c = Client(mx.port)
    c.start("bdat-too-big")
    first = b"x" * 1000
    c.send(b"BDAT %d\r\n" % len(first) + first)
    assert c.reply().startswith("250 2.0.0")
    big = DATA_SIZE_LIMIT  # with the first chunk, one octet per 1000 over the limit
    c.send(b"BDAT %d\r\n" % big)
    piece = b"y" * (1 << 20)
    left = big
    while left:
        n = min(left, len(piece))
        c.send(piece[:n])
        left -= n
    assert c.reply().startswith("552 5.3.4")
    c.send(b"BDAT 5 LAST\r\nNOOP\r")  # the transaction ends refused; NOOP here is octets
    assert c.reply().startswith("552 5.3.4")
    assert c.command("NOOP").startswith("250")
    c.start("bdat-after-refusal")  # the next transaction is a fresh one
    body = b"small\r\n"
    c.send(b"BDAT %d LAST\r\n" % len(body) + body)
    assert c.reply().startswith("250 2.6.0")
    c.close()
    assert not [m for m in mx.inbox() if b"bdat-too-big" in m]


def test_bdat_without_a_size_closes_the_connection(mx: MX) -> None:
    c = Client(mx.port)
    c.start("bdat-no-size")
    assert c.command("BDAT LAST").startswith("501 5.5.4")
    with pytest.raises(ConnectionError):
        c.command("NOOP")
    c.close()
    c = Client(mx.port)
    c.start("bdat-bad-keyword")
    c.send(b"BDAT 4 FIRST\r\nNOOP")  # a size but junk after it: the 4 octets are skipped
    assert c.reply().startswith("501 5.5.4")
    assert c.command("NOOP").startswith("250")
    c.close()


def test_bare_line_ends_in_chunks_are_refused(mx: MX) -> None:
    c = Client(mx.port)
    head = c.start("bdat-bare-lf")
    body = b"smuggle\n.\nMAIL FROM:<x@plain.test>\n"
    c.send(b"BDAT %d LAST\r\n" % (len(head) + len(body)) + head + body)
    assert c.reply().startswith("550 5.5.2")
    c.close()
