"""Delivering one message to one destination domain over SMTP (RFC 5321 §5).

MX hosts are tried in preference order, each address in turn; STARTTLS is used whenever the
server offers it (opportunistic TLS; MTA-STS and DANE tighten this per destination). Every
recipient comes back with a final or temporary verdict: the queue decides what to do.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import aiosmtplib

from mailfort.dns import Resolver, TemporaryDNSError


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


def opportunistic_context() -> ssl.SSLContext:
    """Encrypt if the server can, without authenticating it (RFC 7435): better than clear
    text, and the only option for most destinations that publish neither MTA-STS nor DANE."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def routes(resolver: Resolver, domain: str) -> list[Route]:
    try:
        mx = await resolver.mx(domain)
    except TemporaryDNSError as exc:
        raise NoRoute(Outcome(451, f"4.4.3 MX lookup for {domain} failed")) from exc
    # RFC 7505: a single "0 ." MX says the domain accepts no mail.
    if len(mx) == 1 and mx[0][1] in ("", "."):
        raise NoRoute(Outcome(556, f"5.1.10 {domain} does not accept mail (null MX)"))
    hosts = [host for _pref, host in mx if host not in ("", ".")] or [domain]  # §5.1 implicit MX
    out: list[Route] = []
    for host in hosts:
        try:
            addresses = await resolver.addresses(host)
        except TemporaryDNSError:
            continue
        out += [Route(host, a) for a in addresses]
    if not out:
        if not mx:
            raise NoRoute(Outcome(550, f"5.1.2 {domain} has no mail server"))
        raise NoRoute(Outcome(451, f"4.4.4 no address for the mail servers of {domain}"))
    return out


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
) -> dict[str, Outcome]:
    """One attempt at delivering ``body`` to ``rcpts`` (all in ``domain``)."""
    try:
        candidates = await routes(resolver, domain)
    except NoRoute as exc:
        return dict.fromkeys(rcpts, exc.outcome)
    last = Outcome(451, f"4.4.1 no mail server of {domain} answered")
    for route in candidates:
        try:
            return await _session(route, port, mail_from, rcpts, body, helo, timeout)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            # RFC 5321 §5.1: a connection failure or 4xx greeting means try the next host.
            last = Outcome(451, f"4.4.1 {route.host}: {type(exc).__name__}")
    return dict.fromkeys(rcpts, last)


async def _session(
    route: Route,
    port: int,
    mail_from: str,
    rcpts: Sequence[str],
    body: bytes,
    helo: str,
    timeout: float,
) -> dict[str, Outcome]:
    client = aiosmtplib.SMTP(
        hostname=route.address, port=port, local_hostname=helo, timeout=timeout, start_tls=False
    )
    await client.connect()
    try:
        await client.ehlo()
        if client.supports_extension("starttls"):
            await client.starttls(server_hostname=route.host, tls_context=opportunistic_context())
            await client.ehlo()
        result: dict[str, Outcome] = {}
        response = await client.mail(mail_from)
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
            reply = await client.data(body)
            final = Outcome(reply.code, reply.message)
        except aiosmtplib.SMTPDataError as exc:
            final = Outcome(exc.code, exc.message)
        for rcpt in accepted:
            result[rcpt] = final
        return result
    except aiosmtplib.SMTPResponseException as exc:
        return dict.fromkeys(rcpts, Outcome(exc.code, exc.message))
    finally:
        try:
            await client.quit()
        except (aiosmtplib.SMTPException, OSError):
            client.close()
