"""The asyncio POP3 server on the encrypted store (RFC 1939, RFC 2449, RFC 2595, RFC 5034).

Listeners: ``pop3`` (110, STLS required before any login) and ``pop3s`` (995, implicit
TLS, RFC 8314).  The maildrop is INBOX as it was at login (RFC 1939 §5: message numbers
stay fixed for the session); each message's UIDL is ``<UIDVALIDITY>.<UID>``, stable
across sessions and shared with IMAP's view of the same message.  Deletions are marks
until QUIT, which expunges them from INBOX in one commit (RFC 1939 §6, UPDATE state);
IMAP sessions on the same mailbox hear of it at once.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any

from mailfort.imap.mailboxes import MailAccess, SharedMailbox
from mailfort.imap.server import ServicesLike, access_for, tls_context_for
from mailfort.imap.transport import ProtocolError, StreamIO
from mailfort.listening import SessionServer
from mailfort.pop3.protocol import (
    AuthRequest,
    MaildropEntry,
    Pop3Connection,
    Pop3Policy,
    Quit,
    Retrieve,
    Send,
    StartTLS,
)

__all__ = ["Pop3Server", "start_pop3", "start_pop3s"]

log = logging.getLogger(__name__)

#: RFC 1939 §3: the autologout timer is at least 10 minutes once logged in.
TIMEOUT_PREAUTH = 60.0
TIMEOUT_TRANSACTION = 10 * 60.0
_SWEEP = 5.0


class _Pop3Session:
    __slots__ = ("conn", "folder_id", "io", "last", "shared", "task")

    def __init__(self, conn: Pop3Connection, io: StreamIO) -> None:
        self.conn = conn
        self.io = io
        self.shared: SharedMailbox | None = None
        self.folder_id = 0
        self.last = time.monotonic()
        self.task: asyncio.Task[Any] | None = None


class Pop3Server(SessionServer):
    goodbye = b"-ERR [SYS/TEMP] Server shutting down\r\n"

    def __init__(
        self,
        access: MailAccess,
        tls_context: ssl.SSLContext | None,
        *,
        implicit_tls: bool,
        policy: Pop3Policy | None = None,
    ) -> None:
        super().__init__(tls_context, implicit_tls=implicit_tls)
        self.access = access
        self.policy = policy or Pop3Policy(
            tls_available=tls_context is not None and not implicit_tls
        )

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        io = StreamIO(reader, writer, self.tls_context)
        s = _Pop3Session(Pop3Connection(self.policy, tls_active=self.implicit_tls), io)
        s.task = asyncio.current_task()
        self.live.add(s)
        try:
            io.write(s.conn.greeting())
            await self._serve(s)
        except (ConnectionError, OSError, ProtocolError, ssl.SSLError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("POP3 connection failed")
        finally:
            self.live.discard(s)
            s.task = None
        shared, s.shared = s.shared, None
        if shared is not None:
            # Without QUIT nothing is deleted (RFC 1939 §6): just let go.
            await self._release(self.access.release(shared), "POP3")
        io.close()

    async def _serve(self, s: _Pop3Session) -> None:
        conn, io = s.conn, s.io
        while not conn.closed:
            event = conn.next_event()
            if event is None:
                if io.buffered() > 0:
                    await io.drain()
                data = await io.read()
                if not data:
                    return
                s.last = time.monotonic()
                conn.receive_data(data)
                continue
            if isinstance(event, Send):
                io.write(event.data)
                if event.close:
                    break
            elif isinstance(event, StartTLS):
                io.write(event.data)
                await io.start_tls()
                conn.tls_started()
            elif isinstance(event, AuthRequest):
                io.write(await self._login(s, event))
            elif isinstance(event, Retrieve):
                io.write(conn.message(self._message(s, event.uid)))
                await io.drain()
            elif isinstance(event, Quit):
                io.write(await self._update(s, event))
        await io.drain()

    async def _login(self, s: _Pop3Session, req: AuthRequest) -> bytes:
        result = await self.access.login(s.io.peer_ip, req.user, req.secret)
        shared = result.shared
        if shared is None:
            if result.refused:
                return s.conn.auth_result(
                    False, code="SYS/TEMP", text="Too many failed logins; try again later"
                )
            if result.unavailable:
                return s.conn.auth_result(False, code="SYS/TEMP", text="Mailbox unavailable")
            # RFC 2449 §8.1.2 / RFC 3206: the same [AUTH] for unknown user and bad secret.
            return s.conn.auth_result(False)
        s.shared = shared
        inbox = shared.mailbox.find_folder("INBOX")
        if inbox is None:  # pragma: no cover - every mailbox has INBOX
            return s.conn.auth_result(False, code="SYS/TEMP", text="Mailbox unavailable")
        s.folder_id = inbox.id
        rows = shared.mailbox.message_columns(inbox.id, [(1, 2**32 - 1)], ("size",))
        drop = [MaildropEntry(int(size), f"{inbox.uidvalidity}.{uid}") for uid, size in rows]
        return s.conn.auth_result(True, drop)

    def _message(self, s: _Pop3Session, uidl: str) -> bytes | None:
        if s.shared is None:
            return None
        uid = int(uidl.rsplit(".", 1)[1])
        mbx = s.shared.mailbox
        rows = mbx.message_columns(s.folder_id, [(uid, uid)], ("content_id",))
        if not rows:
            return None  # expunged meanwhile (an IMAP session): -ERR, session goes on
        return mbx.content(int(rows[0][1]))

    async def _update(self, s: _Pop3Session, quit_: Quit) -> bytes:
        if s.shared is None or not quit_.deletions:
            return s.conn.update_done(True)
        uids = [int(u.rsplit(".", 1)[1]) for u in quit_.deletions]
        try:
            await s.shared.mailbox.expunge_messages(s.folder_id, uids, deleted_only=False)
        except Exception:
            log.exception("POP3 deletions failed")
            return s.conn.update_done(False)
        s.shared.notify()
        return s.conn.update_done(True)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP)
            now = time.monotonic()
            for s in list(self.live):
                limit = TIMEOUT_PREAUTH if s.shared is None else TIMEOUT_TRANSACTION
                if now - s.last > limit:
                    # RFC 1939 §3: an autologout timer ends the session without UPDATE.
                    s.io.close()
                    if s.task is not None:
                        s.task.cancel()


async def _start(services: ServicesLike, host: str, port: int, implicit: bool) -> int:
    ctx = tls_context_for(services)
    if implicit and ctx is None:
        raise RuntimeError("pop3s needs a TLS certificate")
    server = Pop3Server(access_for(services), ctx, implicit_tls=implicit)
    listener = await server.start(host, port)
    services.servers.append(listener)
    return listener.port


async def start_pop3(services: Any, host: str, port: int) -> int:
    """Port 110: STLS required before USER/PASS or AUTH (RFC 2595 §4)."""
    return await _start(services, host, port, False)


async def start_pop3s(services: Any, host: str, port: int) -> int:
    """Port 995: TLS from the first byte (RFC 8314 §3.3)."""
    return await _start(services, host, port, True)
