"""Session reuse in outbound delivery, judged by what the receiving servers see.

- A real Postfix (tests/postfix_peer.py) as the MX: N messages through one pool arrive
  over one connection (Postfix's own per-session summary says so), STARTTLS included.
- aiosmtpd servers in-process that misbehave on purpose: one answers a kept session's
  next MAIL with 421 and closes it (as a server whose idle timer fired just then), one
  drops every connection while the client is idle, one drops the connection after the
  message data without a reply. Every message arrives exactly once.
- The engine, with its poll interval out of reach, delivers what another connection to
  the queue file (another worker process, in production) queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from mailfort.keys.server import ServerKey
from mailfort.outbound import client
from mailfort.outbound.engine import Engine
from mailfort.outbound.queue import Queue
from mailfort.relay.tlspolicy import TLSPolicy
from mailfort.relay.tlsrpt import MemoryResultStore, TLSReporter
from postfix_peer import PostfixMX

from conftest import require_tool
from conftest_dns import DNSFixture
from tests_support import free_port, wait_for

PEER_ADDRESS = "127.0.0.2"


def body(n: int) -> bytes:
    return f"From: <a@example.test>\r\nSubject: pooled-{n}\r\n\r\nmessage {n}\r\n".encode()


def zone(domain: str, address: str = "127.0.0.1") -> dict[str, Any]:
    return {domain: [("MX", (10, f"mx.{domain}"))], f"mx.{domain}": [("A", address)]}


async def send(
    dns: DNSFixture,
    domain: str,
    port: int,
    n: int,
    pool: client.SessionPool | None,
    tls: TLSPolicy | None = None,
) -> client.Outcome:
    outcomes = await client.deliver(
        dns.resolver,
        domain,
        "a@example.test",
        [f"b@{domain}"],
        body(n),
        helo="mx.example.test",
        port=port,
        timeout=10,
        tls=tls,
        pool=pool,
    )
    return outcomes[f"b@{domain}"]


# -- a real Postfix as the MX ---------------------------------------------------------------


@pytest.fixture(scope="module")
def postfix() -> Iterator[PostfixMX]:
    require_tool("postfix")
    peer = PostfixMX(PEER_ADDRESS, free_port(PEER_ADDRESS), "pool.test", ["b"])
    peer.start()
    yield peer
    peer.remove()


def session_summaries(peer: PostfixMX) -> list[str]:
    """Postfix's line per finished SMTP session: ``disconnect from ... mail=N ...``
    (sessions that said EHLO: not the readiness probes of PostfixMX.start)."""
    lines = re.findall(r"smtpd\[\d+\]: disconnect from .*", peer.log_tail(2000))
    return [line for line in lines if " ehlo=" in line]


@pytest.mark.parametrize("with_policy", [False, True])
async def test_one_session_carries_every_message_to_postfix(
    dns_server: DNSFixture, postfix: PostfixMX, with_policy: bool
) -> None:
    dns_server.set_zone(zone("pool.test", PEER_ADDRESS))
    store = MemoryResultStore()
    tls = TLSPolicy(dns_server.resolver, reporter=TLSReporter(store)) if with_policy else None
    before = len(session_summaries(postfix))
    delivered_before = len(postfix.messages("b"))
    pool = client.SessionPool()
    outcomes = [await send(dns_server, "pool.test", postfix.port, n, pool, tls) for n in range(5)]
    await pool.close()  # QUIT: Postfix logs the session's summary
    assert all(o.delivered for o in outcomes), outcomes
    [summary] = wait_for(lambda: session_summaries(postfix)[before:], "the session summary")
    # One connection, TLS once, five transactions.
    assert "starttls=1" in summary and "mail=5" in summary and "data=5" in summary, summary
    assert "quit=1" in summary
    assert (pool.opened, pool.reused) == (1, 4)
    wait_for(lambda: len(postfix.messages("b")) == delivered_before + 5, "five messages")
    if with_policy:
        # RFC 8460 §4.4 counts sessions, not messages.
        [result] = await store.results(TLSReporter(store).today(), "pool.test")
        assert (result.successes, result.failures) == (1, 0)


async def test_without_a_pool_each_delivery_has_its_own_session(
    dns_server: DNSFixture, postfix: PostfixMX
) -> None:
    dns_server.set_zone(zone("pool.test", PEER_ADDRESS))
    before = len(session_summaries(postfix))
    for n in range(2):
        assert (await send(dns_server, "pool.test", postfix.port, 10 + n, None)).delivered
    summaries = wait_for(
        lambda: s if len(s := session_summaries(postfix)[before:]) >= 2 else None, "two sessions"
    )
    assert len(summaries) == 2 and all("mail=1" in s and "quit=1" in s for s in summaries)


# -- servers that drop or refuse kept sessions ----------------------------------------------------


class Peer:
    """aiosmtpd handler recording each message once per DATA and each connection.

    ``refuse_reuse``: a connection's second MAIL gets ``421`` and the connection closes,
    as a server does whose idle timer fires just as the client starts a transaction.
    ``drop_after_data``: the connection closes once the data has arrived, before the
    reply (the client cannot know whether the message was taken).
    """

    def __init__(self, *, refuse_reuse: bool = False, drop_after_data: bool = False) -> None:
        self.refuse_reuse = refuse_reuse
        self.drop_after_data = drop_after_data
        self.messages: list[bytes] = []
        self.connections: list[Any] = []  # the aiosmtpd SMTP instance of each connection
        self._mails: dict[int, int] = {}

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        if server not in self.connections:
            self.connections.append(server)
        session.host_name = hostname
        return responses

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        seen = self._mails[id(server)] = self._mails.get(id(server), 0) + 1
        if self.refuse_reuse and seen > 1:
            server.transport.close()
            return "421 4.4.2 idle for too long, closing"
        envelope.mail_from = address
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(envelope.original_content)
        if self.drop_after_data:
            server.transport.abort()
        return "250 2.0.0 OK"

    def drop_all(self, loop: asyncio.AbstractEventLoop) -> None:
        for server in self.connections:
            loop.call_soon_threadsafe(server.transport.close)


@contextlib.contextmanager
def smtp_peer(handler: Peer) -> Iterator[tuple[Controller, int]]:
    controller = Controller(handler, hostname="127.0.0.1", port=free_port("127.0.0.1"))
    controller.start()
    try:
        yield controller, controller.port
    finally:
        controller.stop()


def subjects(peer: Peer) -> list[str]:
    return sorted(re.findall(r"Subject: (\S+)", b"".join(peer.messages).decode()))


async def test_a_kept_session_refused_with_421_is_replaced_and_nothing_is_lost(
    dns_server: DNSFixture,
) -> None:
    dns_server.set_zone(zone("drop.test"))
    peer = Peer(refuse_reuse=True)
    pool = client.SessionPool()
    with smtp_peer(peer) as (_controller, port):
        outcomes = [await send(dns_server, "drop.test", port, n, pool) for n in range(4)]
        await pool.close()
    assert all(o.delivered for o in outcomes), outcomes
    assert subjects(peer) == [f"pooled-{n}" for n in range(4)]  # each exactly once
    assert len(peer.connections) == 4  # every reuse was refused: a new one each time


async def test_a_peer_that_drops_idle_connections_still_gets_every_message_once(
    dns_server: DNSFixture,
) -> None:
    dns_server.set_zone(zone("idle.test"))
    peer = Peer()
    pool = client.SessionPool()
    with smtp_peer(peer) as (controller, port):
        assert (await send(dns_server, "idle.test", port, 0, pool)).delivered
        assert pool.idle_count() == 1
        assert controller.loop is not None
        peer.drop_all(controller.loop)  # the server's idle timeout, while we wait
        for n in range(1, 3):
            assert (await send(dns_server, "idle.test", port, n, pool)).delivered
        await pool.close()
    assert subjects(peer) == ["pooled-0", "pooled-1", "pooled-2"]
    assert len(peer.connections) == 2  # one replaced the dropped one, then was reused


async def test_a_connection_lost_after_the_data_is_not_sent_again(
    dns_server: DNSFixture,
) -> None:
    # RFC 5321 §4.1.1.4: the server may hold the message although its reply never came.
    # Resending at once (on a new session, or to the next MX) risks a duplicate: the
    # recipient is deferred, and only the queue's retry sends it again.
    dns_server.set_zone(
        {
            "lost.test": [("MX", (10, "mx1.lost.test")), ("MX", (20, "mx2.lost.test"))],
            "mx1.lost.test": [("A", "127.0.0.1")],
            "mx2.lost.test": [("A", "127.0.0.1")],
        }
    )
    peer = Peer(drop_after_data=True)
    pool = client.SessionPool()
    with smtp_peer(peer) as (_controller, port):
        outcome = await send(dns_server, "lost.test", port, 0, pool)
        await pool.close()
    assert outcome.code == 451 and outcome.text.startswith("4.4.2"), outcome
    assert len(peer.messages) == 1 and len(peer.connections) == 1


async def test_idle_sessions_are_closed_after_the_idle_timeout(dns_server: DNSFixture) -> None:
    dns_server.set_zone(zone("quiet.test"))
    peer = Peer()
    pool = client.SessionPool(idle_timeout=0.2)
    with smtp_peer(peer) as (_controller, port):
        assert (await send(dns_server, "quiet.test", port, 0, pool)).delivered
        assert pool.idle_count() == 1
        for _ in range(100):  # the sweep closes it; nothing else touches the pool
            if pool.idle_count() == 0:
                break
            await asyncio.sleep(0.05)
        assert pool.idle_count() == 0
        assert (await send(dns_server, "quiet.test", port, 1, pool)).delivered
        await pool.close()
    assert len(peer.connections) == 2 and subjects(peer) == ["pooled-0", "pooled-1"]


async def test_a_refused_transaction_leaves_a_clean_session(dns_server: DNSFixture) -> None:
    """All recipients refused: RSET before the next MAIL on the same session."""
    dns_server.set_zone(zone("rset.test"))
    seen: list[str] = []

    class Refusing(Peer):
        async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
            seen.append("RSET")
            return "250 OK"

        async def handle_RCPT(
            self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
        ) -> str:
            if address.startswith("nobody@"):
                return "550 5.1.1 no such user"
            envelope.rcpt_tos.append(address)
            return "250 OK"

    peer = Refusing()
    pool = client.SessionPool()
    with smtp_peer(peer) as (_controller, port):
        refused = await client.deliver(
            dns_server.resolver, "rset.test", "a@example.test", ["nobody@rset.test"], body(0),
            helo="mx.example.test", port=port, timeout=10, pool=pool,
        )  # fmt: skip
        assert refused["nobody@rset.test"].code == 550
        assert (await send(dns_server, "rset.test", port, 1, pool)).delivered
        await pool.close()
    assert seen == ["RSET"] and len(peer.connections) == 1
    assert subjects(peer) == ["pooled-1"]


# -- the engine ---------------------------------------------------------------------------------


async def test_the_engine_sees_mail_queued_by_another_connection(
    dns_server: DNSFixture, tmp_path: Path
) -> None:
    """Worker 1 queues, worker 0's engine delivers: here two Queue objects on one file.
    The engine's poll interval is an hour, so only the queue file's change can start it."""
    dns_server.set_zone(zone("wake.test"))
    peer = Peer()
    key = ServerKey.load_or_create(tmp_path)
    engine_queue = Queue(tmp_path, key)
    other_worker = Queue(tmp_path, key)

    async def no_bounces(sender: str, message: bytes) -> None:
        raise AssertionError(f"unexpected DSN to {sender}")

    with smtp_peer(peer) as (_controller, port):
        engine = Engine(
            engine_queue, dns_server.resolver, no_bounces,
            hostname="mx.example.test", port=port, poll=3600,
        )  # fmt: skip
        engine.start()
        try:
            await asyncio.sleep(0.1)  # the engine is idle now, waiting
            for n in range(3):
                await other_worker.enqueue("a@example.test", ["b@wake.test"], body(n))
            for _ in range(300):
                if engine_queue.pending_count() == 0:
                    break
                await asyncio.sleep(0.05)
        finally:
            await engine.stop()
            engine_queue.close()
            other_worker.close()
    assert subjects(peer) == ["pooled-0", "pooled-1", "pooled-2"]
    assert len(peer.connections) <= 3
