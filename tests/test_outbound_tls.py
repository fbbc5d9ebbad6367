"""Outbound delivery under MTA-STS, DANE and TLS-RPT, end to end.

`mailfort dev` takes a submission and delivers it to a private Postfix on 127.0.0.2, the MX
of several recipient domains (the loopback DNS server maps them). Postfix picks its
certificate by the SNI name the client sends: a chain from the test CA mailfort trusts
(``MAILFORT_OUTBOUND_CA_FILE``) for some MX names, one from a CA nobody trusts for others.
An HTTPS server on 127.0.0.1 (``MAILFORT_MTA_STS_PORT``) serves each domain's policy at
``https://mta-sts.DOMAIN/.well-known/mta-sts.txt`` with a test-CA certificate. TLS-RPT
results are read from the SQLite file mailfort keeps them in.

    domain          policy                          Postfix certificate for its MX
    enforce.test    enforce, MX listed              test CA          -> delivered
    outside.test    enforce, MX not listed          test CA          -> never contacted, deferred
    badcert.test    enforce, MX listed              untrusted CA     -> refused, deferred
    testing.test    testing, MX listed              untrusted CA     -> delivered, failure reported
    remote.test     none                            self-signed      -> delivered (opportunistic)
    dane.test       DANE-EE TLSA matching (AD bit)  untrusted CA     -> delivered
    danebad.test    DANE-EE TLSA not matching       untrusted CA     -> refused, deferred
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email
import email.policy
import gzip
import hashlib
import http.server
import json
import smtplib
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from cryptography.hazmat.primitives import serialization

from mailfort import config
from mailfort.auth.dkim import verify_dkim
from mailfort.directory import dkimkeys
from mailfort.directory.service import Directory
from mailfort.dns import Nameserver, Resolver
from mailfort.keys.server import ServerKey
from mailfort.outbound import client
from mailfort.outbound.policy import TLSReportSender, default_identity, directory_signing_keys
from mailfort.outbound.queue import Queue
from mailfort.relay.contexts import pkix_context
from mailfort.relay.mtasts import MTASTS
from mailfort.relay.tlspolicy import TLSPolicy
from mailfort.relay.tlsrpt import (
    FailureDetail,
    MemoryResultStore,
    PolicyResult,
    PolicyType,
    ReportPolicy,
    ResultType,
    SQLiteResultStore,
    TLSReporter,
)
from postfix_peer import PostfixMX
from test_relay_support import PKI, Canned, HTTPSServer, Issued

from conftest import require_tool, start_outbound_dev, stop_dev
from conftest_dns import DNSFixture
from dnsserver import DNSServer, Entry
from tests_support import free_port, wait_for

PEER_ADDRESS = "127.0.0.2"
STS_DOMAINS = {  # domain -> (mode, MX patterns in its policy)
    "enforce.test": ("enforce", ["mx.enforce.test"]),
    "outside.test": ("enforce", ["mx.elsewhere.outside.test"]),
    "badcert.test": ("enforce", ["mx.badcert.test"]),
    "testing.test": ("testing", ["mx.testing.test"]),
}
DANE_DOMAINS = ("dane.test", "danebad.test")
PLAIN_DOMAIN = "remote.test"  # Postfix's own domain: no policy at all
WELL_KNOWN = "/.well-known/mta-sts.txt"
REPORT_DAY = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=2)  # long finished


def policy_text(mode: str, mx: list[str]) -> bytes:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), "max_age: 86400"]
    return ("\n".join(lines) + "\n").encode()


class PolicyHost:
    """HTTPS on 127.0.0.1 answering by Host header: one server stands in for every
    ``mta-sts.DOMAIN`` (mailfort connects to one port for all of them)."""

    def __init__(self, context: ssl.SSLContext, policies: dict[str, bytes]) -> None:
        self.policies = policies
        self.seen: list[str] = []  # Host of every request
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                # The handshake in the handler's thread, so one slow client blocks no other.
                self.request.settimeout(5)
                self.request = context.wrap_socket(self.request, server_side=True)
                super().setup()

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                host = (self.headers.get("Host") or "").rsplit(":", 1)[0].lower()
                owner.seen.append(host)
                body = owner.policies.get(host) if self.path == WELL_KNOWN else None
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body or b"")))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body or b"")

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                return

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port: int = self._server.server_address[1]
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class Setup:
    data_dir: Path
    ports: dict[str, int]
    password: str
    postfix: PostfixMX
    policy_host: PolicyHost
    dns: DNSServer

    def send(self, rcpt: str, subject: str, extra_headers: str = "") -> None:
        msg = (
            f"From: Demo <demo@example.test>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n"
            f"{extra_headers}\r\nHello, {subject}.\r\n"
        ).encode()
        cafile = str(self.data_dir / "tls" / "cert.pem")
        with smtplib.SMTP("127.0.0.1", self.ports["submission"], timeout=30) as client:
            client.starttls(context=ssl.create_default_context(cafile=cafile))
            client.login("demo@example.test", self.password)
            client.sendmail("demo@example.test", [rcpt], msg)

    def arrived(self, rcpt: str, subject: str) -> list[bytes]:
        user, _, domain = rcpt.partition("@")
        return [m for m in self.postfix.messages(user, domain) if subject.encode() in m]

    def queued(self, rcpt: str) -> list[tuple[int, str]]:
        """(attempts, last error) of ``rcpt``'s waiting queue entries."""
        queue = Queue(self.data_dir, ServerKey.load_or_create(self.data_dir))
        try:
            rows: list[Any] = queue.reader.execute(
                "SELECT attempts, last_error FROM recipients WHERE rcpt = ? AND state = 'queued'",
                (rcpt,),
            ).fetchall()
        finally:
            queue.close()
        return [(int(a), str(e)) for a, e in rows]

    def tls_results(self, policy_domain: str, day: dt.date | None = None) -> list[PolicyResult]:
        store = SQLiteResultStore(self.data_dir / "queue" / "tlsrpt.sqlite3")
        when = day or dt.datetime.now(dt.UTC).date()
        return asyncio.run(store.results(when, policy_domain))


