"""SMTP TLS Reporting (RFC 8460): count TLS results, find ``rua``, build daily reports.

Delivery records one result per SMTP session (or per policy failure that stopped one)
against a *policy*: the MTA-STS policy of the recipient domain, the TLSA RRset of an MX
host, or "no-policy-found" (RFC 8460 §4.4). Results are counted per policy domain per
UTC day in a `ResultStore`. After the day ends, `daily_reports` turns each policy
domain's results into the §4.4 JSON, gzipped, as an RFC 5322 message for every
``mailto:`` rua (§5.3) and as a POST body for every ``https:`` rua (§5.3.2); the queue
sends them and then calls `ResultStore.remove`.

Report messages must be DKIM-signed by the submitter's domain (§5.3); the queue's
signer does that and should include ``TLS-Report-Domain`` and ``TLS-Report-Submitter``
among the signed headers.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.policy
import gzip
import hashlib
import json
import re
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime, make_msgid
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from mailfort.dns import Resolver, TemporaryDNSError

from . import _https, _sqlite
from .contexts import pkix_context
from .webhook import address_refusal


class ResultType(StrEnum):
    """RFC 8460 §4.3 result types (IANA "STARTTLS Validation Result Types")."""

    # §4.3.1 negotiation failures
    STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
    CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
    CERTIFICATE_EXPIRED = "certificate-expired"
    CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
    VALIDATION_FAILURE = "validation-failure"
    # §4.3.2.1 DANE
    TLSA_INVALID = "tlsa-invalid"
    DNSSEC_INVALID = "dnssec-invalid"
    DANE_REQUIRED = "dane-required"
    # §4.3.2.2 MTA-STS
    STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
    STS_POLICY_INVALID = "sts-policy-invalid"
    STS_WEBPKI_INVALID = "sts-webpki-invalid"


class PolicyType(StrEnum):
    """RFC 8460 §4.4 ``policy-type``."""

    STS = "sts"
    TLSA = "tlsa"
    NO_POLICY = "no-policy-found"


@dataclass(frozen=True)
class ReportPolicy:
    """The ``policy`` object of a report (RFC 8460 §4.4).

    ``policy_domain`` is the recipient domain for MTA-STS and for "no-policy-found", and
    the TLSA base domain (the MX host) for DANE (RFC 8460 §1.3 "Policy Domain").
    ``policy_strings`` are the policy's lines (MTA-STS) or the TLSA records in
    presentation form (DANE); ``mx_hosts`` the policy's MX patterns (MTA-STS) or the MX
    host (DANE).
    """

    policy_type: PolicyType
    policy_domain: str
    policy_strings: tuple[str, ...] = ()
    mx_hosts: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"policy-type": str(self.policy_type)}
        if self.policy_strings:
            out["policy-string"] = list(self.policy_strings)
        out["policy-domain"] = self.policy_domain
        if self.mx_hosts:
            # An array of strings: RFC 8460 erratum 6241 corrected the §4.4 example.
            out["mx-host"] = list(self.mx_hosts)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ReportPolicy:
        return cls(
            PolicyType(data["policy-type"]),
            str(data["policy-domain"]),
            tuple(str(s) for s in data.get("policy-string", ())),
            tuple(str(s) for s in data.get("mx-host", ())),
        )

    def key(self) -> str:
        """A stable identity for counting: equal policies share one row."""
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class FailureDetail:
    """One kind of failure (RFC 8460 §4.4 ``failure-details`` without the count)."""

    result_type: ResultType
    sending_mta_ip: str | None = None
    receiving_mx_hostname: str | None = None
    receiving_mx_helo: str | None = None
    receiving_ip: str | None = None
    additional_information: str | None = None
    failure_reason_code: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"result-type": str(self.result_type)}
        for name, value in (
            ("sending-mta-ip", self.sending_mta_ip),
            ("receiving-mx-hostname", self.receiving_mx_hostname),
            ("receiving-mx-helo", self.receiving_mx_helo),
            ("receiving-ip", self.receiving_ip),
            ("additional-information", self.additional_information),
            ("failure-reason-code", self.failure_reason_code),
        ):
            if value is not None:
                out[name] = value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FailureDetail:
        def opt(name: str) -> str | None:
            value = data.get(name)
            return None if value is None else str(value)

        return cls(
            ResultType(data["result-type"]),
            opt("sending-mta-ip"),
            opt("receiving-mx-hostname"),
            opt("receiving-mx-helo"),
            opt("receiving-ip"),
            opt("additional-information"),
            opt("failure-reason-code"),
        )

    def key(self) -> str:
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class PolicyResult:
    """A day's counts for one policy: the ``policies`` entries of a report."""

    policy: ReportPolicy
    successes: int = 0
    failures: int = 0
    details: list[tuple[FailureDetail, int]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "policy": self.policy.to_json(),
            "summary": {
                "total-successful-session-count": self.successes,
                "total-failure-session-count": self.failures,
            },
        }
        if self.details:
            ordered = sorted(self.details, key=lambda d: (-d[1], d[0].key()))
            out["failure-details"] = [
                {**detail.to_json(), "failed-session-count": count} for detail, count in ordered
            ]
        return out


