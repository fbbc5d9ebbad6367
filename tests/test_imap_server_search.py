"""SEARCH BODY and TEXT on the live server: case-insensitive substrings (RFC 9051 §6.4.4).

BODY looks at the decoded text of the text parts only (never the subject); TEXT at the
header fields and the body.  The FTS5 index only narrows the candidates, so a substring
in the middle of a word is found as well as a whole word.
"""

from __future__ import annotations

import imaplib
from collections.abc import Iterator

import pytest

from test_imap_server_support import ServerThread, message

BODIES = [
    ("alpha report", "Please check the NUMBERS attached.\r\nStraßen und Größe in MÜNCHEN."),
    ("zebracorn sighting", "nothing to see here"),
    ("misc", "a number of things; e-mail me, re: Ærøskøbing"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    s = ServerThread(tmp_path_factory.mktemp("imap-search") / "var")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[imaplib.IMAP4_SSL]:
    user = server.new_user()
    c = server.login(user)
    for n, (subject, body) in enumerate(BODIES, 1):
        typ, data = c.append("INBOX", None, None, message(n, subject, body))
        assert typ == "OK", data
    typ, data = c.select("INBOX")
    assert typ == "OK", data
    yield c
    c.logout()


def search(c: imaplib.IMAP4_SSL, *criteria: str) -> list[int]:
    typ, data = c.search(None, *criteria)
    assert typ == "OK", data
    return [int(n) for n in data[0].split()]  # type: ignore[union-attr]


def search_utf8(c: imaplib.IMAP4_SSL, key: str, needle: str) -> list[int]:
    c.literal = needle.encode()  # type: ignore[attr-defined]
    typ, data = c.search("UTF-8", key)
    assert typ == "OK", data
    return [int(n) for n in data[0].split()]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("needle", "expected"),
    [
        ("umber", [1, 3]),  # inside "NUMBERS" and "number"
        ("UMBERS", [1]),
        ("numbers", [1]),
        ("num", [1, 3]),
        ("mbe", [1, 3]),
        ("hings;", [3]),
        ('"hings; e-ma"', [3]),
        ('"mail me"', [3]),
        ('"-mail m"', [3]),
        ('"check the numb"', [1]),
        ('" number "', [3]),
        ("e", [1, 2, 3]),
        ("zzzqqq", []),
        ('";"', [3]),
    ],
)
def test_body_is_a_case_insensitive_substring(
    client: imaplib.IMAP4_SSL, needle: str, expected: list[int]
) -> None:
    assert search(client, "BODY", needle) == expected
    assert search(client, "TEXT", needle) == expected


def test_body_never_matches_the_subject(client: imaplib.IMAP4_SSL) -> None:
    assert search(client, "BODY", "zebracorn") == []
    assert search(client, "BODY", "ebraco") == []
    assert search(client, "BODY", "alpha") == []
    assert search(client, "SUBJECT", "zebracorn") == [2]


def test_text_matches_header_fields_and_body(client: imaplib.IMAP4_SSL) -> None:
    assert search(client, "TEXT", "zebracorn") == [2]
    assert search(client, "TEXT", "ebraco") == [2]  # inside a subject word
    assert search(client, "TEXT", "someone@example") == [1, 2, 3]  # To
    assert search(client, "TEXT", "3@remote.test") == [3]  # Message-ID and From
    assert search(client, "TEXT", "message-id") == [1, 2, 3]  # a field name
    assert search(client, "TEXT", '"nothing to"') == [2]  # body


@pytest.mark.parametrize(
    ("needle", "expected"),
    [
        ("größe", [1]),
        ("GRÖSSE", [1]),  # full case folding: ß is "ss"
        ("MÜNCH", [1]),
        ("ößE", [1]),  # inside a word
        ("ünchen", [1]),
        ("ærøskøbing", [3]),
        ("RØSKØ", [3]),
        ("strassen", [1]),
    ],
)
def test_non_ascii_is_case_insensitive(
    client: imaplib.IMAP4_SSL, needle: str, expected: list[int]
) -> None:
    assert search_utf8(client, "BODY", needle) == expected
    assert search_utf8(client, "TEXT", needle) == expected


def test_body_with_other_keys_and_uids(client: imaplib.IMAP4_SSL) -> None:
    assert search(client, "BODY", "umber", "SUBJECT", "misc") == [3]
    assert search(client, "BODY", "umber", "NOT", "BODY", "attached") == [3]
    assert search(client, "OR", "BODY", "ebraco", "BODY", "othin") == [2]
    typ, data = client.uid("SEARCH", "BODY", "umber")
    assert typ == "OK" and data[0] == b"1 3", data
    assert search(client, "2:3", "BODY", "umber") == [3]


def test_fragment_of_many_terms_falls_back_to_a_scan(server: ServerThread) -> None:
    c = server.login(server.new_user())
    try:
        many = " ".join(f"w{i:04d}qz" for i in range(400))  # 400 terms holding "qz"
        for n, body in enumerate([many, "nothing here", "the QZ-end", "aqzb"], 1):
            assert c.append("INBOX", None, None, message(n, "s", body))[0] == "OK"
        assert c.select("INBOX")[0] == "OK"
        assert search(c, "BODY", "qz") == [1, 3, 4]
        assert search(c, "BODY", "0399q") == [1]
        assert search(c, "BODY", '"qz-e"') == [3]
    finally:
        c.logout()


def test_text_decodes_and_unfolds_header_fields(server: ServerThread) -> None:
    c = server.login(server.new_user())
    try:
        raw = (
            b"From: a@remote.test\r\nTo: b@example.test\r\n"
            b"Subject: =?UTF-8?Q?Caf=C3=A9_cr=C3=A8me?=\r\n"
            b"X-Note: folded\r\n continuation line\r\n\r\nplain body\r\n"
        )
        assert c.append("INBOX", None, None, raw)[0] == "OK"
        assert c.append("INBOX", None, None, message(2, "other", "other body"))[0] == "OK"
        assert c.select("INBOX")[0] == "OK"
        assert search(c, "TEXT", '"folded continuation"') == [1]
        assert search(c, "TEXT", '"x-note: fold"') == [1]
        assert search(c, "TEXT", "ontinuatio") == [1]
        assert search_utf8(c, "TEXT", "FÉ CRÈ") == [1]
        assert search(c, "TEXT", "caf") == [1]
        assert search(c, "BODY", "caf") == []
        assert search(c, "BODY", '"lain bod"') == [1]
    finally:
        c.logout()


def test_sessions_sharing_a_uid_map_stay_independent(server: ServerThread) -> None:
    """Equal views share one UID array (memory per idle connection); changes copy it."""
    user = server.new_user()
    a, b = server.login(user), server.login(user)
    try:
        for n in range(1, 71):
            assert a.append("INBOX", None, None, message(n))[0] == "OK"
        assert a.select("INBOX")[0] == "OK" and b.select("INBOX")[0] == "OK"
        assert a.store("5", "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK"
        assert a.expunge()[0] == "OK"
        assert search(a, "ALL") == list(range(1, 70))
        # b has not been told yet: its view (the shared array before) is unchanged
        typ, data = b.fetch("6", "(UID)")
        assert typ == "OK" and b"6 (UID 6)" in data, data
        assert b.noop()[0] == "OK"
        assert b.response("EXPUNGE")[1] == [b"5"]
        typ, data = b.fetch("5", "(UID)")
        assert typ == "OK" and b"5 (UID 6)" in data, data
        assert a.append("INBOX", None, None, message(71))[0] == "OK"
        assert a.noop()[0] == "OK" and b.noop()[0] == "OK"
        assert search(a, "ALL") == search(b, "ALL") == list(range(1, 71))
        typ, data = b.uid("SEARCH", "UID", "70:*")
        assert typ == "OK" and data[0] == b"70 71", data
    finally:
        a.logout()
        b.logout()


def test_full_case_folding_of_the_text(server: ServerThread) -> None:
    c = server.login(server.new_user())
    try:
        bodies = ["the \ufb01le is here", "STRASSE", "Stra\u00dfe", "plain file"]
        for n, body in enumerate(bodies, 1):
            raw = (
                f"From: a@remote.test\r\nSubject: s{n}\r\nContent-Type: text/plain; "
                f"charset=utf-8\r\n\r\n{body}\r\n"
            ).encode()
            assert c.append("INBOX", None, None, raw)[0] == "OK"
        assert c.select("INBOX")[0] == "OK"
        assert search(c, "BODY", "file") == [1, 4]  # the "fi" ligature folds to "fi"
        assert search(c, "BODY", "strasse") == [2, 3]
        assert search(c, "BODY", "rasse") == [2, 3]
        assert search_utf8(c, "BODY", "straße") == [2, 3]
    finally:
        c.logout()
