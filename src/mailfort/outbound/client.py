"""Delivering one message to one destination domain over SMTP (RFC 5321 §5).

MX hosts are tried in preference order, each address in turn. Without a `TLSPolicy`,
STARTTLS is used whenever the server offers it and any certificate is accepted
(opportunistic TLS, RFC 7435). With one, the policy layer decides per MX (MTA-STS,
RFC 8461; DANE, RFC 7672; see `mailfort.relay.tlspolicy` for the loop followed here):
MXs the policy rules out are never contacted, a session that fails the policy carries no
mail, and every session's result is counted for TLS-RPT (RFC 8460). Every recipient
comes back with a final or temporary verdict: the queue decides what to do.

With a `SessionPool`, a session that finished a transaction is kept open for the next
message to the same destination (RFC 5321 §3.3: a session may carry any number of
transactions). Connecting, EHLO and the TLS handshake are then paid once per session,
not once per message, and TLS-RPT counts sessions, as RFC 8460 §4.4 asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib

from mailfort.dns import Resolver, TemporaryDNSError
from mailfort.relay.contexts import opportunistic_context as _unverified_context
from mailfort.relay.tlspolicy import MXPlan, TLSOutcome, TLSPolicy

# What a failed connection or handshake raises: aiosmtplib's own errors, socket errors
# (ssl.SSLError is an OSError) and timeouts.
_CONNECTION_ERRORS = (aiosmtplib.SMTPException, OSError, TimeoutError)


@dataclass(frozen=True)
class Outcome:
    code: int
    text: str

    @property
    def delivered(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return self.code >= 500


@dataclass(frozen=True)
class Route:
    host: str
    address: str


class NoRoute(Exception):
    """No usable MX: the outcome every recipient gets."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.text)
        self.outcome = outcome


@functools.cache
def opportunistic_context() -> ssl.SSLContext:
    """Encrypt if the server can, without authenticating it (RFC 7435): better than clear
    text, and the only option for most destinations that publish neither MTA-STS nor DANE.
    Built once: the context holds no per-connection state."""
    return _unverified_context()


async def mx_hosts(resolver: Resolver, domain: str) -> tuple[list[str], bool]:
    """The domain's MX hosts in preference order, and whether that is the implicit MX
    (the domain itself, RFC 5321 §5.1). Raises `NoRoute` for a null MX or a failed lookup."""
    try:
        mx = await resolver.mx(domain)
    except TemporaryDNSError as exc:
        raise NoRoute(Outcome(451, f"4.4.3 MX lookup for {domain} failed")) from exc
    # RFC 7505: a single "0 ." MX says the domain accepts no mail.
    if len(mx) == 1 and mx[0][1] in ("", "."):
        raise NoRoute(Outcome(556, f"5.1.10 {domain} does not accept mail (null MX)"))
    hosts = [host for _pref, host in mx if host not in ("", ".")]
    if not hosts:
        return [domain], True
    return hosts, False


async def routes(resolver: Resolver, domain: str) -> list[Route]:
    """Every (MX host, address) to try, in order, for delivery without a TLS policy."""
    hosts, implicit = await mx_hosts(resolver, domain)
    out: list[Route] = []
    lookup_failed = False
    for host in hosts:
        try:
            addresses = await resolver.addresses(host)
        except TemporaryDNSError:
            lookup_failed = True
            continue
        out += [Route(host, a) for a in addresses]
    if not out:
        raise NoRoute(_no_address(domain, implicit and not lookup_failed))
    return out


async def _mx_hosts(
    resolver: Resolver, domain: str, pool: SessionPool | None
) -> tuple[list[str], bool]:
    found: tuple[list[str], bool] | None = pool.recall("mx", domain) if pool else None
    if found is None:
        found = await mx_hosts(resolver, domain)  # NoRoute is not remembered
        if pool is not None:
            pool.remember("mx", domain, found)
    return found


