"""The mail store: delivery into mailboxes, sealed when closed and direct when open.

Design invariants (design.md): mail for a mailbox nobody holds open is sealed to its public
keys and appended to its spool; the first session that opens the mailbox with a user secret
drains the spool; while a session holds it open, delivery goes straight in. Every delivery
returns only after its commit reached the disk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import apsw

from mailfort.keys.secrets import MailboxSecrets, PublicKeys
from mailfort.mail import MessageMeta, to_crlf
from mailfort.store.events import EventHub, NewMail
from mailfort.store.mailbox import Mailbox
from mailfort.store.quota import Quota, QuotaExceeded
from mailfort.store.spool import Delivery, Spool, now_ms

__all__ = ["MailStore", "Quota", "QuotaExceeded", "Recipient"]

_DRAIN_BATCH = 200

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipient:
    """What delivery needs to know of a user: where the mailbox is and its public keys."""

    mailbox_id: str
    public_keys: PublicKeys


class _Open:
    def __init__(self, mailbox: Mailbox) -> None:
        self.mailbox = mailbox
        self.refs = 0


class MailStore:
    """Delivery into, and opening of, the mailboxes under ``root``.

    ``quota`` limits what a delivery may add (default: ``MAILFORT_QUOTA_BYTES`` and
    ``MAILFORT_QUOTA_MESSAGES`` from the environment); :meth:`deliver` raises
    :class:`QuotaExceeded` rather than file past it.
    """

    def __init__(self, root: Path, quota: Quota | None = None) -> None:
        self.root = root
        self.quota = quota if quota is not None else Quota.from_env()
        self.dir = root / "mailboxes"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.events = EventHub()
        self._lock = threading.Lock()
        self._open: dict[str, _Open] = {}
        self._spools: dict[str, Spool] = {}

    def mailbox_path(self, mailbox_id: str) -> Path:
        return self.dir / f"{mailbox_id}.mbx"

    def spool_path(self, mailbox_id: str) -> Path:
        return self.dir / f"{mailbox_id}.spool"

    def close(self) -> None:
        with self._lock:
            for entry in self._open.values():
                entry.mailbox.close()
            for spool in self._spools.values():
                spool.close()
            self._open.clear()
            self._spools.clear()

    # ---- delivery -----------------------------------------------------------------------

    def _spool(self, mailbox_id: str) -> Spool:
        with self._lock:
            spool = self._spools.get(mailbox_id)
            if spool is None:
                spool = self._spools[mailbox_id] = Spool(self.spool_path(mailbox_id))
            return spool

    def _open_mailbox(self, mailbox_id: str) -> Mailbox | None:
        with self._lock:
            entry = self._open.get(mailbox_id)
            return entry.mailbox if entry is not None else None

    @staticmethod
    def new_delivery(raw: bytes, folder: str = "INBOX") -> Delivery:
        # to_crlf only changes bare LFs; with as many CRLFs as LFs there are none, and two
        # C-speed counts are cheaper than its regular-expression pass (the SMTP listeners
        # have refused bare line ends already, so this is the common case).
        if raw.count(b"\n") != raw.count(b"\r\n"):
            raw = to_crlf(raw)
        return Delivery(os.urandom(16), now_ms(), folder, raw)

    async def deliver(self, rcpt: Recipient, raw: bytes, folder: str = "INBOX") -> None:
        """Durable when this returns: filed into the open mailbox or sealed into its spool.

        Raises :class:`QuotaExceeded` if the mailbox has no room for the message: exactly
        when the mailbox is open here; while it is closed, against the usage recorded at
        its last close or drain plus what waits in the spool.
        """
        delivery = self.new_delivery(raw, folder)
        mailbox = self._open_mailbox(rcpt.mailbox_id)
        if mailbox is not None:
            filed = await mailbox.deliver(delivery, quota=self.quota)
            self.events.publish(NewMail(rcpt.mailbox_id, filed.folder))
            return
        with self._lock:
            spool = self._spools.get(rcpt.mailbox_id)
        if spool is None:  # opening a file may wait on another process's lock: off the loop
            spool = await asyncio.to_thread(self._spool, rcpt.mailbox_id)
        # Sealing a message is a few µs of CPU: a thread hand-off would cost more than it.
        epoch, blob = spool.seal(rcpt.public_keys, delivery)
        size = len(delivery.raw)
        await spool.committer.run(lambda con: Spool.insert(con, epoch, blob, self.quota, size))
        self.events.publish(NewMail(rcpt.mailbox_id, None))

    async def check_room(self, rcpt: Recipient, octets: int) -> None:
        """Raise :class:`QuotaExceeded` if a message of ``octets`` would not fit now.

        A pre-check that writes nothing, for an MX that knows the size before the data
        (RFC 1870 ``MAIL FROM ... SIZE=``) and can then refuse that one recipient at
        ``RCPT``; :meth:`deliver` checks again when it files.
        """
        if not self.quota.limited:
            return
        mailbox = self._open_mailbox(rcpt.mailbox_id)
        if mailbox is not None:
            self.quota.check(*mailbox.usage(), octets, 1)
            return
        with self._lock:
            spool = self._spools.get(rcpt.mailbox_id)
        if spool is None:
            if not self.spool_path(rcpt.mailbox_id).exists():
                # Never closed with mail in it and nothing spooled: empty.
                self.quota.check(0, 0, octets, 1)
                return
            spool = await asyncio.to_thread(self._spool, rcpt.mailbox_id)
        self.quota.check(*spool.usage(), octets, 1)

    def deliver_sync(self, rcpt: Recipient, raw: bytes, folder: str = "INBOX") -> None:
        delivery = self.new_delivery(raw, folder)
        mailbox = self._open_mailbox(rcpt.mailbox_id)
        if mailbox is not None:
            filed = mailbox.deliver_sync(delivery, quota=self.quota)
            self.events.publish(NewMail(rcpt.mailbox_id, filed.folder))
            return
        spool = self._spool(rcpt.mailbox_id)
        epoch, blob = spool.seal(rcpt.public_keys, delivery)
        size = len(delivery.raw)
        spool.committer.submit(
            lambda con: Spool.insert(con, epoch, blob, self.quota, size)
        ).result()
        self.events.publish(NewMail(rcpt.mailbox_id, None))

    # ---- sessions -----------------------------------------------------------------------

    def open(self, mailbox_id: str, secrets: MailboxSecrets) -> Mailbox:
        """Open (or share) the mailbox with its keys and drain its spool into it.

        Pair every call with ``release``: the keys stay in memory only while a session
        holds the mailbox.
        """
        with self._lock:
            entry = self._open.get(mailbox_id)
            if entry is None:
                entry = self._open[mailbox_id] = _Open(
                    Mailbox(self.mailbox_path(mailbox_id), secrets.data_key)
                )
            entry.refs += 1
        try:
            self.drain(mailbox_id, secrets, entry.mailbox)
        except BaseException:
            self.release(mailbox_id)
            raise
        return entry.mailbox

    def release(self, mailbox_id: str) -> None:
        with self._lock:
            entry = self._open.get(mailbox_id)
            if entry is None:
                return
            entry.refs -= 1
            if entry.refs > 0:
                return
            del self._open[mailbox_id]
        try:
            # While it is closed, deliveries check the quota against this figure.
            self._spool(mailbox_id).record(*entry.mailbox.usage())
        except Exception:  # a stale figure only loosens the bound; logging out must work
            log.exception("recording a mailbox's usage failed")
        finally:
            entry.mailbox.close()

    def drain(self, mailbox_id: str, secrets: MailboxSecrets, mailbox: Mailbox) -> int:
        """File every spooled message; returns how many were filed.

        Each batch is committed to the mailbox before it leaves the spool, and filing is
        idempotent by delivery id, so a crash between the two steps loses and doubles nothing.
        """
        if not self.spool_path(mailbox_id).exists():
            return 0
        spool = self._spool(mailbox_id)
        filed = 0
        open_item = Spool.opener(secrets)
        while batch := spool.pending(_DRAIN_BATCH):
            prepared: list[tuple[Delivery, bytes, MessageMeta]] = []
            for _id, epoch_id, header, blob in batch:
                delivery = open_item(epoch_id, header, blob)
                prepared.append((delivery, *Mailbox.prepare(delivery.raw)))

            def write(
                con: apsw.Connection, items: list[tuple[Delivery, bytes, MessageMeta]] = prepared
            ) -> int:
                filed = [Mailbox.file(con, d, digest, meta) for d, digest, meta in items]
                return sum(not f.duplicate for f in filed)

            # Filed even past the quota: each was accepted (250) when it was sealed, and
            # refusing now could only lose it or bounce it to a sender who was told yes.
            filed += mailbox.committer.submit(write).result()
            spool.remove([item[0] for item in batch], stored=mailbox.usage())
        if filed:
            self.events.publish(NewMail(mailbox_id, "INBOX"))
        return filed

    def subscribe(self, mailbox_id: str, callback: Callable[[NewMail], None]) -> Callable[[], None]:
        return self.events.subscribe(mailbox_id, callback)
