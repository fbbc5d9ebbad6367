"""The inbound MX's shortcuts give the answers the slow paths gave.

- MailfortSMTP builds aiosmtpd's per-connection method tables once: the instance must match
  one built by aiosmtpd's own SMTP.__init__.
- MailfortSMTP._getaddr parses plain addresses itself: same result as aiosmtpd's parser.
- InboundHandler caches RCPT routes per worker: a user added or removed while the server
  runs, from this process or another one (``mailfort user add/remove``), counts at once.
"""

from __future__ import annotations

import asyncio
import random
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from mailfort.directory.service import Directory, Route, RouteKind
from mailfort.smtp import server as smtp_server
from mailfort.smtp.inbound import InboundHandler, InboundPolicy
from mailfort.smtp.server import MXSMTP, ConnectionTable, MailfortSMTP, smtp_factory
from mailfort.smtp.submission import SubmissionSMTP
from mailfort.store.service import MailStore

PASSWORD = "a long test passphrase"


class _Handler:
    async def handle_RCPT(self, *args: Any) -> str:
        return "250 OK"

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        return responses

    async def auth_CUSTOM(self, *args: Any) -> None:
        return None


def _build(protocol: type[MailfortSMTP], handler: Any, slow: bool, **kwargs: Any) -> MailfortSMTP:
    if slow:
        saved = smtp_server._AIOSMTPD_MIRRORED
        smtp_server._AIOSMTPD_MIRRORED = "not this version"
        try:
            return protocol(handler, connections=ConnectionTable(), max_per_ip=5, **kwargs)
        finally:
            smtp_server._AIOSMTPD_MIRRORED = saved
    return protocol(handler, connections=ConnectionTable(), max_per_ip=5, **kwargs)


def _methods(table: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (getattr(v, "__func__", v), getattr(v, "__self__", None)) for k, v in table.items()}


_PER_INSTANCE = {"_stream_reader_wr", "_stream_reader", "_source_traceback", "_strong_reader"}


def _tls() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    return ctx


@pytest.mark.parametrize(
    ("protocol", "kwargs"),
    [
        (MailfortSMTP, {"hostname": "mx.test", "ident": "ESMTP", "enable_SMTPUTF8": True}),
        (MailfortSMTP, {"hostname": "mx.test", "tls_context": "tls", "require_starttls": True}),
        (MailfortSMTP, {"timeout": 5, "command_call_limit": 7, "data_size_limit": None}),
        (MXSMTP, {"hostname": "mx.test", "ident": "ESMTP", "enable_SMTPUTF8": True}),
        (
            SubmissionSMTP,
            {
                "hostname": "smtp.test",
                "auth_required": True,
                "auth_require_tls": True,
                "auth_exclude_mechanism": ["LOGIN"],
                "authenticator": lambda *a: None,
                "tls_context": "tls",
            },
        ),
    ],
)
def test_fast_init_matches_aiosmtpd(protocol: type[MailfortSMTP], kwargs: dict[str, Any]) -> None:
    loop = asyncio.new_event_loop()
    try:
        tls = _tls()
        kwargs = {**kwargs, "loop": loop}
        if kwargs.get("tls_context") == "tls":
            kwargs["tls_context"] = tls
        handler = _Handler()
        slow = _build(protocol, handler, True, **kwargs)
        fast = _build(protocol, handler, False, **kwargs)
        again = _build(protocol, handler, False, **kwargs)  # from the cached tables
        assert slow._auth_methods  # the slow path really ran SMTP.__init__
        for built in (fast, again):
            assert set(vars(built)) == set(vars(slow))
            for name, value in vars(slow).items():
                if name in _PER_INSTANCE or name.startswith("_smtp_methods"):
                    continue
                mine = vars(built)[name]
                if name == "_auth_methods":
                    assert list(mine) == list(value)
                    for mech, attr in value.items():
                        assert mine[mech].is_builtin == attr.is_builtin
                        assert getattr(mine[mech].method, "__func__", None) is getattr(
                            attr.method, "__func__", None
                        )
                elif name == "_handle_hooks":
                    assert _methods(mine) == _methods(value)
                elif name == "_client_connected_cb":
                    assert mine.__func__ is value.__func__
                elif isinstance(value, (asyncio.Future, ConnectionTable)):
                    assert type(mine) is type(value)  # one per instance
                else:
                    assert mine == value, name
            slow_smtp = {k: v.__func__ for k, v in slow._smtp_methods.items()}
            assert {k: v.__func__ for k, v in built._smtp_methods.items()} == slow_smtp
            assert all(v.__self__ is built for v in built._smtp_methods.values())
            assert all(
                a.method.__self__ is (built if a.is_builtin else handler)
                for a in built._auth_methods.values()
            )
    finally:
        loop.close()


