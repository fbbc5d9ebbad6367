"""The IMAP state machine and the sans-IO connection, driven like a server would."""

from __future__ import annotations

import base64

import pytest

from mailfort.imap import commands as c
from mailfort.imap import response as r
from mailfort.imap.connection import (
    AuthResponse,
    CommandReceived,
    Event,
    IdleEnded,
    ImapConnection,
    Send,
)
from mailfort.imap.state import ImapSession, ServerPolicy, State
from mailfort.imap.wire import Limits


def events(conn: ImapConnection, data: bytes = b"") -> list[Event]:
    conn.receive_data(data)
    out: list[Event] = []
    while (event := conn.next_event()) is not None:
        out.append(event)
    return out


def one(conn: ImapConnection, data: bytes = b"") -> Event:
    conn.receive_data(data)
    event = conn.next_event()
    assert event is not None
    return event


def command(conn: ImapConnection, data: bytes = b"") -> c.Command:
    event = one(conn, data)
    assert isinstance(event, CommandReceived), event
    return event.command


def login(conn: ImapConnection) -> None:
    cmd = command(conn, b"a1 LOGIN fred secret\r\n")
    conn.complete(cmd)
    assert conn.state is State.AUTHENTICATED


# ------------------------------------------------------------------ capabilities


def test_capabilities_before_tls() -> None:
    caps = ImapSession(ServerPolicy()).capabilities()
    assert caps[:2] == ["IMAP4rev2", "IMAP4rev1"]
    assert "STARTTLS" in caps and "LOGINDISABLED" in caps
    assert not any(cap.startswith("AUTH=") for cap in caps)
    assert "CONDSTORE" not in caps  # the full list waits for authentication


def test_capabilities_after_tls_and_login() -> None:
    session = ImapSession(ServerPolicy(), tls_active=True)
    caps = session.capabilities()
    assert "AUTH=PLAIN" in caps and "STARTTLS" not in caps and "LOGINDISABLED" not in caps
    session.authenticated()
    caps = session.capabilities()
    for cap in (
        "IDLE",
        "UIDPLUS",
        "MOVE",
        "CONDSTORE",
        "QRESYNC",
        "ESEARCH",
        "LIST-STATUS",
        "STATUS=SIZE",
        "BINARY",
        "COMPRESS=DEFLATE",
        "QUOTA",
        "LITERAL+",
        "APPENDLIMIT=67108864",
    ):
        assert cap in caps
    session.compress_active = True
    assert "COMPRESS=DEFLATE" not in session.capabilities()


def test_literal_minus_policy() -> None:
    policy = ServerPolicy(literal_plus=False, append_limit=None, limits=Limits(max_literal=10**6))
    assert "LITERAL-" in ImapSession(policy).capabilities()
    assert policy.framer_limits().max_nonsync_literal == 4096
    assert ServerPolicy(append_limit=1000).framer_limits().max_literal == 1000


def test_greeting() -> None:
    conn = ImapConnection()
    assert conn.greeting().startswith(
        b"* OK [CAPABILITY IMAP4rev2 IMAP4rev1 STARTTLS LOGINDISABLED"
    )
    assert ImapConnection(preauth=True).greeting().startswith(b"* PREAUTH [CAPABILITY")


# ------------------------------------------------------------------ the gate


def test_login_disabled_without_tls() -> None:
    conn = ImapConnection()
    event = one(conn, b"a1 LOGIN fred secret\r\n")
    assert event == Send(b"a1 NO [PRIVACYREQUIRED] Use STARTTLS first\r\n")
    event = one(conn, b"a2 AUTHENTICATE PLAIN AGZyZWQAc2VjcmV0\r\n")
    assert isinstance(event, Send) and b"PRIVACYREQUIRED" in event.data
    assert conn.state is State.NOT_AUTHENTICATED


def test_plaintext_allowed_by_policy() -> None:
    conn = ImapConnection(ServerPolicy(allow_plaintext_auth=True))
    assert isinstance(command(conn, b"a1 LOGIN fred secret\r\n"), c.Login)


