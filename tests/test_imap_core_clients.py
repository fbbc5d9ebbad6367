"""The sans-IO cores against real client libraries (imaplib, poplib) over loopback.

A few lines of blocking socket code drive each core, the way the asyncio servers will;
the clients' own parsers then check our wire format.
"""

from __future__ import annotations

import datetime as dt
import imaplib
import poplib
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from mailfort.imap import commands as c
from mailfort.imap import response as r
from mailfort.imap.connection import AuthResponse, CommandReceived, IdleEnded, ImapConnection, Send
from mailfort.imap.search import SearchContext, run_search
from mailfort.imap.sequence import SequenceSet
from mailfort.imap.state import ServerPolicy
from mailfort.pop3.protocol import AuthRequest, MaildropEntry, Pop3Connection, Pop3Policy
from mailfort.pop3.protocol import Quit as PopQuit
from mailfort.pop3.protocol import Retrieve as PopRetrieve
from mailfort.pop3.protocol import Send as PopSend
from mailfort.pop3.protocol import StartTLS as PopStartTLS


@dataclass
class StoredMessage:
    uid: int
    seq: int
    data: bytes
    flags: set[str] = field(default_factory=set)
    internal_date: dt.datetime = dt.datetime(2024, 3, 1, 12, 0, tzinfo=dt.UTC)
    modseq: int = 1

    @property
    def size(self) -> int:
        return len(self.data)

    def header(self, name: str) -> Sequence[str]:
        head = self.data.split(b"\r\n\r\n", 1)[0].decode()
        return [
            line.split(":", 1)[1].strip()
            for line in head.split("\r\n")
            if line.lower().startswith(name + ":")
        ]

    def contains_text(self, needle: str, *, headers: bool) -> bool:
        text = self.data if headers else self.data.split(b"\r\n\r\n", 1)[-1]
        return needle in text.decode().casefold()


MESSAGES = [
    b"From: alice@example.org\r\nSubject: first\r\n\r\nHello Bob\r\n",
    b"From: carol@example.net\r\nSubject: second\r\n\r\n.leading dot\r\nbye\r\n",
]


def _serve(listener: socket.socket, handler: Callable[[socket.socket], None]) -> None:
    sock, _ = listener.accept()
    with sock:
        handler(sock)


@contextmanager
def server(handler: Callable[[socket.socket], None]) -> Iterator[int]:
    listener = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=_serve, args=(listener, handler), daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        thread.join(timeout=5)
        listener.close()


def imap_handler(sock: socket.socket) -> None:
    """A minimal IMAP server: the whole protocol lives in ImapConnection."""
    box = [StoredMessage(i + 10, i + 1, data) for i, data in enumerate(MESSAGES)]
    conn = ImapConnection(ServerPolicy(allow_plaintext_auth=True))
    sock.sendall(conn.greeting())
    while not conn.closing:
        event = conn.next_event()
        if event is None:
            data = sock.recv(65536)
            if not data:
                return
            conn.receive_data(data)
            continue
        if isinstance(event, Send):
            sock.sendall(event.data)
        elif isinstance(event, IdleEnded | AuthResponse):
            sock.sendall(conn.complete(event.command))
        elif isinstance(event, CommandReceived):
            sock.sendall(run_imap(conn, event.command, box))


def run_imap(conn: ImapConnection, cmd: c.Command, box: list[StoredMessage]) -> bytes:
    if isinstance(cmd, c.Login):
        ok = cmd.password == "secret"
        return conn.complete(cmd, r.Status.OK if ok else r.Status.NO)
    if isinstance(cmd, c.Select):
        head = conn.send(
            r.flags(["\\Seen", "\\Deleted", "\\Flagged"]),
            r.exists(len(box)),
            r.StatusResponse(r.Status.OK, "UIDs valid", r.ResponseCode.uidvalidity(7)),
            r.StatusResponse(r.Status.OK, "Next UID", r.ResponseCode.uidnext(box[-1].uid + 1)),
        )
        return head + conn.complete(cmd, code=r.ResponseCode.simple("READ-WRITE"))
    if isinstance(cmd, c.List):
        return conn.send(r.list_response(["\\HasNoChildren"], "/", "INBOX")) + conn.complete(cmd)
    if isinstance(cmd, c.Search):
        ctx = SearchContext(len(box), box[-1].uid)
        outcome = run_search(cmd, box, ctx)
        return conn.send(*outcome.responses) + conn.complete(cmd)
    if isinstance(cmd, c.Fetch):
        out = b""
        for msg in box:
            number = msg.uid if cmd.uid else msg.seq
            if not cmd.messages.contains(number, box[-1].uid if cmd.uid else len(box)):
                continue
            items: list[tuple[str, r.Value]] = []
            for att in cmd.attributes:
                if isinstance(att, c.FetchBody):
                    items.append((att.response_name(), r.Literal(msg.data)))
                    if att.sets_seen:
                        msg.flags.add("\\Seen")
                elif att.name == "FLAGS":
                    items.append(("FLAGS", [r.Atom(f) for f in sorted(msg.flags)]))
                elif att.name == "UID":
                    items.append(("UID", msg.uid))
                elif att.name == "RFC822.SIZE":
                    items.append(("RFC822.SIZE", msg.size))
                elif att.name == "INTERNALDATE":
                    items.append(("INTERNALDATE", r.format_datetime(msg.internal_date)))
            out += conn.send(r.fetch(msg.seq, items))
        return out + conn.complete(cmd)
    if isinstance(cmd, c.Store):
        for msg in box:
            if cmd.messages.contains(msg.uid if cmd.uid else msg.seq, box[-1].uid):
                msg.flags |= set(cmd.flags)
        return conn.complete(cmd)
    if isinstance(cmd, c.Append):
        uid = box[-1].uid + 1
        box.append(StoredMessage(uid, len(box) + 1, cmd.messages[0].data))
        code = r.ResponseCode.appenduid(7, SequenceSet.of(uid))
        return conn.send(r.exists(len(box))) + conn.complete(cmd, code=code)
    if isinstance(cmd, c.Idle):
        return conn.continuation()
    return conn.complete(cmd)  # NOOP, LOGOUT, CLOSE, ...


