"""Forwarding end to end (issue 5): `mailfort dev` as the MX of example.test, a private
Postfix (Debian) on 127.0.0.2 as the MX of the targets' domain (remote.test) and of the
original senders' domains, and the loopback DNS server mapping it all.

What a user of an alias notices: the copy arrives, it passes SPF (SRS sender at our domain),
DKIM (our signature, checked by Mail::DKIM) and ARC (our seal, checked by Mail::DKIM's ARC
verifier); bounces come home to the original sender; a failing target makes the sender
retry and the retry reaches only that target; nothing of the message touches our disk.
"""

from __future__ import annotations

import asyncio
import os
import re
import smtplib
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailfort.auth.arc import verify_arc
from mailfort.dns import Nameserver, Resolver
from mailfort.keys.server import ServerKey
from mailfort.relay.forward import SRSKeys
from postfix_peer import PostfixMX
from test_dkim_signing import zone_from_dns_output
from test_relay_support import PKI
from webhook_support import Answer, WebhookReceiver

from conftest import require_tool, run_cli, start_outbound_dev, stop_dev
from dnsserver import DNSServer
from tests_support import free_port, read_folder, wait_for

# One server per module: its tests share it on one xdist worker.
pytestmark = pytest.mark.xdist_group("forward")
PEER = "127.0.0.2"
PASSWORD = "a long test passphrase"

# Forward Email's syntax, over two TXT records as a long list would be.
RULES = (
    "forward-email=hello:bob@remote.test,!quiet,!!later,!!!never,"
    "/^team-([a-z]+)$/:$1@remote.test,hello:alice@example.test",
    "forward-email=other:dave@remote.test",
)

PERL_DKIM_ARC = r"""
use Mail::DKIM::Verifier; use Mail::DKIM::ARC::Verifier; use Net::DNS;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $ARGV[0]));
local $/; binmode STDIN; my $msg = <STDIN>;
my $v = Mail::DKIM::Verifier->new(); $v->PRINT($msg); $v->CLOSE;
foreach my $s ($v->signatures) { print "dkim ", $s->domain, " ", $s->algorithm, " ", $s->result, "\n" }
my $a = Mail::DKIM::ARC::Verifier->new(); $a->PRINT($msg); $a->CLOSE;
print "arc ", $a->result, "\n";
"""


@dataclass
class Forwarding:
    data_dir: Path
    tmp_dir: Path
    mx_port: int
    pid: int
    postfix: PostfixMX
    dns: DNSServer
    hook: WebhookReceiver

    def send(self, sender: str, rcpts: list[str], message: bytes) -> tuple[int, str]:
        """One SMTP transaction to our MX; the DATA reply (or the first refusal)."""
        with smtplib.SMTP("127.0.0.1", self.mx_port, timeout=120) as client:
            client.ehlo("client.sender.test")
            code, text = client.mail(sender)
            assert code == 250, text
            for rcpt in rcpts:
                code, text = client.rcpt(rcpt)
                if code != 250:
                    return code, text.decode()
            code, text = client.data(message)
            return code, text.decode()

    def arrived(self, user: str, marker: str, domain: str | None = None) -> list[bytes]:
        return [m for m in self.postfix.messages(user, domain) if marker.encode() in m]


def message(marker: str, sender: str = "sam@sender.test", to: str = "fwd@example.test") -> bytes:
    return (
        f"From: Sam <{sender}>\r\nTo: <{to}>\r\nSubject: {marker}\r\n"
        f"Message-ID: <{marker}@sender.test>\r\nDate: Sat, 28 Nov 2026 12:00:00 +0000\r\n\r\n"
        f"Hello, {marker}.\r\n"
    ).encode()


