"""The IMAP framer: lines, literals (RFC 9051 §4.3, RFC 7888, RFC 3516), limits, modes."""

from __future__ import annotations

from mailfort.imap.wire import (
    AuthLine,
    ContinuationRequest,
    FrameError,
    Framer,
    FramerMode,
    IdleDone,
    Limits,
    RawCommand,
    WireEvent,
    extract_tag,
)


def drain(framer: Framer) -> list[WireEvent]:
    out: list[WireEvent] = []
    while (event := framer.next_event()) is not None:
        out.append(event)
    return out


def feed(data: bytes, limits: Limits | None = None) -> list[WireEvent]:
    framer = Framer(limits)
    framer.receive_data(data)
    return drain(framer)


def test_simple_lines_crlf_and_bare_lf() -> None:
    events = feed(b"a1 NOOP\r\na2 CAPABILITY\n")
    assert events == [
        RawCommand(b"a1", (b"a1 NOOP",), ()),
        RawCommand(b"a2", (b"a2 CAPABILITY",), ()),
    ]


def test_partial_line_waits_for_more_data() -> None:
    framer = Framer()
    framer.receive_data(b"a1 NO")
    assert framer.next_event() is None
    framer.receive_data(b"OP\r")
    assert framer.next_event() is None
    framer.receive_data(b"\n")
    assert framer.next_event() == RawCommand(b"a1", (b"a1 NOOP",), ())


def test_synchronising_literal_asks_for_continuation() -> None:
    # RFC 9051 §6.3.12 example: APPEND with a synchronising literal.
    framer = Framer()
    framer.receive_data(b"A003 APPEND saved-messages (\\Seen) {7}\r\n")
    assert framer.next_event() == ContinuationRequest(b"A003", 7)
    assert framer.next_event() is None
    framer.receive_data(b"abc")
    assert framer.next_event() is None
    framer.receive_data(b"defg\r\n")
    event = framer.next_event()
    assert event == RawCommand(
        b"A003", (b"A003 APPEND saved-messages (\\Seen) {7}", b""), (b"abcdefg",)
    )


def test_literal_fed_byte_by_byte() -> None:
    data = b"a LOGIN {4}\r\nfred {6}\r\nsecret\r\n"
    framer = Framer()
    events: list[WireEvent] = []
    for i in range(len(data)):
        framer.receive_data(data[i : i + 1])
        events.extend(drain(framer))
    assert events == [
        ContinuationRequest(b"a", 4),
        ContinuationRequest(b"a", 6),
        RawCommand(b"a", (b"a LOGIN {4}", b" {6}", b""), (b"fred", b"secret")),
    ]


def test_literal_plus_needs_no_continuation() -> None:
    # RFC 7888 §3 example.
    events = feed(b"A001 LOGIN {11+}\r\nFRED FOOBAR {7+}\r\nfat man\r\n")
    assert events == [
        RawCommand(b"A001", (b"A001 LOGIN {11+}", b" {7+}", b""), (b"FRED FOOBAR", b"fat man"))
    ]


def test_binary_literal_may_hold_nul() -> None:
    # RFC 3516 §4.4: literal8 in APPEND.
    events = feed(b"A004 APPEND Drafts ~{5+}\r\na\x00b\x00c\r\n")
    assert isinstance(events[0], RawCommand)
    assert events[0].literals == (b"a\x00b\x00c",)


def test_literal_marker_inside_quoted_string_is_not_a_literal() -> None:
    events = feed(b'a SEARCH SUBJECT "x{3}\r\nb NOOP\r\n')
    assert [e.tag for e in events if isinstance(e, RawCommand)] == [b"a", b"b"]
    assert not any(isinstance(e, ContinuationRequest) for e in events)


def test_literal_marker_after_escaped_quote() -> None:
    events = feed(b'a SEARCH SUBJECT "a\\"" {3}\r\nabc\r\n')
    assert events[0] == ContinuationRequest(b"a", 3)


def test_line_too_long_is_refused_before_the_newline_arrives() -> None:
    framer = Framer(Limits(max_line=100))
    framer.receive_data(b"a1 SEARCH " + b"X" * 200)
    event = framer.next_event()
    assert isinstance(event, FrameError)
    assert event.close and event.code == "TOOBIG" and event.tag == b"a1"
    assert event.response().startswith(b"a1 BAD [TOOBIG]")
    assert b"* BYE" in event.response()
    framer.receive_data(b"more\r\nb NOOP\r\n")
    assert framer.next_event() is None
    assert framer.closed


