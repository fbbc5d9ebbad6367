"""The SMTP listener: aiosmtpd with our banner, limits, TLS and enhanced status codes."""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import socket
import ssl
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, AnyStr, cast

import aiosmtpd
from aiosmtpd import smtp as _aiosmtpd
from aiosmtpd.smtp import SMTP

from mailfort.smtp.codes import with_enhanced_code
from mailfort.smtp.conncount import SharedConnectionCounts, TableFull

DATA_SIZE_LIMIT = 50 * 1024 * 1024
# RFC 5321 §4.5.3.1.6 says 1000, but real mail carries longer lines and Postfix takes
# them; the bound still caps what one line can make the server buffer.
LINE_LIMIT = 64 * 1024
MAX_PER_IP = 20

log = logging.getLogger("mailfort.smtp.server")

# aiosmtpd logs peers' addresses and the envelope at INFO and above: our logs carry neither.
logging.getLogger("mail.log").disabled = True


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


# The aiosmtpd release whose SMTP.__init__ _fast_init mirrors; any other takes the slow path.
_AIOSMTPD_MIRRORED = "1.4.6"

# A plain envelope address in angle brackets: dot-atom local part, dot-atom domain, ASCII.
# For these, email's get_angle_addr returns the address unchanged; anything else (quoted
# local parts, source routes, comments, domain literals, UTF-8) goes to aiosmtpd's parser.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ANGLE_ADDR = re.compile(
    rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>"
    # email's parser drops the white space after ">" (not a comment: those go to it)
    r"(?:[ \t]+([\x21-\x27\x29-\x7e][\x21-\x7e \t]*)?)?"
)


@dataclass(frozen=True)
class _MethodTables:
    """What aiosmtpd's SMTP.__init__ finds by introspection, by attribute name."""

    auth: tuple[tuple[str, str, bool], ...]  # (mechanism, attribute, on the protocol)
    hooks: tuple[tuple[str, str], ...]  # (command, handler attribute)
    smtp: tuple[tuple[str, str], ...]  # (command, protocol attribute)
    ehlo_hook_ver: str | None


def _method_tables(cls: type[SMTP], handler: Any) -> _MethodTables:
    """The introspection of aiosmtpd 1.4.6 SMTP.__init__, done on names (same order)."""
    auth: list[tuple[str, str, bool]] = []
    for obj, is_self in ((cls, True), (handler, False)):
        for mname, mfunc in inspect.getmembers(obj):
            if mname.startswith("auth_"):
                mech = getattr(mfunc, "__auth_mechanism_name__", None)
                if mech is None:
                    mech = mname.replace("auth_", "").replace("__", "-")
                auth.append((mech, mname, is_self))
    hooks = tuple((m.replace("handle_", ""), m) for m in dir(handler) if m.startswith("handle_"))
    ehlo_hook_ver = None
    for name, attr in hooks:
        if name == "EHLO":
            params = len(inspect.signature(getattr(handler, attr)).parameters)
            if params == 4:
                ehlo_hook_ver = "old"  # SMTP.__init__ warns of it again on the slow path
            elif params == 5:
                ehlo_hook_ver = "new"
            else:
                raise RuntimeError("Unsupported EHLO Hook")
    smtp = tuple((m.replace("smtp_", ""), m) for m in dir(cls) if m.startswith("smtp_"))
    return _MethodTables(tuple(auth), hooks, smtp, ehlo_hook_ver)


# Per handler object, then per protocol class: handlers live as long as their listener.
_TABLES: weakref.WeakKeyDictionary[Any, dict[type[SMTP], _MethodTables]] = (
    weakref.WeakKeyDictionary()
)


