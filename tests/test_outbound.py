"""Submission and outbound delivery end to end, with a real Postfix as the recipient's MX.

`mailfort dev` submits, signs, queues and delivers; the loopback DNS server maps
remote.test's MX to a private Postfix on 127.0.0.2; swaks and aiosmtplib are the clients;
Mail::DKIM (Debian) checks the signatures on what Postfix stored.
"""

from __future__ import annotations

import asyncio
import re
import signal
import smtplib
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
import pytest

from mailfort.auth.dkim import verify_dkim
from mailfort.dns import Nameserver, Resolver
from postfix_peer import PostfixMX
from test_dkim_signing import PERL_VERIFY, zone_from_dns_output

from conftest import require_tool, run_cli, start_outbound_dev, stop_dev
from dnsserver import DNSServer
from tests_support import free_port, read_folder, wait_for

PASSWORD = "a long test passphrase"
PEER_ADDRESS = "127.0.0.2"


@dataclass
class Setup:
    data_dir: Path
    ports: dict[str, int]
    app_password: str
    postfix: PostfixMX
    dns: DNSServer

    def cert(self) -> str:
        return str(self.data_dir / "tls" / "cert.pem")

    def inbox(self, address: str = "alice@example.test") -> list[bytes]:
        return read_folder(self.data_dir, address, PASSWORD)


