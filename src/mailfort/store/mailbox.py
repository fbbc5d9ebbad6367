"""One user's mail: an encrypted SQLite file holding folders, messages, flags and contents.

The schema carries what IMAP needs (RFC 9051 UIDs and UIDVALIDITY, RFC 7162 MODSEQ and
VANISHED, RFC 6154 special-use) so no protocol has to keep a side index. Contents are stored
once per mailbox, addressed by SHA-256, and parsed once at delivery: ENVELOPE, BODYSTRUCTURE
and the searchable text live beside the raw bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import time
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import apsw

from mailfort.mail import MessageMeta, extract_meta, to_crlf, to_wire
from mailfort.store.committer import CommitterClosed, GroupCommitter
from mailfort.store.quota import Quota
from mailfort.store.spool import Delivery
from mailfort.store.sqlite import fsync_dir, open_encrypted

SCHEMA_VERSION = 3

#: Folder names are paths; this separates their levels (the IMAP hierarchy delimiter).
DELIMITER = "/"

# RFC 6154 special-use folders every mailbox starts with.
DEFAULT_FOLDERS: tuple[tuple[str, str | None], ...] = (
    ("INBOX", None),
    ("Sent", "\\Sent"),
    ("Drafts", "\\Drafts"),
    ("Junk", "\\Junk"),
    ("Trash", "\\Trash"),
    ("Archive", "\\Archive"),
)

_SCHEMA = [
    """CREATE TABLE folders (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        special_use TEXT,
        uidvalidity INTEGER NOT NULL,
        uidnext INTEGER NOT NULL DEFAULT 1,
        highestmodseq INTEGER NOT NULL DEFAULT 1,
        subscribed INTEGER NOT NULL DEFAULT 1)""",
    """CREATE TABLE contents (
        id INTEGER PRIMARY KEY,
        sha256 BLOB NOT NULL UNIQUE,
        refs INTEGER NOT NULL,
        size INTEGER NOT NULL,
        meta BLOB NOT NULL)""",
    # Raw bytes apart from the metadata, so scans of metadata never page through bodies.
    "CREATE TABLE bodies (id INTEGER PRIMARY KEY REFERENCES contents(id), raw BLOB NOT NULL)",
    """CREATE TABLE messages (
        folder_id INTEGER NOT NULL REFERENCES folders(id),
        uid INTEGER NOT NULL,
        content_id INTEGER NOT NULL REFERENCES contents(id),
        flags TEXT NOT NULL DEFAULT '',
        internal_date INTEGER NOT NULL,
        modseq INTEGER NOT NULL,
        PRIMARY KEY (folder_id, uid)) WITHOUT ROWID""",
    "CREATE INDEX messages_modseq ON messages(folder_id, modseq)",
    # RFC 7162 §3.2.10: QRESYNC reports UIDs expunged since a MODSEQ.
    """CREATE TABLE vanished (
        folder_id INTEGER NOT NULL, uid INTEGER NOT NULL, modseq INTEGER NOT NULL,
        PRIMARY KEY (folder_id, uid)) WITHOUT ROWID""",
    # Delivery ids already filed: draining a spool twice after a crash files nothing twice.
    "CREATE TABLE deliveries (id BLOB PRIMARY KEY, at INTEGER NOT NULL) WITHOUT ROWID",
    """CREATE VIRTUAL TABLE content_text USING fts5(
        text, content='', contentless_delete=1, tokenize='unicode61 remove_diacritics 2')""",
]


# Version 2: what IMAP reads for every message, apart from the metadata blob (which also
# holds up to 1 MiB of body text), so FETCH ENVELOPE or SEARCH FROM on a large mailbox reads
# a few hundred bytes per message; an index for QRESYNC's "expunged since"; counters.
_SCHEMA_V2 = [
    """CREATE TABLE summaries (
        id INTEGER PRIMARY KEY REFERENCES contents(id),
        size INTEGER NOT NULL,
        envelope BLOB NOT NULL,
        bodystructure BLOB NOT NULL,
        body BLOB NOT NULL,
        subject TEXT,
        from_ TEXT,
        to_ TEXT,
        cc TEXT,
        bcc TEXT,
        sent INTEGER)""",
    "CREATE INDEX vanished_modseq ON vanished(folder_id, modseq)",
    # Full-text hits are contents; this finds their messages without a folder scan each.
    "CREATE INDEX messages_content ON messages(content_id)",
    "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
]


# Version 3 (each step checks before it changes, so it can run over a file that already has
# part of it, e.g. one created by this version's _create and then marked older):
# - folders.recent_uid: UIDs below it were claimed as \\Recent by a session (RFC 3501
#   §2.3.2); SELECT moves it up to UIDNEXT. Existing mail is not new: it starts at UIDNEXT.
# - messages.internal_tz: the zone offset (minutes) of the INTERNALDATE, which APPEND names
#   (RFC 9051 §6.3.12) and FETCH must give back; delivered mail is stamped in UTC.
# - usage counters kept by triggers, so a quota check inside each delivery's transaction
#   reads one row instead of summing the mailbox, and no write path can forget them.
_USAGE_TRIGGERS = [
    """CREATE TRIGGER IF NOT EXISTS usage_insert AFTER INSERT ON messages BEGIN
        UPDATE counters SET value = value + 1 WHERE name = 'usage_messages';
        UPDATE counters SET value = value + (SELECT size FROM contents WHERE id = NEW.content_id)
            WHERE name = 'usage_octets';
    END""",
    """CREATE TRIGGER IF NOT EXISTS usage_delete AFTER DELETE ON messages BEGIN
        UPDATE counters SET value = value - 1 WHERE name = 'usage_messages';
        UPDATE counters SET value = value - (SELECT size FROM contents WHERE id = OLD.content_id)
            WHERE name = 'usage_octets';
    END""",
]


class FolderNotFound(KeyError):
    pass


class FolderError(Exception):
    """A folder operation that cannot be done (deleting INBOX, renaming into itself...)."""


class FolderExists(FolderError):
    pass


class FolderHasChildren(FolderError):
    pass


@dataclass(frozen=True)
class Folder:
    id: int
    name: str
    special_use: str | None
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    #: UIDs from here on have not been claimed as \\Recent by any session yet.
    recent_uid: int = 1


@dataclass(frozen=True)
class MessageRow:
    folder: str
    uid: int
    flags: frozenset[str]
    internal_date_ms: int
    size: int
    modseq: int
    meta: MessageMeta


@dataclass(frozen=True)
class Filed:
    folder: str
    uid: int
    duplicate: bool = False


def normalise_flags(flags: Iterable[str]) -> str:
    return " ".join(sorted(set(flags)))


def _text(value: str) -> str:
    # Header text may carry lone surrogates (undecodable 8-bit bytes); SQLite TEXT is UTF-8.
    return value.encode("utf-8", "replace").decode("utf-8")


class Mailbox:
    """An open encrypted mailbox: one writer (group commits) and one reader connection."""

    def __init__(self, path: Path, key: bytes) -> None:
        self.path = path
        new = not path.exists()
        write_con = self._connect(path, key, create=True)
        if new:
            fsync_dir(path.parent)
        if write_con.pragma("user_version") < SCHEMA_VERSION:
            self._migrate(write_con)
        self.reader = self._connect(path, key, create=False)
        self.committer = GroupCommitter(write_con, f"mbx-{path.stem[:8]}")

    @staticmethod
    def _connect(path: Path, key: bytes, *, create: bool) -> apsw.Connection:
        return open_encrypted(path, key, create=create)

    def close(self) -> None:
        self.committer.close()
        self.committer.con.close()
        self.reader.close()

    @staticmethod
    def _create(con: apsw.Connection) -> None:
        with con:
            for stmt in _SCHEMA:
                con.execute(stmt)
            base = int(time.time()) & 0x7FFFFFFF
            for i, (name, use) in enumerate(DEFAULT_FOLDERS):
                con.execute(
                    "INSERT INTO folders(name, special_use, uidvalidity) VALUES (?, ?, ?)",
                    (name, use, base + i),
                )
            Mailbox._upgrade_v2(con)
            Mailbox._upgrade_v3(con)
            con.pragma("user_version", SCHEMA_VERSION)

    @staticmethod
    def _migrate(con: apsw.Connection) -> None:
        """Create or upgrade the schema, once, even with several processes opening at once."""
        con.execute("BEGIN IMMEDIATE")
        try:
            version = con.pragma("user_version")  # again, now that the write lock is held
            if version == 0:
                Mailbox._create(con)
            elif version < SCHEMA_VERSION:
                if version == 1:
                    Mailbox._upgrade_v2(con)
                Mailbox._upgrade_v3(con)
                con.pragma("user_version", SCHEMA_VERSION)
            con.execute("COMMIT")
        except BaseException:
            if not con.getautocommit():
                con.execute("ROLLBACK")
            raise

    @staticmethod
    def _upgrade_v2(con: apsw.Connection) -> None:
        for stmt in _SCHEMA_V2:
            con.execute(stmt)
        rows: list[Any] = con.execute("SELECT id, size, meta FROM contents").fetchall()
        for content_id, size, meta in rows:
            Mailbox._insert_summary(con, content_id, size, MessageMeta.from_bytes(meta))
        top: list[Any] = con.execute("SELECT coalesce(max(uidvalidity), 0) FROM folders").fetchall()
        con.execute(
            "INSERT INTO counters(name, value) VALUES ('uidvalidity', ?)", (int(top[0][0]),)
        )

    @staticmethod
    def _upgrade_v3(con: apsw.Connection) -> None:
        def columns(table: str) -> set[str]:
            return {str(r[1]) for r in con.execute(f"PRAGMA table_info({table})")}

        if "recent_uid" not in columns("folders"):
            con.execute("ALTER TABLE folders ADD COLUMN recent_uid INTEGER NOT NULL DEFAULT 1")
            con.execute("UPDATE folders SET recent_uid = uidnext")
        if "internal_tz" not in columns("messages"):
            con.execute("ALTER TABLE messages ADD COLUMN internal_tz INTEGER NOT NULL DEFAULT 0")
        for stmt in _USAGE_TRIGGERS:
            con.execute(stmt)
        # Counted again from the rows, in the transaction that created the triggers.
        row: list[Any] = con.execute(
            "SELECT count(*), coalesce(sum(c.size), 0) FROM messages m"
            " JOIN contents c ON c.id = m.content_id"
        ).fetchall()
        con.executemany(
            "INSERT OR REPLACE INTO counters(name, value) VALUES (?, ?)",
            [("usage_messages", int(row[0][0])), ("usage_octets", int(row[0][1]))],
        )

    @staticmethod
    def _insert_summary(
        con: apsw.Connection, content_id: int, size: int, meta: MessageMeta
    ) -> None:
        def addresses(items: list[tuple[str, str]]) -> str | None:
            # "Name <addr>" per line: SEARCH FROM/TO/CC/BCC match name or address.
            text = "\n".join(f"{n} <{a}>" if n else a for n, a in items)
            return _text(text) if text else None

        con.execute(
            "INSERT OR REPLACE INTO summaries(id, size, envelope, bodystructure, body, subject,"
            " from_, to_, cc, bcc, sent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                content_id,
                size,
                to_wire(meta.envelope),
                to_wire(meta.bodystructure),
                to_wire(meta.body),
                None if meta.subject is None else _text(meta.subject),
                addresses(meta.from_),
                addresses(meta.to),
                addresses(meta.cc),
                addresses(meta.bcc),
                meta.date,
            ),
        )

    # ---- writes (run on the committer thread inside a group transaction) ----------------

    @staticmethod
    def prepare(raw: bytes) -> tuple[bytes, MessageMeta]:
        """CPU work done before the write lock: hashing and parsing."""
        return hashlib.sha256(raw).digest(), extract_meta(raw)

    @staticmethod
    def file(
        con: apsw.Connection,
        delivery: Delivery,
        digest: bytes,
        meta: MessageMeta,
        flags: Sequence[str] = (),
        quota: Quota | None = None,
    ) -> Filed:
        seen = con.execute("SELECT 1 FROM deliveries WHERE id = ?", (delivery.delivery_id,))
        if seen.fetchall():
            return Filed(delivery.folder, 0, duplicate=True)
        Mailbox._check_quota(con, quota, len(delivery.raw), 1)
        row: list[Any] = con.execute(
            "SELECT id, uidnext, highestmodseq FROM folders WHERE name = ?", (delivery.folder,)
        ).fetchall()
        if not row:
            raise FolderNotFound(delivery.folder)
        folder_id, uid, modseq = row[0]
        content_id = Mailbox._store_content(con, digest, delivery.raw, meta)
        modseq += 1
        con.execute(
            "INSERT INTO messages(folder_id, uid, content_id, flags, internal_date, modseq)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (folder_id, uid, content_id, normalise_flags(flags), delivery.internal_date_ms, modseq),
        )
        con.execute(
            "UPDATE folders SET uidnext = ?, highestmodseq = ? WHERE id = ?",
            (uid + 1, modseq, folder_id),
        )
        con.execute(
            "INSERT INTO deliveries(id, at) VALUES (?, ?)",
            (delivery.delivery_id, delivery.internal_date_ms),
        )
        return Filed(delivery.folder, uid)

    @staticmethod
    def _store_content(con: apsw.Connection, digest: bytes, raw: bytes, meta: MessageMeta) -> int:
        found: list[Any] = con.execute(
            "SELECT id FROM contents WHERE sha256 = ?", (digest,)
        ).fetchall()
        if found:
            con.execute("UPDATE contents SET refs = refs + 1 WHERE id = ?", (found[0][0],))
            return int(found[0][0])
        con.execute(
            "INSERT INTO contents(sha256, refs, size, meta) VALUES (?, 1, ?, ?)",
            (digest, len(raw), meta.to_bytes()),
        )
        content_id = con.last_insert_rowid()
        con.execute("INSERT INTO bodies(id, raw) VALUES (?, ?)", (content_id, raw))
        Mailbox._insert_summary(con, content_id, len(raw), meta)
        searchable = f"{meta.subject or ''}\n{meta.text}"
        con.execute("INSERT INTO content_text(rowid, text) VALUES (?, ?)", (content_id, searchable))
        return content_id

    async def deliver(
        self, delivery: Delivery, flags: Sequence[str] = (), quota: Quota | None = None
    ) -> Filed:
        digest, meta = await asyncio.to_thread(self.prepare, delivery.raw)
        return await self.committer.run(
            lambda con: self.file(con, delivery, digest, meta, flags, quota)
        )

    def deliver_sync(
        self, delivery: Delivery, flags: Sequence[str] = (), quota: Quota | None = None
    ) -> Filed:
        digest, meta = self.prepare(delivery.raw)
        return self.committer.submit(
            lambda con: self.file(con, delivery, digest, meta, flags, quota)
        ).result()

    def set_flags(self, folder: str, uid: int, flags: Iterable[str]) -> int:
        """Replace a message's flags; returns its new MODSEQ (RFC 7162)."""

        def write(con: apsw.Connection) -> int:
            f = self._folder(con, folder)
            modseq = f.highestmodseq + 1
            con.execute(
                "UPDATE messages SET flags = ?, modseq = ? WHERE folder_id = ? AND uid = ?",
                (normalise_flags(flags), modseq, f.id, uid),
            )
            if con.changes() == 0:
                raise KeyError(uid)
            con.execute("UPDATE folders SET highestmodseq = ? WHERE id = ?", (modseq, f.id))
            return modseq

        return self.committer.submit(write).result()

    def expunge(self, folder: str, uids: Iterable[int]) -> list[int]:
        """Remove messages; contents go when their last reference does (data minimisation)."""
        wanted = list(uids)

        def write(con: apsw.Connection) -> list[int]:
            f = self._folder(con, folder)
            modseq = f.highestmodseq + 1
            gone: list[int] = []
            for uid in wanted:
                row: list[Any] = con.execute(
                    "DELETE FROM messages WHERE folder_id = ? AND uid = ? RETURNING content_id",
                    (f.id, uid),
                ).fetchall()
                if not row:
                    continue
                gone.append(uid)
                con.execute(
                    "INSERT OR REPLACE INTO vanished(folder_id, uid, modseq) VALUES (?, ?, ?)",
                    (f.id, uid, modseq),
                )
                self._release_content(con, int(row[0][0]))
            if gone:
                con.execute("UPDATE folders SET highestmodseq = ? WHERE id = ?", (modseq, f.id))
            return gone

        return self.committer.submit(write).result()

    @staticmethod
    def _release_content(con: apsw.Connection, content_id: int) -> None:
        con.execute("UPDATE contents SET refs = refs - 1 WHERE id = ?", (content_id,))
        left: list[Any] = con.execute(
            "SELECT refs FROM contents WHERE id = ?", (content_id,)
        ).fetchall()
        if left and left[0][0] <= 0:
            con.execute("DELETE FROM content_text WHERE rowid = ?", (content_id,))
            con.execute("DELETE FROM bodies WHERE id = ?", (content_id,))
            con.execute("DELETE FROM summaries WHERE id = ?", (content_id,))
            con.execute("DELETE FROM contents WHERE id = ?", (content_id,))

    # ---- reads --------------------------------------------------------------------------

    @staticmethod
    def _folder(con: apsw.Connection, name: str) -> Folder:
        row: list[Any] = con.execute(
            "SELECT id, name, special_use, uidvalidity, uidnext, highestmodseq, recent_uid"
            " FROM folders WHERE name = ?",
            (name,),
        ).fetchall()
        if not row:
            raise FolderNotFound(name)
        return Folder(*row[0])

    def folder(self, name: str) -> Folder:
        return self._folder(self.reader, name)

    def folders(self) -> list[Folder]:
        rows = self.reader.execute(
            "SELECT id, name, special_use, uidvalidity, uidnext, highestmodseq, recent_uid"
            " FROM folders ORDER BY id"
        )
        return [Folder(*r) for r in rows]

    def messages(self, folder: str) -> list[MessageRow]:
        f = self.folder(folder)
        rows = self.reader.execute(
            "SELECT m.uid, m.flags, m.internal_date, c.size, m.modseq, c.meta"
            " FROM messages m JOIN contents c ON c.id = m.content_id"
            " WHERE m.folder_id = ? ORDER BY m.uid",
            (f.id,),
        )
        return [
            MessageRow(
                folder,
                uid,
                frozenset(flags.split()),
                date,
                size,
                modseq,
                MessageMeta.from_bytes(meta),
            )
            for uid, flags, date, size, modseq, meta in rows
        ]

    def raw(self, folder: str, uid: int) -> bytes:
        row: list[Any] = self.reader.execute(
            "SELECT b.raw FROM messages m JOIN folders f ON f.id = m.folder_id"
            " JOIN bodies b ON b.id = m.content_id WHERE f.name = ? AND m.uid = ?",
            (folder, uid),
        ).fetchall()
        if not row:
            raise KeyError((folder, uid))
        return bytes(row[0][0])

    def search_text(self, folder: str, words: str) -> list[int]:
        """UIDs whose subject or body text holds every word (SEARCH TEXT/BODY backing)."""
        f = self.folder(folder)
        query = " ".join('"' + w.replace('"', '""') + '"' for w in words.split())
        if not query:
            return []
        rows = self.reader.execute(
            "SELECT m.uid FROM content_text t JOIN messages m ON m.content_id = t.rowid"
            " WHERE content_text MATCH ? AND m.folder_id = ? ORDER BY m.uid",
            (query, f.id),
        )
        return [int(r[0]) for r in rows]

    def count(self) -> int:
        rows: list[Any] = self.reader.execute("SELECT count(*) FROM messages").fetchall()
        return int(rows[0][0])

    def integrity_check(self) -> str:
        return str(self.reader.execute("PRAGMA integrity_check").fetchall()[0][0])

    # ==== IMAP / POP3 access ==============================================================
    # Reads run on the caller's thread through the shared reader connection (one statement,
    # one snapshot: no transaction is held across calls); writes go through the group
    # committer, one submit per protocol command however many messages it touches.

    # ---- folder reads -------------------------------------------------------------------

    def find_folder(self, name: str) -> Folder | None:
        try:
            return self._folder(self.reader, name)
        except FolderNotFound:
            return None

    def folder_by_id(self, folder_id: int) -> Folder | None:
        row: list[Any] = self.reader.execute(
            "SELECT id, name, special_use, uidvalidity, uidnext, highestmodseq, recent_uid"
            " FROM folders WHERE id = ?",
            (folder_id,),
        ).fetchall()
        return Folder(*row[0]) if row else None

    def folder_entries(self) -> list[FolderEntry]:
        rows = self.reader.execute(
            "SELECT id, name, special_use, uidvalidity, uidnext, highestmodseq, recent_uid,"
            " subscribed"
            " FROM folders ORDER BY name"
        )
        return [FolderEntry(Folder(*r[:7]), bool(r[7])) for r in rows]

    def folder_counts(self, folder_id: int, *, size: bool = False) -> FolderCounts:
        """STATUS MESSAGES/UNSEEN/DELETED (one scan of the flags) and SIZE if asked."""
        row: list[Any] = self.reader.execute(
            "SELECT count(*), coalesce(sum(instr(flags, '\\Seen') = 0), 0),"
            " coalesce(sum(instr(flags, '\\Deleted') > 0), 0)"
            " FROM messages WHERE folder_id = ?",
            (folder_id,),
        ).fetchall()
        total = 0
        if size:
            srow: list[Any] = self.reader.execute(
                "SELECT coalesce(sum(s.size), 0) FROM messages m"
                " JOIN summaries s ON s.id = m.content_id WHERE m.folder_id = ?",
                (folder_id,),
            ).fetchall()
            total = int(srow[0][0])
        return FolderCounts(int(row[0][0]), int(row[0][1]), int(row[0][2]), total)

    def usage(self) -> tuple[int, int]:
        """(octets, messages) over every folder: what a quota counts."""
        return self._usage(self.reader)

    @staticmethod
    def _usage(con: apsw.Connection) -> tuple[int, int]:
        # Kept by triggers (schema v3): a message copied to two folders counts twice,
        # as the user sees it, though its content is stored once.
        values: dict[str, int] = {
            str(name): int(value)
            for name, value in con.execute(
                "SELECT name, value FROM counters WHERE name IN ('usage_octets', 'usage_messages')"
            )
        }
        return values.get("usage_octets", 0), values.get("usage_messages", 0)

    @staticmethod
    def _check_quota(con: apsw.Connection, quota: Quota | None, octets: int, messages: int) -> None:
        if quota is not None and quota.limited:
            quota.check(*Mailbox._usage(con), octets, messages)

    def keywords(self, folder_id: int) -> set[str]:
        """Keywords in use in a folder (for the FLAGS response): distinct flag sets are few."""
        out: set[str] = set()
        for (flags,) in self.reader.execute(
            "SELECT DISTINCT flags FROM messages WHERE folder_id = ?", (folder_id,)
        ):
            out.update(f for f in flags.split() if not f.startswith("\\"))
        return out

    async def claim_recent(self, folder_id: int) -> tuple[int, int]:
        """RFC 3501 §2.3.2: the first read-write session to select a folder after mail
        arrived is the one to which that mail is \\Recent.  Claims the UIDs not claimed
        yet, atomically across sessions and processes, and returns them as ``[lo, hi)``
        (empty when there was nothing to claim: then nothing is written)."""
        f = self.folder_by_id(folder_id)
        if f is None or f.recent_uid >= f.uidnext:
            return (0, 0)

        def write(con: apsw.Connection) -> tuple[int, int]:
            row: list[Any] = con.execute(
                "SELECT recent_uid, uidnext FROM folders WHERE id = ?", (folder_id,)
            ).fetchall()
            if not row or row[0][0] >= row[0][1]:
                return (0, 0)
            con.execute("UPDATE folders SET recent_uid = ? WHERE id = ?", (row[0][1], folder_id))
            return int(row[0][0]), int(row[0][1])

        return await self.committer.run(write)

    def mark_recent_claimed(self, folder_id: int, upto: int) -> None:
        """Record that UIDs below ``upto`` were claimed by a session that saw them arrive.

        Not waited for: the session decided under the process-wide claim mark (see
        :class:`mailfort.imap.mailboxes.SharedMailbox`), and this only tells other processes.
        """
        with contextlib.suppress(CommitterClosed):  # closing: nobody else is left to tell
            self.committer.submit(
                lambda con: con.execute(
                    "UPDATE folders SET recent_uid = max(recent_uid, ?) WHERE id = ?",
                    (upto, folder_id),
                )
            )

    # ---- message reads ------------------------------------------------------------------

    def uid_list(self, folder_id: int) -> array[int]:
        """Every UID of the folder, ascending: the sequence-number map of a session."""
        out = array("I")
        out.extend(
            r[0]
            for r in self.reader.execute(
                "SELECT uid FROM messages WHERE folder_id = ? ORDER BY uid", (folder_id,)
            )
        )
        return out

    def count_from(self, folder_id: int, uid: int) -> int:
        """How many messages of the folder have a UID of at least ``uid``."""
        row: list[Any] = self.reader.execute(
            "SELECT count(*) FROM messages WHERE folder_id = ? AND uid >= ?", (folder_id, uid)
        ).fetchall()
        return int(row[0][0])

    def first_unseen(self, folder_id: int) -> int | None:
        row: list[Any] = self.reader.execute(
            "SELECT uid FROM messages WHERE folder_id = ? AND instr(flags, '\\Seen') = 0"
            " ORDER BY uid LIMIT 1",
            (folder_id,),
        ).fetchall()
        return int(row[0][0]) if row else None

    def changes(self, folder_id: int, since: int) -> Changes | None:
        """What changed in a folder after MODSEQ ``since``; None if the folder is gone.

        New and re-flagged messages both carry a MODSEQ above ``since`` (RFC 7162 §3.1);
        expunged ones are in ``vanished``.  The HIGHESTMODSEQ is read first, so a change
        committed during the call is reported now or next time, never lost.
        """
        f = self.folder_by_id(folder_id)
        if f is None:
            return None
        if f.highestmodseq <= since:
            return Changes(f, [], [])
        vanished = [
            int(r[0])
            for r in self.reader.execute(
                "SELECT uid FROM vanished WHERE folder_id = ? AND modseq > ? ORDER BY uid",
                (folder_id, since),
            )
        ]
        changed = [
            (int(u), str(fl), int(ms))
            for u, fl, ms in self.reader.execute(
                "SELECT uid, flags, modseq FROM messages WHERE folder_id = ? AND modseq > ?"
                " ORDER BY uid",
                (folder_id, since),
            )
        ]
        return Changes(f, changed, vanished)

    def vanished_since(self, folder_id: int, since: int) -> list[int]:
        """UIDs expunged after MODSEQ ``since`` (RFC 7162 §3.2.5.1 VANISHED (EARLIER))."""
        return [
            int(r[0])
            for r in self.reader.execute(
                "SELECT uid FROM vanished WHERE folder_id = ? AND modseq > ? ORDER BY uid",
                (folder_id, since),
            )
        ]

    def message_columns(
        self,
        folder_id: int,
        uid_ranges: Sequence[tuple[int, int]],
        columns: Sequence[str],
        *,
        changed_since: int | None = None,
    ) -> list[tuple[Any, ...]]:
        """Rows ``(uid, *columns)`` of the messages in ``uid_ranges``, ascending by UID.

        Only the named columns are read (see :data:`MESSAGE_COLUMNS`); the summaries table
        is joined only when one of its columns is asked for, and the metadata blob and
        the body never are.  A 10,000-message ``UID FETCH 1:* (FLAGS)`` reads the
        messages table alone.
        """
        exprs = ["m.uid"]
        join = ""
        for name in columns:
            expr = MESSAGE_COLUMNS[name]
            exprs.append(expr)
            if expr.startswith("s."):
                join = " JOIN summaries s ON s.id = m.content_id"
        where = "m.folder_id = ? AND m.uid BETWEEN ? AND ?"
        extra: tuple[int, ...] = ()
        if changed_since is not None:
            where += " AND m.modseq > ?"
            extra = (changed_since,)
        sql = f"SELECT {', '.join(exprs)} FROM messages m{join} WHERE {where} ORDER BY m.uid"
        if len(uid_ranges) > _MAX_RANGE_QUERIES:
            # A scattered set (a client's long list of UIDs): one scan and a filter beats
            # hundreds of range lookups.
            wanted = {u for lo, hi in uid_ranges for u in range(lo, hi + 1)}
            lo, hi = uid_ranges[0][0], uid_ranges[-1][1]
            return [
                r for r in self.reader.execute(sql, (folder_id, lo, hi, *extra)) if r[0] in wanted
            ]
        if len(uid_ranges) == 1:
            lo, hi = uid_ranges[0]
            return list(self.reader.execute(sql, (folder_id, lo, hi, *extra)))
        out: list[tuple[Any, ...]] = []
        for lo, hi in uid_ranges:
            out.extend(self.reader.execute(sql, (folder_id, lo, hi, *extra)))
        return out

    def uids_containing(self, folder_id: int, column: str, needle: str) -> set[int]:
        """UIDs whose ``column`` holds ``needle``, ASCII case-insensitively (a narrowing step
        for SEARCH: the exact test runs on what it returns).  ``column`` is ``flags`` or a
        summary header column of :data:`MESSAGE_COLUMNS`."""
        expr = MESSAGE_COLUMNS[column]
        join = " JOIN summaries s ON s.id = m.content_id" if expr.startswith("s.") else ""
        rows = self.reader.execute(
            f"SELECT m.uid FROM messages m{join}"
            f" WHERE m.folder_id = ? AND instr(lower({expr}), ?) > 0",
            (folder_id, needle.lower()),
        )
        return {int(r[0]) for r in rows}

    def uids_lacking_flag(self, folder_id: int, flag: str) -> set[int]:
        """UIDs without a system flag (exact: no keyword can contain a backslash)."""
        rows = self.reader.execute(
            "SELECT uid FROM messages WHERE folder_id = ? AND instr(lower(flags), ?) = 0",
            (folder_id, flag.lower()),
        )
        return {int(r[0]) for r in rows}

    def content(self, content_id: int) -> bytes:
        """A message's stored bytes (CRLF line ends)."""
        row: list[Any] = self.reader.execute(
            "SELECT raw FROM bodies WHERE id = ?", (content_id,)
        ).fetchall()
        if not row:
            raise KeyError(content_id)
        return bytes(row[0][0])

    def content_head(self, content_id: int, limit: int = 1 << 20) -> bytes:
        """The header of a stored message and its blank line, read incrementally.

        ``BODY.PEEK[HEADER.FIELDS (...)]``, which clients send for every message of a
        folder, needs only this; a 20 MB attachment below it is never read or decrypted.
        """
        try:
            blob = self.reader.blob_open("main", "bodies", "raw", content_id, False)
        except apsw.SQLError as exc:
            raise KeyError(content_id) from exc
        try:
            data = b""
            chunk = 4096
            while True:
                piece = blob.read(chunk)
                if not piece:
                    return data
                start = max(0, len(data) - 3)
                data += piece
                end = data.find(b"\r\n\r\n", start)
                if end >= 0:
                    return data[: end + 4]
                if len(data) >= limit:
                    return data
                chunk = min(chunk * 4, 1 << 20)
        finally:
            blob.close()

    def message_text(self, content_id: int) -> str:
        """The indexed plain text of a message (slow path for searches FTS cannot serve)."""
        meta = self._meta_json(content_id)
        return f"{meta.get('subject') or ''}\n{meta.get('text') or ''}"

    def body_text(self, content_id: int) -> str:
        """The decoded text of a message's text parts, without the subject (SEARCH BODY)."""
        return str(self._meta_json(content_id).get("text") or "")

    def _meta_json(self, content_id: int) -> dict[str, Any]:
        row: list[Any] = self.reader.execute(
            "SELECT meta FROM contents WHERE id = ?", (content_id,)
        ).fetchall()
        if not row:
            return {}
        meta: dict[str, Any] = json.loads(bytes(row[0][0]))
        return meta

    def body_containing(self, folder_id: int, uids: Iterable[int] | None, needle: str) -> set[int]:
        """Those of ``uids`` (None: all of the folder) whose decoded body text (not the
        subject) contains ``needle`` (already case-folded), read in one query."""
        where = ""
        if uids is not None:
            wanted = sorted(uids)
            if not wanted:
                return set()
            where = f" AND m.uid IN ({','.join(str(int(u)) for u in wanted)})"
        # The metadata is ASCII JSON: printable ASCII stands for itself, other characters
        # are escaped.  A plain needle absent from the lower-cased JSON of a message with
        # no \\u escape (a character that might fold into it) is not in its text: that
        # message is settled without parsing.
        plain = needle.encode() if _PLAIN_NEEDLE.fullmatch(needle) else None
        out: set[int] = set()
        rows = self.reader.execute(
            "SELECT m.uid, c.meta FROM messages m JOIN contents c ON c.id = m.content_id"
            f" WHERE m.folder_id = ?{where}",
            (folder_id,),
        )
        for uid, meta in rows:
            raw = bytes(meta)
            if plain is not None and plain not in raw.lower() and b"\\u" not in raw:
                continue
            text = json.loads(raw).get("text") or ""
            if needle in text.casefold():
                out.add(int(uid))
        return out

    def _fts_query(self, folder_id: int, query: str) -> set[int]:
        rows = self.reader.execute(
            "SELECT m.uid FROM content_text t JOIN messages m ON m.content_id = t.rowid"
            " WHERE content_text MATCH ? AND m.folder_id = ?",
            (query, folder_id),
        )
        return {int(r[0]) for r in rows}

    def substring_candidates(self, folder_id: int, needle: str) -> set[int] | None:
        """A superset of the UIDs whose subject or body text contains ``needle`` (already
        case-folded) as a substring, from the FTS5 index; None when the index cannot
        narrow the search soundly (the caller then scans).

        The needle's words (runs of letters and digits) map onto the index's tokens:
        a word with a separator on both sides is a whole token, one that ends the needle
        may be a token's prefix (``"w"*``), and one that starts the needle may be the end
        (or, alone, the middle) of a token, so it is looked up in the index's vocabulary
        (ASCII words only: the vocabulary is folded and stripped of diacritics by the
        tokenizer, which Python does not reproduce exactly).  The tokenizer folds case
        one character at a time, so texts with a term holding a character whose full
        case folding is longer (``ß`` is "ss") are always candidates.
        """
        if any(not ch.isascii() and not ch.isalnum() for ch in needle):
            return None  # combining marks, non-ASCII punctuation: the tokenizer may differ
        words = _needle_words(needle)
        if not words:
            return None
        first, start_open, end_open = words[0]
        rest = words[1:] if start_open else words
        word = first if start_open and first.isascii() else None
        vocab = self._vocab_terms(word, inside=end_open)
        if vocab is None:
            return None
        word_terms, folding_terms = vocab
        if word is not None and not word_terms:
            query = ""  # only a text matching through a longer case folding can hold it
        else:
            parts = ["(" + " OR ".join(_fts_quote(t) for t in word_terms) + ")"] if word else []
            if rest:
                phrase = " ".join(w for w, _, _ in rest)
                parts.append(_fts_quote(phrase) + (" *" if rest[-1][2] else ""))
            if not parts:
                return None
            query = " AND ".join(parts)
        if folding_terms:
            extra = " OR ".join(_fts_quote(t) for t in folding_terms)
            query = f"({query}) OR {extra}" if query else extra
        return self._fts_query(folder_id, query) if query else set()

    _VOCAB_LIMIT = 256

    def _vocab_terms(self, word: str | None, *, inside: bool) -> tuple[list[str], list[str]] | None:
        """Index terms that end with ``word`` (or contain it, ``inside``), and terms with a
        character whose case folding is longer; None if too many for one query."""
        self.reader.execute(
            "CREATE VIRTUAL TABLE IF NOT EXISTS temp.content_vocab"
            " USING fts5vocab(main, content_text, row)"
        )
        folding = "*[" + _FOLD_EXPANDING + "]*"
        if word is None:
            sql = "SELECT term, 0 FROM temp.content_vocab WHERE term GLOB ?1 LIMIT ?2"
            args: tuple[Any, ...] = (folding, self._VOCAB_LIMIT + 1)
        else:
            if inside:
                match = "instr(term, ?3) > 0"
                arg = word
            else:
                match = "term LIKE ?3 ESCAPE '\\'"
                arg = "%" + word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            sql = (
                f"SELECT term, {match} FROM temp.content_vocab"
                f" WHERE {match} OR term GLOB ?1 LIMIT ?2"
            )
            args = (folding, self._VOCAB_LIMIT + 1, arg)
        rows = self.reader.execute(sql, args).fetchall()
        if len(rows) > self._VOCAB_LIMIT:
            return None
        return [str(t) for t, m in rows if m], [str(t) for t, m in rows if not m]

    # ---- folder writes ------------------------------------------------------------------

    @staticmethod
    def _find(con: apsw.Connection, name: str) -> Folder | None:
        try:
            return Mailbox._folder(con, name)
        except FolderNotFound:
            return None

    @staticmethod
    def _next_uidvalidity(con: apsw.Connection) -> int:
        # RFC 9051 §2.3.1.1: a name reused after DELETE must get a new UIDVALIDITY, so the
        # last value handed out is remembered, not just derived from the folders left.
        row: list[Any] = con.execute(
            "SELECT value FROM counters WHERE name = 'uidvalidity'"
        ).fetchall()
        last = int(row[0][0]) if row else 0
        value = max(int(time.time()) & 0x7FFFFFFF, last + 1)
        con.execute(
            "INSERT OR REPLACE INTO counters(name, value) VALUES ('uidvalidity', ?)", (value,)
        )
        return value

    @staticmethod
    def _insert_folder(
        con: apsw.Connection, name: str, special_use: str | None, *, subscribed: bool
    ) -> Folder:
        uidvalidity = Mailbox._next_uidvalidity(con)
        con.execute(
            "INSERT INTO folders(name, special_use, uidvalidity, subscribed) VALUES (?, ?, ?, ?)",
            (name, special_use, uidvalidity, int(subscribed)),
        )
        return Mailbox._folder(con, name)

    @staticmethod
    def _create_parents(con: apsw.Connection, name: str) -> None:
        # RFC 9051 §6.3.4: creating "a/b/c" creates the missing superior names too.
        parts = name.split(DELIMITER)
        for i in range(1, len(parts)):
            parent = DELIMITER.join(parts[:i])
            if Mailbox._find(con, parent) is None:
                Mailbox._insert_folder(con, parent, None, subscribed=False)

    @staticmethod
    def _has_children(con: apsw.Connection, name: str) -> bool:
        prefix = name + DELIMITER
        row: list[Any] = con.execute(
            "SELECT 1 FROM folders WHERE substr(name, 1, ?) = ? LIMIT 1", (len(prefix), prefix)
        ).fetchall()
        return bool(row)

    async def create_folder(self, name: str, special_use: str | None = None) -> Folder:
        def write(con: apsw.Connection) -> Folder:
            if self._find(con, name) is not None:
                raise FolderExists(name)
            self._create_parents(con, name)
            return self._insert_folder(con, name, special_use, subscribed=False)

        return await self.committer.run(write)

    async def delete_folder(self, name: str) -> None:
        """Delete a folder and its messages.  RFC 9051 §6.3.5: INBOX cannot be deleted; a
        folder with subfolders is refused (HASCHILDREN) rather than left as a \\Noselect
        placeholder."""

        def write(con: apsw.Connection) -> None:
            if name == "INBOX":
                raise FolderError("INBOX cannot be deleted")
            f = self._folder(con, name)
            if self._has_children(con, name):
                raise FolderHasChildren(name)
            rows: list[Any] = con.execute(
                "DELETE FROM messages WHERE folder_id = ? RETURNING content_id", (f.id,)
            ).fetchall()
            for (content_id,) in rows:
                self._release_content(con, int(content_id))
            con.execute("DELETE FROM vanished WHERE folder_id = ?", (f.id,))
            con.execute("DELETE FROM folders WHERE id = ?", (f.id,))

        await self.committer.run(write)

    async def rename_folder(self, old: str, new: str) -> None:
        """RFC 9051 §6.3.6: rename a folder with its subfolders.  Renaming INBOX moves its
        messages to a new folder and leaves INBOX empty (its subfolders stay)."""

        def write(con: apsw.Connection) -> None:
            src = self._folder(con, old)
            if self._find(con, new) is not None:
                raise FolderExists(new)
            if new.startswith(old + DELIMITER):
                raise FolderError("a folder cannot be moved into itself")
            self._create_parents(con, new)
            if old == "INBOX":
                dst = self._insert_folder(con, new, None, subscribed=True)
                rows: list[Any] = con.execute(
                    "SELECT uid FROM messages WHERE folder_id = ?", (src.id,)
                ).fetchall()
                # The new folder has a fresh UIDVALIDITY, so the messages keep their UIDs.
                con.execute(
                    "UPDATE messages SET folder_id = ?, modseq = 1 WHERE folder_id = ?",
                    (dst.id, src.id),
                )
                # What was claimed as \\Recent in INBOX stays claimed in its new home.
                con.execute(
                    "UPDATE folders SET uidnext = ?, highestmodseq = 1, recent_uid = ? WHERE id = ?",
                    (src.uidnext, src.recent_uid, dst.id),
                )
                if rows:
                    modseq = src.highestmodseq + 1
                    con.executemany(
                        "INSERT OR REPLACE INTO vanished(folder_id, uid, modseq) VALUES (?, ?, ?)",
                        [(src.id, int(r[0]), modseq) for r in rows],
                    )
                    con.execute(
                        "UPDATE folders SET highestmodseq = ? WHERE id = ?", (modseq, src.id)
                    )
                return
            prefix = old + DELIMITER
            con.execute(
                "UPDATE folders SET name = ? || substr(name, ?) WHERE substr(name, 1, ?) = ?",
                (new + DELIMITER, len(prefix) + 1, len(prefix), prefix),
            )
            con.execute("UPDATE folders SET name = ? WHERE id = ?", (new, src.id))

        await self.committer.run(write)

    async def set_subscribed(self, name: str, subscribed: bool) -> None:
        def write(con: apsw.Connection) -> None:
            con.execute("UPDATE folders SET subscribed = ? WHERE name = ?", (int(subscribed), name))
            if con.changes() == 0:
                raise FolderNotFound(name)

        await self.committer.run(write)

    # ---- message writes -----------------------------------------------------------------

    async def append(
        self, folder: str, items: Sequence[AppendItem], quota: Quota | None = None
    ) -> Appended:
        """File messages a client uploads (APPEND, MULTIAPPEND: all or none); raises
        :class:`QuotaExceeded` (checked in the write transaction) if they do not fit."""
        (result,) = await self.append_many([(folder, items, quota)])
        if isinstance(result, BaseException):
            raise result
        return result

    async def append_many(
        self, requests: Sequence[tuple[str, Sequence[AppendItem], Quota | None]]
    ) -> list[Appended | Exception]:
        """Several APPENDs (a client's pipelined commands) in one commit, in order.

        Each request is all or none on its own (a savepoint each): one over quota or to a
        missing folder leaves the others filed.  One transaction, hence one fsync, for all
        of them is what makes pipelined APPENDs fast.
        """

        def prepare() -> list[list[tuple[AppendItem, bytes, MessageMeta]]]:
            out = []
            for _folder, items, _quota in requests:
                done = []
                for item in items:
                    raw = to_crlf(item.raw)
                    digest, meta = self.prepare(raw)
                    done.append(
                        (
                            AppendItem(raw, item.flags, item.internal_date_ms, item.internal_tz),
                            digest,
                            meta,
                        )
                    )
                out.append(done)
            return out

        prepared = await asyncio.to_thread(prepare)

        def write(con: apsw.Connection) -> list[Appended | Exception]:
            results: list[Appended | Exception] = []
            for (folder, _items, quota), messages in zip(requests, prepared, strict=True):
                con.execute("SAVEPOINT append")
                try:
                    results.append(self._append_in(con, folder, messages, quota))
                except Exception as exc:  # this request's failure, not its neighbours'
                    con.execute("ROLLBACK TO append")
                    results.append(exc)
                con.execute("RELEASE append")
            return results

        return await self.committer.run(write)

    @staticmethod
    def _append_in(
        con: apsw.Connection,
        folder: str,
        prepared: Sequence[tuple[AppendItem, bytes, MessageMeta]],
        quota: Quota | None,
    ) -> Appended:
        f = Mailbox._folder(con, folder)
        Mailbox._check_quota(con, quota, sum(len(p[0].raw) for p in prepared), len(prepared))
        uid, modseq = f.uidnext, f.highestmodseq + 1
        uids: list[int] = []
        for item, digest, meta in prepared:
            content_id = Mailbox._store_content(con, digest, item.raw, meta)
            con.execute(
                "INSERT INTO messages(folder_id, uid, content_id, flags, internal_date,"
                " internal_tz, modseq) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    f.id,
                    uid,
                    content_id,
                    normalise_flags(item.flags),
                    item.internal_date_ms,
                    item.internal_tz,
                    modseq,
                ),
            )
            uids.append(uid)
            uid += 1
        con.execute(
            "UPDATE folders SET uidnext = ?, highestmodseq = ? WHERE id = ?",
            (uid, modseq, f.id),
        )
        return Appended(f.uidvalidity, uids)

    async def store_flags(
        self,
        folder_id: int,
        uids: Sequence[int],
        mode: Literal["+", "-", ""],
        flags: Sequence[str],
        *,
        unchanged_since: int | None = None,
    ) -> FlagUpdate:
        """Add (``+``), remove (``-``) or replace (``""``) flags of many messages in one
        commit; every changed message gets the same new MODSEQ (RFC 7162 §3.1.3).

        Flag names compare case-insensitively (RFC 9051 §2.3.2); a keyword keeps the case
        it was first stored with.  With ``unchanged_since``, messages modified after it
        are left alone and listed in ``conflicts`` (the MODIFIED response code).
        """
        wanted = sorted(set(uids))

        def write(con: apsw.Connection) -> FlagUpdate:
            f = self.folder_by_id_con(con, folder_id)
            if f is None:
                raise FolderNotFound(folder_id)
            modseq = f.highestmodseq + 1
            rows: list[tuple[int, str, int]] = []
            conflicts: list[int] = []
            updates: list[tuple[str, int, int, int]] = []
            changed: set[int] = set()
            for uid, current, old_modseq in _select_uids(
                con, "SELECT uid, flags, modseq FROM messages", folder_id, wanted
            ):
                if unchanged_since is not None and old_modseq > unchanged_since:
                    conflicts.append(uid)
                    continue
                new = _apply_flags(current, mode, flags)
                if new == current:
                    rows.append((uid, current, old_modseq))
                    continue
                updates.append((new, modseq, folder_id, uid))
                rows.append((uid, new, modseq))
                changed.add(uid)
            if updates:
                con.executemany(
                    "UPDATE messages SET flags = ?, modseq = ? WHERE folder_id = ? AND uid = ?",
                    updates,
                )
                con.execute("UPDATE folders SET highestmodseq = ? WHERE id = ?", (modseq, f.id))
            return FlagUpdate(modseq if updates else f.highestmodseq, rows, changed, conflicts)

        return await self.committer.run(write)

    @staticmethod
    def folder_by_id_con(con: apsw.Connection, folder_id: int) -> Folder | None:
        row: list[Any] = con.execute(
            "SELECT id, name, special_use, uidvalidity, uidnext, highestmodseq, recent_uid"
            " FROM folders WHERE id = ?",
            (folder_id,),
        ).fetchall()
        return Folder(*row[0]) if row else None

    async def copy_messages(
        self,
        source_id: int,
        uids: Sequence[int],
        dest: str,
        *,
        move: bool = False,
        quota: Quota | None = None,
    ) -> CopyResult:
        """COPY (RFC 9051 §6.4.7) or MOVE (RFC 6851): new UIDs in ``dest``, same contents
        (shared, not duplicated), flags and internal dates; MOVE removes the originals in
        the same transaction, so no failure leaves a message in both folders or neither."""
        wanted = sorted(set(uids))

        def write(con: apsw.Connection) -> CopyResult:
            src = self.folder_by_id_con(con, source_id)
            if src is None:
                raise FolderNotFound(source_id)
            dst = self._folder(con, dest)
            rows = list(
                _select_uids(
                    con,
                    "SELECT m.uid, m.content_id, m.flags, m.internal_date, m.internal_tz,"
                    " c.size FROM messages m JOIN contents c ON c.id = m.content_id",
                    source_id,
                    wanted,
                )
            )
            if not move:  # a move leaves the mailbox's size as it was
                self._check_quota(con, quota, sum(int(r[5]) for r in rows), len(rows))
            uid = dst.uidnext
            dst_modseq = dst.highestmodseq + 1
            source: list[int] = []
            target: list[int] = []
            for src_uid, content_id, flags, date, tz, _size in rows:
                con.execute("UPDATE contents SET refs = refs + 1 WHERE id = ?", (content_id,))
                con.execute(
                    "INSERT INTO messages(folder_id, uid, content_id, flags, internal_date,"
                    " internal_tz, modseq) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (dst.id, uid, content_id, flags, date, tz, dst_modseq),
                )
                source.append(int(src_uid))
                target.append(uid)
                uid += 1
            if target:
                con.execute(
                    "UPDATE folders SET uidnext = ?, highestmodseq = ? WHERE id = ?",
                    (uid, dst_modseq, dst.id),
                )
            if move and source:
                # Read the source again: copying into the same folder changed its modseq.
                self._expunge_in(con, source_id, source)
            return CopyResult(dst.uidvalidity, source, target)

        return await self.committer.run(write)

    @staticmethod
    def _expunge_in(con: apsw.Connection, folder_id: int, uids: Sequence[int]) -> list[int]:
        f = Mailbox.folder_by_id_con(con, folder_id)
        if f is None:
            raise FolderNotFound(folder_id)
        modseq = f.highestmodseq + 1
        gone: list[tuple[int, int]] = []
        for i in range(0, len(uids), 500):
            batch = json.dumps(list(uids[i : i + 500]))
            gone.extend(
                (int(u), int(cid))
                for u, cid in con.execute(
                    "DELETE FROM messages WHERE folder_id = ? AND uid IN"
                    " (SELECT value FROM json_each(?)) RETURNING uid, content_id",
                    (folder_id, batch),
                )
            )
        if not gone:
            return []
        con.executemany(
            "INSERT OR REPLACE INTO vanished(folder_id, uid, modseq) VALUES (?, ?, ?)",
            [(folder_id, uid, modseq) for uid, _ in gone],
        )
        for _, content_id in gone:
            Mailbox._release_content(con, content_id)
        con.execute("UPDATE folders SET highestmodseq = ? WHERE id = ?", (modseq, folder_id))
        return sorted(uid for uid, _ in gone)

    async def expunge_messages(
        self, folder_id: int, uids: Sequence[int] | None = None, *, deleted_only: bool = True
    ) -> list[int]:
        """EXPUNGE / UID EXPUNGE / CLOSE (RFC 9051 §6.4.3, RFC 4315 §2.1) and POP3's UPDATE.

        With ``deleted_only`` only messages flagged \\Deleted go; the flag is checked inside
        the write transaction, so a concurrent -FLAGS \\Deleted wins or loses cleanly.
        ``uids=None`` means the whole folder.  Returns the expunged UIDs, ascending.
        """
        wanted = None if uids is None else sorted(set(uids))

        def write(con: apsw.Connection) -> list[int]:
            sql = "SELECT uid, flags FROM messages"
            if wanted is None:
                rows: Iterable[tuple[Any, ...]] = con.execute(
                    sql + " WHERE folder_id = ?", (folder_id,)
                )
            else:
                rows = _select_uids(con, sql, folder_id, wanted)
            doomed = [
                int(uid)
                for uid, flags in rows
                if not deleted_only or "\\Deleted" in str(flags).split()
            ]
            return self._expunge_in(con, folder_id, doomed) if doomed else []

        return await self.committer.run(write)


