"""The per-MX TLS decision, exercised the way the delivery client will use it: plans from
the loopback DNS server and a real MTA-STS policy host, then real STARTTLS sessions
(aiosmtplib as the client) against SMTP servers on 127.0.0.1 with chosen certificates,
and the TLS-RPT counts that result."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import ssl
from collections.abc import Iterator

import aiosmtplib
import pytest
from cryptography.hazmat.primitives import serialization

from mailfort.relay.mtasts import MTASTS
from mailfort.relay.tlspolicy import MXPlan, TLSMode, TLSOutcome, TLSPolicy, classify_tls_error
from mailfort.relay.tlsrpt import (
    MemoryResultStore,
    PolicyType,
    ReportPolicy,
    ResultType,
    TLSReporter,
)
from test_relay_support import CA, NOW, PKI, Canned, HTTPSServer, Issued, SMTPStub

from conftest_dns import DNSFixture
from dnsserver import Entry

DOMAIN = "example.test"
POLICY = (
    b"version: STSv1\nmode: enforce\nmx: mx1.example.test\nmx: *.pool.example.test\n"
    b"max_age: 86400\n"
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def policy_host(pki: PKI) -> Iterator[HTTPSServer]:
    server = HTTPSServer(pki.server_context(pki.root.issue([f"mta-sts.{DOMAIN}"]), "policy"))
    yield server
    server.close()


@pytest.fixture
def https(policy_host: HTTPSServer) -> HTTPSServer:
    policy_host.requests.clear()
    policy_host.route("/.well-known/mta-sts.txt", Canned(body=POLICY))
    return policy_host


def zone(
    *mx_hosts: str, sts: bool = True, extra: dict[str, list[Entry]] | None = None
) -> dict[str, list[Entry]]:
    z: dict[str, list[Entry]] = {
        DOMAIN: [("MX", (10 * (i + 1), h)) for i, h in enumerate(mx_hosts)],
        f"mta-sts.{DOMAIN}": [("A", "127.0.0.1")],
    }
    if sts:
        z[f"_mta-sts.{DOMAIN}"] = [("TXT", "v=STSv1; id=one")]
    for host in mx_hosts:
        z.setdefault(host, []).append(("A", "127.0.0.1"))
    for name, entries in (extra or {}).items():
        z.setdefault(name, []).extend(entries)
    return z


def make_policy(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer, **kw: object
) -> tuple[TLSPolicy, MemoryResultStore]:
    store = MemoryResultStore()
    sts = MTASTS(dns_server.resolver, ca_file=pki.ca_file, port=https.port, timeout=3.0)
    tls = TLSPolicy(
        dns_server.resolver,
        mtasts=sts,
        reporter=TLSReporter(store),
        ca_file=pki.ca_file,
        **kw,  # type: ignore[arg-type]
    )
    return tls, store


def serve(pki: PKI, issued: Issued | None, name: str, *, starttls: bool = True) -> SMTPStub:
    ctx = pki.server_context(issued, name) if issued is not None else None
    return SMTPStub(ctx, starttls=starttls)


async def session(tls: TLSPolicy, mx: MXPlan, port: int) -> TLSOutcome:
    """One delivery attempt as the SMTP client will make it (see tlspolicy's docstring)."""

    async def connect() -> aiosmtplib.SMTP:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=5)
        await smtp.connect()
        await smtp.ehlo()
        return smtp

    smtp = await connect()
    try:
        if not smtp.supports_extension("starttls"):
            outcome = tls.judge_no_starttls(mx)
        else:
            try:
                await smtp.starttls(tls_context=tls.ssl_context(mx), server_hostname=mx.host)
            except (ssl.SSLError, OSError, aiosmtplib.SMTPException) as exc:
                outcome = tls.judge_handshake_error(mx, exc)
            else:
                outcome = tls.judge_session(mx, smtp.get_transport_info("ssl_object"))
    finally:
        smtp.close()
    await tls.record(mx, outcome, sending_ip="127.0.0.1", receiving_ip="127.0.0.1")
    if outcome.retry_unverified:
        smtp = await connect()
        try:
            await smtp.starttls(
                tls_context=tls.ssl_context(mx, unverified=True), server_hostname=mx.host
            )
            retry = tls.judge_session(mx, smtp.get_transport_info("ssl_object"))
            assert retry.deliver and not retry.report
            await tls.record(mx, retry)
            await smtp.noop()  # the session is usable for mail
        finally:
            smtp.close()
    return outcome


