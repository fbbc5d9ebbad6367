"""The node-wide per-IP connection count: the shared table itself (against a dict model,
across forked processes, after a holder of its lock dies) and the MX with two workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailfort.smtp.conncount import SharedConnectionCounts, TableFull
from mailfort.smtp.server import MAX_PER_IP, ConnectionTable, SMTPProtocol, smtp_factory

from conftest import start_dev, stop_dev

ADDRESSES = [f"192.0.2.{i}" for i in range(12)] + ["2001:db8::1", "local"]


def test_counts_add_up_per_address_and_empty_entries_go() -> None:
    table = SharedConnectionCounts(workers=3, slots=64)
    assert table.add(0, "192.0.2.1", 2) == 2
    assert table.add(2, "192.0.2.1", 1) == 3
    assert table.add(1, "192.0.2.9", 1) == 1
    assert table.count("192.0.2.1") == 3
    assert table.add(0, "192.0.2.1", -2) == 1
    assert table.add(2, "192.0.2.1", -1) == 0
    assert table.count("192.0.2.1") == 0
    assert table.used_slots() == 1
    assert table.add(1, "192.0.2.77", -1) == 0  # never below zero, no entry made
    assert table.used_slots() == 1
    table.clear_worker(1)
    assert table.used_slots() == 0
    with pytest.raises(ValueError):
        table.add(3, "192.0.2.1", 1)


def test_full_table_says_so() -> None:
    table = SharedConnectionCounts(workers=1, slots=4)
    for i in range(4):
        table.add(0, f"198.51.100.{i}", 1)
    with pytest.raises(TableFull):
        table.add(0, "198.51.100.99", 1)
    table.add(0, "198.51.100.0", -1)  # a slot frees: a new address fits again
    assert table.add(0, "198.51.100.99", 1) == 1


_OPS = st.lists(
    st.tuples(st.integers(0, 1), st.sampled_from(ADDRESSES), st.integers(-2, 3)), max_size=120
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_OPS, st.integers(8, 16), st.booleans())
def test_matches_a_dict_model(ops: list[tuple[int, str, int]], slots: int, clear: bool) -> None:
    """Few slots, so probe chains collide, wrap around the end and are shifted back by
    deletions; every address must still be found with its exact count."""
    table = SharedConnectionCounts(workers=2, slots=slots)
    model: dict[tuple[int, str], int] = {}
    for worker, address, delta in ops:
        mine = max(model.get((worker, address), 0) + delta, 0)
        total = mine + model.get((1 - worker, address), 0)
        live = {a for (_w, a), n in model.items() if n} | ({address} if mine else set())
        if len(live) > slots:
            with pytest.raises(TableFull):
                table.add(worker, address, delta)
            continue
        model[(worker, address)] = mine
        assert table.add(worker, address, delta) == total
        for a in ADDRESSES:
            assert table.count(a) == model.get((0, a), 0) + model.get((1, a), 0), a
        assert table.used_slots() == len({a for (_w, a), n in model.items() if n})
    if clear:
        table.clear_worker(0)
        for a in ADDRESSES:
            assert table.count(a) == model.get((1, a), 0)


def _in_child(fn: object) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            fn()  # type: ignore[operator]
            code = 0
        finally:
            os._exit(code)
    return pid


def test_forked_workers_share_counts() -> None:
    table = SharedConnectionCounts(workers=2, slots=256)

    def worker(index: int) -> None:
        for i in range(200):
            table.add(index, ADDRESSES[i % 5], 1)
        for i in range(100):
            table.add(index, ADDRESSES[i % 5], -1)

    pids = [_in_child(lambda i=i: worker(i)) for i in range(2)]
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    # Each worker kept 100 of 200, spread evenly over five addresses: 20 + 20 each.
    for a in ADDRESSES[:5]:
        assert table.count(a) == 40
    assert table.used_slots() == 5


def test_lock_of_a_killed_process_is_released() -> None:
    table = SharedConnectionCounts(workers=1, slots=16)
    ready_r, ready_w = os.pipe()

    def hold() -> None:
        with table._locked():
            os.write(ready_w, b"x")
            time.sleep(60)

    pid = _in_child(hold)
    assert os.read(ready_r, 1) == b"x"  # the child holds the lock now
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert table.add(0, "192.0.2.1", 1) == 1  # would hang if the lock had outlived it
    os.close(ready_r)
    os.close(ready_w)


# -- the MX with two workers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def mx_two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    data_dir = tmp_path_factory.mktemp("mx2") / "var"
    proc, info = start_dev(data_dir, args=["--workers", "2"])
    try:
        yield int(info["ports"]["smtp"])
    finally:
        stop_dev(proc)


def _greeting(port: int) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock, sock.recv(1024)


def _wait_admitted(port: int, deadline: float = 20.0) -> socket.socket:
    """A connection that gets the banner, once the server has seen earlier ones close."""
    end = time.monotonic() + deadline
    while True:
        sock, greeting = _greeting(port)
        if greeting.startswith(b"220 "):
            return sock
        sock.close()
        assert greeting.startswith(b"421 4.7.0"), greeting
        assert time.monotonic() < end, "closed connections were never released"
        time.sleep(0.1)


def test_cap_holds_across_workers(mx_two_workers: int) -> None:
    port = mx_two_workers
    held: list[socket.socket] = []
    try:
        for _ in range(MAX_PER_IP):
            held.append(_wait_admitted(port))
        # SO_REUSEPORT spreads these over both workers; the cap is still the node's.
        for _ in range(6):
            sock, greeting = _greeting(port)
            sock.close()
            assert greeting.startswith(b"421 4.7.0"), greeting
        for sock in held[:5]:
            sock.close()
        del held[:5]
        for _ in range(5):
            held.append(_wait_admitted(port))
        sock, greeting = _greeting(port)
        sock.close()
        assert greeting.startswith(b"421 4.7.0"), greeting
    finally:
        for sock in held:
            sock.close()


def test_failed_starttls_handshakes_do_not_leak_slots(mx_two_workers: int) -> None:
    port = mx_two_workers
    for _ in range(MAX_PER_IP + 5):
        sock = _wait_admitted(port)
        with sock:
            sock.sendall(b"EHLO client.test\r\n")
            reply = b""
            while not reply.endswith(b"\r\n") or b"250 " not in reply:
                reply += sock.recv(4096)
            sock.sendall(b"STARTTLS\r\n")
            assert sock.recv(1024).startswith(b"220")
            sock.sendall(b"this is not a TLS ClientHello\r\n" * 4)
            with contextlib.suppress(ConnectionResetError, ssl.SSLError):
                sock.recv(1024)  # the server ends the connection
    held = [_wait_admitted(port) for _ in range(MAX_PER_IP)]
    try:
        sock, greeting = _greeting(port)
        sock.close()
        assert greeting.startswith(b"421 4.7.0")
    finally:
        for sock in held:
            sock.close()


class _Recording(SMTPProtocol):
    """SMTPProtocol noting, as replies go to the transport, what the table counts."""

    seen: ClassVar[list[tuple[bytes, int]]] = []

    def _flush(self) -> None:
        data = self._core.outgoing()
        if data:
            self.seen.append((data[:3], self._connections.count(self._ip)))
        if data and self._transport is not None:
            self._transport.write(data)


class _Handler:
    pass


async def test_quit_frees_the_slot_before_the_reply() -> None:
    """A client that reconnects as soon as it reads 221 (one connection per message, like
    smtp-source) can land on another worker at once: by the time the 221 is written the
    connection must no longer count against the node-wide cap."""
    table = ConnectionTable(SharedConnectionCounts(workers=2, slots=64), worker=1)
    _Recording.seen = []
    factory = smtp_factory(_Handler(), "mx.test", None, protocol=_Recording, connections=table)
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await reader.readline()).startswith(b"220")
        writer.write(b"QUIT\r\n")
        assert (await reader.readline()).startswith(b"221")
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    assert _Recording.seen == [(b"220", 1), (b"221", 0)]
