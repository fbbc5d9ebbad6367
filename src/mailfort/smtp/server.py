"""The SMTP listener: `core.ServerCore` driven by an asyncio protocol, handlers called per event.

The protocol reads into the core, takes its events and calls the handler's hooks, which
keep aiosmtpd's calling convention (``handle_MAIL(server, session, envelope, address,
options)``, ``handle_RCPT(...)``, ``handle_DATA(server, session, envelope)``, each returning
the reply line). Simple commands never leave the core; a hook runs as a task and input
waits in the core meanwhile. Replies are written when the core has consumed all it was
given, so pipelined commands (RFC 2920) get their replies in one write.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

from mailfort.smtp import core as core_mod
from mailfort.smtp.conncount import SharedConnectionCounts, TableFull
from mailfort.smtp.core import DATA_SIZE_LIMIT, CoreConfig, ServerCore

__all__ = [
    "DATA_SIZE_LIMIT",
    "MAX_PER_IP",
    "ConnectionTable",
    "Envelope",
    "LoginRefused",
    "Session",
    "smtp_factory",
]

MAX_PER_IP = 20
IDLE_TIMEOUT = 300.0  # RFC 5321 §4.5.3.2.7: at least 5 minutes between commands
# Without a reply for this long the session ends even if octets keep coming: a client
# dripping a byte at a time would otherwise hold its slot for ever. A command gets the
# idle time; a message, slow links and 50 MB in mind, longer.
COMMAND_TIMEOUT = 300.0
MESSAGE_TIMEOUT = 1800.0
HANDSHAKE_TIMEOUT = 30.0
# Pause reading when this much input waits behind a running hook (pipelined commands,
# message octets); the core holds at most a message otherwise.
_PAUSE_ABOVE = 1024 * 1024

log = logging.getLogger("mailfort.smtp.server")


def peer_address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) else "local"


class ConnectionTable:
    """Live connections per client address, for the per-IP cap.

    It holds the accepted transports themselves and counts those still open: a TLS
    handshake that fails after STARTTLS never reaches our connection_lost, so a counter
    decremented there would leak; a closed transport reports ``is_closing()`` whatever
    path closed it.

    With ``shared`` (a `conncount.SharedConnectionCounts` made before the workers were
    forked) the cap holds for the node: this worker publishes its own live count per
    address into its column of the shared table, and the cap applies to the sum over the
    workers. The local transports stay the truth; `release` (connection_lost, a failed
    STARTTLS) publishes a closed connection at once, and a sweep every few seconds
    republishes whatever closed by a path that told nobody.
    """

    SWEEP_SECONDS = 2.0

    def __init__(self, shared: SharedConnectionCounts | None = None, worker: int = 0) -> None:
        self._by_ip: dict[str, set[asyncio.BaseTransport]] = {}
        self._admitted = 0
        self._shared = shared
        self._worker = worker
        self._published: dict[str, int] = {}  # what our column in ``shared`` holds
        self._sweep_handle: asyncio.TimerHandle | None = None

    def admit(self, transport: asyncio.BaseTransport, limit: int, ip: str | None = None) -> bool:
        if ip is None:
            ip = peer_address(transport)
        self._admitted += 1
        if self._admitted % 1024 == 0:  # now and then, forget addresses gone quiet
            self._by_ip = {k: v for k, v in self._by_ip.items() if self._live(v)}
        live = self._live(self._by_ip.get(ip, set()))
        live.add(transport)
        self._by_ip[ip] = live
        if self._shared is None:
            return len(live) <= limit
        if self._publish(ip, len(live)) <= limit:
            self._schedule_sweep()
            return True
        # Refused: it never counts, here or in the other workers' view.
        live.discard(transport)
        self._publish(ip, len(live))
        return False

    def release(self, transport: asyncio.BaseTransport, ip: str) -> None:
        """The connection ended (idempotent)."""
        live = self._by_ip.get(ip)
        if live is None or transport not in live:
            return
        live.discard(transport)
        if self._shared is not None:
            self._publish(ip, len(self._live(live)))

    def count(self, ip: str) -> int:
        """Live connections from ``ip``: node-wide with a shared table, else this worker's."""
        if self._shared is not None:
            return self._shared.count(ip)
        return len(self._live(self._by_ip.get(ip, set())))

    def _publish(self, ip: str, live: int) -> int:
        """Make our column for ``ip`` say ``live``; the node-wide count after it."""
        assert self._shared is not None
        delta = live - self._published.get(ip, 0)
        try:
            total = self._shared.add(self._worker, ip, delta) if delta else self._shared.count(ip)
        except TableFull:
            # More addresses connected at once than the table has slots: keep the cap
            # per worker for this one rather than refuse everyone.
            log.warning("shared connection table full; per-worker cap for new addresses")
            return live
        if live:
            self._published[ip] = live
        else:
            self._published.pop(ip, None)
        return total

    def _schedule_sweep(self) -> None:
        if self._sweep_handle is None:
            loop = asyncio.get_running_loop()
            self._sweep_handle = loop.call_later(self.SWEEP_SECONDS, self._sweep)

    def _sweep(self) -> None:
        self._sweep_handle = None
        for ip in list(self._by_ip):
            live = self._live(self._by_ip[ip])
            if live:
                self._by_ip[ip] = live
            else:
                del self._by_ip[ip]
            if self._published.get(ip, 0) != len(live):
                self._publish(ip, len(live))
        if self._by_ip:
            self._schedule_sweep()

    @staticmethod
    def _live(transports: set[asyncio.BaseTransport]) -> set[asyncio.BaseTransport]:
        return {t for t in transports if not t.is_closing()}


