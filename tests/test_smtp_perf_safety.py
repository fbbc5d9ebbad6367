"""The inbound MX's shortcuts give the answers the slow paths gave.

- InboundHandler caches RCPT routes per worker: a user added or removed while the server
  runs, from this process or another one (``mailfort user add/remove``), counts at once.
- Replies to pipelined commands go out together and in order; unpipelined ones at once.
- Through the same in-process MX: postmaster is always a recipient (RFC 5321 §4.5.1).
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailfort.directory.service import Directory, Route, RouteKind
from mailfort.smtp.inbound import InboundHandler, InboundPolicy
from mailfort.smtp.server import smtp_factory
from mailfort.store.service import MailStore

PASSWORD = "a long test passphrase"


# ---- the route cache ----------------------------------------------------------------------


class _Server:
    def __init__(self, directory: Directory, store: MailStore) -> None:
        self.handler = InboundHandler(directory, store, None, InboundPolicy("mx.example.test"))  # type: ignore[arg-type]
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            factory = smtp_factory(self.handler, "mx.example.test", None, timeout=30)
            srv = self.loop.run_until_complete(self.loop.create_server(factory, "127.0.0.1", 0))
            self.port = srv.sockets[0].getsockname()[1]
            started.set()
            self.loop.run_forever()
            srv.close()
            self.loop.run_until_complete(srv.wait_closed())

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def rcpt(self, client: smtplib.SMTP, address: str) -> int:
        client.rset()
        client.mail("sender@elsewhere.test")
        code, _ = client.rcpt(address)
        return code


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[_Server, Directory, str]]:
    url = f"sqlite:///{tmp_path / 'directory.sqlite3'}"
    directory = Directory.open(url)
    directory.add_domain("example.test")
    directory.add_user("alice@example.test", PASSWORD)
    store = MailStore(tmp_path)
    srv = _Server(directory, store)
    try:
        yield srv, directory, url
    finally:
        srv.stop()
        store.close()
        directory.close()


def _other_process(url: str, code: str) -> None:
    """A directory change made by another process, as `mailfort user add/remove` does."""
    script = f"from mailfort.directory.service import Directory\nd = Directory.open({url!r})\n"
    subprocess.run([sys.executable, "-c", script + code], check=True, timeout=60)


def test_route_cache_sees_changes_from_other_processes(env: tuple[_Server, Directory, str]) -> None:
    srv, _directory, url = env
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as client:
        client.ehlo("client.test")
        for _ in range(3):  # the second and third answers come from the cache
            assert srv.rcpt(client, "alice@example.test") == 250
            assert srv.rcpt(client, "bob@example.test") == 550
        assert srv.handler._routes._routes  # the cache (directory.lookups.RouteCache) is in use

        _other_process(url, f"d.add_user('bob@example.test', {PASSWORD!r})")
        assert srv.rcpt(client, "bob@example.test") == 250

        _other_process(url, "d.remove_user('alice@example.test')")
        assert srv.rcpt(client, "alice@example.test") == 550
        assert srv.rcpt(client, "bob@example.test") == 250

        _other_process(url, "d.add_alias('sales@example.test', ['bob@example.test'])")
        assert srv.rcpt(client, "sales@example.test") == 250
        _other_process(url, "d.remove_alias('sales@example.test')")
        assert srv.rcpt(client, "sales@example.test") == 550


def test_route_cache_sees_changes_from_this_process(env: tuple[_Server, Directory, str]) -> None:
    srv, directory, _url = env
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as client:
        client.ehlo("client.test")
        assert srv.rcpt(client, "alice@example.test") == 250
        assert srv.rcpt(client, "alice@example.test") == 250
        directory.remove_user("alice@example.test")
        assert srv.rcpt(client, "alice@example.test") == 550
        directory.add_user("alice@example.test", PASSWORD)
        assert srv.rcpt(client, "alice@example.test") == 250


class _RacyDirectory:
    """A directory whose data changes while a lookup is in flight."""

    def __init__(self) -> None:
        self.marker = 0
        self.kind = RouteKind.LOCAL
        self.lookups = 0

    def change_marker(self) -> int:
        return self.marker

    def route(self, address: str) -> Route:
        self.lookups += 1
        kind = self.kind
        # The change commits after this lookup read the old data.
        self.kind = RouteKind.UNKNOWN_USER
        self.marker += 1
        return Route(kind)


def test_route_cache_drops_answers_that_predate_a_change() -> None:
    directory = _RacyDirectory()
    handler = InboundHandler(directory, None, None, InboundPolicy("mx.test"))  # type: ignore[arg-type]

    async def go() -> None:
        assert (await handler._route("a@x.test")).kind is RouteKind.LOCAL  # stale, not kept
        assert (await handler._route("a@x.test")).kind is RouteKind.UNKNOWN_USER
        assert directory.lookups == 2

    asyncio.run(go())


def test_route_cache_interleaved_lookups_keep_no_stale_answer() -> None:
    """A lookup started before a change must not land in the cache after it was cleared."""

    class Slow(_RacyDirectory):
        def route(self, address: str) -> Route:
            self.lookups += 1
            kind = self.kind
            started.set()
            proceed.wait(5)
            return Route(kind)

    directory = Slow()
    handler = InboundHandler(directory, None, None, InboundPolicy("mx.test"))  # type: ignore[arg-type]
    started = threading.Event()
    proceed = threading.Event()

    async def go() -> None:
        first = asyncio.create_task(handler._route("a@x.test"))
        await asyncio.to_thread(started.wait, 5)
        directory.kind = RouteKind.UNKNOWN_USER  # a change commits meanwhile
        directory.marker += 1
        proceed.set()
        started.clear()
        second = await handler._route("b@x.test")  # sees the new marker: clears the cache
        assert second.kind is RouteKind.UNKNOWN_USER
        assert (await first).kind is RouteKind.LOCAL  # answered from before the change
        assert "a@x.test" not in handler._routes._routes
        assert (await handler._route("a@x.test")).kind is RouteKind.UNKNOWN_USER

    asyncio.run(go())


def test_no_marker_no_cache(tmp_path: Path) -> None:
    directory = Directory.open("sqlite://")  # in memory: no file to watch
    assert directory.change_marker() is None
    directory.close()
    on_disk = Directory.open(f"sqlite:///{tmp_path / 'd.sqlite3'}")
    before = on_disk.change_marker()
    assert before is not None and on_disk.change_marker() == before
    on_disk.add_domain("example.test")
    assert on_disk.change_marker() != before
    on_disk.close()


# ---- replies held while the client pipelines -------------------------------------------


def _read_replies(sock: socket.socket, count: int) -> tuple[list[bytes], int]:
    """``count`` reply lines (last lines of multi-line replies), and the reads it took."""
    data = b""
    reads = 0
    while data.count(b"\r\n") < count:
        chunk = sock.recv(65536)
        assert chunk, data
        reads += 1
        data += chunk
    return data.split(b"\r\n")[:count], reads


def test_pipelined_replies_in_order_and_together(env: tuple[_Server, Directory, str]) -> None:
    srv, _directory, _url = env
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        (banner,), _ = _read_replies(sock, 1)
        assert banner.startswith(b"220 ")
        sock.sendall(b"HELO client.test\r\n")
        _read_replies(sock, 1)
        sock.sendall(
            b"MAIL FROM:<sender@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\n"
            b"RCPT TO:<nobody@example.test>\r\nRCPT TO:<x@elsewhere.test>\r\n"
            b"RSET\r\nMAIL FROM:<sender@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\n"
            b"NOOP\r\n"
        )
        replies, reads = _read_replies(sock, 8)
        assert [r[:3] for r in replies] == [
            b"250",
            b"250",
            b"550",
            b"550",
            b"250",
            b"250",
            b"250",
            b"250",
        ]
        assert b"5.1.1" in replies[2] and b"5.7.1" in replies[3]
        assert reads == 1  # one write for the whole group
        # Not pipelined: each reply comes at once, nothing waits for a next command.
        sock.sendall(b"RSET\r\n")
        assert _read_replies(sock, 1)[0][0].startswith(b"250")
        sock.sendall(b"MAIL FROM:<sender@elsewhere.test>\r\n")
        assert _read_replies(sock, 1)[0][0].startswith(b"250")
        sock.sendall(b"RCPT TO:<alice@example.test>\r\n")
        assert _read_replies(sock, 1)[0][0].startswith(b"250")
        # DATA ends a group: the held replies go out with its 354.
        sock.sendall(b"RSET\r\nMAIL FROM:<sender@elsewhere.test>\r\nDATA\r\n")
        replies, _ = _read_replies(sock, 3)
        assert [r[:3] for r in replies] == [b"250", b"250", b"503"]  # no recipient yet
        sock.sendall(b"HELP RCPT\r\n")
        (help_reply,), _ = _read_replies(sock, 1)
        assert help_reply.startswith(b"250") and b"RCPT TO" in help_reply
        sock.sendall(b"QUIT\r\n")
        assert _read_replies(sock, 1)[0][0].startswith(b"221")


def test_ehlo_reply_in_one_write(env: tuple[_Server, Directory, str]) -> None:
    srv, _directory, _url = env
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        _read_replies(sock, 1)
        sock.sendall(b"EHLO client.test\r\n")
        data = sock.recv(65536)
        lines = data.split(b"\r\n")[:-1]
        assert lines[0].startswith(b"250-mx.example.test")
        assert all(line.startswith(b"250-") for line in lines[:-1])
        assert lines[-1].startswith(b"250 ") and b"PIPELINING" in data
        assert not any(b"2.0.0" in line for line in lines)  # keywords stay bare
        sock.sendall(b"EHLO again.test\r\nNOOP\r\n")
        replies, _ = _read_replies(sock, len(lines) + 1)
        assert replies[-1].startswith(b"250")


def test_postmaster_is_accepted_with_or_without_a_domain(
    env: tuple[_Server, Directory, str],
) -> None:
    """RFC 5321 §4.5.1: "RCPT TO:<Postmaster>" is this host's postmaster (our host name is
    mx.example.test, example.test is hosted); postmaster@ a hosted domain always exists."""
    srv, _directory, _url = env
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as client:
        client.ehlo("client.test")
        assert srv.rcpt(client, "Postmaster") == 250
        assert srv.rcpt(client, "postmaster@example.test") == 250
        assert srv.rcpt(client, "nobody@example.test") == 550
