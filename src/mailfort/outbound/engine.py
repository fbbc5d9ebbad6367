"""The delivery engine: takes due recipients from the queue and delivers them.

One engine runs per node (in worker 0): recipients of one message in one domain travel in
one SMTP transaction; at most ``concurrency`` transactions run at once, and a new one
starts as soon as one ends (no rounds waiting for their slowest delivery). A transaction's
slot is free again once the remote server answered, before its result is committed to
the queue: the commit waits for an fsync, which group commits share, and SMTP sessions
should not idle through it. Up to ``backlog`` times ``concurrency`` deliveries may be
under way in all (waiting for a slot, talking, or committing). Sessions are kept per
destination between transactions (`client.SessionPool`). A 5xx or five days of failures
bounces (a DSN to the sender); four hours of delay warn the sender once.

Mail queued by another worker process reaches the engine through the queue file itself:
while it has free slots the engine reads SQLite's ``PRAGMA data_version`` every
``watch`` seconds (``quiet_watch`` after a second without deliveries; a read costs a few
µs, and the value moves with every commit by any connection), so a submission accepted
anywhere starts its delivery within ``watch``. Submissions in the engine's own worker
wake it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable

from mailfort.dns import Resolver
from mailfort.mail.parser import iter_headers
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
        backlog: int = 4,
        poll: float = 1.0,
        watch: float = 0.025,
        quiet_watch: float = 0.1,
        stop_grace: float = 5.0,
        tls: TLSPolicy | None = None,  # None: opportunistic STARTTLS only
        tls_reports: TLSReportSender | None = None,
        pool: client.SessionPool | None = None,
    ) -> None:
        self.queue = queue
        self.resolver = resolver
        self.bounce = bounce
        self.hostname = hostname
        self.port = port
        self.concurrency = concurrency
        self.max_under_way = concurrency * backlog
        self._transactions = asyncio.Semaphore(concurrency)
        self.poll = poll  # retries come due by the clock: look at least this often
        self.watch = watch
        # After a second without deliveries the file is read less often: an idle node
        # then spends ~2 ms of CPU a second on it rather than ~7, and the first message
        # after a quiet spell waits at most ``quiet_watch``.
        self.quiet_watch = quiet_watch
        self._last_busy = 0.0
        self.stop_grace = stop_grace
        self.tls = tls
        self.tls_reports = tls_reports
        self.pool = pool if pool is not None else client.SessionPool()
        self._wake = asyncio.Event()  # set by a wake or by the watch timer
        self._woken = False  # a wake, not the timer
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self._in_flight: set[int] = set()  # recipient ids being delivered now

    def wake(self) -> None:
        """A new message was queued in this process: look now, not at the next poll."""
        self._woken = True
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        # The flag too, not only the cancel: the loop must end even if a cancellation is
        # lost (asyncio.wait_for in Python 3.11 can swallow one that meets a result).
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._deliveries:
            # Let transactions under way finish: one cut after DATA would be sent again.
            _done, pending = await asyncio.wait(self._deliveries, timeout=self.stop_grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.pool.close()
        if self.tls_reports is not None:
            await self.tls_reports.stop()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                self.dispatch()
                if self.tls_reports is not None:
                    self.tls_reports.tick()  # starts its own task when a report is due
            except Exception:
                log.exception("delivery round failed")
            await self._idle()

    async def _idle(self) -> None:
        """Until there may be more to do: a local wake, a delivery that ended, a commit
        to the queue file by any process (while slots are free), or ``poll`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.poll
        version = self.queue.data_version()
        while not self._stopping and (remaining := deadline - loop.time()) > 0:
            free = len(self._deliveries) < self.max_under_way
            busy = bool(self._deliveries) or loop.time() - self._last_busy < 1.0
            watch = self.watch if busy else self.quiet_watch
            step = min(watch, remaining) if free else remaining
            # A timer and a plain Event.wait rather than wait_for: a task per step less,
            # and nothing that can lose a cancellation.
            timer = loop.call_later(step, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                timer.cancel()
            self._wake.clear()
            if self._woken:
                self._woken = False
                return
            if free and self.queue.data_version() != version:
                return

    def dispatch(self) -> int:
        """Start deliveries for due recipients while slots are free; how many started."""
        free = self.max_under_way - len(self._deliveries)
        if free <= 0:
            return 0
        # In-flight recipients are still due in the table: ask for enough rows to see
        # past them.
        due = self.queue.due(time.time(), limit=len(self._in_flight) + 2 * free)
        groups: dict[tuple[int, str], list[Recipient]] = {}
        for r in due:
            if r.id not in self._in_flight:
                groups.setdefault((r.message_id, r.domain), []).append(r)
        loop = asyncio.get_running_loop()
        started = 0
        for recipients in list(groups.values())[:free]:
            ids = [r.id for r in recipients]
            self._in_flight.update(ids)
            task = loop.create_task(self._deliver(recipients))
            self._deliveries.add(task)
            task.add_done_callback(functools.partial(self._finished, ids))
            started += 1
        return started

    def _finished(self, ids: list[int], task: asyncio.Task[None]) -> None:
        self._last_busy = asyncio.get_running_loop().time()
        self._deliveries.discard(task)
        self._in_flight.difference_update(ids)
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery failed", exc_info=task.exception())
        self.wake()

    async def run_once(self) -> int:
        """Start what is due and wait for those deliveries (for tools and tests)."""
        started = set(self._deliveries)
        count = self.dispatch()
        new = self._deliveries - started
        if new:
            await asyncio.wait(new)
        return count

    async def _deliver(self, recipients: list[Recipient]) -> None:
        first = recipients[0]
        message = self.queue.message(first.message_id)
        if message is None:
            return
        rcpts = [r.rcpt for r in recipients]
        # RFC 8689 §5: "TLS-Required: No" asks to deliver despite MTA-STS or DANE
        # failures: opportunistic TLS, no policy. TLS-RPT reports carry it (RFC 8460
        # §5.3.1: a report must reach a domain whose TLS is what is broken), and such a
        # session is then not counted in the next report either, as §5.3.1 wants.
        tls = None if tls_not_required(message.body) else self.tls
        try:
            async with self._transactions:
                outcomes = await client.deliver(
                    self.resolver,
                    first.domain,
                    message.mail_from,
                    rcpts,
                    message.body,
                    helo=self.hostname,
                    port=self.port,
                    tls=tls,
                    pool=self.pool,
                )
        except Exception:
            # A bug or an address the client cannot send must not leave the recipients
            # due: the dispatcher would start them again at once, forever. Deferred, they
            # wait out the backoff like any temporary failure.
            log.exception("delivery to %s failed", first.domain)
            outcomes = dict.fromkeys(rcpts, client.Outcome(451, "4.3.0 local delivery error"))
        done = [r.id for r in recipients if outcomes[r.rcpt].delivered]
        if done:
            await self.queue.delivered(first.message_id, done)
        failed: list[dsn.Failure] = []
        failed_ids: list[int] = []
        late: list[dsn.Failure] = []
        waiting: list[tuple[Recipient, str, bool]] = []
        for r in recipients:
            outcome = outcomes[r.rcpt]
            if outcome.delivered:
                continue
            age = time.time() - message.created_at
            if outcome.permanent or age > GIVE_UP_AFTER:
                failed.append(dsn.Failure(r.rcpt, outcome.code, outcome.text))
                failed_ids.append(r.id)
                continue
            warn = age > DELAY_WARNING_AFTER and not r.delay_notified
            if warn:
                late.append(dsn.Failure(r.rcpt, outcome.code, outcome.text))
            waiting.append((r, f"{outcome.code} {outcome.text}", warn))
        if waiting:
            await self.queue.deferred_all(waiting)
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


def tls_not_required(message: bytes) -> bool:
    """Whether the message's header says ``TLS-Required: No`` (RFC 8689 §4.2.1)."""
    for header in iter_headers(message, 0, len(message)):  # stops at the blank line
        if header.lname == b"tls-required":
            return header.value.strip().lower() == b"no"
    return False