# Columns :meth:`Mailbox.message_columns` can read, by name.  The "_wire" ones come back
# as the bytes IMAP sends: rendering 10,000 FETCH lines is then string formatting alone.
MESSAGE_COLUMNS: dict[str, str] = {
    "flags": "m.flags",
    "flags_wire": "CAST(m.flags AS BLOB)",
    # RFC 9051 §9 date-time, e.g. "04-Mar-2024 10:00:00 +0100", quotes included: the
    # wall-clock time in the zone the date was given in (APPEND), UTC for delivered mail.
    "internal_date_wire": (
        "CAST(strftime('\"%d-', m.internal_date / 1000 + m.internal_tz * 60, 'unixepoch')"
        " || substr('JanFebMarAprMayJunJulAugSepOctNovDec',"
        " strftime('%m', m.internal_date / 1000 + m.internal_tz * 60, 'unixepoch') * 3 - 2, 3)"
        " || strftime('-%Y %H:%M:%S ', m.internal_date / 1000 + m.internal_tz * 60, 'unixepoch')"
        " || printf('%s%02d%02d\"', iif(m.internal_tz < 0, '-', '+'),"
        " abs(m.internal_tz) / 60, abs(m.internal_tz) % 60) AS BLOB)"
    ),
    "internal_date": "m.internal_date",
    "internal_tz": "m.internal_tz",
    "modseq": "m.modseq",
    "content_id": "m.content_id",
    "size": "s.size",
    "envelope": "s.envelope",
    "bodystructure": "s.bodystructure",
    "body": "s.body",
    "subject": "s.subject",
    "from": "s.from_",
    "to": "s.to_",
    "cc": "s.cc",
    "bcc": "s.bcc",
    "sent": "s.sent",
}
_MAX_RANGE_QUERIES = 64


