"""A mailbox's spool: sealed messages waiting for the mailbox to be opened.

The spool is a plain SQLite file (WAL, fsync at commit) holding only sealed blobs, which
the server can append to but never read back: their keys exist only inside the mailbox's
key slots. It stores no sender, size class or time beyond SQLite's own row order.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from pathlib import Path

import apsw

from mailfort.keys.seal import seal, unseal
from mailfort.keys.secrets import MailboxSecrets, PublicKeys
from mailfort.store.committer import GroupCommitter
from mailfort.store.sqlite import fsync_dir, open_plain

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (id INTEGER PRIMARY KEY AUTOINCREMENT, sealed BLOB NOT NULL)
"""
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
        self.con.execute(_SCHEMA)
        if new:
            fsync_dir(path.parent)
        self.committer = GroupCommitter(self.con, f"spool-{path.stem[:8]}")

    def close(self) -> None:
        self.committer.close()
        self.con.close()

    @staticmethod
    def sealed(keys: PublicKeys, delivery: Delivery) -> bytes:
        return seal(keys, delivery.to_bytes())

    @staticmethod
    def insert(con: apsw.Connection, blob: bytes) -> int:
        con.execute("INSERT INTO spool(sealed) VALUES (?)", (blob,))
        return con.last_insert_rowid()

    def pending(self, limit: int) -> list[tuple[int, bytes]]:
        rows = self.con.execute("SELECT id, sealed FROM spool ORDER BY id LIMIT ?", (limit,))
        return [(int(i), bytes(b)) for i, b in rows]

    def count(self) -> int:
        return int(self.con.execute("SELECT count(*) FROM spool").fetchall()[0][0])

    @staticmethod
    def open_item(secrets: MailboxSecrets, blob: bytes) -> Delivery:
        return Delivery.from_bytes(unseal(secrets, blob))

    def remove(self, ids: list[int]) -> None:
        def write(con: apsw.Connection) -> None:
            con.executemany("DELETE FROM spool WHERE id = ?", [(i,) for i in ids])

        self.committer.submit(write).result()
