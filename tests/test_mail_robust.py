"""Nothing in mailfort.mail raises on any input, and the tree stays sound.

Hypothesis feeds random bytes, MIME-flavoured byte soup and mutated corpus
messages through every entry point and checks the structural invariants the
store relies on (part ranges nest and tile the message, sizes are CRLF
lengths, the rendered BODYSTRUCTURE is well-formed IMAP).
"""

from __future__ import annotations

import contextlib
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailfort.mail import (
    Flags,
    MessageMeta,
    ParsedMessage,
    Part,
    UnknownCTEError,
    binary_section,
    body,
    bodystructure,
    envelope,
    extract_meta,
    parse_message,
    section,
    to_crlf,
    to_wire,
)

from corpora import DOVECOT_REFERENCE, reference_cases

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

_FRAGMENTS = [
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b"\t",
    b":",
    b";",
    b"=",
    b'"',
    b"\\",
    b"(",
    b")",
    b"<",
    b">",
    b"@",
    b",",
    b"--",
    b"--b",
    b"--b--",
    b"--bb",
    b"\0",
    b"\xff",
    b"\xc3\xa9",
    b"=?utf-8?q?x?=",
    b"Content-Type: multipart/mixed; boundary=b",
    b"Content-Type: multipart/digest; boundary=bb",
    b"Content-Type: message/rfc822",
    b"Content-Type: text/plain; charset*0*=utf-8''a; charset*1=b",
    b"Content-Transfer-Encoding: base64",
    b"Content-Transfer-Encoding: quoted-printable",
    b'Content-Disposition: attachment; filename="a b"',
    b"Content-Language: en, de",
    b"MIME-Version: 1.0",
    b"From: A <a@b>, g: c@d;",
    b"Subject: x",
    b"To: <@r:x@y>",
    b"Date: Mon, 1 Jan 2001 00:00:00 +0000",
    b"X: y\r\n z",
]
soup = st.lists(st.sampled_from(_FRAGMENTS) | st.binary(max_size=8), max_size=80).map(b"".join)

_TOKEN = re.compile(rb'\s*(?:(\()|(\))|("(?:[^"\\\r\n]|\\["\\])*")|\{(\d+)\}\r\n|(NIL|\d+))')


def assert_wellformed(text: str) -> None:
    """Balanced lists of quoted strings, literals, NIL and numbers."""
    data = to_wire(text)
    depth = 0
    pos = 0
    while pos < len(data):
        m = _TOKEN.match(data, pos)
        assert m is not None, data[pos : pos + 40]
        pos = m.end()
        if m.group(1):
            depth += 1
        elif m.group(2):
            depth -= 1
            assert depth >= 0
        elif m.group(4) is not None:
            pos += int(m.group(4))
            assert pos <= len(data)
    assert depth == 0


def section_paths(root: Part) -> list[str]:
    """IMAP section numbers of every part (RFC 9051 §6.4.5)."""
    paths: list[str] = []

    def below(part: Part, path: str) -> None:
        # `path` numbers `part`; "" only for a multipart top level.
        if part.flags & Flags.MULTIPART:
            for i, child in enumerate(part.children, 1):
                p = f"{path}.{i}" if path else str(i)
                paths.append(p)
                below(child, p)
        elif part.flags & Flags.MESSAGE_RFC822 and part.children:
            inner = part.children[0]
            if inner.flags & Flags.MULTIPART:
                below(inner, path)
            else:
                paths.append(f"{path}.1")
                below(inner, f"{path}.1")

    if root.flags & Flags.MULTIPART:
        below(root, "")
    else:
        paths.append("1")
        below(root, "1")
    return paths


def check_tree(msg: ParsedMessage, raw: bytes) -> None:
    root = msg.root
    assert root.offset == 0 and root.end == len(raw)
    assert msg.size == len(to_crlf(raw))
    for p in root.walk():
        assert p.offset <= p.header_end <= p.end
        assert p.header_vsize + p.body_vsize >= p.end - p.offset
        pos = p.header_end
        for c in p.children:
            assert c.parent is p
            assert pos <= c.offset and c.end <= p.end
            pos = c.end
        if p.flags & Flags.MESSAGE_RFC822:
            assert len(p.children) == 1 and p.children[0].offset == p.header_end


def exercise(raw: bytes) -> None:
    msg = parse_message(raw)
    check_tree(msg, raw)
    for text in (envelope(msg), bodystructure(msg), body(msg)):
        assert_wellformed(text)
    specs = ["", "HEADER", "TEXT", "HEADER.FIELDS (From Subject)", "HEADER.FIELDS.NOT (To)"]
    for path in section_paths(msg.root)[:30]:
        specs += [path, f"{path}.MIME", f"{path}.HEADER", f"{path}.TEXT"]
    for spec in specs:
        data = section(msg, raw, spec)
        assert data is not None and b"\0" not in data
    for path in ["", *section_paths(msg.root)[:10]]:
        with contextlib.suppress(UnknownCTEError):
            assert binary_section(msg, raw, path) is not None
    meta = extract_meta(raw)
    assert MessageMeta.from_bytes(meta.to_bytes()) == meta


@SETTINGS
@given(st.binary(max_size=3000))
def test_random_bytes(raw: bytes) -> None:
    exercise(raw)


@SETTINGS
@given(soup)
def test_mime_soup(raw: bytes) -> None:
    exercise(raw)


_SMALL = (
    [
        c.read_message()
        for c in reference_cases()
        if c.path.exists() and c.path.stat().st_size < 20_000
    ]
    if DOVECOT_REFERENCE.exists()
    else []
)
_SMALL = _SMALL or [b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n"]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_SMALL)))
    for _ in range(draw(st.integers(1, 6))):
        n = len(data)
        i = draw(st.integers(0, n))
        j = draw(st.integers(i, min(n, i + 200)))
        op = draw(st.sampled_from(["delete", "insert", "flip", "dup", "truncate"]))
        if op == "delete":
            del data[i:j]
        elif op == "insert":
            data[i:i] = draw(st.sampled_from(_FRAGMENTS))
        elif op == "flip" and i < n:
            data[i] = draw(st.integers(0, 255))
        elif op == "dup":
            data[j:j] = data[i:j]
        elif op == "truncate":
            del data[i:]
    return bytes(data)


@SETTINGS
@given(mutated())
def test_mutated_corpus(raw: bytes) -> None:
    exercise(raw)


def test_deep_nesting_is_bounded() -> None:
    # 200 nested multiparts: the parser stops nesting at 100 (Dovecot's
    # limit) instead of recursing without end.
    raw = (
        b"".join(
            b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
            for i in range(200)
        )
        + b"\r\nend\r\n"
    )
    msg = parse_message(raw)
    depth = 0
    part = msg.root
    while part.children:
        part = part.children[0]
        depth += 1
    assert depth < 100
    exercise(raw)


def test_deep_message_nesting_is_bounded() -> None:
    raw = b"Content-Type: message/rfc822\r\n\r\n" * 300 + b"body\r\n"
    exercise(raw)
    assert_wellformed(bodystructure(parse_message(raw)))
