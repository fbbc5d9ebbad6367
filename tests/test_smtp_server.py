"""The asyncio side of the SMTP server (`mailfort.smtp.server`), over real sockets.

The protocol core has its own byte-level tests (test_smtp_core.py); these check what the
thin server around it adds: TLS upgrades on a live connection, handlers that fail or
close, back-pressure while a hook runs, and the idle timeout.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mailfort.directory.service import Directory
from mailfort.guard.logins import GuardPolicy, Limits, LoginGuard
from mailfort.smtp.server import smtp_factory
from mailfort.smtp.submission import SubmissionHandler
from mailfort.store.service import MailStore
from mailfort.tls import ensure_self_signed, server_context

PASSWORD = "a long test passphrase"


@dataclass
class _Handler:
    """Accepts everything; records messages; behaviour per recipient local part."""

    messages: list[bytes] = field(default_factory=list)
    gate: asyncio.Event | None = None  # RCPT waits on it when set

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        envelope.mail_from = address
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address.startswith("boom@"):
            raise RuntimeError("a handler bug")
        if address.startswith("bye@"):
            return "421 4.3.2 Shutting down"
        if self.gate is not None:
            await self.gate.wait()
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(envelope.original_content)
        return "250 2.6.0 accepted"


@dataclass
class _Server:
    port: int
    handler: _Handler
    client_tls: ssl.SSLContext


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[_Server]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    ensure_self_signed(cert, key, "mx.test")
    handler = _Handler()
    factory = smtp_factory(handler, "mx.test", server_context(cert, key), timeout=1.0)
    srv = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    client_tls = ssl.create_default_context(cafile=str(cert))
    client_tls.check_hostname = False
    try:
        yield _Server(srv.sockets[0].getsockname()[1], handler, client_tls)
    finally:
        srv.close()
        await srv.wait_closed()


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """One whole reply (the last line of a multi-line one)."""
    while True:
        line = await asyncio.wait_for(reader.readline(), 10)
        if not line or line[3:4] != b"-":
            return line


async def _open(srv: _Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    assert (await _reply(reader)).startswith(b"220 mx.test")
    return reader, writer


async def test_commands_pipelined_after_starttls_are_not_run(server: _Server) -> None:
    """CVE-2011-0411: plaintext sent behind STARTTLS must not count as sent over TLS."""
    reader, writer = await _open(server)
    writer.write(b"EHLO c.test\r\n")
    assert (await _reply(reader)).startswith(b"250 ")
    writer.write(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
    assert (await _reply(reader)).startswith(b"220 2.0.0")
    await writer.start_tls(server.client_tls)
    writer.write(b"MAIL FROM:<a@b.test>\r\n")
    # Had the injected MAIL run, this would be a nested MAIL; the session started over,
    # so it is refused for want of EHLO instead.
    assert (await _reply(reader)).startswith(b"503 5.5.1 Error: send HELO first")
    writer.write(b"EHLO c.test\r\n")
    ehlo = b""
    while not ehlo.startswith(b"250 "):
        ehlo = await _reply(reader)
    writer.write(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@mx.test>\r\nDATA\r\n")
    assert (await _reply(reader)).startswith(b"250")
    assert (await _reply(reader)).startswith(b"250")
    assert (await _reply(reader)).startswith(b"354")
    writer.write(b"Subject: over TLS\r\n\r\nhi\r\n.\r\nQUIT\r\n")
    assert (await _reply(reader)).startswith(b"250 2.6.0")
    assert (await _reply(reader)).startswith(b"221")
    writer.close()
    assert server.handler.messages == [b"Subject: over TLS\r\n\r\nhi\r\n"]


async def test_a_failing_handler_costs_the_command_not_the_session(server: _Server) -> None:
    reader, writer = await _open(server)
    writer.write(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<boom@mx.test>\r\n")
    while not (await _reply(reader)).startswith(b"250 "):
        pass  # EHLO's lines
    assert (await _reply(reader)).startswith(b"250")  # MAIL
    assert (await _reply(reader)).startswith(b"451 4.3.0")
    writer.write(b"RCPT TO:<x@mx.test>\r\nNOOP\r\n")
    assert (await _reply(reader)).startswith(b"250")
    assert (await _reply(reader)).startswith(b"250")
    writer.close()


async def test_a_421_from_a_handler_closes_the_connection(server: _Server) -> None:
    reader, writer = await _open(server)
    writer.write(b"HELO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<bye@mx.test>\r\nNOOP\r\n")
    assert (await _reply(reader)).startswith(b"250")
    assert (await _reply(reader)).startswith(b"250")
    assert (await _reply(reader)).startswith(b"421 4.3.2")
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed; NOOP never answered
    writer.close()


async def test_input_behind_a_slow_hook_is_held_back_then_answered_in_order(
    server: _Server,
) -> None:
    """A client that keeps sending while a RCPT lookup waits is paused (TCP back-pressure),
    not buffered without bound; once the hook answers, everything is answered in order."""
    server.handler.gate = asyncio.Event()
    reader, writer = await _open(server)
    noops = 200_000  # 1.2 MB of pipelined NOOPs behind the waiting RCPT
    writer.write(b"HELO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@mx.test>\r\n")
    writer.write(b"NOOP\r\n" * noops)
    drained = asyncio.ensure_future(writer.drain())
    await asyncio.sleep(0.5)
    server.handler.gate.set()
    codes = []
    while len(codes) < 3 + noops:
        line = await asyncio.wait_for(reader.readline(), 10)
        assert line, f"closed after {len(codes)} replies"
        codes.append(line[:3])
    await drained
    assert codes[:3] == [b"250", b"250", b"250"]
    assert set(codes[3:]) == {b"250"}
    writer.close()


async def test_an_idle_client_is_told_and_disconnected(server: _Server) -> None:
    reader, writer = await _open(server)
    writer.write(b"HELO c.test\r\n")
    assert (await _reply(reader)).startswith(b"250")
    # The server's idle timeout is 1 s here (300 s in service).
    assert (await _reply(reader)).startswith(b"421 4.4.2")
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()


@pytest.mark.parametrize(
    ("prefix", "drip", "stall"),
    [
        (b"HELO c.test\r\n", b"NOOP", "command"),
        (
            b"HELO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@mx.test>\r\nDATA\r\n",
            b"x",
            "message",
        ),
    ],
)
async def test_a_client_dripping_octets_cannot_hold_a_session(
    prefix: bytes, drip: bytes, stall: str
) -> None:
    """Each octet resets the idle timer, but a command (or a message) that never ends is cut
    off: here the idle timeout is 1 s, a command may take 1.5 s and a message 2 s."""
    handler = _Handler()
    factory = smtp_factory(
        handler, "mx.test", None, timeout=1.0, command_timeout=1.5, message_timeout=2.0
    )
    srv = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.sockets[0].getsockname()[1])
        assert (await _reply(reader)).startswith(b"220")
        writer.write(prefix)
        replies = prefix.count(b"\r\n")
        for _ in range(replies):
            assert (await _reply(reader))[:1] in (b"2", b"3")
        closing = asyncio.ensure_future(reader.read())
        for _ in range(40):  # 40 x 0.2 s: well past both limits, never 1 s without an octet
            if closing.done():
                break
            for octet in drip:
                writer.write(bytes([octet]))
                await asyncio.sleep(0.2)
                if closing.done():
                    break
        rest = await asyncio.wait_for(closing, 10)
        assert rest.startswith(b"421 4.4.2 Command timeout"), (stall, rest)
        assert handler.messages == []
        writer.close()
    finally:
        srv.close()
        await srv.wait_closed()


async def test_submission_logins_are_throttled_then_refused_even_with_the_right_password(
    tmp_path: Path,
) -> None:
    """Brute force over AUTH meets the guard IMAP and POP3 logins use: past the limit, the
    password is not even checked (454, RFC 4954 §6) until the failures expire."""
    directory = Directory.open(f"sqlite:///{tmp_path / 'directory.sqlite3'}")
    directory.add_domain("example.test")
    directory.add_user("alice@example.test", PASSWORD)
    store = MailStore(tmp_path / "store")
    policy = GuardPolicy(
        per_ip=Limits(delay_after=10, refuse_after=3),
        base_delay=0.0,
        max_delay=0.0,  # in service, a refused attempt is also held 15 s
        failure_floor=0.0,
    )
    handler = SubmissionHandler(
        directory,
        store,
        None,  # type: ignore[arg-type]  # nothing is queued here
        None,  # type: ignore[arg-type]
        "smtp.example.test",
        guard=LoginGuard(policy=policy),
    )
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    ensure_self_signed(cert, key, "smtp.example.test")
    factory = smtp_factory(
        handler,
        "smtp.example.test",
        server_context(cert, key),
        implicit_tls=True,
        auth_required=True,
    )
    tls = server_context(cert, key)
    srv = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0, ssl=tls)
    client_tls = ssl.create_default_context(cafile=str(cert))
    client_tls.check_hostname = False

    def plain(password: str) -> bytes:
        blob = f"\0alice@example.test\0{password}".encode()
        return b"AUTH PLAIN " + base64.b64encode(blob) + b"\r\n"

    try:
        port = srv.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_tls)
        assert (await _reply(reader)).startswith(b"220")
        writer.write(b"EHLO c.test\r\n")
        while not (await _reply(reader)).startswith(b"250 "):
            pass
        for _ in range(3):
            writer.write(plain("wrong guess"))
            assert (await _reply(reader)).startswith(b"535 5.7.8")
        writer.write(plain(PASSWORD))
        assert (await _reply(reader)).startswith(b"454 4.7.0")
        writer.write(b"MAIL FROM:<alice@example.test>\r\n")
        assert (await _reply(reader)).startswith(b"530")  # still not logged in
        writer.close()
    finally:
        srv.close()
        await srv.wait_closed()
        store.close()
        directory.close()
