"""Authentication-Results (RFC 8601) and the `authenticate` entry point, end to end over
the real DNS server."""

from __future__ import annotations

import asyncio
import gc
import warnings
from typing import Any

import authres
import pytest

from mailfort.auth.dmarc import DMARCResult
from mailfort.auth.results import (
    authenticate,
    build_header,
    claimed_authserv_id,
    remove_forged_results,
)
from mailfort.auth.spf import SPFCheck, SPFResult
from mailfort.dns import Nameserver, Resolver
from test_auth_dkim import SIGNED, UNSIGNED, _rfc_zone

OURS = "mx.mailfort.example"
CLIENT = "192.0.2.25"


def _parse(header: bytes) -> authres.AuthenticationResultsHeader:
    """An independent parser (authres) must read what we write."""
    return authres.AuthenticationResultsHeader.parse(header.decode("ascii").rstrip("\r\n"))


def _results(header: bytes) -> list[tuple[str, str, dict[str, str]]]:
    return [
        (r.method, r.result, {f"{p.type}.{p.name}": p.value for p in r.properties})
        for r in _parse(header).results
    ]


# -- removing forged fields ------------------------------------------------------------------

FORGED = (
    b"Return-Path: <a@b.example>\r\n"
    b"Authentication-Results: mx.mailfort.example; dkim=pass header.d=bank.example\r\n"
    b"Authentication-Results: MX.MAILFORT.EXAMPLE;\r\n"
    b"\tspf=pass smtp.mailfrom=bank.example;\r\n"
    b"\tdmarc=pass header.from=bank.example\r\n"
    b"Authentication-Results: (sneaky comment) mx.mailfort.example 1; none\r\n"
    b'authentication-results : "mx.mailfort.example"; arc=pass\r\n'
    b"Authentication-Results: mx.mailfort.example.evil.example; spf=pass\r\n"
    b"Authentication-Results: lists.example.org; dkim=pass header.d=d1.example\r\n"
    b"ARC-Authentication-Results: i=1; mx.mailfort.example; spf=pass\r\n"
    b"From: Joe <joe@bank.example>\r\n"
    b"Subject: hi\r\n"
    b"\r\n"
    b"Authentication-Results: mx.mailfort.example; this line is body text\r\n"
)


def test_forged_results_for_our_id_are_removed() -> None:
    cleaned, removed = remove_forged_results(FORGED, OURS)
    assert removed == 4
    assert b"dkim=pass header.d=bank.example" not in cleaned
    assert b"\tspf=pass smtp.mailfrom=bank.example" not in cleaned
    assert b"sneaky" not in cleaned and b"arc=pass\r\n" not in cleaned
    # other ADMDs' results, ARC's own results and the body are kept byte for byte
    assert b"Authentication-Results: mx.mailfort.example.evil.example; spf=pass\r\n" in cleaned
    assert (
        b"Authentication-Results: lists.example.org; dkim=pass header.d=d1.example\r\n" in cleaned
    )
    assert b"ARC-Authentication-Results: i=1; mx.mailfort.example; spf=pass\r\n" in cleaned
    assert cleaned.endswith(
        b"\r\n\r\nAuthentication-Results: mx.mailfort.example; this line is body text\r\n"
    )
    assert cleaned.startswith(
        b"Return-Path: <a@b.example>\r\nAuthentication-Results: mx.mailfort.example.evil"
    )


def test_removal_with_lf_endings_and_no_body() -> None:
    lf = FORGED.replace(b"\r\n", b"\n")
    cleaned, removed = remove_forged_results(lf, OURS)
    assert removed == 4 and b"\r" not in cleaned
    head_only = b"Authentication-Results: mx.mailfort.example; none\r\nSubject: x\r\n"
    assert remove_forged_results(head_only, OURS) == (b"Subject: x\r\n", 1)
    untouched = b"Subject: x\r\n\r\nbody\r\n"
    assert remove_forged_results(untouched, OURS) == (untouched, 0)


def test_orphan_continuation_cannot_extend_our_header() -> None:
    raw = b" ; dkim=pass header.d=bank.example\r\nFrom: a@bank.example\r\n\r\nhi\r\n"
    cleaned, removed = remove_forged_results(raw, OURS)
    assert (cleaned, removed) == (b"From: a@bank.example\r\n\r\nhi\r\n", 1)
    stamped = build_header(OURS) + cleaned
    assert stamped.startswith(b"Authentication-Results: mx.mailfort.example; none\r\nFrom:")


