"""DKIM message splitting and canonicalisation (RFC 6376 §3.4, §5.4), byte for byte dkimpy's.

dkimpy's functions are the reference: they pass the conformance suites, and signers and
verifiers must agree on every byte hashed. Theirs cost ~0.55 ms per 5 KB message here,
mostly in ``re.sub`` calls that visit every space of the body (``[\\t ]+`` replaced by one
space matches each single space too) and in ``rfc822_parse`` splitting the whole body into
lines. The versions here return the same bytes but leave the common case (no tabs, no
runs of spaces, no trailing spaces, CRLF only) to C-level ``in``/``count``/``replace``.
``tests/test_auth_canon.py`` compares each with dkimpy's on the corpora and on
hypothesis-generated input.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

import dkim
from dkim.canonicalization import strip_trailing_lines

SIMPLE: Final = b"simple"
RELAXED: Final = b"relaxed"

_LINE_END = re.compile(rb"\r?\n")
# A line ending with CRLF where the split below treats every LF as one: an empty line, and
# the end of the message after a line end (dkimpy's split yields an empty last line there).
_BLANK_LINE = re.compile(rb"(?:\A|(?<=\n))(?:\r?\n|\Z)")
# dkimpy's ``([\x21-\x7e]+?):``: the shortest name of printable characters before a colon.
# A colon ends it except as its first character, so this is the same match with greedy
# runs of a class, which the regex engine scans in one loop instead of trying the colon
# after every character.
_HEADER_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+|:[\x21-\x39\x3b-\x7e]*):")
_TRAILING_WSP = re.compile(rb"[\t ]+\r\n")
# Runs of WSP that compressing to one space changes: all but a lone space. Replacing these
# with b" " is ``re.sub(b"[\t ]+", b" ", x)`` without a match (and a copy) per single space.
_WSP_TO_COMPRESS = re.compile(rb"\t[\t ]*| [\t ]+")
# dkimpy's RE_BTAG with its FWS, ``(?:(?:\s*\r?\n)?\s+)?``, written as ``\s*``: both match
# exactly the runs of white space, and every quantifier is greedy with nothing after it
# able to fail, so every match has the same extent. dkimpy's form backtracks on each
# character of b=, ~80 us per signature; tests compare the two on generated input.
# The value part, dkimpy's ``(?:\s*[a-zA-Z0-9+/=])*``, is the longest run of white space
# and base64 characters that ends in a base64 character: a greedy class run backed off to
# its last base64 character, one loop in the regex engine instead of a group repeated per
# character (~25 us for an RSA-2048 signature).
_BTAG = re.compile(rb"([;\s]b\s*=)(?:[\sa-zA-Z0-9+/=]*[a-zA-Z0-9+/=])?(?:\r?\n\Z)?")

Header = tuple[bytes, bytes]


def first_blank_lf(message: bytes) -> int:
    """Index of the first LF that a blank line follows (``\n\r?\n``), or -1."""
    crlf = message.find(b"\n\r\n")
    lf = message.find(b"\n\n", 0, crlf + 1 if crlf >= 0 else len(message))
    return lf if lf >= 0 else crlf


def blank_line(message: bytes) -> tuple[int, int] | None:
    """``_BLANK_LINE.search(message).span()`` by ``bytes.find`` (the regex tried every
    position of the message: ~25 µs on 5 KB).

    The blank line that ends the header section: at the start, after the first line end
    that another line end follows, or, failing both, at the very end after a final LF.
    """
    if message[:1] == b"\n":
        return 0, 1
    if message[:2] == b"\r\n":
        return 0, 2
    if not message:
        return 0, 0
    lf = first_blank_lf(message)
    if lf >= 0:
        start = lf + 1
        return start, start + (2 if message[start] == 0x0D else 1)
    if message[-1:] == b"\n":
        return len(message), len(message)
    return None


def rfc822_parse(message: bytes) -> tuple[list[Header], bytes]:
    """``dkim.rfc822_parse``: (header fields, body with CRLF line ends).

    Only the header section is split into lines; the body is converted as a whole, and not
    at all when it has CRLF line ends only. Raises ``dkim.MessageFormatError`` as dkimpy
    does, and IndexError where dkimpy does (a continuation line first).
    """
    blank = blank_line(message)
    if blank is None:
        lines = _split_lines(message)
        rest = None
    else:
        start, end = blank
        lines = _split_lines(message[:start])
        lines.pop()  # the part after the last line end of the header section: empty
        rest = message[end:] if end > start else None
    headers: list[list[bytes]] = []
    for line in lines:
        if line[0] in (0x09, 0x20):
            headers[-1][1] += line + b"\r\n"
        else:
            m = _HEADER_NAME.match(line)
            if m is not None:
                headers.append([m.group(1), line[m.end(0) :] + b"\r\n"])
            elif line.startswith(b"From "):
                pass
            else:
                raise dkim.MessageFormatError(  # dkimpy's text: "%s" of bytes is their repr
                    f"Unexpected characters in RFC822 header: {line!r}"
                )
    if rest is None:
        body = b""
    elif rest.count(b"\n") == rest.count(b"\r\n"):
        body = rest  # every LF already has its CR: joining the lines gives it back
    else:
        body = _LINE_END.sub(b"\r\n", rest)
    return [(n, v) for n, v in headers], body


def _split_lines(data: bytes) -> list[bytes]:
    """``_LINE_END.split(data)``. With CRLF line ends only (what SMTP delivers) that is a
    plain split, ten times faster than the regex trying every position."""
    if data.count(b"\n") == data.count(b"\r\n"):
        return data.split(b"\r\n")
    return _LINE_END.split(data)


# These two run on every header field. They test with find(), not ``in``: CPython 3.11's
# ``bytes in bytes`` first tries the operand as an integer and raises and clears a
# formatted TypeError each time (~2000 instructions).


def _compress(value: bytes) -> bytes:
    if value.find(b"\t") >= 0 or value.find(b"  ") >= 0:
        return _WSP_TO_COMPRESS.sub(b" ", value)
    return value


def _unfold(value: bytes) -> bytes:
    # re.sub(b"\r?\n", b"", v): every LF goes, and the CR right before each LF with it.
    if value.find(b"\n") >= 0:
        return value.replace(b"\r\n", b"").replace(b"\n", b"")
    return value


def relaxed_header(name: bytes, value: bytes) -> Header:
    """One field, dkimpy's Relaxed.canonicalize_headers (RFC 6376 §3.4.2)."""
    return name.lower().rstrip(), _compress(_unfold(value)).strip() + b"\r\n"


