"""SPF (RFC 7208) for the inbound MX, through pyspf with lookups on our resolver.

pyspf resolves through the module-level function ``spf.DNSLookup`` and takes no resolver
argument. We install one dispatcher there, once, which looks up the resolver of the
*current check* in a `contextvars.ContextVar`. Each check runs in its own worker thread and
its own fresh context, so concurrent checks against different resolvers (tests, several
``--dns`` settings) never see each other's resolver, and code elsewhere in the process that
calls pyspf directly still gets pyspf's own lookup (the variable is unset there).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import ipaddress
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, Literal

import dns.rdata
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.PTR
import dns.rdtypes.ANY.TXT
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import spf

from mailfort.dns import NotCached, Resolver, TemporaryDNSError

SPFResultCode = Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
Identity = Literal["mailfrom", "helo"]

# pyspf's stock explanations (RFC 7208 §6.2 default when a domain publishes no exp=).
DEFAULT_EXPLANATIONS: Final[dict[str, str]] = dict(spf.EXPLANATIONS)

# RFC 7208 §4.6.4: a check SHOULD be bounded in time; 20 s over all its lookups.
TOTAL_TIME_LIMIT: Final = 20.0

_log = logging.getLogger(__name__)
_resolver_var: contextvars.ContextVar[Resolver | _CacheOnly] = contextvars.ContextVar(
    "mailfort_spf_resolver"
)
_original_lookup: Callable[..., Any] = spf.DNSLookup

# pyspf blocks on DNS. Its own pool keeps slow SPF lookups from occupying the loop's default
# executor, which runs CPU work (DKIM hashing) that should not queue behind DNS waits.
_POOL_SIZE: Final = 64
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_POOL_SIZE, thread_name_prefix="mailfort-spf")
        return _pool


def _forget_pool() -> None:
    # A forked worker inherits the pool object but none of its threads: start afresh.
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


class _WouldBlock(Exception):
    """Raised inside pyspf when an inline check needs a record that is not cached."""


class _CacheOnly:
    """The resolver for an inline attempt (see `_evaluate`): cached answers only.

    ``missed`` is the verdict that counts: pyspf swallows some exceptions (bare
    ``except:`` around exp= and ptr lookups), so a miss is recorded before raising and
    the attempt is thrown away whatever pyspf made of it.
    """

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.missed = False
        # When the first of the answers used expires; None once one had no known expiry.
        self.expires: float | None = math.inf

    def query_sync(
        self, name: str, rtype: str, lifetime: float | None = None
    ) -> list[dns.rdata.Rdata]:
        try:
            records, expires = self.resolver.query_cached_until(name, rtype)
        except NotCached:
            self.missed = True
            raise _WouldBlock(name) from None
        if expires is None or self.expires is None:
            self.expires = None
        else:
            self.expires = min(self.expires, expires)
        return records


@dataclass(frozen=True)
class SPFCheck:
    """The outcome for one identity (RFC 7208 §2.3 HELO, §2.4 MAIL FROM)."""

    result: SPFResultCode
    identity: Identity
    domain: str  # the domain whose policy was evaluated ("" when there was none)
    explanation: str  # exp= text for fail (§6.2), else pyspf's reason


@dataclass(frozen=True)
class SPFResult:
    """MAIL FROM result (the one DMARC uses) plus the separate HELO check."""

    mailfrom: SPFCheck
    helo: SPFCheck | None  # None when the HELO identity was not checkable or is the same

    @property
    def result(self) -> SPFResultCode:
        return self.mailfrom.result

    @property
    def domain(self) -> str:
        return self.mailfrom.domain

    @property
    def explanation(self) -> str:
        return self.mailfrom.explanation


def _dispatch_lookup(
    name: str, qtype: str, tcpfallback: object = True, timeout: float = 30
) -> list[tuple[tuple[str, str], Any]]:
    """Stands in for ``spf.DNSLookup``; returns answers in pyspf's shape."""
    resolver = _resolver_var.get(None)
    if resolver is None:
        return list(_original_lookup(name, qtype, tcpfallback, timeout))
    if qtype == "SPF":
        # RFC 7208 §3.1/§14.1: type 99 is obsolete; pyspf asks only in "harsh" mode.
        return []
    try:
        rdatas = resolver.query_sync(name, qtype, lifetime=float(timeout))
    except TemporaryDNSError as exc:
        # RFC 7208 §2.6.6 / §4.4: a transient DNS failure is a temperror.
        raise spf.TempError(f"DNS {exc}") from exc
    out: list[tuple[tuple[str, str], Any]] = []
    key = (name, qtype)
    for r in rdatas:
        if isinstance(r, dns.rdtypes.IN.A.A | dns.rdtypes.IN.AAAA.AAAA):
            out.append((key, r.address))
        elif isinstance(r, dns.rdtypes.ANY.MX.MX):
            out.append((key, (r.preference, r.exchange.to_text(omit_final_dot=True))))
        elif isinstance(r, dns.rdtypes.ANY.PTR.PTR):
            out.append((key, r.target.to_text(omit_final_dot=True)))
        elif isinstance(r, dns.rdtypes.ANY.TXT.TXT):
            out.append((key, list(r.strings)))
    return out


