"""DMARC (RFC 7489) through the real DNS server: policy discovery, alignment, disposition."""

from __future__ import annotations

from typing import Any

import pytest

from mailfort.auth.dkim import DKIMResult, verify_dkim
from mailfort.auth.dmarc import (
    aligned,
    author_domains,
    check_dmarc,
    organizational_domain,
    parse_record,
)
from mailfort.auth.spf import SPFCheck, check_spf
from test_auth_dkim import UNSIGNED, _rsa_public_b64, sign

CLIENT = "192.0.2.10"
ATTACKER = "203.0.113.66"
NO_DKIM = DKIMResult(())


def _key(selector: str, domain: str) -> dict[str, Any]:
    return {f"{selector}._domainkey.{domain}": [("TXT", f"v=DKIM1; p={_rsa_public_b64()}")]}


def _msg(from_addr: str) -> bytes:
    return UNSIGNED.replace(b"joe@football.example.com", from_addr.encode())


def _spf(result: str, domain: str) -> SPFCheck:
    return SPFCheck(result, "mailfrom", domain, "")  # type: ignore[arg-type]


def test_organizational_domain() -> None:
    assert organizational_domain("a.b.example.com") == "example.com"
    assert organizational_domain("mail.example.co.uk") == "example.co.uk"
    assert organizational_domain("EXAMPLE.com.") == "example.com"
    assert organizational_domain("co.uk") == "co.uk"
    assert organizational_domain("user.github.io") == "user.github.io"  # private section


def test_alignment_modes() -> None:
    assert aligned("mail.example.com", "example.com", "r")
    assert not aligned("mail.example.com", "example.com", "s")
    assert aligned("Example.COM", "example.com", "s")
    assert not aligned("example.net", "example.com", "r")
    assert not aligned("a.github.io", "b.github.io", "r")


def test_record_parsing() -> None:
    rec = parse_record("v=DMARC1; p=Reject; sp=quarantine; adkim=s; pct=25; rua=mailto:a@b.example")
    assert rec is not None
    assert (rec.policy, rec.subdomain_policy, rec.adkim, rec.aspf, rec.pct) == (
        "reject",
        "quarantine",
        "s",
        "r",
        25,
    )
    assert parse_record("v=spf1 -all") is None
    assert parse_record("v=dmarc1; p=reject") is None  # the version is case-sensitive
    assert parse_record("v=DMARC1; p=bogus") is None
    # invalid p= with a report address counts as p=none (§6.6.3 step 6)
    fallback = parse_record("v=DMARC1; p=bogus; rua=mailto:r@example.com")
    assert fallback is not None and fallback.policy == "none"


async def test_reject_for_spoofed_from(dns_server: Any) -> None:
    """The attacker's own domain passes SPF, but nothing aligns with the forged From."""
    dns_server.set_zone(
        {
            "_dmarc.bank.example": [("TXT", "v=DMARC1; p=reject")],
            "evil.example": [("TXT", f"v=spf1 ip4:{ATTACKER} -all")],
        }
    )
    spf = await check_spf(dns_server.resolver, ATTACKER, "x@evil.example", "mx.evil.example")
    assert spf.result == "pass"
    res = await check_dmarc(dns_server.resolver, "bank.example", spf, NO_DKIM)
    assert (res.result, res.disposition, res.policy) == ("fail", "reject", "reject")
    assert not res.spf_aligned and not res.dkim_aligned


async def test_dkim_relaxed_versus_strict(dns_server: Any) -> None:
    signed = sign(_msg("joe@example.com"), "mail.example.com", "k")
    zone = _key("k", "mail.example.com")
    dns_server.set_zone({**zone, "_dmarc.example.com": [("TXT", "v=DMARC1; p=reject")]})
    dkim = await verify_dkim(dns_server.resolver, signed)
    assert dkim.result == "pass"
    relaxed = await check_dmarc(dns_server.resolver, "example.com", None, dkim)
    assert (relaxed.result, relaxed.disposition, relaxed.dkim_aligned) == ("pass", "none", True)

    dns_server.set_zone({**zone, "_dmarc.example.com": [("TXT", "v=DMARC1; p=reject; adkim=s")]})
    strict = await check_dmarc(dns_server.resolver, "example.com", None, dkim)
    assert (strict.result, strict.disposition) == ("fail", "reject")


async def test_spf_relaxed_versus_strict(dns_server: Any) -> None:
    zone = {"bounce.example.org": [("TXT", f"v=spf1 ip4:{CLIENT} -all")]}
    dns_server.set_zone({**zone, "_dmarc.example.org": [("TXT", "v=DMARC1; p=quarantine")]})
    spf = await check_spf(dns_server.resolver, CLIENT, "b@bounce.example.org", "mx.example.org")
    relaxed = await check_dmarc(dns_server.resolver, "example.org", spf, NO_DKIM)
    assert (relaxed.result, relaxed.spf_aligned) == ("pass", True)

    dns_server.set_zone({**zone, "_dmarc.example.org": [("TXT", "v=DMARC1; p=quarantine; aspf=s")]})
    strict = await check_dmarc(dns_server.resolver, "example.org", spf, NO_DKIM)
    assert (strict.result, strict.disposition) == ("fail", "quarantine")


