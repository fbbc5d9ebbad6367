"""FETCH BODY[section], partials and BINARY (RFC 9051 §6.4.5, RFC 3516)."""

from __future__ import annotations

import re

import pytest

from mailfort.mail import (
    ParsedMessage,
    SectionSpec,
    UnknownCTEError,
    apply_partial,
    binary_section,
    binary_size,
    bodystructure,
    parse_message,
    parse_partial,
    parse_section,
    section,
    to_crlf,
    to_wire,
)

from corpora import DOVECOT_REFERENCE, ReferenceCase, reference_cases

CASES = reference_cases() if DOVECOT_REFERENCE.exists() else []
needs_corpora = pytest.mark.skipif(not CASES, reason="corpora not present")


@pytest.fixture(scope="module")
def torture() -> tuple[ParsedMessage, bytes]:
    if not CASES:
        pytest.skip("corpora not present")
    raw = to_crlf(CASES[0].read_message())
    return parse_message(raw), raw


# --- sizes agree with BODYSTRUCTURE, part by part ---------------------------

_TOKEN = re.compile(rb'\s*(?:(\()|(\))|("(?:[^"\\]|\\.)*")|\{(\d+)\}\r\n|([^\s()"{]+))', re.S)


def _sexp(data: bytes) -> object:
    stack: list[list[object]] = [[]]
    pos = 0
    while True:
        m = _TOKEN.match(data, pos)
        if m is None:
            break
        pos = m.end()
        if m.group(1):
            stack.append([])
        elif m.group(2):
            done = stack.pop()
            stack[-1].append(done)
        elif m.group(4) is not None:
            n = int(m.group(4))
            stack[-1].append(data[pos : pos + n])
            pos += n
        else:
            tok = m.group(0).strip()
            stack[-1].append(tok[1:-1] if tok.startswith(b'"') else tok)
    return stack[0][0]


def _check_node(msg: ParsedMessage, raw: bytes, node: list[object], path: str) -> int:
    """Compare section lengths with the sizes in a BODYSTRUCTURE node."""
    checked = 0
    if isinstance(node[0], list):
        k = 0
        while isinstance(node[k], list):
            child = node[k]
            assert isinstance(child, list)
            checked += _check_node(msg, raw, child, f"{path}.{k + 1}" if path else str(k + 1))
            k += 1
        return checked
    size = int(node[6])  # type: ignore[call-overload]
    sect = path or "1"
    data = section(msg, raw, sect)
    assert data is not None
    assert len(data) == size, sect
    mime = section(msg, raw, f"{sect}.MIME") if path else b""
    assert mime is not None
    typ = bytes(node[0]).lower()  # type: ignore[arg-type]
    sub = bytes(node[1]).lower()  # type: ignore[arg-type]
    if typ == b"text":
        assert data.count(b"\n") == int(node[7])  # type: ignore[call-overload]
    elif typ == b"message" and sub == b"rfc822":
        header = section(msg, raw, f"{sect}.HEADER")
        text = section(msg, raw, f"{sect}.TEXT")
        assert header is not None and text is not None
        # Usually equal; when a boundary cuts the inner message's header
        # short, that header's last line break belongs to the boundary, as in
        # Dovecot, and the part is longer by it.
        assert data in (header + text, header + text + b"\r\n")
        inner = node[8]
        assert isinstance(inner, list)
        if isinstance(inner[0], list):
            checked += _check_node(msg, raw, inner, sect)
        else:
            checked += _check_node(msg, raw, inner, f"{sect}.1")
    return checked + 1


@needs_corpora
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_section_sizes_match_bodystructure(case: ReferenceCase) -> None:
    # Our BODYSTRUCTURE equals Dovecot's (test_mail_dovecot_reference), so
    # its sizes are Dovecot's: every section we cut must have that length.
    if not case.path.exists():
        pytest.skip("message not available")
    raw = to_crlf(case.read_message())
    msg = parse_message(raw)
    whole = section(msg, raw, "")
    assert whole == raw.replace(b"\0", b"\x80")
    assert len(raw) == msg.size
    head, text = section(msg, raw, "HEADER"), section(msg, raw, "TEXT")
    assert head is not None and text is not None
    assert head + text == whole
    node = _sexp(to_wire(bodystructure(msg)))
    assert isinstance(node, list)
    assert _check_node(msg, raw, node, "") >= 1