def canonicalize_headers(algorithm: bytes, headers: Sequence[Header]) -> list[Header]:
    if algorithm == RELAXED:
        return [relaxed_header(n, v) for n, v in headers]
    if algorithm == SIMPLE:
        return list(headers)
    raise ValueError(f"unknown canonicalization {algorithm!r}")


def canonicalize_body(algorithm: bytes, body: bytes) -> bytes:
    """dkimpy's Simple/Relaxed.canonicalize_body (RFC 6376 §3.4.3, §3.4.4)."""
    if algorithm == SIMPLE:
        return bytes(strip_trailing_lines(body))
    if algorithm != RELAXED:
        raise ValueError(f"unknown canonicalization {algorithm!r}")
    # Trailing WSP ends with a space or a tab right before CRLF: without either there is
    # nothing for the (slow, it tries every space) regex to remove.
    if b" \r\n" in body or b"\t\r\n" in body:
        body = _TRAILING_WSP.sub(b"\r\n", body)
    body = bytes(strip_trailing_lines(_compress(body)))
    return b"" if body == b"\r\n" else body


def select_headers(
    headers: Sequence[Header], names: Sequence[bytes], include: Sequence[bytes]
) -> list[Header]:
    """``dkim.select_headers`` with the lower-cased names worked out once (``names``):
    for each name signed, the next instance upwards from the bottom (RFC 6376 §5.4.2)."""
    selected = []
    last: dict[bytes, int] = {}
    for h in include:
        i = last.get(h, len(headers))
        while i > 0:
            i -= 1
            if names[i] == h:
                selected.append(headers[i])
                break
        last[h] = i
    return selected


def strip_b_tag(value: bytes) -> bytes:
    """The signature field value with b='s value removed (RFC 6376 §3.7), as dkimpy."""
    return _BTAG.sub(rb"\1", value)


def signed_header_data(
    algorithm: bytes,
    headers: Sequence[Header],
    names: Sequence[bytes],
    include: Sequence[bytes],
    sig_header: Header,
) -> list[bytes]:
    """The pieces ``dkim.hash_headers`` feeds the hash, in order.

    ``headers`` are the message's fields already canonicalised with ``algorithm`` and
    ``names`` their lower-cased names. The signature field goes last, its b= value
    removed and no CRLF after it (RFC 6376 §3.7).
    """
    out: list[bytes] = []
    for name, value in select_headers(headers, names, include):
        out += (name, b":", value)
    stripped = strip_b_tag(sig_header[1])
    if algorithm == RELAXED:
        name, value = relaxed_header(sig_header[0], stripped)
    elif algorithm == SIMPLE:
        name, value = sig_header[0], stripped
    else:
        raise ValueError(f"unknown canonicalization {algorithm!r}")
    out += (name, b":", value.rstrip())
    return out


__all__ = [
    "RELAXED",
    "SIMPLE",
    "canonicalize_body",
    "canonicalize_headers",
    "relaxed_header",
    "rfc822_parse",
    "select_headers",
    "signed_header_data",
    "strip_b_tag",
]
