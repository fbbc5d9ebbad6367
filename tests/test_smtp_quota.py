"""Full mailboxes at the MX and in `mailfort deliver`: refused permanently and clearly, and
the other recipients of the same message still get it (the sender gets a DSN).

`mailfort dev` runs with a 20 kB storage quota (MAILFORT_QUOTA_BYTES); messages of ~12 kB
fill a mailbox on the second one.
"""

from __future__ import annotations

import smtplib
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import run_cli, start_dev, stop_dev
from dnsserver import DNSServer
from tests_support import read_folder

# One server per module: its tests share it on one xdist worker.
pytestmark = pytest.mark.xdist_group("smtp-quota")
PASSWORD = "a long test passphrase"
QUOTA = 20_000


@dataclass
class MX:
    data_dir: Path
    port: int

    def inbox(self, address: str) -> list[bytes]:
        return read_folder(self.data_dir, address, PASSWORD)

    def send(self, rcpts: list[str], body: bytes, size: int | None = None) -> tuple[int, str]:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=60) as client:
            client.ehlo("mx.example.test")
            options = [f"SIZE={size}"] if size is not None else []
            code, text = client.mail("carol@example.test", options)
            assert code == 250, text
            for rcpt in rcpts:
                code, text = client.rcpt(rcpt)
                if code != 250:
                    return code, text.decode()
            code, text = client.data(body)
            return code, text.decode()


def message(marker: str, size: int = 12_000) -> bytes:
    line = "x" * 76 + "\r\n"
    return (
        f"From: Carol <carol@example.test>\r\nTo: team@example.test\r\nSubject: {marker}\r\n"
        f"Message-ID: <{marker}@example.test>\r\n\r\n" + line * (size // len(line))
    ).encode()


@pytest.fixture(scope="module")
def mx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MX]:
    root = tmp_path_factory.mktemp("quota")
    dns = DNSServer()
    dns.set_zone({"example.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")]})
    data_dir = root / "var"
    proc, info = start_dev(data_dir, dns.port, env={"MAILFORT_QUOTA_BYTES": str(QUOTA)})
    try:
        for user in ("alice", "bob", "carol", "erin", "gina"):
            run_cli(data_dir, "user", "add", f"{user}@example.test", "--password-stdin",
                    stdin=PASSWORD + "\n")  # fmt: skip
        run_cli(data_dir, "alias", "add", "team@example.test", "erin@example.test",
                "bob@example.test")  # fmt: skip
        yield MX(data_dir, int(info["ports"]["smtp"]))
    finally:
        stop_dev(proc)
        dns.close()


def test_full_mailbox_is_refused_at_rcpt_when_size_is_declared_and_at_data_otherwise(
    mx: MX,
) -> None:
    first = f"fill-{uuid.uuid4().hex[:8]}"
    assert mx.send(["alice@example.test"], message(first))[0] == 250
    code, text = mx.send(["alice@example.test"], message("declared"), size=12_000)
    assert (code, text) == (552, "5.2.2 Mailbox full")
    code, text = mx.send(["alice@example.test"], message("undeclared"))
    assert (code, text) == (552, "5.2.2 Mailbox full")
    assert [first.encode() in m for m in mx.inbox("alice@example.test")] == [True]


def test_other_recipients_still_get_it_and_the_sender_gets_a_dsn(mx: MX) -> None:
    # Each test fills its own user: xdist may run them in any order, on any worker.
    assert mx.send(["erin@example.test"], message(f"fill-{uuid.uuid4().hex[:8]}"))[0] == 250
    marker = f"team-{uuid.uuid4().hex[:8]}"
    code, text = mx.send(["team@example.test"], message(marker))
    assert code == 250, text
    assert sum(marker.encode() in m for m in mx.inbox("bob@example.test")) == 1
    assert not any(marker.encode() in m for m in mx.inbox("erin@example.test"))
    [report] = [m for m in mx.inbox("carol@example.test") if marker.encode() in m]
    assert b"multipart/report" in report
    assert b"Final-Recipient: rfc822; team@example.test" in report  # what carol wrote
    assert b"Status: 5.2.2" in report


def test_mailfort_deliver_exits_77_for_a_full_mailbox(
    mx: MX, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILFORT_QUOTA_BYTES", str(QUOTA))  # the LDA reads the same setting

    def deliver(marker: str) -> subprocess.CompletedProcess[str]:
        return run_cli(
            mx.data_dir, "deliver", "--to", "gina@example.test", "--from", "x@y.test",
            stdin=message(marker).decode(), check=False,
        )  # fmt: skip

    assert deliver("lda-1").returncode == 0
    result = deliver("lda-2")
    assert result.returncode == 77, result.stderr
    assert result.stderr.startswith("5.2.2 Mailbox full")
    assert [b"lda-1" in m for m in mx.inbox("gina@example.test")] == [True]
