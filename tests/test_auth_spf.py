"""SPF through the real DNS path: the RFC 7208 conformance suite and API behaviour."""

from __future__ import annotations

import asyncio
import contextvars
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailfort.auth import spf
from mailfort.auth.spf import DEFAULT_EXPLANATIONS, check_spf
from mailfort.dns import Nameserver, NotCached, Resolver

from dnsserver import DNSServer

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"
SUITE = CORPORA / "spf" / "rfc7208-tests.yml"


def _zone(zonedata: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Suite zone data -> DNSServer entries.

    The suite writes policies as type SPF and expects drivers to publish them as TXT too,
    unless the name has its own TXT entries (that is how it tests record selection).
    "TXT: NONE" means "publish no TXT here" (so no copy of the SPF entries either).
    A TXT record with no strings at all (``SPF: []``, "null text") is not valid wire data:
    dnspython rejects the whole answer as FORMERR. It is published as one empty string,
    which keeps the case's point (a TXT record that is not an SPF record).
    """
    zone: dict[str, list[Any]] = {}
    for name, entries in zonedata.items():
        out: list[Any] = []
        has_txt = any(isinstance(e, dict) and "TXT" in e for e in entries)
        for entry in entries:
            if isinstance(entry, str):
                out.append(entry)  # TIMEOUT
                continue
            ((rtype, value),) = entry.items()
            if value == []:
                value = [""]
            if value == "NONE":
                continue  # only suppresses the generated TXT copy (has_txt is set)
            if rtype == "SPF":
                if not has_txt:
                    out.append(("TXT", value))
            else:
                out.append((rtype, value))
        zone[name] = out
    return zone


def _cases() -> list[Any]:
    cases = []
    for scenario in yaml.safe_load_all(SUITE.read_text()):
        zone = _zone(scenario["zonedata"])
        for name, case in scenario["tests"].items():
            cases.append(pytest.param(zone, case, id=name))
    return cases


CASES = _cases()


def test_suite_size() -> None:
    assert len(CASES) == 203


@pytest.mark.parametrize(("zone", "case"), CASES)
async def test_rfc7208_suite(dns_server: Any, zone: dict[str, Any], case: dict[str, Any]) -> None:
    dns_server.set_zone(zone)
    resolver = dns_server.make_resolver(timeout=0.5)
    res = await check_spf(resolver, case["host"], case["mailfrom"], case["helo"], check_helo=False)
    expected = case["result"]
    accepted = expected if isinstance(expected, list) else [expected]
    assert res.result in accepted, (res, case.get("description"))
    if "explanation" in case:
        want = case["explanation"]
        if want == "DEFAULT":
            want = DEFAULT_EXPLANATIONS[res.result]
        assert res.explanation == want


def _inline_attempt(resolver: Resolver, case: dict[str, Any]) -> tuple[spf.SPFCheck | None, bool]:
    """What check_spf's inline path makes of a case: (outcome, whether a record was missing)."""
    sender = case["mailfrom"]
    probe = spf._CacheOnly(resolver)
    identity: spf.Identity = "mailfrom" if sender else "helo"
    try:
        outcome = contextvars.Context().run(
            spf._run_check, probe, case["host"], sender, case["helo"], "unknown", identity
        )
    except spf._WouldBlock:
        outcome = None
    return outcome, probe.missed


@pytest.mark.parametrize(("zone", "case"), CASES)
async def test_rfc7208_suite_through_the_cache(
    dns_server: Any, zone: dict[str, Any], case: dict[str, Any]
) -> None:
    """With the service's caching resolver a check runs inline on the loop once its records
    are cached: whenever that path completes, it gives what the thread path gave, and a
    second check_spf (inline or not) agrees with the first."""
    dns_server.set_zone(zone)
    resolver = Resolver([Nameserver(dns_server.server.host, dns_server.port)], 0.5, cache=True)
    first = await check_spf(
        resolver, case["host"], case["mailfrom"], case["helo"], check_helo=False
    )
    outcome, missed = _inline_attempt(resolver, case)
    if not missed:
        assert outcome == first.mailfrom
    again = await check_spf(
        resolver, case["host"], case["mailfrom"], case["helo"], check_helo=False
    )
    assert again == first


async def test_cached_checks_run_inline(dns_server: Any) -> None:
    dns_server.set_zone(
        {
            "sender.test": [("TXT", "v=spf1 a:mta.sender.test include:inc.test -all")],
            "inc.test": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
            "mta.sender.test": [("A", "198.51.100.7")],
        }
    )
    resolver = Resolver([Nameserver(dns_server.server.host, dns_server.port)], 1.0, cache=True)
    case = {"host": "192.0.2.9", "mailfrom": "a@sender.test", "helo": "mta.sender.test"}
    # Cold cache: the inline attempt gives up at the first lookup.
    outcome, missed = _inline_attempt(resolver, case)
    assert missed and outcome is None
    first = await check_spf(resolver, case["host"], case["mailfrom"], case["helo"])
    assert first.result == "pass"
    asked = len(dns_server.queries)
    outcome, missed = _inline_attempt(resolver, case)
    assert not missed and outcome == first.mailfrom
    assert await check_spf(resolver, case["host"], case["mailfrom"], case["helo"]) == first
    assert len(dns_server.queries) == asked  # nothing went to the server


async def test_cache_only_answers_match_the_resolver(dns_server: Any) -> None:
    """query_cached (SPF's inline path, and the service's cache hits) answers exactly as
    query_sync does once a name is cached: records, no records of the type, no name."""
    dns_server.set_zone(
        {
            "sender.test": [("TXT", "v=spf1 -all"), ("A", "192.0.2.1")],
            "empty.test": [("A", "192.0.2.2")],
        }
    )
    resolver = Resolver([Nameserver(dns_server.server.host, dns_server.port)], 1.0, cache=True)
    names = [("sender.test", "TXT"), ("sender.test", "A"), ("empty.test", "TXT")]
    names += [("missing.test", "TXT"), ("a..b", "TXT")]
    for name, rtype in names[:3]:
        with pytest.raises(NotCached):
            resolver.query_cached(name, rtype)
    for name, rtype in names:
        fresh = resolver.query_sync(name, rtype)
        try:
            cached = resolver.query_cached(name, rtype)
        except NotCached:
            # Only a denial without a cacheable TTL (no SOA in the test zone) may miss.
            assert fresh == []
            continue
        assert [r.to_text() for r in cached] == [r.to_text() for r in fresh]
        assert [r.to_text() for r in await resolver.query(name, rtype)] == [
            r.to_text() for r in fresh
        ]
    uncached = Resolver([Nameserver(dns_server.server.host, dns_server.port)], 1.0)
    with pytest.raises(NotCached):
        uncached.query_cached("sender.test", "TXT")


async def test_repeated_checks_follow_a_policy_change_once_its_ttl_ends() -> None:
    """Checks of one sender through one server are remembered, but only as long as the DNS
    answers they used: a domain that tightens its policy is obeyed when its TTL ends."""
    server = DNSServer(ttl=1)
    try:
        server.set_zone({"sender.test": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")]})
        resolver = Resolver([Nameserver(server.host, server.port)], 1.0, cache=True)
        first = await check_spf(resolver, "192.0.2.9", "a@sender.test", "mta.sender.test")
        assert first.result == "pass"
        asked = len(server.queries)
        again = await check_spf(resolver, "192.0.2.9", "a@sender.test", "mta.sender.test")
        assert again == first and len(server.queries) == asked  # answered from the cache
        # Another sender address or client is its own check, with the same records.
        other = await check_spf(resolver, "198.51.100.1", "a@sender.test", "mta.sender.test")
        assert other.result == "fail"
        server.set_zone({"sender.test": [("TXT", "v=spf1 -all")]})
        await asyncio.sleep(1.2)  # the 1 s TTL of the first answer ends
        later = await check_spf(resolver, "192.0.2.9", "a@sender.test", "mta.sender.test")
        assert later.result == "fail"
    finally:
        server.close()