class Session:
    """What the handlers see of the connection (aiosmtpd's attribute names)."""

    def __init__(self, peer: Any, ssl_active: bool) -> None:
        self.peer = peer
        self.ssl = ssl_active
        self.host_name: str | None = None
        self.authenticated = False
        self.auth_data: Any = None


class Envelope:
    """One mail transaction; handlers add attributes of their own (``envelope.mailfort``)."""

    def __init__(self) -> None:
        self.mail_from: str | None = None  # "" for the null reverse-path
        self.mail_options: list[str] = []
        self.smtp_utf8 = False
        self.rcpt_tos: list[str] = []
        self.original_content: bytes | None = None


class Handler(Protocol):
    """The hooks return the reply line, or an awaitable of it (an ``async def`` hook's
    coroutine, or a plain hook's when it must wait). A reply given at once costs no task:
    that is the common MAIL and, with the recipient's route cached, RCPT."""

    def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str | Awaitable[str]: ...

    def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str | Awaitable[str]: ...

    def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str | Awaitable[str]: ...


# (client address, login, password) -> the user, or None for wrong credentials; raises
# LoginRefused when failed logins from there (or for that account) are being refused.
Authenticator = Callable[[str, bytes, bytes], Awaitable[Any]]


class LoginRefused(Exception):
    """Too many failed logins: the credentials were not checked."""