def test_claimed_authserv_id() -> None:
    assert claimed_authserv_id(b" Example.COM; spf=pass") == "example.com"
    assert claimed_authserv_id(b" (c (nested)) example.com 1; none") == "example.com"
    assert claimed_authserv_id(b' "quoted.example"; none') == "quoted.example"
    assert claimed_authserv_id(b" ;") is None


# -- building ------------------------------------------------------------------------------


def test_header_shape_and_escaping() -> None:
    spf = SPFResult(
        SPFCheck("permerror", "mailfrom", "x.example", "evil) injected=pass (\r\nX-Header: y"),
        None,
    )
    dmarc = DMARCResult("none", "none", "x.example", reason="no policy record")
    header = build_header(OURS, ip=CLIENT, spf=spf, dmarc=dmarc)
    assert header.startswith(b"Authentication-Results: mx.mailfort.example;\r\n\t")
    assert header.endswith(b"\r\n")
    lines = header[:-2].split(b"\r\n")
    # one field: every line after the first is a continuation, none is too long
    assert all(line.startswith(b"\t") for line in lines[1:])
    assert all(len(line) <= 140 for line in lines)
    # the hostile explanation stays inside one comment, its parentheses escaped
    assert b"(evil\\) injected=pass \\( X-Header: y)" in header
    parsed = _results(header)
    assert [(m, r) for m, r, _ in parsed] == [("spf", "permerror"), ("dmarc", "none")]
    assert parsed[0][2] == {"smtp.mailfrom": "x.example"}
    assert build_header(OURS) == b"Authentication-Results: mx.mailfort.example; none\r\n"
    with pytest.raises(ValueError):
        build_header("bad id; spf=pass")


# -- authenticate ------------------------------------------------------------------------------


def _football_zone(dmarc: str = "v=DMARC1; p=reject") -> dict[str, Any]:
    return {
        **_rfc_zone(),
        "football.example.com": [("TXT", f"v=spf1 ip4:{CLIENT} -all")],
        "_dmarc.football.example.com": [("TXT", dmarc)],
    }


async def test_authenticate_rfc8463_message(dns_server: Any) -> None:
    dns_server.set_zone(_football_zone())
    raw = b"Authentication-Results: mx.mailfort.example; dmarc=pass\r\n" + SIGNED
    verdict = await authenticate(
        raw,
        CLIENT,
        "mail.football.example.com",
        "joe@football.example.com",
        dns_server.resolver,
        OURS,
    )
    assert verdict.spf.result == "pass"
    assert [s.result for s in verdict.dkim.signatures] == ["pass", "pass"]
    assert (verdict.dmarc.result, verdict.disposition) == ("pass", "none")
    assert verdict.arc.cv == "none"
    assert not verdict.temperror
    assert verdict.removed == 1 and verdict.message == SIGNED
    assert verdict.stamped() == verdict.header + SIGNED
    parsed = _results(verdict.header)
    assert _parse(verdict.header).authserv_id == OURS
    methods = [(m, r) for m, r, _ in parsed]
    assert methods == [
        ("spf", "pass"),
        ("spf", "none"),  # HELO mail.football.example.com publishes no SPF
        ("dkim", "pass"),
        ("dkim", "pass"),
        ("dmarc", "pass"),
        ("arc", "none"),
    ]
    dkim_props = [p for m, _, p in parsed if m == "dkim"]
    assert dkim_props[0]["header.d"] == "football.example.com"
    assert dkim_props[0]["header.s"] == "brisbane"
    assert dkim_props[0]["header.a"] == "ed25519-sha256"
    assert dkim_props[0]["header.b"] == "/gCrinpc"
    assert dkim_props[1]["header.b"] == "F45dVWDf"
    assert parsed[4][2] == {"header.from": "football.example.com"}
    # the result still verifies after our header is prepended (it is not signed)
    again = await authenticate(
        verdict.stamped(),
        CLIENT,
        "mail.football.example.com",
        "joe@football.example.com",
        dns_server.resolver,
        OURS,
    )
    assert again.removed == 1 and again.dkim.result == "pass"


async def test_authenticate_spoof_is_rejected(dns_server: Any) -> None:
    dns_server.set_zone(
        {**_football_zone(), "evil.example": [("TXT", "v=spf1 ip4:203.0.113.9 -all")]}
    )
    spoof = SIGNED.replace(b"We lost", b"Send money")  # breaks both signatures
    verdict = await authenticate(
        spoof, "203.0.113.9", "mx.evil.example", "x@evil.example", dns_server.resolver, OURS
    )
    assert verdict.spf.result == "pass"  # for evil.example, which does not align
    assert verdict.dkim.result == "fail"
    assert (verdict.dmarc.result, verdict.disposition) == ("fail", "reject")
    assert ("dmarc", "fail") in [(m, r) for m, r, _ in _results(verdict.header)]
    assert b"dis=REJECT" in verdict.header


