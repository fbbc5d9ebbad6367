"""FETCH BODY[section], partial fetches and BINARY (RFC 9051 §6.4.5, RFC 3516).

Sections are cut from the stored message by the offsets the parser recorded,
the way Dovecot's `imap-msgpart.c` resolves them:

- `[]` the whole message, `[HEADER]`, `[TEXT]`, `[HEADER.FIELDS (..)]` and
  `[HEADER.FIELDS.NOT (..)]` of the top-level message;
- `[N]` the body of part N, `[N.MIME]` its MIME header;
- `[N.HEADER]`, `[N.TEXT]`, `[N.HEADER.FIELDS ...]` for a message/rfc822 part
  N: the header/body of the message inside it (an empty string otherwise).

Output always has CRLF line ends and NULs turned into 0x80, since IMAP
literals may not hold NUL (RFC 9051 §4.3); BINARY keeps NULs.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator
from dataclasses import dataclass

from ._codec import decode_base64, decode_qp
from ._rfc822 import Parser
from .parser import Flags, ParsedMessage, Part, find_part, read_header

_BARE_LF = re.compile(rb"(?<!\r)\n")
_CRLF = re.compile(rb"\r\n")
_SECTION_PART = re.compile(r"[1-9][0-9]*(?:\.[1-9][0-9]*)*")
_PARTIAL = re.compile(r"<(\d+)(?:\.(\d+))?>")
# RFC 9051 §9 header-fld-name = astring: atoms or quoted strings.
_FIELD = re.compile(r'"((?:[^"\\]|\\.)*)"|([^\s()"]+)')


class UnknownCTEError(ValueError):
    """A part's Content-Transfer-Encoding can't be decoded for BINARY.

    The server answers `NO [UNKNOWN-CTE]` (RFC 3516 §4.3); `code` and `text`
    are that response code and text.
    """

    code = "UNKNOWN-CTE"
    text = "Unknown Content-Transfer-Encoding"


class InvalidPartDataError(UnknownCTEError):
    """A part's content isn't valid base64 or quoted-printable.

    Dovecot answers BINARY of it `NO [PARSE] Invalid data in MIME part`. A
    subclass of UnknownCTEError so that every handler of "BINARY can't be
    served" catches it; `code` tells the two apart.
    """

    code = "PARSE"
    text = "Invalid data in MIME part"


@dataclass(frozen=True, slots=True)
class SectionSpec:
    """A parsed `section` (the text between "[" and "]")."""

    part: str  # "" for the whole message, else "1.2.3"
    kind: str  # "", "MIME", "HEADER", "TEXT", "HEADER.FIELDS", "HEADER.FIELDS.NOT"
    fields: tuple[bytes, ...] = ()


def parse_section(spec: str) -> SectionSpec | None:
    """Parse a section spec like `1.2.HEADER.FIELDS (From To)`; None if bad."""
    spec = spec.strip()
    m = _SECTION_PART.match(spec)
    part = ""
    rest = spec
    if m:
        part = m.group(0)
        rest = spec[m.end() :]
        if rest:
            if not rest.startswith("."):
                return None
            rest = rest[1:]
            if not rest:
                return None
    upper = rest.upper()
    if not rest:
        return SectionSpec(part, "")
    if upper in ("MIME", "HEADER", "TEXT"):
        if upper == "MIME" and not part:
            return None
        return SectionSpec(part, upper)
    for kind in ("HEADER.FIELDS.NOT", "HEADER.FIELDS"):
        if upper.startswith(kind):
            lst = rest[len(kind) :].strip()
            if not (lst.startswith("(") and lst.endswith(")")):
                return None
            inner = lst[1:-1]
            names: list[bytes] = []
            pos = 0
            for fm in _FIELD.finditer(inner):
                if inner[pos : fm.start()].strip():
                    return None
                pos = fm.end()
                raw_name = fm.group(1) if fm.group(1) is not None else fm.group(2)
                if fm.group(1) is not None:
                    raw_name = re.sub(r"\\(.)", r"\1", raw_name)
                names.append(raw_name.encode("utf-8", "surrogateescape").lower())
            if inner[pos:].strip() or not names:
                return None
            return SectionSpec(part, kind, tuple(names))
    return None


def parse_partial(text: str) -> tuple[int, int | None] | None:
    """`<origin.count>` (RFC 9051 §6.4.5) to (origin, count); None if bad."""
    m = _PARTIAL.fullmatch(text.strip())
    if not m:
        return None
    count = int(m.group(2)) if m.group(2) is not None else None
    return int(m.group(1)), count


def apply_partial(data: bytes, origin: int, count: int | None = None) -> bytes:
    """The `<origin.count>` slice of a section; empty past its end."""
    if origin >= len(data):
        return b""
    return data[origin:] if count is None else data[origin : origin + count]


def _crlf(data: bytes) -> bytes:
    return _BARE_LF.sub(b"\r\n", data) if b"\n" in data else data


def _literal_safe(data: bytes) -> bytes:
    data = _crlf(data)
    return data.replace(b"\0", b"\x80") if b"\0" in data else data


def _filter_header(
    raw: bytes, part: Part, names: tuple[bytes, ...], exclude: bool, add_missing_eoh: bool
) -> bytes:
    wanted = set(names)
    out = bytearray()
    pos, end = part.offset, part.header_end
    saw_eoh = False
    while pos < end:
        hdr, nxt, _ = read_header(raw, pos, end)
        if hdr is None:
            saw_eoh = nxt != pos
            break
        if (hdr.lname in wanted and bool(hdr.name)) != exclude:
            line = raw[hdr.start : hdr.end]
            out += line if line.endswith(b"\n") else line + b"\r\n"
        pos = nxt
    if saw_eoh or add_missing_eoh:
        out += b"\r\n"
    return bytes(out)


def _resolve(msg: ParsedMessage, spec: SectionSpec) -> Part | None:
    part = find_part(msg.root, spec.part) if spec.part else msg.root
    if part is None:
        return None
    if spec.part and spec.kind not in ("", "MIME"):
        # HEADER/TEXT of a part are those of the message it encapsulates.
        if not part.flags & Flags.MESSAGE_RFC822 or not part.children:
            return None
        part = part.children[0]
    return part


def section(msg: ParsedMessage, raw: bytes, spec: str | SectionSpec) -> bytes | None:
    """The bytes of `BODY[spec]`, or None if `spec` is not a valid section.

    A section naming a part that doesn't exist gives b"" (Dovecot answers an
    empty string rather than an error).
    """
    s = parse_section(spec) if isinstance(spec, str) else spec
    if s is None:
        return None
    part = _resolve(msg, s)
    if part is None:
        return b""
    kind = s.kind
    if kind == "" and not s.part:
        data = raw[part.offset : part.end]
    elif kind in ("", "TEXT"):
        data = raw[part.header_end : part.end]
    elif kind in ("MIME", "HEADER"):
        data = raw[part.offset : part.header_end]
    else:
        data = _filter_header(
            raw,
            part,
            s.fields,
            kind == "HEADER.FIELDS.NOT",
            add_missing_eoh=kind == "HEADER.FIELDS" and not s.part,
        )
    return _literal_safe(data)


def section_size(msg: ParsedMessage, raw: bytes, spec: str | SectionSpec) -> int | None:
    data = section(msg, raw, spec)
    return None if data is None else len(data)


# --- BINARY (RFC 3516) ------------------------------------------------------

CTE_78BIT, CTE_BINARY, CTE_QP, CTE_BASE64, CTE_UNKNOWN = range(5)


def parse_cte(value: bytes) -> int:
    """Classify a Content-Transfer-Encoding value as Dovecot's decoder does."""
    p = Parser(value)
    p.skip_lwsp()
    tok = bytearray()
    if p.parse_mime_token(tok) == 1:
        p.skip_lwsp()
        # Parameters aren't allowed (RFC 2045 §6.1) but a ";" is tolerated.
        if p.peek() != 0x3B:
            return CTE_UNKNOWN
    t = bytes(tok).lower()
    if t in (b"7bit", b"8bit"):
        return CTE_78BIT
    if t == b"binary":
        return CTE_BINARY
    if t == b"quoted-printable":
        return CTE_QP
    if t == b"base64":
        return CTE_BASE64
    return CTE_UNKNOWN


