"""The encrypted mailbox store: sealed spool, drain on open, direct delivery, group commits."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailfort.keys.secrets import MailboxSecrets
from mailfort.store.events import NewMail
from mailfort.store.service import MailStore, Recipient
from mailfort.store.sqlite import WrongKey, open_encrypted


def message(n: int, body: str = "hello") -> bytes:
    return (
        f"From: Sender <sender@remote.test>\nTo: user@example.test\nSubject: message {n}\n"
        f"Message-ID: <{n}@remote.test>\n\n{body} {n}\n"
    ).encode()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MailStore]:
    s = MailStore(tmp_path)
    yield s
    s.close()


@pytest.fixture
def keys() -> MailboxSecrets:
    return MailboxSecrets.generate()


def rcpt(keys: MailboxSecrets, mailbox_id: str = "a" * 32) -> Recipient:
    return Recipient(mailbox_id, keys.public_keys())


def test_closed_mailbox_spools_sealed_then_drains_on_open(
    store: MailStore, keys: MailboxSecrets
) -> None:
    for n in range(3):
        store.deliver_sync(rcpt(keys), message(n))
    assert not store.mailbox_path("a" * 32).exists()  # nothing filed without the keys
    assert store.spool_path("a" * 32).exists()
    mbx = store.open("a" * 32, keys)
    msgs = mbx.messages("INBOX")
    assert [m.uid for m in msgs] == [1, 2, 3]
    assert [m.meta.subject for m in msgs] == ["message 0", "message 1", "message 2"]
    assert mbx.raw("INBOX", 2).endswith(b"hello 1\r\n")  # stored with CRLF line ends
    assert store._spool("a" * 32).count() == 0  # drained
    store.release("a" * 32)
    # Reopening drains nothing twice.
    assert [m.uid for m in store.open("a" * 32, keys).messages("INBOX")] == [1, 2, 3]
    store.release("a" * 32)


def test_open_mailbox_gets_mail_directly_and_notifies(
    store: MailStore, keys: MailboxSecrets
) -> None:
    events: list[NewMail] = []
    store.subscribe("a" * 32, events.append)
    mbx = store.open("a" * 32, keys)
    store.deliver_sync(rcpt(keys), message(1))
    assert [m.uid for m in mbx.messages("INBOX")] == [1]
    assert not store.spool_path("a" * 32).exists()
    assert events == [NewMail("a" * 32, "INBOX")]
    store.release("a" * 32)


def test_wrong_key_is_a_clear_error_and_changes_nothing(
    store: MailStore, keys: MailboxSecrets
) -> None:
    store.open("a" * 32, keys).messages("INBOX")
    store.release("a" * 32)
    path = store.mailbox_path("a" * 32)
    before = path.read_bytes()
    with pytest.raises(WrongKey):
        open_encrypted(path, MailboxSecrets.generate().data_key, create=False)
    with pytest.raises(WrongKey):
        store.open("a" * 32, MailboxSecrets.generate())
    assert path.read_bytes() == before
    assert "a" * 32 not in store._open  # the failed open left no session behind


def test_spool_from_another_mailbox_does_not_open(store: MailStore, keys: MailboxSecrets) -> None:
    other = MailboxSecrets.generate()
    store.deliver_sync(Recipient("b" * 32, other.public_keys()), message(1))
    with pytest.raises(Exception, match="does not open"):
        store.open("b" * 32, keys)


async def test_concurrent_deliveries_share_commits(store: MailStore, keys: MailboxSecrets) -> None:
    mbx = store.open("a" * 32, keys)
    await asyncio.gather(*(store.deliver(rcpt(keys), message(n)) for n in range(200)))
    assert len(mbx.messages("INBOX")) == 200
    assert mbx.committer.batches < 200  # group commit: fewer fsyncs than messages
    await asyncio.gather(*(store.deliver(rcpt(keys, "c" * 32), message(n)) for n in range(50)))
    spool = store._spool("c" * 32)
    assert spool.count() == 50 and spool.committer.batches < 50
    store.release("a" * 32)


def test_identical_content_is_stored_once(store: MailStore, keys: MailboxSecrets) -> None:
    mbx = store.open("a" * 32, keys)
    for _ in range(3):
        store.deliver_sync(rcpt(keys), message(7))
    assert len(mbx.messages("INBOX")) == 3
    assert mbx.reader.execute("SELECT count(*), max(refs) FROM contents").fetchall() == [(1, 3)]
    mbx.expunge("INBOX", [1, 2])
    assert mbx.reader.execute("SELECT refs FROM contents").fetchall() == [(1,)]
    mbx.expunge("INBOX", [3])
    assert mbx.reader.execute("SELECT count(*) FROM bodies").fetchall() == [(0,)]
    store.release("a" * 32)


def test_imap_state_uid_modseq_flags_search(store: MailStore, keys: MailboxSecrets) -> None:
    mbx = store.open("a" * 32, keys)
    folders = {f.name: f for f in mbx.folders()}
    assert {f.special_use for f in folders.values()} == {
        None,
        "\\Sent",
        "\\Drafts",
        "\\Junk",
        "\\Trash",
        "\\Archive",
    }
    store.deliver_sync(rcpt(keys), message(1, "the quick brown fox"))
    store.deliver_sync(rcpt(keys), message(2, "lazy dogs sleep"))
    inbox = mbx.folder("INBOX")
    assert inbox.uidnext == 3 and inbox.uidvalidity > 0
    before = inbox.highestmodseq
    modseq = mbx.set_flags("INBOX", 1, ["\\Seen", "$Important"])
    assert modseq > before
    row = mbx.messages("INBOX")[0]
    assert row.flags == {"\\Seen", "$Important"} and row.modseq == modseq
    assert mbx.search_text("INBOX", "brown fox") == [1]
    assert mbx.search_text("INBOX", "dogs") == [2]
    assert mbx.search_text("INBOX", "message") == [1, 2]  # subject is searchable too
    assert mbx.expunge("INBOX", [1, 99]) == [1]
    assert mbx.search_text("INBOX", "fox") == []
    assert mbx.reader.execute("SELECT uid FROM vanished").fetchall() == [(1,)]
    assert mbx.folder("INBOX").uidnext == 3  # UIDs are never reused
    assert mbx.integrity_check() == "ok"
    store.release("a" * 32)


def test_malformed_mail_is_stored_not_crashed_on(store: MailStore, keys: MailboxSecrets) -> None:
    mbx = store.open("a" * 32, keys)
    for raw in (
        b"\x00\xff garbage without headers",
        b"Subject: =?bad?=\n\n",
        b"\n\n\n",
        b"A" * 100_000,
    ):
        store.deliver_sync(rcpt(keys), raw)
    assert len(mbx.messages("INBOX")) == 4
    store.release("a" * 32)


def test_mailbox_files_are_private(store: MailStore, keys: MailboxSecrets) -> None:
    store.deliver_sync(rcpt(keys), message(1))
    store.open("a" * 32, keys)
    for path in store.dir.iterdir():
        assert path.stat().st_mode & 0o077 == 0, path
    assert (store.dir.stat().st_mode & 0o077) == 0
    store.release("a" * 32)