def _select_uids(
    con: apsw.Connection, select: str, folder_id: int, uids: Sequence[int]
) -> Iterable[tuple[Any, ...]]:
    """Rows of ``select`` (a "SELECT ... FROM messages") for the given sorted UIDs."""
    for i in range(0, len(uids), 500):
        batch = json.dumps(list(uids[i : i + 500]))
        yield from con.execute(
            select + " WHERE folder_id = ? AND uid IN (SELECT value FROM json_each(?))"
            " ORDER BY uid",
            (folder_id, batch),
        )


def _apply_flags(current: str, mode: str, flags: Sequence[str]) -> str:
    have = current.split()
    if mode == "":
        result: dict[str, str] = {}
        for f in flags:
            result.setdefault(f.casefold(), f)
        return normalise_flags(result.values())
    if mode == "+":
        known = {h.casefold() for h in have}
        extra = []
        for f in flags:
            if f.casefold() not in known:
                known.add(f.casefold())
                extra.append(f)
        return normalise_flags(have + extra) if extra else current
    drop = {f.casefold() for f in flags}
    kept = [h for h in have if h.casefold() not in drop]
    return normalise_flags(kept) if len(kept) != len(have) else current


@dataclass(frozen=True, slots=True)
class FolderEntry:
    folder: Folder
    subscribed: bool