def test_commands_outside_their_state() -> None:
    conn = ImapConnection(tls_active=True)
    assert one(conn, b"a SELECT INBOX\r\n") == Send(b"a BAD Log in first\r\n")
    assert one(conn, b"b FETCH 1 FLAGS\r\n") == Send(b"b BAD Log in first\r\n")
    login(conn)
    event = one(conn, b"c LOGIN x y\r\n")
    assert isinstance(event, Send) and event.data.startswith(b"c BAD LOGIN not valid")
    event = one(conn, b"d FETCH 1 FLAGS\r\n")
    assert isinstance(event, Send) and b"not valid in the authenticated state" in event.data
    event = one(conn, b"e STARTTLS\r\n")
    assert isinstance(event, Send) and event.data.startswith(b"e BAD")


def test_starttls_discards_pipelined_plaintext() -> None:
    conn = ImapConnection()
    cmd = command(conn, b"a STARTTLS\r\nb LOGIN evil evil\r\n")
    assert isinstance(cmd, c.StartTLS)
    assert (
        conn.complete(cmd, text="Begin TLS negotiation now")
        == b"a OK Begin TLS negotiation now\r\n"
    )
    assert events(conn) == []  # the injected LOGIN is gone
    conn.tls_started()
    assert conn.session.tls_active
    assert one(conn, b"c STARTTLS\r\n") == Send(b"c BAD TLS is not available or already active\r\n")


def test_authenticate_plain_with_continuation() -> None:
    conn = ImapConnection(tls_active=True)
    cmd = command(conn, b"2 authenticate PLAIN\r\n")
    assert isinstance(cmd, c.Authenticate) and cmd.initial_response is None
    assert conn.auth_challenge(b"") == b"+ \r\n"
    event = one(conn, base64.b64encode(b"\x00fred\x00secret") + b"\r\n")
    assert isinstance(event, AuthResponse) and event.data == b"\x00fred\x00secret"
    out = conn.complete(cmd)
    assert out.startswith(b"2 OK [CAPABILITY IMAP4rev2") and out.endswith(
        b"AUTHENTICATE completed\r\n"
    )
    assert conn.state is State.AUTHENTICATED
    assert isinstance(command(conn, b"3 NAMESPACE\r\n"), c.Namespace)


def test_authenticate_cancel_and_bad_base64() -> None:
    conn = ImapConnection(tls_active=True)
    command(conn, b"a AUTHENTICATE PLAIN\r\n")
    conn.auth_challenge(b"")
    assert one(conn, b"*\r\n") == Send(b"a BAD Authentication cancelled\r\n")
    assert isinstance(command(conn, b"b AUTHENTICATE PLAIN\r\n"), c.Authenticate)
    conn.auth_challenge(b"")
    assert one(conn, b"!!!\r\n") == Send(b"b BAD Invalid base64 in SASL response\r\n")
    assert isinstance(command(conn, b"c NOOP\r\n"), c.Noop)


def test_authenticate_unknown_mechanism_and_failure() -> None:
    conn = ImapConnection(tls_active=True)
    event = one(conn, b"a AUTHENTICATE XOAUTH2 dXNlcj1\r\n")  # not even base64
    assert event == Send(b"a BAD Invalid base64 in initial response\r\n")
    event = one(conn, b"b AUTHENTICATE XOAUTH2\r\n")
    assert event == Send(b"b NO [CANNOT] Unsupported authentication mechanism\r\n")
    cmd = command(conn, b"c AUTHENTICATE PLAIN AGZyZWQAd3Jvbmc=\r\n")
    out = conn.complete(
        cmd, r.Status.NO, "Invalid credentials", r.ResponseCode.simple("AUTHENTICATIONFAILED")
    )
    assert out == b"c NO [AUTHENTICATIONFAILED] Invalid credentials\r\n"
    assert conn.state is State.NOT_AUTHENTICATED


def test_capability_and_enable_answered_by_core() -> None:
    conn = ImapConnection(tls_active=True)
    event = one(conn, b"1 CAPABILITY\r\n")
    assert isinstance(event, Send)
    assert event.data.startswith(b"* CAPABILITY IMAP4rev2") and event.data.endswith(
        b"1 OK CAPABILITY completed\r\n"
    )
    login(conn)
    event = one(conn, b"e ENABLE QRESYNC UTF8=ACCEPT X-UNKNOWN\r\n")
    assert event == Send(b"* ENABLED QRESYNC UTF8=ACCEPT\r\ne OK ENABLE completed\r\n")
    assert conn.session.qresync and conn.session.condstore and conn.session.utf8
    event = one(conn, b"f ENABLE QRESYNC\r\n")
    assert event == Send(b"* ENABLED\r\nf OK ENABLE completed\r\n")


