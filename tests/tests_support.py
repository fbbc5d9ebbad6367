"""Helpers shared by tests (not fixtures)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from mailfort.directory.service import Directory
from mailfort.store.service import MailStore

from conftest import run_cli

T = TypeVar("T")

MESSAGE = (
    b"From: Reporter <reporter@remote.test>\r\nTo: alice@example.test\r\n"
    b"Subject: Quarterly report\r\nMessage-ID: <q1@remote.test>\r\n\r\nNumbers inside.\r\n"
)


def add_user(data_dir: Path, address: str, password: str = "a long test passphrase") -> str:
    run_cli(data_dir, "user", "add", address, "--password-stdin", stdin=password + "\n")
    return password


def wait_for(check: Callable[[], T], what: str, timeout: float = 60) -> T:
    """Poll ``check`` until it returns something true (mail arriving at a peer, say)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def read_mailbox(
    data_dir: Path, address: str, password: str = "a long test passphrase"
) -> dict[str, list[bytes]]:
    """Every message by folder, read as the user would (this drains their spool)."""
    directory = Directory.open(f"sqlite:///{data_dir / 'directory.sqlite3'}")
    unlocked = directory.unlock(address, password)
    store = MailStore(data_dir)
    try:
        mbx = store.open(unlocked.user.mailbox_id, unlocked.secrets)
        out = {
            f.name: [mbx.raw(f.name, m.uid) for m in mbx.messages(f.name)] for f in mbx.folders()
        }
        store.release(unlocked.user.mailbox_id)
        return out
    finally:
        store.close()
        directory.close()


def read_folder(
    data_dir: Path, address: str, password: str = "a long test passphrase", folder: str = "INBOX"
) -> list[bytes]:
    return read_mailbox(data_dir, address, password)[folder]