@dataclass(frozen=True, slots=True)
class FolderCounts:
    messages: int
    unseen: int
    deleted: int
    size: int


@dataclass(frozen=True, slots=True)
class Changes:
    folder: Folder
    changed: list[tuple[int, str, int]]  # (uid, flags, modseq): new or re-flagged
    vanished: list[int]  # expunged UIDs


@dataclass(frozen=True, slots=True)
class AppendItem:
    raw: bytes = field(repr=False)
    flags: Sequence[str] = ()
    internal_date_ms: int = 0
    #: The date-time's zone, minutes east of UTC (RFC 9051 §9 zone), kept for FETCH.
    internal_tz: int = 0


@dataclass(frozen=True, slots=True)
class Appended:
    uidvalidity: int
    uids: list[int]


@dataclass(frozen=True, slots=True)
class FlagUpdate:
    modseq: int  # the folder's HIGHESTMODSEQ after the update
    rows: list[tuple[int, str, int]]  # (uid, flags, modseq) of every message updated or not
    changed: set[int]
    conflicts: list[int]  # UIDs refused by UNCHANGEDSINCE


@dataclass(frozen=True, slots=True)
class CopyResult:
    uidvalidity: int  # of the destination
    source: list[int]
    dest: list[int]


#: Characters whose full case folding is longer than one character ("ß" is "ss"): the
#: index folds one character at a time, so a term holding one is always a candidate.
_FOLD_EXPANDING = "".join(
    sorted(
        {
            f
            for c in map(chr, range(0x80, 0x10000))
            if len(c.casefold()) > 1
            for f in (c, c.lower())
            if len(f) == 1 and not f.isascii()
        }
    )
)


#: A needle of printable ASCII that JSON writes as itself (no quote, no backslash).
_PLAIN_NEEDLE = re.compile(r"[ !#-\[\]-~]+")


def _fts_quote(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def _needle_words(needle: str) -> list[tuple[str, bool, bool]]:
    """The runs of letters and digits of ``needle``, each with whether it touches the
    needle's start and end (so may continue into the surrounding text)."""
    out: list[tuple[str, bool, bool]] = []
    i, n = 0, len(needle)
    while i < n:
        if not needle[i].isalnum():
            i += 1
            continue
        j = i
        while j < n and needle[j].isalnum():
            j += 1
        out.append((needle[i:j], i == 0, j == n))
        i = j
    return out