class SMTPProtocol(asyncio.Protocol):
    """One SMTP connection."""

    def __init__(
        self,
        handler: Handler,
        config: CoreConfig,
        *,
        connections: ConnectionTable,
        max_per_ip: int,
        tls_context: ssl.SSLContext | None,
        implicit_tls: bool,
        timeout: float,
        authenticate: Authenticator | None,
        command_timeout: float = COMMAND_TIMEOUT,
        message_timeout: float = MESSAGE_TIMEOUT,
    ) -> None:
        self._handler = handler
        self._config = config
        self._connections = connections
        self._max_per_ip = max_per_ip
        self._tls_context = tls_context
        self._implicit_tls = implicit_tls
        self._timeout = timeout
        self._command_timeout = command_timeout
        self._message_timeout = message_timeout
        self._authenticate = authenticate
        self._core = ServerCore(config, tls=implicit_tls)
        self._transport: asyncio.Transport | None = None
        self._ip = ""
        # The transport the per-IP table counts: the TCP one, also after STARTTLS.
        self._counted: asyncio.BaseTransport | None = None
        self._busy = False  # a hook or the TLS handshake runs
        self._eof = False
        self._write_paused = False
        self._read_paused = False
        self._last = 0.0  # when octets last came
        self._progress = 0.0  # when a reply last went out
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None  # the running hook (held: tasks are weak)
        self.session: Session | None = None
        self.envelope = Envelope()

    # ---- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = t = cast(asyncio.Transport, transport)
        self._ip = peer_address(t)
        if not self._connections.admit(t, self._max_per_ip, self._ip):
            self._core.refuse_connection("421 4.7.0 Too many connections from your address")
            self._flush()
            t.close()
            return
        self._counted = t
        self.session = Session(t.get_extra_info("peername"), self._implicit_tls)
        loop = asyncio.get_running_loop()
        self._last = self._progress = loop.time()
        self._timer = loop.call_later(min(self._timeout, self._command_timeout), self._check_idle)
        self._core.greeting()
        self._flush()

    def data_received(self, data: bytes) -> None:
        core = self._core
        core.receive(data)
        if self._busy or self._write_paused:
            if core.buffered > _PAUSE_ABOVE and not self._read_paused and self._transport:
                self._read_paused = True
                self._transport.pause_reading()
            return
        self._last = asyncio.get_running_loop().time()
        self._advance()

    def eof_received(self) -> bool:
        # The client sends nothing more; answer what it sent, then close (a half-open
        # socket would otherwise sit in CLOSE-WAIT until the idle timeout).
        self._eof = True
        if self._busy:
            return True  # closed once the running hook has answered
        self._advance()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None
        # A running hook is not cancelled: a message being stored is stored (the client,
        # with no reply, sends it again; that duplicate beats a loss).

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._read_paused and not self._busy and self._transport is not None:
            self._read_paused = False
            self._transport.resume_reading()
        if not self._busy:
            self._advance()

    # ---- the session ------------------------------------------------------------------

    def _advance(self) -> None:
        """Run the core until it needs input or a hook; then write what it said."""
        core = self._core
        while not self._write_paused:
            try:
                event = core.next_event()
            except Exception:
                # A bug of ours must cost this session, not the worker or other sessions.
                log.exception("SMTP protocol core failed")
                core.refuse_connection("421 4.3.0 Internal error, closing connection")
                self._finish()
                return
            if event is None:
                break
            loop = asyncio.get_running_loop()
            if isinstance(event, core_mod.Close):
                self._finish()
                return
            if not isinstance(event, (core_mod.StartTLS, core_mod.Credentials)):
                try:
                    answer = self._begin(event)
                except Exception:
                    log.exception("SMTP handler failed")
                    answer = "451 4.3.0 Internal error, try again later"
                if isinstance(answer, str):
                    # A hook that answered at once (MAIL, a cached RCPT): no task.
                    core.reply(answer)
                    continue
                self._busy = True
                self._task = loop.create_task(self._hook(event, answer))
                return
            self._busy = True
            if isinstance(event, core_mod.StartTLS):
                self._flush()
                # Nothing more from the plain socket: what the client pipelined behind
                # STARTTLS is dropped by the core, and what arrives from here on (even
                # before start_tls() returns to us) is TLS.
                if self._transport is not None:
                    self._transport.pause_reading()
                self._task = loop.create_task(self._start_tls())
            else:
                # Replies so far wait for the hook's: pipelined commands (RFC 2920) get
                # their replies in one write.
                self._task = loop.create_task(self._hook(event))
            return
        self._flush()
        if self._eof and not core.waiting and self._transport is not None:
            self._transport.close()

    def _flush(self) -> None:
        data = self._core.outgoing()
        if data and self._transport is not None:
            self._transport.write(data)
            self._progress = asyncio.get_running_loop().time()

    def _finish(self) -> None:
        """Write what is queued, then close (after QUIT, a 421, lost framing)."""
        # Give the per-IP slot back before the client can read the reply: a client that
        # reconnects at once (one connection per message, as smtp-source and many MTAs do)
        # may land on another worker, which must not still count this connection.
        self._release()
        self._flush()
        if self._transport is not None:
            self._transport.close()

    async def _hook(
        self,
        event: core_mod.MailFrom | core_mod.RcptTo | core_mod.Message | core_mod.Credentials,
        answer: Awaitable[str] | None = None,
    ) -> None:
        """Wait for a hook's answer (``answer``, what `_begin` returned) or check AUTH
        credentials, reply, and go on with the session."""
        try:
            if isinstance(event, core_mod.Credentials):
                try:
                    ok = await self._check_credentials(event)
                except LoginRefused:
                    # RFC 4954 §6: temporary; the client may try again later.
                    self._core.auth_result(False, "454 4.7.0 Too many failed logins, try later")
                else:
                    self._core.auth_result(ok)
            else:
                assert answer is not None
                try:
                    self._core.reply(await answer)
                finally:
                    if isinstance(event, core_mod.Message):
                        self.envelope = Envelope()
        except Exception:
            log.exception("SMTP handler failed")
            if isinstance(event, core_mod.Credentials):
                self._core.auth_result(False)
            else:
                self._core.reply("451 4.3.0 Internal error, try again later")
        self._busy = False
        if self._transport is None:
            return  # the client went away meanwhile
        if self._read_paused and not self._write_paused:
            self._read_paused = False
            self._transport.resume_reading()
        self._last = asyncio.get_running_loop().time()
        self._advance()
        if self._eof and not self._core.waiting and self._transport is not None:
            self._transport.close()

    def _begin(
        self, event: core_mod.MailFrom | core_mod.RcptTo | core_mod.Message
    ) -> str | Awaitable[str]:
        """Call the event's hook: its reply, or an awaitable of it. A hook may be a plain
        function that answers at once (or returns an awaitable when it must wait), or a
        coroutine function."""
        handler, session, envelope = self._handler, self.session, self.envelope
        assert session is not None
        session.host_name = self._core.helo
        if isinstance(event, core_mod.MailFrom):
            envelope = self.envelope = Envelope()
            envelope.smtp_utf8 = event.smtputf8
            return handler.handle_MAIL(self, session, envelope, event.address, list(event.options))
        if isinstance(event, core_mod.RcptTo):
            return handler.handle_RCPT(self, session, envelope, event.address, list(event.options))
        envelope.original_content = event.content
        try:
            answer = handler.handle_DATA(self, session, envelope)
        except BaseException:
            self.envelope = Envelope()
            raise
        if isinstance(answer, str):
            self.envelope = Envelope()
        return answer

    async def _check_credentials(self, event: core_mod.Credentials) -> bool:
        if self._authenticate is None or self.session is None:
            return False
        user = await self._authenticate(self._ip, event.login, event.password)
        if user is None:
            return False
        self.session.authenticated = True
        self.session.auth_data = user
        return True

    async def _start_tls(self) -> None:
        transport, context = self._transport, self._tls_context
        assert transport is not None and context is not None
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                transport, self, context, server_side=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
            )
        except Exception:
            # A failed handshake (old protocol, not TLS at all, client gone): end it now.
            # Our connection_lost may not run (the TLS layer held the transport).
            transport.abort()
            self._release()
            if self._timer is not None:
                self._timer.cancel()
            self._transport = None
            return
        if tls is None:  # the connection closed during the handshake
            return
        self._transport = tls
        self._read_paused = False  # a pause during the handshake held the plain socket
        assert self.session is not None
        self.session.ssl = True
        self.session.host_name = None
        self.envelope = Envelope()
        self._core.tls_established()
        self._busy = False
        self._last = self._progress = loop.time()
        self._advance()

    def _check_idle(self) -> None:
        self._timer = None
        if self._transport is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        stall = self._message_timeout if self._core.receiving_message else self._command_timeout
        idle_left = self._last + self._timeout - now
        stall_left = self._progress + stall - now
        if self._busy or (idle_left > 0 and stall_left > 0):
            left = min(idle_left, stall_left)
            self._timer = loop.call_later(max(left, 0.25), self._check_idle)
            return
        self._core.timed_out("Idle timeout" if idle_left <= 0 else "Command timeout")
        self._finish()

    def _release(self) -> None:
        if self._counted is not None:
            self._connections.release(self._counted, self._ip)
        self._counted = None


