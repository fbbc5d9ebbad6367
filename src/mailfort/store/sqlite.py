"""Opening SQLite files: encrypted mailboxes (SQLite3 Multiple Ciphers) and plain ones.

The data key is handed to SQLite3MC as a raw 256-bit key (``x'..'``), so the library's
passphrase KDF is skipped: the key hierarchy in ``mailfort.keys`` is the security boundary,
and reopening a mailbox costs microseconds instead of a PBKDF2 run.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import apsw

CIPHER = "chacha20"
_BUSY_MS = 30_000


class WrongKey(Exception):
    """The file does not open with this key (or is not a mailbox)."""


def _wal(con: apsw.Connection) -> None:
    """Switch to WAL, retrying while another process does the same to a new file.

    SQLite does not call the busy handler for this pragma, so two processes opening a
    brand-new spool at once (workers, `mailfort deliver`) saw BusyError at once; it only
    lasts as long as the other side's switch.
    """
    deadline = time.monotonic() + _BUSY_MS / 1000
    while True:
        try:
            con.pragma("journal_mode", "wal")
            return
        except apsw.BusyError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def _tune(con: apsw.Connection, cache_kib: int) -> None:
    # One pragma per call: apsw runs multi-statement text lazily (stack-notes).
    _wal(con)
    con.pragma("synchronous", "full")  # fsync at every commit: durability before 250
    con.pragma("foreign_keys", 1)
    con.pragma("cache_size", -cache_kib)
    con.pragma("temp_store", "memory")  # temporary tables never touch disk in the clear


def open_encrypted(
    path: Path, key: bytes, *, create: bool, cache_kib: int = 8192
) -> apsw.Connection:
    if len(key) != 32:
        raise ValueError("mailbox key must be 32 bytes")
    if not create and not path.exists():
        raise FileNotFoundError(path)
    flags = apsw.SQLITE_OPEN_READWRITE | (apsw.SQLITE_OPEN_CREATE if create else 0)
    con = apsw.Connection(str(path), flags=flags)
    # Before anything touches the file: another process (a second `mailfort deliver`, a
    # worker) may hold the lock, and the key probe and journal_mode both need it.
    con.setbusytimeout(_BUSY_MS)
    try:
        con.pragma("cipher", CIPHER)
        con.pragma("key", f"x'{key.hex()}'")
        # A wrong key only shows on the first read: probe now, before anything else runs.
        con.execute("SELECT count(*) FROM sqlite_master").fetchall()
    except (apsw.NotADBError, apsw.CorruptError) as exc:
        con.close()
        raise WrongKey(str(path.name)) from exc
    _tune(con, cache_kib)
    restrict(path)
    return con


def open_plain(path: Path, *, cache_kib: int = 2048) -> apsw.Connection:
    con = apsw.Connection(str(path))
    con.setbusytimeout(_BUSY_MS)
    _tune(con, cache_kib)
    restrict(path)
    return con


def restrict(path: Path) -> None:
    """Mail files are for the service's user alone."""
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(p, 0o600)


def fsync_dir(path: Path) -> None:
    """Make a new file's directory entry durable (a crash must not lose the file itself)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