spf.DNSLookup = _dispatch_lookup


class _Query(spf.query):  # type: ignore[misc]  # pyspf is untyped
    def validated_ptrs(self) -> list[str]:
        """RFC 7208 §5.5: the validated names for the ``ptr`` mechanism and ``%{p}``.

        pyspf lets a DNS error from any of these lookups end the whole check with
        temperror. The RFC says otherwise: an error on the PTR lookup means the mechanism
        does not match, and an error on one name's A/AAAA lookup skips that name.
        """
        try:
            names: list[str] = self.dns_ptr(self.i)
        except spf.TempError:
            return []
        validated = []
        for name in names[: spf.MAX_PTR]:  # §4.6.4: at most 10 PTR names are looked up
            try:
                if self.cidrmatch(self.dns_a(name, self.A), self.cidrmax):
                    validated.append(name)
            except spf.TempError:
                continue
        return validated


def _run_check(
    resolver: Resolver | _CacheOnly,
    ip: str,
    sender: str,
    helo: str,
    receiver: str,
    identity: Identity,
) -> SPFCheck:
    """One pyspf evaluation; runs in a worker thread, or inline with `_CacheOnly`."""
    _resolver_var.set(resolver)  # this thread's private context, see check_spf
    try:
        q = _Query(
            i=ip,
            s=sender,
            h=helo,
            receiver=receiver,
            strict=True,
            querytime=TOTAL_TIME_LIMIT,
        )
    except spf.PermError as exc:  # unusable client address
        return SPFCheck("permerror", identity, "", str(exc))
    domain = q.d or ""
    # RFC 7208 §4.3: a malformed domain (empty label, label over 63 octets, no dot) gives
    # "none" without any lookup; pyspf covers the label checks in dns_spf().
    try:
        result, _code, explanation = q.check()
    except _WouldBlock:
        raise  # an inline attempt ends here; the check runs again in a thread
    except Exception:
        # pyspf raises past check() only on its own bugs (an AssertionError on recursion
        # depth, codec errors on odd input). One sender's odd record must not break the
        # SMTP session; report it as an error that does not count as a pass.
        _log.warning("pyspf failed on a check", exc_info=True)
        return SPFCheck("permerror", identity, domain.lower(), "SPF check failed internally")
    if result == "ambiguous":  # harsh-mode only; never with strict=True
        result = "neutral"
    return SPFCheck(_normalise(result), identity, domain.lower(), explanation)


def _normalise(result: str) -> SPFResultCode:
    mapped = {"unknown": "permerror", "error": "temperror"}.get(result, result)
    if mapped not in ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"):
        return "permerror"
    return mapped  # type: ignore[return-value]


# Memoised: a sending server says the same HELO on every connection, and the failed
# address parse that tells a name from an address raises twice (~15 µs).
@functools.lru_cache(maxsize=4096)
def _helo_checkable(helo: str) -> bool:
    """RFC 7208 §2.3: only a fully qualified domain name is a HELO identity."""
    name = helo.strip().rstrip(".")
    if not name or name.startswith("[") or "." not in name:
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return True
    return False


