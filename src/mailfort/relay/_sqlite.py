"""Plain SQLite files for relay bookkeeping (MTA-STS policy cache, TLS-RPT counters).

Neither holds message content or user addresses: recipient domains, MX names and IP
addresses only, and TLS-RPT rows are deleted once their day is reported. So they are
ordinary SQLite files, not SQLite3MC-encrypted stores. Several worker processes write
to the same file (SO_REUSEPORT workers): WAL mode, a busy timeout, and counters updated
with single UPSERT statements keep that safe without a lock of our own.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path


def connect(path: Path, schema: str) -> sqlite3.Connection:
    """Open ``path`` (created with ``schema`` if new) for one unit of work."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None)
    # Switching to WAL takes a lock without calling the busy handler (SQLite answers "database
    # is locked" at once), so workers opening a new file together retry here themselves.
    deadline = time.monotonic() + 10.0
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                conn.close()
                raise
            time.sleep(0.01)
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(schema)
    return conn
