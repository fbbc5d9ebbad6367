"""Failed-login throttling, per client address and per account.

Every failed login counts twice: against the client's address (an IPv6 client counts as
its /64, which one attacker usually controls whole) and against the account name it
tried.  Past ``delay_after`` failures the server answers more slowly, doubling the delay
with each further failure; past ``refuse_after`` it refuses to check secrets at all until
the counter expires (``window`` seconds after the last failure).  Unknown accounts are
counted exactly like existing ones, and every failed attempt takes at least
``failure_floor`` seconds to answer, so neither the answer nor its timing tells whether an
account exists (a wrong password costs an Argon2id run, an unknown account nothing).

Counters are kept under keyed hashes (HMAC-SHA256) of the address and the account, so
neither memory nor a shared backend nor a log line holds a plaintext address or IP.  The
:class:`FailureStore` protocol is what a Redis backend implements to share counters
between worker processes and nodes (``INCR`` + ``EXPIRE`` on the same keys); the
in-memory store serves one process.

Trade-off, stated: refusing per account lets someone who knows an address lock its
owner out for ``window`` seconds by failing on purpose.  The account threshold is
therefore much higher than the per-address one: it exists to stop slow attacks spread
over many addresses, which a per-address limit cannot see.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

__all__ = [
    "FailureStore",
    "GuardPolicy",
    "Limits",
    "LoginGuard",
    "LoginOutcome",
    "MemoryFailureStore",
    "SharedFailureStore",
    "Verdict",
    "node_guard",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


class FailureStore(Protocol):
    """Expiring counters.  ``incr`` adds one and (re)sets the expiry to ``ttl`` seconds."""

    async def incr(self, key: str, ttl: float) -> int: ...

    async def get(self, key: str) -> int: ...

    async def delete(self, key: str) -> None: ...


class MemoryFailureStore:
    """Counters in this process, bounded: the least recently touched keys go first, so a
    flood of distinct addresses cannot grow memory without limit."""

    def __init__(
        self, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_keys = max_keys
        self._clock = clock
        self._counts: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def _live(self, key: str, now: float) -> int:
        entry = self._counts.get(key)
        if entry is None:
            return 0
        count, expires = entry
        if expires <= now:
            del self._counts[key]
            return 0
        return count

    async def incr(self, key: str, ttl: float) -> int:
        now = self._clock()
        count = self._live(key, now) + 1
        self._counts[key] = (count, now + ttl)
        self._counts.move_to_end(key)
        while len(self._counts) > self.max_keys:
            self._counts.popitem(last=False)
        return count

    async def get(self, key: str) -> int:
        return self._live(key, self._clock())

    async def delete(self, key: str) -> None:
        self._counts.pop(key, None)

    def __len__(self) -> int:
        return len(self._counts)


class SharedFailureStore:
    """Counters in memory shared by the forked workers of one node (`relay.memo`'s table,
    created before the fork), so that an attacker spreading attempts over connections
    that land on different workers meets the same limits."""

    def __init__(self, table: CounterTable) -> None:
        self._table = table

    async def incr(self, key: str, ttl: float) -> int:
        return self._table.incr(key.encode(), ttl)

    async def get(self, key: str) -> int:
        return self._table.count(key.encode())

    async def delete(self, key: str) -> None:
        self._table.discard(key.encode())


class CounterTable(Protocol):
    def incr(self, key: bytes, ttl: float) -> int: ...

    def count(self, key: bytes) -> int: ...

    def discard(self, key: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class Limits:
    """Failures (within the window) after which answers slow down, and are refused."""

    delay_after: int
    refuse_after: int


@dataclass(frozen=True, slots=True)
class GuardPolicy:
    per_ip: Limits = Limits(delay_after=5, refuse_after=30)
    per_account: Limits = Limits(delay_after=10, refuse_after=100)
    window: float = 15 * 60.0
    base_delay: float = 1.0
    max_delay: float = 15.0
    #: Every failed attempt is answered no sooner than this after it started (Dovecot's
    #: auth_failure_delay is 2 s).  Keep it above the slowest password KDF.
    failure_floor: float = 1.0
    ipv6_prefix: int = 64


@dataclass(frozen=True, slots=True)
class Verdict:
    delay: float
    refused: bool


@dataclass(frozen=True, slots=True)
class LoginOutcome(Generic[T]):
    """What :meth:`LoginGuard.attempt` found: ``value`` on success; ``refused`` when the
    secret was not even checked because of earlier failures."""

    value: T | None = None
    refused: bool = False

    @property
    def ok(self) -> bool:
        return self.value is not None


@dataclass
class LoginGuard:
    policy: GuardPolicy = field(default_factory=GuardPolicy)
    store: FailureStore = field(default_factory=MemoryFailureStore)
    #: Key of the counter names.  Random per process by default; nodes sharing a Redis
    #: backend must share it.
    key: bytes = field(default_factory=lambda: os.urandom(32), repr=False)

    # -- keys -------------------------------------------------------------------------

    def _name(self, kind: str, value: str) -> str:
        digest = hmac.new(self.key, f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()
        return f"login:{kind}:{digest[:32]}"

    def ip_key(self, ip: str) -> str:
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return self._name("ip", ip)
        if isinstance(addr, ipaddress.IPv6Address):
            if addr.ipv4_mapped is not None:
                return self._name("ip", str(addr.ipv4_mapped))
            net = ipaddress.IPv6Network((addr, self.policy.ipv6_prefix), strict=False)
            return self._name("ip", str(net))
        return self._name("ip", str(addr))

    def account_key(self, account: str) -> str:
        # Counted whether or not the account exists: the name as typed, case-folded.
        return self._name("acct", account.strip().casefold())

    # -- decisions --------------------------------------------------------------------

    def _excess(self, count: int, limits: Limits) -> int:
        return count - limits.delay_after

    async def verdict(self, ip: str, account: str) -> Verdict:
        p = self.policy
        ip_count = await self.store.get(self.ip_key(ip))
        acct_count = await self.store.get(self.account_key(account))
        refused = ip_count >= p.per_ip.refuse_after or acct_count >= p.per_account.refuse_after
        excess = max(self._excess(ip_count, p.per_ip), self._excess(acct_count, p.per_account))
        if refused:
            return Verdict(p.max_delay, True)
        if excess < 0:
            return Verdict(0.0, False)
        return Verdict(min(p.max_delay, p.base_delay * (2.0 ** min(excess, 32))), False)

    async def record_failure(self, ip: str, account: str) -> None:
        ttl = self.policy.window
        ip_count = await self.store.incr(self.ip_key(ip), ttl)
        await self.store.incr(self.account_key(account), ttl)
        if ip_count == self.policy.per_ip.refuse_after:
            # The hashed key identifies the client across log lines without naming it.
            log.warning("login refusals start for client %s", self.ip_key(ip)[-12:])

    async def record_success(self, ip: str, account: str) -> None:
        # The account's owner proved the secret: failures against the account (perhaps
        # someone else's) stop counting.  The address keeps its count: behind one NAT,
        # one good login must not wipe an attacker's record.
        await self.store.delete(self.account_key(account))

    async def attempt(
        self, ip: str, account: str, check: Callable[[], Awaitable[T | None]]
    ) -> LoginOutcome[T]:
        """Run ``check`` (returns None for a wrong account or secret) under throttling."""
        verdict = await self.verdict(ip, account)
        if verdict.delay:
            await asyncio.sleep(verdict.delay)
        if verdict.refused:
            # Counted against the address only: the attacker's record grows, the
            # account's owner is not locked out any longer than needed.
            await self.store.incr(self.ip_key(ip), self.policy.window)
            return LoginOutcome(refused=True)
        started = time.monotonic()
        value = await check()
        if value is None:
            await self.record_failure(ip, account)
            wait = started + self.policy.failure_floor - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            return LoginOutcome()
        await self.record_success(ip, account)
        return LoginOutcome(value)


def node_guard(memo: CounterTable | None, server_key: Any) -> LoginGuard:
    """The guard every login listener of a worker uses (IMAP, POP3, SMTP submission):
    failures counted node-wide in the workers' shared table (made before the fork), under
    counter names every worker derives alike from the server key, so that an attacker
    moving between protocols or workers meets the same counts. Without either, a guard of
    this process's own."""
    if memo is None or server_key is None:
        return LoginGuard()
    return LoginGuard(store=SharedFailureStore(memo), key=server_key.derive(b"guard/logins"))
