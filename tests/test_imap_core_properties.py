"""Property tests of the IMAP core: no input makes it raise, and encodings round-trip."""

from __future__ import annotations

import datetime as dt
import itertools
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailfort.imap import commands as c
from mailfort.imap import response as r
from mailfort.imap.connection import ImapConnection, Send
from mailfort.imap.mailbox import MailboxNameError, decode_mailbox, mutf7_decode, mutf7_encode
from mailfort.imap.parser import ParseError, parse_command, parse_one
from mailfort.imap.search import SearchContext, matches
from mailfort.imap.sequence import STAR, SequenceSet
from mailfort.imap.state import ServerPolicy
from mailfort.imap.wire import FrameError, Framer, Limits, RawCommand

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Pieces of IMAP syntax, so that generated input gets past the tag and into the grammar.
_NAMES = [
    b"UID FETCH",
    b"FETCH",
    b"SEARCH",
    b"UID SEARCH",
    b"STORE",
    b"UID STORE",
    b"SELECT",
    b"EXAMINE",
    b"APPEND",
    b"LIST",
    b"LSUB",
    b"LOGIN",
    b"AUTHENTICATE",
    b"STATUS",
    b"COPY",
    b"UID MOVE",
    b"ENABLE",
    b"ID",
    b"SETQUOTA",
    b"GETQUOTA",
    b"CREATE",
    b"RENAME",
    b"UID EXPUNGE",
    b"IDLE",
    b"COMPRESS",
    b"NOOP",
]
_ARGS = [
    b"RETURN",
    b"CHARSET",
    b"UTF-8",
    b"(",
    b")",
    b"[",
    b"]",
    b"<",
    b">",
    b"{",
    b"}",
    b"~{",
    b"+}",
    b'"',
    b"\\",
    b" ",
    b" ",
    b" ",
    b"1",
    b"0",
    b"*",
    b":",
    b",",
    b"$",
    b".",
    b"-",
    b"%",
    b"&",
    b"=",
    b"NIL",
    b"ALL",
    b"FAST",
    b"BODY",
    b"BODY.PEEK",
    b"BINARY",
    b"BINARY.SIZE",
    b"HEADER.FIELDS",
    b"MIME",
    b"TEXT",
    b"FLAGS",
    b"+FLAGS.SILENT",
    b"\\Seen",
    b"INBOX",
    b"OR",
    b"NOT",
    b"SINCE",
    b"1-Feb-1994",
    b"MODSEQ",
    b"CHANGEDSINCE",
    b"VANISHED",
    b"QRESYNC",
    b"CONDSTORE",
    b"UNCHANGEDSINCE",
    b"{3}\r\nabc",
    b"{2+}\r\nxy",
    b"~{1}\r\n\x00",
    b"\x00",
    b"\xff",
    b"\xc3\xa9",
    b"&ZeVnLIqe-",
    b"PLAIN",
    b'" 7-Feb-1994 22:43:04 -0800"',
    b"9999999999999",
    b"USE",
    b"STATUS",
    b"SUBSCRIBED",
    b"RECURSIVEMATCH",
    b"SPECIAL-USE",
    b"CHILDREN",
    b"MESSAGES",
    b"STORAGE",
    b"HEADER",
    b"UID",
    b"LARGER",
    b"SMALLER",
    b"KEYWORD",
    b"FROM",
    b"\r\n",
]
_command = st.tuples(
    st.sampled_from([b"a1", b"2", b"A.3"]),
    st.sampled_from(_NAMES),
    st.lists(st.sampled_from(_ARGS) | st.binary(max_size=3), max_size=25),
).map(lambda t: t[0] + b" " + t[1] + b" " + b"".join(t[2]) + b"\r\n")
imap_ish = st.lists(_command | st.binary(max_size=6), min_size=1, max_size=4).map(b"".join)
any_bytes = st.binary(max_size=300) | imap_ish


def _framer_events(data: bytes, chunk: int) -> list[object]:
    framer = Framer(Limits(max_line=200, max_literal=50, max_nonsync_literal=20, max_command=400))
    out: list[object] = []
    for i in range(0, len(data), chunk):
        framer.receive_data(data[i : i + chunk])
        while (event := framer.next_event()) is not None:
            out.append(event)
            if isinstance(event, RawCommand):
                for utf8 in (False, True):
                    parsed = parse_command(event, utf8=utf8)
                    assert isinstance(parsed, ParseError) or parsed.tag == event.tag.decode()
                    out.append(parsed)
    return out


@FAST
@given(any_bytes, st.integers(1, 17))
def test_random_bytes_never_raise_through_framer_and_parser(data: bytes, chunk: int) -> None:
    _framer_events(data, chunk)


@FAST
@given(any_bytes)
def test_chunking_does_not_change_the_result(data: bytes) -> None:
    assert _framer_events(data, 1) == _framer_events(data, max(1, len(data)))


