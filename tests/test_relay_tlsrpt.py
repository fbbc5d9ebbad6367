"""TLS-RPT (RFC 8460): the rua record, result storage, the §4.4 report checked against the
RFC's structure by an independent validator, gzip round trips, the §5.3 message and the
https: submission to a real HTTPS server on loopback."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import gzip
import json
import re
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from mailfort.relay.contexts import pkix_context
from mailfort.relay.tlsrpt import (
    FailureDetail,
    MemoryResultStore,
    PolicyResult,
    PolicyType,
    RecordError,
    ReportDeliveryError,
    ReporterIdentity,
    ReportPolicy,
    ResultStore,
    ResultType,
    SQLiteResultStore,
    TLSReporter,
    build_https_report,
    build_report,
    build_report_message,
    daily_reports,
    gzip_report,
    lookup_tlsrpt,
    parse_tlsrpt_record,
    post_https_report,
    report_filename,
)
from test_relay_support import PKI, Canned, HTTPSServer

from conftest_dns import DNSFixture

DAY = dt.date(2026, 3, 14)
STS = ReportPolicy(
    PolicyType.STS,
    "example.test",
    ("version: STSv1", "mode: testing", "mx: *.mail.example.test", "max_age: 86400"),
    ("*.mail.example.test",),
)
TLSA = ReportPolicy(
    PolicyType.TLSA, "mx1.example.test", ("3 1 1 " + "ab" * 32,), ("mx1.example.test",)
)
NONE = ReportPolicy(PolicyType.NO_POLICY, "example.test")
EXPIRED = FailureDetail(
    ResultType.CERTIFICATE_EXPIRED,
    sending_mta_ip="192.0.2.10",
    receiving_mx_hostname="a.mail.example.test",
    receiving_ip="198.51.100.7",
    failure_reason_code="certificate has expired",
)
NO_STARTTLS = FailureDetail(
    ResultType.STARTTLS_NOT_SUPPORTED, receiving_mx_hostname="b.mail.example.test"
)


# -- an independent reading of RFC 8460 §4.4 ---------------------------------------------------

RESULT_TYPES = {
    "starttls-not-supported",
    "certificate-host-mismatch",
    "certificate-expired",
    "certificate-not-trusted",
    "validation-failure",
    "tlsa-invalid",
    "dnssec-invalid",
    "dane-required",
    "sts-policy-fetch-error",
    "sts-policy-invalid",
    "sts-webpki-invalid",
}
DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})\Z")


def validate_report(report: Any) -> None:
    """Fields, types and values as RFC 8460 §4.4 and the §4.3 registry define them."""
    assert isinstance(report, dict)
    required = {"organization-name", "date-range", "contact-info", "report-id", "policies"}
    assert required <= set(report), required - set(report)
    for key in ("organization-name", "contact-info", "report-id"):
        assert isinstance(report[key], str) and report[key]
    rng = report["date-range"]
    assert set(rng) == {"start-datetime", "end-datetime"}
    assert DATETIME.match(rng["start-datetime"]) and DATETIME.match(rng["end-datetime"])
    start = dt.datetime.fromisoformat(rng["start-datetime"])
    end = dt.datetime.fromisoformat(rng["end-datetime"])
    assert start < end
    assert isinstance(report["policies"], list) and report["policies"]
    for entry in report["policies"]:
        assert set(entry) <= {"policy", "summary", "failure-details"}
        policy = entry["policy"]
        assert policy["policy-type"] in {"sts", "tlsa", "no-policy-found"}
        assert isinstance(policy["policy-domain"], str) and policy["policy-domain"]
        for key in ("policy-string", "mx-host"):
            if key in policy:
                assert isinstance(policy[key], list)
                assert all(isinstance(s, str) for s in policy[key])
        if policy["policy-type"] != "no-policy-found":
            assert policy["policy-string"]
        summary = entry["summary"]
        assert set(summary) == {"total-successful-session-count", "total-failure-session-count"}
        assert all(isinstance(v, int) and v >= 0 for v in summary.values())
        details = entry.get("failure-details", [])
        assert isinstance(details, list)
        allowed = {
            "result-type",
            "sending-mta-ip",
            "receiving-mx-hostname",
            "receiving-mx-helo",
            "receiving-ip",
            "failed-session-count",
            "additional-information",
            "failure-reason-code",
        }
        for detail in details:
            assert set(detail) <= allowed, set(detail) - allowed
            assert detail["result-type"] in RESULT_TYPES
            assert (
                isinstance(detail["failed-session-count"], int)
                and detail["failed-session-count"] > 0
            )
            for key in allowed - {"failed-session-count"}:
                if key in detail:
                    assert isinstance(detail[key], str)
        assert (
            sum(d["failed-session-count"] for d in details)
            <= summary["total-failure-session-count"]
        )


# -- the record ----------------------------------------------------------------------------------


def test_record_parsing() -> None:
    rec = parse_tlsrpt_record("v=TLSRPTv1; rua=mailto:tls@example.test,https://rep.example.test/v1")
    assert rec.mailto() == ["tls@example.test"]
    assert rec.https() == ["https://rep.example.test/v1"]
    rec = parse_tlsrpt_record(
        "v=TLSRPTv1;rua=mailto:a%2Bb@example.test?subject=x , mailto:c@example.test;ext=1;"
    )
    assert rec.mailto() == ["a+b@example.test", "c@example.test"]
    assert rec.extensions == (("ext", "1"),)
    assert parse_tlsrpt_record("v=TLSRPTv1; rua=ftp://x.test/r").mailto() == []


@pytest.mark.parametrize(
    "txt",
    [
        "v=TLSRPTv1",
        "v=TLSRPTv1;",
        "v=TLSRPTv2; rua=mailto:a@example.test",
        "rua=mailto:a@example.test; v=TLSRPTv1",
        "v=TLSRPTv1; rua=",
        "v=TLSRPTv1; rua=mailto:a@example.test; rua=mailto:b@example.test",
        "v=TLSRPTv1; rua=not a uri",
        "v=TLSRPTv1; rua=mailto:a@example.test; bogus",
    ],
)
def test_record_rejects(txt: str) -> None:
    with pytest.raises(RecordError):
        parse_tlsrpt_record(txt)


async def test_lookup(dns_server: DNSFixture) -> None:
    name = "_smtp._tls.example.test"
    dns_server.set_zone(
        {name: [("TXT", "v=spf1 -all"), ("TXT", "v=TLSRPTv1; rua=mailto:r@example.test")]}
    )
    rec = await lookup_tlsrpt(dns_server.resolver, "example.test")
    assert rec is not None and rec.mailto() == ["r@example.test"]
    dns_server.set_zone(
        {
            name: [
                ("TXT", "v=TLSRPTv1; rua=mailto:r@example.test"),
                ("TXT", "v=TLSRPTv1; rua=mailto:s@example.test"),
            ]
        }
    )
    assert await lookup_tlsrpt(dns_server.resolver, "example.test") is None  # §3: not exactly one
    dns_server.set_zone({name: [("TXT", "v=TLSRPTv1; rua=")]})
    assert await lookup_tlsrpt(dns_server.resolver, "example.test") is None
    dns_server.set_zone({})
    assert await lookup_tlsrpt(dns_server.resolver, "example.test") is None


# -- storage -------------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ResultStore:
    if request.param == "memory":
        return MemoryResultStore()
    return SQLiteResultStore(tmp_path / "tlsrpt.sqlite")


async def test_store_counts_and_removes(store: ResultStore) -> None:
    for _ in range(3):
        await store.add(DAY, STS, success=True)
    await store.add(DAY, STS, success=False, detail=EXPIRED)
    await store.add(DAY, STS, success=False, detail=EXPIRED)
    await store.add(DAY, STS, success=False, detail=NO_STARTTLS)
    await store.add(DAY, NONE, success=True, count=4)
    await store.add(DAY, TLSA, success=False, detail=FailureDetail(ResultType.VALIDATION_FAILURE))
    await store.add(DAY + dt.timedelta(days=1), STS, success=True)

    assert await store.pending(DAY + dt.timedelta(days=1)) == [
        (DAY, "example.test"),
        (DAY, "mx1.example.test"),
    ]
    results = {r.policy.policy_type: r for r in await store.results(DAY, "example.test")}
    assert set(results) == {PolicyType.STS, PolicyType.NO_POLICY}
    sts = results[PolicyType.STS]
    assert (sts.successes, sts.failures) == (3, 3)
    assert sorted((d.result_type, n) for d, n in sts.details) == [
        (ResultType.CERTIFICATE_EXPIRED, 2),
        (ResultType.STARTTLS_NOT_SUPPORTED, 1),
    ]
    assert sts.policy == STS
    assert (results[PolicyType.NO_POLICY].successes, results[PolicyType.NO_POLICY].failures) == (
        4,
        0,
    )

    await store.remove(DAY, "example.test")
    assert await store.results(DAY, "example.test") == []
    assert await store.pending(DAY + dt.timedelta(days=5)) == [
        (DAY, "mx1.example.test"),
        (DAY + dt.timedelta(days=1), "example.test"),
    ]


async def test_sqlite_store_is_shared_between_instances(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite"
    one, two = SQLiteResultStore(path), SQLiteResultStore(path)
    await one.add(DAY, STS, success=True)
    await two.add(DAY, STS, success=True)
    await two.add(DAY, STS, success=False, detail=EXPIRED)
    (result,) = await one.results(DAY, "example.test")
    assert (result.successes, result.failures) == (2, 1)


async def test_reporter_uses_utc_day() -> None:
    store = MemoryResultStore()
    moment = dt.datetime(2026, 3, 14, 23, 59, 59, tzinfo=dt.UTC).timestamp()
    reporter = TLSReporter(store, clock=lambda: moment)
    await reporter.success(STS)
    await reporter.failure(STS, EXPIRED)
    assert await store.pending(DAY + dt.timedelta(days=1)) == [(DAY, "example.test")]


# -- the report ---------------------------------------------------------------------------------


def sample_report() -> dict[str, Any]:
    results = [
        PolicyResult(STS, 5326, 303, [(EXPIRED, 100), (NO_STARTTLS, 200)]),
        PolicyResult(NONE, 10, 0),
    ]
    return build_report(
        results,
        day=DAY,
        organization_name="Mailfort Test",
        contact_info="tlsrpt@sender.test",
        report_id="20260314.example.test@sender.test",
    )


def test_report_structure() -> None:
    report = sample_report()
    validate_report(report)
    assert report["date-range"] == {
        "start-datetime": "2026-03-14T00:00:00Z",
        "end-datetime": "2026-03-14T23:59:59Z",
    }
    first = report["policies"][0]
    assert first["policy"] == {
        "policy-type": "sts",
        "policy-string": list(STS.policy_strings),
        "policy-domain": "example.test",
        "mx-host": ["*.mail.example.test"],
    }
    assert first["summary"] == {
        "total-successful-session-count": 5326,
        "total-failure-session-count": 303,
    }
    assert first["failure-details"][0] == {
        "result-type": "starttls-not-supported",
        "receiving-mx-hostname": "b.mail.example.test",
        "failed-session-count": 200,
    }
    assert first["failure-details"][1] == {
        "result-type": "certificate-expired",
        "sending-mta-ip": "192.0.2.10",
        "receiving-mx-hostname": "a.mail.example.test",
        "receiving-ip": "198.51.100.7",
        "failure-reason-code": "certificate has expired",
        "failed-session-count": 100,
    }
    assert report["policies"][1] == {
        "policy": {"policy-type": "no-policy-found", "policy-domain": "example.test"},
        "summary": {"total-successful-session-count": 10, "total-failure-session-count": 0},
    }


def test_gzip_round_trip() -> None:
    report = sample_report()
    packed = gzip_report(report)
    assert packed[:2] == b"\x1f\x8b"
    assert json.loads(gzip.decompress(packed)) == report
    assert gzip_report(report) == packed  # reproducible bytes


def test_report_filename() -> None:
    start = dt.datetime(2026, 3, 14, tzinfo=dt.UTC)
    end = start + dt.timedelta(days=1, seconds=-1)
    assert (
        report_filename("sender.test", "example.test", start, end)
        == "sender.test!example.test!1773446400!1773532799.json.gz"
    )
    assert report_filename("s.test", "p.test", start, end, "x1").endswith("!x1.json.gz")


def test_report_message() -> None:
    report = sample_report()
    raw = build_report_message(
        report,
        policy_domain="example.test",
        submitter="sender.test",
        from_addr="tlsrpt-noreply@sender.test",
        to_addrs=["tls@example.test"],
        date=dt.datetime(2026, 3, 15, 0, 10, tzinfo=dt.UTC),
        message_id="<r1@sender.test>",
    )
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg["Subject"] == (
        "Report Domain: example.test Submitter: sender.test "
        "Report-ID: <20260314.example.test@sender.test>"
    )
    assert msg["TLS-Report-Domain"] == "example.test"
    assert msg["TLS-Report-Submitter"] == "sender.test"
    assert msg["TLS-Required"] == "No"
    assert msg["To"] == "tls@example.test" and msg["Message-ID"] == "<r1@sender.test>"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "application/tlsrpt+gzip"]
    attachment = parts[1]
    assert attachment.get_filename() == "sender.test!example.test!1773446400!1773532799.json.gz"
    assert attachment["Content-Transfer-Encoding"] == "base64"
    payload = attachment.get_payload(decode=True)
    assert isinstance(payload, bytes)
    decoded = json.loads(gzip.decompress(payload))
    validate_report(decoded)
    assert decoded == report


# -- https: submission ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def collector(pki: PKI) -> Iterator[HTTPSServer]:
    server = HTTPSServer(pki.server_context(pki.root.issue(["reports.example.test"]), "collector"))
    yield server
    server.close()


async def test_https_submission(dns_server: DNSFixture, pki: PKI, collector: HTTPSServer) -> None:
    dns_server.set_zone({"reports.example.test": [("A", "127.0.0.1")]})
    collector.route("/tlsrpt?k=1", Canned(201, b""))
    report = sample_report()
    https_report = build_https_report(report)
    uri = f"https://reports.example.test:{collector.port}/tlsrpt?k=1"
    # The collector listens on loopback: refused unless the operator allows it.
    with pytest.raises(ReportDeliveryError, match="loopback"):
        await post_https_report(
            uri, https_report, resolver=dns_server.resolver, ssl_context=pkix_context(pki.ca_file)
        )
    assert collector.requests == []
    await post_https_report(
        uri,
        https_report,
        resolver=dns_server.resolver,
        ssl_context=pkix_context(pki.ca_file),
        timeout=3,
        allow_private=True,
    )
    (seen,) = collector.requests
    assert seen.method == "POST" and seen.headers["content-type"] == "application/tlsrpt+gzip"
    assert json.loads(gzip.decompress(seen.body)) == report
    collector.route("/tlsrpt?k=1", Canned(500, b""))
    with pytest.raises(ReportDeliveryError):
        await post_https_report(
            uri, https_report, resolver=dns_server.resolver, timeout=3, allow_private=True
        )


async def test_daily_reports(dns_server: DNSFixture, tmp_path: Path) -> None:
    store = SQLiteResultStore(tmp_path / "r.sqlite")
    await store.add(DAY, STS, success=True)
    await store.add(DAY, STS, success=False, detail=EXPIRED)
    await store.add(DAY, TLSA, success=True)
    await store.add(DAY, ReportPolicy(PolicyType.NO_POLICY, "quiet.test"), success=True)
    dns_server.set_zone(
        {
            "_smtp._tls.example.test": [
                ("TXT", "v=TLSRPTv1; rua=mailto:tls@example.test,https://r.example.test/x")
            ],
            "_smtp._tls.mx1.example.test": [("TXT", "v=TLSRPTv1; rua=https://r.example.test/mx")],
            "_smtp._tls.quiet.test": [("TXT", "v=spf1 -all")],
        }
    )
    identity = ReporterIdentity(
        "Mailfort Test", "postmaster@sender.test", "sender.test", "tlsrpt@sender.test"
    )
    ready, unwanted = await daily_reports(
        store, dns_server.resolver, identity, before=DAY + dt.timedelta(days=1)
    )
    assert unwanted == [(DAY, "quiet.test")]
    by_domain = {r.policy_domain: r for r in ready}
    assert set(by_domain) == {"example.test", "mx1.example.test"}
    main = by_domain["example.test"]
    validate_report(main.report)
    assert main.mail_recipients == ("tls@example.test",) and main.message is not None
    assert main.https_uris == ("https://r.example.test/x",)
    assert json.loads(gzip.decompress(main.https_report.body)) == main.report
    assert main.report["report-id"] == "20260314.example.test@sender.test"
    mx = by_domain["mx1.example.test"]
    assert mx.message is None and mx.report["policies"][0]["policy"]["policy-type"] == "tlsa"
    # Nothing for days still running.
    assert await daily_reports(store, dns_server.resolver, identity, before=DAY) == ([], [])
