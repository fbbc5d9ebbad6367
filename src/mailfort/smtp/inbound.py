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
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from mailfort.auth import authenticate
from mailfort.delivery import QUOTA_SMTP_CODE, QUOTA_STATUS, QUOTA_TEXT, recipient
from mailfort.directory.lookups import RouteCache
from mailfort.directory.service import POSTMASTER, Directory, Route, RouteKind, User
from mailfort.dns import Resolver, TemporaryDNSError
from mailfort.outbound import dsn
from mailfort.relay import fwdtxt
from mailfort.relay.forward import (
    DELIVERED_TTL,
    Forwarder,
    Target,
    delivered_key,
    fingerprint,
    srs_issued_key,
)
from mailfort.relay.memo import SharedMemo
from mailfort.relay.srs import SRS, SRSError
from mailfort.smtp import hygiene
from mailfort.store.service import MailStore, QuotaExceeded

log = logging.getLogger("mailfort.smtp.inbound")

QUOTA_REPLY = f"{QUOTA_SMTP_CODE} {QUOTA_STATUS} {QUOTA_TEXT}"
MAX_RECIPIENTS = 50
RULES_CACHE_SIZE = 1024


@dataclass
class InboundPolicy:
    hostname: str
    max_recipients: int = MAX_RECIPIENTS
    trusted_forwarders: Collection[str] = field(default_factory=frozenset)


@dataclass
class _Accepted:
    """What RCPT resolved, kept on the envelope until DATA."""

    users: dict[str, User] = field(default_factory=dict)
    written: dict[str, str] = field(default_factory=dict)  # mailbox id -> RCPT as written
    targets: dict[str, Target] = field(default_factory=dict)  # forwarding, by target


def _accepted(envelope: Any) -> _Accepted:
    acc = getattr(envelope, "mailfort", None)
    if acc is None:
        acc = _Accepted()
        envelope.mailfort = acc
    return acc