@pytest.fixture(scope="module")
def fwd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Forwarding]:
    require_tool("postfix")
    require_tool("perl")
    root = tmp_path_factory.mktemp("forward")
    dns = DNSServer()
    peer_port = free_port(PEER)
    data_dir = root / "var"
    tmp_dir = root / "tmp"
    tmp_dir.mkdir()
    pki = PKI.create(root / "pki")
    hook = WebhookReceiver(pki.server_context(pki.root.issue(["hooks.test"]), "hook"), b"")
    env = {
        "TMPDIR": str(tmp_dir),
        # The webhook endpoint's certificate chains to the test CA, and it listens on
        # loopback, which only an operator's explicit permission allows.
        "MAILFORT_OUTBOUND_CA_FILE": str(pki.ca_file),
        "MAILFORT_FORWARD_ALLOW_PRIVATE_WEBHOOKS": "true",
    }
    proc, info = start_outbound_dev(data_dir, dns.port, peer_port, env=env)
    mx_port = int(info["ports"]["smtp"])
    postfix = PostfixMX(
        PEER,
        peer_port,
        "remote.test",
        ["bob", "carol", "dave", "gone", "sam"],
        extra_domains=["sender.test", "strict.test"],
        # Postfix's own bounces (for "gone") go to the SRS address's domain: our MX.
        relayhost=f"[127.0.0.1]:{mx_port}",
        # "gone" is relayed on to our MX, which refuses it (relay denied): Postfix then
        # bounces what it had accepted, as any MTA whose next hop fails permanently does.
        transport={"gone@remote.test": f"smtp:[127.0.0.1]:{mx_port}"},
        header_checks=[
            r"/^From:.*@strict\.test/ REJECT 5.7.26 Unauthenticated email from strict.test "
            "is not accepted due to the domain's DMARC policy"
        ],
    )
    postfix.start()
    try:
        run_cli(data_dir, "user", "add", "alice@example.test", "--password-stdin",
                stdin=PASSWORD + "\n")  # fmt: skip
        run_cli(
            data_dir, "alias", "add", "fwd@example.test", "bob@remote.test", "carol@remote.test"
        )
        run_cli(data_dir, "alias", "add", "team@example.test", "alice@example.test",
                "dave@remote.test")  # fmt: skip
        run_cli(data_dir, "alias", "add", "gone@example.test", "gone@remote.test")
        run_cli(data_dir, "alias", "add", "ghost@example.test", "nobody@remote.test")
        run_cli(data_dir, "alias", "add", "half@example.test", "bob@remote.test",
                "nobody@remote.test")  # fmt: skip
        run_cli(data_dir, "domain", "add", "rules.test")
        hook_url = f"https://hooks.test:{hook.port}/in?token=t"
        run_cli(data_dir, "alias", "add", "hook@example.test", hook_url, "bob@remote.test")
        secret = run_cli(data_dir, "domain", "webhook-secret", "example.test").stdout.strip()
        hook.secret = bytes.fromhex(secret)
        zone = zone_from_dns_output(run_cli(data_dir, "domain", "dns", "example.test").stdout)
        zone["mx.example.test"] = [("A", "127.0.0.1")]
        # Our forwards leave from 127.0.0.1 too: the SPF record `domain dns` printed names
        # the MX (mx.example.test), which is that address.
        for domain in ("remote.test", "sender.test", "strict.test"):
            zone[domain] = [("MX", (10, "mx.remote.test"))]
        zone["mx.remote.test"] = [("A", PEER)]
        for domain in ("sender.test", "strict.test"):
            zone[domain].append(("TXT", "v=spf1 ip4:127.0.0.0/8 -all"))
            zone[f"_dmarc.{domain}"] = [("TXT", "v=DMARC1; p=none")]
        zone["rules.test"] = [("TXT", record) for record in RULES]
        zone["hooks.test"] = [("A", "127.0.0.1")]
        dns.set_zone(zone)
        yield Forwarding(data_dir, tmp_dir, mx_port, proc.pid, postfix, dns, hook)
    finally:
        stop_dev(proc)
        postfix.remove()
        dns.close()
        hook.close()


def crlf(stored: bytes) -> bytes:
    return stored.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")  # Maildir stores LF


def return_path(stored: bytes) -> str:
    match = re.search(rb"^Return-Path: <([^>]*)>", stored, re.MULTILINE)
    assert match, stored[:400]
    return match.group(1).decode()


