"""The inbound MX end to end: `mailfort dev` on loopback, DNS from a real server, real clients.

One server for the module (`mailfort dev --dns`), one DNS server with the test zones, and
clients that speak SMTP for real: swaks, smtplib, raw sockets for the protocol abuse.
"""

from __future__ import annotations

import base64
import json
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from conftest import require_tool, run_cli, start_dev, stop_dev
from dnsserver import DNSServer
from tests_support import read_mailbox

PASSWORD = "a long test passphrase"
DKIM_SELECTOR = "s2026"


@dataclass
class MX:
    data_dir: Path
    port: int
    dkim_key: Path
    dns: DNSServer

    def stored(self, address: str = "alice@example.test") -> dict[str, list[bytes]]:
        """Every message in the mailbox by folder, read as the user (drains the spool)."""
        return read_mailbox(self.data_dir, address, PASSWORD)


def _zone(dkim_public: str) -> dict[str, list[tuple[str, object] | str]]:
    return {
        # Forwarders that ARC-seal: one the operator trusts, one it does not.
        "arc._domainkey.forwarder.test": [("TXT", f"v=DKIM1; k=rsa; p={dkim_public}")],
        "arc._domainkey.untrusted.test": [("TXT", f"v=DKIM1; k=rsa; p={dkim_public}")],
        # A sender domain that does everything right.
        "sender.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all"), ("MX", (10, "mx.sender.test"))],
        "_dmarc.sender.test": [("TXT", "v=DMARC1; p=reject")],
        f"{DKIM_SELECTOR}._domainkey.sender.test": [("TXT", f"v=DKIM1; k=rsa; p={dkim_public}")],
        # A domain whose SPF excludes us, with p=quarantine.
        "quarantine.test": [("TXT", "v=spf1 -all")],
        "_dmarc.quarantine.test": [("TXT", "v=DMARC1; p=quarantine")],
        # A domain whose DNS is broken: lookups time out.
        "broken.test": ["TIMEOUT"],
        "_dmarc.broken.test": ["TIMEOUT"],
        # A domain with no policy at all.
        "plain.test": [("TXT", "v=spf1 ip4:127.0.0.1 -all")],
    }


@pytest.fixture(scope="module")
def mx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MX]:
    root = tmp_path_factory.mktemp("mx")
    data_dir = root / "var"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_path = root / "dkim.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    public = base64.b64encode(
        key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    ).decode()
    dns = DNSServer()
    dns.set_zone(_zone(public))
    proc, info = start_dev(
        data_dir, dns.port, env={"MAILFORT_TRUSTED_FORWARDERS": "forwarder.test"}
    )
    try:
        run_cli(
            data_dir, "user", "add", "alice@example.test", "--password-stdin", stdin=PASSWORD + "\n"
        )
        run_cli(
            data_dir, "user", "add", "bob@example.test", "--password-stdin", stdin=PASSWORD + "\n"
        )
        run_cli(
            data_dir, "alias", "add", "team@example.test", "alice@example.test", "bob@example.test"
        )
        yield MX(data_dir, info["ports"]["smtp"], key_path, dns)
    finally:
        code = stop_dev(proc)
        dns.close()
        log = (data_dir.parent / "mailfort.stderr").read_text()
        assert code == 0, log  # a clean stop after everything the tests threw at it


def message(
    subject: str, sender: str = "news@sender.test", to: str = "alice@example.test"
) -> bytes:
    return (
        f"From: Sender <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{time.monotonic_ns()}@sender.test>\r\n"
        f"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\n\r\nHello from {subject}.\r\n"
    ).encode()


def smtp(mx: MX, helo: str = "mx.sender.test") -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", mx.port, local_hostname=helo, timeout=30)
    ctx = ssl.create_default_context(cafile=str(mx.data_dir / "tls" / "cert.pem"))
    client.starttls(context=ctx)
    client.ehlo(helo)
    return client


def find(folder: list[bytes], needle: str) -> list[bytes]:
    return [m for m in folder if needle.encode() in m]