class MailfortSMTP(SMTP):
    """aiosmtpd with our policies; one instance per connection."""

    line_length_limit = LINE_LIMIT

    def __init__(
        self, handler: Any, *, connections: ConnectionTable, max_per_ip: int, **kwargs: Any
    ) -> None:
        if aiosmtpd.__version__ == _AIOSMTPD_MIRRORED and self._fast_init(handler, **kwargs):
            pass
        else:
            super().__init__(handler, **kwargs)
        self._connections = connections
        self._max_per_ip = max_per_ip
        self._counted = False
        self._counted_transport: asyncio.BaseTransport | None = None
        self._counted_ip = ""
        self._raw_replies = False
        self._refused = False
        self._groupable = False
        self._hold_all = False  # within a multi-line reply (EHLO): one write at its end
        self._held: list[bytes] = []  # replies held back while the client pipelines

    def _fast_init(
        self,
        handler: Any,
        *,
        data_size_limit: int | None = _aiosmtpd.DATA_SIZE_DEFAULT,
        enable_SMTPUTF8: bool = False,
        decode_data: bool = False,
        hostname: str | None = None,
        ident: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        timeout: float = 300,
        auth_required: bool = False,
        auth_require_tls: bool = True,
        auth_exclude_mechanism: Iterable[str] | None = None,
        auth_callback: Any = None,
        command_call_limit: int | dict[str, int] | None = None,
        authenticator: Any = None,
        proxy_protocol_timeout: float | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> bool:
        """aiosmtpd 1.4.6's SMTP.__init__ for our settings, its introspection done once.

        SMTP.__init__ runs inspect.getmembers and dir on the protocol and the handler and
        inspect.signature on the EHLO hook for every connection (~0.27 ms). The tables come
        from names only, so they are worked out once per handler and protocol class and
        bound here. Settings aiosmtpd would warn about or refuse, and handlers it cannot
        key on, return False: the caller then runs SMTP.__init__ itself.
        ``tests/test_smtp_perf_safety.py`` checks the result against SMTP.__init__.
        """
        if (
            (
                tls_context is not None
                and (
                    tls_context.verify_mode not in {ssl.CERT_NONE, ssl.CERT_OPTIONAL}
                    or tls_context.check_hostname
                )
            )
            or (auth_required and not auth_require_tls)
            or (proxy_protocol_timeout is not None and proxy_protocol_timeout < 3.0)
            or (command_call_limit is not None and not isinstance(command_call_limit, int))
            or not (data_size_limit is None or isinstance(data_size_limit, int))
        ):
            return False
        try:
            per_handler = _TABLES.get(handler)
            if per_handler is None:
                per_handler = _TABLES[handler] = {}
        except TypeError:  # neither hashable nor weakly referable
            return False
        cls = type(self)
        tables = per_handler.get(cls)
        if tables is None:
            tables = per_handler[cls] = _method_tables(cls, handler)

        self.__ident__ = ident or _aiosmtpd.__ident__
        self.loop = loop if loop else _aiosmtpd.make_loop()
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=self.loop,
        )
        self.event_handler = handler
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = enable_SMTPUTF8
        self._decode_data = decode_data
        self.command_size_limits.clear()
        self.hostname = hostname if hostname else socket.getfqdn()
        self.tls_context = tls_context
        self.require_starttls = tls_context and require_starttls
        self._timeout_duration = timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = auth_require_tls
        if proxy_protocol_timeout is not None and proxy_protocol_timeout <= 0:
            raise ValueError("proxy_protocol_timeout must be > 0")
        self._proxy_timeout = proxy_protocol_timeout
        if authenticator is not None:
            self._authenticator = authenticator
            self._auth_callback = None
        else:
            self._auth_callback = auth_callback or _aiosmtpd.login_always_fail
            self._authenticator = None
        self._auth_required = auth_required
        self._auth_methods = {
            mech: _aiosmtpd._AuthMechAttr(getattr(self if own else handler, name), own)
            for mech, name, own in tables.auth
        }
        for m in auth_exclude_mechanism or []:
            self._auth_methods.pop(m, None)
        self._handle_hooks = {cmd: getattr(handler, name) for cmd, name in tables.hooks}
        self._ehlo_hook_ver = tables.ehlo_hook_ver
        self._smtp_methods = {cmd: getattr(self, name) for cmd, name in tables.smtp}
        if command_call_limit is None:
            self._enforce_call_limit = False
        else:
            self._enforce_call_limit = True
            self._call_limit_base = {}
            self._call_limit_default = command_call_limit
        return True

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd's version defines a typing.Protocol class on every call (~0.1 ms) and runs
        # email's header parser; a plain <local@domain> needs neither, and gives the same
        # answer (the handlers then check the address with hygiene.valid_mailbox).
        m = _PLAIN_ANGLE_ADDR.fullmatch(arg.lstrip())
        if m is None:
            return super()._getaddr(arg)
        addr = m.group(1)
        if self.local_part_limit and len(addr.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return addr, m.group(2) or ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._counted:  # STARTTLS calls this again on the same connection
            self._counted = True
            self._counted_transport = transport
            self._counted_ip = peer_address(transport)
            if not self._connections.admit(transport, self._max_per_ip, self._counted_ip):
                self._refused = True
                # uvloop's transports are not asyncio.WriteTransport subclasses, but write.
                cast(asyncio.WriteTransport, transport).write(
                    b"421 4.7.0 Too many connections from your address\r\n"
                )
                transport.close()
                return
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        if not self._refused:  # a refused connection never started an SMTP session
            super().connection_lost(exc)

    def _release(self) -> None:
        if self._counted_transport is not None:
            self._connections.release(self._counted_transport, self._counted_ip)
            self._counted_transport = None

    def eof_received(self) -> bool:
        # aiosmtpd stops the session at EOF but keeps a plain socket half-open (CLOSE-WAIT)
        # until the idle timeout; SMTP has nothing to send to a client that stopped talking.
        super().eof_received()
        return False

    async def smtp_STARTTLS(self, arg: str) -> None:
        try:
            await super().smtp_STARTTLS(arg)
        except Exception:
            # A failed handshake (old protocol, client gone) leaves aiosmtpd reading from a
            # dead TLS layer until the idle timeout; end the connection now instead.
            if self._original_transport is not None:
                cast(asyncio.Transport, self._original_transport).abort()
            self._release()  # our connection_lost will not run: the TLS layer holds it
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            if self._handler_coroutine is not None:
                self._handler_coroutine.cancel()

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str) and not self._raw_replies:
            status = with_enhanced_code(status)
        if isinstance(status, str):
            response = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")
        else:
            response = status
        if response.startswith(b"421"):
            # RFC 5321 §3.8: 421 means the server is closing the channel; a handler's 421
            # (a failed webhook target, a domain rule) must not leave the session open.
            self._held.append(response + b"\r\n")
            data = b"".join(self._held)
            self._held.clear()
            await self._send(data)
            if self.transport is not None:
                self.transport.close()  # after the buffered reply is written
            return
        if self._hold_all or (self._groupable and self._command_waiting()):
            # RFC 2920: the client pipelined; it reads this reply with the next ones.
            self._held.append(response + b"\r\n")
            return
        if self._held:
            self._held.append(response + b"\r\n")
            data = b"".join(self._held)
            self._held.clear()
        else:
            data = response + b"\r\n"
        await self._send(data)

    async def _flush(self) -> None:
        if self._held and self.transport is not None:
            data = b"".join(self._held)
            self._held.clear()
            await self._send(data)

    async def _send(self, data: bytes) -> None:
        """StreamWriter.write + drain, without the drain when it would return at once.

        drain() raises the reader's error, yields once when the transport is closing, and
        waits while the transport is paused (buffer above the high-water mark) or raises
        when the connection is lost. When none of that applies it returns immediately,
        and its two coroutine calls per reply are all it costs; skip them then.
        """
        writer = self._writer
        writer.write(data)
        if (
            # asyncio.FlowControlMixin's own flags, the ones drain() reads (not in typeshed)
            self._paused  # type: ignore[attr-defined]
            or self._connection_lost  # type: ignore[attr-defined]
            or writer.transport.is_closing()
            or self._reader.exception() is not None
        ):
            await writer.drain()

    def _command_waiting(self) -> bool:
        """Whether a whole command line from the client is buffered, unread, already."""
        buffer = getattr(self._reader, "_buffer", None)
        return isinstance(buffer, bytearray) and b"\n" in buffer

    async def _grouped(self, method: Any, arg: str | None) -> None:
        # Only replies to MAIL, RCPT and RSET may wait for the next command's (RFC 2920
        # §3.1 lets a client pipeline these); anything else sends what waits with its own.
        self._groupable = True
        try:
            await method(arg)
        finally:
            self._groupable = False

    async def smtp_MAIL(self, arg: str | None) -> None:
        await self._grouped(super().smtp_MAIL, arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        await self._grouped(super().smtp_RCPT, arg)

    async def smtp_RSET(self, arg: str) -> None:
        await self._grouped(super().smtp_RSET, arg)

    async def smtp_QUIT(self, arg: str) -> None:
        if not arg:
            # The session ends with this reply. Give the slot back before the client can
            # read it: a client that reconnects at once (one connection per message, as
            # smtp-source and many MTAs do) may land on another worker, which must not
            # still count the old connection against the node-wide cap.
            self._release()
        await super().smtp_QUIT(arg)

    async def smtp_EHLO(self, hostname: str) -> None:
        # EHLO keywords must stay bare (RFC 2034 §3): no enhanced codes in this reply.
        self._raw_replies = True
        self._hold_all = True  # aiosmtpd pushes each line of the reply on its own
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._raw_replies = False
            self._hold_all = False
        await self._flush()

    async def smtp_HELO(self, hostname: str) -> None:
        self._raw_replies = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._raw_replies = False


# HELP reads the syntax aiosmtpd's decorator put on its methods: keep it on our wrappers.
for _name in ("smtp_MAIL", "smtp_RCPT", "smtp_RSET", "smtp_QUIT"):
    for _attr in ("__smtp_syntax__", "__smtp_syntax_extended__", "__smtp_syntax_when__"):
        if hasattr(getattr(SMTP, _name), _attr):
            setattr(getattr(MailfortSMTP, _name), _attr, getattr(getattr(SMTP, _name), _attr))


_BDAT_ARGS = re.compile(r"([0-9]{1,18})(?:[ \t]+(LAST))?[ \t]*", re.IGNORECASE)
_BDAT_SIZE_ONLY = re.compile(r"([0-9]{1,18})(?:[ \t].*)?")
_DISCARD_PIECE = 64 * 1024


@dataclass
class _Chunks:
    """BDAT chunks of the current transaction (RFC 3030), kept on the envelope."""

    parts: list[bytes]
    size: int = 0
    refusal: str | None = None  # once set, later chunks are read and dropped


class MXSMTP(MailfortSMTP):
    """The port-25 protocol: MailfortSMTP plus CHUNKING (RFC 3030 BDAT).

    Only here: aiosmtpd refuses some commands before they reach their method (before
    STARTTLS when it is required, before AUTH when that is required), and a BDAT refused
    there would leave its octets to be read as commands. The MX requires neither.
    """

    offers_chunking = True

    @_aiosmtpd.syntax("BDAT <size> [LAST]")
    async def smtp_BDAT(self, arg: str) -> None:
        # RFC 3030 §2: the octets follow the command at once, whatever the reply will be;
        # they are always read (or skipped) in full so that they are never taken for
        # commands. Without a size there is no telling where they end: close.
        m = _BDAT_ARGS.fullmatch(arg or "")
        if m is None:
            sized = _BDAT_SIZE_ONLY.fullmatch(arg or "")
            if sized is None:
                await self.push("501 5.5.4 Syntax: BDAT <size> [LAST]; closing")
                self._close_now()
                return
            await self._skip(int(sized.group(1)))
            await self.push("501 5.5.4 Syntax: BDAT <size> [LAST]")
            return
        size, last = int(m.group(1)), m.group(2) is not None
        assert self.session is not None and self.envelope is not None
        refusal = None
        if not self.session.host_name:
            refusal = "503 5.5.1 Error: send HELO first"
        elif self._auth_required and not self.session.authenticated:
            refusal = "530 5.7.0 Authentication required"
        elif not self.envelope.rcpt_tos:
            refusal = "503 5.5.1 Error: need RCPT command"
        if refusal is not None:
            await self._skip(size)
            await self.push(refusal)
            return
        chunks: _Chunks | None = getattr(self.envelope, "mailfort_chunks", None)
        if chunks is None:
            chunks = _Chunks([])
            setattr(self.envelope, "mailfort_chunks", chunks)  # noqa: B010  # Envelope has no slot
        limit = self.data_size_limit
        if chunks.refusal is None and limit and chunks.size + size > limit:
            # SIZE (RFC 1870 §6): refuse, and drop what came so far rather than hold it.
            chunks.refusal = "552 5.3.4 Message size exceeds fixed maximum message size"
            chunks.parts.clear()
        if chunks.refusal is not None:
            await self._skip(size)
        else:
            try:
                chunks.parts.append(await self._reader.readexactly(size))
            except asyncio.IncompleteReadError:
                return  # the client went away mid-chunk; connection_lost cleans up
        chunks.size += size
        if not last:
            await self.push(chunks.refusal or f"250 2.0.0 {size} octets received")
            return
        if chunks.refusal is not None:
            self._set_post_data_state()  # type: ignore[no-untyped-call]  # LAST ends it
            await self.push(chunks.refusal)
            return
        content = b"".join(chunks.parts)
        chunks.parts.clear()
        self.envelope.original_content = content
        self.envelope.content = (
            content.decode("utf-8", errors="surrogateescape") if self._decode_data else content
        )
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is _aiosmtpd.MISSING else status)

    async def smtp_DATA(self, arg: str) -> None:
        if self.envelope is not None and getattr(self.envelope, "mailfort_chunks", None):
            # RFC 3030 §2: DATA and BDAT do not mix within one transaction.
            await self.push("503 5.5.1 Error: DATA after BDAT; send RSET")
            return
        await super().smtp_DATA(arg)

    async def _skip(self, size: int) -> None:
        """Read and drop ``size`` octets, a piece at a time (none of it is kept)."""
        try:
            while size > 0:
                piece = min(size, _DISCARD_PIECE)
                await self._reader.readexactly(piece)
                size -= piece
        except asyncio.IncompleteReadError:
            return

    def _close_now(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()


# HELP reads the syntax aiosmtpd's decorator put on its methods: keep it on our wrapper.
for _attr in ("__smtp_syntax__", "__smtp_syntax_extended__", "__smtp_syntax_when__"):
    if hasattr(SMTP.smtp_DATA, _attr):
        setattr(MXSMTP.smtp_DATA, _attr, getattr(SMTP.smtp_DATA, _attr))


class EhloExtensions:
    """Mixin for handlers: advertise what the server does beyond aiosmtpd's list."""

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        # aiosmtpd reads pipelined commands in order already; it just does not say so.
        extra = ["250-PIPELINING", "250-ENHANCEDSTATUSCODES"]
        if getattr(server, "offers_chunking", False):
            extra.append("250-CHUNKING")  # RFC 3030
        return [responses[0], *extra, *responses[1:]]


def smtp_factory(
    handler: Any,
    hostname: str,
    tls_context: ssl.SSLContext | None,
    *,
    implicit_tls: bool = False,
    require_starttls: bool = False,
    timeout: float = 300,
    max_per_ip: int = MAX_PER_IP,
    protocol: type[MailfortSMTP] = MailfortSMTP,
    connections: ConnectionTable | None = None,
    **kwargs: Any,
) -> Any:
    """A protocol factory for ``loop.create_server``; ``connections`` defaults to a table
    of this listener's own (per process)."""
    if connections is None:
        connections = ConnectionTable()

    def make() -> MailfortSMTP:
        return protocol(
            handler,
            connections=connections,
            max_per_ip=max_per_ip,
            hostname=hostname,
            ident="ESMTP",
            data_size_limit=DATA_SIZE_LIMIT,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=None if implicit_tls else tls_context,
            require_starttls=require_starttls,
            timeout=timeout,
            **kwargs,
        )

    return make
