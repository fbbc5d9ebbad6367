"""Group commit (`mailfort.store.committer`): a write that fails loses only itself."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import apsw
import pytest

from mailfort.store.committer import GroupCommitter


def _open(path: Path) -> apsw.Connection:
    con = apsw.Connection(str(path))
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE IF NOT EXISTS t(v TEXT NOT NULL)")
    return con


def _insert(value: str | None) -> Callable[[apsw.Connection], int]:
    def write(con: apsw.Connection) -> int:
        con.execute("INSERT INTO t(v) VALUES (?)", (value,))  # NOT NULL refuses None
        return con.last_insert_rowid()

    return write


def _rows(path: Path) -> list[str]:
    return [r[0] for r in apsw.Connection(str(path)).execute("SELECT v FROM t ORDER BY v")]


def test_a_lone_failing_write_leaves_nothing_and_the_next_one_lands(tmp_path: Path) -> None:
    path = tmp_path / "one.sqlite3"
    committer = GroupCommitter(_open(path), "test")
    try:
        with pytest.raises(apsw.ConstraintError):
            committer.submit(_insert(None)).result(10)
        assert committer.submit(_insert("after")).result(10) > 0
    finally:
        committer.close()
    assert _rows(path) == ["after"]


def test_a_failing_write_in_a_batch_does_not_undo_its_neighbours(tmp_path: Path) -> None:
    path = tmp_path / "batch.sqlite3"
    committer = GroupCommitter(_open(path), "test")
    # Hold the commit thread inside a first write so that the next ones queue up and are
    # committed together, one of them failing.
    inside, release = threading.Event(), threading.Event()

    def blocker(con: apsw.Connection) -> None:
        inside.set()
        release.wait(10)
        con.execute("INSERT INTO t(v) VALUES ('first')")

    try:
        first = committer.submit(blocker)
        assert inside.wait(10)
        futures = [committer.submit(_insert(v)) for v in ("a", None, "b")]
        release.set()
        first.result(10)
        assert futures[0].result(10) > 0 and futures[2].result(10) > 0
        with pytest.raises(apsw.ConstraintError):
            futures[1].result(10)
        assert committer.batches == 2  # the blocker alone, then the three together
    finally:
        committer.close()
    assert _rows(path) == ["a", "b", "first"]
