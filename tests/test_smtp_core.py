"""The sans-IO SMTP server core, driven the way the server drives it.

Every test feeds client bytes, answers the events with a fixed policy and looks only at
what a client or an operator would see: the reply lines on the wire, the messages handed
to delivery and whether the session closes.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailfort.smtp.core import (
    LINE_LIMIT,
    Close,
    CoreConfig,
    Credentials,
    Event,
    MailFrom,
    Message,
    RcptTo,
    ServerCore,
    StartTLS,
    parse_path,
)

HOST = "mx.example.test"
ENVELOPE = b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\n"
REPLY_LINE = re.compile(rb"\d{3}[ -]")
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Driver:
    """A server loop: answers every event with a fixed policy and records the wire."""

    core: ServerCore
    mail_reply: str = "250 OK"
    rcpt_reply: str = "250 OK"
    data_reply: str = "250 2.6.0 accepted"
    refused_rcpts: frozenset[str] = frozenset()
    auth_ok: bool | None = True  # None: leave Credentials unanswered for the test
    auto_tls: bool = True
    events: list[Event] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    out: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes = b"") -> bytes:
        """Hand `data` to the core, answer what comes of it; the bytes written meanwhile."""
        before = len(self.out)
        if data:
            self.core.receive(data)
        self.pump()
        return bytes(self.out[before:])

    def feed_all(self, pieces: Iterable[bytes]) -> bytes:
        return b"".join(self.feed(piece) for piece in pieces)

    def pump(self) -> None:
        while (event := self.core.next_event()) is not None:
            # The server writes what is queued before acting (the 220 before the handshake).
            self.out += self.core.outgoing()
            self.events.append(event)
            self._answer(event)
        self.out += self.core.outgoing()

    def _answer(self, event: Event) -> None:
        if isinstance(event, MailFrom):
            self.core.reply(self.mail_reply)
        elif isinstance(event, RcptTo):
            refused = event.address in self.refused_rcpts
            self.core.reply("550 5.1.1 No such user" if refused else self.rcpt_reply)
        elif isinstance(event, Message):
            self.messages.append(event.content)
            self.core.reply(self.data_reply)
        elif isinstance(event, Credentials) and self.auth_ok is not None:
            self.core.auth_result(self.auth_ok)
        elif isinstance(event, StartTLS) and self.auto_tls:
            self.core.tls_established()

    @property
    def closed(self) -> bool:
        return any(isinstance(e, Close) for e in self.events)


def session(config: CoreConfig | None = None, *, tls: bool = False, **policy: Any) -> Driver:
    """A driver past the greeting; `out` starts after the banner."""
    core = ServerCore(config or CoreConfig(HOST), tls=tls)
    driver = Driver(core, **policy)
    core.greeting()
    assert driver.feed() == f"220 {HOST} ESMTP\r\n".encode()
    driver.out.clear()
    return driver


def lines(out: bytes) -> list[str]:
    assert out.endswith(b"\r\n") or not out
    return out.decode("utf-8").split("\r\n")[:-1]


def codes(out: bytes) -> list[str]:
    """The reply code of each complete reply (its last line), in order."""
    return [line[:3] for line in lines(out) if line[3:4] == " "]


def stuff(lines_: list[bytes]) -> bytes:
    """What a client sends after DATA: dot-stuffed lines and the terminator."""
    return b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines_) + b".\r\n"


@st.composite
def splits(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """`data` cut at arbitrary points, as TCP may deliver it."""
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=24))))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in pairwise(bounds)]


def run(pieces: Iterable[bytes], config: CoreConfig | None = None, **policy: Any) -> Driver:
    driver = session(config, **policy)
    driver.feed_all(pieces)
    return driver


# ---- 1. DATA round trip --------------------------------------------------------------------

# Dots, bare CR and bare LF are what dot-stuffing and smuggling hinge on.
_LINE = (
    st.lists(
        st.sampled_from([b".", b"..", b"a", b" ", b"\r", b"\n", b"\x00", b"\xff"]), max_size=10
    )
    .map(b"".join)
    .filter(lambda x: b"\r\n" not in x)
)


@FAST
@given(st.data(), st.lists(_LINE, max_size=12))
def test_data_round_trip_any_split(data: st.DataObject, body_lines: list[bytes]) -> None:
    wire = ENVELOPE + b"DATA\r\n" + stuff(body_lines) + b"NOOP\r\n"
    whole = run([wire])
    original = b"".join(x + b"\r\n" for x in body_lines)
    assert whole.messages == [original]
    assert codes(bytes(whole.out))[-3:] == ["354", "250", "250"]
    split = run(data.draw(splits(wire)))
    assert split.messages == [original]
    assert split.out == whole.out


def test_data_dot_stuffing_examples() -> None:
    d = session()
    out = d.feed(ENVELOPE + b"DATA\r\n..leading\r\n...\r\n\r\n. \r\nend\r\n.\r\n")
    assert codes(out) == ["250", "250", "250", "354", "250"]
    assert d.messages == [b".leading\r\n..\r\n\r\n \r\nend\r\n"]


def test_empty_data_message() -> None:
    d = session()
    d.feed(ENVELOPE + b"DATA\r\n.\r\n")
    assert d.messages == [b""]


def test_terminator_split_byte_by_byte() -> None:
    wire = ENVELOPE + b"DATA\r\nline\r\n.\r\nNOOP\r\n"
    d = run(wire[i : i + 1] for i in range(len(wire)))
    assert d.messages == [b"line\r\n"]
    assert codes(bytes(d.out))[-2:] == ["250", "250"]


# ---- 2. SMTP smuggling ---------------------------------------------------------------------

_SMUGGLED = b"MAIL FROM:<ceo@bank.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nforged\r\n"


@pytest.mark.parametrize(
    ("ending", "kept"),
    [
        (b"\n.\n", b"\n.\n"),
        (b"\r.\r", b"\r.\r"),
        (b"\n.\r\n", b"\n.\r\n"),
        (b"\r.\r\n", b"\r.\r\n"),
        # After a real CRLF the "." starts an SMTP line, so transparency removes it.
        (b"\r\n.\n", b"\r\n\n"),
        (b"\r\n.\r", b"\r\n\r"),
    ],
)
def test_smuggling_endings_never_end_data(ending: bytes, kept: bytes) -> None:
    wire = ENVELOPE + b"DATA\r\nSubject: hi\r\n\r\nhello" + ending + _SMUGGLED + b".\r\nNOOP\r\n"
    for pieces in ([wire], [wire[i : i + 1] for i in range(len(wire))]):
        d = run(pieces)
        assert d.messages == [b"Subject: hi\r\n\r\nhello" + kept + _SMUGGLED]
        # The fake MAIL/RCPT reached no handler: only the real envelope did.
        assert [type(e) for e in d.events] == [MailFrom, RcptTo, Message]
        assert codes(bytes(d.out)) == ["250", "250", "250", "354", "250", "250"]


@pytest.mark.parametrize("start", [b".\n", b".\r", b"\n.\n", b"\r.\r\n"])
def test_bare_endings_at_data_start_do_not_end_it(start: bytes) -> None:
    d = session()
    d.feed(ENVELOPE + b"DATA\r\n" + start + b"x\r\n.\r\n")
    assert len(d.messages) == 1
    assert d.messages[0].endswith(b"x\r\n")


# ---- 3. Pipelining -------------------------------------------------------------------------

_BATCH = (
    b"EHLO client.test\r\n"
    b"MAIL FROM:<a@example.org>\r\n"
    b"RCPT TO:<b@example.test>\r\n"
    b"RCPT TO:<nobody@example.test>\r\n"
    b"NOOP\r\n"
    b"DATA\r\n"
    b"body\r\n.\r\n"
    b"RSET\r\n"
    b"VRFY someone\r\n"
    b"FOO\r\n"
    b"MAIL FROM:<>\r\n"
    b"RCPT TO:<c@example.test>\r\n"
    b"DATA\r\n.\r\n"
    b"QUIT\r\n"
)
_BATCH_CODES = [
    *["250", "250", "250", "550", "250"],
    "354",
    "250",
    "250",
    "252",
    "500",
    "250",
    "250",
    "354",
    "250",
    "221",
]


def test_pipelined_batch_replies_in_order() -> None:
    d = run([_BATCH], refused_rcpts=frozenset({"nobody@example.test"}))
    out = bytes(d.out)
    assert codes(out) == _BATCH_CODES
    assert "550 5.1.1 No such user" in lines(out)
    assert d.messages == [b"body\r\n", b""]
    assert d.closed


@FAST
@given(st.data())
def test_pipelined_batch_any_split_same_bytes(data: st.DataObject) -> None:
    policy: dict[str, Any] = {"refused_rcpts": frozenset({"nobody@example.test"})}
    whole = run([_BATCH], **policy)
    split = run(data.draw(splits(_BATCH)), **policy)
    assert split.out == whole.out
    assert split.messages == whole.messages


# ---- 4. BDAT (RFC 3030) --------------------------------------------------------------------

CHUNKING = CoreConfig(HOST, chunking=True)


def test_bdat_chunks_joined_exactly() -> None:
    d = session(CHUNKING)
    out = d.feed(ENVELOPE + b"BDAT 7\r\nhello\r\nBDAT 9 LAST\r\n.\r\nQUIT\r\n")
    assert lines(out)[-2:] == ["250 2.0.0 7 octets received", "250 2.6.0 accepted"]
    # No unstuffing and no terminator search: the octets are the message.
    assert d.messages == [b"hello\r\n.\r\nQUIT\r\n"]
    assert not d.closed
    assert d.feed(b"NOOP\r\n") == b"250 2.0.0 OK\r\n"


@FAST
@given(st.data(), st.lists(st.binary(max_size=40), min_size=1, max_size=5))
def test_bdat_any_chunks_any_split(data: st.DataObject, chunks: list[bytes]) -> None:
    wire = ENVELOPE + b"".join(
        f"BDAT {len(c)}{' LAST' if i == len(chunks) - 1 else ''}\r\n".encode() + c
        for i, c in enumerate(chunks)
    )
    wire += b"NOOP\r\n"
    whole = run([wire], CHUNKING)
    assert whole.messages == [b"".join(chunks)]
    split = run(data.draw(splits(wire)), CHUNKING)
    assert split.messages == whole.messages
    assert split.out == whole.out


def test_bdat_zero_last() -> None:
    d = session(CHUNKING)
    d.feed(ENVELOPE + b"BDAT 0 LAST\r\n")
    assert d.messages == [b""]
    d.feed(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nBDAT 3\r\nabcBDAT 0 LAST\r\n")
    assert d.messages == [b"", b"abc"]


@pytest.mark.parametrize(
    ("prefix", "before"),
    [(b"EHLO c\r\n", ["250"]), (b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n", ["250", "250"])],
)
def test_refused_bdat_consumes_its_octets(prefix: bytes, before: list[str]) -> None:
    d = session(CHUNKING)
    smuggled = b"MAIL FROM:<x@y.test>\r\n"
    out = d.feed(prefix + f"BDAT {len(smuggled)}\r\n".encode() + smuggled + b"NOOP\r\n")
    # One refusal, then the NOOP: the octets were skipped, not read as a MAIL command.
    assert codes(out) == [*before, "503", "250"]
    assert lines(out)[-2].startswith("503 5.5.1 Error: need ")
    assert not any(isinstance(e, MailFrom) and e.address == "x@y.test" for e in d.events)


def test_bdat_over_size_limit_keeps_framing() -> None:
    d = session(CoreConfig(HOST, chunking=True, size_limit=10))
    out = d.feed(ENVELOPE + b"BDAT 8\r\n12345678BDAT 8 LAST\r\nNOOP\r\nxxNOOP\r\n")
    assert lines(out)[-3:] == [
        "250 2.0.0 8 octets received",
        "552 5.3.4 Message size exceeds fixed maximum message size",
        "250 2.0.0 OK",
    ]
    assert d.messages == []
    # The transaction is over: a new one starts without RSET.
    out = d.feed(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nBDAT 2 LAST\r\nok")
    assert codes(out) == ["250", "250", "250"]
    assert d.messages == [b"ok"]


def test_bdat_single_chunk_over_limit_then_last() -> None:
    d = session(CoreConfig(HOST, chunking=True, size_limit=10))
    out = d.feed(ENVELOPE + b"BDAT 11\r\n" + b"x" * 11 + b"BDAT 0 LAST\r\n")
    assert codes(out)[-2:] == ["552", "552"]
    assert d.messages == []


@pytest.mark.parametrize("arg", [b"", b" LAST", b" -1", b" x", b" 1234567890123456789"])
def test_bdat_without_size_closes(arg: bytes) -> None:
    d = session(CHUNKING)
    out = d.feed(ENVELOPE + b"BDAT" + arg + b"\r\nNOOP\r\n")
    assert lines(out)[-1].startswith("501 5.5.4")
    assert d.closed
    assert d.feed(b"NOOP\r\n") == b""


def test_bdat_bad_argument_with_size_skips_octets() -> None:
    d = session(CHUNKING)
    out = d.feed(ENVELOPE + b"BDAT 6 NOW\r\nQUIT\r\nNOOP\r\n")
    assert lines(out)[-2:] == ["501 5.5.4 Syntax: BDAT <size> [LAST]", "250 2.0.0 OK"]
    assert not d.closed


def test_data_and_rcpt_after_bdat_refused() -> None:
    d = session(CHUNKING)
    out = d.feed(ENVELOPE + b"BDAT 2\r\nabDATA\r\nRCPT TO:<c@example.test>\r\nRSET\r\n")
    assert codes(out)[-4:] == ["250", "503", "503", "250"]
    assert d.messages == []


def test_bdat_not_offered_is_unknown() -> None:
    d = session()
    out = d.feed(ENVELOPE + b"BDAT 0 LAST\r\n")
    assert lines(out)[-1] == '500 5.5.2 Error: command "BDAT" not recognized'


# ---- 5. SIZE (RFC 1870) --------------------------------------------------------------------


def test_mail_size_parameter() -> None:
    d = session(CoreConfig(HOST, size_limit=1000))
    out = d.feed(b"EHLO c\r\nMAIL FROM:<a@b.test> SIZE=1001\r\n")
    assert lines(out)[-1] == "552 5.3.4 Message size exceeds fixed maximum message size"
    d.feed(b"MAIL FROM:<a@b.test> SIZE=1000 BODY=8BITMIME\r\n")
    assert d.events[-1] == MailFrom("a@b.test", ("SIZE=1000", "BODY=8BITMIME"), 1000, False)


def test_data_over_limit_refused_after_terminator() -> None:
    d = session(CoreConfig(HOST, size_limit=100))
    out = d.feed(ENVELOPE + b"DATA\r\n" + b"x" * 200 + b"\r\nMAIL FROM:<e@f>\r\n")
    # Nothing until the end of the data: the MAIL line above is still message text.
    assert codes(out)[-1] == "354"
    out = d.feed(b".\r\nMAIL FROM:<a@example.org>\r\n")
    assert lines(out)[0] == "552 5.3.4 Message size exceeds fixed maximum message size"
    assert codes(out)[1:] == ["250"]
    assert d.messages == []


def test_large_data_streams_with_bounded_buffer() -> None:
    limit = 100_000
    d = session(CoreConfig(HOST, size_limit=limit))
    d.feed(ENVELOPE + b"DATA\r\n")
    piece = (b"y" * 1022 + b"\r\n") * 64  # 64 KiB of ordinary lines
    for _ in range(10 * limit // len(piece) + 1):
        d.feed(piece)
        # What is over the limit is dropped as it comes, not held until the end.
        assert d.core.buffered <= limit + 8
        assert len(d.core._buf) <= limit + 1024
    out = d.feed(b".\r\nNOOP\r\n")
    assert codes(out) == ["552", "250"]
    assert d.messages == []
    assert d.core.buffered == 0


def test_data_at_limit_accepted() -> None:
    body = b"x" * 98 + b"\r\n"
    d = session(CoreConfig(HOST, size_limit=100))
    d.feed(ENVELOPE + b"DATA\r\n" + body + b".\r\n")
    assert d.messages == [body]


@pytest.mark.parametrize("tail", [b".", b".\r"])
def test_data_near_limit_same_reply_whatever_the_split(tail: bytes) -> None:
    body = b"x" * 98 + b"\r\n"  # exactly the limit
    wire = ENVELOPE + b"DATA\r\n" + body + b".\r\nNOOP\r\n"
    config = CoreConfig(HOST, size_limit=100)
    whole = run([wire], config)
    cut = wire.index(body) + len(body) + len(tail)
    split = run([wire[:cut], wire[cut:]], config)
    assert whole.messages == [body]
    assert split.messages == [body]
    assert split.out == whole.out


def test_mail_size_with_huge_number_is_a_reply_not_a_crash() -> None:
    d = session()
    out = d.feed(b"EHLO c\r\nMAIL FROM:<a@b.test> SIZE=" + b"9" * 5000 + b"\r\nNOOP\r\n")
    assert codes(out)[-2:] == ["552", "250"]


# ---- 6. Sequence and syntax errors -------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "reply"),
    [
        (b"MAIL FROM:<a@b.test>\r\n", "503 5.5.1 Error: send HELO first"),
        (b"EHLO c\r\nRCPT TO:<a@b.test>\r\n", "503 5.5.1 Error: need MAIL command"),
        (b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nDATA\r\n", "503 5.5.1 Error: need RCPT command"),
        (b"EHLO c\r\nDATA\r\n", "503 5.5.1 Error: need MAIL command"),
        (
            b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nMAIL FROM:<a@b.test>\r\n",
            "503 5.5.1 Error: nested MAIL command",
        ),
        (b"FROB\r\n", '500 5.5.2 Error: command "FROB" not recognized'),
        (b"\r\n", "500 5.5.2 Error: bad syntax"),
        (b"NO\xffOP\r\n", "500 5.5.2 Error: bad syntax (not UTF-8)"),
        (
            b"EHLO c\r\nMAIL FROM:<a@b.test> FROB=1\r\n",
            "555 5.5.4 MAIL FROM parameters not recognized or not implemented",
        ),
        (b"HELO c\r\nMAIL FROM:<a@b.test> SIZE=1\r\n", "555 5.5.4 MAIL FROM parameters need EHLO"),
        (b"EHLO c\r\nMAIL FROM:a@b.test>\r\n", "501 5.5.4 Syntax: MAIL FROM:<address>"),
        (b"EHLO c\r\nMAIL FROM:<a@b.test\r\n", "501 5.5.4 Syntax: MAIL FROM:<address>"),
        (b"EHLO c\r\nMAIL TO:<a@b.test>\r\n", "501 5.5.4 Syntax: MAIL FROM:<address>"),
        (b"EHLO c\r\nMAIL FROM:<a@b.test> SIZE=x\r\n", "501 5.5.4 Syntax: SIZE=<number>"),
        (
            b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<>\r\n",
            "501 5.5.4 Syntax: RCPT TO:<address>",
        ),
        (b"EHLO\r\n", "501 5.5.4 Syntax: EHLO hostname"),
        (b"EXPN list\r\n", "502 5.5.1 EXPN not implemented"),
    ],
)
def test_errors_reply_and_session_goes_on(wire: bytes, reply: str) -> None:
    d = session()
    out = d.feed(wire)
    assert lines(out)[-1] == reply
    assert d.feed(b"NOOP\r\n") == b"250 2.0.0 OK\r\n"
    assert not d.closed


def test_too_many_errors_close() -> None:
    d = session(CoreConfig(HOST, max_errors=3))
    out = d.feed(b"A\r\nB\r\nC\r\nNOOP\r\n")
    assert codes(out) == ["500", "500", "500", "421"]
    assert lines(out)[-1].startswith("421 4.7.0")
    assert d.closed
    assert d.feed(b"NOOP\r\n") == b""


def test_timeout_closes_with_421() -> None:
    d = session()
    d.core.timed_out()
    assert d.feed() == b"421 4.4.2 Idle timeout, closing connection\r\n"
    assert d.closed


def test_unknown_command_name_not_echoed_raw() -> None:
    d = session()
    out = d.feed(b"\x1b[31m\r\n" + b"X" * 40 + b"\r\n")
    assert lines(out) == [
        '500 5.5.2 Error: command "?" not recognized',
        '500 5.5.2 Error: command "?" not recognized',
    ]


# ---- 7. Line too long --------------------------------------------------------------------


@pytest.mark.parametrize("pieces", [1, 7])
def test_line_too_long_skipped_to_its_end(pieces: int) -> None:
    d = session()
    long_line = b"MAIL FROM:<" + b"a" * (LINE_LIMIT + 100) + b">\r\n"
    step = len(long_line) // pieces + 1
    out = d.feed_all(long_line[i : i + step] for i in range(0, len(long_line), step))
    assert lines(out) == ["500 5.5.2 Line too long"]
    assert d.feed(b"NOOP\r\n") == b"250 2.0.0 OK\r\n"
    assert not any(isinstance(e, MailFrom) for e in d.events)


def test_line_at_limit_is_read() -> None:
    d = session()
    out = d.feed(b"NOOP " + b"x" * (LINE_LIMIT - 6) + b"\r\n")
    assert out == b"250 2.0.0 OK\r\n"


# ---- 8. STARTTLS (RFC 3207) ----------------------------------------------------------------

TLS = CoreConfig(HOST, tls_available=True)


def test_starttls_discards_pipelined_plaintext() -> None:
    d = session(TLS, auto_tls=False)
    out = d.feed(b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n")
    assert lines(out)[-1] == "220 2.0.0 Ready to start TLS"
    assert d.events == [StartTLS()]
    assert d.core.waiting
    # What comes after the event is TLS (the caller stopped reading the plain socket): it
    # waits for the handshake, then starts the new session, which has no EHLO yet.
    assert d.feed(b"MAIL FROM:<x@y.test>\r\n") == b""
    d.core.tls_established()
    assert d.core.tls
    assert lines(d.feed()) == ["503 5.5.1 Error: send HELO first"]
    assert d.events == [StartTLS()]


def test_after_tls_the_client_must_ehlo_again() -> None:
    d = session(TLS)
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRSET\r\nSTARTTLS\r\n")
    out = d.feed(b"MAIL FROM:<a@b.test>\r\n")
    assert lines(out) == ["503 5.5.1 Error: send HELO first"]
    out = d.feed(b"EHLO c\r\n")
    assert "250-STARTTLS" not in lines(out)
    assert "250 STARTTLS" not in lines(out)
    assert lines(d.feed(b"STARTTLS\r\n")) == ["503 5.5.1 Error: TLS already active"]
    assert codes(d.feed(b"MAIL FROM:<a@b.test>\r\n")) == ["250"]


def test_starttls_not_available() -> None:
    d = session()
    assert lines(d.feed(b"EHLO c\r\nSTARTTLS\r\n"))[-1] == "454 4.7.0 TLS not available"
    assert not any(isinstance(e, StartTLS) for e in d.events)


def test_require_tls() -> None:
    d = session(CoreConfig(HOST, tls_available=True, require_tls=True))
    out = d.feed(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nNOOP\r\n")
    assert lines(out)[-2:] == ["530 5.7.0 Must issue a STARTTLS command first", "250 2.0.0 OK"]
    d.feed(b"STARTTLS\r\n")
    assert codes(d.feed(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")) == ["250", "250"]


# ---- 9. AUTH (RFC 4954) --------------------------------------------------------------------

AUTH = CoreConfig(HOST, tls_available=True, auth_mechanisms=("PLAIN", "LOGIN"))
AUTH_REQUIRED = CoreConfig(HOST, auth_mechanisms=("PLAIN", "LOGIN"), auth_required=True)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def test_auth_not_offered_or_accepted_in_the_clear() -> None:
    d = session(AUTH)
    out = d.feed(b"EHLO c\r\n")
    assert not any(line[4:].startswith("AUTH") for line in lines(out))
    out = d.feed(b"AUTH PLAIN " + b64(b"\0u\0p") + b"\r\n")
    assert lines(out) == ["538 5.7.11 Encryption required for requested authentication mechanism"]
    assert not any(isinstance(e, Credentials) for e in d.events)
    d.feed(b"STARTTLS\r\n")
    assert "250-AUTH PLAIN LOGIN" in lines(d.feed(b"EHLO c\r\n"))


def test_auth_plain_initial_response() -> None:
    d = session(AUTH, tls=True, auth_ok=None)
    d.feed(b"EHLO c\r\nAUTH PLAIN " + b64(b"admin\0user@x.test\0s3cret") + b"\r\n")
    assert d.events[-1] == Credentials("PLAIN", b"admin", b"user@x.test", b"s3cret")
    assert d.core.waiting
    d.core.auth_result(True)
    assert d.feed() == b"235 2.7.0 Authentication successful\r\n"
    assert d.core.authenticated
    assert lines(d.feed(b"AUTH PLAIN =\r\n")) == ["503 5.5.1 Already authenticated"]


def test_auth_plain_empty_challenge() -> None:
    d = session(AUTH, tls=True)
    d.feed(b"EHLO c\r\n")
    assert d.feed(b"AUTH PLAIN\r\n") == b"334 \r\n"
    assert d.feed(b64(b"\0u\0p") + b"\r\n") == b"235 2.7.0 Authentication successful\r\n"
    assert d.events[-1] == Credentials("PLAIN", b"", b"u", b"p")


def test_auth_login_two_steps() -> None:
    d = session(AUTH, tls=True)
    d.feed(b"EHLO c\r\n")
    assert d.feed(b"AUTH LOGIN\r\n") == b"334 VXNlcm5hbWU6\r\n"
    assert d.feed(b64(b"user") + b"\r\n") == b"334 UGFzc3dvcmQ6\r\n"
    assert d.feed(b64(b"pass") + b"\r\n") == b"235 2.7.0 Authentication successful\r\n"
    assert d.events[-1] == Credentials("LOGIN", b"", b"user", b"pass")
    d2 = session(AUTH, tls=True)
    d2.feed(b"EHLO c\r\n")
    assert d2.feed(b"AUTH LOGIN " + b64(b"user") + b"\r\n") == b"334 UGFzc3dvcmQ6\r\n"


@pytest.mark.parametrize(
    ("wire", "reply"),
    [
        (b"AUTH PLAIN\r\n*\r\n", "501 5.7.0 Authentication cancelled"),
        (b"AUTH LOGIN\r\n" + b64(b"u") + b"\r\n*\r\n", "501 5.7.0 Authentication cancelled"),
        (b"AUTH PLAIN !!!!\r\n", "501 5.5.2 Can't decode base64"),
        (b"AUTH PLAIN\r\nnot base64\r\n", "501 5.5.2 Can't decode base64"),
        (b"AUTH PLAIN " + b64(b"user\0pass") + b"\r\n", "501 5.5.2 Can't split auth value"),
        (b"AUTH PLAIN " + b64(b"a\0b\0c\0d") + b"\r\n", "501 5.5.2 Can't split auth value"),
        (b"AUTH CRAM-MD5\r\n", "504 5.5.4 Unrecognized authentication type"),
    ],
)
def test_auth_failures_reply_and_go_on(wire: bytes, reply: str) -> None:
    d = session(AUTH, tls=True)
    d.feed(b"EHLO c\r\n")
    out = d.feed(wire)
    assert lines(out)[-1] == reply
    assert not any(isinstance(e, Credentials) for e in d.events)
    assert d.feed(b"NOOP\r\n") == b"250 2.0.0 OK\r\n"


def test_auth_required_gates_mail() -> None:
    d = session(AUTH_REQUIRED, tls=True)
    out = d.feed(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
    assert lines(out)[-1] == "530 5.7.0 Authentication required"
    d.feed(b"AUTH PLAIN " + b64(b"\0u\0p") + b"\r\n")
    assert codes(d.feed(b"MAIL FROM:<a@b.test>\r\n")) == ["250"]
    assert isinstance(d.events[-1], MailFrom)


def test_auth_rejected() -> None:
    d = session(AUTH_REQUIRED, tls=True, auth_ok=False)
    out = d.feed(b"EHLO c\r\nAUTH PLAIN " + b64(b"\0u\0bad") + b"\r\nMAIL FROM:<a@b.test>\r\n")
    assert lines(out)[-2:] == [
        "535 5.7.8 Authentication credentials invalid",
        "530 5.7.0 Authentication required",
    ]
    assert not d.core.authenticated


def test_auth_in_the_clear_when_allowed() -> None:
    config = CoreConfig(HOST, auth_mechanisms=("PLAIN",), auth_requires_tls=False)
    d = session(config)
    assert "250-AUTH PLAIN" in lines(d.feed(b"EHLO c\r\n"))
    assert codes(d.feed(b"AUTH PLAIN " + b64(b"\0u\0p") + b"\r\n")) == ["235"]


# ---- 10. parse_path ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<>", ("", "")),
        ("<a@b.test>", ("a@b.test", "")),
        (" <a@b.test>", ("a@b.test", "")),
        ("<@relay1.test,@relay2.test:user@d.test>", ("user@d.test", "")),
        ('<"odd>local"@d.test>', ('"odd>local"@d.test', "")),
        ('<"a\\"b>"@d.test>', ('"a\\"b>"@d.test', "")),
        ("a@b.test", ("a@b.test", "")),
        ("a@b.test SIZE=10", ("a@b.test", "SIZE=10")),
        ("<a@b.test> SIZE=10 BODY=8BITMIME", ("a@b.test", " SIZE=10 BODY=8BITMIME")),
        ("<a@b.test", None),
        ('<"a@b.test>', None),
        ("<a@b.test>SIZE=1", None),
        ("<a<b@c.test>", None),
        ("<@relay.test>", None),
        ("", None),
        ("a>b@c.test", None),
    ],
)
def test_parse_path(text: str, expected: tuple[str, str] | None) -> None:
    assert parse_path(text) == expected


@FAST
@given(st.text(alphabet=st.characters(exclude_characters='<>" \\'), min_size=1, max_size=30))
def test_parse_path_angle_round_trip(address: str) -> None:
    if address.startswith("@"):
        return  # that is a source route, tested above
    assert parse_path(f"<{address}> X=1") == (address, " X=1")


# ---- 11. EHLO ------------------------------------------------------------------------------


@pytest.mark.parametrize("chunking", [False, True])
def test_ehlo_reply(chunking: bool) -> None:
    d = session(CoreConfig(HOST, size_limit=12345, chunking=chunking))
    out = lines(d.feed(b"EHLO client.test\r\n"))
    assert all(line.startswith("250-") for line in out[:-1])
    assert out[-1].startswith("250 ")
    assert out[0] == f"250-{HOST}"
    keywords = [line[4:] for line in out[1:]]
    # RFC 2034 §3: keywords stay bare, no enhanced codes in front of them.
    assert not any(re.match(r"\d\.\d", k) for k in keywords)
    for keyword in ["PIPELINING", "SIZE 12345", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"]:
        assert keyword in keywords
    assert ("CHUNKING" in keywords) is chunking
    assert "STARTTLS" not in keywords


def test_helo_reply_and_enhanced_codes_on_handler_replies() -> None:
    d = session()
    assert d.feed(b"HELO client.test\r\n") == f"250 {HOST}\r\n".encode()
    assert d.feed(b"MAIL FROM:<a@b.test>\r\n") == b"250 2.0.0 OK\r\n"


# ---- 12. 421 from a handler ----------------------------------------------------------------


def test_handler_421_closes() -> None:
    d = session(mail_reply="421 4.3.0 Try again later")
    out = d.feed(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n")
    assert lines(out)[-1] == "421 4.3.0 Try again later"
    assert isinstance(d.events[-1], Close)
    assert not any(isinstance(e, RcptTo) for e in d.events)
    assert d.feed(b"NOOP\r\n") == b""
    assert d.core.closed


def test_quit_closes_once() -> None:
    d = session()
    assert d.feed(b"QUIT\r\nNOOP\r\n") == b"221 2.0.0 Bye\r\n"
    assert d.events == [Close()]
    assert d.core.next_event() is None


def test_reply_without_pending_event_is_refused() -> None:
    core = ServerCore(CoreConfig(HOST))
    with pytest.raises(RuntimeError):
        core.reply("250 OK")
    with pytest.raises(RuntimeError):
        core.auth_result(True)
    with pytest.raises(RuntimeError):
        core.tls_established()


# ---- fuzz ----------------------------------------------------------------------------------

FUZZ = CoreConfig(
    HOST,
    size_limit=200,
    tls_available=True,
    auth_mechanisms=("PLAIN", "LOGIN"),
    auth_requires_tls=False,
    chunking=True,
    max_errors=8,
)
_TOKENS = st.sampled_from(
    [
        b"EHLO c\r\n",
        b"HELO c\r\n",
        b"MAIL FROM:<a@b.test>",
        b" SIZE=100",
        b"RCPT TO:<c@d.test>",
        b"DATA",
        b"BDAT ",
        b"3",
        b" LAST",
        b"AUTH PLAIN",
        b"AUTH LOGIN",
        b" AHUAcA==",
        b"STARTTLS",
        b"RSET",
        b"NOOP",
        b"QUIT",
        b"HELP",
        b"VRFY x",
        b"\r\n",
        b"\n",
        b"\r",
        b".",
        b"*",
        b"\xff",
        b"\x00",
    ]
)
_FUZZ_INPUT = st.lists(st.one_of(_TOKENS, st.binary(max_size=8)), max_size=40).map(b"".join)


def check_wire(out: bytes) -> None:
    assert out.endswith(b"\r\n") or not out
    # No bare CR or LF: every reply line ends with CRLF and nothing else breaks a line.
    assert out.count(b"\r") == out.count(b"\r\n") == out.count(b"\n")
    for line in out.split(b"\r\n")[:-1]:
        assert REPLY_LINE.match(line), line


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), _FUZZ_INPUT, st.booleans())
def test_fuzz_never_raises_and_replies_are_well_formed(
    data: st.DataObject, wire: bytes, auth_ok: bool
) -> None:
    d = session(FUZZ, auth_ok=auth_ok)
    d.feed_all(data.draw(splits(wire)))
    check_wire(bytes(d.out))
    assert d.core.buffered <= len(wire)
    assert sum(isinstance(e, Close) for e in d.events) <= 1
