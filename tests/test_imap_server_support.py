"""A real IMAP/POP3 server on loopback for the server tests, and a raw IMAP client.

:class:`ServerThread` builds the services over a data directory (as ``mailfort dev``
does), starts the four listeners on an event loop in a thread, and is driven from the
test thread with blocking clients (``imaplib``, ``poplib``, :class:`RawImap`).
This module holds no tests; the test modules share it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import imaplib
import poplib
import re
import socket
import ssl
import threading
import zlib
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from mailfort import app, config
from mailfort.guard.logins import GuardPolicy, LoginGuard
from mailfort.imap.mailboxes import MailAccess
from mailfort.imap.server import ImapServer, Listener, set_access, tls_context_for
from mailfort.imap.state import ServerPolicy
from mailfort.pop3.server import Pop3Server

T = TypeVar("T")

DOMAIN = "example.test"
PASSWORD = "a long test passphrase"
APPEND_LIMIT = 2 * 1024 * 1024


class ServerThread:
    """The IMAP and POP3 listeners of one data directory, on loopback."""

    def __init__(
        self,
        data_dir: Path,
        *,
        guard: LoginGuard | None = None,
        quota_storage: int | None = 50 * 1024 * 1024,
        quota_messages: int | None = 100_000,
    ) -> None:
        self.data_dir = data_dir
        self.settings = config.Settings(data_dir=data_dir, hostname="localhost")
        self.services = app.build(self.settings)
        self.services.directory.add_domain(DOMAIN)
        self.access = MailAccess(
            self.services.directory,
            self.services.store,
            guard or LoginGuard(GuardPolicy(failure_floor=0.2)),
            quota_storage=quota_storage,
            quota_messages=quota_messages,
        )
        self.ports: dict[str, int] = {}
        self.loop = asyncio.new_event_loop()
        self._users = 0
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(self._start())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="imap-test-server", daemon=True)
        self.thread.start()
        ready.wait(30)
        if failure:
            raise failure[0]

    async def _start(self) -> None:
        set_access(self.services, self.access)
        ctx = tls_context_for(self.services)
        policy = ServerPolicy(tls_available=True, append_limit=APPEND_LIMIT)
        servers: list[tuple[str, ImapServer | Pop3Server]] = [
            ("imap", ImapServer(self.access, ctx, implicit_tls=False, policy=policy)),
            (
                "imaps",
                ImapServer(
                    self.access,
                    ctx,
                    implicit_tls=True,
                    policy=ServerPolicy(tls_available=False, append_limit=APPEND_LIMIT),
                ),
            ),
            ("pop3", Pop3Server(self.access, ctx, implicit_tls=False)),
            ("pop3s", Pop3Server(self.access, ctx, implicit_tls=True)),
        ]
        for name, server in servers:
            listener: Listener = await server.start("127.0.0.1", 0)
            self.services.servers.append(listener)
            self.ports[name] = listener.port

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def stop(self) -> None:
        async def stop() -> None:
            for server in self.services.servers:
                server.close()
            for server in self.services.servers:
                await server.wait_closed()
            self.access.close()

        with contextlib.suppress(Exception):
            self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.services.store.close()
        self.services.directory.close()

    # -- accounts ---------------------------------------------------------------------

    def new_user(self, name: str | None = None) -> str:
        """A fresh account (tests share the server, not mailboxes)."""
        self._users += 1
        address = f"{name or 'user'}{self._users}@{DOMAIN}"
        self.services.directory.add_user(address, PASSWORD)
        return address

    def app_password(self, address: str) -> str:
        return self.services.directory.add_app_password(address, PASSWORD, "test client")

    # -- clients ----------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        # The self-signed certificate covers 127.0.0.1: verify it like a client would.
        return ssl.create_default_context(cafile=str(self.settings.tls_cert))

    def imaps(self) -> imaplib.IMAP4_SSL:
        return imaplib.IMAP4_SSL("127.0.0.1", self.ports["imaps"], ssl_context=self.ssl_context())

    def imap_plain(self) -> imaplib.IMAP4:
        return imaplib.IMAP4("127.0.0.1", self.ports["imap"])

    def login(self, address: str, secret: str = PASSWORD) -> imaplib.IMAP4_SSL:
        client = self.imaps()
        client.login(address, secret)
        return client

    def raw(self, *, tls: bool = True) -> RawImap:
        sock = socket.create_connection(("127.0.0.1", self.ports["imaps" if tls else "imap"]), 10)
        if tls:
            sock = self.ssl_context().wrap_socket(sock, server_hostname="127.0.0.1")
        return RawImap(sock)

    def pop3s(self) -> poplib.POP3_SSL:
        return poplib.POP3_SSL("127.0.0.1", self.ports["pop3s"], context=self.ssl_context())

    def pop3_plain(self) -> poplib.POP3:
        return poplib.POP3("127.0.0.1", self.ports["pop3"])


_LITERAL_END = re.compile(rb"~?\{(\d+)\}\r\n\Z")


class RawImap:
    """An IMAP client that shows the server's bytes as they are (imaplib reshapes them)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self._tag = 0
        self._inflate: Any = None
        self._deflate: Any = None
        self.greeting = self.line()

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        if self._inflate is not None:
            data = self._inflate.decompress(data)
        return data

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self.buf += self._recv()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line + b"\r\n"

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.buf += self._recv()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def response(self) -> bytes:
        """One response line with its literals, as sent."""
        out = self.line()
        while m := _LITERAL_END.search(out):
            out += self.exact(int(m.group(1)))
            out += self.line()
        return out

    def send(self, data: bytes) -> None:
        if self._deflate is not None:
            data = self._deflate.compress(data) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
        self.sock.sendall(data)

    def next_tag(self) -> str:
        self._tag += 1
        return f"t{self._tag}"

    def command(self, text: str | bytes) -> tuple[list[bytes], bytes]:
        """Send a command; (untagged responses, tagged line)."""
        tag = self.next_tag()
        body = text.encode() if isinstance(text, str) else text
        self.send(tag.encode() + b" " + body + b"\r\n")
        return self.until(tag)

    def until(self, tag: str) -> tuple[list[bytes], bytes]:
        untagged: list[bytes] = []
        while True:
            resp = self.response()
            if resp.startswith(tag.encode() + b" "):
                return untagged, resp
            untagged.append(resp)

    def login(self, user: str, secret: str = PASSWORD) -> None:
        token = base64.b64encode(f"\0{user}\0{secret}".encode()).decode()
        _, tagged = self.command(f"AUTHENTICATE PLAIN {token}")
        assert b" OK " in tagged, tagged

    def compress(self) -> None:
        _, tagged = self.command("COMPRESS DEFLATE")
        assert b" OK " in tagged, tagged
        self._deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        self._inflate = zlib.decompressobj(-15)
        if self.buf:
            self.buf = self._inflate.decompress(self.buf)

    def settimeout(self, seconds: float) -> None:
        self.sock.settimeout(seconds)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def pop3_auth_plain(client: poplib.POP3, user: str, secret: str) -> bytes:
    token = base64.b64encode(f"\0{user}\0{secret}".encode()).decode()
    return client._shortcmd(f"AUTH PLAIN {token}")  # type: ignore[attr-defined,no-any-return]


def message(n: int, subject: str | None = None, body: str | None = None) -> bytes:
    return (
        f"From: Sender {n} <sender{n}@remote.test>\r\nTo: someone@example.test\r\n"
        f"Subject: {subject or f'message {n}'}\r\nMessage-ID: <{n}@remote.test>\r\n"
        f"Date: Mon, 4 Mar 2024 10:{n % 60:02d}:00 +0100\r\n\r\n"
        f"{body or f'body of message {n}'}\r\n"
    ).encode()
