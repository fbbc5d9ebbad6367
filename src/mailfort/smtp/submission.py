"""Authenticated submission (RFC 6409) on 587 (STARTTLS first) and 465 (implicit TLS, RFC 8314).

A user may send only as their own addresses (envelope and From header), within per-user
limits; accepted mail is DKIM-signed by the sender's domain, filed directly for our own
recipients and queued (durably, encrypted) for the rest. 250 comes after both are on disk.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mailfort.auth.dkimsign import sign
from mailfort.delivery import recipient
from mailfort.directory.lookups import RouteCache, signing_keys
from mailfort.directory.service import (
    AuthFailed,
    Directory,
    Route,
    RouteKind,
    User,
    address_owned,
)
from mailfort.guard.logins import LoginGuard
from mailfort.mail.parser import Envelope, apply_envelope_header, iter_headers
from mailfort.outbound.queue import Queue
from mailfort.smtp import hygiene
from mailfort.smtp.limits import SendingLimits
from mailfort.smtp.server import LoginRefused
from mailfort.store.service import MailStore

log = logging.getLogger("mailfort.smtp.submission")

MAX_RECIPIENTS = 100


@dataclass
class _Session:
    user: User
    local: dict[str, User]
    remote: list[str]


class SubmissionHandler:
    """Handler hooks for 587 and 465; ``authenticate`` makes the server offer AUTH."""

    def __init__(
        self,
        directory: Directory,
        store: MailStore,
        queue: Queue,
        limits: SendingLimits,
        hostname: str,
        wake: Callable[[], None] = lambda: None,
        guard: LoginGuard | None = None,
    ) -> None:
        self.directory = directory
        self.store = store
        self.queue = queue
        self.limits = limits
        self.hostname = hostname
        self.wake = wake
        # Failed logins slow down, then are refused (per client and per account).
        self.guard = guard if guard is not None else LoginGuard()
        self._keys = signing_keys(directory)
        # A user sends to the same few addresses: each lookup was a thread hop and three
        # queries.
        self._routes = RouteCache(directory)

    async def _route(self, address: str) -> Route:
        return await self._routes.route(address)

    async def _may_send_as(self, session: Any, user: User, address: str) -> bool:
        # The user's addresses are looked up once per session: a client sends many messages
        # over one authenticated connection, and an alias change applies from the next one.
        owned: set[str] | None = getattr(session, "mailfort_owned", None)
        if owned is None:
            owned = await asyncio.to_thread(self.directory.sendable_addresses, user)
            session.mailfort_owned = owned
        return address_owned(owned, address)

    async def authenticate(self, ip: str, login: bytes, password: bytes) -> User | None:
        """The user, or None; raises `LoginRefused` while failures from ``ip`` or against
        the account are being refused (the guard the IMAP and POP3 logins share)."""
        account = login.decode("utf-8", "replace")

        async def check() -> User | None:
            try:
                return await asyncio.to_thread(
                    self.directory.authenticate, account, password.decode("utf-8", "replace")
                )
            except AuthFailed:
                return None

        outcome = await self.guard.attempt(ip, account, check)
        if outcome.refused:
            raise LoginRefused
        return outcome.value

    @staticmethod
    def _state(session: Any, envelope: Any) -> _Session:
        state = getattr(envelope, "mailfort_submission", None)
        if state is None:
            state = _Session(session.auth_data, {}, [])
            envelope.mailfort_submission = state
        return state

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        user: User = session.auth_data
        if not address or not hygiene.valid_mailbox(address):
            return "501 5.1.7 Bad sender address syntax"
        allowed = await self._may_send_as(session, user, address)
        if not allowed:
            return "553 5.7.1 Sender address not owned by the authenticated user"
        refusal = self.limits.message(str(user.address))
        if refusal:
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        refusal = hygiene.rcpt_refusal(
            address, rcpt_options, len(envelope.rcpt_tos), MAX_RECIPIENTS
        )
        if refusal:
            return refusal
        state = self._state(session, envelope)
        refusal = self.limits.recipient(str(state.user.address))
        if refusal:
            return refusal
        route = await self._route(address)
        if route.kind is RouteKind.UNKNOWN_USER:
            return "550 5.1.1 No such user here"
        if route.kind is RouteKind.LOCAL and not route.forwards:
            for user in route.users:
                state.local[user.mailbox_id] = user
        elif route.kind is RouteKind.LOCAL:
            return "550 5.3.3 Forwarding to outside addresses is not enabled here"
        else:
            state.remote.append(address)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        state = self._state(session, envelope)
        raw: bytes = envelope.original_content
        if hygiene.has_bare_line_end(raw):
            return "550 5.5.2 Message contains bare CR or LF line ends; use CRLF"
        from_addrs = _from_addresses(raw)
        if not from_addrs:
            return "550 5.6.0 A From header is required (RFC 5322 §3.6)"
        for address in from_addrs:
            if not await self._may_send_as(session, state.user, address):
                return "553 5.7.1 From address not owned by the authenticated user"
        message = _complete(raw, self.hostname, from_addrs[0])
        domain = from_addrs[0].rpartition("@")[2].lower()
        try:
            keys = await self._keys.get(domain)
        except Exception:
            log.exception("no DKIM keys for a sending domain")
            keys = []
        signed = await asyncio.to_thread(sign, message, keys) if keys else message
        try:
            await asyncio.gather(
                *(self.store.deliver(recipient(u), signed) for u in state.local.values()),
                *(
                    [
                        self.queue.enqueue(
                            envelope.mail_from, state.remote, signed, str(state.user.address)
                        )
                    ]
                    if state.remote
                    else []
                ),
            )
        except Exception:
            log.exception("submission could not be stored")
            return "451 4.3.0 Temporary failure storing the message, try again"
        if state.remote:
            self.wake()
        return "250 2.6.0 Message accepted"


def _from_addresses(raw: bytes) -> list[str]:
    """Every From address, as the envelope of `mailfort.mail.parse_message` has them (the
    same header reader and address parser, every From field joined), without parsing the
    body: only the top-level header block matters here, and the whole parse cost half a
    millisecond a message."""
    env = Envelope()
    for header in iter_headers(raw, 0, len(raw)):  # stops at the blank line
        if header.lname == b"from":
            apply_envelope_header(env, header.lname, header.value)
    return [
        f"{a.mailbox.decode('utf-8', 'replace')}@{a.domain.decode('utf-8', 'replace')}"
        for a in (env.from_ or [])
        if a.mailbox and a.domain
    ]


def _complete(raw: bytes, hostname: str, sender: str) -> bytes:
    """RFC 6409 §8: a submission server may add the Date and Message-ID a client left out."""
    head = raw.split(b"\r\n\r\n", 1)[0].lower()
    extra = b""
    if not head.startswith(b"date:") and b"\r\ndate:" not in head:
        extra += f"Date: {email.utils.formatdate(localtime=False)}\r\n".encode()
    if not head.startswith(b"message-id:") and b"\r\nmessage-id:" not in head:
        domain = sender.rpartition("@")[2] or hostname
        extra += f"Message-ID: <{os.urandom(12).hex()}@{domain}>\r\n".encode()
    return extra + raw