def part_cte(raw: bytes, part: Part) -> int:
    cte = CTE_78BIT
    pos, end = part.offset, part.header_end
    while pos < end:
        hdr, pos, _ = read_header(raw, pos, end)
        if hdr is None:
            break
        if hdr.lname == b"content-transfer-encoding":
            cte = parse_cte(hdr.value)  # the last one counts here, as in Dovecot
    return cte


# Strict checks of an encoded body, as Dovecot's decoding streams fail with
# EINVAL ("Invalid data in MIME part"). Input that merely ends too early (a
# quoted-printable "=" trailer, base64 without its padding) fails there with
# EPIPE instead, which Dovecot doesn't answer cleanly (it drops the
# connection); such bodies are decoded leniently here.
#
# quoted-printable: "=" must start "=XX" (hex, either case) or a soft line
# break (optional spaces/tabs, then [CR]LF); a CR must start CRLF; a run of
# more than 76 spaces/tabs must end the line.
_QP_BAD = re.compile(
    rb"=(?![0-9A-Fa-f]{2}|[ \t]*\r?\n|[ \t]*\r?\Z|[0-9A-Fa-f]\Z)"
    rb"|\r(?!\n|\Z)"
    rb"|[ \t]{77,}(?=[^ \t\r\n])"
)
# base64: the alphabet and whitespace, then optionally the padding.
_B64_DATA = re.compile(rb"[A-Za-z0-9+/ \t\r\n]*")
_B64_ALPHABET = re.compile(rb"[A-Za-z0-9+/]")
_B64_WS = re.compile(rb"[ \t\r\n]*")


