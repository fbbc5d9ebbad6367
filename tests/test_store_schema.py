"""Mailbox schema v3: \\Recent claims, INTERNALDATE zones and usage counters, and the
upgrade of files written by earlier versions."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mailfort.keys.secrets import MailboxSecrets
from mailfort.store.mailbox import SCHEMA_VERSION, AppendItem, Mailbox
from mailfort.store.service import MailStore


def message(n: int) -> bytes:
    return f"From: s@remote.test\r\nSubject: message {n}\r\n\r\nbody {n}\r\n".encode()


def _run(mbx: Mailbox, sql: str) -> None:
    mbx.committer.submit(lambda con: con.execute(sql)).result()


def test_a_version_2_mailbox_is_upgraded_without_making_old_mail_recent(tmp_path: Path) -> None:
    key = MailboxSecrets.generate().data_key
    path = tmp_path / "v2.mbx"
    mbx = Mailbox(path, key)
    items = [AppendItem(message(n), (), 1_700_000_000_000 + n) for n in range(3)]
    asyncio.run(mbx.append("INBOX", items))
    # What a version 2 file looked like.
    for stmt in (
        "DROP TRIGGER usage_insert",
        "DROP TRIGGER usage_delete",
        "DELETE FROM counters WHERE name LIKE 'usage_%'",
        "ALTER TABLE folders DROP COLUMN recent_uid",
        "ALTER TABLE messages DROP COLUMN internal_tz",
        "PRAGMA user_version = 2",
    ):
        _run(mbx, stmt)
    mbx.close()
    mbx = Mailbox(path, key)
    try:
        inbox = mbx.folder("INBOX")
        assert inbox.recent_uid == inbox.uidnext == 4  # nothing old turns \Recent
        assert asyncio.run(mbx.claim_recent(inbox.id)) == (0, 0)
        assert mbx.usage() == (sum(len(message(n)) for n in range(3)), 3)
        rows = mbx.message_columns(inbox.id, [(1, 3)], ("internal_date_wire",))
        assert bytes(rows[0][1]) == b'"14-Nov-2023 22:13:20 +0000"'
        assert mbx.integrity_check() == "ok"
        assert mbx.reader.pragma("user_version") == SCHEMA_VERSION
        # The upgrade checks before each change: running it again changes nothing.
        mbx.committer.submit(Mailbox._upgrade_v3).result()
        assert mbx.usage() == (sum(len(message(n)) for n in range(3)), 3)
    finally:
        mbx.close()


def test_recent_is_claimed_once_by_concurrent_stores(tmp_path: Path) -> None:
    """Two workers, each with its own store and connections to one mailbox file: of two
    SELECTs at once, one claims the new mail and the other gets nothing."""
    secrets = MailboxSecrets.generate()
    one, two = MailStore(tmp_path, None), MailStore(tmp_path, None)
    box = "d" * 32
    try:
        a = one.open(box, secrets)
        b = two.open(box, secrets)
        asyncio.run(a.append("INBOX", [AppendItem(message(n)) for n in range(5)]))
        folder_id = a.folder("INBOX").id

        async def both() -> list[tuple[int, int]]:
            return list(await asyncio.gather(a.claim_recent(folder_id), b.claim_recent(folder_id)))

        claims = asyncio.run(both())
        assert sorted(claims) == [(0, 0), (1, 6)]
        asyncio.run(b.append("INBOX", [AppendItem(message(9))]))
        assert asyncio.run(a.claim_recent(folder_id)) == (6, 7)
    finally:
        one.close()
        two.close()
