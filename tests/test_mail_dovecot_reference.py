"""RFC822.SIZE, ENVELOPE and BODYSTRUCTURE must equal Dovecot 2.3.19's.

Every message of the recorded reference is checked byte for byte (after the
recorder's own transformations, see tests/corpora.py). Where Dovecot's answer
is arguably wrong we still match it, because IMAP clients are tested against
Dovecot; the cases we know of:

- mime4j double-semicolon.msg: `multipart/alternative;; boundary="foo"` -
  Dovecot's parameter parser gives up after the empty parameter, finds no
  boundary and reports a multipart with one empty text/plain part.
- mime4j very-long-boundary.msg: boundaries are cut to 80 characters, so
  lines that merely share the first 80 characters split the body.
- mime4j hdr-fakeout.msg and other single text/plain us-ascii 7bit messages:
  the BODYSTRUCTURE is the canonical lower-case one whatever the header case
  ("7BIT" is answered as "7bit"), because Dovecot caches such messages as a
  flag.
- base64-encoded message/rfc822 (mime4j multi-2gifs-base64.msg and others):
  parsed without decoding (RFC 2046 §5.2.1 forbids that encoding there).
"""

from __future__ import annotations

import re

import pytest

from mailfort.mail import body, bodystructure, envelope, parse_message, to_crlf, to_wire

from corpora import DOVECOT_REFERENCE, ReferenceCase, reference_cases

pytestmark = pytest.mark.skipif(not DOVECOT_REFERENCE.exists(), reason="corpora not present")

_LITERAL = re.compile(rb"\{(\d+)\}\r\n")


def recorder_form(wire: bytes) -> str:
    """Our wire bytes as the reference recorder wrote Dovecot's.

    The recorder used imaplib: each literal shows as "{N}" + its bytes + a
    newline, and the response was decoded as UTF-8 with replacement.
    """
    out = bytearray()
    i = 0
    while True:
        m = _LITERAL.search(wire, i)
        if m is None:
            out += wire[i:]
            break
        n = int(m.group(1))
        out += wire[i : m.start()] + b"{%d}" % n + wire[m.end() : m.end() + n] + b"\n"
        i = m.end() + n
    return out.decode("utf-8", "replace")


def fetch_response(seq: int, raw: bytes) -> str:
    msg = parse_message(to_crlf(raw))
    wire = b"%d (RFC822.SIZE %d ENVELOPE %s BODYSTRUCTURE %s)" % (
        seq,
        msg.size,
        to_wire(envelope(msg)),
        to_wire(bodystructure(msg)),
    )
    return recorder_form(wire)


CASES = reference_cases() if DOVECOT_REFERENCE.exists() else []


def test_reference_is_complete() -> None:
    # 1 torture test + 80 mime4j + 107 Stalwart + 48 CPython messages.
    assert len(CASES) == 236


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_matches_dovecot(case: ReferenceCase) -> None:
    if not case.path.exists():
        pytest.skip(f"{case.path} not available (CPython test data ships with the interpreter)")
    seq = int(case.expected.split(" ", 1)[0])
    assert fetch_response(seq, case.read_message()) == case.expected


# --- BODY must be BODYSTRUCTURE without extension data (RFC 9051 §7.5.2) ---

_TOKEN = re.compile(rb'\s*(?:(\()|(\))|("(?:[^"\\]|\\.)*")|\{(\d+)\}\r\n|([^\s()"{]+))', re.S)


def _parse_sexp(data: bytes) -> list[object]:
    stack: list[list[object]] = [[]]
    pos = 0
    while pos < len(data):
        m = _TOKEN.match(data, pos)
        if m is None:
            if data[pos:].strip():
                raise ValueError(data[pos : pos + 40])
            break
        pos = m.end()
        if m.group(1):
            stack.append([])
        elif m.group(2):
            done = stack.pop()
            stack[-1].append(done)
        elif m.group(4) is not None:
            n = int(m.group(4))
            stack[-1].append(m.group(0).lstrip() + data[pos : pos + n])
            pos += n
        else:
            stack[-1].append(m.group(0).strip())
    return stack[0]


def _serialise(x: object) -> bytes:
    if isinstance(x, list):
        return b"(" + b" ".join(_serialise(i) for i in x) + b")"
    assert isinstance(x, bytes)
    return x


def _strip_extensions(node: list[object]) -> list[object]:
    if isinstance(node[0], list):  # multipart: parts..., subtype, extensions
        k = 0
        kids: list[object] = []
        while isinstance(node[k], list):
            child = node[k]
            assert isinstance(child, list)
            kids.append(_strip_extensions(child))
            k += 1
        return [*kids, node[k]]
    typ = node[0].lower() if isinstance(node[0], bytes) else b""
    sub = node[1].lower() if isinstance(node[1], bytes) else b""
    basic = node[:7]
    if typ == b'"message"' and sub == b'"rfc822"':
        inner = node[8]
        assert isinstance(inner, list)
        return [*basic, node[7], _strip_extensions(inner), node[9]]
    if typ == b'"text"':
        return [*basic, node[7]]
    return basic


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_body_is_bodystructure_without_extensions(case: ReferenceCase) -> None:
    if not case.path.exists():
        pytest.skip("message not available")
    msg = parse_message(to_crlf(case.read_message()))
    full = _parse_sexp(to_wire(bodystructure(msg)))[0]
    plain = _parse_sexp(to_wire(body(msg)))[0]
    assert isinstance(full, list)
    assert _serialise(_strip_extensions(full)) == _serialise(plain)