async def _addresses(resolver: Resolver, host: str, pool: SessionPool | None) -> list[str]:
    found: list[str] | None = pool.recall("a", host) if pool else None
    if found is None:
        found = await resolver.addresses(host)
        if pool is not None and found:
            pool.remember("a", host, found)
    return found


async def _routes(resolver: Resolver, domain: str, pool: SessionPool | None) -> list[Route]:
    if pool is None:
        return await routes(resolver, domain)
    found: list[Route] | None = pool.recall("routes", domain)
    if found is None:
        found = await routes(resolver, domain)
        pool.remember("routes", domain, found)
    return found


def _no_address(domain: str, permanent: bool) -> Outcome:
    if permanent:  # no MX and the domain itself has no address: nowhere to deliver
        return Outcome(550, f"5.1.2 {domain} has no mail server")
    return Outcome(451, f"4.4.4 no address for the mail servers of {domain}")


# -- the session pool ------------------------------------------------------------------------

# (recipient domain, MX host, MX address, port, our EHLO name, what the TLS plan asked):
# a session is reused only for the decision that opened it. A changed plan (a new
# MTA-STS mode, other TLSA records) is another destination and opens its own session.
PoolKey = tuple[object, ...]
_DNS_MEMO_MAX = 10_000  # remembered answers at most (expired ones go when it is reached)


@dataclass(eq=False)
class _Session:
    client: aiosmtplib.SMTP
    key: PoolKey
    opened: float = field(default_factory=time.monotonic)
    idle_since: float = 0.0
    transactions: int = 0
    reset_needed: bool = False  # the last transaction ended early: RSET before the next


