"""The asyncio IMAP server: sockets and timers around the sans-IO core and the session.

Listeners: ``imap`` (143, STARTTLS) and ``imaps`` (993, implicit TLS, RFC 8314).  The
loop of one connection is the core's own recipe (see :mod:`mailfort.imap.connection`):
read, feed, pull events, let the :class:`~mailfort.imap.session.Session` answer.

Timers are not per connection: one sweeper task per listener wakes every few seconds,
closes connections idle past their limit (RFC 9051 §5.4: at least 30 minutes once
logged in; a minute before) and keeps IDLE connections alive through NAT with
``* OK Still here`` every two minutes.  An idle connection thus costs its socket, its
TLS state and a few small objects, and no timer handle.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from mailfort.directory.service import Directory
from mailfort.guard.logins import LoginGuard, node_guard
from mailfort.imap import commands as c
from mailfort.imap.connection import CommandReceived, Event, ImapConnection, Send
from mailfort.imap.mailboxes import MailAccess
from mailfort.imap.session import Session
from mailfort.imap.state import ServerPolicy
from mailfort.imap.transport import ProtocolError, StreamIO
from mailfort.listening import Listener, SessionServer
from mailfort.store.service import MailStore
from mailfort.tls import server_context

__all__ = ["ImapServer", "Listener", "Timeouts", "access_for", "listeners", "set_access"]

log = logging.getLogger(__name__)

#: Most pipelined APPENDs filed in one commit (their messages are in memory already).
_APPEND_BATCH = 256


class ServicesLike(Protocol):
    """What the listeners use of :class:`mailfort.app.Services` (no import upward)."""

    @property
    def settings(self) -> Any: ...

    @property
    def directory(self) -> Directory: ...

    @property
    def store(self) -> MailStore: ...

    @property
    def servers(self) -> list[asyncio.AbstractServer]: ...


@dataclass(frozen=True, slots=True)
class Timeouts:
    preauth: float = 60.0
    authenticated: float = 30 * 60.0  # RFC 9051 §5.4: at least 30 minutes
    keepalive: float = 120.0  # "* OK Still here" during IDLE
    sweep: float = 5.0
    shutdown: float = 5.0


class _Conn:
    __slots__ = ("conn", "io", "last", "last_keepalive", "session", "task")

    def __init__(self, conn: ImapConnection, io: StreamIO, session: Session) -> None:
        self.conn = conn
        self.io = io
        self.session = session
        self.last = self.last_keepalive = time.monotonic()
        self.task: asyncio.Task[Any] | None = None


class ImapServer(SessionServer):
    """Serves IMAP connections for one listening socket."""

    goodbye = b"* BYE Server shutting down\r\n"

    def __init__(
        self,
        access: MailAccess,
        tls_context: ssl.SSLContext | None,
        *,
        implicit_tls: bool,
        policy: ServerPolicy | None = None,
        timeouts: Timeouts | None = None,
    ) -> None:
        super().__init__(tls_context, implicit_tls=implicit_tls)
        self.access = access
        self.policy = policy or ServerPolicy(
            tls_available=tls_context is not None and not implicit_tls
        )
        self.timeouts = timeouts or Timeouts()
        self.shutdown_timeout = self.timeouts.shutdown

    # -- connections ------------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        io = StreamIO(reader, writer, self.tls_context)
        conn = ImapConnection(self.policy, tls_active=self.implicit_tls)
        session = Session(self.access, conn, io, io.peer_ip)
        state = _Conn(conn, io, session)
        state.task = asyncio.current_task()
        self.live.add(state)
        try:
            io.write(conn.greeting())
            await self._serve(state)
        except (ConnectionError, OSError, ProtocolError, ssl.SSLError):
            pass  # the peer went away or broke the transport: nothing to answer
        except asyncio.CancelledError:
            pass  # autologout or shutdown
        except Exception:
            log.exception("IMAP connection failed")
        finally:
            self.live.discard(state)
            state.task = None
        await self._release(session.close(), "IMAP")
        io.close()

    async def _serve(self, state: _Conn) -> None:
        conn, io, session = state.conn, state.io, state.session
        pending: Event | None = None
        while not conn.closing and not session.must_close:
            event: Event | None = pending if pending is not None else conn.next_event()
            pending = None
            if event is None:
                if io.buffered() > 0:
                    await io.drain()
                data = await io.read()
                if not data:
                    return
                state.last = time.monotonic()
                conn.receive_data(data)
                continue
            if isinstance(event, Send):
                io.write(event.data)
                if event.close:
                    break
                continue
            if isinstance(event, CommandReceived) and isinstance(event.command, c.Append):
                # APPENDs already buffered behind this one are filed in one commit. APPEND
                # changes no session state, so reading the next commands early is safe;
                # the first other event waits its turn.
                batch = [event.command]
                while len(batch) < _APPEND_BATCH:
                    pending = conn.next_event()
                    if not (
                        isinstance(pending, CommandReceived)
                        and isinstance(pending.command, c.Append)
                    ):
                        break
                    batch.append(pending.command)
                    pending = None
                if len(batch) > 1:
                    await session.run_appends(batch)
                    continue
            await session.handle(event)
        await io.drain()

    # -- timers -----------------------------------------------------------------------

    async def _sweep(self) -> None:
        t = self.timeouts
        while True:
            await asyncio.sleep(t.sweep)
            now = time.monotonic()
            for state in list(self.live):
                idle_for = now - state.last
                limit = t.preauth if state.session.shared is None else t.authenticated
                if idle_for > limit:
                    # RFC 9051 §7.1.5: BYE before closing for inactivity.
                    state.io.write(b"* BYE Autologout; idle for too long\r\n")
                    if state.io.buffered() > 1 << 20:
                        state.io.abort()  # a client that stopped reading: don't wait on it
                    else:
                        state.io.close()
                    if state.task is not None:
                        state.task.cancel()
                elif state.session.idling is not None and now - state.last_keepalive > t.keepalive:
                    state.last_keepalive = now
                    state.io.write(b"* OK Still here\r\n")


# ---- wiring -------------------------------------------------------------------------

_ACCESS: dict[int, tuple[ServicesLike, MailAccess]] = {}


def set_access(services: ServicesLike, access: MailAccess) -> None:
    """Use ``access`` (a custom guard or quota) for the listeners of ``services``."""
    _ACCESS[id(services)] = (services, access)


def _login_guard(services: ServicesLike) -> LoginGuard:
    """Failed logins counted node-wide when the workers share a table (made before the
    fork), with counter names every worker derives alike from the server key."""
    return node_guard(getattr(services, "memo", None), services.directory.server_key)


def access_for(services: ServicesLike) -> MailAccess:
    """The logins and open mailboxes shared by the IMAP and POP3 listeners of a process.

    Quota limits are the store's (``MAILFORT_QUOTA_BYTES`` / ``MAILFORT_QUOTA_MESSAGES``,
    0: none), so APPEND and COPY enforce what delivery does.
    """
    entry = _ACCESS.get(id(services))
    if entry is None or entry[0] is not services:
        quota = services.store.quota
        access = MailAccess(
            services.directory,
            services.store,
            _login_guard(services),
            quota_storage=quota.storage,
            quota_messages=quota.messages,
        )
        set_access(services, access)
        return access
    return entry[1]


def tls_context_for(services: ServicesLike) -> ssl.SSLContext | None:
    settings = services.settings
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    return server_context(settings.tls_cert, settings.tls_key)


async def _start_imap(services: ServicesLike, host: str, port: int, implicit: bool) -> int:
    ctx = tls_context_for(services)
    if implicit and ctx is None:
        raise RuntimeError("imaps needs a TLS certificate")
    server = ImapServer(access_for(services), ctx, implicit_tls=implicit)
    listener = await server.start(host, port)
    services.servers.append(listener)
    return listener.port


async def start_imap(services: Any, host: str, port: int) -> int:
    """Port 143: STARTTLS required before any login (RFC 9051 §6.2.1, LOGINDISABLED)."""
    return await _start_imap(services, host, port, False)


async def start_imaps(services: Any, host: str, port: int) -> int:
    """Port 993: TLS from the first byte (RFC 8314 §3.3)."""
    return await _start_imap(services, host, port, True)


def listeners() -> dict[str, Callable[[Any, str, int], Awaitable[int]]]:
    """The mail access listeners, IMAP and POP3, for ``mailfort.app``."""
    from mailfort.pop3.server import start_pop3, start_pop3s

    return {
        "imap": start_imap,
        "imaps": start_imaps,
        "pop3": start_pop3,
        "pop3s": start_pop3s,
    }