def test_swaks_delivers_over_starttls_with_authentication_results(mx: MX, tmp_path: Path) -> None:
    swaks = require_tool("swaks")
    body = tmp_path / "msg.eml"
    body.write_bytes(message("swaks-delivery"))
    result = subprocess.run(
        [
            swaks, "--server", "127.0.0.1", "--port", str(mx.port), "--tls",
            "--tls-verify", "--tls-ca-path", str(mx.data_dir / "tls" / "cert.pem"),
            "--ehlo", "mx.sender.test", "--from", "news@sender.test",
            "--to", "alice@example.test", "--data", str(body),
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "TLS started" in result.stdout or "STARTTLS" in result.stdout
    assert "250 2.6.0" in result.stdout
    [stored] = find(mx.stored()["INBOX"], "swaks-delivery")
    headers = stored.split(b"\r\n\r\n", 1)[0].decode()
    assert headers.count("Authentication-Results:") == 1
    assert "Authentication-Results: localhost;" in headers
    unfolded = headers.replace("\r\n\t", " ").replace("\r\n ", " ")
    assert "spf=pass" in unfolded and "dmarc=pass" in unfolded  # SPF passes and aligns
    assert "with ESMTPS" in headers and "Return-Path: <news@sender.test>" in headers


def test_independent_dkim_signature_verifies_as_pass(mx: MX, tmp_path: Path) -> None:
    # Mail::DKIM (Debian libmail-dkim-perl) signs: an implementation independent of ours.
    signer = require_tool("dkimproxy-sign")
    unsigned = message("dkim-signed")
    signature = subprocess.run(
        [signer, f"--key={mx.dkim_key}", f"--selector={DKIM_SELECTOR}", "--domain=sender.test",
         "--method=relaxed"],
        input=unsigned, capture_output=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert signature.startswith(b"DKIM-Signature:")
    signed = signature.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + unsigned
    with smtp(mx) as client:
        client.sendmail("news@sender.test", ["alice@example.test"], signed)
    [stored] = find(mx.stored()["INBOX"], "dkim-signed")
    results = stored.split(b"\r\n\r\n", 1)[0].decode().replace("\r\n\t", " ")
    assert "dkim=pass" in results and "header.d=sender.test" in results
    assert "dmarc=pass" in results


def test_spoofed_from_under_p_reject_is_refused(mx: MX) -> None:
    with smtp(mx, helo="evil.example") as client:
        with pytest.raises(smtplib.SMTPDataError) as err:
            # Envelope from a domain without SPF; From: claims sender.test (p=reject).
            client.sendmail(
                "x@nowhere.example", ["alice@example.test"], message("spoofed", "ceo@sender.test")
            )
        assert err.value.smtp_code == 550 and b"5.7.1" in err.value.smtp_error
        assert client.noop()[0] == 250  # the session goes on
    assert not find(mx.stored()["INBOX"], "spoofed")


def test_quarantine_policy_files_into_junk(mx: MX) -> None:
    with smtp(mx) as client:
        client.sendmail(
            "a@quarantine.test", ["alice@example.test"], message("quarantined", "a@quarantine.test")
        )
    folders = mx.stored()
    assert find(folders["Junk"], "quarantined") and not find(folders["INBOX"], "quarantined")


def test_dns_failure_is_a_temporary_refusal(mx: MX) -> None:
    with smtp(mx) as client:
        with pytest.raises(smtplib.SMTPDataError) as err:
            client.sendmail(
                "a@broken.test", ["alice@example.test"], message("dns-broken", "a@broken.test")
            )
        assert err.value.smtp_code == 451


def test_recipients_resolved_at_rcpt(mx: MX) -> None:
    with smtp(mx) as client:
        client.mail("news@sender.test")
        code, text = client.rcpt("nobody@example.test")
        assert (code, text[:5]) == (550, b"5.1.1")
        code, text = client.rcpt("someone@not-hosted.test")
        assert (code, text[:5]) == (550, b"5.7.1")
        assert client.rcpt("Alice+tag@Example.Test")[0] == 250
        assert client.rcpt("team@example.test")[0] == 250  # alias to alice and bob
        code, _ = client.data(message("routing"))
        assert code == 250
    assert len(find(mx.stored("alice@example.test")["INBOX"], "routing")) == 1  # one copy
    assert len(find(mx.stored("bob@example.test")["INBOX"], "routing")) == 1


def test_bounce_with_null_sender_is_accepted_and_filed(mx: MX) -> None:
    # DSNs and auto-replies come from the null reverse-path (RFC 5321 §4.5.5): refusing it
    # would lose every bounce for our users' own outgoing mail. SPF then checks the HELO
    # name (RFC 7208 §2.4), which is what DMARC aligns with (RFC 7489 §3.1.2).
    with smtp(mx, helo="sender.test") as client:
        code, text = client.mail("")
        assert code == 250, text
        assert client.rcpt("alice@example.test")[0] == 250
        code, text = client.data(message("null-sender", sender="mailer-daemon@sender.test"))
        assert code == 250, text
    [stored] = find(mx.stored("alice@example.test")["INBOX"], "null-sender")
    assert stored.startswith(b"Return-Path: <>\r\n")


def test_more_than_50_recipients_get_452(mx: MX) -> None:
    with smtp(mx) as client:
        client.mail("news@sender.test")
        for _ in range(50):
            assert client.rcpt("alice@example.test")[0] == 250
        code, text = client.rcpt("alice@example.test")
        assert (code, text[:5]) == (452, b"4.5.3")


def test_size_limit_refused_at_mail_and_at_data(mx: MX) -> None:
    with smtp(mx) as client:
        assert (
            "size" in client.esmtp_features
            and int(client.esmtp_features["size"]) == 50 * 1024 * 1024
        )
        code, text = client.mail("news@sender.test", ["SIZE=60000000"])
        assert (code, text[:5]) == (552, b"5.3.4")
        client.rset()
        client.mail("news@sender.test")
        client.rcpt("alice@example.test")
        big = message("too-big") + (b"x" * 998 + b"\r\n") * 53_000  # ~53 MB
        code, text = client.data(big)
        assert (code, text[:5]) == (552, b"5.3.4")
        assert client.noop()[0] == 250


def test_esmtp_extensions_and_banner(mx: MX) -> None:
    with socket.create_connection(("127.0.0.1", mx.port), timeout=10) as sock:
        banner = sock.recv(1024).decode()
        assert banner.startswith("220 ") and "Python" not in banner and "aiosmtpd" not in banner
        sock.sendall(b"EHLO client.test\r\n")
        ehlo = b""
        while not ehlo.endswith(b"\r\n") or b"250 " not in ehlo:
            ehlo += sock.recv(4096)
    for ext in ("PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "STARTTLS", "SIZE"):
        assert f"250-{ext}" in ehlo.decode() or f"250 {ext}" in ehlo.decode(), ext


def converse(port: int, script: bytes, tls: bool = False) -> str:
    """Send raw bytes after EHLO and return everything the server answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.recv(1024)
        sock.sendall(script)
        sock.settimeout(3)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
                if b"221 " in out:
                    break
        except TimeoutError:
            pass
        return out.decode(errors="replace")


def test_garbage_commands_get_500_501_and_the_session_goes_on(mx: MX) -> None:
    out = converse(
        mx.port,
        b"EHLO client.test\r\nFOOBAR baz\r\nMAIL FROM:<broken\r\nMAIL FROM:<ok@sender.test> BOGUS=1\r\n"
        b"RCPT TO:<alice@example.test>\r\n\x00\xff\xfe\r\nNOOP\r\nQUIT\r\n",
    )
    codes = [line[:3] for line in out.splitlines()]
    assert "500" in codes  # unknown command
    assert "501" in codes  # malformed MAIL FROM
    assert "555" in codes  # unknown MAIL FROM parameter
    assert "500 5.5.2" in out  # enhanced codes on aiosmtpd's own replies too
    assert out.rstrip().endswith("221 2.0.0 Bye") or "221" in codes[-1]
    assert codes.count("250") >= 2  # NOOP after the garbage still works


@pytest.mark.parametrize(
    "ending",
    [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"],
    ids=["LF.LF", "CR.CR", "LF.CRLF", "CRLF.LF", "CR.CRLF"],
)
def test_smtp_smuggling_never_splits_or_joins_messages(mx: MX, ending: bytes) -> None:
    """The 2023 smuggling class: a fake end-of-data followed by a second transaction."""
    marker = f"smuggle-{ending.hex()}"
    smuggled = (
        b"MAIL FROM:<ceo@sender.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
        b"From: ceo@sender.test\r\nSubject: " + marker.encode() + b"-inner\r\n\r\nforged\r\n.\r\n"
    )
    script = (
        b"EHLO mx.sender.test\r\nMAIL FROM:<news@sender.test>\r\nRCPT TO:<alice@example.test>\r\n"
        b"DATA\r\nFrom: news@sender.test\r\nSubject: "
        + marker.encode()
        + b"-outer\r\n\r\nbody"
        + ending
        + smuggled
        + b"QUIT\r\n"
    )
    converse(mx.port, script)
    inbox = mx.stored()["INBOX"]
    assert not find(inbox, f"{marker}-inner\r\n\r\nforged") or find(inbox, f"{marker}-outer")
    # Never a separate message from the smuggled part.
    assert not [
        m for m in inbox if f"{marker}-inner".encode() in m and f"{marker}-outer".encode() not in m
    ]


def test_mail_loop_is_refused(mx: MX) -> None:
    trace = b"".join(
        b"Received: from hop%d.test by hop%d.test; Sat, 28 Nov 2026 10:00:00 +0000\r\n" % (i, i)
        for i in range(26)
    )
    with smtp(mx) as client:
        with pytest.raises(smtplib.SMTPDataError) as err:
            client.sendmail("news@sender.test", ["alice@example.test"], trace + message("loop"))
        assert err.value.smtp_code == 554 and b"5.4.6" in err.value.smtp_error


def test_forged_authentication_results_are_removed(mx: MX) -> None:
    forged = b"Authentication-Results: localhost; dkim=pass header.d=bank.test\r\n" + message(
        "forged-ar"
    )
    with smtp(mx) as client:
        client.sendmail("news@sender.test", ["alice@example.test"], forged)
    [stored] = find(mx.stored()["INBOX"], "forged-ar")
    assert b"bank.test" not in stored
    assert stored.count(b"Authentication-Results:") == 1


def test_tls_offers_only_tls12_and_13_with_modern_suites(mx: MX, tmp_path: Path) -> None:
    testssl = require_tool("testssl")
    out = tmp_path / "testssl.json"
    subprocess.run(
        [
            testssl, "--quiet", "--warnings", "off", "--color", "0", "--protocols", "--std",
            "--jsonfile", str(out), "--starttls", "smtp", f"127.0.0.1:{mx.port}",
        ],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    findings = {f["id"]: f["finding"] for f in json.loads(out.read_text())}
    for old in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
        assert "not offered" in findings[old], (old, findings[old])
    assert "offered" in findings["TLS1_2"] and "not" not in findings["TLS1_2"]
    assert "offered" in findings["TLS1_3"] and "not" not in findings["TLS1_3"]
    for weak in ("cipherlist_NULL", "cipherlist_aNULL", "cipherlist_EXPORT", "cipherlist_LOW",
                 "cipherlist_3DES_IDEA", "cipherlist_OBSOLETED"):  # fmt: skip
        if weak in findings:
            assert "not offered" in findings[weak], (weak, findings[weak])


def arc_sealed(mx: MX, forwarder: str, subject: str) -> bytes:
    """A p=reject sender's message that a mailing list changed (its DKIM breaks), then sealed."""
    import dkim

    original = message(subject, "ceo@sender.test")
    changed = original.replace(b"Hello from", b"[list footer] Hello from")
    results = (
        f"Authentication-Results: {forwarder}; dkim=pass header.d=sender.test;"
        " spf=pass smtp.mailfrom=sender.test; dmarc=pass header.from=sender.test\r\n"
    ).encode()
    key = mx.dkim_key.read_bytes()
    seal = dkim.arc_sign(results + changed, b"arc", forwarder.encode(), key, forwarder.encode())
    return b"".join(seal) + results + changed


def test_dmarc_reject_is_overridden_only_by_a_trusted_forwarders_arc_seal(mx: MX) -> None:
    with smtp(mx, helo="lists.forwarder.test") as client:
        # The envelope is the list's own; From stays the p=reject sender's: DMARC fails.
        client.sendmail(
            "bounces@forwarder.test",
            ["alice@example.test"],
            arc_sealed(mx, "forwarder.test", "via-trusted-list"),
        )
        with pytest.raises(smtplib.SMTPDataError) as err:
            client.sendmail(
                "bounces@untrusted.test",
                ["alice@example.test"],
                arc_sealed(mx, "untrusted.test", "via-untrusted-list"),
            )
        assert err.value.smtp_code == 550
    inbox = mx.stored()["INBOX"]
    [stored] = find(inbox, "via-trusted-list")
    unfolded = stored.split(b"\r\n\r\n", 1)[0].decode().replace("\r\n\t", " ").replace("\r\n ", " ")
    assert "arc=pass" in unfolded and "dmarc=fail" in unfolded
    assert not find(inbox, "via-untrusted-list")


def test_connections_per_ip_are_capped(mx: MX) -> None:
    held = [socket.create_connection(("127.0.0.1", mx.port), timeout=10) for _ in range(20)]
    try:
        for sock in held:
            assert sock.recv(1024).startswith(b"220 ")
        with socket.create_connection(("127.0.0.1", mx.port), timeout=10) as extra:
            assert extra.recv(1024).startswith(b"421 4.7.0")
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    with socket.create_connection(("127.0.0.1", mx.port), timeout=10) as again:
        assert again.recv(1024).startswith(b"220 ")  # freed slots are reusable


def test_a_client_that_stops_sending_is_disconnected_not_held_open(mx: MX) -> None:
    with socket.create_connection(("127.0.0.1", mx.port), timeout=10) as sock:
        sock.sendall(b"EHLO client.test\r\n")
        sock.shutdown(socket.SHUT_WR)  # half-close: the client will send nothing more
        received = b""
        while chunk := sock.recv(4096):  # ends only when the server closes its side
            received += chunk
        assert received.startswith(b"220 ")