async def counts(store: MemoryResultStore, domain: str) -> dict[str, tuple[int, int, list[str]]]:
    today = dt.datetime.now(dt.UTC).date()
    out = {}
    for result in await store.results(today, domain):
        kinds = sorted(f"{d.result_type}@{d.receiving_mx_hostname}" for d, _ in result.details)
        out[str(result.policy.policy_type)] = (result.successes, result.failures, kinds)
    return out


# -- planning -------------------------------------------------------------------------------


async def test_plan_enforce_skips_mx_outside_policy(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer
) -> None:
    dns_server.set_zone(zone("mx1.example.test", "a.pool.example.test", "evil.example.test"))
    tls, store = make_policy(dns_server, pki, https)
    mxs = await dns_server.resolver.mx(DOMAIN)
    plan = await tls.plan(DOMAIN, [host for _, host in mxs])
    assert [m.mode for m in plan.mxs] == [TLSMode.MTA_STS_ENFORCE] * 3
    assert [m.host for m in plan.candidates] == ["mx1.example.test", "a.pool.example.test"]
    evil = plan.mxs[2]
    assert not evil.usable and evil.skip is ResultType.VALIDATION_FAILURE
    assert all(m.require_tls for m in plan.mxs)
    assert await counts(store, DOMAIN) == {"sts": (0, 1, ["validation-failure@evil.example.test"])}


async def test_plan_testing_keeps_mx_outside_policy(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer
) -> None:
    https.route("/.well-known/mta-sts.txt", Canned(body=POLICY.replace(b"enforce", b"testing")))
    dns_server.set_zone(zone("evil.example.test"))
    tls, _ = make_policy(dns_server, pki, https)
    plan = await tls.plan(DOMAIN, ["evil.example.test"])
    (mx,) = plan.candidates
    assert mx.mode is TLSMode.MTA_STS_TESTING and not mx.mx_in_policy and not mx.require_tls


async def test_plan_without_policies_is_opportunistic(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer
) -> None:
    dns_server.set_zone(zone("mx.other.test", sts=False))
    tls, _ = make_policy(dns_server, pki, https)
    plan = await tls.plan(DOMAIN, ["mx.other.test"])
    (mx,) = plan.candidates
    assert mx.mode is TLSMode.OPPORTUNISTIC and not mx.require_tls
    assert mx.report_policy.policy_type is PolicyType.NO_POLICY
    assert https.requests == []


async def test_plan_dane_wins_over_sts_for_authentication(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer
) -> None:
    leaf = pki.root.issue(["mx1.example.test"])
    digest = hashlib.sha256(
        leaf.cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    ).digest()
    dns_server.set_zone(
        zone(
            "mx1.example.test",
            "evil.example.test",
            extra={
                "_25._tcp.mx1.example.test": [("TLSA", (3, 1, 1, digest)), "SECURE"],
                "_25._tcp.evil.example.test": [("TLSA", (3, 1, 1, digest)), "SECURE"],
            },
        )
    )
    tls, _ = make_policy(dns_server, pki, https)
    plan = await tls.plan(DOMAIN, ["mx1.example.test", "evil.example.test"])
    mx1, evil = plan.mxs
    assert mx1.mode is TLSMode.DANE and mx1.tlsa and mx1.require_tls
    assert mx1.report_policy.policy_type is PolicyType.TLSA
    # The enforce policy's MX list still rules out a host it does not name.
    assert not evil.usable


