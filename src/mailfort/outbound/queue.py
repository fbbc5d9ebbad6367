"""The outbound queue: durable, encrypted at rest, and emptied as soon as delivery is final.

One SQLite3MC file (ChaCha20-Poly1305 pages) under a key derived from the server key: mail
waiting for a remote server is as unreadable on disk as mail in a mailbox. A submission is
acknowledged only after its commit was fsynced (group commits keep that fast); a message's
body is deleted once every recipient is delivered or bounced (data minimisation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw

from mailfort.keys.kdf import hkdf
from mailfort.keys.server import ServerKey
from mailfort.store.committer import GroupCommitter
from mailfort.store.sqlite import fsync_dir, open_encrypted

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS messages (
        id INTEGER PRIMARY KEY,
        mail_from TEXT NOT NULL,
        body BLOB,
        created_at REAL NOT NULL,
        submitter TEXT)""",
    """CREATE TABLE IF NOT EXISTS recipients (
        id INTEGER PRIMARY KEY,
        message_id INTEGER NOT NULL REFERENCES messages(id),
        rcpt TEXT NOT NULL,
        domain TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'queued',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt REAL NOT NULL,
        last_error TEXT,
        delay_notified INTEGER NOT NULL DEFAULT 0)""",
    "CREATE INDEX IF NOT EXISTS recipients_due ON recipients(state, next_attempt)",
]

QUEUED, DELIVERED, BOUNCED = "queued", "delivered", "bounced"
# RFC 5321 §4.5.4.1: retry for at least 4-5 days, at intervals of 30 minutes or more once
# the first attempts failed; the first retries come sooner, as most failures are brief.
RETRY_SCHEDULE = (60, 300, 900, 1800, 3600, 7200, 14400)
GIVE_UP_AFTER = 5 * 86400
DELAY_WARNING_AFTER = 4 * 3600


@dataclass(frozen=True)
class Recipient:
    id: int
    message_id: int
    rcpt: str
    domain: str
    attempts: int
    delay_notified: bool


@dataclass(frozen=True)
class Message:
    id: int
    mail_from: str
    body: bytes
    created_at: float  # when it was queued: the age that retries and warnings go by


def backoff(attempts: int) -> float:
    return RETRY_SCHEDULE[min(attempts, len(RETRY_SCHEDULE) - 1)]