def chain_file(issued: Issued, directory: Path, name: str) -> Path:
    """Key first, then the chain from the leaf up: Postfix's chain-file layout."""
    cert, key = issued.write(directory, name)
    path = directory / f"{name}.chain.pem"
    path.write_bytes(key.read_bytes() + cert.read_bytes())
    return path


def spki_sha256(issued: Issued) -> bytes:
    return hashlib.sha256(
        issued.cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    ).digest()


def build_zone(pki: PKI, dane_leaf: Issued) -> dict[str, list[Entry]]:
    zone: dict[str, list[Entry]] = {}
    for domain in [*STS_DOMAINS, *DANE_DOMAINS, PLAIN_DOMAIN]:
        zone[domain] = [("MX", (10, f"mx.{domain}"))]
        zone[f"mx.{domain}"] = [("A", PEER_ADDRESS)]
    for domain in STS_DOMAINS:
        zone[f"_mta-sts.{domain}"] = [("TXT", "v=STSv1; id=20250101")]
        zone[f"mta-sts.{domain}"] = [("A", "127.0.0.1")]
    # DANE-EE SPKI SHA-256 (RFC 7672 §3.1.1), answered with the AD bit ("SECURE").
    zone["_25._tcp.mx.dane.test"] = [("TLSA", (3, 1, 1, spki_sha256(dane_leaf))), "SECURE"]
    other = pki.other.issue(["mx.danebad.test"])  # a key Postfix does not have
    zone["_25._tcp.mx.danebad.test"] = [("TLSA", (3, 1, 1, spki_sha256(other))), "SECURE"]
    zone["_smtp._tls.enforce.test"] = [("TXT", f"v=TLSRPTv1; rua=mailto:tlsrpt@{PLAIN_DOMAIN}")]
    return zone