class InboundHandler:
    """Handler hooks for port 25 (see `mailfort.smtp.server`)."""

    def __init__(
        self,
        directory: Directory,
        store: MailStore,
        resolver: Resolver,
        policy: InboundPolicy,
        forwarder: Forwarder | None = None,
        *,
        memo: SharedMemo | None = None,
        bounce: Callable[[str, bytes], Awaitable[None]] | None = None,
    ) -> None:
        self.directory = directory
        self.store = store
        self.resolver = resolver
        self.policy = policy
        self.forwarder = forwarder  # None: aliases to outside addresses are refused
        # Copies already filed for a message that we then answered 4xx: the retry skips
        # them (shared by the workers, since the retry may reach another one).
        self.memo = memo if memo is not None else (forwarder.memo if forwarder else None)
        self.bounce = bounce  # DSNs for recipients whose mailbox was full
        self._rules: OrderedDict[tuple[str, ...], fwdtxt.Rules] = OrderedDict()
        self._routes = RouteCache(directory)

    async def _route(self, address: str) -> Route:
        return await self._routes.route(address)

    async def _host_postmaster(self) -> str | None:
        """postmaster@ the nearest hosted domain of our host name (mx.example.com ->
        example.com), or None when we host none of them."""
        labels = self.policy.hostname.lower().rstrip(".").split(".")
        for i in range(len(labels) - 1):
            candidate = f"{POSTMASTER}@{'.'.join(labels[i:])}"
            if (await self._route(candidate)).kind is not RouteKind.NOT_HOSTED:
                return candidate
        return None

    def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        # The null reverse-path (bounces, RFC 5321 §4.5.5) arrives as "".
        if address and not hygiene.valid_mailbox(address):
            return "501 5.1.7 Bad sender address syntax"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str | Awaitable[str]:
        """At once when the recipient's route is cached (the common case); otherwise the
        lookup is awaited."""
        if address.lower() == POSTMASTER:
            return self._postmaster_rcpt(envelope, rcpt_options)
        return self._rcpt(envelope, address, rcpt_options)

    async def _postmaster_rcpt(self, envelope: Any, rcpt_options: list[str]) -> str:
        # RFC 5321 §4.5.1: "RCPT TO:<Postmaster>" without a domain must be accepted: it
        # is this host's postmaster.
        try:
            address = await self._host_postmaster() or POSTMASTER
        except Exception:
            log.exception("directory lookup failed")
            return "451 4.3.0 Temporary lookup failure, try again later"
        answer = self._rcpt(envelope, address, rcpt_options)
        return answer if isinstance(answer, str) else await answer

    def _rcpt(self, envelope: Any, address: str, rcpt_options: list[str]) -> str | Awaitable[str]:
        refusal = hygiene.rcpt_refusal(
            address, rcpt_options, len(envelope.rcpt_tos), self.policy.max_recipients
        )
        if refusal:
            return refusal
        route = self._routes.cached(address)
        if route is None:
            return self._rcpt_lookup(envelope, address)
        return self._routed(envelope, address, route)

    async def _rcpt_lookup(self, envelope: Any, address: str) -> str:
        try:
            route = await self._route(address)
        except Exception:
            log.exception("directory lookup failed")
            return "451 4.3.0 Temporary lookup failure, try again later"
        answer = self._routed(envelope, address, route)
        return answer if isinstance(answer, str) else await answer

    def _routed(self, envelope: Any, address: str, route: Route) -> str | Awaitable[str]:
        """The RCPT reply for a resolved route; awaitable only where a forwarding rule in
        DNS or a quota pre-check must be looked up."""
        if route.kind is RouteKind.NOT_HOSTED:
            return "550 5.7.1 Relaying denied"
        acc = _accepted(envelope)
        if route.kind is RouteKind.UNKNOWN_USER:
            if self.forwarder is not None and SRS.is_srs(address):
                return self._srs_rcpt(envelope, acc, address)
            if route.dns_rules and self.forwarder is not None:
                return self._dns_rcpt(envelope, acc, address)
            return "550 5.1.1 No such user here"
        if route.forwards or route.webhooks:
            if self.forwarder is None:
                return "550 5.3.3 Forwarding to outside addresses is not enabled here"
            for target in route.forwards:
                value = _with_tag(target, route.tag)
                acc.targets[value] = Target(value, address)
            for url in route.webhooks:
                acc.targets[url] = Target(url, address, webhook=True)
        if len(route.users) == 1 and not (route.forwards or route.webhooks):
            # RFC 1870: a declared size lets a full mailbox refuse this recipient now.
            size = _declared_size(envelope)
            if size is not None and self.store.quota.limited:
                return self._sized_rcpt(envelope, acc, address, route, size)
        return self._accept(envelope, acc, address, route)

    async def _sized_rcpt(
        self, envelope: Any, acc: _Accepted, address: str, route: Route, size: int
    ) -> str:
        try:
            await self.store.check_room(recipient(route.users[0]), size)
        except QuotaExceeded:
            return QUOTA_REPLY
        except Exception:
            log.exception("quota pre-check failed")  # DATA checks again
        return self._accept(envelope, acc, address, route)

    @staticmethod
    def _accept(envelope: Any, acc: _Accepted, address: str, route: Route) -> str:
        for user in route.users:
            acc.users[user.mailbox_id] = user
            acc.written.setdefault(user.mailbox_id, address)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Recipient OK"

    def _srs_rcpt(self, envelope: Any, acc: _Accepted, address: str) -> str:
        """A bounce (or reply) to an SRS address we issued: route it to the original sender,
        but only while that address is on record as recently issued, so that a once-seen
        SRS address cannot be used to relay mail to whoever it names."""
        assert self.forwarder is not None
        domain = address.rpartition("@")[2].lower()
        try:
            original = self.forwarder.srs_for(domain).reverse(address)
        except SRSError:
            return "550 5.1.1 No such user here"
        if srs_issued_key(address) not in self.forwarder.memo:
            return "550 5.7.1 This return address is not in use"
        acc.targets[original] = Target(original, address)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Recipient OK"

    async def _dns_rcpt(self, envelope: Any, acc: _Accepted, address: str) -> str:
        """Forward Email's DNS TXT rules, for a domain whose operator enabled them."""
        local, _, domain = address.rpartition("@")
        domain = domain.lower()
        try:
            records = await self.resolver.txt(domain)
        except TemporaryDNSError:
            return "451 4.4.3 Temporary DNS failure looking up forwarding rules"
        key = (domain, *records)
        rules = self._rules.get(key)
        if rules is None:
            rules = fwdtxt.parse(records)
            self._rules[key] = rules
            if len(self._rules) > RULES_CACHE_SIZE:
                self._rules.popitem(last=False)
        decision = rules.resolve(local)
        if decision is None:
            return "550 5.1.1 No such user here"
        if decision.action is fwdtxt.Action.DROP:
            envelope.rcpt_tos.append(address)  # accepted, then silently discarded
            return "250 2.1.5 Recipient OK"
        if decision.action is fwdtxt.Action.TEMPFAIL:
            return "421 4.7.0 Recipient temporarily refused by the domain's rules"
        if decision.action is fwdtxt.Action.REJECT:
            return "550 5.7.1 Recipient refused by the domain's rules"
        users: list[User] = []
        targets: list[Target] = []
        for value in decision.targets:
            if value.startswith("https://"):
                targets.append(Target(value, address, webhook=True))
                continue
            try:
                route = await self._route(value)
            except Exception:
                log.exception("directory lookup failed")
                return "451 4.3.0 Temporary lookup failure, try again later"
            if route.kind is RouteKind.NOT_HOSTED:
                targets.append(Target(value, address))
            elif route.kind is RouteKind.LOCAL and route.users:
                # One level only: a rule naming our own alias does not chain onwards.
                users.extend(route.users)
        if not users and not targets:
            return "550 5.1.1 No such user here"
        for user in users:
            acc.users[user.mailbox_id] = user
            acc.written.setdefault(user.mailbox_id, address)
        for target in targets:
            acc.targets[target.value] = target
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
        mail_from = _sender(envelope)
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
        received = self._received(session, envelope, ip)
        acc = _accepted(envelope)
        stamped = verdict.stamped()
        message = self._return_path(envelope) + received + stamped
        # Several copies: remember each filed one, so that a retry after a 4xx files the
        # rest only (one copy needs no record: its failure means nothing was filed).
        several = len(acc.users) + len(acc.targets) > 1
        fp = fingerprint(mail_from, raw) if several or acc.targets else None
        stored, full, failed = await self._file(acc, message, folder, fp)
        if failed:
            return "451 4.3.0 Temporary failure storing the message, try again later"
        reply = None
        if acc.targets and self.forwarder is not None:
            ar = verdict.header.decode("ascii", "replace").split(":", 1)[1].strip()
            assert fp is not None
            reply = await self.forwarder.forward(
                fp,
                received + stamped,
                mail_from,
                list(acc.targets.values()),
                auth_results=ar,
                arc_cv=verdict.arc.cv,
                stored_locally=stored > 0,
            )
            if reply.code >= 400 and (reply.code < 500 or stored == 0):
                return QUOTA_REPLY if full and reply.code >= 500 else str(reply)
        if full:
            if stored == 0 and reply is None:
                return QUOTA_REPLY
            await self._report_full(mail_from, message, [acc.written[u.mailbox_id] for u in full])
        return str(reply) if reply is not None else "250 2.6.0 Message accepted"

    async def _file(
        self, acc: _Accepted, message: bytes, folder: str, fp: bytes | None
    ) -> tuple[int, list[User], bool]:
        """File a copy for each local user: (copies filed, users whose mailbox is full,
        whether any copy failed for another reason)."""
        memo = self.memo if fp is not None else None  # one copy: nothing to remember

        async def one(user: User) -> bool:
            if memo is None:
                await self.store.deliver(recipient(user), message, folder)
                return True
            assert fp is not None
            key = delivered_key(fp, "mailbox:" + user.mailbox_id)
            if key not in memo:
                await self.store.deliver(recipient(user), message, folder)
                memo.add(key, DELIVERED_TTL)
            return True

        users = list(acc.users.values())
        outcomes: list[bool | BaseException]
        if len(users) == 1:  # the common case: no task and gathering future for one copy
            try:
                outcomes = [await one(users[0])]
            except Exception as exc:
                outcomes = [exc]
        else:
            outcomes = await asyncio.gather(*(one(u) for u in users), return_exceptions=True)
        full = [u for u, o in zip(users, outcomes, strict=True) if isinstance(o, QuotaExceeded)]
        failed = False
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, QuotaExceeded):
                log.error("delivery failed", exc_info=outcome)
                failed = True
        return sum(o is True for o in outcomes), full, failed

    async def _report_full(self, sender: str, message: bytes, rcpts: list[str]) -> None:
        """Some recipients got the message and some mailboxes were full: 250 for the
        transaction (a retry would duplicate the filed copies) and a DSN for the rest."""
        if not sender or self.bounce is None:
            return
        failures = [dsn.Failure(r, QUOTA_SMTP_CODE, f"{QUOTA_STATUS} {QUOTA_TEXT}") for r in rcpts]
        try:
            await self.bounce(sender, dsn.build(self.policy.hostname, sender, failures, message))
        except Exception:
            log.exception("could not send the delivery report")

    @staticmethod
    def _return_path(envelope: Any) -> bytes:
        """RFC 5321 §4.4: added at final delivery only (never on a forwarded copy)."""
        return f"Return-Path: <{_sender(envelope)}>\r\n".encode("utf-8", "replace")

    def _received(self, session: Any, envelope: Any, ip: str) -> bytes:
        """Our Received line (RFC 5321 §4.4, RFC 8314 for TLS)."""
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
        return received.encode("utf-8", "replace")


def _declared_size(envelope: Any) -> int | None:
    for option in envelope.mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return None


def _sender(envelope: Any) -> str:
    """The envelope sender, "" for the null reverse-path."""
    return str(envelope.mail_from or "")


def _with_tag(address: str, tag: str | None) -> str:
    """Plus-tags travel to the target: ``alias+news`` forwards to ``target+news@...``."""
    if not tag:
        return address
    local, _, domain = address.rpartition("@")
    return f"{local}+{tag}@{domain}"
