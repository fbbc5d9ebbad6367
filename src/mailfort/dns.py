"""The one DNS resolver every lookup in mailfort goes through.

Tests and `mailfort dev --dns HOST:PORT` point it at a private server; production uses the
system's resolvers or the configured ones. Keeping one object means SPF, DKIM, DMARC, ARC,
MX and MTA-STS lookups all honour the same setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.TXT
import dns.resolver

R = TypeVar("R", bound=dns.resolver.BaseResolver)
T = TypeVar("T")
U = TypeVar("U")
V = TypeVar("V")


@dataclass(frozen=True)
class Nameserver:
    host: str
    port: int = 53

    @classmethod
    def parse(cls, spec: str) -> Nameserver:
        """Parse ``HOST``, ``HOST:PORT`` or ``[V6]:PORT``."""
        spec = spec.strip()
        if spec.startswith("["):
            host, _, rest = spec[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else 53
        elif spec.count(":") == 1:
            host, port_s = spec.split(":")
            port = int(port_s)
        else:
            host, port = spec, 53
        if not host or not 0 < port < 65536:
            raise ValueError(f"bad nameserver {spec!r}: expected HOST[:PORT]")
        return cls(host, port)


class TemporaryDNSError(Exception):
    """A lookup failed for a reason that may pass (timeout, SERVFAIL)."""


class NotCached(Exception):
    """`Resolver.query_cached`: the cache does not hold the answer; a lookup would block."""


@dataclass(frozen=True)
class AuthenticatedAnswer:
    """Records plus whether the resolver vouched for them with DNSSEC.

    ``authenticated`` is the AD bit of the response (RFC 4035 §3.2.3). It means something
    only when the configured resolver validates and the path to it is trusted (loopback),
    which is what DANE (RFC 7672 §2.1.1) requires of a deployment. ``records`` is [] for
    NODATA/NXDOMAIN; ``authenticated`` then says whether that denial was validated.
    """

    records: list[dns.rdata.Rdata]
    authenticated: bool


class Resolver:
    """Async and sync lookups against one configured set of nameservers."""

    # True for the view `cache_only_view` returns: lookups answer from the cache or raise.
    cache_only = False

    def __init__(
        self,
        nameservers: list[Nameserver] | None = None,
        timeout: float = 5.0,
        *,
        cache: bool = False,
    ) -> None:
        self.nameservers = nameservers or []
        self.timeout = timeout
        # The service caches answers (by their TTLs): one message asks for the same SPF,
        # DKIM and DMARC records as the last hundred, and an uncached lookup cost ~1 ms of
        # CPU here. dnspython's LRUCache is thread-safe, so the pyspf threads share it.
        self._cache = dns.resolver.LRUCache(50_000) if cache else None
        # In front of it, answers by the query as written: a hit in dnspython's cache
        # still parses the name and builds a resolution (~25 µs); a busy MX asks for the
        # same few names for every message.
        self._front: dict[tuple[str, str], tuple[float, list[dns.rdata.Rdata]]] = {}
        self._async = self._configure(dns.asyncresolver.Resolver)
        self._sync = self._configure(dns.resolver.Resolver)
        # A second resolver that asks for the AD bit. RFC 6840 §5.7: a validating resolver
        # sets AD in its answer when the query had AD set; the DO bit would also do, but
        # would bring RRSIGs along that nothing here reads.
        self._async_ad = self._configure(dns.asyncresolver.Resolver)
        self._async_ad.flags = dns.flags.RD | dns.flags.AD
        # Not from the shared cache: an answer cached without AD must never stand in for
        # the authenticated one DANE asks for.
        self._async_ad.cache = None

    def _configure(self, cls: type[R]) -> R:
        if not self.nameservers:
            res = cls()
        else:
            res = cls(configure=False)
            # dnspython takes one port for all nameservers; tests use a single server.
            res.nameservers = [ns.host for ns in self.nameservers]
            res.port = self.nameservers[0].port
        res.lifetime = self.timeout
        res.timeout = self.timeout
        if self._cache is not None:
            res.cache = self._cache
        return res

    @property
    def origin(self) -> Resolver:
        """The resolver itself; for a `cache_only` view, the resolver it views."""
        return self

    def cache_only_view(self) -> Resolver:
        """This resolver restricted to its cache: every lookup answers from it or raises
        `NotCached`, so a coroutine that only looks things up completes without ever
        waiting (see `gather` and `complete_now`)."""
        view = self.__dict__.get("_view")
        if view is None:
            view = self.__dict__["_view"] = _CacheOnlyView(self)
        return view

    @overload
    async def gather(
        self, a: Coroutine[Any, Any, T], b: Coroutine[Any, Any, U], c: Coroutine[Any, Any, V], /
    ) -> tuple[T, U, V]: ...

    @overload
    async def gather(self, *aws: Coroutine[Any, Any, T]) -> tuple[T, ...]: ...

    async def gather(self, *aws: Coroutine[Any, Any, Any]) -> tuple[Any, ...]:
        """`asyncio.gather` for coroutines whose waiting is DNS lookups through this
        resolver. On a `cache_only` view none of them can wait, so they run one after the
        other without a task each (tasks cost more than the cached lookups they wrap)."""
        if not self.cache_only:
            return tuple(await asyncio.gather(*aws))
        out: list[Any] = []
        failed: BaseException | None = None
        for aw in aws:
            # Every one is awaited even after a failure (a coroutine closed unstarted is
            # reported as never awaited); against the cache the rest cost next to nothing.
            try:
                out.append(await aw)
            except Exception as exc:
                failed = failed or exc
        if failed is not None:
            raise failed
        return tuple(out)

    @property
    def sync(self) -> dns.resolver.Resolver:
        """The blocking resolver, for libraries that resolve synchronously (pyspf, dkimpy)."""
        return self._sync

    async def txt(self, name: str) -> list[str]:
        """TXT strings at ``name`` (each record's chunks joined); [] when none exist."""
        answer = await self._query(name, "TXT")
        return [
            b"".join(r.strings).decode("utf-8", "replace")
            for r in answer
            if isinstance(r, dns.rdtypes.ANY.TXT.TXT)
        ]

    async def mx(self, name: str) -> list[tuple[int, str]]:
        answer = await self._query(name, "MX")
        return sorted(
            (r.preference, r.exchange.to_text(omit_final_dot=True))
            for r in answer
            if isinstance(r, dns.rdtypes.ANY.MX.MX)
        )

    async def addresses(self, name: str) -> list[str]:
        out: list[str] = []
        for rtype in ("AAAA", "A"):
            out.extend(r.to_text() for r in await self._query(name, rtype))
        return out

    async def query(self, name: str, rtype: str) -> list[dns.rdata.Rdata]:
        """Records of type ``rtype`` at ``name``; [] for NXDOMAIN, NODATA or a name that
        cannot exist. Raises `TemporaryDNSError` on timeout or SERVFAIL."""
        return await self._query(name, rtype)

    async def query_authenticated(self, name: str, rtype: str) -> AuthenticatedAnswer:
        """Like `query`, plus the AD bit of the answer (for DANE TLSA lookups).

        An answer that is not authenticated (an unsigned zone, or a resolver that does not
        validate) comes back with ``authenticated=False``. A bogus answer is SERVFAIL from
        a validating resolver, so it raises `TemporaryDNSError` like any other failure.
        """
        try:
            answer = await self._async_ad.resolve(
                name, rtype, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN as exc:
            # A validated denial of existence still carries AD (RFC 4035 §3.2.3).
            responses = exc.kwargs.get("responses") or {}
            secure = bool(responses) and all(
                bool(r.flags & dns.flags.AD) for r in responses.values()
            )
            return AuthenticatedAnswer([], secure)
        except _ABSENT:
            return AuthenticatedAnswer([], False)
        except _TEMPORARY as exc:
            raise TemporaryDNSError(f"{rtype} lookup failed") from exc
        records = list(answer) if answer.rrset is not None else []
        return AuthenticatedAnswer(records, bool(answer.response.flags & dns.flags.AD))

    def query_sync(
        self, name: str, rtype: str, lifetime: float | None = None
    ) -> list[dns.rdata.Rdata]:
        """Blocking `query`, for libraries that resolve synchronously in a worker thread
        (pyspf). ``lifetime`` can only shorten the configured timeout.

        One dnspython resolver object serves every thread: ``resolve`` keeps no
        per-call state on it, and its cache (when configured) is an LRUCache, which locks.
        """
        budget = self.timeout if lifetime is None else min(lifetime, self.timeout)
        try:
            answer = self._sync.resolve(
                name, rtype, raise_on_no_answer=False, lifetime=budget, search=False
            )
        except _ABSENT:
            return []
        except _TEMPORARY as exc:
            raise TemporaryDNSError(f"{rtype} lookup failed") from exc
        return list(answer) if answer.rrset is not None else []

    @property
    def caching(self) -> bool:
        return self._cache is not None

    def query_cached(self, name: str, rtype: str) -> list[dns.rdata.Rdata]:
        """`query_sync`'s answer when the cache holds it, without blocking: raises
        `NotCached` where `query_sync` would ask a server.

        It runs the first step of dnspython's own resolve() (``_Resolution.next_request``,
        which is where resolve() consults the cache), so a cached answer, a cached
        NXDOMAIN and a name that cannot exist come out as they would from `query_sync`.
        pyspf's checks use it to run on the event loop when every record they need is
        cached, instead of paying a thread hand-off per check (auth/spf.py).
        """
        return self.query_cached_until(name, rtype)[0]

    def query_cached_until(
        self, name: str, rtype: str
    ) -> tuple[list[dns.rdata.Rdata], float | None]:
        """`query_cached` plus when the answer expires (``time.time()`` clock); None when
        that is not known (a cached NXDOMAIN, a name that cannot exist)."""
        if self._cache is None:
            raise NotCached(name)
        key = (name, rtype)
        hit = self._front.get(key)
        if hit is not None:
            if hit[0] > time.time():
                return list(hit[1]), hit[0]
            del self._front[key]
        try:
            resolution = dns.resolver._Resolution(
                self._sync, name, rtype, dns.rdataclass.IN, False, False, False
            )
            _request, answer = resolution.next_request()
        except _ABSENT:
            return [], None
        if answer is None:
            raise NotCached(name)
        records = list(answer) if answer.rrset is not None else []
        if len(self._front) >= 10_000:
            self._front.clear()  # a crude bound; the names that matter come back at once
        self._front[key] = (answer.expiration, records)
        return list(records), answer.expiration

    async def _query(self, name: str, rtype: str) -> list[dns.rdata.Rdata]:
        if self._cache is not None:
            # Most lookups on a busy MX are cache hits (the same SPF, DKIM and DMARC records
            # message after message): answer them without the async resolver's coroutines.
            with contextlib.suppress(NotCached):
                return self.query_cached(name, rtype)
        try:
            answer = await self._async.resolve(name, rtype, raise_on_no_answer=False, search=False)
        except _ABSENT:
            return []
        except _TEMPORARY as exc:
            raise TemporaryDNSError(f"{rtype} lookup failed") from exc
        return list(answer) if answer.rrset is not None else []


class _CacheOnlyView(Resolver):
    """`Resolver.cache_only_view`: the same configuration and caches, no network."""

    cache_only = True

    def __init__(self, origin: Resolver) -> None:  # shares the origin's state, no setup
        self.__dict__.update({k: v for k, v in origin.__dict__.items() if k != "_view"})
        self._origin = origin

    @property
    def origin(self) -> Resolver:
        return self._origin

    async def _query(self, name: str, rtype: str) -> list[dns.rdata.Rdata]:
        return self.query_cached(name, rtype)

    async def query_authenticated(self, name: str, rtype: str) -> AuthenticatedAnswer:
        raise NotCached(name)  # never cached: see the AD resolver above

    def query_sync(
        self, name: str, rtype: str, lifetime: float | None = None
    ) -> list[dns.rdata.Rdata]:
        return self.query_cached(name, rtype)


class WouldWait(Exception):
    """`complete_now`: the coroutine waited for something."""


def complete_now(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end at once, outside the event loop's scheduling.

    For a coroutine that cannot wait (its lookups go to a `cache_only` view): it then
    finishes in its first step and its exceptions (`NotCached`) come out as they are. If
    it waits after all, it is closed and `WouldWait` raised; anything it started by then
    is abandoned, so only coroutines without side effects before a wait belong here.
    """
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise WouldWait


# Answers that say "nothing there", permanently: NXDOMAIN, NODATA, and names that cannot
# exist at all (a label over 63 octets, an empty label, over 255 octets, bad IDNA). Mail
# hands us such names from untrusted input (MAIL FROM, From:, DKIM d=/s=, SPF macros);
# they must read as "no record", not crash the check or count as a DNS outage.
_ABSENT: tuple[type[Exception], ...] = (
    dns.resolver.NXDOMAIN,
    dns.resolver.NoAnswer,
    dns.resolver.YXDOMAIN,
    dns.exception.SyntaxError,
    dns.name.NameTooLong,
    dns.name.IDNAException,
)
# Answers that may change on retry: timeouts, SERVFAIL/REFUSED from every server.
_TEMPORARY: tuple[type[Exception], ...] = (dns.exception.Timeout, dns.resolver.NoNameservers)
