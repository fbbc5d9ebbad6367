"""Outbound TLS policy for the delivery engine: MTA-STS, DANE and TLS-RPT, from settings.

`build` makes what the engine needs: the `TLSPolicy` the delivery client follows per MX
(RFC 8461, RFC 7672) and the `TLSReportSender` that mails each day's TLS-RPT aggregate
reports (RFC 8460 §5). Both keep their state in SQLite files under ``DATA/queue/``, next
to the queue they serve: the MTA-STS policy cache must survive restarts (a restart must
not reopen the window RFC 8461 §5.1 closes), and the TLS-RPT counts wait there for their
day's report.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import ssl
import time
from collections.abc import Callable

from mailfort.auth.dkimsign import sign
from mailfort.config import Settings
from mailfort.directory.service import Directory, DirectoryError, SigningKey
from mailfort.dns import Resolver
from mailfort.keys.server import ServerKey
from mailfort.outbound.queue import Queue
from mailfort.relay.contexts import pkix_context
from mailfort.relay.mtasts import MTASTS, SQLitePolicyCache
from mailfort.relay.tlspolicy import TLSPolicy
from mailfort.relay.tlsrpt import (
    ReportDeliveryError,
    ReporterIdentity,
    ResultStore,
    SQLiteResultStore,
    TLSReporter,
    daily_reports,
    post_https_report,
)

log = logging.getLogger("mailfort.outbound")

POLICY_CACHE_FILE = "mtasts.sqlite3"
TLSRPT_FILE = "tlsrpt.sqlite3"
# How often the sender looks for finished days: hourly rather than daily, so that counts
# held back by a failed TLSRPT lookup go out the same day.
REPORT_INTERVAL = 3600.0
# RFC 8460 §4.1: reports cover a UTC day and "should be delivered after some delay,
# perhaps several hours", so that receivers are not flooded at midnight. Each node picks
# its own delay in this range.
REPORT_DELAY = (3600.0, 4 * 3600.0)
# How long the engine reuses a domain's TLS plan (see TLSPolicy.plan_ttl): long enough
# that a busy destination is planned a few times a minute, not per message.
PLAN_TTL = 30.0


def build(
    settings: Settings, resolver: Resolver, queue: Queue
) -> tuple[TLSPolicy, TLSReportSender]:
    """The TLS policy and the TLS-RPT sender for ``settings`` (worker 0 only: one engine
    per node, so one writer of reports)."""
    state = settings.data_dir / "queue"
    store = SQLiteResultStore(state / TLSRPT_FILE)
    mtasts = MTASTS(
        resolver,
        SQLitePolicyCache(state / POLICY_CACHE_FILE),
        ca_file=settings.outbound_ca_file,
        port=settings.mta_sts_port,
    )
    tls = TLSPolicy(
        resolver,
        mtasts=mtasts,
        reporter=TLSReporter(store),
        ca_file=settings.outbound_ca_file,
        plan_ttl=PLAN_TTL,
    )
    sender = TLSReportSender(
        store,
        resolver,
        queue,
        default_identity(settings.hostname),
        https_context=pkix_context(settings.outbound_ca_file),
        signing_keys=directory_signing_keys(settings),
        allow_private=settings.allow_private_webhooks,
    )
    return tls, sender


# The DKIM keys to sign a report from an address in the given domain (blocking; run in a
# thread). Empty: no hosted domain can sign for it.
ReportKeys = Callable[[str], list[SigningKey]]


def directory_signing_keys(settings: Settings) -> ReportKeys:
    """Keys from the directory: those of the domain itself or, failing that, of the
    nearest parent domain hosted here (``mx.example.com`` reports signed by
    ``example.com``: the node's name is seldom a mail domain of its own, and a parent's
    signature aligns under DMARC's relaxed rule, RFC 7489 §3.1.1).

    The directory is opened for the lookup and closed again: reports go out once a day,
    and the engine's worker holds no directory of its own for them.
    """

    def keys(domain: str) -> list[SigningKey]:
        directory = Directory.open(
            settings.directory_url, ServerKey.load_or_create(settings.data_dir)
        )
        try:
            labels = domain.lower().rstrip(".").split(".")
            for i in range(len(labels) - 1):  # never a bare top-level domain
                try:
                    found = directory.signing_keys(".".join(labels[i:]))
                except DirectoryError:
                    continue  # not hosted here
                if found:
                    return found
            return []
        finally:
            directory.close()

    return keys


def default_identity(hostname: str) -> ReporterIdentity:
    """Who signs our reports (RFC 8460 §4.4): the node's host name, with postmaster (which
    RFC 5321 §4.5.1 requires to exist) as the contact and sender."""
    return ReporterIdentity(
        organization_name=hostname,
        contact_info=f"postmaster@{hostname}",
        submitter=hostname,
        from_addr=f"postmaster@{hostname}",
    )


class TLSReportSender:
    """Queues the TLS-RPT reports of finished days (RFC 8460 §5.3), posts the ``https:``
    ones (§5.3.2), and then forgets the counts (data minimisation).

    The engine calls `tick` after each delivery round; the work runs in a task of its
    own so that DNS lookups and HTTPS posts never hold up deliveries.

    RFC 8460 §3: "Reports sent via SMTP MUST contain a valid DKIM signature by the
    reporting domain", without ``l=``, and reports lacking one "MUST be ignored by the
    recipient". Mailed reports are signed as submissions are (`auth.dkimsign.sign`,
    Ed25519 and RSA, whole body) with the keys ``signing_keys`` finds for the From
    domain. Without keys a report still goes out, unsigned, with a warning in the log:
    the operator's fix is to host the node's domain (or a parent of it).
    """

    def __init__(
        self,
        store: ResultStore,
        resolver: Resolver,
        queue: Queue,
        identity: ReporterIdentity,
        *,
        https_context: ssl.SSLContext | None = None,
        https_timeout: float = 30.0,
        interval: float = REPORT_INTERVAL,
        delay: float | None = None,
        clock: Callable[[], float] = time.time,
        signing_keys: ReportKeys | None = None,
        allow_private: bool = False,
    ) -> None:
        self.store = store
        # https: report URIs on private, loopback or link-local addresses (test setups only).
        self.allow_private = allow_private
        self.signing_keys = signing_keys
        self.resolver = resolver
        self.queue = queue
        self.identity = identity
        self.https_context = https_context or pkix_context()
        self.https_timeout = https_timeout
        self.interval = interval
        self.delay = random.uniform(*REPORT_DELAY) if delay is None else delay
        self.clock = clock
        self._next = 0.0  # the first tick runs at once: catch up after downtime
        self._task: asyncio.Task[int] | None = None

    def tick(self) -> None:
        """Start a run when one is due and none is running. Cheap otherwise."""
        now = self.clock()
        if now < self._next or (self._task is not None and not self._task.done()):
            return
        self._next = now + self.interval
        self._task = asyncio.get_running_loop().create_task(self._logged_run())

    async def _logged_run(self) -> int:
        try:
            return await self.send_due()
        except Exception:
            log.exception("TLS-RPT reporting failed")
            return 0

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _signed(self, policy_domain: str, message: bytes) -> bytes:
        domain = self.identity.from_addr.rpartition("@")[2]
        keys = (
            await asyncio.to_thread(self.signing_keys, domain)
            if self.signing_keys is not None
            else []
        )
        if not keys:
            log.warning(
                "TLS-RPT report for %s goes out unsigned: no DKIM keys for %s or a parent"
                " domain (RFC 8460 §3: receivers ignore unsigned reports)",
                policy_domain,
                domain,
            )
            return message
        return await asyncio.to_thread(sign, message, keys)

    async def send_due(self) -> int:
        """Send every finished day's reports; returns how many reports went out."""
        # Days that ended at least `delay` ago.
        before = dt.datetime.fromtimestamp(self.clock() - self.delay, dt.UTC).date()
        reports, unwanted = await daily_reports(
            self.store, self.resolver, self.identity, before=before
        )
        for day, domain in unwanted:
            # No rua (or no TLSRPT record): nobody wants these counts; keep none.
            await self.store.remove(day, domain)
        sent = 0
        for report in reports:
            handed_over = False
            if report.message is not None and report.mail_recipients:
                # A null reverse-path (RFC 5321 §4.5.5): a report that cannot be delivered
                # must not bounce back to a postmaster address we may not even host. The
                # queue makes this durable and retries it like any message.
                message = await self._signed(report.policy_domain, report.message)
                await self.queue.enqueue("", list(report.mail_recipients), message)
                handed_over = True
            for uri in report.https_uris:
                try:
                    await post_https_report(
                        uri,
                        report.https_report,
                        resolver=self.resolver,
                        ssl_context=self.https_context,
                        timeout=self.https_timeout,
                        allow_private=self.allow_private,
                    )
                    handed_over = True
                except ReportDeliveryError as exc:
                    log.warning("TLS-RPT report for %s to %s: %s", report.policy_domain, uri, exc)
            # An https-only report that no endpoint took is tried again at the next runs
            # for one more day; after that its counts go, as nobody can receive them.
            if handed_over or report.day < before - dt.timedelta(days=1):
                await self.store.remove(report.day, report.policy_domain)
                sent += handed_over
        return sent
