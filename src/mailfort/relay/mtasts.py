"""MTA-STS (RFC 8461): discover, fetch, parse and cache a recipient domain's policy.

`MTASTS.policy_for(domain)` runs discovery (§3.1, §3.3, §5.1): the ``_mta-sts`` TXT
record names the current policy id; a cached policy with that id is used as it is; a new
id (or no cached policy) means fetching ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``;
and when no live policy can be had, an unexpired cached one still applies (§3.3), so an
attacker who blocks the fetch or the TXT lookup cannot switch a domain's policy off
before its max_age runs out. `mx_allowed(policy, host)` is the §4.1 MX check.

Only the recipient domain itself is looked up, never a parent (§3.4). When enforce mode
leaves no usable MX, the queue defers rather than bounces: §5.1 forbids failing a
message permanently before a new policy has been looked for.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final, Protocol

from mailfort.dns import Resolver, TemporaryDNSError

from . import _https, _sqlite
from ._names import normalize_host, wildcard_match
from .contexts import pkix_context
from .tlsrpt import PolicyType, ReportPolicy, ResultType

WELL_KNOWN_PATH = "/.well-known/mta-sts.txt"
# §3.2: max_age is at most 31557600 s (one year). A larger value is the publisher's
# error; capping it keeps the policy (and its protection) rather than discarding it.
MAX_AGE_LIMIT = 31_557_600
# §3.3 asks for a timeout and a size limit on the fetch without fixing them; one minute
# and 64 KiB are what other implementations use, and a real policy is a few hundred
# octets.
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_SIZE = 64 * 1024
REFRESH_INTERVAL = 86400.0  # §3.3


class Mode(StrEnum):
    """§5: what a sender does when an MX fails the policy."""

    ENFORCE = "enforce"  # do not deliver to it
    TESTING = "testing"  # deliver anyway; report the failure (TLS-RPT)
    NONE = "none"  # the domain withdrew its policy


class PolicyError(ValueError):
    """A policy or TXT record that does not follow RFC 8461 §3."""


# -- the TXT record (§3.1) -----------------------------------------------------------------

_STS_ID = re.compile(r"[A-Za-z0-9]{1,32}\Z")
_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+\Z")


@dataclass(frozen=True)
class STSRecord:
    """``v=STSv1; id=...``: the id changes whenever the policy does."""

    id: str
    extensions: tuple[tuple[str, str], ...] = ()


def parse_record(txt: str) -> STSRecord:
    """Parse one ``_mta-sts`` TXT record per the §3.1 ABNF."""
    fields = txt.split(";")
    # sts-field-delim = *WSP ";" *WSP, and one trailing delimiter is allowed.
    fields = [f.strip(" \t") for f in fields]
    if fields and fields[-1] == "" and len(fields) > 1:
        fields.pop()
    if not fields or fields[0] != "v=STSv1":
        raise PolicyError("record does not start with v=STSv1")
    ident: str | None = None
    extensions: list[tuple[str, str]] = []
    for item in fields[1:]:
        name, eq, value = item.partition("=")
        if not eq:
            raise PolicyError(f"field without '=': {item!r}")
        if name == "id":
            if not _STS_ID.match(value):
                raise PolicyError(f"id must be 1-32 letters or digits: {value!r}")
            if ident is None:  # §3.2 (last paragraph): the first occurrence counts
                ident = value
        elif _EXT_NAME.match(name) and _EXT_VALUE.match(value):
            extensions.append((name, value))
        else:
            raise PolicyError(f"malformed field {item!r}")
    if ident is None:
        raise PolicyError("record has no id")
    return STSRecord(ident, tuple(extensions))


def _is_sts_candidate(txt: str) -> bool:
    # §3.1: records that do not begin with "v=STSv1;" are discarded before counting. The
    # grammar allows blanks before the ";", so "v=STSv1 ;" is an (invalid or valid) STS
    # record, not somebody else's TXT record.
    return re.match(r"v=STSv1[ \t]*;", txt) is not None


# -- the policy (§3.2) ---------------------------------------------------------------------

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_MX_PATTERN = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*\Z")
_POLICY_EXT_VALUE = re.compile(r"[^\x00-\x20\x7f](?:[^\x00-\x1f\x7f]*[^\x00-\x20\x7f])?\Z")


@dataclass(frozen=True)
class Policy:
    """A parsed policy. ``lines`` keeps the served text line by line: TLS-RPT reports
    carry the policy as served (RFC 8460 §4.4 ``policy-string``)."""

    mode: Mode
    max_age: int
    mx: tuple[str, ...]  # patterns, lower-case, "*." allowed as the first label
    version: str = "STSv1"
    extensions: tuple[tuple[str, str], ...] = ()
    lines: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"

    def report_policy(self, domain: str) -> ReportPolicy:
        return ReportPolicy(PolicyType.STS, normalize_host(domain), self.lines, self.mx)


def parse_policy(text: str) -> Policy:
    """Parse a policy body strictly per the §3.2 ABNF.

    Lines end in LF or CRLF. version, mode and max_age are required, at least one mx
    unless the mode is "none"; a repeated field other than mx keeps its first value
    (§3.2); unknown fields are extensions and are ignored. The one leniency: blank lines
    at the very end, which editors add and which carry no meaning.
    """
    body = text.replace("\r\n", "\n")
    if "\r" in body:
        raise PolicyError("bare CR in policy")
    lines = body.split("\n")
    while lines and lines[-1].strip(" \t") == "":
        lines.pop()
    if not lines:
        raise PolicyError("empty policy")
    found: dict[str, str] = {}
    mx: list[str] = []
    extensions: list[tuple[str, str]] = []
    for line in lines:
        name, colon, raw = line.partition(":")
        if not colon:
            raise PolicyError(f"line without ':': {line!r}")
        value = raw.lstrip(" \t").rstrip(" \t")  # field-delim = ":" *WSP; *WSP before term
        if name == "mx":
            if not _MX_PATTERN.match(value) or not value.isascii():
                # §3.2: mx values are A-labels (no U-labels), an optional "*." first.
                raise PolicyError(f"bad mx pattern {value!r}")
            mx.append(value.lower())
        elif name in ("version", "mode", "max_age"):
            found.setdefault(name, value)
        elif _EXT_NAME.match(name) and _POLICY_EXT_VALUE.match(value):
            extensions.append((name, value))
        else:
            raise PolicyError(f"malformed line {line!r}")
    for required in ("version", "mode", "max_age"):
        if required not in found:
            raise PolicyError(f"policy has no {required}")
    if found["version"] != "STSv1":
        raise PolicyError(f"unsupported version {found['version']!r}")
    try:
        mode = Mode(found["mode"])  # case-sensitive (%s"..." in the ABNF)
    except ValueError:
        raise PolicyError(f"unknown mode {found['mode']!r}") from None
    if not re.fullmatch(r"[0-9]{1,10}", found["max_age"]):
        raise PolicyError(f"max_age must be 1-10 digits: {found['max_age']!r}")
    max_age = min(int(found["max_age"]), MAX_AGE_LIMIT)
    if mode is not Mode.NONE and not mx:
        raise PolicyError("policy has no mx")
    return Policy(mode, max_age, tuple(mx), "STSv1", tuple(extensions), tuple(lines))


def mx_allowed(policy: Policy, mx_host: str) -> bool:
    """§4.1: the MX host matches one of the policy's patterns (case-insensitively; a
    "*." pattern covers exactly one left-most label)."""
    return any(wildcard_match(pattern, mx_host) for pattern in policy.mx)


# -- the cache (§5.1) ----------------------------------------------------------------------


@dataclass(frozen=True)
class CachedPolicy:
    domain: str
    policy_id: str
    policy: Policy
    fetched_at: float  # epoch seconds

    @property
    def expires_at(self) -> float:
        return self.fetched_at + self.policy.max_age

    def fresh(self, now: float) -> bool:
        return now < self.expires_at


class PolicyCache(Protocol):
    """Where fetched policies live until max_age. Async so that a shared cache
    (PostgreSQL, Redis) can serve several nodes."""

    async def get(self, domain: str) -> CachedPolicy | None: ...

    async def put(self, entry: CachedPolicy) -> None: ...

    async def delete(self, domain: str) -> None: ...


class MemoryPolicyCache:
    def __init__(self) -> None:
        self._entries: dict[str, CachedPolicy] = {}

    async def get(self, domain: str) -> CachedPolicy | None:
        return self._entries.get(normalize_host(domain))

    async def put(self, entry: CachedPolicy) -> None:
        self._entries[normalize_host(entry.domain)] = entry

    async def delete(self, domain: str) -> None:
        self._entries.pop(normalize_host(domain), None)


class ReadThroughPolicyCache:
    """A persistent cache (the engine's SQLite one) read once per domain, then held in memory.

    For callers that must not touch the disk per message (forwarding): opening the SQLite
    cache for each lookup would (its WAL index is created and truncated on every first
    open). Absent entries are remembered for a few minutes; new policies still go to the
    shared file, so a restart keeps them (RFC 8461 §5.1)."""

    NEGATIVE_SECONDS: Final = 300.0

    def __init__(self, backing: PolicyCache, clock: Callable[[], float] = time.monotonic):
        self._backing = backing
        self._clock = clock
        self._entries: dict[str, tuple[float, CachedPolicy | None]] = {}

    async def get(self, domain: str) -> CachedPolicy | None:
        key = normalize_host(domain)
        held = self._entries.get(key)
        if held is not None and (held[1] is not None or held[0] > self._clock()):
            return held[1]
        entry = await self._backing.get(domain)
        if len(self._entries) > 10000:
            self._entries.clear()
        self._entries[key] = (self._clock() + self.NEGATIVE_SECONDS, entry)
        return entry

    async def put(self, entry: CachedPolicy) -> None:
        self._entries[normalize_host(entry.domain)] = (self._clock(), entry)
        await self._backing.put(entry)

    async def delete(self, domain: str) -> None:
        self._entries.pop(normalize_host(domain), None)
        await self._backing.delete(domain)


_CACHE_SCHEMA = """
CREATE TABLE IF NOT EXISTS mtasts_policy (
    domain TEXT PRIMARY KEY,
    policy_id TEXT NOT NULL,
    policy_text TEXT NOT NULL,
    fetched_at REAL NOT NULL
);
"""


class SQLitePolicyCache:
    """`PolicyCache` in an SQLite file, so policies survive restarts (a restart must not
    reopen the window §5.1 closes). The policy text is stored as served and parsed again
    on load: one parser, one source of truth."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        _sqlite.connect(self.path, _CACHE_SCHEMA).close()

    async def get(self, domain: str) -> CachedPolicy | None:
        return await asyncio.to_thread(self._get, normalize_host(domain))

    def _get(self, domain: str) -> CachedPolicy | None:
        conn = _sqlite.connect(self.path, _CACHE_SCHEMA)
        try:
            row = conn.execute(
                "SELECT policy_id, policy_text, fetched_at FROM mtasts_policy WHERE domain = ?",
                (domain,),
            ).fetchone()
        finally:
            conn.close()
        if row is None:
            return None
        try:
            policy = parse_policy(row[1])
        except PolicyError:
            return None  # written by an older parser that accepted more: refetch
        return CachedPolicy(domain, str(row[0]), policy, float(row[2]))

    async def put(self, entry: CachedPolicy) -> None:
        await asyncio.to_thread(self._put, entry)

    def _put(self, entry: CachedPolicy) -> None:
        conn = _sqlite.connect(self.path, _CACHE_SCHEMA)
        try:
            conn.execute(
                "INSERT INTO mtasts_policy (domain, policy_id, policy_text, fetched_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (domain) DO UPDATE SET"
                " policy_id = excluded.policy_id, policy_text = excluded.policy_text,"
                " fetched_at = excluded.fetched_at",
                (
                    normalize_host(entry.domain),
                    entry.policy_id,
                    entry.policy.text,
                    entry.fetched_at,
                ),
            )
        finally:
            conn.close()

    async def delete(self, domain: str) -> None:
        await asyncio.to_thread(self._delete, normalize_host(domain))

    def _delete(self, domain: str) -> None:
        conn = _sqlite.connect(self.path, _CACHE_SCHEMA)
        try:
            conn.execute("DELETE FROM mtasts_policy WHERE domain = ?", (domain,))
        finally:
            conn.close()


# -- discovery and fetch ---------------------------------------------------------------------


class FetchError(Exception):
    """The policy could not be had; ``result_type`` is what TLS-RPT reports for it."""

    def __init__(self, result_type: ResultType, detail: str) -> None:
        super().__init__(detail)
        self.result_type = result_type
        self.detail = detail


@dataclass(frozen=True)
class PolicyLookup:
    """What `MTASTS.policy_for` found.

    ``policy`` is the policy to apply (possibly from the cache), or None. ``error`` is set
    when a fetch was tried and failed (whether or not a cached policy stands in); the
    TLS policy layer reports it (RFC 8460 §4.3.2.2).
    """

    domain: str
    policy: Policy | None
    policy_id: str | None = None
    from_cache: bool = False
    error: ResultType | None = None
    detail: str = ""

    @property
    def applies(self) -> bool:
        """A policy in testing or enforce mode governs this delivery."""
        return self.policy is not None and self.policy.mode is not Mode.NONE

    @property
    def mode(self) -> Mode | None:
        return self.policy.mode if self.policy is not None else None


class MTASTS:
    """MTA-STS for outbound delivery: one per process, sharing ``cache``.

    ``ssl_context`` verifies the policy host (§3.3: a certificate valid for
    ``mta-sts.DOMAIN`` chaining to a trusted root); by default the system CAs, or
    ``ca_file``. ``port`` exists for tests; the protocol fixes 443.
    """

    def __init__(
        self,
        resolver: Resolver,
        cache: PolicyCache | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        ca_file: str | Path | None = None,
        port: int = 443,
        timeout: float = DEFAULT_TIMEOUT,
        max_size: int = DEFAULT_MAX_SIZE,
        failure_backoff: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.resolver = resolver
        self.cache: PolicyCache = cache if cache is not None else MemoryPolicyCache()
        self.ssl_context = ssl_context or pkix_context(ca_file)
        self.port = port
        self.timeout = timeout
        self.max_size = max_size
        self.failure_backoff = failure_backoff
        self.clock = clock
        # domain -> (policy id, retry-after): a policy host that just failed is not asked
        # again for every queued message, only after the backoff or when the id changes.
        self._failed: dict[str, tuple[str, float]] = {}

    async def lookup_record(self, domain: str) -> STSRecord | None:
        """The domain's STS TXT record; None when there is none, several, or a malformed
        one (§3.1). Raises `TemporaryDNSError` when DNS fails."""
        txts = await self.resolver.txt(f"_mta-sts.{domain}")
        candidates = [t for t in txts if _is_sts_candidate(t)]
        if len(candidates) != 1:
            return None
        try:
            return parse_record(candidates[0])
        except PolicyError:
            return None

    async def fetch(self, domain: str) -> Policy:
        """GET the policy over verified HTTPS (§3.3). Raises `FetchError`."""
        host = f"mta-sts.{domain}"
        try:
            response = await _https.request(
                "GET",
                host,
                WELL_KNOWN_PATH,
                resolver=self.resolver,
                ssl_context=self.ssl_context,
                port=self.port,
                headers=[("Accept", "text/plain")],
                timeout=self.timeout,
                max_body=self.max_size,
            )
        except _https.CertificateError as exc:
            raise FetchError(ResultType.STS_WEBPKI_INVALID, str(exc)) from exc
        except _https.BodyTooLarge as exc:
            raise FetchError(ResultType.STS_POLICY_INVALID, str(exc)) from exc
        except _https.HTTPSError as exc:
            raise FetchError(ResultType.STS_POLICY_FETCH_ERROR, str(exc)) from exc
        # §3.3: only a 200 counts; a 3xx redirect MUST NOT be followed.
        if response.status != 200:
            raise FetchError(ResultType.STS_POLICY_FETCH_ERROR, f"{host}: HTTP {response.status}")
        # §3.2: check the media type, so that content someone else could upload to the
        # policy host (HTML, images) is not taken for a policy.
        if response.media_type() != "text/plain":
            raise FetchError(
                ResultType.STS_POLICY_INVALID,
                f"{host}: media type {response.media_type() or 'missing'}, not text/plain",
            )
        try:
            text = response.body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FetchError(ResultType.STS_POLICY_INVALID, f"{host}: not UTF-8") from exc
        try:
            return parse_policy(text)
        except PolicyError as exc:
            raise FetchError(ResultType.STS_POLICY_INVALID, f"{host}: {exc}") from exc

    async def policy_for(self, domain: str) -> PolicyLookup:
        """The policy that governs delivery to ``domain`` now (§3.3, §5.1)."""
        domain = normalize_host(domain)
        now = self.clock()
        cached = await self.cache.get(domain)
        if cached is not None and not cached.fresh(now):
            await self.cache.delete(domain)
            cached = None

        def from_cache(error: ResultType | None = None, detail: str = "") -> PolicyLookup:
            if cached is None:
                return PolicyLookup(domain, None, error=error, detail=detail)
            return PolicyLookup(domain, cached.policy, cached.policy_id, True, error, detail)

        try:
            record = await self.lookup_record(domain)
        except TemporaryDNSError:
            record = None
        if record is None:
            # §3.3: no live record, but an unexpired cached policy still applies.
            return from_cache()
        if (
            cached is not None
            and cached.policy_id == record.id
            and not self._refresh_due(cached, now)
        ):
            return from_cache()
        failed = self._failed.get(domain)
        if failed is not None and failed[0] == record.id and now < failed[1]:
            return from_cache()
        try:
            policy = await self.fetch(domain)
        except FetchError as exc:
            self._failed[domain] = (record.id, now + self.failure_backoff)
            # §3.3: a failed fetch leaves an unexpired cached policy in force.
            return from_cache(exc.result_type, exc.detail)
        self._failed.pop(domain, None)
        # A refetch restarts max_age from now.
        await self.cache.put(CachedPolicy(domain, record.id, policy, now))
        return PolicyLookup(domain, policy, record.id, False)

    @staticmethod
    def _refresh_due(cached: CachedPolicy, now: float) -> bool:
        # §3.3: refresh cached policies before they expire, even with an unchanged id;
        # "a suggested refresh frequency is once per day". Short-lived policies refresh
        # at half their life. A failed refresh keeps the cached policy.
        return now >= cached.fetched_at + min(cached.policy.max_age / 2, REFRESH_INTERVAL)