def _base64_valid(body: bytes) -> bool:
    m = _B64_DATA.match(body)
    end = m.end() if m else 0
    if end == len(body):
        return True
    if body[end] != 0x3D:  # "="
        return False
    quantum = len(_B64_ALPHABET.findall(body, 0, end)) % 4
    if quantum < 2:  # no padding can follow 0 or 1 characters of a quantum
        return False
    pos = end + 1
    if quantum == 2:  # "==", whitespace allowed in between
        ws = _B64_WS.match(body, pos)
        pos = ws.end() if ws else pos
        if pos == len(body):
            return True  # ends early (EPIPE), not invalid
        if body[pos] != 0x3D:
            return False
        pos += 1
    ws = _B64_WS.match(body, pos)
    return (ws.end() if ws else pos) == len(body)


def _decode_body(body: bytes, cte: int, strict: bool = True) -> bytes:
    """A quoted-printable or base64 body decoded; if `strict`,
    InvalidPartDataError when it holds what Dovecot's decoders reject."""
    if cte == CTE_QP:
        if strict and _QP_BAD.search(body):
            raise InvalidPartDataError("invalid quoted-printable data")
        return decode_qp(body)
    if strict and not _base64_valid(body):
        raise InvalidPartDataError("invalid base64 data")
    return decode_base64(body)


def _binary_header(raw: bytes, part: Part) -> bytes:
    """The header of a decoded part: its Content-Transfer-Encoding fields
    replaced by "binary" (RFC 3516 §4.2)."""
    out = bytearray()
    pos, end = part.offset, part.header_end
    while pos < end:
        hdr, nxt, _ = read_header(raw, pos, end)
        if hdr is None:
            if nxt != pos:
                out += b"Content-Transfer-Encoding: binary\r\n\r\n"
            break
        if hdr.lname != b"content-transfer-encoding":
            line = raw[hdr.start : hdr.end]
            out += _crlf(line if line.endswith(b"\n") else line + b"\r\n")
        pos = nxt
    return bytes(out)


def _check_ctes(raw: bytes, part: Part) -> None:
    """UnknownCTEError if `part` or a part inside it has an unknown encoding.

    Checked before anything is decoded, so an unknown encoding is reported
    rather than bad data elsewhere, as Dovecot does.
    """
    if part_cte(raw, part) == CTE_UNKNOWN:
        raise UnknownCTEError("unknown Content-Transfer-Encoding")
    for child in part.children:
        _check_ctes(raw, child)


def _binary_part(raw: bytes, part: Part, include_hdr: bool, out: bytearray, strict: bool) -> bool:
    """Append the BINARY form of `part`; True if any body was decoded."""
    cte = part_cte(raw, part)
    converted = cte in (CTE_QP, CTE_BASE64)
    if include_hdr:
        out += _binary_header(raw, part) if converted else _crlf(raw[part.offset : part.header_end])
    if part.children:
        pos = part.header_end
        decoded = False
        for child in part.children:
            out += _crlf(raw[pos : child.offset])
            decoded |= _binary_part(raw, child, True, out, strict)
            pos = child.end
        out += _crlf(raw[pos : part.end])
        return decoded
    body = raw[part.header_end : part.end]
    if body and converted:
        out += _decode_body(body, cte, strict)
        return True
    out += _crlf(body)
    return False