def test_synchronising_literal_too_big_is_refused_without_closing() -> None:
    # The client waits for "+", so refusing it costs no bandwidth and keeps the session.
    framer = Framer(Limits(max_literal=1000))
    framer.receive_data(b"A1 APPEND INBOX {5000}\r\nA2 NOOP\r\n")
    event = framer.next_event()
    assert isinstance(event, FrameError)
    assert (event.status, event.code, event.close) == ("NO", "TOOBIG", False)
    assert event.response() == b"A1 NO [TOOBIG] Literal too large\r\n"
    assert framer.next_event() == RawCommand(b"A2", (b"A2 NOOP",), ())


def test_nonsync_literal_over_limit_closes() -> None:
    # RFC 7888 §5 (LITERAL-): more than 4096 octets must be synchronising.
    framer = Framer(Limits(max_nonsync_literal=4096))
    framer.receive_data(b"A1 APPEND INBOX {5000+}\r\n" + b"x" * 100)
    event = framer.next_event()
    assert isinstance(event, FrameError)
    assert (event.status, event.code, event.close) == ("BAD", "TOOBIG", True)


def test_absurd_literal_size_is_too_big() -> None:
    events = feed(b"a APPEND INBOX {99999999999999999999}\r\n")
    assert isinstance(events[0], FrameError) and events[0].code == "TOOBIG"


def test_too_many_literals() -> None:
    data = b"a LOGIN" + b" {1+}\r\nx" * 5 + b"\r\n"
    events = feed(data, Limits(max_literals=3))
    assert isinstance(events[-1], FrameError) and events[-1].close


def test_command_size_limit_counts_literals() -> None:
    limits = Limits(max_command=50, max_nonsync_literal=40, max_literal=40)
    events = feed(b"a LOGIN {30+}\r\n" + b"x" * 30 + b" {30+}\r\n", limits)
    assert isinstance(events[-1], FrameError)


def test_idle_done_pipelined_in_the_same_segment() -> None:
    # Thunderbird sends DONE and the next command together.
    framer = Framer()
    framer.receive_data(b"5 IDLE\r\nDONE\r\n6 NOOP\r\n")
    assert framer.next_event() == RawCommand(b"5", (b"5 IDLE",), ())
    framer.set_mode(FramerMode.IDLE)
    assert framer.next_event() == IdleDone(ok=True)
    assert framer.mode is FramerMode.COMMAND
    assert framer.next_event() == RawCommand(b"6", (b"6 NOOP",), ())


def test_idle_other_line_ends_idle_badly() -> None:
    framer = Framer()
    framer.set_mode(FramerMode.IDLE)
    framer.receive_data(b"a NOOP\r\n")
    assert framer.next_event() == IdleDone(ok=False)


def test_idle_done_case_insensitive() -> None:
    framer = Framer()
    framer.set_mode(FramerMode.IDLE)
    framer.receive_data(b"done\r\n")
    assert framer.next_event() == IdleDone(ok=True)


def test_authenticate_mode_lines() -> None:
    framer = Framer()
    framer.set_mode(FramerMode.AUTHENTICATE)
    framer.receive_data(b"AGZyZWQAc2VjcmV0\r\n*\r\n")
    first = framer.next_event()
    assert first == AuthLine(b"AGZyZWQAc2VjcmV0") and not first.cancelled
    second = framer.next_event()
    assert isinstance(second, AuthLine) and second.cancelled


def test_discard_buffer_after_starttls() -> None:
    # STARTTLS command injection: plaintext pipelined behind STARTTLS is dropped.
    framer = Framer()
    framer.receive_data(b"a STARTTLS\r\nb LOGIN evil evil\r\n")
    assert isinstance(framer.next_event(), RawCommand)
    framer.discard_buffer()
    assert framer.next_event() is None


def test_take_buffer_for_compress() -> None:
    framer = Framer()
    framer.receive_data(b"a COMPRESS DEFLATE\r\n\x78\x9c\x01")
    assert isinstance(framer.next_event(), RawCommand)
    assert framer.take_buffer() == b"\x78\x9c\x01"


def test_empty_lines_between_commands_are_ignored() -> None:
    assert feed(b"\r\n\r\na NOOP\r\n") == [RawCommand(b"a", (b"a NOOP",), ())]


def test_extract_tag() -> None:
    assert extract_tag(b"A001 LOGIN") == b"A001"
    assert extract_tag(b"+ foo") == b"*"
    assert extract_tag(b"(bad tag") == b"*"
    assert extract_tag(b"1.2 NOOP") == b"1.2"
