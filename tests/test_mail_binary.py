"""BINARY / BINARY.SIZE (RFC 3516) as Dovecot 2.3.19 answers them (checked live)."""

from __future__ import annotations

import pytest

from mailfort.mail import UnknownCTEError, binary_section, binary_size, parse_message
from mailfort.mail.section import InvalidPartDataError


def _msg(*parts: bytes, root_cte: bytes = b"") -> bytes:
    body = b"".join(b"--B\r\n" + p + b"\r\n" for p in parts)
    return (
        b"Subject: t\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n"
        + root_cte
        + b"\r\n"
        + body
        + b"--B--\r\n"
    )


TEXT = b"Content-Type: text/plain\r\n\r\nplain text"
B64 = b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\nAAECAwBmb28="
UUE = b"Content-Type: image/png\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nbegin 600 a\r\nend"


def test_unknown_cte_anywhere_fails_size_of_every_part() -> None:
    raw = _msg(TEXT, UUE)
    msg = parse_message(raw)
    for spec in ("", "1", "2"):
        with pytest.raises(UnknownCTEError) as exc:
            binary_size(msg, raw, spec)
        assert exc.value.code == "UNKNOWN-CTE"
    # BINARY[1] itself holds no unknown encoding.
    assert binary_section(msg, raw, "1") == b"plain text"


@pytest.mark.parametrize(
    "body",
    [b"AAEC!AwBm", b"=AAECAw", b"AA=ECAw", b"AAE=\r\nxx", b"AAECAw==AAAA"],
)
def test_invalid_base64_is_parse_error(body: bytes) -> None:
    raw = _msg(TEXT, B64.replace(b"AAECAwBmb28=", body))
    msg = parse_message(raw)
    with pytest.raises(InvalidPartDataError) as exc:
        binary_size(msg, raw, "1")
    assert exc.value.code == "PARSE"
    with pytest.raises(InvalidPartDataError):
        binary_section(msg, raw, "2")
    assert binary_section(msg, raw, "1") == b"plain text"


@pytest.mark.parametrize("body", [b"a=ZZb", b"a=4x", b"a=\tb", b"a\rb", b" " * 77 + b"x"])
def test_invalid_quoted_printable_is_parse_error(body: bytes) -> None:
    raw = _msg(b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + body)
    msg = parse_message(raw)
    with pytest.raises(InvalidPartDataError):
        binary_size(msg, raw, "1")


@pytest.mark.parametrize(
    ("body", "decoded"),
    [
        (b"a=3Db", b"a=b"),
        (b"a=3db", b"a=b"),
        (b"soft=\r\nbreak", b"softbreak"),
        (b"soft= \t\r\nbreak", b"softbreak"),
        (b"trailing  \r\nspace  ", b"trailing\r\nspace"),
        (b" " * 77 + b"\r\nx", b"\r\nx"),
    ],
)
def test_valid_quoted_printable(body: bytes, decoded: bytes) -> None:
    raw = _msg(b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + body)
    msg = parse_message(raw)
    assert binary_section(msg, raw, "1") == decoded
    assert binary_size(msg, raw, "1") == len(decoded)


def test_base64_whitespace_and_padding_accepted() -> None:
    raw = _msg(B64.replace(b"AAECAwBmb28=", b"AAEC\r\nAwBm b28= \r\n"))
    msg = parse_message(raw)
    assert binary_section(msg, raw, "1") == b"\0\1\2\3\0foo"
    assert binary_size(msg, raw, "1") == 8


def test_multipart_size_swaps_converted_parts() -> None:
    raw = _msg(TEXT, B64)
    msg = parse_message(raw)
    whole = binary_section(msg, raw, "")
    assert whole is not None
    assert binary_size(msg, raw, "") == len(whole)
    assert binary_size(msg, raw, "2") == 8


def test_converted_part_holding_parts_counts_its_header_only() -> None:
    # A message/rfc822 labelled base64: Dovecot's BINARY.SIZE counts its
    # body as 0 (mime4j base64encoded-rfc822message.msg: [] 146, [1] 0),
    # while BINARY[1] is the body as stored.
    raw = (
        b"MIME-Version: 1.0\r\nContent-Type: message/rfc822\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nU3ViamVjdDogeA0KDQpib2R5DQo=\r\n"
    )
    msg = parse_message(raw)
    assert binary_size(msg, raw, "1") == 0
    assert binary_size(msg, raw, "") == len(
        b"MIME-Version: 1.0\r\nContent-Type: message/rfc822\r\n"
        b"Content-Transfer-Encoding: binary\r\n\r\n"
    )
    assert binary_section(msg, raw, "1") == b"U3ViamVjdDogeA0KDQpib2R5DQo=\r\n"


def test_part_range_reaches_into_following_parts() -> None:
    # Dovecot bounds a part by its LF-stored offset plus its CRLF size, so a
    # multipart with many lines also swaps the sizes of the part after it.
    inner = (
        b"Content-Type: multipart/mixed; boundary=C\r\n\r\n"
        + b"--C\r\n"
        + TEXT
        + (b"\r\n" * 40)
        + b"\r\n--C--"
    )
    raw = _msg(inner, B64)
    msg = parse_message(raw)
    stored = msg.root.children[0].body_vsize
    b64 = msg.root.children[1]
    swapped = (
        stored
        - (b64.header_vsize + b64.body_vsize)
        + len(
            b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n"
        )
        + 8
    )
    assert binary_size(msg, raw, "1") == swapped


def test_missing_and_bad_specs() -> None:
    raw = _msg(TEXT)
    msg = parse_message(raw)
    assert binary_size(msg, raw, "9") == 0
    assert binary_size(msg, raw, "x") is None