async def test_plans_are_reused_for_plan_ttl_and_shared_by_concurrent_attempts(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer
) -> None:
    dns_server.set_zone(zone("mx1.example.test"))
    tls, _store = make_policy(dns_server, pki, https, plan_ttl=3600)
    hosts = ["mx1.example.test"]
    first, *others = await asyncio.gather(*(tls.plan(DOMAIN, hosts) for _ in range(5)))
    assert all(plan is first for plan in others)  # one planning for five attempts
    assert await tls.plan(DOMAIN, hosts) is first
    asked = [q for q in dns_server.queries if q[1] in ("TXT", "TLSA")]
    assert len(asked) == 2, asked  # _mta-sts TXT and the MX's TLSA, once each
    # Another MX list is another plan; no plan_ttl plans afresh every time.
    assert await tls.plan(DOMAIN, ["mx1.example.test", "mx2.example.test"]) is not first
    fresh, _ = make_policy(dns_server, pki, https)
    assert await fresh.plan(DOMAIN, hosts) is not await fresh.plan(DOMAIN, hosts)


async def test_plan_dane_lookup_failure_and_dane_required(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer
) -> None:
    dns_server.set_zone(
        zone(
            "mx1.example.test",
            "a.pool.example.test",
            sts=False,
            extra={"_25._tcp.mx1.example.test": ["SERVFAIL"], "mx1.example.test": ["SECURE"]},
        )
    )
    tls, store = make_policy(dns_server, pki, https)
    plan = await tls.plan(DOMAIN, ["mx1.example.test", "a.pool.example.test"])
    assert plan.mxs[0].skip is ResultType.DNSSEC_INVALID
    assert plan.mxs[1].mode is TLSMode.OPPORTUNISTIC
    strict, _ = make_policy(dns_server, pki, https, dane_required=[DOMAIN])
    plan = await strict.plan(DOMAIN, ["a.pool.example.test"])
    assert plan.candidates == [] and plan.mxs[0].skip is ResultType.DANE_REQUIRED
    today = dt.datetime.now(dt.UTC).date()
    (result,) = await store.results(today, "mx1.example.test")
    assert result.details[0][0].result_type is ResultType.DNSSEC_INVALID


async def test_policy_fetch_failure_is_reported(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer
) -> None:
    https.route("/.well-known/mta-sts.txt", Canned(500, b""))
    dns_server.set_zone(zone("mx1.example.test"))
    tls, store = make_policy(dns_server, pki, https)
    plan = await tls.plan(DOMAIN, ["mx1.example.test"])
    assert plan.candidates[0].mode is TLSMode.OPPORTUNISTIC
    assert await counts(store, DOMAIN) == {
        "no-policy-found": (0, 1, ["sts-policy-fetch-error@mta-sts.example.test"])
    }


# -- sessions ---------------------------------------------------------------------------------


async def test_enforce_good_certificate(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer
) -> None:
    dns_server.set_zone(zone("mx1.example.test"))
    tls, store = make_policy(dns_server, pki, https)
    (mx,) = (await tls.plan(DOMAIN, ["mx1.example.test"])).candidates
    stub = serve(pki, pki.root.issue(["mx1.example.test"]), "mx-good")
    try:
        outcome = await session(tls, mx, stub.port)
    finally:
        stub.close()
    assert outcome.deliver and outcome.ok
    assert await counts(store, DOMAIN) == {"sts": (1, 0, [])}


@pytest.mark.parametrize(
    ("problem", "expected"),
    [
        ("untrusted-ca", ResultType.CERTIFICATE_NOT_TRUSTED),
        ("wrong-name", ResultType.CERTIFICATE_HOST_MISMATCH),
        ("expired", ResultType.CERTIFICATE_EXPIRED),
        ("cn-only", ResultType.CERTIFICATE_HOST_MISMATCH),  # RFC 8461 §4.2: a SAN DNS-ID
    ],
)
async def test_enforce_refuses_bad_certificate(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer, problem: str, expected: ResultType
) -> None:
    issued = bad_certificate(pki, problem)
    dns_server.set_zone(zone("mx1.example.test"))
    tls, store = make_policy(dns_server, pki, https)
    (mx,) = (await tls.plan(DOMAIN, ["mx1.example.test"])).candidates
    stub = serve(pki, issued, f"mx-{problem}")
    try:
        outcome = await session(tls, mx, stub.port)
    finally:
        stub.close()
    assert not outcome.deliver and outcome.failure is expected and not outcome.plaintext_ok
    assert await counts(store, DOMAIN) == {"sts": (0, 1, [f"{expected}@mx1.example.test"])}


