"""Quota on delivery: the store refuses mail a mailbox has no room for, open or closed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailfort import delivery
from mailfort.keys.secrets import MailboxSecrets
from mailfort.store.mailbox import AppendItem
from mailfort.store.quota import Quota
from mailfort.store.service import MailStore, QuotaExceeded, Recipient

BOX = "b" * 32


def message(n: int, size: int = 1000) -> bytes:
    head = f"From: s@remote.test\r\nSubject: message {n}\r\nMessage-ID: <{n}@remote.test>\r\n\r\n"
    return head.encode() + b"x" * (size - len(head) - 2) + b"\r\n"


@pytest.fixture
def keys() -> MailboxSecrets:
    return MailboxSecrets.generate()


def make_store(root: Path, storage: int | None, messages: int | None = None) -> MailStore:
    return MailStore(root, Quota(storage, messages))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MailStore]:
    s = make_store(tmp_path, 5_000)
    yield s
    s.close()


def test_quota_comes_from_the_environment_and_bad_values_are_named() -> None:
    assert Quota.from_env({}) == Quota(10 * 1024**3, 1_000_000)
    assert Quota.from_env({"MAILFORT_QUOTA_BYTES": "0", "MAILFORT_QUOTA_MESSAGES": "7"}) == Quota(
        None, 7
    )
    with pytest.raises(ValueError, match="MAILFORT_QUOTA_BYTES"):
        Quota.from_env({"MAILFORT_QUOTA_BYTES": "10G"})
    with pytest.raises(ValueError, match="MAILFORT_QUOTA_MESSAGES"):
        Quota.from_env({"MAILFORT_QUOTA_MESSAGES": "-1"})


def test_open_mailbox_refuses_what_does_not_fit(store: MailStore, keys: MailboxSecrets) -> None:
    rcpt = Recipient(BOX, keys.public_keys())
    mbx = store.open(BOX, keys)
    try:
        for n in range(5):
            store.deliver_sync(rcpt, message(n))
        with pytest.raises(QuotaExceeded) as info:
            store.deliver_sync(rcpt, message(5))
        assert info.value.resource == "STORAGE" and info.value.limit == 5_000
        assert info.value.used == 5_000 and info.value.adding == 1_000
        with pytest.raises(QuotaExceeded):
            asyncio.run(store.deliver(rcpt, message(6)))
        assert [m.uid for m in mbx.messages("INBOX")] == [1, 2, 3, 4, 5]
        # Deleting makes room again: the counters follow every write path.
        mbx.expunge("INBOX", [1])
        store.deliver_sync(rcpt, message(7))
        assert mbx.usage() == (5_000, 5)
    finally:
        store.release(BOX)


def test_closed_mailbox_is_bounded_by_recorded_usage_plus_spool(
    store: MailStore, keys: MailboxSecrets
) -> None:
    rcpt = Recipient(BOX, keys.public_keys())
    mbx = store.open(BOX, keys)
    asyncio.run(mbx.append("INBOX", [AppendItem(message(n)) for n in range(3)]))
    store.release(BOX)  # records 3,000 octets for deliveries while it is closed
    store.deliver_sync(rcpt, message(10))  # sealed: about 1,000 plus the sealing overhead
    with pytest.raises(QuotaExceeded):
        # 3,000 stored + a sealed 1,000 + 1,000 more leaves no room for the overhead.
        store.deliver_sync(rcpt, message(11))
    assert store._spool(BOX).count() == 1
    # Opening drains what was accepted; the figure recorded then is the real usage.
    mbx = store.open(BOX, keys)
    assert len(mbx.messages("INBOX")) == 4
    assert store._spool(BOX).recorded() == (4_000, 4)
    store.release(BOX)


def test_room_can_be_checked_before_the_data(store: MailStore, keys: MailboxSecrets) -> None:
    # What an MX does with MAIL FROM's SIZE= at RCPT: ask, file nothing.
    rcpt = Recipient(BOX, keys.public_keys())
    asyncio.run(store.check_room(rcpt, 5_000))  # a mailbox never used is empty
    with pytest.raises(QuotaExceeded):
        asyncio.run(store.check_room(rcpt, 5_001))
    store.deliver_sync(rcpt, message(1))  # sealed: the mailbox is closed
    with pytest.raises(QuotaExceeded):
        asyncio.run(store.check_room(rcpt, 4_000))
    mbx = store.open(BOX, keys)
    try:
        asyncio.run(store.check_room(rcpt, 4_000))  # open: exact usage, 1,000 octets
        with pytest.raises(QuotaExceeded):
            asyncio.run(store.check_room(rcpt, 4_001))
        assert len(mbx.messages("INBOX")) == 1
    finally:
        store.release(BOX)


def test_spooled_mail_is_filed_even_past_the_quota(tmp_path: Path, keys: MailboxSecrets) -> None:
    # Accepted mail is never dropped: a lower limit set later still drains the spool.
    roomy = make_store(tmp_path, None)
    rcpt = Recipient(BOX, keys.public_keys())
    for n in range(3):
        roomy.deliver_sync(rcpt, message(n))
    roomy.close()
    tight = make_store(tmp_path, 1_500)
    try:
        mbx = tight.open(BOX, keys)
        assert len(mbx.messages("INBOX")) == 3
        with pytest.raises(QuotaExceeded):
            tight.deliver_sync(rcpt, message(4))
        tight.release(BOX)
        with pytest.raises(QuotaExceeded):  # closed now: the recorded usage says full
            tight.deliver_sync(rcpt, message(5))
    finally:
        tight.close()


def test_message_count_limit(tmp_path: Path, keys: MailboxSecrets) -> None:
    store = make_store(tmp_path, None, messages=2)
    rcpt = Recipient(BOX, keys.public_keys())
    try:
        store.deliver_sync(rcpt, message(1))
        store.deliver_sync(rcpt, message(2))
        with pytest.raises(QuotaExceeded) as info:
            store.deliver_sync(rcpt, message(3))
        assert info.value.resource == "MESSAGE" and info.value.limit == 2
    finally:
        store.close()


def test_append_and_copy_check_inside_the_transaction(
    store: MailStore, keys: MailboxSecrets
) -> None:
    mbx = store.open(BOX, keys)
    quota = store.quota
    try:
        # MULTIAPPEND is all or none.
        with pytest.raises(QuotaExceeded):
            asyncio.run(mbx.append("INBOX", [AppendItem(message(n)) for n in range(6)], quota))
        assert mbx.usage() == (0, 0)
        asyncio.run(mbx.append("INBOX", [AppendItem(message(n)) for n in range(3)], quota))
        inbox = mbx.folder("INBOX")
        with pytest.raises(QuotaExceeded):
            asyncio.run(mbx.copy_messages(inbox.id, [1, 2, 3], "Archive", quota=quota))
        # A move does not grow the mailbox.
        asyncio.run(mbx.copy_messages(inbox.id, [1, 2, 3], "Archive", move=True, quota=quota))
        assert mbx.usage() == (3_000, 3)
    finally:
        store.release(BOX)


def test_local_delivery_fills_the_other_alias_members_then_refuses(tmp_path: Path) -> None:
    from mailfort.directory.service import Directory
    from mailfort.keys.server import ServerKey

    directory = Directory.open(
        f"sqlite:///{tmp_path / 'directory.sqlite3'}", ServerKey.load_or_create(tmp_path)
    )
    store = make_store(tmp_path, 1_500)
    try:
        directory.add_domain("example.test")
        full = directory.add_user("full@example.test").user
        roomy = directory.add_user("roomy@example.test").user
        directory.add_alias("team@example.test", ["full@example.test", "roomy@example.test"])
        store.deliver_sync(delivery.recipient(full), message(1))
        targets = delivery.local_targets(directory, "team@example.test")
        with pytest.raises(QuotaExceeded) as info:
            delivery.deliver_local(store, targets, message(2))
        assert delivery.quota_refusal(info.value).startswith("5.2.2 Mailbox full (")
        assert store._spool(roomy.mailbox_id).count() == 1  # the other member got it
        assert store._spool(full.mailbox_id).count() == 1  # and the full one nothing more
    finally:
        store.close()
        directory.close()