def start_dev(
    data_dir: Path, dns_port: int, smtp_port: int
) -> tuple[subprocess.Popen[str], dict[str, int]]:
    proc, info = start_outbound_dev(data_dir, dns_port, smtp_port)
    return proc, info["ports"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    require_tool("postfix")
    require_tool("swaks")
    root = tmp_path_factory.mktemp("outbound")
    postfix = PostfixMX(PEER_ADDRESS, free_port(PEER_ADDRESS), "remote.test", ["bob", "carol"])
    postfix.start()
    dns = DNSServer()
    data_dir = root / "var"
    proc, ports = start_dev(data_dir, dns.port, postfix.port)
    try:
        run_cli(
            data_dir, "user", "add", "alice@example.test", "--password-stdin", stdin=PASSWORD + "\n"
        )
        run_cli(
            data_dir,
            "user",
            "add",
            "mallory@example.test",
            "--password-stdin",
            stdin=PASSWORD + "\n",
        )
        app = run_cli(
            data_dir,
            "app-password",
            "add",
            "alice@example.test",
            "--label",
            "t",
            stdin=PASSWORD + "\n",
        )
        zone = zone_from_dns_output(run_cli(data_dir, "domain", "dns", "example.test").stdout)
        zone["remote.test"] = [("MX", (10, "mx.remote.test"))]
        zone["mx.remote.test"] = [("A", PEER_ADDRESS)]
        zone["nomail.test"] = [("MX", (0, "."))]
        dns.set_zone(zone)
        yield Setup(data_dir, ports, app.stdout.strip(), postfix, dns)
    finally:
        stop_dev(proc)
        postfix.remove()
        dns.close()


def message(subject: str, sender: str = "alice@example.test", to: str = "bob@remote.test") -> bytes:
    return (
        f"From: Alice <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n\r\nHello Bob, {subject}.\r\n"
    ).encode()


def delivered_to(setup: Setup, user: str, subject: str) -> list[bytes]:
    return [m for m in setup.postfix.messages(user) if f"Subject: {subject}".encode() in m]


def test_swaks_submission_is_signed_and_delivered_to_postfix(setup: Setup, tmp_path: Path) -> None:
    msg = tmp_path / "m.eml"
    msg.write_bytes(message("via-swaks"))
    result = subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(setup.ports["submission"]), "--tls",
         "--tls-verify", "--tls-ca-path", setup.cert(), "--auth", "PLAIN",
         "--auth-user", "alice@example.test", "--auth-password", setup.app_password,
         "--from", "alice@example.test", "--to", "bob@remote.test", "--data", str(msg)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    [arrived] = wait_for(lambda: delivered_to(setup, "bob", "via-swaks"), "delivery to Postfix")  # type: ignore[misc]
    assert arrived.count(b"DKIM-Signature:") == 2
    assert b"Message-ID: <" in arrived and b"Date: " in arrived  # completed at submission
    arrived = arrived.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")  # Maildir stores LF
    resolver = Resolver([Nameserver("127.0.0.1", setup.dns.port)])
    ours = asyncio.run(verify_dkim(resolver, arrived))
    assert sorted((s.algorithm, s.result) for s in ours.signatures) == [
        ("ed25519-sha256", "pass"),
        ("rsa-sha256", "pass"),
    ]
    independent = subprocess.run(
        ["perl", "-e", PERL_VERIFY, str(setup.dns.port)],
        input=arrived,
        capture_output=True,
        check=True,
    ).stdout.decode()
    assert "rsa-sha256 pass" in independent.splitlines(), independent
    # Postfix's summary line counts the commands: our client used STARTTLS. The line comes
    # when the session ends, after the engine's idle timeout (sessions are kept for reuse).
    wait_for(lambda: "starttls=1" in setup.postfix.log_tail(200), "the session summary")


def test_aiosmtplib_submission_on_implicit_tls(setup: Setup) -> None:
    async def send() -> None:
        ctx = ssl.create_default_context(cafile=setup.cert())
        await aiosmtplib.send(
            message("via-465"),
            sender="alice@example.test",
            recipients=["bob@remote.test"],
            hostname="127.0.0.1",
            port=setup.ports["submissions"],
            use_tls=True,
            tls_context=ctx,
            username="alice@example.test",
            password=PASSWORD,  # the account password works too (Argon2id, off the loop)
        )

    asyncio.run(send())
    wait_for(lambda: delivered_to(setup, "bob", "via-465"), "delivery to Postfix")


def test_no_auth_before_starttls_and_no_mail_without_auth(setup: Setup) -> None:
    with smtplib.SMTP("127.0.0.1", setup.ports["submission"], timeout=30) as client:
        client.ehlo("client.test")
        assert "auth" not in client.esmtp_features  # RFC 4954 §4: not offered in clear
        code, _ = client.mail("alice@example.test")
        assert code == 530
        client.starttls(context=ssl.create_default_context(cafile=setup.cert()))
        client.ehlo("client.test")
        assert "PLAIN" in client.esmtp_features["auth"]
        code, _ = client.mail("alice@example.test")
        assert code == 530  # authentication required
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("alice@example.test", "wrong password")


def test_sending_as_someone_else_is_refused(setup: Setup) -> None:
    with smtplib.SMTP("127.0.0.1", setup.ports["submission"], timeout=30) as client:
        client.starttls(context=ssl.create_default_context(cafile=setup.cert()))
        client.login("alice@example.test", setup.app_password)
        code, text = client.mail("mallory@example.test")
        assert (code, text[:5]) == (553, b"5.7.1")
        assert client.mail("Alice+lists@example.test")[0] == 250  # her own, with a tag
        client.rcpt("bob@remote.test")
        code, text = client.data(message("forged-from", sender="ceo@example.test"))
        assert (code, text[:5]) == (553, b"5.7.1")
    time.sleep(1)
    assert not delivered_to(setup, "bob", "forged-from")


def test_a_550_at_the_destination_bounces_to_the_sender(setup: Setup) -> None:
    with smtplib.SMTP("127.0.0.1", setup.ports["submission"], timeout=30) as client:
        client.starttls(context=ssl.create_default_context(cafile=setup.cert()))
        client.login("alice@example.test", setup.app_password)
        client.sendmail(
            "alice@example.test",
            ["nobody@remote.test"],
            message("to-nobody", to="nobody@remote.test"),
        )

    def bounce() -> list[bytes]:
        return [m for m in setup.inbox() if b"multipart/report" in m and b"to-nobody" in m]

    [dsn] = wait_for(bounce, "the bounce in alice's inbox")  # type: ignore[misc]
    assert b"Final-Recipient: rfc822; nobody@remote.test" in dsn
    assert b"Action: failed" in dsn and b"Status: 5.1.1" in dsn
    assert b"Hello Bob" not in dsn  # headers only: the body is not sent around again


def test_null_mx_bounces_at_once(setup: Setup) -> None:
    with smtplib.SMTP("127.0.0.1", setup.ports["submission"], timeout=30) as client:
        client.starttls(context=ssl.create_default_context(cafile=setup.cert()))
        client.login("alice@example.test", setup.app_password)
        client.sendmail(
            "alice@example.test", ["x@nomail.test"], message("to-null-mx", to="x@nomail.test")
        )
    [dsn] = wait_for(
        lambda: [m for m in setup.inbox() if b"to-null-mx" in m and b"5.1.10" in m],
        "null MX bounce",
    )  # type: ignore[misc]
    assert b"Action: failed" in dsn


def test_a_451_is_retried(setup: Setup) -> None:
    setup.postfix.set_access({"carol@remote.test": "451 4.7.1 Try again later"})
    with smtplib.SMTP("127.0.0.1", setup.ports["submission"], timeout=30) as client:
        client.starttls(context=ssl.create_default_context(cafile=setup.cert()))
        client.login("alice@example.test", setup.app_password)
        client.sendmail(
            "alice@example.test", ["carol@remote.test"], message("retry-me", to="carol@remote.test")
        )
    wait_for(lambda: "451 4.7.1" in setup.postfix.log_tail(100), "the 451 at Postfix")
    time.sleep(1)
    assert not delivered_to(setup, "carol", "retry-me")
    status = run_cli(setup.data_dir, "queue", "status").stdout
    assert status.startswith("1 ")  # still queued, not bounced
    setup.postfix.set_access({})
    run_cli(setup.data_dir, "queue", "flush")
    wait_for(lambda: delivered_to(setup, "carol", "retry-me"), "delivery after the retry")
    assert not [m for m in setup.inbox() if b"retry-me" in m and b"multipart/report" in m]


def test_kill_9_with_a_full_queue_loses_nothing(tmp_path: Path) -> None:
    require_tool("postfix")
    postfix = PostfixMX(PEER_ADDRESS, free_port(PEER_ADDRESS), "remote.test", ["bob"])
    dns = DNSServer()
    dns.set_zone(
        {"remote.test": [("MX", (10, "mx.remote.test"))], "mx.remote.test": [("A", PEER_ADDRESS)]}
    )
    data_dir = tmp_path / "var"
    proc, ports = start_dev(data_dir, dns.port, postfix.port)  # Postfix is down: mail waits
    try:
        run_cli(
            data_dir, "user", "add", "alice@example.test", "--password-stdin", stdin=PASSWORD + "\n"
        )
        with smtplib.SMTP("127.0.0.1", ports["submission"], timeout=30) as client:
            client.starttls(
                context=ssl.create_default_context(cafile=str(data_dir / "tls" / "cert.pem"))
            )
            client.login("alice@example.test", PASSWORD)
            for n in range(5):
                client.sendmail("alice@example.test", ["bob@remote.test"], message(f"queued-{n}"))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert run_cli(data_dir, "queue", "status").stdout.startswith("5 ")
        postfix.start()
        proc, ports = start_dev(data_dir, dns.port, postfix.port)
        run_cli(data_dir, "queue", "flush")
        wait_for(lambda: len(postfix.messages("bob")) >= 5, "all five after the restart")
        subjects = sorted(re.findall(rb"^Subject: (\S+)", b"".join(postfix.messages("bob")), re.M))
        assert subjects == [f"queued-{n}".encode() for n in range(5)]
        wait_for(
            lambda: run_cli(data_dir, "queue", "status").stdout.startswith("0 "), "an empty queue"
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        postfix.remove()
        dns.close()
