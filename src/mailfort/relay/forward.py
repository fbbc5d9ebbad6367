"""Forwarding inside the SMTP session (issue 5, design.md): the message is relayed to every
target while the sender waits, held only in memory, and the sender gets the answer.

For each target the message leaves with
- the envelope sender rewritten with SRS (`relay.srs`) at the forwarding domain, so SPF
  passes downstream and bounces come back to us, and we can route them to the sender;
- a DKIM signature of the forwarding domain (both keys, `auth.dkimsign`) and an ARC set
  (RFC 8617) that carries our Authentication-Results, so the target can trust our checks
  although the original signatures may no longer verify;
- when the target refuses it for the author domain's DMARC policy, one more try with
  From rewritten to the alias (original in Reply-To and X-Original-From).

The answer (RFC 5321 needs one reply for the whole transaction): 421 when a webhook
failed, 451 when any target failed temporarily, 550 when every target failed
permanently, else 250. A sender that retries after a 4xx must not reach a target twice:
every acceptance is remembered for a day in a memo shared by the worker processes
(keyed by a digest of sender and content), and skipped on the retry.

Nothing here writes to disk: no spool, no temporary file. Targets' addresses never appear
in replies or logs (the sender must not learn where an alias leads).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.errors
import email.header
import email.utils
import hashlib
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

from mailfort.auth import signing
from mailfort.directory.lookups import PerDomain, signing_keys
from mailfort.directory.service import Directory, SigningKey
from mailfort.dns import Resolver
from mailfort.outbound import client, dsn
from mailfort.relay import webhook
from mailfort.relay.memo import SharedMemo
from mailfort.relay.srs import SRS, SRSError
from mailfort.relay.tlspolicy import TLSPolicy

log = logging.getLogger("mailfort.relay.forward")

DELIVERED_TTL: Final = 86400.0  # how long a retry is recognised as one
SRS_ISSUED_TTL: Final = 10 * 86400.0  # as long as an SRS address stays valid
# Downstream answers that say "your From fails DMARC here" (RFC 7372 5.7.26; providers
# also use 5.7.1 with the word in the text).
_DMARC_REFUSAL = re.compile(rb"dmarc|5\.7\.26", re.IGNORECASE)


@dataclass(frozen=True)
class Target:
    """Where one copy goes: an outside address or a webhook URL, and why (the alias)."""

    value: str
    alias: str  # the address the sender wrote (alias, or our SRS address for a bounce)
    webhook: bool = False

    @property
    def forwarding_domain(self) -> str:
        return self.alias.rpartition("@")[2].lower()


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


@dataclass(frozen=True)
class _Copy:
    """What every copy of one forwarded message is made from."""

    message: bytes
    sender: str
    auth_results: str
    cv: str


@dataclass(frozen=True)
class _Result:
    target: Target
    code: int  # SMTP code, or 421 for a failed webhook
    detail: str

    @property
    def status(self) -> str:
        """The downstream enhanced status code (RFC 3463), as a DSN reads it."""
        return dsn.Failure(self.target.value, self.code, self.detail).status


SRS_PERIOD: Final = 30 * 86400  # a new SRS secret each period; the previous one still verifies


class SRSKeys:
    """SRS secrets derived from the server key, one per 30-day period: rotation needs no
    state and no operator, and every node of a cluster (same server key) agrees."""

    def __init__(self, derive: Callable[[bytes], bytes], clock: Callable[[], float] = time.time):
        self._derive = derive
        self._clock = clock
        self._cache: dict[tuple[str, int], SRS] = {}

    def __call__(self, domain: str) -> SRS:
        period = int(self._clock() // SRS_PERIOD)
        key = (domain.lower(), period)
        srs = self._cache.get(key)
        if srs is None:
            if len(self._cache) > 1024:
                self._cache.clear()
            secrets = [self._derive(b"srs/%d" % p) for p in (period, period - 1)]
            srs = self._cache[key] = SRS(domain.lower(), secrets)
        return srs


def fingerprint(mail_from: str, raw: bytes) -> bytes:
    """Same sender, same bytes: the same message retried after our 4xx."""
    return hashlib.blake2b(mail_from.lower().encode() + b"\0" + raw, digest_size=16).digest()


def srs_issued_key(address: str) -> bytes:
    return b"srs\0" + address.lower().encode()


def delivered_key(fp: bytes, target: str) -> bytes:
    return b"fwd\0" + fp + target.lower().encode()


class Forwarder:
    def __init__(
        self,
        directory: Directory,
        resolver: Resolver,
        memo: SharedMemo,
        srs_for: Callable[[str], SRS],
        *,
        hostname: str,
        port: int = 25,
        timeout: float = 60.0,
        tls: TLSPolicy | None = None,
        allow_private_webhooks: bool = False,
        webhook_ssl: ssl.SSLContext | None = None,
        bounce: Callable[[str, bytes], Awaitable[None]] | None = None,
        pool: client.SessionPool | None = None,
    ) -> None:
        self.directory = directory
        self.resolver = resolver
        self.memo = memo
        self.srs_for = srs_for
        self.hostname = hostname
        self.port = port
        self.timeout = timeout
        self.tls = tls
        self.allow_private_webhooks = allow_private_webhooks
        self.webhook_ssl = webhook_ssl
        self.bounce = bounce  # where DSNs for partly failed forwards go (outbound queue)
        # Sessions to the targets' MXs kept open between messages (per worker and loop):
        # the handshakes are most of a forward's cost otherwise.
        self.pool = pool
        self._keys = signing_keys(directory)
        self._secrets = PerDomain(directory.webhook_secret)

    # ---- the transaction -------------------------------------------------------------------

    async def forward(
        self,
        fp: bytes,
        message: bytes,
        mail_from: str,
        targets: Sequence[Target],
        *,
        auth_results: str,
        arc_cv: str = "none",
        stored_locally: bool = False,
    ) -> Reply:
        """Relay ``message`` (our Received and Authentication-Results on top) to ``targets``.

        ``fp`` is `fingerprint` of the sender and the message as received: it recognises a
        retry.
        ``auth_results`` is our Authentication-Results value and ``arc_cv`` our verdict on
        the ARC chain it arrived with: the ARC set we add carries both.
        ``stored_locally``: the caller also filed copies for local users, so permanent
        forwarding failures are reported by a DSN rather than by refusing the message.
        """
        pending = [t for t in targets if delivered_key(fp, t.value) not in self.memo]
        skipped = len(targets) - len(pending)
        groups: dict[tuple[str, str], list[Target]] = {}
        hooks: list[Target] = []
        for target in pending:
            if target.webhook:
                hooks.append(target)
            else:
                domain = target.value.rpartition("@")[2].lower()
                groups.setdefault((target.forwarding_domain, domain), []).append(target)
        copy = _Copy(message, mail_from, auth_results, arc_cv)
        jobs = [
            self._relay_group(fwd, domain, group, copy) for (fwd, domain), group in groups.items()
        ]
        jobs += [self._post(hook, message, mail_from, auth_results) for hook in hooks]
        results: list[_Result] = []
        for batch in await asyncio.gather(*jobs):
            results.extend(batch)
        for result in results:
            if 200 <= result.code < 300:
                self.memo.add(delivered_key(fp, result.target.value), DELIVERED_TTL)
        reply = self._answer(results, skipped + stored_locally)
        failed = [r for r in results if r.code >= 500 and not r.target.webhook]
        if reply.code == 250 and failed and mail_from:
            await self._report(mail_from, message, failed)
        return reply

    async def _report(self, sender: str, message: bytes, failed: list[_Result]) -> None:
        """Some copies went out, some targets refused for good: the sender hears of it by
        DSN (RFC 3464), as from any MTA that accepted for several recipients. It names the
        address the sender wrote (the alias), never the target behind it."""
        if self.bounce is None:
            return
        failures = [
            dsn.Failure(r.target.alias, 550, f"{r.status} forwarding failed") for r in failed
        ]
        report = dsn.build(self.hostname, sender, failures, message)
        try:
            await self.bounce(sender, report)
        except Exception:
            log.exception("forward: could not send the delivery report")

    @staticmethod
    def _answer(results: list[_Result], skipped: int) -> Reply:
        ok = sum(200 <= r.code < 300 for r in results) + skipped
        if any(r.target.webhook and r.code >= 400 for r in results):
            return Reply(421, "4.4.0 Forwarding to a web endpoint failed, try again later")
        if any(400 <= r.code < 500 for r in results):
            return Reply(451, "4.4.0 Forwarding failed temporarily, try again later")
        failed = [r for r in results if r.code >= 500]
        if failed and not ok:
            # The downstream enhanced code tells the sender why; its text could name the
            # target, so it stays in our log only.
            status = failed[0].status
            return Reply(550, f"{status} The forwarding target refused the message")
        if failed:
            log.info("forward: %d of %d targets refused permanently", len(failed), len(results))
        return Reply(250, "2.6.0 Message accepted and forwarded")

    # ---- SMTP targets ----------------------------------------------------------------------

    async def _relay_group(
        self, forwarding_domain: str, domain: str, group: list[Target], copy: _Copy
    ) -> list[_Result]:
        try:
            srs_sender = self._srs(forwarding_domain, copy.sender)
        except SRSError:
            # Without SRS the copy would fail SPF and its bounces would be lost: refuse
            # clearly instead (a sender we cannot encode is malformed in practice).
            return [_Result(t, 550, "5.1.7 sender address cannot be forwarded") for t in group]
        signed = await self._sign_and_seal(forwarding_domain, copy.message, copy)
        outcomes = await self._send(domain, srs_sender, [t.value for t in group], signed)
        results: list[_Result] = []
        retry: list[Target] = []
        for target in group:
            outcome = outcomes[target.value]
            if outcome.permanent and _DMARC_REFUSAL.search(outcome.text.encode()):
                retry.append(target)
            else:
                results.append(_Result(target, outcome.code, outcome.text))
        for target in retry:
            results.append(await self._retry_rewritten(target, domain, copy, srs_sender))
        return results

    async def _retry_rewritten(
        self, target: Target, domain: str, copy: _Copy, srs_sender: str
    ) -> _Result:
        """The target refused because of the author domain's DMARC policy: send once more
        as the forwarding domain (From rewritten, the original kept for replies)."""
        rewritten = rewrite_from(copy.message, target.alias)
        signed = await self._sign_and_seal(target.forwarding_domain, rewritten, copy)
        outcome = (await self._send(domain, srs_sender, [target.value], signed))[target.value]
        return _Result(target, outcome.code, outcome.text)

    async def _send(
        self, domain: str, sender: str, rcpts: list[str], body: bytes
    ) -> dict[str, client.Outcome]:
        """One SMTP transaction through the outbound client: an outcome for every rcpt."""
        try:
            outcomes = await client.deliver(
                self.resolver,
                domain,
                sender,
                rcpts,
                body,
                helo=self.hostname,
                port=self.port,
                timeout=self.timeout,
                tls=self.tls,
                pool=self.pool,
            )
        except Exception:
            log.exception("forward: delivery attempt failed")
            outcomes = {}
        missing = client.Outcome(451, "4.4.0 no answer from the forwarding client")
        return {rcpt: outcomes.get(rcpt, missing) for rcpt in rcpts}

    def _srs(self, forwarding_domain: str, sender: str) -> str:
        if not sender:
            return ""  # a bounce stays a bounce (RFC 5321 §4.5.5)
        address = self.srs_for(forwarding_domain).forward(sender)
        # Bounces to this address are routed back only while this record lives.
        self.memo.add(srs_issued_key(address), SRS_ISSUED_TTL)
        return address

    async def _sign_and_seal(self, domain: str, message: bytes, copy: _Copy) -> bytes:
        try:
            keys = await self._keys.get(domain)
        except Exception:
            log.exception("forward: no DKIM keys for a forwarding domain")
            return message
        return await asyncio.to_thread(
            sign_and_seal, message, keys, copy.auth_results.encode("ascii", "replace"), copy.cv
        )

    # ---- webhook targets -------------------------------------------------------------------

    async def _post(
        self, target: Target, message: bytes, sender: str, auth_results: str
    ) -> list[_Result]:
        try:
            secret = await self._secrets.get(target.forwarding_domain)
            body = await asyncio.to_thread(
                webhook.build_payload,
                message,
                mail_from=sender,
                rcpt_to=target.alias,
                alias=target.alias,
                authentication_results=auth_results,
                received_at=time.time(),
            )
            result = await webhook.deliver(
                target.value,
                body,
                secret,
                resolver=self.resolver,
                allow_private=self.allow_private_webhooks,
                ssl_context=self.webhook_ssl,
                timeout=self.timeout,
            )
        except webhook.WebhookRefused as exc:
            log.warning("forward: webhook target refused (%s)", type(exc).__name__)
            return [_Result(target, 421, "webhook refused")]
        except Exception:
            log.exception("forward: webhook failed")
            return [_Result(target, 421, "webhook error")]
        if not result.ok:
            log.info("forward: webhook answered %s (%s)", result.status, result.detail)
            return [_Result(target, 421, result.detail)]
        return [_Result(target, 250, result.detail)]


def sign_and_seal(
    message: bytes, keys: Sequence[SigningKey], auth_results: bytes, cv: str
) -> bytes:
    """DKIM signatures of the forwarding domain, then the ARC set on top (RFC 8617 §5.1:
    a sealer adds its set last, over everything it sends)."""
    try:
        signed = signing.dkim_sign(message, keys)
    except signing.SigningError as exc:
        log.info("forward: not signed: %s", exc)
        return message
    rsa_keys = [k for k in keys if k.algorithm == "rsa"]  # ARC is RSA-only (RFC 8617)
    if not rsa_keys:
        return signed
    if cv not in ("none", "pass"):
        cv = "fail"
    try:
        return signing.arc_seal(signed, rsa_keys[0], auth_results, cv)
    except signing.SigningError as exc:
        # A chain we cannot extend (e.g. already 50 sets) still gets our DKIM signatures.
        log.info("forward: no ARC set added: %s", exc)
        return signed


_HEADER_END = re.compile(rb"\r\n\r\n")


def rewrite_from(message: bytes, alias: str) -> bytes:
    """From becomes the alias (display name kept, marked "via"); the original author moves
    to X-Original-From and, unless the message already names one, to Reply-To."""
    end = _HEADER_END.search(message)
    head, body = (message[: end.start() + 2], message[end.start() + 2 :]) if end else (message, b"")
    lines = head.split(b"\r\n")
    fields: list[list[bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        elif line:
            fields.append([line])
    original: bytes | None = None
    has_reply_to = False
    kept: list[list[bytes]] = []
    for field_lines in fields:
        name, colon, value = b"\r\n".join(field_lines).partition(b":")
        name = name.strip().lower()
        if name == b"from" and colon and original is None:
            original = value.strip()
            continue
        if name == b"reply-to":
            has_reply_to = True
        kept.append(field_lines)
    if original is None:
        return message
    text = original.decode("utf-8", "replace")
    # The stdlib address parser is superlinear on huge values; a From that long is not a
    # person's name and address, so it is only kept (X-Original-From), not parsed.
    display, address = (
        email.utils.parseaddr(" ".join(text.split())) if len(text) < 2048 else ("", "")
    )
    # An encoded-word name (RFC 2047) is shown decoded, then encoded again by formataddr.
    with contextlib.suppress(ValueError, LookupError, email.errors.HeaderParseError):
        display = str(email.header.make_header(email.header.decode_header(display)))
    label = display or address or "sender"
    new_from = email.utils.formataddr((f"{label} via {alias}", alias))
    added = [f"From: {new_from}".encode(), b"X-Original-From: " + original]
    if not has_reply_to:
        added.append(b"Reply-To: " + original)
    out = b"\r\n".join(added + [b"\r\n".join(f) for f in kept]) + b"\r\n"
    return out + body