async def _evaluate(
    resolver: Resolver, ip: str, sender: str, helo: str, receiver: str, identity: Identity
) -> SPFCheck:
    """One check: inline on the loop when every record it needs is cached, else in a thread.

    Mail comes from the same senders again and again, so the records are almost always in
    the resolver's cache; pyspf then needs ~0.1 ms of CPU and never blocks, while a thread
    hand-off cost about as much again. The inline attempt gets the same answers the
    thread would (the same cache), and any miss discards it whole, so the outcome is the
    one the thread path gives.
    """
    if resolver.caching:
        key = (ip, sender, helo, receiver, identity)
        memo = _memo(resolver)
        hit = memo.get(key)
        if hit is not None and hit[0] > time.time():
            return hit[1]
        probe = _CacheOnly(resolver)
        try:
            # A fresh Context, as in the thread: the resolver variable stays inside it.
            outcome = contextvars.Context().run(
                _run_check, probe, ip, sender, helo, receiver, identity
            )
        except _WouldBlock:
            pass
        else:
            if not probe.missed:
                if probe.expires is not None and probe.expires != math.inf:
                    if len(memo) >= _MEMO_SIZE:
                        memo.clear()
                    memo[key] = (probe.expires, outcome)
                return outcome
        if resolver.cache_only:
            raise NotCached(sender or helo)
    return await _in_thread(resolver, ip, sender, helo, receiver, identity)


# Outcomes of inline checks, per resolver, until the first DNS answer they used expires.
# A check is a function of its inputs and those answers, so until then it would give the
# same outcome again: mail from one sender through one server (a list, a notification
# service) is checked once per TTL instead of once per message (~0.1 ms each).
_MEMO_SIZE = 20_000
_MEMOS: weakref.WeakKeyDictionary[Resolver, dict[tuple[str, ...], tuple[float, SPFCheck]]] = (
    weakref.WeakKeyDictionary()
)


def _memo(resolver: Resolver) -> dict[tuple[str, ...], tuple[float, SPFCheck]]:
    resolver = resolver.origin  # one memo for a resolver and its cache-only view
    memo = _MEMOS.get(resolver)
    if memo is None:
        memo = _MEMOS[resolver] = {}
    return memo


async def _in_thread(
    resolver: Resolver, ip: str, sender: str, helo: str, receiver: str, identity: Identity
) -> SPFCheck:
    # A fresh Context per check: the worker thread sets the resolver variable inside it, so
    # nothing leaks into the pool thread's own context or into other checks.
    ctx = contextvars.Context()
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        _executor(), ctx.run, _run_check, resolver, ip, sender, helo, receiver, identity
    )


async def check_spf(
    resolver: Resolver,
    ip: str,
    mail_from: str,
    helo: str,
    *,
    receiver: str = "unknown",
    check_helo: bool = True,
) -> SPFResult:
    """Evaluate SPF for MAIL FROM and, separately, for HELO.

    ``mail_from`` is the reverse-path without angle brackets ("" or "<>" for the null
    sender). ``receiver`` feeds the ``%{r}`` macro (RFC 7208 §7.3), normally our host name.
    """
    sender = mail_from.strip()
    if sender in ("<>", ""):
        sender = ""
    elif sender.startswith("<") and sender.endswith(">"):
        sender = sender[1:-1]
    helo = helo.strip()
    # RFC 7208 §2.4: with a null reverse-path the MAIL FROM identity is postmaster@HELO,
    # which pyspf derives itself; that check *is* the HELO check, so it runs once.
    mf_identity: Identity = "mailfrom" if sender else "helo"
    mail_task = _evaluate(resolver, ip, sender, helo, receiver, mf_identity)
    if check_helo and sender and _helo_checkable(helo):
        # RFC 7208 §2.3: check HELO as well; both run at once (in threads when not cached).
        helo_task = _evaluate(resolver, ip, "", helo, receiver, "helo")
        mailfrom, helo_check = await resolver.gather(mail_task, helo_task)
        return SPFResult(mailfrom, helo_check)
    return SPFResult(await mail_task, None)


__all__ = ["DEFAULT_EXPLANATIONS", "SPFCheck", "SPFResult", "SPFResultCode", "check_spf"]