async def test_org_domain_fallback_uses_sp(dns_server: Any) -> None:
    dns_server.set_zone({"_dmarc.example.net": [("TXT", "v=DMARC1; p=reject; sp=quarantine")]})
    res = await check_dmarc(dns_server.resolver, "news.mail.example.net", None, NO_DKIM)
    assert (res.result, res.policy_domain, res.policy, res.disposition) == (
        "fail",
        "example.net",
        "quarantine",
        "quarantine",
    )
    asked = [q[0] for q in dns_server.queries if q[1] == "TXT"]
    assert asked[:2] == ["_dmarc.news.mail.example.net", "_dmarc.example.net"]

    # at the organizational domain itself p= applies; without sp= subdomains get p= too
    own = await check_dmarc(dns_server.resolver, "example.net", None, NO_DKIM)
    assert own.disposition == "reject"
    dns_server.set_zone({"_dmarc.example.net": [("TXT", "v=DMARC1; p=reject")]})
    sub = await check_dmarc(dns_server.resolver, "a.example.net", None, NO_DKIM)
    assert sub.disposition == "reject"


async def test_record_at_from_domain_wins(dns_server: Any) -> None:
    dns_server.set_zone(
        {
            "_dmarc.shop.example.net": [("TXT", "v=DMARC1; p=none")],
            "_dmarc.example.net": [("TXT", "v=DMARC1; p=reject")],
        }
    )
    res = await check_dmarc(dns_server.resolver, "shop.example.net", None, NO_DKIM)
    assert (res.result, res.disposition, res.policy_domain) == ("fail", "none", "shop.example.net")


async def test_missing_record_is_none(dns_server: Any) -> None:
    dns_server.set_zone({"example.info": [("TXT", "v=spf1 -all")]})
    res = await check_dmarc(dns_server.resolver, "example.info", None, NO_DKIM)
    assert (res.result, res.disposition) == ("none", "none")


async def test_non_dmarc_and_duplicate_records(dns_server: Any) -> None:
    dns_server.set_zone(
        {
            "_dmarc.one.example": [
                ("TXT", "some verification token"),
                ("TXT", "v=DMARC1; p=reject"),
            ],
            "_dmarc.two.example": [("TXT", "v=DMARC1; p=reject"), ("TXT", "v=DMARC1; p=none")],
        }
    )
    one = await check_dmarc(dns_server.resolver, "one.example", None, NO_DKIM)
    assert one.disposition == "reject"
    two = await check_dmarc(dns_server.resolver, "two.example", None, NO_DKIM)
    assert two.result == "none"  # §6.6.3 step 5: several records -> no DMARC


@pytest.mark.parametrize("failure", ["SERVFAIL", "TIMEOUT"])
async def test_dns_failure_is_temperror(dns_server: Any, failure: str) -> None:
    dns_server.set_zone({"_dmarc.flaky.example": [failure]})
    resolver = dns_server.make_resolver(timeout=0.3)
    res = await check_dmarc(resolver, "flaky.example", None, NO_DKIM)
    assert (res.result, res.disposition) == ("temperror", "none")
    # the same when only the organizational-domain lookup fails
    dns_server.set_zone({"_dmarc.flaky.example": [failure]})
    sub = await check_dmarc(resolver, "a.flaky.example", None, NO_DKIM)
    assert sub.result == "temperror"


async def test_aligned_temperror_defers_instead_of_failing(dns_server: Any) -> None:
    dns_server.set_zone({"_dmarc.example.com": [("TXT", "v=DMARC1; p=reject")]})
    res = await check_dmarc(
        dns_server.resolver, "example.com", _spf("temperror", "example.com"), NO_DKIM
    )
    assert (res.result, res.disposition) == ("temperror", "none")
    other = await check_dmarc(
        dns_server.resolver, "example.com", _spf("temperror", "elsewhere.example"), NO_DKIM
    )
    assert other.disposition == "reject"


async def test_pct_sampling(dns_server: Any) -> None:
    dns_server.set_zone({"_dmarc.example.com": [("TXT", "v=DMARC1; p=reject; pct=20")]})
    hit = await check_dmarc(dns_server.resolver, "example.com", None, NO_DKIM, sample=lambda: 0.1)
    assert (hit.disposition, hit.sampled_out) == ("reject", False)
    miss = await check_dmarc(dns_server.resolver, "example.com", None, NO_DKIM, sample=lambda: 0.5)
    assert (miss.disposition, miss.sampled_out) == ("quarantine", True)
    dns_server.set_zone({"_dmarc.example.com": [("TXT", "v=DMARC1; p=quarantine; pct=0")]})
    none = await check_dmarc(dns_server.resolver, "example.com", None, NO_DKIM, sample=lambda: 0.0)
    assert none.disposition == "none"


async def test_several_author_domains_take_the_strictest(dns_server: Any) -> None:
    dns_server.set_zone(
        {
            "_dmarc.a.example": [("TXT", "v=DMARC1; p=quarantine")],
            "_dmarc.b.example": [("TXT", "v=DMARC1; p=reject")],
        }
    )
    res = await check_dmarc(dns_server.resolver, ["a.example", "b.example"], None, NO_DKIM)
    assert (res.from_domain, res.disposition) == ("b.example", "reject")


def test_author_domains() -> None:
    headers = [
        (b"To", b" x@y.example\r\n"),
        (b"From", b' "Joe, Jr." <Joe@Example.COM>, other@b.example\r\n'),
    ]
    assert author_domains(headers) == ["example.com", "b.example"]
    assert author_domains([(b"From", b" undisclosed-recipients:;\r\n")]) is None
    assert author_domains([(b"Subject", b" hi\r\n")]) is None
    assert author_domains([(b"From", b" <<<@@@>>>\r\n")]) is None
