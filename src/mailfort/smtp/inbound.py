"""The inbound MX: recipients resolved at RCPT, every message authenticated, then filed.

Policy (issue 6 and design.md): unknown recipients are refused at RCPT (no backscatter);
SPF, DKIM, DMARC and ARC run on every message and one Authentication-Results header of ours
is added; DMARC reject refuses the message unless a trusted forwarder's ARC seal vouches for
it; quarantine files into Junk; a DNS failure answers 451 so the sender retries; and 250 is
sent only once every copy is durable.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
from collections import OrderedDict
from collections.abc import Collection, Hashable
from dataclasses import dataclass, field
from typing import Any

from mailfort.auth import authenticate
from mailfort.delivery import recipient
from mailfort.directory.service import Directory, Route, RouteKind, User
from mailfort.dns import Resolver
from mailfort.smtp import hygiene
from mailfort.smtp.server import EhloExtensions
from mailfort.store.service import MailStore

log = logging.getLogger("mailfort.smtp.inbound")

MAX_RECIPIENTS = 50
ROUTE_CACHE_SIZE = 4096


@dataclass
class InboundPolicy:
    hostname: str
    max_recipients: int = MAX_RECIPIENTS
    trusted_forwarders: Collection[str] = field(default_factory=frozenset)


@dataclass
class _Accepted:
    """What RCPT resolved, kept on the envelope until DATA."""

    users: dict[str, User] = field(default_factory=dict)


def _accepted(envelope: Any) -> _Accepted:
    acc = getattr(envelope, "mailfort", None)
    if acc is None:
        acc = _Accepted()
        envelope.mailfort = acc
    return acc


class InboundHandler(EhloExtensions):
    """aiosmtpd handler hooks for port 25."""

    def __init__(
        self, directory: Directory, store: MailStore, resolver: Resolver, policy: InboundPolicy
    ) -> None:
        self.directory = directory
        self.store = store
        self.resolver = resolver
        self.policy = policy
        # Per worker: RCPT answers by address, valid while the directory's change marker
        # stays what it was when they were looked up (see Directory.change_marker).
        self._routes: OrderedDict[str, Route] = OrderedDict()
        self._routes_marker: Hashable | None = None

    async def _route(self, address: str) -> Route:
        marker = self.directory.change_marker()  # before the lookup: see its docstring
        if marker is None:
            return await asyncio.to_thread(self.directory.route, address)
        if marker != self._routes_marker:
            self._routes.clear()
            self._routes_marker = marker
        route = self._routes.get(address)
        if route is not None:
            self._routes.move_to_end(address)
            return route
        route = await asyncio.to_thread(self.directory.route, address)
        # Another RCPT may have seen a newer marker meanwhile: this answer may predate it.
        if self._routes_marker == marker:
            self._routes[address] = route
            if len(self._routes) > ROUTE_CACHE_SIZE:
                self._routes.popitem(last=False)
        return route

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        if address and not hygiene.valid_mailbox(address):  # "" is the null sender (bounces)
            return "501 5.1.7 Bad sender address syntax"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        refusal = hygiene.rcpt_refusal(
            address, rcpt_options, len(envelope.rcpt_tos), self.policy.max_recipients
        )
        if refusal:
            return refusal
        try:
            route = await self._route(address)
        except Exception:
            log.exception("directory lookup failed")
            return "451 4.3.0 Temporary lookup failure, try again later"
        if route.kind is RouteKind.NOT_HOSTED:
            return "550 5.7.1 Relaying denied"
        if route.kind is RouteKind.UNKNOWN_USER:
            return "550 5.1.1 No such user here"
        if route.forwards:
            # Forwarding relays inside the session (issue 5); until then refuse clearly
            # rather than accept mail we would not deliver.
            return "550 5.3.3 Forwarding to outside addresses is not enabled here"
        acc = _accepted(envelope)
        for user in route.users:
            acc.users[user.mailbox_id] = user
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw: bytes = envelope.original_content
        if hygiene.has_bare_line_end(raw):  # also makes the store's CRLF pass a no-op
            return "550 5.5.2 Message contains bare CR or LF line ends; use CRLF"
        if hygiene.received_count(raw) > hygiene.MAX_RECEIVED:
            return "554 5.4.6 Too many Received headers: mail loop"
        ip = session.peer[0] if isinstance(session.peer, tuple) else "127.0.0.1"
        helo = session.host_name or ""
        mail_from = envelope.mail_from or ""
        try:
            verdict = await authenticate(
                raw, ip, helo, mail_from, self.resolver, self.policy.hostname
            )
        except Exception:
            log.exception("message authentication failed")
            return "451 4.3.0 Temporary failure checking the message, try again later"
        if verdict.temperror:
            return "451 4.7.5 Temporary DNS failure checking the sender, try again later"
        folder = "INBOX"
        if verdict.disposition == "reject":
            if verdict.arc.vouched_by(self.policy.trusted_forwarders) is None:
                return "550 5.7.1 Rejected by the sender domain's DMARC policy"
        elif verdict.disposition == "quarantine":
            folder = "Junk"
        message = self._trace(session, envelope, ip) + verdict.stamped()
        users = list(_accepted(envelope).users.values())
        try:
            await asyncio.gather(
                *(self.store.deliver(recipient(u), message, folder) for u in users)
            )
        except Exception:
            log.exception("delivery failed")
            return "451 4.3.0 Temporary failure storing the message, try again later"
        return "250 2.6.0 Message accepted"

    def _trace(self, session: Any, envelope: Any, ip: str) -> bytes:
        """Return-Path (RFC 5321 §4.4) and our Received line (§4.4, RFC 8314 for TLS)."""
        proto = "ESMTPS" if session.ssl else "ESMTP"
        if getattr(envelope, "smtp_utf8", False):
            proto = "UTF8SMTPS" if session.ssl else "UTF8SMTP"
        helo = (session.host_name or "unknown").replace("\r", "").replace("\n", "")[:255]
        stamp = email.utils.formatdate(localtime=False)
        msg_id = os.urandom(8).hex()
        received = (
            f"Received: from {helo} ([{ip}])\r\n\tby {self.policy.hostname} with {proto}"
            f" id {msg_id};\r\n\t{stamp}\r\n"
        )
        return_path = f"Return-Path: <{envelope.mail_from or ''}>\r\n"
        return (return_path + received).encode("utf-8", "replace")
