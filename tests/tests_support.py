"""Helpers shared by tests (not fixtures)."""

from __future__ import annotations

from pathlib import Path

from conftest import run_cli

MESSAGE = (
    b"From: Reporter <reporter@remote.test>\r\nTo: alice@example.test\r\n"
    b"Subject: Quarterly report\r\nMessage-ID: <q1@remote.test>\r\n\r\nNumbers inside.\r\n"
)


def add_user(data_dir: Path, address: str, password: str = "a long test passphrase") -> str:
    run_cli(data_dir, "user", "add", address, "--password-stdin", stdin=password + "\n")
    return password