def test_imaplib_session() -> None:
    with server(imap_handler) as port:
        client = imaplib.IMAP4("127.0.0.1", port, timeout=5)
        assert "IMAP4REV1" in client.capabilities
        assert client.login("fred", "secret")[0] == "OK"
        assert "CONDSTORE" in client.capabilities or client.capability()[0] == "OK"
        typ, data = client.list()
        assert typ == "OK" and data[0] == b'(\\HasNoChildren) "/" INBOX'
        assert client.select("INBOX") == ("OK", [b"2"])
        assert client.search(None, "FROM", '"carol"') == ("OK", [b"2"])
        assert client.uid("SEARCH", "ALL") == ("OK", [b"10 11"])
        typ, fetched = client.fetch("2", "(UID RFC822.SIZE BODY.PEEK[])")
        assert typ == "OK"
        first = fetched[0]
        assert isinstance(first, tuple)
        assert b"UID 11" in first[0] and first[1] == MESSAGES[1]
        typ, _ = client.append("INBOX", "(\\Seen)", None, b"Subject: new\r\n\r\nnew\r\n")
        assert typ == "OK"
        assert client.store("1:*", "+FLAGS", "(\\Flagged)")[0] == "OK"
        assert client.fetch("3", "(FLAGS)") == ("OK", [b"3 (FLAGS (\\Flagged))"])
        assert client.logout()[0] == "BYE"


def pop3_handler(sock: socket.socket) -> None:
    """A minimal POP3 server around Pop3Connection."""
    maildrop = [MaildropEntry(len(m), f"uid{i}") for i, m in enumerate(MESSAGES)]
    conn = Pop3Connection(Pop3Policy(allow_plaintext_auth=True, tls_available=False))
    sock.sendall(conn.greeting())
    while not conn.closed:
        event = conn.next_event()
        if event is None:
            data = sock.recv(65536)
            if not data:
                return
            conn.receive_data(data)
            continue
        if isinstance(event, PopSend):
            sock.sendall(event.data)
        elif isinstance(event, AuthRequest):
            sock.sendall(conn.auth_result(event.secret == "secret", maildrop))
        elif isinstance(event, PopRetrieve):
            sock.sendall(conn.message(MESSAGES[event.number - 1]))
        elif isinstance(event, PopQuit):
            assert event.deletions == ("uid0",)
            sock.sendall(conn.update_done(True))
        elif isinstance(event, PopStartTLS):
            raise AssertionError("no TLS here")


def test_poplib_session() -> None:
    with server(pop3_handler) as port:
        client = poplib.POP3("127.0.0.1", port, timeout=5)
        caps = client.capa()
        assert "UIDL" in caps and "USER" in caps and "STLS" not in caps
        client.user("fred")
        assert client.pass_("secret").startswith(b"+OK")
        assert client.stat() == (2, sum(len(m) for m in MESSAGES))
        assert client.list()[1] == [b"1 %d" % len(MESSAGES[0]), b"2 %d" % len(MESSAGES[1])]
        assert client.uidl()[1] == [b"1 uid0", b"2 uid1"]
        _, lines, _ = client.retr(2)
        assert lines == [
            b"From: carol@example.net",
            b"Subject: second",
            b"",
            b".leading dot",
            b"bye",
        ]
        _, lines, _ = client.top(1, 0)
        assert lines == [b"From: alice@example.org", b"Subject: first", b""]
        client.dele(1)
        assert client.quit().startswith(b"+OK")
