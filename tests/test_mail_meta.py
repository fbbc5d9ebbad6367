"""extract_meta: what the store indexes at delivery."""

from __future__ import annotations

import base64

import pytest

from mailfort.mail import MessageMeta, decode_header, extract_meta, parse_date, to_crlf
from mailfort.mail.meta import TEXT_CAP, html_to_text

from corpora import DOVECOT_REFERENCE, reference_cases

MIXED = (
    b"From: =?ISO-8859-1?Q?Andr=E9?= Pirard <PIRARD@vm1.ulg.ac.be>\r\n"
    b"To: Keith Moore <moore@cs.utk.edu>, undisclosed:;,\r\n"
    b'  "Doe, Jane" <jane@example.org>\r\n'
    b"Cc: team: a@example.org, b@example.org;\r\n"
    b"Bcc: hidden@example.org\r\n"
    b"Subject: =?ISO-8859-1?B?SWYgeW91IGNhbiByZWFkIHRoaXMgeW8=?=\r\n"
    b" =?ISO-8859-2?B?dSB1bmRlcnN0YW5kIHRoZSBleGFtcGxlLg==?= ok\r\n"
    b"Date: Tue, 1 Jul 2003 10:52:37 +0200\r\n"
    b"Message-ID: <1234@local.machine.example>\r\n"
    b"In-Reply-To: <a@x> (comment) <b@y>\r\n"
    b"References: <r1@x>\r\n <r2@x>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/alternative; boundary=b\r\n\r\n"
    b"--b\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    b"Caf=E9 cr=E8me\r\n"
    b"--b\r\nContent-Type: text/html; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\n"
    + base64.encodebytes(
        "<html><head><style>p{}</style></head><body><p>Hällo&amp;bye</p>"
        "<script>x()</script></body></html>".encode()
    )
    + b"--b\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\niVBORw0K\r\n"
    b"--b--\r\n"
)


def test_extract_meta_fields() -> None:
    meta = extract_meta(MIXED)
    assert meta.subject == "If you can read this you understand the example. ok"
    assert meta.from_ == [("André Pirard", "PIRARD@vm1.ulg.ac.be")]
    assert meta.to == [("Keith Moore", "moore@cs.utk.edu"), ("Doe, Jane", "jane@example.org")]
    assert meta.cc == [("", "a@example.org"), ("", "b@example.org")]
    assert meta.bcc == [("", "hidden@example.org")]
    assert meta.date == 1057049557  # 2003-07-01T08:52:37Z
    assert meta.message_id == "<1234@local.machine.example>"
    assert meta.in_reply_to == ["<a@x>", "<b@y>"]
    assert meta.references == ["<r1@x>", "<r2@x>"]
    assert meta.text == "Café crème\nHällo&bye"
    assert meta.size == len(to_crlf(MIXED))
    assert meta.envelope.startswith('("Tue, 1 Jul 2003 10:52:37 +0200" ')
    assert meta.bodystructure.endswith('"alternative" ("boundary" "b") NIL NIL NIL)')
    assert meta.body.endswith('"alternative")')


def test_meta_round_trip() -> None:
    meta = extract_meta(MIXED + b"\xff")
    data = meta.to_bytes()
    assert isinstance(data, bytes)
    assert MessageMeta.from_bytes(data) == meta


def test_meta_round_trips_8bit_headers() -> None:
    raw = b"Subject: caf\xe9 \xc3\xa9\r\nFrom: J\xf6rg <j@example.org>\r\n\r\nbody\r\n"
    meta = extract_meta(raw)
    assert MessageMeta.from_bytes(meta.to_bytes()) == meta
    assert "{" in meta.envelope  # 8-bit subject is sent as a literal


def test_unparseable_date_and_missing_fields() -> None:
    meta = extract_meta(b"Date: someday soon\r\n\r\nhi\r\n")
    assert meta.date is None
    assert meta.subject is None
    assert meta.message_id is None
    assert meta.from_ == []
    assert meta.text == "hi"
    assert extract_meta(b"").envelope == "(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"


def test_parse_date() -> None:
    assert parse_date(b"Thu, 1 Jan 1970 00:00:00 +0000") == 0
    assert parse_date(b"1 Jan 1970 01:00:00 +0100") == 0
    assert parse_date(b"Sat, 01 Jan 2000 00:00:00 EST") == 946702800
    assert parse_date(b"") is None
    assert parse_date(b"99 Foo 99999999 99:99") is None


def test_decode_header() -> None:
    assert decode_header(b"=?utf-8?q?a_b?= =?utf-8?q?c?=") == "a bc"
    assert decode_header(b"=?utf-8?q?a?= x =?utf-8?q?b?=") == "a x b"
    assert decode_header(b"plain\n folded") == "plain folded"
    assert decode_header(b"=?x-unknown?q?caf=E9?=") == "café"
    assert decode_header(b"=?utf-8*en?b?w6k=?=") == "é"
    assert decode_header(b"raw \xc3\xa9 utf8") == "raw é utf8"
    assert decode_header(b"=?utf-8?b?broken") == "=?utf-8?b?broken"


def test_charset_that_is_not_a_charset() -> None:
    raw = b"Content-Type: text/plain; charset=zlib\r\n\r\ncaf\xc3\xa9\r\n"
    assert extract_meta(raw).text == "café"
    raw = b"Content-Type: text/plain; charset=unicode_escape\r\n\r\n\\x41\r\n"
    assert extract_meta(raw).text == "\\x41"


def test_text_cap() -> None:
    body = ("é" * (TEXT_CAP // 2 + 100)).encode()
    raw = b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + body
    text = extract_meta(raw).text
    assert len(text.encode()) <= TEXT_CAP
    assert len(text.encode()) > TEXT_CAP - 4


def test_html_to_text() -> None:
    assert html_to_text("<div>a</div><div>b<br>c</div>") == "a\n\nb\nc"
    assert html_to_text("<p>x &lt; y</p><!-- hidden -->") == "x < y"


@pytest.mark.skipif(not DOVECOT_REFERENCE.exists(), reason="corpora not present")
def test_meta_on_reference_corpus() -> None:
    for case in reference_cases():
        if not case.path.exists():
            continue
        meta = extract_meta(case.read_message())
        assert MessageMeta.from_bytes(meta.to_bytes()) == meta
        assert len(meta.text.encode("utf-8", "surrogatepass")) <= TEXT_CAP
