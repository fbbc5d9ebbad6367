"""Failed-login throttling: the guard alone, then through the live IMAP and POP3 servers."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time
from collections.abc import Iterator

import pytest

from mailfort.guard.logins import (
    GuardPolicy,
    Limits,
    LoginGuard,
    MemoryFailureStore,
    SharedFailureStore,
)
from mailfort.relay.memo import SharedMemo
from test_imap_server_support import PASSWORD, RawImap, ServerThread

POLICY = GuardPolicy(
    per_ip=Limits(delay_after=2, refuse_after=4),
    per_account=Limits(delay_after=3, refuse_after=6),
    window=60.0,
    base_delay=0.2,
    max_delay=0.4,
    failure_floor=0.05,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---- the guard ---------------------------------------------------------------------------


def test_counters_expire_and_stay_bounded() -> None:
    clock = Clock()
    store = MemoryFailureStore(max_keys=3, clock=clock)

    async def run() -> None:
        assert await store.incr("a", 10) == 1
        assert await store.incr("a", 10) == 2
        clock.now += 9
        assert await store.get("a") == 2
        clock.now += 2  # ten seconds after the last failure: forgotten
        assert await store.get("a") == 0
        for key in "bcde":
            await store.incr(key, 10)
        assert len(store) == 3 and await store.get("b") == 0  # least recent went first

    asyncio.run(run())


def test_keys_hide_addresses_and_group_ipv6_by_64() -> None:
    guard = LoginGuard(POLICY)
    key = guard.ip_key("192.0.2.7")
    assert "192.0.2.7" not in key and key == guard.ip_key("::ffff:192.0.2.7")
    assert guard.ip_key("2001:db8:1:2::1") == guard.ip_key("2001:db8:1:2:ffff::9")
    assert guard.ip_key("2001:db8:1:2::1") != guard.ip_key("2001:db8:1:3::1")
    account = guard.account_key("Alice@Example.test")
    assert "alice" not in account and account == guard.account_key(" alice@example.TEST ")
    assert LoginGuard(POLICY).account_key("alice@example.test") != account  # keyed per process


def test_account_is_throttled_across_addresses_whether_or_not_it_exists() -> None:
    guard = LoginGuard(POLICY)

    async def fail(ip: str, account: str) -> tuple[bool, float]:
        async def check() -> str | None:
            return None

        started = time.monotonic()
        outcome = await guard.attempt(ip, account, check)
        return outcome.refused, time.monotonic() - started

    async def run() -> None:
        for account in ("real@example.test", "ghost@example.test"):
            results = [await fail(f"198.51.100.{i}", account) for i in range(7)]
            refused = [r for r, _ in results]
            assert refused == [False] * 6 + [True], account
            delays = [d for _, d in results]
            assert max(delays[:3]) < 0.15 and min(delays[3:]) >= 0.2

    asyncio.run(run())


def test_success_resets_the_account_not_the_address() -> None:
    guard = LoginGuard(POLICY)

    async def run() -> None:
        async def wrong() -> str | None:
            return None

        async def right() -> str | None:
            return "ok"

        for _ in range(2):
            await guard.attempt("192.0.2.1", "a@example.test", wrong)
        assert (await guard.attempt("192.0.2.1", "a@example.test", right)).ok
        assert await guard.store.get(guard.account_key("a@example.test")) == 0
        assert await guard.store.get(guard.ip_key("192.0.2.1")) == 2

    asyncio.run(run())


# ---- through the servers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    s = ServerThread(tmp_path_factory.mktemp("guard") / "var", guard=LoginGuard(POLICY))
    yield s
    s.stop()


def _raw_from(server: ServerThread, source: str) -> RawImap:
    sock = socket.create_connection(
        ("127.0.0.1", server.ports["imaps"]), 10, source_address=(source, 0)
    )
    return RawImap(server.ssl_context().wrap_socket(sock, server_hostname="127.0.0.1"))


def test_imap_and_pop3_slow_down_then_refuse_one_client(server: ServerThread) -> None:
    user = server.new_user()
    raw = _raw_from(server, "127.0.0.2")
    timings = []
    answers = []
    for _ in range(5):
        started = time.monotonic()
        _, tagged = raw.command(f'LOGIN {user} "wrong password"')
        timings.append(time.monotonic() - started)
        answers.append(tagged.split(b" ", 1)[1])
    assert answers[:4] == [b"NO [AUTHENTICATIONFAILED] Authentication failed\r\n"] * 4
    assert timings[0] < 0.2 and timings[2] >= 0.2 and timings[3] >= 0.4  # delays grow
    # Past the limit even the right password is refused, unchecked, and an unknown
    # account gets the very same answer.
    assert answers[4].startswith(b"NO [UNAVAILABLE]")
    _, right = raw.command(f'LOGIN {user} "{PASSWORD}"')
    _, ghost = raw.command(f'LOGIN ghost@example.test "{PASSWORD}"')
    assert right.split(b" ", 1)[1] == ghost.split(b" ", 1)[1] == answers[4]
    raw.close()
    # POP3 shares the counters.
    sock = socket.create_connection(
        ("127.0.0.1", server.ports["pop3s"]), 10, source_address=("127.0.0.2", 0)
    )
    pop = server.ssl_context().wrap_socket(sock, server_hostname="127.0.0.1")
    pop.recv(1024)
    token = base64.b64encode(f"\0{user}\0{PASSWORD}".encode())
    pop.sendall(b"AUTH PLAIN " + token + b"\r\n")
    assert pop.recv(1024).startswith(b"-ERR [SYS/TEMP]")
    pop.close()
    # Another client address is not affected.
    other = _raw_from(server, "127.0.0.3")
    _, tagged = other.command(f'LOGIN {user} "{PASSWORD}"')
    assert b" OK " in tagged
    other.close()


def test_workers_sharing_a_table_count_failures_together() -> None:
    """`mailfort serve --workers N`: each worker has its own LoginGuard, but the counters
    live in a table made before the fork, under names derived from the server key. Failed
    logins made in another process count here."""
    table = SharedMemo(1 << 10)
    key = b"k" * 32  # ServerKey.derive(b"guard/logins") in the service

    def guard() -> LoginGuard:
        return LoginGuard(POLICY, store=SharedFailureStore(table), key=key)

    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            child = guard()
            for _ in range(POLICY.per_ip.refuse_after):
                asyncio.run(child.record_failure("203.0.113.9", "someone@example.test"))
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    here = guard()
    assert asyncio.run(here.verdict("203.0.113.9", "other@example.test")).refused
    assert not asyncio.run(here.verdict("203.0.113.10", "other@example.test")).refused
    # A guard with a key of its own (a process that did not share the table) sees nothing.
    alone = LoginGuard(POLICY, store=SharedFailureStore(table), key=b"x" * 32)
    assert not asyncio.run(alone.verdict("203.0.113.9", "other@example.test")).refused