def bad_certificate(pki: PKI, problem: str) -> Issued:
    if problem == "untrusted-ca":
        return pki.other.issue(["mx1.example.test"])
    if problem == "wrong-name":
        return pki.root.issue(["mx9.example.test"])
    if problem == "cn-only":
        return pki.root.issue(["mx1.example.test"], san=False)
    return pki.root.issue(
        ["mx1.example.test"],
        not_before=NOW - dt.timedelta(days=60),
        not_after=NOW - dt.timedelta(days=1),
    )


async def test_enforce_requires_starttls(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer
) -> None:
    dns_server.set_zone(zone("mx1.example.test"))
    tls, store = make_policy(dns_server, pki, https)
    (mx,) = (await tls.plan(DOMAIN, ["mx1.example.test"])).candidates
    stub = serve(pki, None, "plain", starttls=False)
    try:
        outcome = await session(tls, mx, stub.port)
    finally:
        stub.close()
    assert not outcome.deliver and outcome.failure is ResultType.STARTTLS_NOT_SUPPORTED
    assert await counts(store, DOMAIN) == {
        "sts": (0, 1, ["starttls-not-supported@mx1.example.test"])
    }


async def test_testing_mode_delivers_and_reports(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer
) -> None:
    https.route("/.well-known/mta-sts.txt", Canned(body=POLICY.replace(b"enforce", b"testing")))
    dns_server.set_zone(zone("mx1.example.test"))
    tls, store = make_policy(dns_server, pki, https)
    (mx,) = (await tls.plan(DOMAIN, ["mx1.example.test"])).candidates
    assert mx.mode is TLSMode.MTA_STS_TESTING
    stub = serve(pki, pki.other.issue(["mx1.example.test"]), "mx-testing")
    try:
        outcome = await session(tls, mx, stub.port)
    finally:
        stub.close()
    assert outcome.deliver and outcome.retry_unverified
    assert outcome.failure is ResultType.CERTIFICATE_NOT_TRUSTED
    assert stub.handshakes[-1] == "ok"  # the retry without verification went through
    # One failure counted; the unverified retry is not counted as a success on top.
    assert await counts(store, DOMAIN) == {
        "sts": (0, 1, ["certificate-not-trusted@mx1.example.test"])
    }


async def test_testing_mode_outside_policy_reports(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer
) -> None:
    https.route("/.well-known/mta-sts.txt", Canned(body=POLICY.replace(b"enforce", b"testing")))
    dns_server.set_zone(zone("mx7.example.test"))
    tls, store = make_policy(dns_server, pki, https)
    (mx,) = (await tls.plan(DOMAIN, ["mx7.example.test"])).candidates
    stub = serve(pki, pki.root.issue(["mx7.example.test"]), "mx7")
    try:
        outcome = await session(tls, mx, stub.port)
    finally:
        stub.close()
    assert outcome.deliver and outcome.failure is ResultType.VALIDATION_FAILURE
    assert await counts(store, DOMAIN) == {"sts": (0, 1, ["validation-failure@mx7.example.test"])}


