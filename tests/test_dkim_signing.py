"""DKIM keys per domain, the DNS records `mailfort domain dns` prints, and dual signing.

The signatures are checked by Mail::DKIM (Debian libmail-dkim-perl, an implementation
independent of ours) and by our own verifier, against the records exactly as printed,
served by the loopback DNS server.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

import pytest

from mailfort.auth.dkim import verify_dkim
from mailfort.auth.dkimsign import sign
from mailfort.directory.service import Directory
from mailfort.keys.server import ServerKey

from conftest import require_tool, run_cli
from conftest_dns import DNSFixture

MESSAGE = (
    b"From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\nSubject: signed\r\n"
    b"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\nMessage-ID: <s1@example.test>\r\n\r\n"
    b"Hello,\r\n\r\n  with  some   spaces and a trailing line   \r\n\r\n\r\n"
)

PERL_VERIFY = r"""
use Mail::DKIM::Verifier; use Net::DNS;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $ARGV[0]));
my $v = Mail::DKIM::Verifier->new();
binmode STDIN; while (<STDIN>) { $v->PRINT($_) } $v->CLOSE;
foreach my $s ($v->signatures) { print $s->algorithm, " ", $s->result, "\n" }
"""


def zone_from_dns_output(text: str) -> dict[str, list[tuple[str, object]]]:
    """Parse `mailfort domain dns` lines back into zone entries for the DNS server."""
    zone: dict[str, list[tuple[str, object]]] = {}
    for line in text.splitlines():
        name, _ttl, _cls, rtype, value = line.split(" ", 4)
        if rtype == "TXT":
            data: object = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', value))
        elif rtype == "MX":
            pref, host = value.split()
            data = (int(pref), host.rstrip("."))
        else:
            continue
        zone.setdefault(name.rstrip("."), []).append((rtype, data))
    return zone


def test_domain_keys_dns_records_and_rotation(data_dir: Path) -> None:
    run_cli(data_dir, "domain", "add", "example.test")
    out = run_cli(data_dir, "domain", "dns", "example.test").stdout
    lines = out.splitlines()
    assert 'example.test. 3600 IN TXT "v=spf1 mx -all"' in lines
    dkim = [line for line in lines if "._domainkey." in line]
    assert len(dkim) == 2 and "k=ed25519" in dkim[0] and "k=rsa" in dkim[1]
    for prefix in (
        "_dmarc.",
        "_mta-sts.",
        "mta-sts.",
        "_smtp._tls.",
        "_submissions._tcp.",
        "_imaps._tcp.",
    ):
        assert any(line.startswith(prefix + "example.test.") for line in lines), prefix
    assert all(len(s) <= 255 for line in dkim for s in re.findall(r'"([^"]*)"', line))
    rotated = run_cli(data_dir, "domain", "dkim-rotate", "example.test").stdout.splitlines()
    assert [r.split("\t")[2] for r in rotated] == ["retired", "retired", "active", "active"]
    after = run_cli(data_dir, "domain", "dns", "example.test").stdout
    assert (
        sum("._domainkey." in line for line in after.splitlines()) == 4
    )  # old ones stay published
    # The private keys are sealed: the directory file alone holds no PEM.
    assert b"PRIVATE KEY" not in (data_dir / "directory.sqlite3").read_bytes()


def test_dual_signatures_verify_independently(data_dir: Path, dns_server: DNSFixture) -> None:
    perl = require_tool("perl")
    require_tool("dkimproxy-verify")  # ships with Debian's libmail-dkim-perl
    run_cli(data_dir, "domain", "add", "example.test")
    dns_server.set_zone(
        zone_from_dns_output(run_cli(data_dir, "domain", "dns", "example.test").stdout)
    )
    directory = Directory.open(
        f"sqlite:///{data_dir / 'directory.sqlite3'}", ServerKey.load_or_create(data_dir)
    )
    keys = directory.signing_keys("example.test")
    directory.close()
    assert [k.algorithm for k in keys] == ["ed25519", "rsa"]
    signed = sign(MESSAGE, keys)
    assert signed.count(b"DKIM-Signature:") == 2 and signed.endswith(MESSAGE)

    ours = asyncio.run(verify_dkim(dns_server.resolver, signed))
    assert [(s.algorithm, s.result) for s in ours.signatures] == [
        ("ed25519-sha256", "pass"),
        ("rsa-sha256", "pass"),
    ]
    independent = subprocess.run(
        [perl, "-e", PERL_VERIFY, str(dns_server.port)],
        input=signed,
        capture_output=True,
        check=True,
    ).stdout.decode()
    # Debian's Mail::DKIM 1.20230212 checks RSA only (stack-notes): it must pass that one.
    assert "rsa-sha256 pass" in independent.splitlines(), independent
    tampered = signed.replace(b"with  some", b"with  more")
    again = subprocess.run(
        [perl, "-e", PERL_VERIFY, str(dns_server.port)],
        input=tampered,
        capture_output=True,
        check=True,
    ).stdout.decode()
    assert "rsa-sha256 fail" in again.splitlines(), again


def test_without_the_server_key_nothing_signs(data_dir: Path) -> None:
    run_cli(data_dir, "domain", "add", "example.test")
    directory = Directory.open(f"sqlite:///{data_dir / 'directory.sqlite3'}")
    with pytest.raises(Exception, match="server key"):
        directory.signing_keys("example.test")
    other = Directory.open(f"sqlite:///{data_dir / 'directory.sqlite3'}", ServerKey(b"\x01" * 32))
    with pytest.raises(ValueError, match="another server key"):
        other.signing_keys("example.test")
    directory.close()
    other.close()
