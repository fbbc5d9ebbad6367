"""Delivering one message to one destination domain over SMTP (RFC 5321 §5).

MX hosts are tried in preference order, each address in turn. Without a `TLSPolicy`,
STARTTLS is used whenever the server offers it and any certificate is accepted
(opportunistic TLS, RFC 7435). With one, the policy layer decides per MX (MTA-STS,
RFC 8461; DANE, RFC 7672; see `mailfort.relay.tlspolicy` for the loop followed here):
MXs the policy rules out are never contacted, a session that fails the policy carries no
mail, and every session's result is counted for TLS-RPT (RFC 8460). Every recipient
comes back with a final or temporary verdict: the queue decides what to do.
"""

from __future__ import annotations

import contextlib
import functools
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

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


def _no_address(domain: str, permanent: bool) -> Outcome:
    if permanent:  # no MX and the domain itself has no address: nowhere to deliver
        return Outcome(550, f"5.1.2 {domain} has no mail server")
    return Outcome(451, f"4.4.4 no address for the mail servers of {domain}")


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
) -> dict[str, Outcome]:
    """One attempt at delivering ``body`` to ``rcpts`` (all in ``domain``).

    ``tls`` None: opportunistic STARTTLS with any certificate. Given: MTA-STS, DANE and
    TLS-RPT as the policy decides, per MX.
    """
    job = _Job(mail_from, tuple(rcpts), body, helo, port, timeout)
    if tls is None:
        try:
            candidates = await routes(resolver, domain)
        except NoRoute as exc:
            return dict.fromkeys(rcpts, exc.outcome)
        last = Outcome(451, f"4.4.1 no mail server of {domain} answered")
        for route in candidates:
            try:
                return await _opportunistic_session(route, job)
            except _CONNECTION_ERRORS as exc:
                # RFC 5321 §5.1: a connection failure or 4xx greeting means try the next host.
                last = Outcome(451, f"4.4.1 {route.host}: {type(exc).__name__}")
        return dict.fromkeys(rcpts, last)
    return await _deliver_with_policy(resolver, tls, domain, job)


@dataclass(frozen=True)
class _Job:
    mail_from: str
    rcpts: tuple[str, ...]
    body: bytes
    helo: str
    port: int
    timeout: float


async def _deliver_with_policy(
    resolver: Resolver, tls: TLSPolicy, domain: str, job: _Job
) -> dict[str, Outcome]:
    try:
        hosts, implicit = await mx_hosts(resolver, domain)
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
            addresses = await resolver.addresses(mx.host)
        except TemporaryDNSError:
            lookup_failed = True
            last = Outcome(451, f"4.4.3 address lookup for {mx.host} failed")
            continue
        for address in addresses:
            found_address = True
            try:
                result = await _policy_session(tls, mx, Route(mx.host, address), job)
            except _CONNECTION_ERRORS as exc:
                last = Outcome(451, f"4.4.1 {mx.host}: {type(exc).__name__}")
                continue
            if isinstance(result, Outcome):
                last = result  # the policy refused this MX: try the next one
                continue
            return result
    if not found_address:
        return dict.fromkeys(job.rcpts, _no_address(domain, implicit and not lookup_failed))
    return dict.fromkeys(job.rcpts, last)


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


async def _opportunistic_session(route: Route, job: _Job) -> dict[str, Outcome]:
    client, _banner = await _connect(route, job)
    try:
        if client.supports_extension("starttls"):
            await client.starttls(server_hostname=route.host, tls_context=opportunistic_context())
            await client.ehlo()
        return await _transaction(client, job)
    finally:
        await _quit(client)


async def _policy_session(
    tls: TLSPolicy, mx: MXPlan, route: Route, job: _Job
) -> dict[str, Outcome] | Outcome:
    """One connection to one address of ``mx`` under its plan. Returns the recipients'
    outcomes, or the temporary outcome of a policy refusal (the caller tries the next
    MX). Connection errors propagate."""
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
        try:
            return await _transaction(client, job)
        finally:
            await _quit(client)

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
                return await _unverified_session(tls, mx, route, job)
        # Opportunistic fallback to plaintext on a fresh connection (RFC 7435 §1.3).
        return await _plaintext_session(route, job)

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
        return await _transaction(client, job)
    finally:
        await _quit(client)


async def _unverified_session(
    tls: TLSPolicy, mx: MXPlan, route: Route, job: _Job
) -> dict[str, Outcome]:
    """Testing mode's retry: STARTTLS without certificate checks. A handshake failure
    raises `ssl.SSLError` so that the caller falls back to plaintext."""
    client, _banner = await _connect(route, job)
    try:
        if not client.supports_extension("starttls"):
            return await _transaction(client, job)
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
        return await _transaction(client, job)
    finally:
        await _quit(client)


async def _plaintext_session(route: Route, job: _Job) -> dict[str, Outcome]:
    client, _banner = await _connect(route, job)
    try:
        return await _transaction(client, job)
    finally:
        await _quit(client)


def _refused(mx: MXPlan, outcome: TLSOutcome) -> Outcome:
    # 4.7.5 "cryptographic failure" (RFC 3463 §3.8), as other MTAs report TLS policy
    # failures; temporary, as RFC 8461 §5.1 and RFC 7672 §2.2 want.
    detail = f": {outcome.detail}" if outcome.detail else ""
    return Outcome(451, f"4.7.5 {mx.host} ({mx.mode}): {outcome.failure}{detail}"[:400])


async def _transaction(client: aiosmtplib.SMTP, job: _Job) -> dict[str, Outcome]:
    """MAIL, RCPT per recipient, DATA: per-recipient outcomes (RFC 5321 §3.3)."""
    rcpts = job.rcpts
    try:
        result: dict[str, Outcome] = {}
        response = await client.mail(job.mail_from)
        if not 200 <= response.code < 300:
            return dict.fromkeys(rcpts, Outcome(response.code, response.message))
        accepted: list[str] = []
        for rcpt in rcpts:
            try:
                reply = await client.rcpt(rcpt)
            except aiosmtplib.SMTPRecipientRefused as exc:
                result[rcpt] = Outcome(exc.code, exc.message)
                continue
            accepted.append(rcpt)
            result[rcpt] = Outcome(reply.code, reply.message)
        if not accepted:
            await client.rset()
            return result
        try:
            reply = await client.data(job.body)
            final = Outcome(reply.code, reply.message)
        except aiosmtplib.SMTPDataError as exc:
            final = Outcome(exc.code, exc.message)
        for rcpt in accepted:
            result[rcpt] = final
        return result
    except aiosmtplib.SMTPResponseException as exc:
        return dict.fromkeys(rcpts, Outcome(exc.code, exc.message))


async def _quit(client: aiosmtplib.SMTP) -> None:
    if not client.is_connected:
        return
    try:
        await client.quit()
    except (aiosmtplib.SMTPException, OSError):
        client.close()
