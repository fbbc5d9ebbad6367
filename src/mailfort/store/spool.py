"""A mailbox's spool: sealed messages waiting for the mailbox to be opened.

The spool is a plain SQLite file (WAL, fsync at commit) holding only sealed blobs, which
the server can append to but never read back: their keys exist only inside the mailbox's
key slots. It stores no sender, size class or time beyond SQLite's own row order.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw

from mailfort.keys.seal import OpenedEpoch, SealingEpoch
from mailfort.keys.secrets import MailboxSecrets, PublicKeys
from mailfort.store.committer import GroupCommitter
from mailfort.store.quota import Quota
from mailfort.store.sqlite import fsync_dir, open_plain

_SCHEMA = (
    # A sealing epoch's header: the encapsulation its messages share (keys/seal.py).
    "CREATE TABLE IF NOT EXISTS epochs (id BLOB PRIMARY KEY, header BLOB NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS spool (id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " epoch BLOB NOT NULL, sealed BLOB NOT NULL)",
    # What a quota check needs while the mailbox is closed (its usage is inside the
    # encrypted file): the usage recorded when the mailbox was last closed or drained,
    # and what waits here, kept by triggers.  Nothing the file's size does not show.
    "CREATE TABLE IF NOT EXISTS usage (id INTEGER PRIMARY KEY CHECK (id = 1),"
    " stored_octets INTEGER NOT NULL, stored_messages INTEGER NOT NULL,"
    " pending_octets INTEGER NOT NULL, pending_messages INTEGER NOT NULL)",
    # Counted from the rows in the transaction that creates the triggers (an older spool
    # may hold mail already); a no-op once the row exists.
    "INSERT OR IGNORE INTO usage SELECT 1, 0, 0, coalesce(sum(length(sealed)), 0), count(*)"
    " FROM spool",
    """CREATE TRIGGER IF NOT EXISTS spool_insert AFTER INSERT ON spool BEGIN
        UPDATE usage SET pending_octets = pending_octets + length(NEW.sealed),
            pending_messages = pending_messages + 1;
    END""",
    """CREATE TRIGGER IF NOT EXISTS spool_delete AFTER DELETE ON spool BEGIN
        UPDATE usage SET pending_octets = pending_octets - length(OLD.sealed),
            pending_messages = pending_messages - 1;
    END""",
)
_HEADER = struct.Struct(">16sqH")  # delivery id, internal date (ms), folder name length


@dataclass(frozen=True)
class Delivery:
    """What travels sealed: the message and what the mailbox needs to file it."""

    delivery_id: bytes  # 16 random bytes; makes filing idempotent across crashes
    internal_date_ms: int
    folder: str
    raw: bytes

    def to_bytes(self) -> bytes:
        folder = self.folder.encode("utf-8")
        header = _HEADER.pack(self.delivery_id, self.internal_date_ms, len(folder))
        return header + folder + self.raw

    @classmethod
    def from_bytes(cls, data: bytes) -> Delivery:
        delivery_id, date_ms, flen = _HEADER.unpack_from(data)
        start = _HEADER.size
        folder = data[start : start + flen].decode("utf-8")
        return cls(delivery_id, date_ms, folder, data[start + flen :])


def now_ms() -> int:
    return int(time.time() * 1000)


class Spool:
    def __init__(self, path: Path) -> None:
        self.path = path
        new = not path.exists()
        self.con = open_plain(path)
        # Filed items leave no sealed bytes behind in free pages (docs/keys.md).
        self.con.pragma("secure_delete", 1)
        self.con.execute("BEGIN IMMEDIATE")  # two processes may open a new spool at once
        try:
            for stmt in _SCHEMA:
                self.con.execute(stmt)
            self.con.execute("COMMIT")
        except BaseException:
            if not self.con.getautocommit():
                self.con.execute("ROLLBACK")
            self.con.close()
            raise
        if new:
            fsync_dir(path.parent)
        self.committer = GroupCommitter(self.con, f"spool-{path.stem[:8]}")
        self._epoch: SealingEpoch | None = None
        self._epoch_lock = threading.Lock()

    def close(self) -> None:
        self.committer.close()
        self.con.close()

    def seal(self, keys: PublicKeys, delivery: Delivery) -> tuple[SealingEpoch, bytes]:
        plaintext = delivery.to_bytes()
        with self._epoch_lock:
            epoch = self._epoch
            blob = epoch.try_seal(plaintext) if epoch is not None else None
            if epoch is None or blob is None:
                epoch = self._epoch = SealingEpoch(keys)
                blob = epoch.try_seal(plaintext)
        assert blob is not None
        return epoch, blob

    @staticmethod
    def insert(
        con: apsw.Connection,
        epoch: SealingEpoch,
        blob: bytes,
        quota: Quota | None = None,
        size: int = 0,
    ) -> int:
        """Append a sealed message; with ``quota``, first check that a message of
        ``size`` octets fits (:class:`QuotaExceeded` if not), in the same transaction."""
        if quota is not None and quota.limited:
            octets, messages = Spool._usage(con)
            quota.check(octets, messages, size, 1)
        con.execute(
            "INSERT OR IGNORE INTO epochs(id, header) VALUES (?, ?)", (epoch.id, epoch.header)
        )
        con.execute("INSERT INTO spool(epoch, sealed) VALUES (?, ?)", (epoch.id, blob))
        return con.last_insert_rowid()

    def pending(self, limit: int) -> list[tuple[int, bytes, bytes, bytes]]:
        """(row id, epoch id, epoch header, sealed blob) in arrival order."""
        rows = self.con.execute(
            "SELECT s.id, s.epoch, e.header, s.sealed FROM spool s JOIN epochs e ON e.id = s.epoch"
            " ORDER BY s.id LIMIT ?",
            (limit,),
        )
        return [(int(i), bytes(e), bytes(h), bytes(b)) for i, e, h, b in rows]

    @staticmethod
    def _usage(con: apsw.Connection) -> tuple[int, int]:
        """(octets, messages): the mailbox as last recorded plus what waits here."""
        row: list[Any] = con.execute(
            "SELECT stored_octets + pending_octets, stored_messages + pending_messages FROM usage"
        ).fetchall()
        return (int(row[0][0]), int(row[0][1])) if row else (0, 0)

    def usage(self) -> tuple[int, int]:
        return self._usage(self.con)

    def recorded(self) -> tuple[int, int]:
        """The mailbox usage recorded at its last close or drain."""
        row: list[Any] = self.con.execute(
            "SELECT stored_octets, stored_messages FROM usage"
        ).fetchall()
        return (int(row[0][0]), int(row[0][1])) if row else (0, 0)

    def record(self, octets: int, messages: int) -> None:
        """Remember the mailbox's usage for quota checks while it is closed."""
        if self.recorded() == (octets, messages):
            return  # the common logout: nothing changed, no commit
        self.committer.submit(
            lambda con: con.execute(
                "UPDATE usage SET stored_octets = ?, stored_messages = ?", (octets, messages)
            )
        ).result()

    def count(self) -> int:
        rows: list[Any] = self.con.execute("SELECT count(*) FROM spool").fetchall()
        return int(rows[0][0])

    @staticmethod
    def opener(secrets: MailboxSecrets) -> Callable[[bytes, bytes, bytes], Delivery]:
        """Opens spooled items, decapsulating each epoch once."""
        epochs: dict[bytes, OpenedEpoch] = {}

        def open_item(epoch_id: bytes, header: bytes, blob: bytes) -> Delivery:
            epoch = epochs.get(epoch_id)
            if epoch is None:
                epoch = epochs[epoch_id] = OpenedEpoch(secrets, epoch_id, header)
            return Delivery.from_bytes(epoch.unseal(blob))

        return open_item

    def remove(self, ids: list[int], stored: tuple[int, int] | None = None) -> None:
        """Delete filed items; ``stored`` is the mailbox's usage now that they are in it,
        recorded in the same commit so a quota check never sees them in neither place."""

        def write(con: apsw.Connection) -> None:
            con.executemany("DELETE FROM spool WHERE id = ?", [(i,) for i in ids])
            con.execute("DELETE FROM epochs WHERE id NOT IN (SELECT epoch FROM spool)")
            if stored is not None:
                con.execute("UPDATE usage SET stored_octets = ?, stored_messages = ?", stored)

        self.committer.submit(write).result()
