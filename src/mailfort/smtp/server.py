"""The SMTP listener: aiosmtpd with our banner, limits, TLS and enhanced status codes."""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any, AnyStr, cast

from aiosmtpd.smtp import SMTP

from mailfort.smtp.codes import with_enhanced_code

DATA_SIZE_LIMIT = 50 * 1024 * 1024
# RFC 5321 §4.5.3.1.6 says 1000, but real mail carries longer lines and Postfix takes
# them; the bound still caps what one line can make the server buffer.
LINE_LIMIT = 64 * 1024
MAX_PER_IP = 20

# aiosmtpd logs peers' addresses and the envelope at INFO and above: our logs carry neither.
logging.getLogger("mail.log").disabled = True


class ConnectionTable:
    """Live connections per client address, for the per-IP cap.

    It holds the accepted transports themselves and counts those still open: a TLS
    handshake that fails after STARTTLS never reaches our connection_lost, so a counter
    decremented there would leak; a closed transport reports ``is_closing()`` whatever
    path closed it.
    """

    def __init__(self) -> None:
        self._by_ip: dict[str, set[asyncio.BaseTransport]] = {}
        self._admitted = 0

    def admit(self, transport: asyncio.BaseTransport, limit: int) -> bool:
        peer = transport.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) else "local"
        self._admitted += 1
        if self._admitted % 1024 == 0:  # now and then, forget addresses gone quiet
            self._by_ip = {k: v for k, v in self._by_ip.items() if self._live(v)}
        live = self._live(self._by_ip.get(ip, set()))
        live.add(transport)
        self._by_ip[ip] = live
        return len(live) <= limit

    @staticmethod
    def _live(transports: set[asyncio.BaseTransport]) -> set[asyncio.BaseTransport]:
        return {t for t in transports if not t.is_closing()}


class MailfortSMTP(SMTP):
    """aiosmtpd with our policies; one instance per connection."""

    line_length_limit = LINE_LIMIT

    def __init__(
        self, handler: Any, *, connections: ConnectionTable, max_per_ip: int, **kwargs: Any
    ) -> None:
        super().__init__(handler, **kwargs)
        self._connections = connections
        self._max_per_ip = max_per_ip
        self._counted = False
        self._raw_replies = False
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._counted:  # STARTTLS calls this again on the same connection
            self._counted = True
            if not self._connections.admit(transport, self._max_per_ip):
                self._refused = True
                # uvloop's transports are not asyncio.WriteTransport subclasses, but write.
                cast(asyncio.WriteTransport, transport).write(
                    b"421 4.7.0 Too many connections from your address\r\n"
                )
                transport.close()
                return
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._refused:  # a refused connection never started an SMTP session
            super().connection_lost(exc)

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
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            if self._handler_coroutine is not None:
                self._handler_coroutine.cancel()

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str) and not self._raw_replies:
            await super().push(with_enhanced_code(status))
        else:
            await super().push(status)

    async def smtp_EHLO(self, hostname: str) -> None:
        # EHLO keywords must stay bare (RFC 2034 §3): no enhanced codes in this reply.
        self._raw_replies = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._raw_replies = False

    async def smtp_HELO(self, hostname: str) -> None:
        self._raw_replies = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._raw_replies = False


class EhloExtensions:
    """Mixin for handlers: advertise what the server does beyond aiosmtpd's list."""

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        # aiosmtpd reads pipelined commands in order already; it just does not say so.
        extra = ["250-PIPELINING", "250-ENHANCEDSTATUSCODES"]
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
    **kwargs: Any,
) -> Any:
    """A protocol factory for ``loop.create_server``."""
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