class SessionPool:
    """Idle SMTP sessions by destination, for the engine's next transaction there.

    Bounds, after Postfix's connection cache (``smtp_connection_cache_time_limit``,
    ``smtp_connection_reuse_time_limit``): a session idle for ``idle_timeout`` seconds is
    closed (QUIT), so that no server holds our idle connections for long; one is not
    reused after ``max_transactions`` transactions or ``max_age`` seconds; at most
    ``max_idle`` idle sessions are kept per destination. Sessions in use are not in the
    pool: the engine's concurrency bounds those.

    It also remembers the destinations' MX and address answers for ``dns_ttl`` seconds:
    even answered from the resolver's cache, the MX, A and AAAA lookups cost ~0.15 ms a
    message. A changed MX is seen ``dns_ttl`` seconds later.

    One per event loop; not thread-safe.
    """

    def __init__(
        self,
        *,
        idle_timeout: float = 5.0,
        max_transactions: int = 100,
        max_age: float = 300.0,
        max_idle: int = 20,
        dns_ttl: float = 30.0,
    ) -> None:
        self.idle_timeout = idle_timeout
        self.max_transactions = max_transactions
        self.max_age = max_age
        self.max_idle = max_idle
        self.dns_ttl = dns_ttl
        self._idle: dict[PoolKey, list[_Session]] = {}
        self._dns: dict[tuple[str, str], tuple[float, Any]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self.opened = 0  # sessions opened through the pool, for tests and statistics
        self.reused = 0  # transactions that ran on a kept session

    def recall(self, kind: str, name: str) -> Any:
        """A DNS answer `remember`ed less than ``dns_ttl`` seconds ago, or None."""
        hit = self._dns.get((kind, name))
        if hit is None or hit[0] <= time.monotonic():
            return None
        return hit[1]

    def remember(self, kind: str, name: str, value: Any) -> None:
        now = time.monotonic()
        if len(self._dns) >= _DNS_MEMO_MAX:
            self._dns = {k: v for k, v in self._dns.items() if v[0] > now}
        self._dns[(kind, name)] = (now + self.dns_ttl, value)

    def idle_count(self) -> int:
        return sum(len(sessions) for sessions in self._idle.values())

    def take(self, key: PoolKey) -> _Session | None:
        """The most recently used live session for ``key``, or None."""
        sessions = self._idle.get(key)
        now = time.monotonic()
        while sessions:
            session = sessions.pop()  # the newest: the least likely to be timed out
            if session.client.is_connected and now - session.idle_since < self.idle_timeout:
                if not sessions:
                    del self._idle[key]
                return session
            self._discard(session)
        self._idle.pop(key, None)
        return None

    def put(self, session: _Session) -> None:
        """Keep ``session`` for its destination, or close it if it is spent."""
        now = time.monotonic()
        sessions = self._idle.setdefault(session.key, [])
        if (
            not session.client.is_connected
            or session.transactions >= self.max_transactions
            or now - session.opened >= self.max_age
            or len(sessions) >= self.max_idle
        ):
            if not sessions:
                del self._idle[session.key]
            self._discard(session)
            return
        session.idle_since = now
        sessions.append(session)
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self.idle_timeout, self._expire)

    def _expire(self) -> None:
        self._sweep = None
        now = time.monotonic()
        for key in list(self._idle):
            keep = []
            for session in self._idle[key]:
                if now - session.idle_since >= self.idle_timeout:
                    self._discard(session)
                else:
                    keep.append(session)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._idle:
            oldest = min(s.idle_since for sessions in self._idle.values() for s in sessions)
            delay = max(oldest + self.idle_timeout - now, 0.05)
            self._sweep = asyncio.get_running_loop().call_later(delay, self._expire)

    def _discard(self, session: _Session) -> None:
        """QUIT in the background: nobody waits for a session's goodbye."""
        if not session.client.is_connected:
            session.client.close()
            return
        task = asyncio.get_running_loop().create_task(_quit(session.client))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """QUIT every idle session and wait for the goodbyes (bounded by the timeouts)."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for sessions in self._idle.values():
            for session in sessions:
                self._discard(session)
        self._idle.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


class _Broken(Exception):
    """The session failed during a transaction.

    ``data_sent``: the failure came after DATA was sent, when the server may already
    hold the message (RFC 5321 §4.1.1.4: it takes responsibility with its reply to the
    final dot, which we may never have read). Such a message must not be sent again at
    once, on this destination or another: the recipients that were accepted are deferred
    (``partial`` holds the others' outcomes), and the retry comes from the queue later.
    Before DATA nothing was handed over, and a fresh session may try again.
    """

    def __init__(self, cause: BaseException, *, data_sent: bool, partial: dict[str, Outcome]):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause
        self.data_sent = data_sent
        self.partial = partial


# -- delivery ----------------------------------------------------------------------------------


async def deliver(
    resolver: Resolver,
    domain: str,
    mail_from: str,
    rcpts: Sequence[str],
    body: bytes,
    *,
    helo: str,
    port: int = 25,
    timeout: float = 60,
    tls: TLSPolicy | None = None,
    pool: SessionPool | None = None,
) -> dict[str, Outcome]:
    """One attempt at delivering ``body`` to ``rcpts`` (all in ``domain``).

    ``tls`` None: opportunistic STARTTLS with any certificate. Given: MTA-STS, DANE and
    TLS-RPT as the policy decides, per MX. ``pool`` None: a session of its own, closed at
    the end. Given: an idle session to the same destination is reused when there is one,
    and the session is kept there afterwards.
    """
    job = _Job(mail_from, tuple(rcpts), body, helo, port, timeout)
    if tls is None:
        try:
            candidates = await _routes(resolver, domain, pool)
        except NoRoute as exc:
            return dict.fromkeys(rcpts, exc.outcome)
        last = Outcome(451, f"4.4.1 no mail server of {domain} answered")
        for route in candidates:
            key: PoolKey = (domain, route.host, route.address, port, helo, "opportunistic")
            try:
                result = await _send(pool, key, functools.partial(_open_plain, route, job), job)
            except _CONNECTION_ERRORS as exc:
                # RFC 5321 §5.1: a connection failure or 4xx greeting means try the next host.
                last = Outcome(451, f"4.4.1 {route.host}: {type(exc).__name__}")
                continue
            except _Broken as exc:
                if exc.data_sent:
                    return _unknown(job, route.host, exc)
                last = Outcome(451, f"4.4.1 {route.host}: {type(exc.cause).__name__}")
                continue
            assert not isinstance(result, Outcome)  # only a TLS policy refuses a session
            return result
        return dict.fromkeys(rcpts, last)
    return await _deliver_with_policy(resolver, tls, domain, job, pool)


@dataclass(frozen=True)
class _Job:
    mail_from: str
    rcpts: tuple[str, ...]
    body: bytes
    helo: str
    port: int
    timeout: float


def _unknown(job: _Job, host: str, exc: _Broken) -> dict[str, Outcome]:
    lost = Outcome(451, f"4.4.2 {host}: connection lost after DATA ({type(exc.cause).__name__})")
    return {rcpt: exc.partial.get(rcpt, lost) for rcpt in job.rcpts}


async def _deliver_with_policy(
    resolver: Resolver, tls: TLSPolicy, domain: str, job: _Job, pool: SessionPool | None
) -> dict[str, Outcome]:
    try:
        hosts, implicit = await _mx_hosts(resolver, domain, pool)
    except NoRoute as exc:
        return dict.fromkeys(job.rcpts, exc.outcome)
    plan = await tls.plan(domain, hosts)
    candidates = plan.candidates
    if not candidates:
        # RFC 8461 §5.1 (and RFC 7672 §2.1.1 for DANE): a policy that leaves no usable MX
        # defers the message; a later attempt may find a new policy or fixed DNS. Never a
        # bounce here: only the queue's lifetime turns this into one.
        reasons = ", ".join(f"{mx.host}: {mx.skip} {mx.skip_detail}".rstrip() for mx in plan.mxs)
        return dict.fromkeys(
            job.rcpts, Outcome(451, f"4.7.5 no MX of {domain} meets its TLS policy ({reasons})")
        )
    last = Outcome(451, f"4.4.1 no mail server of {domain} answered")
    found_address = lookup_failed = False
    for mx in candidates:
        try:
            addresses = await _addresses(resolver, mx.host, pool)
        except TemporaryDNSError:
            lookup_failed = True
            last = Outcome(451, f"4.4.3 address lookup for {mx.host} failed")
            continue
        for address in addresses:
            found_address = True
            route = Route(mx.host, address)
            key: PoolKey = (domain, mx.host, address, job.port, job.helo, *_plan_key(mx))
            opener = functools.partial(_open_with_policy, tls, mx, route, job)
            try:
                result = await _send(pool, key, opener, job)
            except _CONNECTION_ERRORS as exc:
                last = Outcome(451, f"4.4.1 {mx.host}: {type(exc).__name__}")
                continue
            except _Broken as exc:
                if exc.data_sent:
                    return _unknown(job, mx.host, exc)
                last = Outcome(451, f"4.4.1 {mx.host}: {type(exc.cause).__name__}")
                continue
            if isinstance(result, Outcome):
                last = result  # the policy refused this MX: try the next one
                continue
            return result
    if not found_address:
        return dict.fromkeys(job.rcpts, _no_address(domain, implicit and not lookup_failed))
    return dict.fromkeys(job.rcpts, last)


def _plan_key(mx: MXPlan) -> tuple[object, ...]:
    return (mx.mode.value, mx.tlsa, mx.mx_in_policy)


Opener = Callable[[], Awaitable["aiosmtplib.SMTP | Outcome"]]


async def _send(
    pool: SessionPool | None, key: PoolKey, opener: Opener, job: _Job
) -> dict[str, Outcome] | Outcome:
    """Run the transaction on a kept session for ``key`` or on a new one from ``opener``.

    A kept session that turns out dead before DATA (the server timed it out, or dropped
    it) is discarded and the transaction runs again on another: nothing reached the
    server, so nothing can arrive twice. Returns an `Outcome` when the policy refused the
    new session; raises connection errors of a new session and `_Broken`.
    """
    if pool is not None:
        while (session := pool.take(key)) is not None:
            try:
                result = await _transaction(session, job, reused=True)
            except _Broken as exc:
                session.client.close()
                if exc.data_sent:
                    raise
                continue
            except BaseException:
                session.client.close()
                raise
            pool.reused += 1
            pool.put(session)
            return result
    opened = await opener()
    if isinstance(opened, Outcome):
        return opened
    session = _Session(opened, key)
    if pool is None:
        try:
            return await _transaction(session, job, reused=False)
        finally:
            await _quit(opened)
    pool.opened += 1
    try:
        result = await _transaction(session, job, reused=False)
    except BaseException:
        opened.close()
        raise
    pool.put(session)
    return result


async def _connect(route: Route, job: _Job) -> tuple[aiosmtplib.SMTP, str | None]:
    """A connected client that has said EHLO, and the name the server's greeting gave
    (TLS-RPT's ``receiving-mx-helo``, RFC 8460 §4.4)."""
    client = aiosmtplib.SMTP(
        hostname=route.address,
        port=job.port,
        local_hostname=job.helo,
        timeout=job.timeout,
        start_tls=False,
    )
    greeting = await client.connect()
    try:
        await client.ehlo()
    except BaseException:
        client.close()
        raise
    words = greeting.message.split(None, 1)
    return client, (words[0] if words else None)


async def _open_plain(route: Route, job: _Job) -> aiosmtplib.SMTP:
    """A session without a TLS policy: STARTTLS when offered, any certificate."""
    client, _banner = await _connect(route, job)
    try:
        if client.supports_extension("starttls"):
            await client.starttls(server_hostname=route.host, tls_context=opportunistic_context())
            await client.ehlo()
    except BaseException:
        await _quit(client)
        raise
    return client


async def _open_with_policy(
    tls: TLSPolicy, mx: MXPlan, route: Route, job: _Job
) -> aiosmtplib.SMTP | Outcome:
    """A session to one address of ``mx`` that meets its plan, ready for MAIL; or the
    temporary outcome of a policy refusal (the caller tries the next MX). Connection
    errors propagate. The session's TLS result is counted here, once per session."""
    client, banner = await _connect(route, job)
    sockname = client.get_transport_info("sockname")
    sending_ip = str(sockname[0]) if sockname else None

    async def record(outcome: TLSOutcome) -> None:
        await tls.record(
            mx, outcome, sending_ip=sending_ip, receiving_ip=route.address, receiving_helo=banner
        )

    if not client.supports_extension("starttls"):
        outcome = tls.judge_no_starttls(mx)
        await record(outcome)
        if not outcome.deliver or not outcome.plaintext_ok:
            # RFC 8461 §5 / RFC 7672 §2.2: TLS is required for this MX. The session has
            # carried nothing yet; leave without sending more.
            await _quit(client)
            return _refused(mx, outcome)
        return client

    try:
        await client.starttls(server_hostname=mx.host, tls_context=tls.ssl_context(mx))
    except _CONNECTION_ERRORS as exc:
        # RFC 3207 §4.1: after a failed handshake the connection is unusable.
        client.close()
        outcome = tls.judge_handshake_error(mx, exc)
        await record(outcome)
        if not outcome.deliver or not (outcome.plaintext_ok or outcome.retry_unverified):
            return _refused(mx, outcome)
        if outcome.retry_unverified:
            # RFC 8461 §5: testing mode reports the failure, then delivers as without a
            # policy: TLS without verification on a fresh connection.
            with contextlib.suppress(ssl.SSLError):
                return await _open_unverified(tls, mx, route, job)
        # Opportunistic fallback to plaintext on a fresh connection (RFC 7435 §1.3).
        plain, _banner = await _connect(route, job)
        return plain

    outcome = tls.judge_session(mx, client.get_transport_info("ssl_object"))
    await record(outcome)
    if not outcome.deliver:
        # DANE or PKIX authentication failed after the handshake: not even EHLO goes
        # to this server (RFC 7672 §2.2: authenticate before any data). Close the
        # connection without a word; QUIT would be the first thing sent to it.
        client.close()
        return _refused(mx, outcome)
    try:
        await client.ehlo()  # RFC 3207 §4.2: forget what was said before TLS
    except BaseException:
        await _quit(client)
        raise
    return client


async def _open_unverified(tls: TLSPolicy, mx: MXPlan, route: Route, job: _Job) -> aiosmtplib.SMTP:
    """Testing mode's retry: STARTTLS without certificate checks. A handshake failure
    raises `ssl.SSLError` so that the caller falls back to plaintext."""
    client, _banner = await _connect(route, job)
    try:
        if not client.supports_extension("starttls"):
            return client
        try:
            await client.starttls(
                server_hostname=mx.host, tls_context=tls.ssl_context(mx, unverified=True)
            )
        except ssl.SSLError:
            client.close()
            raise
        outcome = tls.judge_session(mx, client.get_transport_info("ssl_object"))
        await tls.record(mx, outcome)  # counted already with the failure: a no-op
        await client.ehlo()
    except BaseException:
        await _quit(client)
        raise
    return client


def _refused(mx: MXPlan, outcome: TLSOutcome) -> Outcome:
    # 4.7.5 "cryptographic failure" (RFC 3463 §3.8), as other MTAs report TLS policy
    # failures; temporary, as RFC 8461 §5.1 and RFC 7672 §2.2 want.
    detail = f": {outcome.detail}" if outcome.detail else ""
    return Outcome(451, f"4.7.5 {mx.host} ({mx.mode}): {outcome.failure}{detail}"[:400])


async def _transaction(session: _Session, job: _Job, *, reused: bool) -> dict[str, Outcome]:
    """MAIL, RCPT per recipient, DATA: per-recipient outcomes (RFC 5321 §3.3).

    Raises `_Broken` when the connection fails, or when a kept session answers 421 (the
    server is closing it, RFC 5321 §4.2.2) before DATA.
    """
    client = session.client
    rcpts = job.rcpts
    refused: dict[str, Outcome] = {}  # only these have a verdict until DATA's reply
    data_sent = False
    session.transactions += 1
    try:
        if session.reset_needed:
            # RFC 5321 §4.1.1.5: the last transaction stopped before its end; RSET
            # clears what the server holds of it before a new MAIL. A session that
            # refuses RSET is not one to send mail on: a fresh one takes over.
            try:
                await client.rset()
            except aiosmtplib.SMTPResponseException as exc:
                raise _Broken(exc, data_sent=False, partial=refused) from exc
        session.reset_needed = True  # until this transaction ends with DATA's reply
        try:
            await client.mail(job.mail_from)
        except aiosmtplib.SMTPResponseException as exc:
            if reused and exc.code == 421:
                raise
            return dict.fromkeys(rcpts, Outcome(exc.code, exc.message))
        accepted: list[str] = []
        for rcpt in rcpts:
            try:
                await client.rcpt(rcpt)
            except aiosmtplib.SMTPResponseException as exc:
                if reused and exc.code == 421 and not accepted:
                    raise
                refused[rcpt] = Outcome(exc.code, exc.message)
                continue
            accepted.append(rcpt)
        if not accepted:
            return refused
        data_sent = True
        try:
            reply = await client.data(job.body)
            final = Outcome(reply.code, reply.message)
            # RFC 5321 §4.1.1.4: the reply to the final dot ends the transaction.
            session.reset_needed = False
        except aiosmtplib.SMTPDataError as exc:
            final = Outcome(exc.code, exc.message)
        return {rcpt: refused.get(rcpt, final) for rcpt in rcpts}
    except aiosmtplib.SMTPResponseException as exc:
        if exc.code == 421 or not client.is_connected:
            raise _Broken(exc, data_sent=data_sent, partial=refused) from exc
        return {rcpt: refused.get(rcpt, Outcome(exc.code, exc.message)) for rcpt in rcpts}
    except _CONNECTION_ERRORS as exc:
        raise _Broken(exc, data_sent=data_sent, partial=refused) from exc


async def _quit(client: aiosmtplib.SMTP) -> None:
    if not client.is_connected:
        return
    try:
        await client.quit()
    except (aiosmtplib.SMTPException, OSError):
        client.close()