def seed_report_counts(data_dir: Path) -> None:
    """Results of a finished day, as an earlier run would have left them: the engine's
    first round must turn them into a report."""
    (data_dir / "queue").mkdir(parents=True, mode=0o700)
    store = SQLiteResultStore(data_dir / "queue" / "tlsrpt.sqlite3")
    mode, mx = STS_DOMAINS["enforce.test"]
    policy = ReportPolicy(
        PolicyType.STS,
        "enforce.test",
        tuple(policy_text(mode, mx).decode().splitlines()),
        tuple(mx),
    )
    detail = FailureDetail(
        ResultType.CERTIFICATE_EXPIRED,
        receiving_mx_hostname="mx.enforce.test",
        receiving_ip=PEER_ADDRESS,
    )

    async def seed() -> None:
        await store.add(REPORT_DAY, policy, success=True, count=3)
        await store.add(REPORT_DAY, policy, success=False, detail=detail)

    asyncio.run(seed())


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    require_tool("postfix")
    require_tool("postmap")
    root = tmp_path_factory.mktemp("outbound-tls")
    pki = PKI.create(root / "pki")
    trusted = chain_file(pki.root.issue(["mx.enforce.test", "mx.outside.test"]), pki.directory, "t")
    untrusted_names = ["mx.badcert.test", "mx.testing.test", "mx.dane.test", "mx.danebad.test"]
    untrusted_leaf = pki.other.issue(untrusted_names)
    untrusted = chain_file(untrusted_leaf, pki.directory, "u")
    postfix = PostfixMX(
        PEER_ADDRESS,
        free_port(PEER_ADDRESS),
        PLAIN_DOMAIN,
        ["bob", "tlsrpt"],
        extra_domains=[*STS_DOMAINS, *DANE_DOMAINS],
        sni_chains={
            "mx.enforce.test": trusted,
            "mx.outside.test": trusted,
            **dict.fromkeys(untrusted_names, untrusted),
        },
    )
    policy_host = PolicyHost(
        pki.server_context(pki.root.issue([f"mta-sts.{d}" for d in STS_DOMAINS]), "policy"),
        {f"mta-sts.{d}": policy_text(*spec) for d, spec in STS_DOMAINS.items()},
    )
    dns = DNSServer()
    proc: subprocess.Popen[str] | None = None
    try:
        postfix.start()
        dns.set_zone(build_zone(pki, untrusted_leaf))
        data_dir = root / "var"
        seed_report_counts(data_dir)
        proc, info = start_outbound_dev(
            data_dir,
            dns.port,
            postfix.port,
            {
                "MAILFORT_OUTBOUND_CA_FILE": str(pki.ca_file),
                "MAILFORT_MTA_STS_PORT": str(policy_host.port),
            },
        )
        yield Setup(data_dir, info["ports"], info["password"], postfix, policy_host, dns)
    finally:
        if proc is not None:
            stop_dev(proc)
        postfix.remove()
        policy_host.close()
        dns.close()


def summary(results: list[PolicyResult]) -> dict[str, tuple[int, int, list[str]]]:
    """policy type -> (successes, failures, failure kinds @ MX)."""
    out = {}
    for r in results:
        kinds = sorted(f"{d.result_type}@{d.receiving_mx_hostname}" for d, _ in r.details)
        out[str(r.policy.policy_type)] = (r.successes, r.failures, kinds)
    return out


def deferred(setup: Setup, rcpt: str) -> tuple[int, str]:
    """Wait for the first failed attempt; the entry must still be queued (no bounce)."""
    [entry] = wait_for(lambda: [e for e in setup.queued(rcpt) if e[0] >= 1], f"{rcpt} deferred")
    return entry  # type: ignore[no-any-return]


# -- MTA-STS (RFC 8461) ---------------------------------------------------------------------


def test_enforce_with_a_valid_certificate_delivers(setup: Setup) -> None:
    setup.send("bob@enforce.test", "sts-enforce-ok")
    wait_for(lambda: setup.arrived("bob@enforce.test", "sts-enforce-ok"), "delivery")
    assert "mta-sts.enforce.test" in setup.policy_host.seen  # the policy was fetched
    # Counted under the domain's STS policy: the session was verified, not opportunistic.
    successes, failures, _ = summary(setup.tls_results("enforce.test"))["sts"]
    assert successes >= 1 and failures == 0


def test_enforce_never_uses_an_mx_outside_the_policy(setup: Setup) -> None:
    setup.send("bob@outside.test", "sts-outside")
    attempts, error = deferred(setup, "bob@outside.test")
    # RFC 8461 §5.1: temporary, so the queue retries (a new policy may come) and never bounces.
    assert error.startswith("451 4.7.5") and "mx-not-in-sts-policy" in error, error
    assert not setup.arrived("bob@outside.test", "sts-outside")
    successes, failures, kinds = summary(setup.tls_results("outside.test"))["sts"]
    assert successes == 0 and failures >= attempts  # refused at planning, every attempt
    assert set(kinds) == {"validation-failure@mx.outside.test"}


