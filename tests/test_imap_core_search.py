"""SEARCH semantics (RFC 9051 §6.4.4, RFC 4731, RFC 5182, RFC 7162) on fake messages."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

from mailfort.imap import commands as c
from mailfort.imap.parser import parse_one
from mailfort.imap.search import SearchContext, matches, run_search

UTC = dt.UTC


@dataclass
class Msg:
    uid: int
    seq: int
    flags: frozenset[str] = frozenset()
    internal_date: dt.datetime = dt.datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
    size: int = 1000
    modseq: int = 1
    headers: dict[str, list[str]] = field(default_factory=dict)
    body: str = ""
    email_id: str | None = None
    thread_id: str | None = None

    def header(self, name: str) -> Sequence[str]:
        return self.headers.get(name, [])

    def contains_text(self, needle: str, *, headers: bool) -> bool:
        text = self.body
        if headers:
            text = (
                "\n".join(f"{k}: {v}" for k, vs in self.headers.items() for v in vs) + "\n" + text
            )
        return needle in text.casefold()


MAILBOX = [
    Msg(
        10,
        1,
        frozenset({"\\Seen"}),
        size=500,
        modseq=5,
        headers={
            "from": ["Terry Smith <smith@example.com>"],
            "subject": ["Weekly report"],
            "date": ["Mon, 4 Mar 2024 09:00:00 +0100"],
        },
        body="Numbers are up.",
        email_id="M10",
    ),
    Msg(
        11,
        2,
        frozenset({"\\Flagged", "$Forwarded"}),
        internal_date=dt.datetime(2024, 2, 1, 23, 30, tzinfo=UTC),
        size=5000,
        modseq=9,
        headers={"from": ["alice@example.org"], "subject": ["Данные"], "x-mailer": ["mutt"]},
        body="Привет",
    ),
    Msg(
        15,
        3,
        frozenset({"\\Deleted", "\\Recent"}),
        internal_date=dt.datetime(2024, 3, 2, tzinfo=UTC),
        size=20000,
        modseq=12,
        headers={"to": ["bob@example.net"], "date": ["garbage"]},
        body="Meeting notes",
    ),
]
CTX = SearchContext(max_seq=3, max_uid=15, now=dt.datetime(2024, 3, 2, 1, 0, tzinfo=UTC))


def search(program: str, *, uid: bool = False, ctx: SearchContext = CTX) -> list[int]:
    line = f"t {'UID ' if uid else ''}SEARCH {program}\r\n".encode()
    cmd = parse_one(line)
    assert isinstance(cmd, c.Search), cmd
    return [m.uid if uid else m.seq for m in MAILBOX if matches(cmd.criteria, m, ctx)]


def test_flags() -> None:
    assert search("SEEN") == [1]
    assert search("UNSEEN") == [2, 3]
    assert search("FLAGGED") == [2]
    assert search("DELETED") == [3]
    assert search("UNDELETED") == [1, 2]
    assert search("KEYWORD $forwarded") == [2]  # keywords compare case-insensitively
    assert search("UNKEYWORD $Forwarded") == [1, 3]
    assert search("NEW") == [3]
    assert search("OLD") == [1, 2]


def test_sequence_and_uid_sets() -> None:
    assert search("2:*") == [2, 3]
    assert search("*") == [3]
    assert search("UID 11:*") == [2, 3]
    assert search("UID 12:14") == []
    assert search("UID 100:*") == [3]  # RFC 9051 §6.4.9: n:* always includes the largest
    assert search("1,3", uid=True) == [10, 15]


def test_headers_and_text() -> None:
    assert search('FROM "smith"') == [1]
    assert search("FROM EXAMPLE") == [1, 2]
    assert search("SUBJECT report") == [1]
    assert search("TO bob") == [3]
    assert search('HEADER X-Mailer ""') == [2]  # empty string: header present
    assert search("HEADER X-Mailer MUTT") == [2]
    assert search("BODY meeting") == [3]
    assert search("BODY smith") == []  # BODY excludes the header
    assert search("TEXT smith") == [1]  # TEXT includes it
    line = b"t SEARCH CHARSET UTF-8 SUBJECT {12}\r\n" + "Данные".encode() + b"\r\n"
    cmd = parse_one(line)
    assert isinstance(cmd, c.Search)
    assert [m.seq for m in MAILBOX if matches(cmd.criteria, m, CTX)] == [2]


def test_dates() -> None:
    assert search("BEFORE 1-Mar-2024") == [2]
    assert search("ON 1-Mar-2024") == [1]
    assert search("SINCE 1-Mar-2024") == [1, 3]
    assert search("SENTON 4-Mar-2024") == [1]  # the Date header's own date
    assert search("SENTBEFORE 5-Mar-2024") == [1]  # no or unparsable Date: no match
    assert search("SENTSINCE 1-Jan-2000") == [1]


def test_within() -> None:
    assert search("YOUNGER 7200") == [3]  # 1 hour old
    assert search("OLDER 7200") == [1, 2]


def test_size_modseq_objectid() -> None:
    assert search("LARGER 1000") == [2, 3]
    assert search("SMALLER 5000") == [1]
    assert search("MODSEQ 9") == [2, 3]
    assert search("EMAILID M10") == [1]
    assert search("THREADID T1") == []


def test_boolean_structure() -> None:
    assert search("OR SEEN FLAGGED") == [1, 2]
    assert search("NOT OR SEEN FLAGGED") == [3]
    assert search("(SEEN) (LARGER 10)") == [1]
    assert search("OR (SEEN SMALLER 100) (DELETED LARGER 10000)") == [3]
    assert search("ALL NOT ALL") == []


def test_saved_result_dollar() -> None:
    ctx = SearchContext(3, 15, saved_uids=frozenset({11, 15}), now=CTX.now)
    assert search("$", ctx=ctx) == [2, 3]
    assert search("UID $", uid=True, ctx=ctx) == [11, 15]
    assert search("$") == []  # no saved result: empty set (RFC 5182 §2.1)


def _run(line: str, *, rev2: bool = False) -> tuple[list[bytes], frozenset[int] | None]:
    cmd = parse_one(line.encode() + b"\r\n")
    assert isinstance(cmd, c.Search)
    outcome = run_search(cmd, MAILBOX, CTX, esearch_default=rev2)
    return [resp.to_bytes() for resp in outcome.responses], outcome.saved_uids


def test_plain_search_response() -> None:
    assert _run("a SEARCH UNSEEN") == ([b"* SEARCH 2 3\r\n"], None)
    assert _run("a UID SEARCH UNSEEN") == ([b"* SEARCH 11 15\r\n"], None)
    # RFC 7162 §3.1.5: a MODSEQ key adds the highest mod-sequence of the matches.
    assert _run("a SEARCH MODSEQ 6") == ([b"* SEARCH 2 3 (MODSEQ 12)\r\n"], None)


def test_esearch_responses() -> None:
    assert _run("A282 SEARCH RETURN (MIN COUNT) UNSEEN") == (
        [b'* ESEARCH (TAG "A282") MIN 2 COUNT 2\r\n'],
        None,
    )
    assert _run("A283 UID SEARCH RETURN () ALL") == (
        [b'* ESEARCH (TAG "A283") UID ALL 10:11,15\r\n'],
        None,
    )
    assert _run("A SEARCH RETURN (MIN MAX ALL) KEYWORD nothing") == (
        [b'* ESEARCH (TAG "A")\r\n'],
        None,
    )
    # IMAP4rev2: SEARCH without RETURN answers ESEARCH ALL.
    assert _run("r SEARCH SEEN", rev2=True) == ([b'* ESEARCH (TAG "r") ALL 1\r\n'], None)


def test_search_save() -> None:
    # RFC 5182 §2.4: SAVE alone sends no ESEARCH; with MIN/MAX it saves only those.
    assert _run("a SEARCH RETURN (SAVE) UNSEEN") == ([], frozenset({11, 15}))
    out, saved = _run("a SEARCH RETURN (SAVE MIN) ALL")
    assert out == [b'* ESEARCH (TAG "a") MIN 1\r\n'] and saved == frozenset({10})
    out, saved = _run("a SEARCH RETURN (SAVE MIN COUNT) ALL")
    assert saved == frozenset({10, 11, 15})