class Queue:
    def __init__(self, data_dir: Path, server_key: ServerKey) -> None:
        directory = data_dir / "queue"
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = directory / "queue.db"
        new = not path.exists()
        key = hkdf(server_key.derive(b"queue"), b"", b"mailfort/v1/queue-db")
        self.writer = open_encrypted(path, key, create=True)
        for stmt in _SCHEMA:
            self.writer.execute(stmt)
        if new:
            fsync_dir(directory)
        self.reader = open_encrypted(path, key, create=False)
        self.committer = GroupCommitter(self.writer, "queue")

    def close(self) -> None:
        self.committer.close()
        self.writer.close()
        self.reader.close()

    async def enqueue(
        self, mail_from: str, rcpts: list[str], body: bytes, submitter: str | None = None
    ) -> int:
        """Durable when this returns (fsync); the message id."""
        now = time.time()

        def write(con: apsw.Connection) -> int:
            con.execute(
                "INSERT INTO messages(mail_from, body, created_at, submitter) VALUES (?, ?, ?, ?)",
                (mail_from, body, now, submitter),
            )
            message_id = con.last_insert_rowid()
            con.executemany(
                "INSERT INTO recipients(message_id, rcpt, domain, next_attempt) VALUES (?, ?, ?, ?)",
                [(message_id, r, r.rpartition("@")[2].lower(), now) for r in rcpts],
            )
            return message_id

        return await self.committer.run(write)

    def due(self, now: float, limit: int = 200) -> list[Recipient]:
        # No join with messages: its created_at sits after the body, so reading it walks
        # the body's overflow pages (decrypting each), which tripled the cost of a look.
        rows: list[Any] = self.reader.execute(
            "SELECT id, message_id, rcpt, domain, attempts, delay_notified FROM recipients"
            " WHERE state = ? AND next_attempt <= ? ORDER BY next_attempt LIMIT ?",
            (QUEUED, now, limit),
        ).fetchall()
        return [Recipient(r[0], r[1], r[2], r[3], r[4], bool(r[5])) for r in rows]

    def data_version(self) -> int:
        """SQLite's ``PRAGMA data_version`` on the reader: it moves whenever another
        connection commits to the file, in this process or another, so a worker that
        queued a message is seen by the engine's worker within one look (a few µs each)."""
        rows: list[Any] = self.reader.execute("PRAGMA data_version").fetchall()
        return int(rows[0][0])

    def next_due(self) -> float | None:
        rows: list[Any] = self.reader.execute(
            "SELECT min(next_attempt) FROM recipients WHERE state = ?", (QUEUED,)
        ).fetchall()
        return float(rows[0][0]) if rows and rows[0][0] is not None else None

    def message(self, message_id: int) -> Message | None:
        rows: list[Any] = self.reader.execute(
            "SELECT id, mail_from, body, created_at FROM messages WHERE id = ?", (message_id,)
        ).fetchall()
        if not rows or rows[0][2] is None:
            return None
        return Message(rows[0][0], rows[0][1], bytes(rows[0][2]), float(rows[0][3]))

    async def delivered(self, message_id: int, recipient_ids: list[int]) -> None:
        await self._finish(message_id, recipient_ids, DELIVERED, None)

    async def bounced(self, message_id: int, recipient_ids: list[int], error: str) -> None:
        await self._finish(message_id, recipient_ids, BOUNCED, error)

    async def deferred(self, recipient: Recipient, error: str, *, notified: bool = False) -> None:
        await self.deferred_all([(recipient, error, notified)])

    async def deferred_all(self, failures: list[tuple[Recipient, str, bool]]) -> None:
        """Each (recipient, error, delay warning sent) waits for its next attempt; one
        commit for all of them."""
        now = time.time()
        rows = [
            (now + backoff(r.attempts), error, int(notified), r.id)
            for r, error, notified in failures
        ]

        def write(con: apsw.Connection) -> None:
            con.executemany(
                "UPDATE recipients SET attempts = attempts + 1, next_attempt = ?, last_error = ?,"
                " delay_notified = max(delay_notified, ?) WHERE id = ?",
                rows,
            )

        await self.committer.run(write)

    async def _finish(
        self, message_id: int, recipient_ids: list[int], state: str, error: str | None
    ) -> None:
        def write(con: apsw.Connection) -> None:
            con.executemany(
                "UPDATE recipients SET state = ?, last_error = ?, attempts = attempts + 1"
                " WHERE id = ?",
                [(state, error, rid) for rid in recipient_ids],
            )
            waiting = con.execute(
                "SELECT 1 FROM recipients WHERE message_id = ? AND state = ? LIMIT 1",
                (message_id, QUEUED),
            ).fetchall()
            if not waiting:
                # Data minimisation: once no recipient waits, the message and its
                # recipients' addresses go (secure_delete zeroes the freed pages).
                con.execute("DELETE FROM recipients WHERE message_id = ?", (message_id,))
                con.execute("DELETE FROM messages WHERE id = ?", (message_id,))

        await self.committer.run(write)

    def flush(self) -> int:
        """Make every waiting recipient due now (as `postqueue -f`); returns how many."""

        def write(con: apsw.Connection) -> int:
            con.execute("UPDATE recipients SET next_attempt = 0 WHERE state = ?", (QUEUED,))
            return con.changes()

        return self.committer.submit(write).result()

    def pending_count(self) -> int:
        rows: list[Any] = self.reader.execute(
            "SELECT count(*) FROM recipients WHERE state = ?", (QUEUED,)
        ).fetchall()
        return int(rows[0][0])

    def stored_messages(self) -> int:
        rows: list[Any] = self.reader.execute("SELECT count(*) FROM messages").fetchall()
        return int(rows[0][0])