@FAST
@given(any_bytes)
def test_connection_only_answers_bad_or_commands(data: bytes) -> None:
    policy = ServerPolicy(allow_plaintext_auth=True, limits=Limits(max_line=200))
    conn = ImapConnection(policy)
    conn.receive_data(data)
    for _ in range(200):
        event = conn.next_event()
        if event is None:
            break
        if isinstance(event, Send):
            # Everything the core writes by itself is a whole CRLF-terminated reply.
            assert event.data.endswith(b"\r\n")
            assert any(word in event.data for word in (b"BAD", b"NO", b"+ ", b"OK"))
        else:
            # A server would run the command; say it failed and move on.
            cmd = getattr(event, "command", None)
            if isinstance(cmd, c.Authenticate):
                conn.complete(cmd, r.Status.NO)


@FAST
@given(any_bytes)
def test_parse_one_never_raises(data: bytes) -> None:
    result = parse_one(data)
    assert isinstance(result, ParseError | FrameError) or hasattr(result, "tag")


# ------------------------------------------------------------------ sequence sets

numbers = st.integers(1, 300)
elements = st.tuples(numbers | st.just(STAR), numbers | st.just(STAR))


@FAST
@given(st.lists(elements, min_size=1, max_size=8), st.integers(0, 400))
def test_sequence_set_membership_matches_expansion(
    ranges: list[tuple[int, int]], largest: int
) -> None:
    seq = SequenceSet(tuple(ranges))
    expanded = list(seq.expand(largest))
    assert expanded == sorted(set(expanded))
    assert set(expanded) == {n for n in range(1, largest + 1) if seq.contains(n, largest)}
    merged = seq.ranges_for(largest)
    for (_, b1), (a2, _) in itertools.pairwise(merged):
        assert b1 + 1 < a2  # sorted, disjoint and not adjacent
    for a, b in merged:
        assert 1 <= a <= b <= largest


@FAST
@given(st.lists(elements, min_size=1, max_size=8))
def test_sequence_set_text_round_trip(ranges: list[tuple[int, int]]) -> None:
    seq = SequenceSet(tuple(ranges))
    assert SequenceSet.parse(str(seq)) == seq


@FAST
@given(st.sets(numbers, max_size=60))
def test_sequence_set_from_numbers(nums: set[int]) -> None:
    seq = SequenceSet.from_numbers(nums)
    assert list(seq.expand(300)) == sorted(nums)
    # The compact form never has two adjacent ranges.
    assert len(seq.ranges) == len(seq.ranges_for(300))


@FAST
@given(st.lists(elements, min_size=1, max_size=6), st.sets(st.integers(1, 10**6), max_size=50))
def test_sequence_set_select_uids(ranges: list[tuple[int, int]], uids: set[int]) -> None:
    seq = SequenceSet(tuple(ranges))
    existing = sorted(uids)
    largest = existing[-1] if existing else 0
    assert seq.select(existing) == [u for u in existing if seq.contains(u, largest)]


def test_sequence_set_examples() -> None:
    seq = SequenceSet.parse("2,4:7,9,12:*")
    assert list(seq.expand(15)) == [2, 4, 5, 6, 7, 9, 12, 13, 14, 15]
    assert list(SequenceSet.parse("4:2").expand(10)) == [2, 3, 4]
    assert list(SequenceSet.parse("559:*").expand(100)) == [100]  # RFC 9051 §6.4.9
    assert list(SequenceSet.parse("*:4").expand(6)) == [4, 5, 6]
    assert list(SequenceSet.parse("1:*").expand(0)) == []
    saved = SequenceSet.parse("$")
    assert saved.saved and str(saved) == "$"
    for use in (
        lambda: saved.contains(1, 5),
        lambda: list(saved.expand(5)),
        lambda: saved.select([1]),
    ):
        try:
            use()
        except ValueError:
            continue
        raise AssertionError("$ was used unresolved")
    assert SequenceSet.parse("1:4294967295").select([3, 7, 10**9]) == [3, 7, 10**9]
    for bad in ("", "0", "1:0", "01", "1,,2", "a", "1:2:3", "4294967296", "$,1"):
        try:
            SequenceSet.parse(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} parsed")


# ------------------------------------------------------------------ modified UTF-7

names = st.text(st.characters(codec="utf-8"), max_size=30)


@FAST
@given(names)
def test_mutf7_round_trip(name: str) -> None:
    encoded = mutf7_encode(name)
    assert all(0x20 <= ord(ch) <= 0x7E for ch in encoded)
    assert mutf7_decode(encoded) == name
    assert mutf7_encode(mutf7_decode(encoded)) == encoded


@FAST
@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30))
def test_mutf7_decode_is_canonical_or_refuses(text: str) -> None:
    try:
        decoded = mutf7_decode(text)
    except MailboxNameError:
        return
    assert mutf7_encode(decoded) == text