# -- storage ---------------------------------------------------------------------------


class ResultStore(Protocol):
    """Where TLS results wait for their daily report. Async so that a shared store
    (PostgreSQL, Redis) can implement it for several nodes."""

    async def add(
        self,
        day: dt.date,
        policy: ReportPolicy,
        *,
        success: bool,
        detail: FailureDetail | None = None,
        count: int = 1,
    ) -> None:
        """Count ``count`` sessions; a failure counts under ``detail`` too when given."""
        ...

    async def pending(self, before: dt.date) -> list[tuple[dt.date, str]]:
        """(day, policy domain) pairs with results from days before ``before``."""
        ...

    async def results(self, day: dt.date, policy_domain: str) -> list[PolicyResult]: ...

    async def remove(self, day: dt.date, policy_domain: str) -> None:
        """Forget a reported day (data minimisation: nothing is kept past its report)."""
        ...


class MemoryResultStore:
    """In-process `ResultStore`, for tests and single-process development."""

    def __init__(self) -> None:
        self._rows: dict[tuple[dt.date, str], PolicyResult] = {}

    async def add(
        self,
        day: dt.date,
        policy: ReportPolicy,
        *,
        success: bool,
        detail: FailureDetail | None = None,
        count: int = 1,
    ) -> None:
        row = self._rows.setdefault((day, policy.key()), PolicyResult(policy))
        if success:
            row.successes += count
            return
        row.failures += count
        if detail is not None:
            for i, (known, n) in enumerate(row.details):
                if known == detail:
                    row.details[i] = (known, n + count)
                    break
            else:
                row.details.append((detail, count))

    async def pending(self, before: dt.date) -> list[tuple[dt.date, str]]:
        found = {(day, row.policy.policy_domain) for (day, _), row in self._rows.items()}
        return sorted(p for p in found if p[0] < before)

    async def results(self, day: dt.date, policy_domain: str) -> list[PolicyResult]:
        return [
            row
            for (d, _), row in sorted(self._rows.items(), key=lambda kv: (kv[0][0], kv[0][1]))
            if d == day and row.policy.policy_domain == policy_domain
        ]

    async def remove(self, day: dt.date, policy_domain: str) -> None:
        for key in [
            k
            for k, row in self._rows.items()
            if k[0] == day and row.policy.policy_domain == policy_domain
        ]:
            del self._rows[key]


_RESULT_SCHEMA = """
CREATE TABLE IF NOT EXISTS tlsrpt_policy (
    day TEXT NOT NULL,
    policy_key TEXT NOT NULL,
    policy_domain TEXT NOT NULL,
    policy_json TEXT NOT NULL,
    successes INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, policy_key)
);
CREATE INDEX IF NOT EXISTS tlsrpt_policy_domain ON tlsrpt_policy (day, policy_domain);
CREATE TABLE IF NOT EXISTS tlsrpt_failure (
    day TEXT NOT NULL,
    policy_key TEXT NOT NULL,
    detail_key TEXT NOT NULL,
    detail_json TEXT NOT NULL,
    sessions INTEGER NOT NULL,
    PRIMARY KEY (day, policy_key, detail_key)
);
"""


