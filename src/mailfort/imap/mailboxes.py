"""Logins and open mailboxes shared by the IMAP and POP3 sessions of one process.

A login unlocks the account's keys (:meth:`Directory.unlock`, in a thread: Argon2id for a
password) under the failed-login guard, then opens the mailbox through the store, which
drains its spool.  Every session of the same account in this process shares one
:class:`SharedMailbox`; the keys stay in memory while at least one session holds it.

Change notification, three ways, so an IDLE session hears of new mail within a second:

- a session that changes the mailbox tells the others at once (:meth:`SharedMailbox.notify`);
- a delivery in this process (the MX) publishes on the store's event hub;
- anything another process does (``mailfort deliver`` sealing into the spool, a session
  in another worker writing the file) is found by one poller task: twice a second it
  compares the spool file's size and mtime, and the reader connection's
  ``PRAGMA data_version`` (which changes when another connection commits), for every
  mailbox that has listening sessions.  A changed spool is drained, then sessions sync.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from mailfort.directory.service import AuthFailed, Directory, Unlocked
from mailfort.guard.logins import LoginGuard
from mailfort.keys.secrets import MailboxSecrets
from mailfort.store.events import NewMail
from mailfort.store.mailbox import Mailbox
from mailfort.store.service import MailStore

__all__ = ["LoginResult", "MailAccess", "MailboxListener", "SharedMailbox"]

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.5


class MailboxListener(Protocol):
    def mailbox_changed(self) -> None:
        """Something in the mailbox may have changed; called on the event loop."""


@dataclass(frozen=True, slots=True)
class LoginResult:
    """``shared`` is the opened mailbox on success; ``refused`` after too many failures;
    ``unavailable`` when the secret was right but the mailbox could not be opened."""

    shared: SharedMailbox | None = None
    refused: bool = False
    unavailable: bool = False


def _file_signature(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


@dataclass(eq=False)
class SharedMailbox:
    """One account's open mailbox in this process."""

    access: MailAccess
    mailbox_id: str
    mailbox: Mailbox
    secrets: MailboxSecrets = field(repr=False)
    holders: int = 0
    listeners: set[MailboxListener] = field(default_factory=set)
    _unsubscribe: Callable[[], None] | None = None
    _spool_sig: tuple[tuple[int, int] | None, tuple[int, int] | None] | None = None
    _data_version: int | None = None
    _draining: bool = False
    _tasks: set[asyncio.Future[int]] = field(default_factory=set)
    #: folder id -> UIDs below this were claimed as \\Recent by a session of this process.
    #: Sessions run on one event loop, so checking and moving it is atomic among them;
    #: the store's ``recent_uid`` carries the claim to other processes.
    recent_marks: dict[int, int] = field(default_factory=dict)

    def claim_recent(self, folder_id: int, stored_mark: int, uids: list[int]) -> list[int]:
        """Those of newly seen ``uids`` (ascending) no session has claimed yet, now
        claimed by the caller (RFC 3501 §2.3.2: \\Recent to one session only)."""
        floor = max(stored_mark, self.recent_marks.get(folder_id, 0))
        mine = [u for u in uids if u >= floor]
        if mine:
            self.recent_marks[folder_id] = mine[-1] + 1
            self.mailbox.mark_recent_claimed(folder_id, mine[-1] + 1)
        return mine

    def claimed(self, folder_id: int, upto: int) -> None:
        """A SELECT claimed UIDs below ``upto`` through the store."""
        if upto > self.recent_marks.get(folder_id, 0):
            self.recent_marks[folder_id] = upto

    def unclaimed(self, folder_id: int, stored_mark: int, uids: list[int]) -> list[int]:
        """Those of ``uids`` still \\Recent to whoever selects next (EXAMINE, STATUS)."""
        floor = max(stored_mark, self.recent_marks.get(folder_id, 0))
        return [u for u in uids if u >= floor]

    # -- listeners --------------------------------------------------------------------

    def listen(self, listener: MailboxListener) -> None:
        self.listeners.add(listener)
        self.access._poll_needed()

    def unlisten(self, listener: MailboxListener) -> None:
        self.listeners.discard(listener)

    def notify(self, origin: MailboxListener | None = None) -> None:
        """Tell every listening session but ``origin`` to look for changes."""
        for listener in list(self.listeners):
            if listener is not origin:
                try:
                    listener.mailbox_changed()
                except Exception:  # one broken session must not stop the others
                    log.exception("mailbox listener failed")

    # -- watching other processes --------------------------------------------------------

    def _spool_signature(self) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        spool = str(self.access.store.spool_path(self.mailbox_id))
        return _file_signature(spool), _file_signature(spool + "-wal")

    async def poll(self) -> None:
        """One look for changes made elsewhere (see the module docstring)."""
        sig = self._spool_signature()
        if sig != self._spool_sig:
            first = self._spool_sig is None
            self._spool_sig = sig
            if not first or sig[0] is not None:
                await self.drain()
        try:
            version = int(self.mailbox.reader.pragma("data_version"))
        except Exception:  # the mailbox was closed under us (shutdown)
            return
        if version != self._data_version:
            changed = self._data_version is not None
            self._data_version = version
            if changed:
                self.notify()

    async def drain(self) -> int:
        """File the spool's sealed deliveries into the open mailbox."""
        if self._draining:
            return 0
        self._draining = True
        try:
            filed = await asyncio.to_thread(
                self.access.store.drain, self.mailbox_id, self.secrets, self.mailbox
            )
        except Exception:
            log.exception("draining a spool failed")
            return 0
        finally:
            self._draining = False
        if filed:
            self.notify()
        return filed

    def _on_event(self, event: NewMail) -> None:
        if event.folder is None:
            # Sealed into the spool although the mailbox is open here (a race with the
            # open): drain it now rather than at the next poll.
            task = asyncio.ensure_future(self.drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self.notify()


@dataclass(eq=False)
class MailAccess:
    """Logins, and the registry of open mailboxes, for one worker process."""

    directory: Directory
    store: MailStore
    guard: LoginGuard = field(default_factory=LoginGuard)
    #: RFC 9208 quota (octets / messages) every account gets; None: no limit.
    quota_storage: int | None = None
    quota_messages: int | None = None
    #: Argon2id runs here, apart from the default executor that store work uses, so a
    #: burst of password logins cannot starve mailbox opens and spool drains.
    unlock_executor: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(4, "unlock")
    )
    _open: dict[str, SharedMailbox] = field(default_factory=dict)
    _poller: asyncio.Task[None] | None = None

    # -- login ------------------------------------------------------------------------

    async def login(self, ip: str, username: str, secret: str) -> LoginResult:
        loop = asyncio.get_running_loop()

        async def check() -> Unlocked | None:
            try:
                return await loop.run_in_executor(
                    self.unlock_executor, self.directory.unlock, username, secret
                )
            except AuthFailed:
                return None

        outcome = await self.guard.attempt(ip, username, check)
        if outcome.refused:
            return LoginResult(refused=True)
        if outcome.value is None:
            return LoginResult()
        try:
            shared = await self.open(outcome.value)
        except Exception:
            log.exception("opening a mailbox failed")
            return LoginResult(unavailable=True)
        return LoginResult(shared)

    async def open(self, unlocked: Unlocked) -> SharedMailbox:
        mailbox_id = unlocked.user.mailbox_id
        mailbox = await asyncio.to_thread(self.store.open, mailbox_id, unlocked.secrets)
        shared = self._open.get(mailbox_id)
        if shared is None or shared.mailbox is not mailbox:
            shared = SharedMailbox(self, mailbox_id, mailbox, unlocked.secrets)
            loop = asyncio.get_running_loop()

            def on_event(event: NewMail, shared: SharedMailbox = shared) -> None:
                # Called from delivery threads: hand over to the loop.
                with contextlib.suppress(RuntimeError):  # loop closed at shutdown
                    loop.call_soon_threadsafe(shared._on_event, event)

            shared._unsubscribe = self.store.subscribe(mailbox_id, on_event)
            self._open[mailbox_id] = shared
        shared.holders += 1
        return shared

    async def release(self, shared: SharedMailbox) -> None:
        """A session is done with the mailbox; the last one closes it (keys leave memory)."""
        shared.holders -= 1
        if shared.holders <= 0 and self._open.get(shared.mailbox_id) is shared:
            del self._open[shared.mailbox_id]
            if shared._unsubscribe is not None:
                shared._unsubscribe()
            shared.listeners.clear()
        await asyncio.to_thread(self.store.release, shared.mailbox_id)

    # -- polling ----------------------------------------------------------------------

    def _poll_needed(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll_loop())

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            watched = [s for s in self._open.values() if s.listeners]
            if not watched:
                self._poller = None
                return
            for shared in watched:
                try:
                    await shared.poll()
                except Exception:
                    log.exception("polling a mailbox failed")

    def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        self.unlock_executor.shutdown(wait=False, cancel_futures=True)