def test_fast_init_declines_what_aiosmtpd_warns_about() -> None:
    loop = asyncio.new_event_loop()
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # check_hostname on
        with pytest.warns(UserWarning):
            _build(
                MailfortSMTP,
                _Handler(),
                False,
                auth_required=True,
                auth_require_tls=False,
                loop=loop,
            )
        built = _build(MailfortSMTP, _Handler(), False, tls_context=ctx, loop=loop)
        assert built.tls_context is ctx
    finally:
        loop.close()


_ADDRESSES = [
    "",
    " ",
    "<>",
    "<> SIZE=100",
    "<alice@example.test>",
    "  <alice@example.test>",
    "<alice@example.test> SIZE=5000 BODY=8BITMIME",
    "<alice@example.test>\tSIZE=5000",
    "<alice@example.test>SIZE=5000",
    "<alice@example.test> ",
    "<Alice.Smith+tag@Example.TEST>",
    "<a!#$%&'*+/=?^_`{|}~-b@example.test>",
    "<.alice@example.test>",
    "<alice.@example.test>",
    "<al..ice@example.test>",
    "<alice@example..test>",
    "<alice@-example.test>",
    "<alice@example.test.>",
    "<alice@[127.0.0.1]>",
    '<"alice"@example.test>',
    '<"al ice"@example.test>',
    "<@relay.test:alice@example.test>",
    "<alice@example.test",
    "alice@example.test",
    "alice@example.test SIZE=1",
    "<alice(comment)@example.test>",
    "<alice @example.test>",
    "<alice@ example.test>",
    "<alice>",
    "<@example.test>",
    "<alice@>",
    "<ålice@example.test>",
    "<alice@exämple.test>",
    "<alice@example.test> <bob@example.test>",
    "<alice@example.test>>",
    "<<alice@example.test>>",
    "<" + "a" * 70 + "@example.test>",
    "<" + "a" * 300 + "@example.test>",
    "<alice@example.test> SIZE=\x7f",
    "<alice@example.test> \u00e9",
    "<alice@example.test> (comment) SIZE=1",
    "<alice@example.test>  SIZE=1  BODY=7BIT ",
    "<alice@example.test> \tSIZE=1",
    '<alice@example.test> "x"',
    "<alice@example.test>(c)",
]


@pytest.mark.parametrize("limit", [0, 64])
def test_getaddr_matches_aiosmtpd(limit: int) -> None:
    loop = asyncio.new_event_loop()
    try:
        proto = _build(MailfortSMTP, _Handler(), False, loop=loop)
        proto.local_part_limit = limit
        for arg in _ADDRESSES:
            assert proto._getaddr(arg) == SMTP._getaddr(proto, arg), arg
    finally:
        loop.close()


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


def test_getaddr_matches_aiosmtpd_on_random_input() -> None:
    rng = random.Random(2026)
    pieces = ["<", ">", "@", ".", "a", "B", "7", "-", "+", " ", "\t", '"', "(", ")", "[", "]"]
    pieces += [":", ",", "\\", "é", "SIZE=1", "example.test", "alice", "<a@b.c>", "!", "~"]
    loop = asyncio.new_event_loop()
    try:
        proto = _build(MailfortSMTP, _Handler(), False, loop=loop)
        for _ in range(5000):
            arg = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
            if rng.random() < 0.5:
                arg = "<" + arg
            try:
                expected: Any = SMTP._getaddr(proto, arg)
            except Exception as exc:
                expected = type(exc)
            try:
                got: Any = proto._getaddr(arg)
            except Exception as exc:
                got = type(exc)
            assert got == expected, arg
    finally:
        loop.close()


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
