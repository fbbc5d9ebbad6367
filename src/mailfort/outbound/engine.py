"""The delivery engine: takes due recipients from the queue and delivers them.

One engine runs per node (in worker 0): recipients of one message in one domain travel in
one SMTP transaction; at most ``concurrency`` transactions run at once. A 5xx or five days
of failures bounces (a DSN to the sender); four hours of delay warn the sender once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable

from mailfort.dns import Resolver
from mailfort.outbound import client, dsn
from mailfort.outbound.policy import TLSReportSender
from mailfort.outbound.queue import DELAY_WARNING_AFTER, GIVE_UP_AFTER, Queue, Recipient
from mailfort.relay.tlspolicy import TLSPolicy

log = logging.getLogger("mailfort.outbound")

# Where a DSN goes: the local store for our own senders, else back into the queue.
BounceSink = Callable[[str, bytes], Awaitable[None]]


class Engine:
    def __init__(
        self,
        queue: Queue,
        resolver: Resolver,
        bounce: BounceSink,
        *,
        hostname: str,
        port: int = 25,
        concurrency: int = 20,
        poll: float = 1.0,
        tls: TLSPolicy | None = None,  # None: opportunistic STARTTLS only
        tls_reports: TLSReportSender | None = None,
    ) -> None:
        self.queue = queue
        self.resolver = resolver
        self.bounce = bounce
        self.hostname = hostname
        self.port = port
        self.poll = poll
        self.tls = tls
        self.tls_reports = tls_reports
        self._slots = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        """A new message was queued in this process: look now, not at the next poll."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.tls_reports is not None:
            await self.tls_reports.stop()

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
                if self.tls_reports is not None:
                    self.tls_reports.tick()  # starts its own task when a report is due
            except Exception:
                log.exception("delivery round failed")
            # Other workers enqueue too and cannot wake us: poll as well.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll)
            self._wake.clear()

    async def run_once(self) -> int:
        due = self.queue.due(time.time())
        groups: dict[tuple[int, str], list[Recipient]] = defaultdict(list)
        for r in due:
            groups[(r.message_id, r.domain)].append(r)
        await asyncio.gather(*(self._deliver(rs) for rs in groups.values()))
        return len(due)

    async def _deliver(self, recipients: list[Recipient]) -> None:
        async with self._slots:
            first = recipients[0]
            message = self.queue.message(first.message_id)
            if message is None:
                return
            outcomes = await client.deliver(
                self.resolver,
                first.domain,
                message.mail_from,
                [r.rcpt for r in recipients],
                message.body,
                helo=self.hostname,
                port=self.port,
                tls=self.tls,
            )
            done = [r.id for r in recipients if outcomes[r.rcpt].delivered]
            if done:
                await self.queue.delivered(first.message_id, done)
            failed: list[dsn.Failure] = []
            failed_ids: list[int] = []
            late: list[dsn.Failure] = []
            for r in recipients:
                outcome = outcomes[r.rcpt]
                if outcome.delivered:
                    continue
                age = time.time() - r.created_at
                if outcome.permanent or age > GIVE_UP_AFTER:
                    failed.append(dsn.Failure(r.rcpt, outcome.code, outcome.text))
                    failed_ids.append(r.id)
                    continue
                warn = age > DELAY_WARNING_AFTER and not r.delay_notified
                if warn:
                    late.append(dsn.Failure(r.rcpt, outcome.code, outcome.text))
                await self.queue.deferred(r, f"{outcome.code} {outcome.text}", notified=warn)
            # Bounce and warn before forgetting the message: a crash in between resends a
            # DSN rather than losing it.
            if failed:
                await self._notify(message.mail_from, failed, message.body, delayed=False)
                reason = "; ".join(f"{f.code} {f.text}" for f in failed)
                await self.queue.bounced(first.message_id, failed_ids, reason)
            if late:
                await self._notify(message.mail_from, late, message.body, delayed=True)

    async def _notify(
        self, sender: str, failures: list[dsn.Failure], body: bytes, *, delayed: bool
    ) -> None:
        if not sender:  # RFC 5321 §4.5.5: never bounce a bounce
            return
        await self.bounce(sender, dsn.build(self.hostname, sender, failures, body, delayed=delayed))
