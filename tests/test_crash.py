"""Crash safety: SIGKILL at random points loses no delivery that reported success."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from mailfort.directory.service import Directory
from mailfort.store.service import MailStore
from mailfort.store.sqlite import open_plain

from conftest import REPO, run_cli
from tests_support import add_user

PASSWORD = "a long test passphrase"


def run_and_kill(data_dir: Path, prefix: str, secret: str | None, seconds: float) -> set[str]:
    args = [
        sys.executable,
        str(REPO / "tests" / "crash_writer.py"),
        str(data_dir),
        "alice@example.test",
        prefix,
    ]
    if secret:
        args.append(secret)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    acknowledged: set[str] = set()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("OK "):
                acknowledged.add(line.split()[1])

    reader = threading.Thread(target=read)
    reader.start()
    # Wait for the first acknowledgement, then kill at a random moment.
    deadline = time.monotonic() + 60
    while not acknowledged and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(seconds)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader.join()
    assert acknowledged, proc.stderr.read() if proc.stderr else "no output"
    return acknowledged


def test_sigkill_loses_no_acknowledged_delivery(data_dir: Path) -> None:
    run_cli(data_dir, "domain", "add", "example.test")
    add_user(data_dir, "alice@example.test", PASSWORD)
    rng = random.Random()
    acknowledged: set[str] = set()
    for round_ in range(6):
        # Alternate: spool (mailbox closed) and direct delivery into the open mailbox.
        secret = PASSWORD if round_ % 2 else None
        acknowledged |= run_and_kill(data_dir, f"r{round_}", secret, rng.uniform(0.05, 0.6))

    directory = Directory.open(f"sqlite:///{data_dir / 'directory.sqlite3'}")
    unlocked = directory.unlock("alice@example.test", PASSWORD)
    store = MailStore(data_dir)
    spool_check = open_plain(store.spool_path(unlocked.user.mailbox_id))
    assert spool_check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    spool_check.close()
    mailbox = store.open(unlocked.user.mailbox_id, unlocked.secrets)
    subjects = [m.meta.subject for m in mailbox.messages("INBOX")]
    assert mailbox.integrity_check() == "ok"
    missing = acknowledged - set(subjects)
    assert not missing, f"{len(missing)} acknowledged deliveries lost, e.g. {sorted(missing)[:5]}"
    assert len(subjects) == len(set(subjects)), "a delivery was filed twice"
    assert len(acknowledged) > 50
    store.release(unlocked.user.mailbox_id)
    store.close()
    directory.close()