def test_forwarded_copy_has_srs_sender_dkim_and_arc_that_verify(fwd: Forwarding) -> None:
    marker = f"fwd-{uuid.uuid4().hex[:8]}"
    code, text = fwd.send("sam@sender.test", ["fwd@example.test"], message(marker))
    assert code == 250, text
    [bob] = wait_for(lambda: fwd.arrived("bob", marker), "bob's copy")
    [carol] = wait_for(lambda: fwd.arrived("carol", marker), "carol's copy")
    for copy in (bob, carol):
        sender = return_path(copy)
        assert sender.upper().startswith("SRS0="), sender
        assert sender.endswith("@example.test") and "sender.test" in sender and "sam" in sender
        assert b"ARC-Seal: i=1;" in copy and b"ARC-Authentication-Results: i=1;" in copy
    checks = subprocess.run(
        ["perl", "-e", PERL_DKIM_ARC, str(fwd.dns.port)],
        input=crlf(bob), capture_output=True, check=True,
    ).stdout.decode().splitlines()  # fmt: skip
    assert "dkim example.test rsa-sha256 pass" in checks, checks
    assert "arc pass" in checks, checks
    resolver = Resolver([Nameserver("127.0.0.1", fwd.dns.port)])
    ours = asyncio.run(verify_arc(resolver, crlf(bob)))
    assert ours.cv == "pass", ours
    # The seal carries our verdict on the original: SPF passed for sender.test.
    aar = re.search(rb"ARC-Authentication-Results: i=1;(.*?)\r?\n(?=\S)", bob, re.DOTALL)
    assert aar and b"spf=pass" in aar.group(1), bob[:1500]
    # Forwarded copies carry our Received line but no Return-Path of ours (only Postfix's).
    assert bob.count(b"Return-Path:") == 1
    assert b"by mx.example.test" in bob


def test_plus_tag_travels_to_the_target(fwd: Forwarding) -> None:
    marker = f"tag-{uuid.uuid4().hex[:8]}"
    code, text = fwd.send("sam@sender.test", ["fwd+news@example.test"], message(marker))
    assert code == 250, text
    [copy] = wait_for(lambda: fwd.arrived("bob", marker), "bob's copy")
    assert re.search(rb"^Delivered-To: bob\+news@remote\.test", copy, re.MULTILINE), copy[:600]


def test_bounce_to_the_srs_address_reaches_the_original_sender(fwd: Forwarding) -> None:
    marker = f"bounce-{uuid.uuid4().hex[:8]}"
    # Postfix accepts for gone@remote.test, then its error transport bounces the message
    # to the envelope sender, our SRS address; we route that DSN back to sam@sender.test.
    code, text = fwd.send("sam@sender.test", ["gone@example.test"], message(marker))
    assert code == 250, text
    [dsn] = wait_for(lambda: fwd.arrived("sam", marker, "sender.test"), "the bounce at sam")
    assert b"multipart/report" in dsn and b"Relaying denied" in dsn
    assert return_path(dsn) == ""  # a bounce stays a bounce
    assert b"ARC-Seal: i=1;" in dsn  # relayed through us like any forward


def test_srs_addresses_we_did_not_issue_are_refused(fwd: Forwarding) -> None:
    srs = SRSKeys(ServerKey.load_or_create(fwd.data_dir).derive)("example.test")
    valid_but_unused = srs.forward("victim@sender.test")
    code, text = fwd.send("", [valid_but_unused], b"Subject: x\r\n\r\nx\r\n")
    assert code == 550 and "not in use" in text, (code, text)
    forged = valid_but_unused.replace(valid_but_unused[5:15], "AAAAAAAAAA", 1)
    code, text = fwd.send("", [forged], b"Subject: x\r\n\r\nx\r\n")
    assert code == 550, (code, text)


def test_temporary_failure_is_retried_only_for_the_failed_target(fwd: Forwarding) -> None:
    marker = f"retry-{uuid.uuid4().hex[:8]}"
    body = message(marker, to="team@example.test")
    fwd.postfix.set_access({"dave@remote.test": "451 4.7.1 try again later"})
    try:
        code, text = fwd.send("sam@sender.test", ["team@example.test"], body)
        assert code == 451, text
        assert "dave" not in text and "remote.test" not in text  # targets stay private
    finally:
        fwd.postfix.set_access({})
    code, text = fwd.send("sam@sender.test", ["team@example.test"], body)
    assert code == 250, text
    wait_for(lambda: fwd.arrived("dave", marker), "dave's copy")
    time.sleep(1)
    assert len(fwd.arrived("dave", marker)) == 1
    inbox = read_folder(fwd.data_dir, "alice@example.test")
    # alice's copy was stored on the first attempt and not again on the retry.
    assert sum(marker.encode() in m for m in inbox) == 1