class SQLiteResultStore:
    """`ResultStore` in an SQLite file; blocking work runs in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        _sqlite.connect(self.path, _RESULT_SCHEMA).close()

    async def add(
        self,
        day: dt.date,
        policy: ReportPolicy,
        *,
        success: bool,
        detail: FailureDetail | None = None,
        count: int = 1,
    ) -> None:
        await asyncio.to_thread(self._add, day, policy, success, detail, count)

    def _add(
        self,
        day: dt.date,
        policy: ReportPolicy,
        success: bool,
        detail: FailureDetail | None,
        count: int,
    ) -> None:
        pkey = policy.key()
        conn = _sqlite.connect(self.path, _RESULT_SCHEMA)
        try:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(
                    "INSERT INTO tlsrpt_policy (day, policy_key, policy_domain, policy_json,"
                    " successes, failures) VALUES (?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (day, policy_key) DO UPDATE SET"
                    " successes = successes + excluded.successes,"
                    " failures = failures + excluded.failures",
                    (
                        day.isoformat(),
                        pkey,
                        policy.policy_domain,
                        json.dumps(policy.to_json()),
                        count if success else 0,
                        0 if success else count,
                    ),
                )
                if not success and detail is not None:
                    conn.execute(
                        "INSERT INTO tlsrpt_failure (day, policy_key, detail_key, detail_json,"
                        " sessions) VALUES (?, ?, ?, ?, ?)"
                        " ON CONFLICT (day, policy_key, detail_key) DO UPDATE SET"
                        " sessions = sessions + excluded.sessions",
                        (day.isoformat(), pkey, detail.key(), json.dumps(detail.to_json()), count),
                    )
        finally:
            conn.close()

    async def pending(self, before: dt.date) -> list[tuple[dt.date, str]]:
        return await asyncio.to_thread(self._pending, before)

    def _pending(self, before: dt.date) -> list[tuple[dt.date, str]]:
        conn = _sqlite.connect(self.path, _RESULT_SCHEMA)
        try:
            rows = conn.execute(
                "SELECT DISTINCT day, policy_domain FROM tlsrpt_policy WHERE day < ?"
                " ORDER BY day, policy_domain",
                (before.isoformat(),),
            ).fetchall()
        finally:
            conn.close()
        return [(dt.date.fromisoformat(day), domain) for day, domain in rows]

    async def results(self, day: dt.date, policy_domain: str) -> list[PolicyResult]:
        return await asyncio.to_thread(self._results, day, policy_domain)

    def _results(self, day: dt.date, policy_domain: str) -> list[PolicyResult]:
        conn = _sqlite.connect(self.path, _RESULT_SCHEMA)
        try:
            policies = conn.execute(
                "SELECT policy_key, policy_json, successes, failures FROM tlsrpt_policy"
                " WHERE day = ? AND policy_domain = ? ORDER BY policy_key",
                (day.isoformat(), policy_domain),
            ).fetchall()
            out: list[PolicyResult] = []
            for pkey, pjson, successes, failures in policies:
                details = conn.execute(
                    "SELECT detail_json, sessions FROM tlsrpt_failure"
                    " WHERE day = ? AND policy_key = ? ORDER BY detail_key",
                    (day.isoformat(), pkey),
                ).fetchall()
                out.append(
                    PolicyResult(
                        ReportPolicy.from_json(json.loads(pjson)),
                        int(successes),
                        int(failures),
                        [(FailureDetail.from_json(json.loads(d)), int(n)) for d, n in details],
                    )
                )
        finally:
            conn.close()
        return out

    async def remove(self, day: dt.date, policy_domain: str) -> None:
        await asyncio.to_thread(self._remove, day, policy_domain)

    def _remove(self, day: dt.date, policy_domain: str) -> None:
        conn = _sqlite.connect(self.path, _RESULT_SCHEMA)
        try:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(
                    "DELETE FROM tlsrpt_failure WHERE day = ? AND policy_key IN"
                    " (SELECT policy_key FROM tlsrpt_policy WHERE day = ? AND policy_domain = ?)",
                    (day.isoformat(), day.isoformat(), policy_domain),
                )
                conn.execute(
                    "DELETE FROM tlsrpt_policy WHERE day = ? AND policy_domain = ?",
                    (day.isoformat(), policy_domain),
                )
        finally:
            conn.close()


class TLSReporter:
    """What delivery calls: counts a session's result under today's UTC date."""

    def __init__(self, store: ResultStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    def today(self) -> dt.date:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC).date()

    async def success(self, policy: ReportPolicy) -> None:
        await self.store.add(self.today(), policy, success=True)

    async def failure(self, policy: ReportPolicy, detail: FailureDetail) -> None:
        await self.store.add(self.today(), policy, success=False, detail=detail)


# -- the TLSRPT record (RFC 8460 §3) -----------------------------------------------------

_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+\Z")


class RecordError(ValueError):
    """A TLSRPT TXT record that does not follow RFC 8460 §3."""


@dataclass(frozen=True)
class TLSRPTRecord:
    """A parsed ``_smtp._tls`` record: where reports go."""

    rua: tuple[str, ...]
    extensions: tuple[tuple[str, str], ...] = ()

    def mailto(self) -> list[str]:
        """Addresses of the ``mailto:`` URIs (RFC 6068), query parts dropped."""
        out: list[str] = []
        for uri in self.rua:
            if uri[:7].lower() == "mailto:":
                address = urllib.parse.unquote(uri[7:].split("?", 1)[0])
                if "@" in address and not any(c in address for c in "\r\n,<> "):
                    out.append(address)
        return out

    def https(self) -> list[str]:
        return [uri for uri in self.rua if uri[:8].lower() == "https://"]


def parse_tlsrpt_record(txt: str) -> TLSRPTRecord:
    """Parse ``v=TLSRPTv1; rua=...`` strictly per the RFC 8460 §3 ABNF."""
    fields = [f.strip(" \t") for f in txt.split(";")]
    if fields and fields[-1] == "":
        fields.pop()  # the grammar allows one trailing delimiter
    if not fields or fields[0] != "v=TLSRPTv1":
        raise RecordError("record does not start with v=TLSRPTv1")
    rua: list[str] = []
    extensions: list[tuple[str, str]] = []
    for item in fields[1:]:
        name, eq, value = item.partition("=")
        if not eq:
            raise RecordError(f"field without '=': {item!r}")
        if name == "rua":
            if rua:
                raise RecordError("rua given twice")
            for uri in value.split(","):
                uri = uri.strip(" \t")
                scheme, colon, rest = uri.partition(":")
                if not colon or not rest or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
                    raise RecordError(f"rua entry is not a URI: {uri!r}")
                if any(c.isspace() for c in uri):
                    raise RecordError(f"whitespace inside rua URI {uri!r}")
                rua.append(uri)
        elif _EXT_NAME.match(name) and _EXT_VALUE.match(value):
            extensions.append((name, value))
        else:
            raise RecordError(f"malformed field {item!r}")
    if not rua:
        raise RecordError("no rua")
    return TLSRPTRecord(tuple(rua), tuple(extensions))


async def lookup_tlsrpt(resolver: Resolver, domain: str) -> TLSRPTRecord | None:
    """The domain's reporting policy, or None when it publishes none (or several, or a
    malformed one: RFC 8460 §3 says to assume the domain does not do TLSRPT then).

    Raises `TemporaryDNSError` when DNS fails, so the caller retries later instead of
    dropping the day's report."""
    txts = await resolver.txt(f"_smtp._tls.{domain}")
    # §3: records not starting with "v=TLSRPTv1;" are discarded; exactly one must remain.
    candidates = [t for t in txts if re.match(r"v=TLSRPTv1[ \t]*;", t)]
    if len(candidates) != 1:
        return None
    try:
        return parse_tlsrpt_record(candidates[0])
    except RecordError:
        return None