def test_enforce_refuses_a_certificate_from_another_ca(setup: Setup) -> None:
    setup.send("bob@badcert.test", "sts-badcert")
    _, error = deferred(setup, "bob@badcert.test")
    assert error.startswith("451 4.7.5") and "certificate-not-trusted" in error, error
    time.sleep(0.5)
    assert not setup.arrived("bob@badcert.test", "sts-badcert")
    successes, failures, kinds = summary(setup.tls_results("badcert.test"))["sts"]
    assert successes == 0 and failures >= 1
    assert set(kinds) == {"certificate-not-trusted@mx.badcert.test"}


def test_tls_required_no_delivers_despite_the_policy(setup: Setup) -> None:
    # RFC 8689 §5: the sender waives MTA-STS and DANE for this message (TLS-RPT reports
    # do, RFC 8460 §5.3.1); badcert.test's enforce policy would refuse its MX otherwise.
    setup.send("bob@badcert.test", "tls-not-required", "TLS-Required: No\r\n")
    wait_for(lambda: setup.arrived("bob@badcert.test", "tls-not-required"), "delivery")


def test_testing_mode_delivers_and_reports_the_bad_certificate(setup: Setup) -> None:
    setup.send("bob@testing.test", "sts-testing")
    wait_for(lambda: setup.arrived("bob@testing.test", "sts-testing"), "delivery in testing mode")
    [result] = setup.tls_results("testing.test")
    assert result.policy.policy_type is PolicyType.STS
    assert result.successes == 0 and result.failures >= 1  # the unverified retry is no success
    [(detail, _count)] = result.details
    assert detail.result_type is ResultType.CERTIFICATE_NOT_TRUSTED
    assert (detail.receiving_mx_hostname, detail.receiving_ip) == ("mx.testing.test", PEER_ADDRESS)


def test_no_policy_is_opportunistic(setup: Setup) -> None:
    setup.send(f"bob@{PLAIN_DOMAIN}", "no-policy")
    wait_for(lambda: setup.arrived(f"bob@{PLAIN_DOMAIN}", "no-policy"), "opportunistic delivery")
    assert "mta-sts.remote.test" not in setup.policy_host.seen  # no TXT record, no fetch
    successes, failures, _ = summary(setup.tls_results(PLAIN_DOMAIN))["no-policy-found"]
    assert successes >= 1 and failures == 0
    # STARTTLS with a self-signed certificate: Postfix's summary line, written when the
    # session ends (after the engine's idle timeout: sessions are kept for reuse).
    wait_for(lambda: "starttls=1" in setup.postfix.log_tail(400), "the session summary")


# -- DANE (RFC 7672) --------------------------------------------------------------------------


def test_dane_match_delivers_without_a_trusted_ca(setup: Setup) -> None:
    setup.send("bob@dane.test", "dane-ok")
    wait_for(lambda: setup.arrived("bob@dane.test", "dane-ok"), "delivery under DANE")
    # RFC 8460 §1.3: for DANE the policy domain is the TLSA base domain, the MX host.
    successes, failures, _ = summary(setup.tls_results("mx.dane.test"))["tlsa"]
    assert successes >= 1 and failures == 0


def test_dane_mismatch_is_not_used(setup: Setup) -> None:
    setup.send("bob@danebad.test", "dane-bad")
    _, error = deferred(setup, "bob@danebad.test")
    assert error.startswith("451 4.7.5") and "(dane)" in error, error
    assert not setup.arrived("bob@danebad.test", "dane-bad")
    _, failures, kinds = summary(setup.tls_results("mx.danebad.test"))["tlsa"]
    assert failures >= 1 and set(kinds) == {"validation-failure@mx.danebad.test"}


# -- TLS-RPT (RFC 8460) -----------------------------------------------------------------------