def test_all_targets_refusing_permanently_gives_550(fwd: Forwarding) -> None:
    marker = f"refused-{uuid.uuid4().hex[:8]}"
    code, text = fwd.send("sam@sender.test", ["ghost@example.test"], message(marker))
    assert code == 550 and text.startswith("5.1.1"), (code, text)
    assert "nobody" not in text


def test_a_target_refusing_while_another_accepts_gives_250_and_a_dsn(fwd: Forwarding) -> None:
    marker = f"half-{uuid.uuid4().hex[:8]}"
    code, text = fwd.send("sam@sender.test", ["half@example.test"], message(marker))
    assert code == 250, text  # bob has it: a retry could only duplicate his copy
    wait_for(lambda: fwd.arrived("bob", marker), "bob's copy")
    [report] = wait_for(lambda: fwd.arrived("sam", marker, "sender.test"), "the DSN at sam")
    assert b"multipart/report" in report and b"Final-Recipient: rfc822; half@example.test" in report
    assert b"nobody" not in report  # the alias's targets stay private
    assert return_path(report) == ""


def test_dmarc_refusal_is_retried_with_the_from_rewritten(fwd: Forwarding) -> None:
    marker = f"dmarc-{uuid.uuid4().hex[:8]}"
    code, text = fwd.send(
        "sam@strict.test", ["fwd@example.test"], message(marker, sender="sam@strict.test")
    )
    assert code == 250, text
    [copy] = wait_for(lambda: fwd.arrived("bob", marker), "bob's copy")
    headers = copy.split(b"\n\n", 1)[0]
    assert re.search(rb"^From: .*<fwd@example\.test>", headers, re.MULTILINE), headers
    assert b"X-Original-From: Sam <sam@strict.test>" in headers
    assert b"Reply-To: Sam <sam@strict.test>" in headers
    checks = subprocess.run(
        ["perl", "-e", PERL_DKIM_ARC, str(fwd.dns.port)],
        input=crlf(copy), capture_output=True, check=True,
    ).stdout.decode().splitlines()  # fmt: skip
    assert "dkim example.test rsa-sha256 pass" in checks, checks


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                path = Path(dirpath) / name
                st = path.stat()
                out[str(path)] = (st.st_size, st.st_mtime_ns)
    return out


def _write_bytes(pid: int) -> int:
    io = Path(f"/proc/{pid}/io").read_text()
    return int(re.search(r"^write_bytes: (\d+)", io, re.MULTILINE).group(1))  # type: ignore[union-attr]


def test_forwarding_writes_nothing_to_disk(fwd: Forwarding) -> None:
    warm = f"warm-{uuid.uuid4().hex[:8]}"
    assert fwd.send("sam@sender.test", ["fwd@example.test"], message(warm))[0] == 250
    os.sync()
    time.sleep(1)
    before = _snapshot(fwd.data_dir, fwd.tmp_dir)
    written = _write_bytes(fwd.pid)
    markers = [f"disk-{i}-{uuid.uuid4().hex[:6]}" for i in range(20)]
    for marker in markers:
        code, text = fwd.send("sam@sender.test", ["fwd@example.test"], message(marker))
        assert code == 250, text
    wait_for(lambda: all(fwd.arrived("carol", m) for m in markers), "every copy")
    os.sync()
    after = _snapshot(fwd.data_dir, fwd.tmp_dir)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert not changed, sorted(changed)
    assert _write_bytes(fwd.pid) == written