def test_utf8_mailbox_names_after_enable() -> None:
    conn = ImapConnection(tls_active=True)
    login(conn)
    assert command(conn, b'a SELECT "R&-D"\r\n') == c.Select("a", "R&D")
    one(conn, b"b ENABLE IMAP4rev2\r\n")
    assert command(conn, b'c SELECT "R&D"\r\n') == c.Select("c", "R&D")
    assert (
        conn.send(r.list_response([], "/", "Entwürfe")) == '* LIST () "/" "Entwürfe"\r\n'.encode()
    )


def test_select_close_transitions() -> None:
    conn = ImapConnection(tls_active=True)
    login(conn)
    sel = command(conn, b"a SELECT INBOX\r\n")
    assert conn.complete(sel, code=r.ResponseCode.simple("READ-WRITE")) == (
        b"a OK [READ-WRITE] SELECT completed\r\n"
    )
    assert conn.session.mailbox == "INBOX"
    assert conn.state is State.SELECTED
    assert isinstance(command(conn, b"b FETCH 1:* (FLAGS)\r\n"), c.Fetch)
    # RFC 9051 §6.3.2: a failed SELECT leaves no mailbox selected.
    sel = command(conn, b"c EXAMINE nosuch\r\n")
    assert conn.complete(sel, r.Status.NO, "No such mailbox") == b"c NO No such mailbox\r\n"
    assert conn.session.mailbox is None
    assert conn.session.read_only is False
    assert State.AUTHENTICATED is conn.state
    sel = command(conn, b"d EXAMINE Archive\r\n")
    conn.complete(sel)
    assert conn.session.read_only
    conn.complete(command(conn, b"e UNSELECT\r\n"))
    assert conn.state is State.AUTHENTICATED


def test_qresync_requires_enable() -> None:
    conn = ImapConnection(tls_active=True)
    login(conn)
    event = one(conn, b"a SELECT INBOX (QRESYNC (1 2))\r\n")
    assert event == Send(b"a BAD QRESYNC is not enabled\r\n")
    one(conn, b"b ENABLE QRESYNC\r\n")
    conn.complete(command(conn, b"c SELECT INBOX (QRESYNC (1 2))\r\n"))
    assert isinstance(
        command(conn, b"d UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)\r\n"), c.Fetch
    )


def test_condstore_enabled_implicitly() -> None:
    # RFC 7162 §3.1: a CONDSTORE-enabling command turns it on.
    conn = ImapConnection(tls_active=True)
    login(conn)
    conn.complete(command(conn, b"a SELECT INBOX\r\n"))
    assert not conn.session.condstore
    command(conn, b"b FETCH 1 (MODSEQ)\r\n")
    assert conn.session.condstore


def test_idle_with_pipelined_done() -> None:
    conn = ImapConnection(tls_active=True)
    login(conn)
    cmd = command(conn, b"5 IDLE\r\nDONE\r\n6 NOOP\r\n")
    assert isinstance(cmd, c.Idle)
    assert conn.continuation() == b"+ idling\r\n"
    event = one(conn)
    assert event == IdleEnded(cmd, ok=True)
    assert conn.complete(cmd) == b"5 OK IDLE completed\r\n"
    assert isinstance(command(conn), c.Noop)


def test_idle_ended_by_garbage() -> None:
    conn = ImapConnection(tls_active=True)
    login(conn)
    cmd = command(conn, b"5 IDLE\r\n")
    event = one(conn, b"6 NOOP\r\n")
    assert event == IdleEnded(cmd, ok=False)  # type: ignore[arg-type]
    assert conn.complete(cmd, r.Status.BAD, "Expected DONE") == b"5 BAD Expected DONE\r\n"


def test_literals_get_continuations_and_append_limit() -> None:
    conn = ImapConnection(ServerPolicy(append_limit=100), tls_active=True)
    login(conn)
    assert one(conn, b"a APPEND INBOX {5}\r\n") == Send(b"+ Ready for literal data\r\n")
    assert isinstance(command(conn, b"hello\r\n"), c.Append)
    assert one(conn, b"b APPEND INBOX {500}\r\n") == Send(b"b NO [TOOBIG] Literal too large\r\n")
    assert isinstance(command(conn, b"c NOOP\r\n"), c.Noop)


