"""DKIM verification (RFC 6376, RFC 8463) through the real DNS server."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization

from mailfort.auth.dkim import parse_key_record, verify_dkim

from dnsserver import zone_from_text

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"
RFC8463 = CORPORA / "dkim-rfc8463"
SIGNED = (RFC8463 / "signed.eml").read_bytes()
UNSIGNED = (RFC8463 / "unsigned.eml").read_bytes()
RSA_PEM = (RFC8463 / "rsa-1024.pem").read_bytes()
ED_SEED = (RFC8463 / "ed25519.seed.b64").read_bytes().strip()


def _rfc_zone() -> dict[str, Any]:
    return zone_from_text((RFC8463 / "dns.txt").read_text())


def _rsa_public_b64() -> str:
    key = serialization.load_pem_private_key(RSA_PEM, password=None)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def _ed_public_b64() -> str:
    import nacl.signing

    return base64.b64encode(
        bytes(nacl.signing.SigningKey(base64.b64decode(ED_SEED)).verify_key)
    ).decode()


def sign(message: bytes, domain: str, selector: str, algorithm: str = "rsa", **kw: Any) -> bytes:
    if algorithm == "rsa":
        header = dkim.sign(message, selector.encode(), domain.encode(), RSA_PEM, **kw)
    else:
        header = dkim.sign(
            message,
            selector.encode(),
            domain.encode(),
            ED_SEED,
            signature_algorithm=b"ed25519-sha256",
            **kw,
        )
    return bytes(header) + message


async def test_rfc8463_both_signatures_pass(dns_server: Any) -> None:
    dns_server.set_zone(_rfc_zone())
    result = await verify_dkim(dns_server.resolver, SIGNED)
    assert result.result == "pass"
    got = [(s.result, s.algorithm, s.domain, s.selector, s.key_bits) for s in result.signatures]
    assert got == [
        ("pass", "ed25519-sha256", "football.example.com", "brisbane", 256),
        ("pass", "rsa-sha256", "football.example.com", "test", 1024),
    ]
    assert [s.header_b for s in result.signatures] == ["/gCrinpc", "F45dVWDf"]
    assert result.passing_domains() == ["football.example.com"] * 2


async def test_rfc8463_modified_body_fails(dns_server: Any) -> None:
    dns_server.set_zone(_rfc_zone())
    result = await verify_dkim(dns_server.resolver, SIGNED.replace(b"We lost", b"We won"))
    assert [s.result for s in result.signatures] == ["fail", "fail"]
    assert all("body hash" in s.reason for s in result.signatures)
    assert result.result == "fail"


async def test_rfc8463_modified_header_fails(dns_server: Any) -> None:
    dns_server.set_zone(_rfc_zone())
    tampered = SIGNED.replace(b"Subject: Is dinner ready?", b"Subject: Is lunch ready?")
    result = await verify_dkim(dns_server.resolver, tampered)
    assert [s.result for s in result.signatures] == ["fail", "fail"]
    assert all(s.reason == "signature did not verify" for s in result.signatures)


async def test_lf_line_endings_and_relaxed_whitespace(dns_server: Any) -> None:
    dns_server.set_zone(_rfc_zone())
    lf = SIGNED.replace(b"\r\n", b"\n")
    assert (await verify_dkim(dns_server.resolver, lf)).result == "pass"
    # relaxed/relaxed tolerates added trailing whitespace and a missing final CRLF
    loose = SIGNED.replace(b"Hi.\r\n", b"Hi.   \r\n").rstrip(b"\r\n")
    result = await verify_dkim(dns_server.resolver, loose)
    assert [s.result for s in result.signatures] == ["pass", "pass"]


async def test_unsigned_is_none(dns_server: Any) -> None:
    result = await verify_dkim(dns_server.resolver, UNSIGNED)
    assert result.result == "none" and result.signatures == ()


async def test_key_problems(dns_server: Any) -> None:
    msg = UNSIGNED
    signed = sign(msg, "a.example", "nokey")
    signed = sign(signed, "a.example", "revoked")
    signed = sign(signed, "a.example", "slow")
    signed = sign(signed, "a.example", "wrongtype")
    signed = sign(signed, "a.example", "good")
    dns_server.set_zone(
        {
            "revoked._domainkey.a.example": [("TXT", "v=DKIM1; k=rsa; p=")],
            "slow._domainkey.a.example": ["TIMEOUT"],
            "wrongtype._domainkey.a.example": [
                ("TXT", f"v=DKIM1; k=ed25519; p={_ed_public_b64()}")
            ],
            "good._domainkey.a.example": [("TXT", f"v=DKIM1; k=rsa; p={_rsa_public_b64()}")],
        }
    )
    result = await verify_dkim(dns_server.make_resolver(timeout=0.3), signed)
    by_selector = {s.selector: (s.result, s.reason) for s in result.signatures}
    assert by_selector["nokey"] == ("permerror", "no key for signature")
    assert by_selector["revoked"] == ("permerror", "key revoked (empty p=)")
    assert by_selector["slow"] == ("temperror", "key lookup failed temporarily")
    assert by_selector["wrongtype"][0] == "permerror"
    assert by_selector["good"] == ("pass", "")
    assert result.result == "pass"
    # signatures are reported in header order (the last added is on top)
    assert [s.selector for s in result.signatures] == [
        "good",
        "wrongtype",
        "slow",
        "revoked",
        "nokey",
    ]


async def test_ed25519_and_rsa_of_our_own(dns_server: Any) -> None:
    signed = sign(UNSIGNED, "b.example", "ed", "ed25519")
    signed = sign(signed, "b.example", "rsa", "rsa", canonicalize=(b"simple", b"simple"))
    dns_server.set_zone(
        {
            "ed._domainkey.b.example": [("TXT", f"v=DKIM1; k=ed25519; p={_ed_public_b64()}")],
            # long key records arrive split into several strings
            "rsa._domainkey.b.example": [("TXT", ["v=DKIM1; k=rsa; ", f"p={_rsa_public_b64()}"])],
        }
    )
    result = await verify_dkim(dns_server.resolver, signed)
    assert [(s.selector, s.result) for s in result.signatures] == [("rsa", "pass"), ("ed", "pass")]


async def test_rsa_sha1_is_policy(dns_server: Any) -> None:
    signed = sign(UNSIGNED, "c.example", "old", signature_algorithm=b"rsa-sha1")
    dns_server.set_zone({"old._domainkey.c.example": [("TXT", f"v=DKIM1; p={_rsa_public_b64()}")]})
    (sig,) = (await verify_dkim(dns_server.resolver, signed)).signatures
    assert sig.result == "policy" and "RFC 8301" in sig.reason


async def test_from_not_signed_is_permerror(dns_server: Any) -> None:
    dns_server.set_zone(_rfc_zone())
    no_from = re.sub(rb"from : ", b"", SIGNED, flags=re.IGNORECASE)
    result = await verify_dkim(dns_server.resolver, no_from)
    assert {(s.result, s.reason) for s in result.signatures} == {
        ("permerror", "From field not signed")
    }


async def test_added_second_from_fails(dns_server: Any) -> None:
    """A From field added above a valid signature's From must not pass (it would be the one
    a reader sees)."""
    signed = sign(UNSIGNED, "d.example", "k", include_headers=[b"from", b"to", b"subject"])
    dns_server.set_zone({"k._domainkey.d.example": [("TXT", f"v=DKIM1; p={_rsa_public_b64()}")]})
    assert (await verify_dkim(dns_server.resolver, signed)).result == "pass"
    forged = signed.replace(b"From: Joe", b"From: Evil <evil@evil.example>\r\nFrom: Joe")
    assert (await verify_dkim(dns_server.resolver, forged)).result == "fail"


async def test_key_t_s_flag_rejects_subdomain_identity(dns_server: Any) -> None:
    signed = sign(UNSIGNED, "e.example", "k", identity=b"@sub.e.example")
    dns_server.set_zone(
        {"k._domainkey.e.example": [("TXT", f"v=DKIM1; t=s; p={_rsa_public_b64()}")]}
    )
    (sig,) = (await verify_dkim(dns_server.resolver, signed)).signatures
    assert sig.result == "permerror" and sig.identity == "@sub.e.example"


async def test_large_message_is_verified_in_thread(dns_server: Any) -> None:
    big = UNSIGNED + b"x" * 200 + (b"0123456789" * 8 + b"\r\n") * 2000
    signed = sign(big, "f.example", "k")
    dns_server.set_zone({"k._domainkey.f.example": [("TXT", f"v=DKIM1; p={_rsa_public_b64()}")]})
    assert (await verify_dkim(dns_server.resolver, signed)).result == "pass"


def test_key_record_parsing() -> None:
    assert parse_key_record(b"v=DKIM2; p=abc").result == "permerror"  # type: ignore[union-attr]
    assert parse_key_record(b"v=DKIM1; s=tlsrpt; p=" + _rsa_public_b64().encode()).result == (  # type: ignore[union-attr]
        "permerror"
    )
    key = parse_key_record(b"v=DKIM1; h=sha1:sha256; t=y; p=" + _rsa_public_b64().encode())
    assert key.kind == "rsa" and key.bits == 1024 and "y" in key.flags  # type: ignore[union-attr]


@pytest.mark.parametrize("junk", [b"", b"\r\n", b"no header here\r\n\r\nbody\r\n"])
async def test_junk_does_not_crash(dns_server: Any, junk: bytes) -> None:
    result = await verify_dkim(dns_server.resolver, junk)
    assert result.result in ("none", "permerror")


async def test_empty_length_tag_is_permerror(dns_server: Any) -> None:
    """dkimpy's field check accepts an empty l=; it must not crash the verifier."""
    signed = sign(UNSIGNED, "g.example", "k").replace(b"v=1;", b"v=1; l=;", 1)
    dns_server.set_zone({"k._domainkey.g.example": [("TXT", f"v=DKIM1; p={_rsa_public_b64()}")]})
    (sig,) = (await verify_dkim(dns_server.resolver, signed)).signatures
    assert (sig.result, sig.reason) == ("permerror", "l= is not a number")