def _binary(raw: bytes, part: Part, include_hdr: bool, strict: bool = True) -> bytes:
    _check_ctes(raw, part)
    out = bytearray()
    if _binary_part(raw, part, include_hdr, out, strict):
        return bytes(out)
    # Nothing needed decoding: Dovecot then serves the part as stored, with
    # its Content-Transfer-Encoding headers untouched. (Dovecot also cuts
    # that copy to the length of the rewritten form, a bug not copied.)
    return _crlf(raw[part.offset if include_hdr else part.header_end : part.end])


def decode_part(raw: bytes, part: Part) -> bytes:
    """BINARY content of one part: its body with the CTE decoded (RFC 3516).

    Lenient: content that doesn't decode cleanly is decoded as far as it goes
    (binary_section refuses it instead).
    """
    return _binary(raw, part, False, strict=False)


def binary_section(msg: ParsedMessage, raw: bytes, spec: str) -> bytes | None:
    """`BINARY[spec]` (RFC 3516): part content with its CTE decoded.

    `spec` is "" (whole message) or a part number. Returns None for a bad
    spec, b"" for a missing part; raises UnknownCTEError when a part in the
    range has an encoding other than 7bit/8bit/binary/quoted-printable/base64,
    and its subclass InvalidPartDataError when a part in the range holds
    invalid base64 or quoted-printable.
    """
    spec = spec.strip()
    if spec and not _SECTION_PART.fullmatch(spec):
        return None
    part = find_part(msg.root, spec) if spec else msg.root
    if part is None:
        return b""
    return _binary(raw, part, not spec)


def _walk(part: Part) -> Iterator[Part]:
    yield part
    for child in part.children:
        yield from _walk(child)


def _binary_sizes(raw: bytes, root: Part) -> list[tuple[Part, int, int]]:
    """(part, decoded header size, decoded body size) of each part of the
    message whose encoding BINARY converts, in Dovecot's "binary.parts" way:
    a converted part that holds other parts gets a body size of 0."""
    _check_ctes(raw, root)
    out = []
    for part in _walk(root):
        cte = part_cte(raw, part)
        if cte not in (CTE_QP, CTE_BASE64):
            continue
        body = b""
        if not part.children and part.end > part.header_end:
            body = _decode_body(raw[part.header_end : part.end], cte)
        out.append((part, len(_binary_header(raw, part)), len(body)))
    return out


def binary_size(msg: ParsedMessage, raw: bytes, spec: str) -> int | None:
    """`BINARY.SIZE[spec]` (RFC 3516 §4.2) as Dovecot 2.3 answers it.

    Dovecot doesn't decode the part asked for: it decodes the whole message
    once, notes for each converted part its decoded header and body sizes,
    then takes the part's stored size and, for every converted part starting
    inside it, swaps that part's stored size for the decoded ones. So an
    unknown encoding or invalid data anywhere in the message fails the
    request (UnknownCTEError, InvalidPartDataError), and a converted part
    holding other parts (a multipart or message/rfc822 labelled base64, say)
    counts as its header alone, its sub-parts then being taken off twice.
    The result wraps like Dovecot's unsigned 64-bit arithmetic.

    This is the size BINARY.SIZE reports; BINARY[spec] itself may be longer.
    """
    spec = spec.strip()
    if spec and not _SECTION_PART.fullmatch(spec):
        return None
    part = find_part(msg.root, spec) if spec else msg.root
    if part is None:
        return 0
    include_hdr = not spec
    size = part.header_vsize + part.body_vsize

    # Dovecot stores mail with LF line ends (mail_save_crlf = no), so an
    # offset there is one less per CRLF before it.
    crlfs = [m.start() for m in _CRLF.finditer(raw)]

    def stored_offset(offset: int) -> int:
        return offset - bisect.bisect_left(crlfs, offset)

    # Dovecot bounds the part by its stored offset plus its CRLF size, which
    # reaches past its end into the parts that follow it.
    start = stored_offset(part.offset)
    end = start + size
    own_hdr = None
    # Dovecot finds each converted part again by its offset: the first part
    # starting there.
    at: dict[int, Part] = {}
    for p in _walk(msg.root):
        at.setdefault(p.offset, p)
    for converted, hdr_size, body_size in _binary_sizes(raw, msg.root):
        p = at[converted.offset]
        if start <= stored_offset(p.offset) < end:
            if p.offset == part.offset:
                own_hdr = hdr_size
            size += hdr_size + body_size - p.header_vsize - p.body_vsize
    if not include_hdr:
        size -= part.header_vsize if own_hdr is None else own_hdr
    return size % (1 << 64)
