"""Group commit: many concurrent writes to one SQLite file share one transaction and fsync.

One fsync per message caps a store at the disk's fsync rate; a writer thread that takes
every write waiting in its queue, runs them in one transaction and then resolves all their
futures lifts that cap while keeping "success only after fsync" for each caller. Each write
runs inside its own savepoint, so one failing write does not undo its neighbours.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import apsw

T = TypeVar("T")
_STOP = object()

Write = Callable[[apsw.Connection], Any]


class CommitterClosed(Exception):
    pass


class _LoopFuture:
    """An asyncio future as the commit thread sees it: the part of
    ``concurrent.futures.Future`` the thread uses, each call passed to the loop."""

    __slots__ = ("_fut", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any]) -> None:
        self._loop = loop
        self._fut = fut

    def set_running_or_notify_cancel(self) -> bool:
        return True  # a write whose caller stopped waiting still runs (it may be mail)

    def done(self) -> bool:
        return False  # settled exactly once, by the thread, through the loop

    def set_result(self, value: Any) -> None:
        self._pass(True, value)

    def set_exception(self, exc: BaseException) -> None:
        self._pass(False, exc)

    def _pass(self, ok: bool, value: Any) -> None:
        # A closed loop has nobody waiting; raising here would end the commit thread.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(_settle, self._fut, ok, value)


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.cancelled():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


_Waiter = concurrent.futures.Future[Any] | _LoopFuture


class GroupCommitter:
    def __init__(self, con: apsw.Connection, name: str, max_batch: int = 512) -> None:
        self.con = con
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self.batches = 0  # how many commits ran: the benchmark reports writes per commit
        self.writes = 0
        self._thread = threading.Thread(target=self._run, name=f"commit-{name}", daemon=True)
        self._thread.start()

    def submit(self, write: Callable[[apsw.Connection], T]) -> concurrent.futures.Future[T]:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._put((write, fut))
        return fut

    async def run(self, write: Callable[[apsw.Connection], T]) -> T:
        """`submit` for a coroutine: the commit thread settles an asyncio future through
        ``call_soon_threadsafe`` itself. Wrapping a concurrent future instead cost a
        Condition and a chain of callbacks on both sides per write."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._put((write, _LoopFuture(loop, fut)))
        return await fut

    def _put(self, item: tuple[Write, _Waiter]) -> None:
        with self._lock:
            if self._closed:
                raise CommitterClosed
            self._queue.put(item)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch: list[tuple[Write, _Waiter]] = []
            stop = item is _STOP
            if not stop:
                batch.append(item)  # type: ignore[arg-type]
            while not stop and len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                else:
                    batch.append(nxt)  # type: ignore[arg-type]
            if batch:
                self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[tuple[Write, _Waiter]]) -> None:
        if len(batch) == 1:
            self._commit_one(*batch[0])
            return
        results: list[tuple[_Waiter, bool, Any]] = []
        try:
            self.con.execute("BEGIN IMMEDIATE")
            for write, fut in batch:
                if not fut.set_running_or_notify_cancel():
                    continue
                self.con.execute("SAVEPOINT w")
                try:
                    value = write(self.con)
                except BaseException as exc:  # the write's failure is its caller's to see
                    self.con.execute("ROLLBACK TO w")
                    self.con.execute("RELEASE w")
                    results.append((fut, False, exc))
                else:
                    self.con.execute("RELEASE w")
                    results.append((fut, True, value))
            self.con.execute("COMMIT")  # synchronous=FULL: durable when this returns
        except BaseException as exc:
            if not self.con.getautocommit():
                with contextlib.suppress(apsw.Error):
                    self.con.execute("ROLLBACK")
            for _write, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        self.batches += 1
        self.writes += len(results)
        for fut, ok, value in results:
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def _commit_one(self, write: Write, fut: _Waiter) -> None:
        """A batch of one needs no savepoint: its failure undoes only itself anyway. Two
        statements fewer per commit, and each one releases and retakes the GIL, which the
        event loop's thread holds most of the time (mail to many mailboxes, one commit
        thread each, makes most batches singletons)."""
        if not fut.set_running_or_notify_cancel():
            return
        try:
            self.con.execute("BEGIN IMMEDIATE")
            value = write(self.con)
            self.con.execute("COMMIT")  # synchronous=FULL: durable when this returns
        except BaseException as exc:  # the write's failure is its caller's to see
            if not self.con.getautocommit():
                with contextlib.suppress(apsw.Error):
                    self.con.execute("ROLLBACK")
            fut.set_exception(exc)
            return
        self.batches += 1
        self.writes += 1
        fut.set_result(value)
