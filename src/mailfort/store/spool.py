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
from mailfort.store.sqlite import fsync_dir, open_plain

_SCHEMA = (
    # A sealing epoch's header: the encapsulation its messages share (keys/seal.py).
    "CREATE TABLE IF NOT EXISTS epochs (id BLOB PRIMARY KEY, header BLOB NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS spool (id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " epoch BLOB NOT NULL, sealed BLOB NOT NULL)",
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
        for stmt in _SCHEMA:
            self.con.execute(stmt)
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
    def insert(con: apsw.Connection, epoch: SealingEpoch, blob: bytes) -> int:
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

    def remove(self, ids: list[int]) -> None:
        def write(con: apsw.Connection) -> None:
            con.executemany("DELETE FROM spool WHERE id = ?", [(i,) for i in ids])
            con.execute("DELETE FROM epochs WHERE id NOT IN (SELECT epoch FROM spool)")

        self.committer.submit(write).result()