def test_torture_nested_message_sections(torture: tuple[ParsedMessage, bytes]) -> None:
    msg, raw = torture
    assert section(msg, raw, "2.MIME") == (
        b"Content-Type: MESSAGE/RFC822\r\nContent-Description: Rich Text demo\r\n\r\n"
    )
    assert section(msg, raw, "2.HEADER.FIELDS (subject)") == (
        b"Subject: Re: a MIME-Version misfeature\r\n\r\n"
    )
    hdr = section(msg, raw, "2.HEADER")
    assert hdr is not None and hdr.startswith(b"Received: from dimacs.rutgers.edu")
    # 2 is message/rfc822 holding multipart/alternative: 2.1 is its text/plain.
    p21 = section(msg, raw, "2.1")
    assert p21 is not None and p21.startswith(b"I have no problem with changing the BNF")
    assert len(p21) == 767
    assert section(msg, raw, "2.2.1.MIME") == (
        b"Content-type: text/richtext\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    )
    # A part that is no message/rfc822 has no HEADER/TEXT; a missing part is "".
    assert section(msg, raw, "1.HEADER") == b""
    assert section(msg, raw, "1.TEXT") == b""
    assert section(msg, raw, "99") == b""
    assert section(msg, raw, "2.9.9") == b""


def test_torture_top_level_headers(torture: tuple[ParsedMessage, bytes]) -> None:
    msg, raw = torture
    assert section(msg, raw, "HEADER.FIELDS (Subject FROM)") == (
        b"From: Mark Crispin <mrc@CAC.Washington.EDU>\r\n"
        b"Subject: Multi-media mail demonstration \r\n\r\n"
    )
    assert section(msg, raw, 'HEADER.FIELDS ("subject")') == (
        b"Subject: Multi-media mail demonstration \r\n\r\n"
    )
    not_fields = section(
        msg,
        raw,
        "HEADER.FIELDS.NOT (Date From To Subject Message-Id "
        "Mime-Version Content-Type Status X-Status X-Keywords)",
    )
    assert not_fields == b"X-UID: 1\r\n\r\n"
    assert section(msg, raw, "HEADER.FIELDS (X-None)") == b"\r\n"


def test_invalid_specs(torture: tuple[ParsedMessage, bytes]) -> None:
    msg, raw = torture
    for bad in (
        "MIME",
        "BOGUS",
        "1.",
        "0",
        "1..2",
        "HEADER.FIELDS",
        "HEADER.FIELDS ()",
        "1.2X",
        "HEADER.FIELDS (a",
        "TEXT.1",
    ):
        assert section(msg, raw, bad) is None, bad
    assert parse_section("1.2.header.fields (From To)") == SectionSpec(
        "1.2", "HEADER.FIELDS", (b"from", b"to")
    )
    assert parse_section("") == SectionSpec("", "")


MULTI = (
    b"From: a@example.org\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=XX\r\n\r\npreamble\r\n"
    b"--XX\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    b"caf=E9 =\r\nsoft break=3D\r\n"
    b"--XX\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nAAECAwBmb28=\r\n"
    b"--XX\r\nContent-Type: text/plain\r\n\r\nnul:\0:here\r\n"
    b"--XX\r\nContent-Type: message/rfc822\r\n\r\n"
    b"Subject: inner\r\nX-Folded: a\r\n b\r\n\r\ninner body\r\n"
    b"--XX--\r\nepilogue\r\n"
)


def test_binary_decodes_and_sizes() -> None:
    msg = parse_message(MULTI)
    assert binary_section(msg, MULTI, "1") == b"caf\xe9 soft break="
    assert binary_section(msg, MULTI, "2") == b"\0\1\2\3\0foo"
    assert binary_size(msg, MULTI, "2") == 8
    # NULs stay in BINARY, become 0x80 in BODY (RFC 9051 §4.3).
    assert binary_section(msg, MULTI, "3") == b"nul:\0:here"
    assert section(msg, MULTI, "3") == b"nul:\x80:here"
    assert binary_section(msg, MULTI, "9") == b""
    assert binary_section(msg, MULTI, "x") is None


def test_binary_whole_message_announces_binary_cte() -> None:
    msg = parse_message(MULTI)
    whole = binary_section(msg, MULTI, "")
    assert whole is not None
    assert b"Content-Transfer-Encoding: quoted-printable" not in whole
    assert whole.count(b"Content-Transfer-Encoding: binary\r\n\r\n") == 2
    assert b"caf\xe9 soft break=\r\n--XX\r\n" in whole
    assert whole.startswith(MULTI[: MULTI.index(b"preamble")])
    assert whole.endswith(b"--XX--\r\nepilogue\r\n")


def test_unknown_cte() -> None:
    raw = b"Content-Type: text/plain\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nbegin\r\n"
    msg = parse_message(raw)
    with pytest.raises(UnknownCTEError):
        binary_section(msg, raw, "1")
    with pytest.raises(UnknownCTEError):
        binary_size(msg, raw, "")
    assert section(msg, raw, "1") == b"begin\r\n"


def test_nested_header_fields_keep_folding() -> None:
    msg = parse_message(MULTI)
    assert section(msg, MULTI, "4.HEADER.FIELDS (x-folded)") == b"X-Folded: a\r\n b\r\n\r\n"
    assert section(msg, MULTI, "4.HEADER.FIELDS.NOT (x-folded)") == b"Subject: inner\r\n\r\n"
    assert section(msg, MULTI, "4.TEXT") == b"inner body"
    assert section(msg, MULTI, "4.1") == b"inner body"


def test_partial() -> None:
    assert parse_partial("<0.10>") == (0, 10)
    assert parse_partial("<5>") == (5, None)
    assert parse_partial("<x.1>") is None
    data = b"0123456789"
    assert apply_partial(data, 2, 3) == b"234"
    assert apply_partial(data, 8, 100) == b"89"
    assert apply_partial(data, 10, 1) == b""
    assert apply_partial(data, 3) == b"3456789"


def test_bare_lf_input_is_served_with_crlf() -> None:
    raw = b"Subject: lf\n\nline 1\nline 2\n"
    msg = parse_message(raw)
    assert msg.size == len(to_crlf(raw))
    assert section(msg, raw, "") == to_crlf(raw)
    assert section(msg, raw, "TEXT") == b"line 1\r\nline 2\r\n"