async def test_authenticate_dns_outage_is_temperror(dns_server: Any) -> None:
    zone = _football_zone()
    zone["_dmarc.football.example.com"] = ["SERVFAIL"]
    dns_server.set_zone(zone)
    verdict = await authenticate(
        UNSIGNED,
        CLIENT,
        "mail.football.example.com",
        "joe@football.example.com",
        dns_server.make_resolver(timeout=0.3),
        OURS,
    )
    assert verdict.dmarc.result == "temperror"
    assert verdict.temperror and verdict.disposition == "none"


async def test_authenticate_spf_outage_without_dmarc_is_temperror(dns_server: Any) -> None:
    dns_server.set_zone({"slow.example": ["TIMEOUT"]})
    verdict = await authenticate(
        UNSIGNED.replace(b"football.example.com>", b"slow.example>"),
        CLIENT,
        "mx.slow.example",
        "a@slow.example",
        dns_server.make_resolver(timeout=0.3),
        OURS,
    )
    assert verdict.spf.result == "temperror"
    assert verdict.temperror


async def test_authenticate_junk(dns_server: Any) -> None:
    for raw in (b"", b"garbage without headers", b"\x00\xff: \r\n\r\n"):
        verdict = await authenticate(raw, CLIENT, "h.example", "", dns_server.resolver, OURS)
        assert verdict.dmarc.result == "permerror"
        _parse(verdict.header)  # always a valid header


async def test_concurrent_authentications_use_their_own_resolvers(dns_server: Any) -> None:
    """SPF runs pyspf in threads; each check must resolve through its own resolver."""
    from dnsserver import DNSServer

    other = DNSServer()
    try:
        other.set_zone({"football.example.com": [("TXT", "v=spf1 -all")]})
        dns_server.set_zone(_football_zone())
        from mailfort.dns import Nameserver, Resolver

        other_resolver = Resolver([Nameserver("127.0.0.1", other.port)], timeout=1.0)
        runs = []
        for i in range(20):
            resolver = dns_server.resolver if i % 2 == 0 else other_resolver
            runs.append(
                authenticate(
                    SIGNED, CLIENT, "h.example", "joe@football.example.com", resolver, OURS
                )
            )
        verdicts = await asyncio.gather(*runs)
        assert [v.spf.result for v in verdicts] == ["pass", "fail"] * 10
    finally:
        other.close()


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
async def test_checks_from_the_cache_give_the_verdict_checks_over_the_network_give(
    dns_server: Any,
) -> None:
    """With a caching resolver (the service's), a message whose records are all cached is
    checked from the cache alone; one that needs a lookup falls back to the network. Both
    paths give the same verdicts, and no coroutine is left unawaited by a fallback."""
    dns_server.set_zone(
        {
            **_football_zone(),
            "other.example": [("TXT", "v=spf1 -all")],
            "_dmarc.other.example": [("TXT", "v=DMARC1; p=quarantine")],
        }
    )
    resolver = Resolver([Nameserver(dns_server.server.host, dns_server.port)], cache=True)
    helo, sender = "mail.football.example.com", "joe@football.example.com"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "never awaited" RuntimeWarning fails the test
        # SPF and the DMARC policy get cached, the DKIM keys not: the next message's
        # attempt from the cache stops at its first key, before the ARC and DMARC parts.
        unsigned = await authenticate(UNSIGNED, CLIENT, helo, sender, resolver, OURS)
        assert unsigned.dkim.result == "none"
        cold = await authenticate(SIGNED, CLIENT, helo, sender, resolver, OURS)
        asked = len(dns_server.queries)
        warm = await authenticate(SIGNED, CLIENT, helo, sender, resolver, OURS)
        assert len(dns_server.queries) == asked > 0  # nothing asked: all from the cache
        # Same client and HELO (cached), a new author domain: its DMARC policy and SPF
        # record are not cached, so this one goes over the network.
        spoofed = SIGNED.replace(b"football.example.com>", b"other.example>", 1)
        assert spoofed != SIGNED
        other = await authenticate(spoofed, CLIENT, helo, "x@other.example", resolver, OURS)
        assert len(dns_server.queries) > asked
        gc.collect()  # an unawaited coroutine warns when it is collected
    assert warm.header == cold.header and warm.dmarc == cold.dmarc
    assert (cold.dmarc.result, warm.dkim.result) == ("pass", "pass")
    assert other.spf.result == "fail" and other.dmarc.from_domain == "other.example"
    assert (other.dmarc.result, other.disposition) == ("fail", "quarantine")