# -- the report (RFC 8460 §4) ------------------------------------------------------------


def _rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def day_bounds(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """The UTC day as RFC 8460 §4.4's example gives it: 00:00:00 to 23:59:59."""
    start = dt.datetime.combine(day, dt.time(0), dt.UTC)
    return start, start + dt.timedelta(days=1, seconds=-1)


def report_id_for(day: dt.date, policy_domain: str, submitter: str) -> str:
    """Stable for (day, domain): a report rebuilt after a crash keeps its id, so the
    receiver can tell a duplicate. In msg-id form, as the §5.3 Subject line wants."""
    return f"{day:%Y%m%d}.{policy_domain}@{submitter}"


def build_report(
    results: Sequence[PolicyResult],
    *,
    day: dt.date,
    organization_name: str,
    contact_info: str,
    report_id: str,
) -> dict[str, Any]:
    """The §4.4 JSON object for one policy domain and one UTC day."""
    start, end = day_bounds(day)
    return {
        "organization-name": organization_name,
        "date-range": {"start-datetime": _rfc3339(start), "end-datetime": _rfc3339(end)},
        "contact-info": contact_info,
        "report-id": report_id,
        "policies": [r.to_json() for r in results],
    }


def report_json(report: Mapping[str, Any]) -> bytes:
    return json.dumps(report, ensure_ascii=False, indent=1).encode("utf-8")


def gzip_report(report: Mapping[str, Any]) -> bytes:
    """§5.2/§5.3: reports travel gzip-compressed. mtime 0 keeps the bytes reproducible."""
    return gzip.compress(report_json(report), mtime=0)


def report_filename(
    submitter: str, policy_domain: str, start: dt.datetime, end: dt.datetime, unique: str = ""
) -> str:
    """§5.1: ``sender!policy-domain!begin!end[!unique-id].json.gz``, times in epoch s."""
    parts = [submitter, policy_domain, str(int(start.timestamp())), str(int(end.timestamp()))]
    if unique:
        parts.append(unique)
    return "!".join(parts) + ".json.gz"


def _report_window(report: Mapping[str, Any]) -> tuple[dt.datetime, dt.datetime]:
    rng = report["date-range"]
    parse = dt.datetime.fromisoformat
    return parse(rng["start-datetime"]), parse(rng["end-datetime"])


def build_report_message(
    report: Mapping[str, Any],
    *,
    policy_domain: str,
    submitter: str,
    from_addr: str,
    to_addrs: Sequence[str],
    date: dt.datetime | None = None,
    message_id: str | None = None,
) -> bytes:
    """The report as an RFC 5322 message for ``mailto:`` rua (RFC 8460 §5.3).

    multipart/report; report-type="tlsrpt" with a short text part and the gzipped JSON
    as application/tlsrpt+gzip named per §5.1; Subject, TLS-Report-Domain and
    TLS-Report-Submitter per §5.3. ``TLS-Required: No`` (RFC 8689 §5) lets the report
    through to a domain whose TLS is exactly what is broken, as §5.3 intends. The
    message still needs the submitter's DKIM signature before it is sent (§5.3).
    """
    report_id = str(report["report-id"])
    start, end = _report_window(report)
    msg = MIMEMultipart("report", report_type="tlsrpt")
    msg["From"] = from_addr
    msg["To"] = ", ".join(to_addrs)
    msg["Subject"] = (
        f"Report Domain: {policy_domain} Submitter: {submitter} Report-ID: <{report_id}>"
    )
    msg["Date"] = format_datetime(date or dt.datetime.now(dt.UTC))
    msg["Message-ID"] = message_id or make_msgid(domain=submitter)
    msg["TLS-Report-Domain"] = policy_domain
    msg["TLS-Report-Submitter"] = submitter
    msg["TLS-Required"] = "No"
    msg.preamble = "This is a TLS report (RFC 8460)."
    text = (
        "This is an aggregate TLS report (RFC 8460) about mail sent to your domain's\n"
        "servers: counts of TLS sessions and the failures seen.\n\n"
        f"Policy domain: {policy_domain}\n"
        f"Submitter: {submitter}\n"
        f"Report-ID: {report_id}\n"
        f"Period: {_rfc3339(start)} to {_rfc3339(end)}\n"
    )
    msg.attach(MIMEText(text, "plain", "utf-8"))
    filename = report_filename(submitter, policy_domain, start, end)
    part = MIMEApplication(gzip_report(report), "tlsrpt+gzip", name=filename)
    part.add_header("Content-Disposition", "attachment", filename=filename)
    msg.attach(part)
    return msg.as_bytes(policy=email.policy.SMTP)


@dataclass(frozen=True)
class HTTPSReport:
    """An ``https:`` rua submission (RFC 8460 §5.3.2): POST this body with this type."""

    body: bytes
    content_type: str = "application/tlsrpt+gzip"


def build_https_report(report: Mapping[str, Any]) -> HTTPSReport:
    return HTTPSReport(gzip_report(report))


class ReportDeliveryError(Exception):
    """An ``https:`` rua did not accept the report; try again later."""


async def post_https_report(
    uri: str,
    report: HTTPSReport,
    *,
    resolver: Resolver,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 60.0,
    allow_private: bool = False,
) -> None:
    """POST the report; any 2xx is success (RFC 8460 §5.3.2).

    The URI comes from the recipient domain's DNS: whoever runs that zone could point it
    at the operator's own network. So, as for webhooks, every address of the host is
    vetted (`relay.webhook.address_refusal`) and the connection goes to a vetted one.
    """
    url = urllib.parse.urlsplit(uri)
    if url.scheme.lower() != "https" or not url.hostname:
        raise ReportDeliveryError(f"not an https URI: {uri!r}")
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    try:
        addresses = await resolver.addresses(url.hostname)
    except TemporaryDNSError as exc:
        raise ReportDeliveryError(f"{url.hostname}: address lookup failed") from exc
    for address in addresses:
        why = address_refusal(address, allow_private=allow_private)
        if why is not None:
            raise ReportDeliveryError(f"{url.hostname} has a {why} address: not posting there")
    if not addresses:
        raise ReportDeliveryError(f"{url.hostname}: no address")
    try:
        response = await _https.request(
            "POST",
            url.hostname,
            path,
            resolver=resolver,
            ssl_context=ssl_context or pkix_context(),
            port=url.port or 443,
            body=report.body,
            headers=[("Content-Type", report.content_type)],
            timeout=timeout,
            max_body=65536,
            addresses=addresses,
        )
    except _https.HTTPSError as exc:
        raise ReportDeliveryError(str(exc)) from exc
    if not 200 <= response.status < 300:
        raise ReportDeliveryError(f"{uri}: HTTP {response.status}")


@dataclass(frozen=True)
class PreparedReport:
    """One policy domain's report for one day, ready for the queue."""

    day: dt.date
    policy_domain: str
    report: dict[str, Any]
    mail_recipients: tuple[str, ...]
    message: bytes | None  # for mail_recipients; None when there are none
    https_uris: tuple[str, ...]
    https_report: HTTPSReport


@dataclass(frozen=True)
class ReporterIdentity:
    """Who we are in reports: the §4.4 organisation and contact, and the submitter
    domain that signs the messages (§5.3)."""

    organization_name: str
    contact_info: str
    submitter: str
    from_addr: str


async def daily_reports(
    store: ResultStore,
    resolver: Resolver,
    identity: ReporterIdentity,
    *,
    before: dt.date,
) -> tuple[list[PreparedReport], list[tuple[dt.date, str]]]:
    """Reports for every finished day before ``before``.

    Returns (reports to send, (day, domain) pairs with no rua to remove at once). A
    domain whose TLSRPT lookup fails temporarily is in neither list: its counts wait for
    the next run. The caller queues each report and then calls ``store.remove``.
    """
    ready: list[PreparedReport] = []
    unwanted: list[tuple[dt.date, str]] = []
    for day, domain in await store.pending(before):
        try:
            record = await lookup_tlsrpt(resolver, domain)
        except TemporaryDNSError:
            continue
        mailto = tuple(record.mailto()) if record else ()
        https = tuple(record.https()) if record else ()
        if not mailto and not https:
            unwanted.append((day, domain))
            continue
        results = await store.results(day, domain)
        report = build_report(
            results,
            day=day,
            organization_name=identity.organization_name,
            contact_info=identity.contact_info,
            report_id=report_id_for(day, domain, identity.submitter),
        )
        message = (
            build_report_message(
                report,
                policy_domain=domain,
                submitter=identity.submitter,
                from_addr=identity.from_addr,
                to_addrs=mailto,
            )
            if mailto
            else None
        )
        ready.append(
            PreparedReport(day, domain, report, mailto, message, https, build_https_report(report))
        )
    return ready, unwanted