def test_dns_txt_rules_route_only_when_the_operator_enabled_them(fwd: Forwarding) -> None:
    marker = f"rules-{uuid.uuid4().hex[:8]}"
    code, text = fwd.send("sam@sender.test", ["hello@rules.test"], message(marker))
    assert (code, text[:5]) == (550, "5.1.1"), text  # off by default: the zone has no say
    run_cli(fwd.data_dir, "domain", "dns-rules", "rules.test", "on")
    code, text = fwd.send("sam@sender.test", ["hello+x@rules.test"], message(marker))
    assert code == 250, text
    [bob] = wait_for(lambda: fwd.arrived("bob", marker), "bob's copy via the TXT rule")
    assert return_path(bob).upper().startswith("SRS0=") and return_path(bob).endswith("@rules.test")
    assert re.search(rb"^Delivered-To: bob\+x@remote\.test", bob, re.MULTILINE)
    # The same rule's local target: stored in alice's mailbox here, not sent out.
    inbox = read_folder(fwd.data_dir, "alice@example.test")
    assert sum(marker.encode() in m for m in inbox) == 1
    # A regex with $1 substitution.
    code, text = fwd.send("sam@sender.test", ["team-carol@rules.test"], message(marker))
    assert code == 250, text
    wait_for(lambda: fwd.arrived("carol", marker), "carol's copy via the regex")
    # The three prefixes: accept and drop, temporary refusal, permanent refusal.
    quiet = f"quiet-{uuid.uuid4().hex[:8]}"
    assert fwd.send("sam@sender.test", ["quiet@rules.test"], message(quiet)) == (
        250, "2.6.0 Message accepted"
    )  # fmt: skip
    with smtplib.SMTP("127.0.0.1", fwd.mx_port, timeout=60) as client:
        client.ehlo("client.sender.test")
        client.mail("sam@sender.test")
        code, text = client.rcpt("later@rules.test")
        assert code == 421, text
        # 421 closes the channel (RFC 5321 §3.8): the session does not go on.
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
    code, text = fwd.send("sam@sender.test", ["never@rules.test"], message(marker))
    assert code == 550, text
    code, text = fwd.send("sam@sender.test", ["unlisted@rules.test"], message(marker))
    assert (code, text[:5]) == (550, "5.1.1"), text
    # Dropped means dropped: a later message to dave arrives, the dropped one nowhere.
    after = f"after-{uuid.uuid4().hex[:8]}"
    assert fwd.send("sam@sender.test", ["other@rules.test"], message(after))[0] == 250
    wait_for(lambda: fwd.arrived("dave", after), "dave's copy")
    assert not any(fwd.arrived(u, quiet) for u in ("bob", "carol", "dave"))
    run_cli(fwd.data_dir, "domain", "dns-rules", "rules.test", "off")
    code, _ = fwd.send("sam@sender.test", ["hello@rules.test"], message(marker))
    assert code == 550


def test_webhook_target_gets_a_signed_json_post_and_its_failure_gives_421(
    fwd: Forwarding,
) -> None:
    fwd.hook.reset()
    marker = f"hook-{uuid.uuid4().hex[:8]}"
    code, text = fwd.send("sam@sender.test", ["hook@example.test"], message(marker))
    assert code == 250, text
    [post] = fwd.hook.requests
    assert post.verified, post.headers  # signed with `mailfort domain webhook-secret`
    assert post.path == "/in?token=t" and post.sni == "hooks.test"
    assert post.payload["subject"] == marker
    assert post.payload["envelope"] == {
        "mailFrom": "sam@sender.test",
        "rcptTo": "hook@example.test",
        "alias": "hook@example.test",
    }
    assert "spf=pass" in post.payload["authenticationResults"]
    wait_for(lambda: fwd.arrived("bob", marker), "the address target's copy")
    # The endpoint fails: the sender hears 421 and retries; the retry posts again but does
    # not send bob a second copy.
    fwd.hook.reset()
    failing = f"hookfail-{uuid.uuid4().hex[:8]}"
    fwd.hook.answer = Answer(status=500)
    code, text = fwd.send("sam@sender.test", ["hook@example.test"], message(failing))
    assert code == 421, text
    fwd.hook.answer = Answer()
    code, text = fwd.send("sam@sender.test", ["hook@example.test"], message(failing))
    assert code == 250, text
    assert [r.verified for r in fwd.hook.requests] == [True, True]
    wait_for(lambda: fwd.arrived("bob", failing), "bob's copy")
    time.sleep(1)
    assert len(fwd.arrived("bob", failing)) == 1