async def test_opportunistic_accepts_anything(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer
) -> None:
    dns_server.set_zone(zone("mx.other.test", sts=False))
    tls, store = make_policy(dns_server, pki, https)
    (mx,) = (await tls.plan(DOMAIN, ["mx.other.test"])).candidates
    stub = serve(pki, pki.other.issue(["whatever.test"]), "mx-any")
    plain = serve(pki, None, "mx-plain", starttls=False)
    try:
        assert (await session(tls, mx, stub.port)).ok
        no_tls = await session(tls, mx, plain.port)
    finally:
        stub.close()
        plain.close()
    assert no_tls.deliver and no_tls.plaintext_ok
    assert no_tls.failure is ResultType.STARTTLS_NOT_SUPPORTED
    assert await counts(store, DOMAIN) == {
        "no-policy-found": (1, 1, ["starttls-not-supported@mx.other.test"])
    }


@pytest.mark.parametrize("match", [True, False])
async def test_dane_session(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer, match: bool
) -> None:
    served = pki.other.issue(["mx1.example.test"])  # DANE needs no public CA
    published = served if match else pki.other.issue(["mx1.example.test"])
    digest = hashlib.sha256(
        published.cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    ).digest()
    dns_server.set_zone(
        zone(
            "mx1.example.test",
            sts=False,
            extra={"_25._tcp.mx1.example.test": [("TLSA", (3, 1, 1, digest)), "SECURE"]},
        )
    )
    tls, store = make_policy(dns_server, pki, https)
    (mx,) = (await tls.plan(DOMAIN, ["mx1.example.test"])).candidates
    assert mx.mode is TLSMode.DANE
    stub = serve(pki, served, f"mx-dane-{match}")
    try:
        outcome = await session(tls, mx, stub.port)
    finally:
        stub.close()
    assert outcome.deliver is match
    today = dt.datetime.now(dt.UTC).date()
    (result,) = await store.results(today, "mx1.example.test")
    assert result.policy.policy_type is PolicyType.TLSA
    assert (result.successes, result.failures) == ((1, 0) if match else (0, 1))


async def test_dane_ta_session_with_chain(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer
) -> None:
    intermediate = CA("Relay Test Intermediate", parent=pki.other)
    served = intermediate.issue(["mx1.example.test"])
    ta = intermediate.cert.public_bytes(serialization.Encoding.DER)
    dns_server.set_zone(
        zone(
            "mx1.example.test",
            sts=False,
            extra={
                "_25._tcp.mx1.example.test": [
                    ("TLSA", (2, 0, 1, hashlib.sha256(ta).digest())),
                    "SECURE",
                ]
            },
        )
    )
    tls, _ = make_policy(dns_server, pki, https)
    (mx,) = (await tls.plan(DOMAIN, ["mx1.example.test"])).candidates
    stub = serve(pki, served, "mx-dane-ta")
    try:
        outcome = await session(tls, mx, stub.port)
    finally:
        stub.close()
    assert outcome.deliver and outcome.ok, outcome.detail


def test_contexts_require_tls12(dns_server: DNSFixture) -> None:
    tls = TLSPolicy(dns_server.resolver)
    for mode in TLSMode:
        mx = MXPlan(
            "mx.test",
            mode,
            ReportPolicy(PolicyType.NO_POLICY, "test"),
        )
        ctx = tls.ssl_context(mx)
        assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
        verifying = mode in (TLSMode.MTA_STS_ENFORCE, TLSMode.MTA_STS_TESTING)
        assert (ctx.verify_mode == ssl.CERT_REQUIRED) is verifying
        assert ctx.check_hostname is verifying
        assert tls.ssl_context(mx) is ctx  # built once


def test_classify_wrapped_error() -> None:
    inner = ssl.SSLCertVerificationError(1, "certificate verify failed")
    inner.verify_code = 10
    inner.verify_message = "certificate has expired"
    try:
        try:
            raise inner
        except ssl.SSLError as exc:
            raise aiosmtplib.SMTPConnectError("wrapped") from exc
    except aiosmtplib.SMTPConnectError as outer:
        assert classify_tls_error(outer) == (
            ResultType.CERTIFICATE_EXPIRED,
            "certificate has expired",
        )
    assert classify_tls_error(ConnectionResetError("reset"))[0] is ResultType.VALIDATION_FAILURE