def smtp_factory(
    handler: Any,
    hostname: str,
    tls_context: ssl.SSLContext | None,
    *,
    implicit_tls: bool = False,
    require_starttls: bool = False,
    auth_required: bool = False,
    auth_require_tls: bool = True,
    chunking: bool = False,
    timeout: float = IDLE_TIMEOUT,
    command_timeout: float = COMMAND_TIMEOUT,
    message_timeout: float = MESSAGE_TIMEOUT,
    max_per_ip: int = MAX_PER_IP,
    size_limit: int = DATA_SIZE_LIMIT,
    connections: ConnectionTable | None = None,
    protocol: type[SMTPProtocol] = SMTPProtocol,
) -> Callable[[], SMTPProtocol]:
    """A protocol factory for ``loop.create_server``; ``connections`` defaults to a table
    of this listener's own (per process). AUTH PLAIN and LOGIN are offered when the
    handler has ``authenticate(ip, login, password)`` (see `Authenticator`)."""
    if connections is None:
        connections = ConnectionTable()
    authenticate = getattr(handler, "authenticate", None)
    config = CoreConfig(
        hostname=hostname,
        size_limit=size_limit,
        tls_available=tls_context is not None and not implicit_tls,
        require_tls=require_starttls and tls_context is not None and not implicit_tls,
        auth_mechanisms=("PLAIN", "LOGIN") if authenticate is not None else (),
        auth_required=auth_required,
        auth_requires_tls=auth_require_tls,
        chunking=chunking,
    )
    table = connections

    def make() -> SMTPProtocol:
        return protocol(
            handler,
            config,
            connections=table,
            max_per_ip=max_per_ip,
            tls_context=tls_context,
            implicit_tls=implicit_tls,
            timeout=timeout,
            authenticate=authenticate,
            command_timeout=command_timeout,
            message_timeout=message_timeout,
        )

    return make
