"""The POP3 core (RFC 1939, RFC 2449, RFC 2595, RFC 5034) driven like a server would."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailfort.pop3.protocol import (
    AuthRequest,
    Event,
    MaildropEntry,
    Pop3Connection,
    Pop3Policy,
    Pop3State,
    Quit,
    Retrieve,
    Send,
    StartTLS,
    dot_stuff,
)

MAILDROP = [
    MaildropEntry(120, "whqtswO00WBw418f9t5JxYwZ"),
    MaildropEntry(200, "QhdPYR:00WBw1Ph7x7"),
]
MESSAGE = b"From: a@example.com\r\nSubject: hi\r\n\r\nline 1\r\n.hidden dot\r\nline 3\r\n"


def one(conn: Pop3Connection, data: bytes = b"") -> Event:
    conn.receive_data(data)
    event = conn.next_event()
    assert event is not None
    return event


def sent(conn: Pop3Connection, data: bytes) -> bytes:
    event = one(conn, data)
    assert isinstance(event, Send), event
    return event.data


def logged_in(**policy: object) -> Pop3Connection:
    conn = Pop3Connection(Pop3Policy(**policy), tls_active=True)  # type: ignore[arg-type]
    assert sent(conn, b"USER fred\r\n") == b"+OK Send password\r\n"
    event = one(conn, b"PASS secret\r\n")
    assert event == AuthRequest("fred", "secret", "USER")
    assert conn.auth_result(True, MAILDROP) == b"+OK 2 messages ready\r\n"
    assert conn.state is Pop3State.TRANSACTION
    return conn


def test_greeting_and_capa_before_tls() -> None:
    conn = Pop3Connection()
    assert conn.greeting() == b"+OK Mailfort POP3 ready\r\n"
    capa = sent(conn, b"CAPA\r\n")
    assert capa.startswith(b"+OK") and capa.endswith(b"\r\n.\r\n")
    assert b"STLS\r\n" in capa
    assert b"USER" not in capa and b"SASL" not in capa  # RFC 2595 §4: not before TLS


def test_no_auth_before_tls() -> None:
    conn = Pop3Connection()
    for line in (
        b"USER fred\r\n",
        b"PASS x\r\n",
        b"AUTH PLAIN AGZyZWQAeA==\r\n",
        b"APOP fred abc\r\n",
    ):
        assert sent(conn, line).startswith(b"-ERR [AUTH] Authentication requires TLS")


def test_stls_then_login() -> None:
    conn = Pop3Connection()
    event = one(conn, b"STLS\r\nUSER injected\r\n")
    assert event == StartTLS(b"+OK Begin TLS negotiation\r\n")
    assert conn.next_event() is None  # waits for the handshake
    conn.tls_started()
    assert conn.next_event() is None  # the pipelined plaintext USER was discarded
    capa = sent(conn, b"CAPA\r\n")
    assert b"USER\r\n" in capa and b"SASL PLAIN\r\n" in capa and b"STLS" not in capa
    assert sent(conn, b"STLS\r\n").startswith(b"-ERR")


def test_user_pass_with_spaces_in_password() -> None:
    conn = Pop3Connection(tls_active=True)
    sent(conn, b"USER fred@example.com\r\n")
    assert one(conn, b"PASS correct horse battery\r\n") == AuthRequest(
        "fred@example.com", "correct horse battery", "USER"
    )
    assert "correct" not in repr(AuthRequest("u", "correct", "USER"))


def test_pass_without_user() -> None:
    conn = Pop3Connection(tls_active=True)
    assert sent(conn, b"PASS x\r\n") == b"-ERR USER first\r\n"


def test_auth_plain_initial_response_and_continuation() -> None:
    conn = Pop3Connection(tls_active=True)
    token = base64.b64encode(b"\x00fred\x00secret")
    assert one(conn, b"AUTH PLAIN " + token + b"\r\n") == AuthRequest("fred", "secret", "PLAIN")
    assert conn.auth_result(False) == b"-ERR [AUTH] Authentication failed\r\n"
    assert sent(conn, b"AUTH PLAIN\r\n") == b"+ \r\n"
    assert one(conn, token + b"\r\n") == AuthRequest("fred", "secret", "PLAIN")
    conn.auth_result(True, [])
    assert sent(conn, b"STAT\r\n") == b"+OK 0 0\r\n"


def test_auth_plain_errors() -> None:
    conn = Pop3Connection(tls_active=True)
    assert sent(conn, b"AUTH\r\n") == b"+OK Mechanisms follow\r\nPLAIN\r\n.\r\n"
    assert sent(conn, b"AUTH CRAM-MD5\r\n") == b"-ERR Unsupported mechanism\r\n"
    assert sent(conn, b"AUTH PLAIN !!!\r\n") == b"-ERR Invalid SASL PLAIN response\r\n"
    sent(conn, b"AUTH PLAIN\r\n")
    assert sent(conn, b"*\r\n") == b"-ERR Authentication cancelled\r\n"
    # An authzid naming someone else is refused (no proxy authorisation).
    token = base64.b64encode(b"admin\x00fred\x00secret")
    assert sent(conn, b"AUTH PLAIN " + token + b"\r\n") == b"-ERR [AUTH] Authentication failed\r\n"


def test_repeated_failures_close() -> None:
    conn = Pop3Connection(Pop3Policy(max_auth_failures=2), tls_active=True)
    sent(conn, b"USER a\r\n")
    one(conn, b"PASS b\r\n")
    conn.auth_result(False)
    sent(conn, b"USER a\r\n")
    one(conn, b"PASS c\r\n")
    assert conn.auth_result(False) == b"-ERR [AUTH] Authentication failed\r\n"
    assert conn.closed


def test_in_use_code() -> None:
    conn = Pop3Connection(tls_active=True)
    sent(conn, b"USER a\r\n")
    one(conn, b"PASS b\r\n")
    assert (
        conn.auth_result(False, code="IN-USE", text="Mailbox locked")
        == b"-ERR [IN-USE] Mailbox locked\r\n"
    )


def test_transaction_stat_list_uidl() -> None:
    conn = logged_in()
    assert sent(conn, b"STAT\r\n") == b"+OK 2 320\r\n"
    assert sent(conn, b"LIST\r\n") == b"+OK 2 messages\r\n1 120\r\n2 200\r\n.\r\n"
    assert sent(conn, b"LIST 2\r\n") == b"+OK 2 200\r\n"
    assert sent(conn, b"LIST 3\r\n") == b"-ERR No such message\r\n"
    assert sent(conn, b"UIDL\r\n") == (
        b"+OK 2 messages\r\n1 whqtswO00WBw418f9t5JxYwZ\r\n2 QhdPYR:00WBw1Ph7x7\r\n.\r\n"
    )
    assert sent(conn, b"uidl 1\r\n") == b"+OK 1 whqtswO00WBw418f9t5JxYwZ\r\n"
    assert sent(conn, b"NOOP\r\n") == b"+OK\r\n"
    assert sent(conn, b"USER x\r\n") == b"-ERR Command not valid in this state\r\n"


def test_dele_rset_and_quit_applies_deletions() -> None:
    conn = logged_in()
    assert sent(conn, b"DELE 1\r\n") == b"+OK Message 1 deleted\r\n"
    assert sent(conn, b"DELE 1\r\n") == b"-ERR Message 1 already deleted\r\n"
    assert sent(conn, b"RETR 1\r\n") == b"-ERR Message 1 already deleted\r\n"
    assert sent(conn, b"STAT\r\n") == b"+OK 1 200\r\n"
    assert sent(conn, b"LIST\r\n") == b"+OK 1 messages\r\n2 200\r\n.\r\n"
    assert sent(conn, b"RSET\r\n") == b"+OK 2 messages\r\n"
    assert sent(conn, b"STAT\r\n") == b"+OK 2 320\r\n"
    sent(conn, b"DELE 2\r\n")
    event = one(conn, b"QUIT\r\n")
    assert event == Quit(("QhdPYR:00WBw1Ph7x7",))
    assert conn.state is Pop3State.UPDATE
    assert conn.update_done(True) == b"+OK Bye\r\n"
    assert conn.closed


def test_quit_without_deletions_and_failed_update() -> None:
    conn = logged_in()
    assert one(conn, b"QUIT\r\n") == Quit(())
    conn2 = logged_in()
    sent(conn2, b"DELE 1\r\n")
    one(conn2, b"QUIT\r\n")
    assert conn2.update_done(False).startswith(b"-ERR [SYS/TEMP]")


def test_quit_in_authorization_deletes_nothing() -> None:
    conn = Pop3Connection()
    event = one(conn, b"QUIT\r\n")
    assert event == Send(b"+OK Bye\r\n", close=True)


def test_disconnect_without_quit_never_emits_deletions() -> None:
    # RFC 1939 §6: no QUIT, no UPDATE state: the server simply drops the session.
    conn = logged_in()
    sent(conn, b"DELE 1\r\n")
    conn.receive_data(b"")
    assert conn.next_event() is None


def test_retr_dot_stuffing() -> None:
    conn = logged_in()
    event = one(conn, b"RETR 1\r\n")
    assert event == Retrieve(1, "whqtswO00WBw418f9t5JxYwZ")
    out = conn.message(MESSAGE)
    assert out == (
        b"+OK 120 octets\r\nFrom: a@example.com\r\nSubject: hi\r\n\r\nline 1\r\n"
        b"..hidden dot\r\nline 3\r\n.\r\n"
    )


def test_top() -> None:
    conn = logged_in()
    assert one(conn, b"TOP 1 1\r\n") == Retrieve(1, "whqtswO00WBw418f9t5JxYwZ", 1)
    assert conn.message(MESSAGE) == (
        b"+OK Top of message follows\r\nFrom: a@example.com\r\nSubject: hi\r\n\r\nline 1\r\n.\r\n"
    )
    one(conn, b"TOP 2 0\r\n")
    assert conn.message(MESSAGE).endswith(b"Subject: hi\r\n\r\n.\r\n")
    assert sent(conn, b"TOP 1\r\n") == b"-ERR Invalid line count\r\n"
    assert sent(conn, b"TOP x 1\r\n") == b"-ERR Invalid message number\r\n"


def test_pipelined_commands_wait_for_answers() -> None:
    # RFC 2449 PIPELINING: replies stay in order; LIST waits until RETR is answered.
    conn = logged_in()
    conn.receive_data(b"RETR 2\r\nLIST 1\r\nQUIT\r\n")
    assert isinstance(conn.next_event(), Retrieve)
    assert conn.next_event() is None
    conn.message(b"x\r\n")
    assert conn.next_event() == Send(b"+OK 1 120\r\n")
    assert conn.next_event() == Quit(())


def test_message_vanished() -> None:
    conn = logged_in()
    one(conn, b"RETR 1\r\n")
    assert conn.message(None) == b"-ERR [SYS/TEMP] Message no longer available\r\n"


def test_answers_must_match_events() -> None:
    conn = logged_in()
    with pytest.raises(RuntimeError):
        conn.message(b"x")


def test_line_too_long_closes() -> None:
    conn = Pop3Connection(Pop3Policy(max_line=100))
    event = one(conn, b"USER " + b"x" * 500)
    assert event == Send(b"-ERR Line too long\r\n", close=True)
    assert conn.closed
    conn.receive_data(b"QUIT\r\n")
    assert conn.next_event() is None


def test_unknown_and_garbage() -> None:
    conn = Pop3Connection(tls_active=True)
    assert sent(conn, b"FOO\r\n") == b"-ERR Command not valid in this state\r\n"
    assert sent(conn, b"\xff\xfe\r\n") == b"-ERR Unknown command\r\n"
    assert conn.next_event() is None


def test_maildrop_entry_validates_uid() -> None:
    with pytest.raises(ValueError):
        MaildropEntry(1, "has space")
    with pytest.raises(ValueError):
        MaildropEntry(1, "x" * 71)


def test_dot_stuff_normalises_line_ends() -> None:
    assert dot_stuff(b"a\nb") == b"a\r\nb\r\n.\r\n"
    assert dot_stuff(b"") == b".\r\n"
    assert dot_stuff(b".\r\n..\r\n") == b"..\r\n...\r\n.\r\n"


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=500))
def test_dot_stuff_is_reversible(body: bytes) -> None:
    stuffed = dot_stuff(body)
    assert stuffed.endswith(b".\r\n")
    lines = stuffed[:-3].split(b"\r\n")[:-1] if stuffed != b".\r\n" else []
    unstuffed = [line[1:] if line.startswith(b".") else line for line in lines]
    assert all(not line.startswith(b".") or line.startswith(b"..") for line in lines)
    expected = body.replace(b"\r\n", b"\n").split(b"\n")
    if expected and expected[-1] == b"":
        expected.pop()
    assert unstuffed == [line.rstrip(b"\r") if line.endswith(b"\r") else line for line in expected]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.binary(max_size=40)
        | st.sampled_from(
            [
                b"USER a\r\n",
                b"PASS b\r\n",
                b"STAT\r\n",
                b"RETR 1\r\n",
                b"TOP 1 2\r\n",
                b"DELE 1\r\n",
                b"AUTH PLAIN\r\n",
                b"QUIT\r\n",
                b"LIST\r\n",
                b"UIDL 9\r\n",
                b"STLS\r\n",
                b"\r\n",
            ]
        ),
        max_size=20,
    ).map(b"".join)
)
def test_random_input_never_raises(data: bytes) -> None:
    conn = Pop3Connection(Pop3Policy(max_line=64, allow_plaintext_auth=True))
    conn.receive_data(data)
    for _ in range(100):
        event = conn.next_event()
        if event is None:
            break
        if isinstance(event, AuthRequest):
            conn.auth_result(True, MAILDROP)
        elif isinstance(event, Retrieve):
            conn.message(MESSAGE)
        elif isinstance(event, StartTLS):
            conn.tls_started()
        elif isinstance(event, Quit):
            conn.update_done()
        else:
            assert event.data.startswith((b"+OK", b"-ERR", b"+ "))