def test_a_finished_days_report_is_mailed_to_the_rua(setup: Setup) -> None:
    def report() -> list[bytes]:
        return [m for m in setup.postfix.messages("tlsrpt") if b"TLS-Report-Domain:" in m]

    [raw] = wait_for(report, "the TLS-RPT report at the rua")
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["TLS-Report-Domain"] == "enforce.test"
    assert msg["TLS-Report-Submitter"] == "mx.example.test"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    [part] = [p for p in msg.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    body = json.loads(gzip.decompress(payload))
    assert body["report-id"] == f"{REPORT_DAY:%Y%m%d}.enforce.test@mx.example.test"
    assert body["date-range"]["start-datetime"] == f"{REPORT_DAY:%Y-%m-%d}T00:00:00Z"
    [policy] = body["policies"]
    assert policy["policy"]["policy-type"] == "sts"
    assert policy["summary"] == {
        "total-successful-session-count": 3,
        "total-failure-session-count": 1,
    }
    assert policy["failure-details"][0]["result-type"] == "certificate-expired"
    # RFC 8460 §3: signed by the reporting domain, the whole body (no l=). The node is
    # mx.example.test; example.test, the hosted parent, signs.
    setup.dns.add_records(dkim_zone(setup.data_dir, "example.test"))
    resolver = Resolver([Nameserver("127.0.0.1", setup.dns.port)])
    crlf = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")  # Maildir stores LF
    verdict = asyncio.run(verify_dkim(resolver, crlf))
    assert sorted((s.domain, s.algorithm, s.result) for s in verdict.signatures) == [
        ("example.test", "ed25519-sha256", "pass"),
        ("example.test", "rsa-sha256", "pass"),
    ]
    assert not any(" l=" in h or ";l=" in h for h in msg.get_all("DKIM-Signature", []))
    # Reported means forgotten (data minimisation).
    wait_for(lambda: not setup.tls_results("enforce.test", REPORT_DAY), "the day's counts removed")


def dkim_zone(data_dir: Path, domain: str) -> dict[str, list[Entry]]:
    """The published DKIM key records of a hosted domain."""
    directory = Directory.open(f"sqlite:///{data_dir / 'directory.sqlite3'}")
    try:
        return {
            f"{k.selector}._domainkey.{domain}": [
                ("TXT", dkimkeys.dns_value(k.algorithm, k.public_b64))
            ]
            for k in directory.dkim_keys(domain)
        }
    finally:
        directory.close()


async def test_mailed_reports_are_signed_by_the_nearest_hosted_domain(
    dns_server: DNSFixture, tmp_path: Path
) -> None:
    settings = config.load(None, {"MAILFORT_DATA_DIR": str(tmp_path)})
    directory = Directory.open(settings.directory_url, ServerKey.load_or_create(tmp_path))
    try:
        directory.add_domain("example.test")
    finally:
        directory.close()
    keys = directory_signing_keys(settings)
    assert [k.domain for k in keys("mx.example.test")] == ["example.test", "example.test"]
    assert keys("other.test") == [] and keys("test") == []
    dns_server.set_zone(
        {
            "_smtp._tls.mail.test": [("TXT", "v=TLSRPTv1; rua=mailto:reports@rua.test")],
            **dkim_zone(tmp_path, "example.test"),
        }
    )
    store = MemoryResultStore()
    await store.add(REPORT_DAY, ReportPolicy(PolicyType.NO_POLICY, "mail.test"), success=True)
    queue = Queue(tmp_path, ServerKey.load_or_create(tmp_path))
    try:
        sender = TLSReportSender(
            store,
            dns_server.resolver,
            queue,
            default_identity("mx.example.test"),
            delay=0,
            signing_keys=keys,
        )
        assert await sender.send_due() == 1
        [waiting] = queue.due(time.time() + 1)
        message = queue.message(waiting.message_id)
        assert message is not None
    finally:
        queue.close()
    verdict = await verify_dkim(dns_server.resolver, message.body)
    assert sorted((s.domain, s.result) for s in verdict.signatures) == [
        ("example.test", "pass"),
        ("example.test", "pass"),
    ]
    headers = message.body.split(b"\r\n\r\n", 1)[0]
    assert b" l=" not in headers and b";l=" not in headers  # RFC 8460 §3: never l=


# -- the client's other paths, against aiosmtpd in-process (no Postfix needed) ----------------


class Sink:
    """aiosmtpd handler keeping (recipients, whether the session was TLS) per message."""

    def __init__(self) -> None:
        self.received: list[tuple[list[str], bool]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((list(envelope.rcpt_tos), session.ssl is not None))
        return "250 2.0.0 OK"


@contextlib.contextmanager
def smtp_server(tls_context: ssl.SSLContext | None = None) -> Iterator[tuple[Sink, int]]:
    """An SMTP server on 127.0.0.1; STARTTLS is offered only with ``tls_context``."""
    sink = Sink()
    controller = Controller(
        sink, hostname="127.0.0.1", port=free_port("127.0.0.1"), tls_context=tls_context
    )
    controller.start()
    try:
        yield sink, controller.port
    finally:
        controller.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI.create(tmp_path_factory.mktemp("client-pki"))


@pytest.fixture(scope="module")
def https(pki: PKI) -> Iterator[HTTPSServer]:
    server = HTTPSServer(pki.server_context(pki.root.issue(["mta-sts.sts.test"]), "sts-host"))
    server.route(WELL_KNOWN, Canned(body=policy_text("enforce", ["mx.sts.test"])))
    yield server
    server.close()


def policy_for(
    dns: DNSFixture, pki: PKI, https: HTTPSServer
) -> tuple[TLSPolicy, MemoryResultStore]:
    store = MemoryResultStore()
    mtasts = MTASTS(dns.resolver, ca_file=pki.ca_file, port=https.port, timeout=3.0)
    reporter = TLSReporter(store)
    return TLSPolicy(dns.resolver, mtasts=mtasts, reporter=reporter, ca_file=pki.ca_file), store


def client_zone(domain: str, *, sts: bool) -> dict[str, list[Entry]]:
    zone: dict[str, list[Entry]] = {
        domain: [("MX", (10, f"mx.{domain}"))],
        f"mx.{domain}": [("A", "127.0.0.1")],
    }
    if sts:
        zone[f"_mta-sts.{domain}"] = [("TXT", "v=STSv1; id=1")]
        zone[f"mta-sts.{domain}"] = [("A", "127.0.0.1")]
    return zone


async def send(dns: DNSFixture, domain: str, port: int, tls: TLSPolicy | None) -> client.Outcome:
    outcomes = await client.deliver(
        dns.resolver,
        domain,
        "a@example.test",
        [f"b@{domain}"],
        b"Subject: t\r\n\r\nhi\r\n",
        helo="mx.example.test",
        port=port,
        timeout=10,
        tls=tls,
    )
    return outcomes[f"b@{domain}"]


async def today_summary(store: MemoryResultStore, domain: str) -> dict[str, Any]:
    return summary(await store.results(dt.datetime.now(dt.UTC).date(), domain))


async def test_without_a_policy_object_delivery_is_as_before(dns_server: DNSFixture) -> None:
    dns_server.set_zone(client_zone("plain.test", sts=False))
    with smtp_server() as (sink, port):
        outcome = await send(dns_server, "plain.test", port, None)
    assert outcome.delivered and sink.received == [(["b@plain.test"], False)]


async def test_enforce_refuses_an_mx_without_starttls(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer
) -> None:
    dns_server.set_zone(client_zone("sts.test", sts=True))
    tls, store = policy_for(dns_server, pki, https)
    with smtp_server() as (sink, port):
        outcome = await send(dns_server, "sts.test", port, tls)
    assert not outcome.permanent and outcome.code == 451, outcome  # RFC 8461 §5.1: defer
    assert "starttls-not-supported" in outcome.text
    assert sink.received == []
    assert await today_summary(store, "sts.test") == {
        "sts": (0, 1, ["starttls-not-supported@mx.sts.test"])
    }


async def test_opportunistic_without_starttls_sends_in_clear_and_reports(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer
) -> None:
    dns_server.set_zone(client_zone("clear.test", sts=False))
    tls, store = policy_for(dns_server, pki, https)
    with smtp_server() as (sink, port):
        outcome = await send(dns_server, "clear.test", port, tls)
    assert outcome.delivered and sink.received == [(["b@clear.test"], False)]
    assert await today_summary(store, "clear.test") == {
        "no-policy-found": (0, 1, ["starttls-not-supported@mx.clear.test"])
    }


async def test_opportunistic_failed_handshake_falls_back_to_clear_text(
    dns_server: DNSFixture, pki: PKI, https: HTTPSServer
) -> None:
    # A server that demands a client certificate fails every handshake we make (TLS 1.2,
    # so the failure comes inside the handshake rather than after it).
    broken = pki.server_context(pki.root.issue(["mx.broken.test"]), "broken")
    broken.maximum_version = ssl.TLSVersion.TLSv1_2
    broken.verify_mode = ssl.CERT_REQUIRED
    broken.load_verify_locations(pki.ca_file)
    dns_server.set_zone(client_zone("broken.test", sts=False))
    tls, store = policy_for(dns_server, pki, https)
    with smtp_server(broken) as (sink, port):
        outcome = await send(dns_server, "broken.test", port, tls)
    # RFC 7435 §1.3: without a policy, a failed handshake falls back to clear text on a
    # new connection (the failed one is unusable, RFC 3207 §4.1).
    assert outcome.delivered and sink.received == [(["b@broken.test"], False)]
    [(successes, failures, [kind])] = (await today_summary(store, "broken.test")).values()
    assert (successes, failures, kind) == (0, 1, "validation-failure@mx.broken.test")


# -- the daily TLS-RPT sender ------------------------------------------------------------------


async def test_report_sender_queues_posts_and_forgets(
    dns_server: DNSFixture, pki: PKI, tmp_path: Path
) -> None:
    collector = HTTPSServer(pki.server_context(pki.root.issue(["rua.web.test"]), "rua"))
    collector.route("/ok", Canned(body=b""))
    collector.route("/down", Canned(500, b""))
    rua = f"https://rua.web.test:{collector.port}"
    dns_server.set_zone(
        {
            "_smtp._tls.mail.test": [("TXT", "v=TLSRPTv1; rua=mailto:reports@rua.test")],
            "_smtp._tls.web.test": [("TXT", f"v=TLSRPTv1; rua={rua}/ok")],
            "_smtp._tls.down.test": [("TXT", f"v=TLSRPTv1; rua={rua}/down")],
            "rua.web.test": [("A", "127.0.0.1")],
        }
    )
    store = MemoryResultStore()
    yesterday = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    for domain, day in [
        ("mail.test", REPORT_DAY),
        ("web.test", REPORT_DAY),
        ("none.test", REPORT_DAY),  # publishes no TLSRPT record
        ("down.test", yesterday),  # its endpoint fails: kept for another try
    ]:
        await store.add(day, ReportPolicy(PolicyType.NO_POLICY, domain), success=True)
    queue = Queue(tmp_path, ServerKey.load_or_create(tmp_path))
    try:
        sender = TLSReportSender(
            store,
            dns_server.resolver,
            queue,
            default_identity("mx.example.test"),
            https_context=pkix_context(pki.ca_file),
            https_timeout=5,
            delay=0,
            allow_private=True,  # the collector listens on loopback
        )
        assert await sender.send_due() == 2
        [waiting] = queue.due(time.time() + 1)
        message = queue.message(waiting.message_id)
        assert message is not None
        assert (waiting.rcpt, message.mail_from) == ("reports@rua.test", "")  # null sender
        assert b"TLS-Report-Domain: mail.test" in message.body
    finally:
        queue.close()
        collector.close()
    [post] = [r for r in collector.requests if r.path == "/ok"]
    assert post.method == "POST" and post.headers["content-type"] == "application/tlsrpt+gzip"
    assert json.loads(gzip.decompress(post.body))["policies"][0]["policy"]["policy-domain"] == (
        "web.test"
    )
    assert await store.pending(dt.datetime.now(dt.UTC).date()) == [(yesterday, "down.test")]


# -- settings -----------------------------------------------------------------------------------


def test_settings_for_the_ca_bundle_and_the_policy_port(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    env = {"MAILFORT_DATA_DIR": str(tmp_path), "MAILFORT_OUTBOUND_CA_FILE": str(ca)}
    settings = config.load(None, {**env, "MAILFORT_MTA_STS_PORT": "8443"})
    assert (settings.outbound_ca_file, settings.mta_sts_port) == (ca, 8443)
    defaults = config.load(None, {"MAILFORT_DATA_DIR": str(tmp_path)})
    assert (defaults.outbound_ca_file, defaults.mta_sts_port) == (None, 443)  # system store
    toml = tmp_path / "mailfort.toml"
    toml.write_text(f'data_dir = "{tmp_path}"\n[outbound]\nca_file = "{ca}"\nmta_sts_port = 4443\n')
    assert config.load(toml, {}).mta_sts_port == 4443
    with pytest.raises(config.ConfigError, match=r"outbound\.ca_file"):
        config.load(None, {**env, "MAILFORT_OUTBOUND_CA_FILE": str(tmp_path / "missing.pem")})
    with pytest.raises(config.ConfigError, match=r"outbound\.mta_sts_port"):
        config.load(None, {**env, "MAILFORT_MTA_STS_PORT": "70000"})
