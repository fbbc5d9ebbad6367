"""Nothing readable at rest, and nothing the server stores opens a mailbox without a user secret."""

from __future__ import annotations

import base64
import sqlite3
from pathlib import Path

import pytest

from mailfort.directory.service import AuthFailed, Directory
from mailfort.store.service import MailStore
from mailfort.store.sqlite import WrongKey, open_encrypted

from conftest import run_cli
from tests_support import add_user

MARKER = "Zq7xMarkerVv3p"


def marked_message() -> bytes:
    return (
        f"From: {MARKER} <{MARKER.lower()}@sender.test>\r\nTo: alice@example.test\r\n"
        f"Subject: about {MARKER}\r\n\r\nThe body mentions {MARKER} twice: {MARKER}.\r\n"
    ).encode()


def traces(data_dir: Path) -> list[str]:
    needles = [MARKER.encode(), MARKER.lower().encode(), base64.b64encode(MARKER.encode())[:12]]
    found = []
    for path in data_dir.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            found += [f"{path.name}: {n!r}" for n in needles if n in blob]
    return found


def test_no_plaintext_at_rest_in_spool_mailbox_wal_directory(data_dir: Path) -> None:
    run_cli(data_dir, "domain", "add", "example.test")
    password = add_user(data_dir, "alice@example.test")
    for _ in range(3):
        run_cli(
            data_dir,
            "deliver",
            "--to",
            "alice@example.test",
            "--from",
            f"{MARKER}@sender.test",
            stdin=marked_message(),
        )
    files = sorted(p.name.split(".")[-1] for p in (data_dir / "mailboxes").iterdir())
    assert "spool" in files and "mbx" not in files
    assert traces(data_dir) == []
    # Opening drains the spool into the encrypted mailbox; its WAL is encrypted as well.
    listing = run_cli(
        data_dir, "mailbox", "ls", "alice@example.test", "--password-stdin", stdin=password + "\n"
    )
    assert listing.stdout.count(MARKER) == 3  # the user does see the mail
    names = {p.name.split(".", 1)[1] for p in (data_dir / "mailboxes").iterdir()}
    assert "mbx" in names
    assert traces(data_dir) == []


def test_operator_cannot_open_mailbox_or_spool(data_dir: Path) -> None:
    run_cli(data_dir, "domain", "add", "example.test")
    add_user(data_dir, "alice@example.test")
    directory = Directory.open(f"sqlite:///{data_dir / 'directory.sqlite3'}")
    user = directory.get_user("alice@example.test")
    assert user is not None
    run_cli(data_dir, "deliver", "--to", "alice@example.test", stdin=marked_message())
    # Give the mailbox a file to attack: open it once as the user would.
    store = MailStore(data_dir)
    store.open(
        user.mailbox_id, directory.unlock("alice@example.test", "a long test passphrase").secrets
    )
    store.release(user.mailbox_id)
    store.close()
    run_cli(
        data_dir, "deliver", "--to", "alice@example.test", stdin=marked_message()
    )  # spooled again
    mbx = data_dir / "mailboxes" / f"{user.mailbox_id}.mbx"

    # Everything the server stores, read as the operator would.
    stored = b"".join(p.read_bytes() for p in data_dir.rglob("*") if p.is_file() and p != mbx)
    with pytest.raises(sqlite3.DatabaseError):
        sqlite3.connect(mbx).execute("SELECT * FROM sqlite_master").fetchall()
    # Try every 32-byte window of the directory's record of this user as the data key.
    with directory.engine.connect() as conn:
        from mailfort.directory import schema as t

        rows = conn.execute(t.key_slots.select().where(t.key_slots.c.user_id == user.id)).all()
    material = user.public_keys.to_bytes() + b"".join(r.salt + r.verifier + r.wrapped for r in rows)
    for i in range(0, len(material) - 32, 7):
        with pytest.raises(WrongKey):
            open_encrypted(mbx, material[i : i + 32], create=False)
    # Secrets an operator could guess from what is stored open no key slot.
    for guess in ("", user.mailbox_id, str(user.address), rows[0].verifier.hex(), "example.test"):
        with pytest.raises(AuthFailed):
            directory.unlock("alice@example.test", guess)
    # The spool holds sealed blobs only; opening them needs the private keys in the slots.
    spool = sqlite3.connect(data_dir / "mailboxes" / f"{user.mailbox_id}.spool")
    items = spool.execute(
        "SELECT s.epoch, e.header, s.sealed FROM spool s JOIN epochs e ON e.id = s.epoch"
    ).fetchall()
    spool.close()
    assert len(items) == 1 and MARKER.encode() not in stored
    from mailfort.keys.secrets import MailboxSecrets
    from mailfort.store.spool import Spool

    with pytest.raises(Exception, match="does not open"):
        Spool.opener(MailboxSecrets.generate())(*items[0])
    directory.close()
