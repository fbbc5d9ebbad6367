"""Group commit (`mailfort.store.committer`): a write that fails loses only itself."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
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


def _hold(committer: GroupCommitter, value: str) -> tuple[Future[None], threading.Event]:
    """Submit a write of ``value`` that holds the commit thread until the event is set;
    returns once the thread is inside it."""
    inside, release = threading.Event(), threading.Event()

    def blocker(con: apsw.Connection) -> None:
        inside.set()
        release.wait(10)
        con.execute("INSERT INTO t(v) VALUES (?)", (value,))

    held = committer.submit(blocker)
    assert inside.wait(10)
    return held, release


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
    first, release = _hold(committer, "first")
    try:
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


def test_coroutines_awaiting_a_batch_get_their_own_outcomes(tmp_path: Path) -> None:
    """`run` (the store's path from the event loop): each caller gets its row id or its
    error, in one batch, and the loop keeps running meanwhile."""
    path = tmp_path / "loop.sqlite3"
    committer = GroupCommitter(_open(path), "test")

    async def main() -> list[int | BaseException]:
        first, release = _hold(committer, "first")
        writes = [asyncio.ensure_future(committer.run(_insert(v))) for v in ("a", None, "b")]
        await asyncio.sleep(0.05)  # all three are queued behind the blocker
        release.set()
        outcomes = await asyncio.gather(*writes, return_exceptions=True)
        first.result(10)
        return outcomes

    try:
        a, failed, b = asyncio.run(main())
        assert isinstance(a, int) and isinstance(b, int) and a != b
        assert isinstance(failed, apsw.ConstraintError)
        assert committer.batches == 2
    finally:
        committer.close()
    assert _rows(path) == ["a", "b", "first"]
