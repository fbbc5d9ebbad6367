"""New-mail events: the store publishes, protocol servers (IMAP IDLE) subscribe.

The store never imports a protocol; servers register callbacks here. This hub is in-process;
several workers or nodes relay through Redis with the same interface.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class NewMail:
    mailbox_id: str
    folder: str | None  # None: the mail waits sealed in the spool


class EventHub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: dict[str, list[Callable[[NewMail], None]]] = {}

    def subscribe(self, mailbox_id: str, callback: Callable[[NewMail], None]) -> Callable[[], None]:
        with self._lock:
            self._subs.setdefault(mailbox_id, []).append(callback)

        def unsubscribe() -> None:
            with self._lock:
                subs = self._subs.get(mailbox_id, [])
                if callback in subs:
                    subs.remove(callback)
                if not subs:
                    self._subs.pop(mailbox_id, None)

        return unsubscribe

    def publish(self, event: NewMail) -> None:
        with self._lock:
            subs = list(self._subs.get(event.mailbox_id, ()))
        for callback in subs:
            # Callbacks come from delivery threads; a subscriber hands the event to its own
            # loop (call_soon_threadsafe) and must not raise into the delivery path.
            with contextlib.suppress(Exception):  # a broken subscriber must not fail delivery
                callback(event)