def test_mutf7_known_values() -> None:
    assert mutf7_encode("~peter/mail/台北/日本語") == "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
    assert mutf7_encode("Entwürfe") == "Entw&APw-rfe"
    assert mutf7_encode("a&b") == "a&-b"
    assert mutf7_encode("😀") == "&2D3eAA-"
    for bad in ("&Jjo!", "&U,BTFw", "&AGE-", "&U,BTFx-", "&2D0-", "\u00e9", "&,,,-"):
        try:
            mutf7_decode(bad)
        except MailboxNameError:
            continue
        raise AssertionError(f"{bad!r} decoded")


# ------------------------------------------------------------------ quoting

no_nul_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=60)


@FAST
@given(no_nul_text, st.booleans())
def test_string_quoting_round_trips_through_the_parser(text: str, utf8: bool) -> None:
    rendered = r.string(text, utf8=utf8)
    result = parse_one(b"a LOGIN " + rendered + b" x\r\n", utf8=utf8)
    assert isinstance(result, c.Login), result
    assert result.username == text


@FAST
@given(
    st.text(
        st.characters(codec="utf-8", exclude_categories=["Cs", "Cc", "Zl", "Zp"]),
        min_size=1,
        max_size=30,
    ),
    st.booleans(),
)
def test_mailbox_names_round_trip(name: str, utf8: bool) -> None:
    name = unicodedata.normalize("NFC", name)
    try:
        canonical = decode_mailbox(name.encode(), utf8=True)
    except MailboxNameError:
        return  # e.g. C1 controls, refused by design
    wire = r.render(r.MailboxName(canonical), utf8=utf8)
    result = parse_one(b"a SELECT " + wire + b"\r\n", utf8=utf8)
    assert isinstance(result, c.Select), (wire, result)
    assert result.mailbox == canonical


@FAST
@given(st.binary(max_size=80))
def test_astring_bytes_round_trip(data: bytes) -> None:
    rendered = r.string(data)
    result = parse_one(b"a LOGIN " + rendered + b" x\r\n")
    if b"\x00" in data:
        assert isinstance(result, ParseError)  # literal8 is not a string
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        assert isinstance(result, ParseError)
        return
    assert isinstance(result, c.Login) and result.username == text


# ------------------------------------------------------------------ search algebra


@dataclass
class _Msg:
    uid: int
    seq: int
    flags: frozenset[str]
    size: int
    modseq: int
    internal_date: dt.datetime = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    headers: dict[str, list[str]] = field(default_factory=dict)

    def header(self, name: str) -> Sequence[str]:
        return self.headers.get(name, [])

    def contains_text(self, needle: str, *, headers: bool) -> bool:
        return needle in "hello world"


_KEYS = [
    "SEEN",
    "FLAGGED",
    "DELETED",
    "LARGER 100",
    "SMALLER 50",
    "1:2",
    "UID 3:*",
    "MODSEQ 4",
    "FROM a",
    "BODY world",
    "ALL",
    "SINCE 1-Jan-2024",
    "KEYWORD $x",
]


def _program(depth: int = 0) -> st.SearchStrategy[str]:
    leaf = st.sampled_from(_KEYS)
    if depth > 2:
        return leaf
    sub = st.deferred(lambda: _program(depth + 1))
    return (
        leaf
        | sub.map(lambda k: f"NOT {k}")
        | st.tuples(sub, sub).map(lambda t: f"OR {t[0]} {t[1]}")
        | st.lists(sub, min_size=1, max_size=3).map(lambda ks: "(" + " ".join(ks) + ")")
    )


flagsets = st.frozensets(st.sampled_from(["\\Seen", "\\Flagged", "\\Deleted", "$x"]))
mailboxes = st.lists(st.tuples(flagsets, st.integers(0, 200), st.integers(1, 9)), max_size=6).map(
    lambda rows: [
        _Msg(uid=i * 2 + 1, seq=i + 1, flags=f, size=s, modseq=m, headers={"from": ["a@b"]})
        for i, (f, s, m) in enumerate(rows)
    ]
)


@FAST
@given(_program(), _program(), mailboxes)
def test_search_not_and_or_are_set_algebra(p1: str, p2: str, msgs: list[_Msg]) -> None:
    ctx = SearchContext(max_seq=len(msgs), max_uid=msgs[-1].uid if msgs else 0)

    def hits(program: str) -> set[int]:
        cmd = parse_one(f"t SEARCH {program}\r\n".encode())
        assert isinstance(cmd, c.Search), (program, cmd)
        return {m.seq for m in msgs if matches(cmd.criteria, m, ctx)}

    everything = {m.seq for m in msgs}
    a, b = hits(p1), hits(p2)
    assert hits(f"NOT ({p1})") == everything - a
    assert hits(f"OR ({p1}) ({p2})") == a | b
    assert hits(f"({p1}) ({p2})") == a & b
