"""Local delivery: route a recipient through the directory and file the message durably.

Shared by the local delivery agent (`mailfort deliver`) and the inbound MX, so both apply
the same routing (exact user, plus-tag, alias, catch-all) and the same durability rule.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from mailfort.directory.service import Directory, Route, RouteKind, User
from mailfort.outbound.queue import Queue
from mailfort.store.service import MailStore, QuotaExceeded, Recipient

#: A full mailbox refuses the message for good, as Dovecot's LDA and LMTP do by default
#: (``quota_full_tempfail = no``): the sender learns at once that the mail did not arrive,
#: instead of after days of retries (Postfix sends no delay warning by default).
#: ``mailfort deliver`` exits EX_NOPERM (77), dovecot-lda's code for it, with the enhanced
#: status first on stderr, which Postfix's pipe(8) and local(8) put in the bounce; the MX
#: answers 552 5.2.2 (RFC 3463 X.2.2 "mailbox full"; RFC 5321 §4.2.2 552).
QUOTA_EXIT_CODE = 77
QUOTA_SMTP_CODE = 552
QUOTA_STATUS = "5.2.2"
QUOTA_TEXT = "Mailbox full"


class UnknownRecipient(Exception):
    pass


class NotHosted(Exception):
    pass


class ForwardingUnavailable(Exception):
    """The route needs the relay (outside targets), which a local delivery cannot do."""


@dataclass(frozen=True)
class LocalTargets:
    users: tuple[User, ...]
    route: Route


def recipient(user: User) -> Recipient:
    return Recipient(user.mailbox_id, user.public_keys)


def local_targets(directory: Directory, address: str) -> LocalTargets:
    route = directory.route(address)
    if route.kind is RouteKind.NOT_HOSTED:
        raise NotHosted(address)
    if route.kind is RouteKind.UNKNOWN_USER:
        raise UnknownRecipient(address)
    if route.forwards:
        raise ForwardingUnavailable(address)
    # An alias listing one user twice (directly and via catch-all) files one copy.
    unique = tuple({u.mailbox_id: u for u in route.users}.values())
    return LocalTargets(unique, route)


def with_return_path(raw: bytes, mail_from: str | None) -> bytes:
    """RFC 5321 §4.4: the delivering MTA records the envelope sender in Return-Path."""
    if mail_from is None:
        return raw
    return b"Return-Path: <" + mail_from.encode("utf-8") + b">\r\n" + raw


async def deliver_bounce(
    directory: Directory, store: MailStore, queue: Queue, sender: str, report: bytes
) -> None:
    """A DSN goes into the sender's mailbox when the sender is ours, else out with a null
    reverse-path (RFC 5321 §4.5.5), so it can never bounce in turn."""
    route = await asyncio.to_thread(directory.route, sender)
    if route.kind is RouteKind.NOT_HOSTED:
        await queue.enqueue("", [sender], report)
        return
    for user in route.users:
        await store.deliver(recipient(user), report)


def deliver_local(store: MailStore, targets: LocalTargets, raw: bytes) -> None:
    """File ``raw`` for every user of the route.

    Raises :class:`QuotaExceeded` if a mailbox was full, after filing the message for the
    others: an alias's other members get it whatever one member's quota says.
    """
    full: QuotaExceeded | None = None
    for user in targets.users:
        try:
            store.deliver_sync(recipient(user), raw)
        except QuotaExceeded as exc:
            full = full or exc
    if full is not None:
        raise full


def quota_refusal(exc: QuotaExceeded) -> str:
    """The one line that refuses mail for a full mailbox (stderr of ``mailfort deliver``,
    after the SMTP code at the MX): enhanced status first, for the MTA's bounce."""
    return f"{QUOTA_STATUS} {QUOTA_TEXT} ({exc})"
