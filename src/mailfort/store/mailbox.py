"""One user's mail: an encrypted SQLite file holding folders, messages, flags and contents.

The schema carries what IMAP needs (RFC 9051 UIDs and UIDVALIDITY, RFC 7162 MODSEQ and
VANISHED, RFC 6154 special-use) so no protocol has to keep a side index. Contents are stored
once per mailbox, addressed by SHA-256, and parsed once at delivery: ENVELOPE, BODYSTRUCTURE
and the searchable text live beside the raw bytes.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw

from mailfort.mail import MessageMeta, extract_meta
from mailfort.store.committer import GroupCommitter
from mailfort.store.spool import Delivery
from mailfort.store.sqlite import fsync_dir, open_encrypted

SCHEMA_VERSION = 1

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


class FolderNotFound(KeyError):
    pass


@dataclass(frozen=True)
class Folder:
    id: int
    name: str
    special_use: str | None
    uidvalidity: int
    uidnext: int
    highestmodseq: int


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


class Mailbox:
    """An open encrypted mailbox: one writer (group commits) and one reader connection."""

    def __init__(self, path: Path, key: bytes) -> None:
        self.path = path
        new = not path.exists()
        write_con = self._connect(path, key, create=True)
        if new:
            fsync_dir(path.parent)
        if write_con.pragma("user_version") == 0:
            self._create(write_con)
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
            con.pragma("user_version", SCHEMA_VERSION)

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
    ) -> Filed:
        seen = con.execute("SELECT 1 FROM deliveries WHERE id = ?", (delivery.delivery_id,))
        if seen.fetchall():
            return Filed(delivery.folder, 0, duplicate=True)
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
        searchable = f"{meta.subject or ''}\n{meta.text}"
        con.execute("INSERT INTO content_text(rowid, text) VALUES (?, ?)", (content_id, searchable))
        return content_id

    async def deliver(self, delivery: Delivery, flags: Sequence[str] = ()) -> Filed:
        import asyncio

        digest, meta = await asyncio.to_thread(self.prepare, delivery.raw)
        return await self.committer.run(lambda con: self.file(con, delivery, digest, meta, flags))

    def deliver_sync(self, delivery: Delivery, flags: Sequence[str] = ()) -> Filed:
        digest, meta = self.prepare(delivery.raw)
        return self.committer.submit(
            lambda con: self.file(con, delivery, digest, meta, flags)
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
            con.execute("DELETE FROM contents WHERE id = ?", (content_id,))

    # ---- reads --------------------------------------------------------------------------

    @staticmethod
    def _folder(con: apsw.Connection, name: str) -> Folder:
        row: list[Any] = con.execute(
            "SELECT id, name, special_use, uidvalidity, uidnext, highestmodseq"
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
            "SELECT id, name, special_use, uidvalidity, uidnext, highestmodseq"
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
