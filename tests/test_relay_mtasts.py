"""MTA-STS (RFC 8461): parsing, MX matching, and discovery + fetch + cache through the
loopback DNS server and a real HTTPS server with a test CA."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailfort.relay.mtasts import (
    MAX_AGE_LIMIT,
    MTASTS,
    CachedPolicy,
    MemoryPolicyCache,
    Mode,
    PolicyError,
    SQLitePolicyCache,
    mx_allowed,
    parse_policy,
    parse_record,
)
from mailfort.relay.tlsrpt import PolicyType, ResultType
from test_relay_support import NOW, PKI, Canned, HTTPSServer

from conftest_dns import DNSFixture
from dnsserver import Entry

DOMAIN = "example.test"
POLICY_PATH = "/.well-known/mta-sts.txt"
GOOD_POLICY = b"version: STSv1\r\nmode: enforce\r\nmx: mx1.example.test\r\nmx: *.mail.example.test\r\nmax_age: 86400\r\n"


# -- parsing ----------------------------------------------------------------------------


def test_record_parses() -> None:
    assert parse_record("v=STSv1; id=20160831085700Z;").id == "20160831085700Z"
    assert parse_record("v=STSv1;id=abc").id == "abc"
    rec = parse_record("v=STSv1 ;\tid=abc ; ext_1=va:lue")
    assert rec.id == "abc" and rec.extensions == (("ext_1", "va:lue"),)
    assert parse_record("v=STSv1; id=first; id=second").id == "first"


@pytest.mark.parametrize(
    "txt",
    [
        "v=STSv1",  # no id
        "v=STSv1;",
        "v=STSv2; id=abc",
        "id=abc; v=STSv1",
        "v=STSv1; id=",
        "v=STSv1; id=" + "a" * 33,
        "v=STSv1; id=ab-c",
        "v=STSv1; id=abc; ; x=y",
        "v=STSv1; id=abc; bad",
        "v=STSv1; id=abc; x=a=b",
        "v=sTSv1; id=abc",
    ],
)
def test_record_rejects(txt: str) -> None:
    with pytest.raises(PolicyError):
        parse_record(txt)


def test_policy_parses_crlf_and_lf() -> None:
    for body in (GOOD_POLICY.decode(), GOOD_POLICY.decode().replace("\r\n", "\n")):
        policy = parse_policy(body)
        assert policy.mode is Mode.ENFORCE
        assert policy.max_age == 86400
        assert policy.mx == ("mx1.example.test", "*.mail.example.test")
        assert policy.lines[0] == "version: STSv1"


def test_policy_details() -> None:
    # No trailing newline; tabs after the colon; the first mode/max_age wins (§3.2);
    # unknown fields are extensions; upper-case MX names are folded.
    policy = parse_policy(
        "version: STSv1\nmode:\ttesting\nmode: enforce\nmax_age:604800\nmax_age: 1\n"
        "mx: MX.Example.TEST\nfoo_bar: any value here"
    )
    assert policy.mode is Mode.TESTING
    assert policy.max_age == 604800
    assert policy.mx == ("mx.example.test",)
    assert policy.extensions == (("foo_bar", "any value here"),)
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 0\n").mx == ()
    assert parse_policy(GOOD_POLICY.decode() + "\n\n").max_age == 86400
    assert (
        parse_policy("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 9999999999\n").max_age
        == MAX_AGE_LIMIT
    )


@pytest.mark.parametrize(
    "body",
    [
        "",
        "mode: enforce\nmx: a.test\nmax_age: 1\n",  # no version
        "version: STSv1\nmx: a.test\nmax_age: 1\n",  # no mode
        "version: STSv1\nmode: enforce\nmx: a.test\n",  # no max_age
        "version: STSv1\nmode: enforce\nmax_age: 1\n",  # no mx
        "version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n",
        "version: STSv1\nmode: Enforce\nmx: a.test\nmax_age: 1\n",
        "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 12345678901\n",
        "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n",
        "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1d\n",
        "version: STSv1\nmode: enforce\nmx: *.*.a.test\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmx: *a.test\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmx: a..test\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmx: -a.test\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmx: mx.bücher.test\nmax_age: 1\n",  # U-label
        "version: STSv1\nmode: enforce\nmx: a.test b.test\nmax_age: 1\n",
        "version: STSv1\n\nmode: enforce\nmx: a.test\nmax_age: 1\n",  # blank line inside
        "version: STSv1\r\nmode: enforce\rmx: a.test\nmax_age: 1\n",  # bare CR
        " version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1\n",
        "version STSv1\nmode: enforce\nmx: a.test\nmax_age: 1\n",
        "<html><body>version: STSv1</body></html>\n",
    ],
)
def test_policy_rejects(body: str) -> None:
    with pytest.raises(PolicyError):
        parse_policy(body)


def test_mx_matching() -> None:
    policy = parse_policy(GOOD_POLICY.decode())
    assert mx_allowed(policy, "mx1.example.test")
    assert mx_allowed(policy, "MX1.Example.Test.")
    assert mx_allowed(policy, "a.mail.example.test")
    assert not mx_allowed(policy, "mail.example.test")  # the wildcard needs one label
    assert not mx_allowed(policy, "a.b.mail.example.test")  # and covers only one
    assert not mx_allowed(policy, "mx2.example.test")
    assert not mx_allowed(policy, "mx1.example.test.evil.test")
    assert not mx_allowed(policy, "xmx1.example.test")


# -- discovery, fetch and cache over real DNS + HTTPS -----------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def _https(pki: PKI) -> Iterator[HTTPSServer]:
    server = HTTPSServer(
        pki.server_context(pki.root.issue(["mta-sts.example.test"]), "policy-host")
    )
    yield server
    server.close()


@pytest.fixture
def https(_https: HTTPSServer, pki: PKI) -> Iterator[HTTPSServer]:
    _https.context = pki.server_context(pki.root.issue(["mta-sts.example.test"]), "policy-host")
    _https.routes.clear()
    _https.requests.clear()
    _https.route(POLICY_PATH, Canned(body=GOOD_POLICY))
    yield _https


def zone(policy_id: str = "id1") -> dict[str, list[Entry]]:
    return {
        f"_mta-sts.{DOMAIN}": [("TXT", f"v=STSv1; id={policy_id};")],
        f"mta-sts.{DOMAIN}": [("A", "127.0.0.1")],
    }


def make(dns_server: DNSFixture, pki: PKI, https: HTTPSServer, **kw: object) -> MTASTS:
    return MTASTS(
        dns_server.resolver,
        ca_file=pki.ca_file,
        port=https.port,
        timeout=3.0,
        **kw,  # type: ignore[arg-type]
    )


async def test_fetch_and_cache(dns_server: DNSFixture, pki: PKI, https: HTTPSServer) -> None:
    dns_server.set_zone(zone())
    sts = make(dns_server, pki, https)
    first = await sts.policy_for(DOMAIN)
    assert first.applies and first.mode is Mode.ENFORCE and not first.from_cache
    assert first.policy_id == "id1" and first.error is None
    assert len(https.requests) == 1
    seen = https.requests[0]
    assert seen.method == "GET" and seen.path == POLICY_PATH
    assert seen.sni == "mta-sts.example.test"  # connected to the resolved address, SNI on the name
    assert seen.headers["host"] == f"mta-sts.example.test:{https.port}"
    second = await sts.policy_for(DOMAIN.upper() + ".")
    assert second.from_cache and second.policy == first.policy
    assert len(https.requests) == 1  # same id: no fetch

    # A new id means a new policy: fetched again (§3.1, §5.1).
    https.route(POLICY_PATH, Canned(body=GOOD_POLICY.replace(b"enforce", b"testing")))
    dns_server.set_zone(zone("id2"))
    third = await sts.policy_for(DOMAIN)
    assert not third.from_cache and third.mode is Mode.TESTING and third.policy_id == "id2"
    assert len(https.requests) == 2
    report = third.policy.report_policy(DOMAIN) if third.policy else None
    assert report is not None and report.policy_type is PolicyType.STS
    assert report.mx_hosts == ("mx1.example.test", "*.mail.example.test")
    assert report.policy_strings[1] == "mode: testing"


async def test_fetch_failure_keeps_cached_policy(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer
) -> None:
    dns_server.set_zone(zone())
    sts = make(dns_server, pki, https)
    assert (await sts.policy_for(DOMAIN)).applies
    dns_server.set_zone(zone("id2"))
    https.route(POLICY_PATH, Canned(500, b"oops"))
    lookup = await sts.policy_for(DOMAIN)
    # §5.1: the unexpired cached policy still applies; the failure is there to report.
    assert lookup.applies and lookup.from_cache and lookup.policy_id == "id1"
    assert lookup.error is ResultType.STS_POLICY_FETCH_ERROR
    assert "500" in lookup.detail
    # Backoff: the failing host is not asked again at once for the same id.
    again = await sts.policy_for(DOMAIN)
    assert again.applies and again.error is None and len(https.requests) == 2


async def test_fetch_failure_without_cache(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer
) -> None:
    dns_server.set_zone(zone())
    https.route(POLICY_PATH, Canned(404, b"no"))
    lookup = await make(dns_server, pki, https).policy_for(DOMAIN)
    assert lookup.policy is None and not lookup.applies
    assert lookup.error is ResultType.STS_POLICY_FETCH_ERROR


async def test_txt_gone_or_dns_failing_keeps_cached_policy(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer
) -> None:
    dns_server.set_zone(zone())
    sts = make(dns_server, pki, https)
    await sts.policy_for(DOMAIN)
    dns_server.set_zone({f"mta-sts.{DOMAIN}": [("A", "127.0.0.1")]})
    lookup = await sts.policy_for(DOMAIN)
    assert lookup.applies and lookup.from_cache
    dns_server.set_zone({f"_mta-sts.{DOMAIN}": ["SERVFAIL"]})
    lookup = await sts.policy_for(DOMAIN)
    assert lookup.applies and lookup.from_cache
    assert len(https.requests) == 1


async def test_expired_cache_is_dropped(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer
) -> None:
    clock = Clock()
    dns_server.set_zone(zone())
    sts = make(dns_server, pki, https, clock=clock)
    await sts.policy_for(DOMAIN)
    clock.now += 86400 + 1
    dns_server.set_zone({})
    lookup = await sts.policy_for(DOMAIN)
    assert lookup.policy is None
    assert await sts.cache.get(DOMAIN) is None


async def test_refresh_past_half_life(dns_server: DNSFixture, pki: PKI, https: HTTPSServer) -> None:
    clock = Clock()
    dns_server.set_zone(zone())
    sts = make(dns_server, pki, https, clock=clock)
    await sts.policy_for(DOMAIN)
    clock.now += 3600
    await sts.policy_for(DOMAIN)
    assert len(https.requests) == 1
    clock.now += 86400 / 2
    lookup = await sts.policy_for(DOMAIN)
    assert len(https.requests) == 2 and not lookup.from_cache
    cached = await sts.cache.get(DOMAIN)
    assert cached is not None and cached.fetched_at == clock.now  # max_age restarts


async def test_long_policy_refreshes_daily(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer
) -> None:
    clock = Clock()
    https.route(POLICY_PATH, Canned(body=GOOD_POLICY.replace(b"86400", b"2419200")))
    dns_server.set_zone(zone())
    sts = make(dns_server, pki, https, clock=clock)
    await sts.policy_for(DOMAIN)
    clock.now += 86400 - 60
    await sts.policy_for(DOMAIN)
    assert len(https.requests) == 1
    clock.now += 120
    https.route(POLICY_PATH, Canned(503, b""))
    lookup = await sts.policy_for(DOMAIN)  # §3.3: about once a day, failure keeps it
    assert len(https.requests) == 2 and lookup.applies and lookup.from_cache


@pytest.mark.parametrize(
    ("canned", "expected"),
    [
        (
            Canned(
                301, b"", (("Location", "https://elsewhere.test/p"), ("Content-Type", "text/plain"))
            ),
            ResultType.STS_POLICY_FETCH_ERROR,
        ),
        (Canned(200, GOOD_POLICY, (("Content-Type", "text/html"),)), ResultType.STS_POLICY_INVALID),
        (Canned(200, GOOD_POLICY, ()), ResultType.STS_POLICY_INVALID),
        (
            Canned(200, b"version: STSv1\nmode: enforce\nmax_age: 1\n"),
            ResultType.STS_POLICY_INVALID,
        ),
        (Canned(200, b"\xff\xfe" + GOOD_POLICY), ResultType.STS_POLICY_INVALID),
        (
            Canned(200, GOOD_POLICY + b"x_pad: " + b"y" * 70000 + b"\n"),
            ResultType.STS_POLICY_INVALID,
        ),
    ],
)
async def test_bad_responses(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer, canned: Canned, expected: ResultType
) -> None:
    dns_server.set_zone(zone())
    https.route(POLICY_PATH, canned)
    lookup = await make(dns_server, pki, https).policy_for(DOMAIN)
    assert lookup.policy is None and lookup.error is expected, lookup.detail
    assert len(https.requests) == 1  # a redirect is never followed


async def test_charset_parameter_is_fine(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer
) -> None:
    dns_server.set_zone(zone())
    https.route(
        POLICY_PATH,
        Canned(body=GOOD_POLICY, headers=(("Content-Type", "Text/Plain; charset=utf-8"),)),
    )
    assert (await make(dns_server, pki, https).policy_for(DOMAIN)).applies


@pytest.mark.parametrize("problem", ["untrusted-ca", "wrong-name", "expired"])
async def test_policy_host_certificate_must_verify(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer, problem: str
) -> None:
    if problem == "untrusted-ca":
        issued = pki.other.issue(["mta-sts.example.test"])
    elif problem == "wrong-name":
        issued = pki.root.issue(["mta-sts.other.test"])
    else:
        issued = pki.root.issue(
            ["mta-sts.example.test"],
            not_before=NOW - dt.timedelta(days=30),
            not_after=NOW - dt.timedelta(days=1),
        )
    https.context = pki.server_context(issued, f"bad-{problem}")
    dns_server.set_zone(zone())
    lookup = await make(dns_server, pki, https).policy_for(DOMAIN)
    assert lookup.policy is None
    assert lookup.error is ResultType.STS_WEBPKI_INVALID
    assert https.requests == []  # nothing was sent over the unverified connection


async def test_timeout(dns_server: DNSFixture, pki: PKI, https: HTTPSServer) -> None:
    dns_server.set_zone(zone())
    https.route(POLICY_PATH, Canned(hang=True))
    sts = MTASTS(dns_server.resolver, ca_file=pki.ca_file, port=https.port, timeout=0.5)
    started = time.monotonic()
    lookup = await sts.policy_for(DOMAIN)
    assert time.monotonic() - started < 3
    assert lookup.policy is None and lookup.error is ResultType.STS_POLICY_FETCH_ERROR


async def test_no_or_ambiguous_record(dns_server: DNSFixture, pki: PKI, https: HTTPSServer) -> None:
    sts = make(dns_server, pki, https)
    dns_server.set_zone({f"mta-sts.{DOMAIN}": [("A", "127.0.0.1")]})
    assert (await sts.policy_for(DOMAIN)).policy is None
    dns_server.set_zone(
        {
            f"_mta-sts.{DOMAIN}": [("TXT", "v=STSv1; id=a"), ("TXT", "v=STSv1; id=b")],
            f"mta-sts.{DOMAIN}": [("A", "127.0.0.1")],
        }
    )
    assert (await sts.policy_for(DOMAIN)).policy is None
    # Other TXT records next to the STS one are discarded before counting (§3.1).
    dns_server.set_zone(
        {
            f"_mta-sts.{DOMAIN}": [("TXT", "v=spf1 -all"), ("TXT", "v=STSv1; id=a")],
            f"mta-sts.{DOMAIN}": [("A", "127.0.0.1")],
        }
    )
    assert (await sts.policy_for(DOMAIN)).applies
    assert len(https.requests) == 1


async def test_mode_none_is_cached_but_does_not_apply(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer
) -> None:
    dns_server.set_zone(zone())
    https.route(POLICY_PATH, Canned(body=b"version: STSv1\nmode: none\nmax_age: 86400\n"))
    sts = make(dns_server, pki, https)
    lookup = await sts.policy_for(DOMAIN)
    assert lookup.policy is not None and lookup.mode is Mode.NONE and not lookup.applies
    assert await sts.cache.get(DOMAIN) is not None


async def test_sqlite_cache_survives_restart(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer, tmp_path: Path
) -> None:
    dns_server.set_zone(zone())
    path = tmp_path / "relay" / "mtasts.sqlite"
    await make(dns_server, pki, https, cache=SQLitePolicyCache(path)).policy_for(DOMAIN)
    # A new process: the policy comes from the file, and a failing policy host cannot
    # take it away (§5.1).
    https.route(POLICY_PATH, Canned(503, b""))
    dns_server.set_zone(zone("id2"))
    lookup = await make(dns_server, pki, https, cache=SQLitePolicyCache(path)).policy_for(DOMAIN)
    assert lookup.applies and lookup.from_cache and lookup.policy_id == "id1"
    assert lookup.policy is not None and lookup.policy.mx[0] == "mx1.example.test"


async def test_caches_round_trip(tmp_path: Path) -> None:
    policy = parse_policy(GOOD_POLICY.decode())
    entry = CachedPolicy(DOMAIN, "id9", policy, 1000.0)
    for cache in (MemoryPolicyCache(), SQLitePolicyCache(tmp_path / "c.sqlite")):
        assert await cache.get(DOMAIN) is None
        await cache.put(entry)
        got = await cache.get("Example.Test")
        assert got is not None and got.policy == policy and got.policy_id == "id9"
        assert got.expires_at == 1000.0 + 86400
        await cache.delete(DOMAIN)
        assert await cache.get(DOMAIN) is None