def test_unauthenticated_clients_get_small_literals_only() -> None:
    conn = ImapConnection(tls_active=True)
    assert one(conn, b"a LOGIN {100}\r\n") == Send(b"+ Ready for literal data\r\n")
    command(conn, b"x" * 100 + b" pw\r\n")
    assert one(conn, b"b APPEND INBOX {1000000}\r\n") == Send(
        b"b NO [TOOBIG] Literal too large\r\n"
    )
    event = one(conn, b"c APPEND INBOX {1000000+}\r\n")
    assert isinstance(event, Send) and event.close
    # After login the full limits apply.
    conn = ImapConnection(tls_active=True)
    login(conn)
    assert one(conn, b"d APPEND INBOX {1000000}\r\n") == Send(b"+ Ready for literal data\r\n")


def test_parse_errors_are_sent_not_raised() -> None:
    conn = ImapConnection(tls_active=True)
    evs = events(conn, b"a FOO\r\nb LOGIN\r\n\x00\xff garbage\r\n")
    assert [e.data for e in evs if isinstance(e, Send)] == [
        b"a BAD Unknown command FOO\r\n",
        b"b BAD Expected a space\r\n",
        b"* BAD Missing or invalid tag\r\n",
    ]


def test_line_too_long_closes() -> None:
    conn = ImapConnection(ServerPolicy(limits=Limits(max_line=1000)), tls_active=True)
    event = one(conn, b"a " + b"x" * 5000)
    assert isinstance(event, Send) and event.close and event.data.startswith(b"a BAD [TOOBIG]")
    assert conn.closing
    assert events(conn, b"b NOOP\r\n") == []


def test_logout() -> None:
    conn = ImapConnection(tls_active=True)
    cmd = command(conn, b"A023 LOGOUT\r\n")
    assert conn.complete(cmd) == b"* BYE Logging out\r\nA023 OK LOGOUT completed\r\n"
    assert conn.closing and conn.state is State.LOGOUT


def test_compress() -> None:
    conn = ImapConnection(tls_active=True)
    login(conn)
    cmd = command(conn, b"a COMPRESS DEFLATE\r\n\x78\x9c")
    conn.complete(cmd)
    assert conn.take_compressed_tail() == b"\x78\x9c"
    assert one(conn, b"b COMPRESS DEFLATE\r\n") == Send(
        b"b NO [COMPRESSIONACTIVE] Compression already active\r\n"
    )


@pytest.mark.parametrize(
    ("line", "name"),
    [
        (b"a UID FETCH 1 FLAGS\r\n", b"UID FETCH"),
        (b"a UID EXPUNGE 1\r\n", b"UID EXPUNGE"),
        (b"a EXAMINE INBOX\r\n", b"EXAMINE"),
        (b"a FETCH 1 FLAGS\r\n", b"FETCH"),
    ],
)
def test_default_completion_text(line: bytes, name: bytes) -> None:
    conn = ImapConnection(tls_active=True)
    login(conn)
    conn.complete(command(conn, b"s SELECT INBOX\r\n"))
    assert conn.complete(command(conn, line)) == b"a OK " + name + b" completed\r\n"


def test_mbsync_session_transcript() -> None:
    """A session as isync/mbsync drives it (SASL-IR, LITERAL+ APPEND, UID commands)."""
    conn = ImapConnection(tls_active=True)
    conn.complete(command(conn, b"1 AUTHENTICATE PLAIN AGZyZWQAc2VjcmV0\r\n"))
    script = [
        b"2 COMPRESS DEFLATE\r\n",
        b"3 NAMESPACE\r\n",
        b'4 LIST "" "*"\r\n',
        b'5 SELECT "INBOX"\r\n',
        b"6 UID FETCH 1:1000000000 (UID FLAGS)\r\n",
        b'7 APPEND "INBOX" (\\Seen) {12+}\r\nHello world!\r\n',
        b"8 UID STORE 12 +FLAGS.SILENT (\\Deleted)\r\n",
        b"9 UID EXPUNGE 12\r\n",
        b"10 LOGOUT\r\n",
    ]
    kinds = []
    for line in script:
        cmd = command(conn, line)
        kinds.append(type(cmd).__name__)
        conn.complete(cmd)
    assert kinds == [
        "Compress",
        "Namespace",
        "List",
        "Select",
        "Fetch",
        "Append",
        "Store",
        "UidExpunge",
        "Logout",
    ]
    assert conn.closing
