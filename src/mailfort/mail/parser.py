"""MIME tree parsing (RFC 5322, RFC 2045/2046), done once at delivery.

The tree walk follows Dovecot 2.3.19's `message-parser.c` rule for rule,
because IMAP clients are tested against Dovecot's BODYSTRUCTURE: a boundary
is any line starting with "--" plus a known boundary (prefix match, RFC 2046
§5.1.1), the innermost/longest boundary wins, a boundary line ends the
headers of a part early, parts nest at most 100 deep and number at most
10,000. Byte offsets of every part's header and body are recorded so that
`BODY[...]` sections are served by slicing the stored message.

Nothing here raises on malformed input: every byte sequence is some message.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from ._rfc822 import Address, Parser, parse_addresses, parse_params

MAX_NESTED_PARTS = 100
MAX_TOTAL_PARTS = 10_000
# RFC 2046 §5.1.1 allows 70 characters; Dovecot keeps up to 80.
BOUNDARY_MAX_LEN = 80
# Header names longer than this are read as a value (Dovecot, RFC 5322 §2.1.1).
HEADER_NAME_MAX_LEN = 1000

_LF = 0x0A
_CR = 0x0D


class Flags(enum.IntFlag):
    """The part kinds of Dovecot's `message_part` that BODYSTRUCTURE uses."""

    MULTIPART = 0x01
    MULTIPART_DIGEST = 0x02
    MESSAGE_RFC822 = 0x04
    TEXT = 0x08
    IS_MIME = 0x10
    OVERFLOW = 0x20


_NO_FLAGS = Flags(0)


@dataclass(slots=True)
class Envelope:
    """Raw ENVELOPE fields (RFC 9051 §7.5.2); strings as in the header."""

    date: bytes | None = None
    subject: bytes | None = None
    from_: list[Address] | None = None
    sender: list[Address] | None = None
    reply_to: list[Address] | None = None
    to: list[Address] | None = None
    cc: list[Address] | None = None
    bcc: list[Address] | None = None
    in_reply_to: bytes | None = None
    message_id: bytes | None = None


@dataclass(slots=True)
class BodyFields:
    """The Content-* header data of one part (RFC 2045 §5, §6, RFC 2183)."""

    content_type: bytes | None = None
    subtype: bytes | None = None
    params: list[tuple[bytes, bytes]] = field(default_factory=list)
    content_id: bytes | None = None
    description: bytes | None = None
    encoding: bytes | None = None
    md5: bytes | None = None
    disposition: bytes | None = None
    disposition_params: list[tuple[bytes, bytes]] | None = None
    language: list[bytes] | None = None
    location: bytes | None = None


@dataclass(slots=True, eq=False)
class Part:
    """One MIME part. Offsets index the raw message the tree was parsed from.

    `header_*` covers the header block including its blank line; `body_*`
    covers the body up to (not including) the line break that precedes the
    next boundary (RFC 2046 §5.1.1: that CRLF belongs to the boundary).
    Sizes are "virtual": counted as if every bare LF were CRLF, which is what
    IMAP reports (RFC 9051 §2.3.4) and what the CRLF store holds physically.
    """

    offset: int
    header_end: int = 0
    end: int = 0
    flags: Flags = _NO_FLAGS
    fields: BodyFields = field(default_factory=BodyFields)
    envelope: Envelope | None = None
    children: list[Part] = field(default_factory=list)
    parent: Part | None = field(default=None, repr=False)
    header_vsize: int = 0
    header_lines: int = 0
    body_vsize: int = 0
    body_lines: int = 0

    @property
    def body_offset(self) -> int:
        return self.header_end

    def walk(self) -> Iterator[Part]:
        """This part and all below it, depth first (section-number order)."""
        stack = [self]
        while stack:
            p = stack.pop()
            yield p
            stack.extend(reversed(p.children))


@dataclass(slots=True, eq=False)
class ParsedMessage:
    """A parsed message: the MIME tree plus the top-level envelope."""

    root: Part
    envelope: Envelope
    size: int  # RFC822.SIZE: the length with CRLF line endings

    def find(self, section: str) -> Part | None:
        """The part named by a section number like "1.2" (RFC 9051 §6.4.5)."""
        return find_part(self.root, section)


@dataclass(slots=True)
class Header:
    """One logical header field: name, unfolded-with-LF value, line span."""

    name: bytes
    value: bytes  # folded lines joined with "\n", CRs dropped
    start: int
    end: int  # just past the last line's line break

    @property
    def lname(self) -> bytes:
        # Dovecot compares names as C strings: a NUL ends the name.
        return self.name.split(b"\0", 1)[0].lower()


def vsize(raw: bytes, start: int, end: int) -> tuple[int, int]:
    """(virtual size, line count) of raw[start:end] (bare LF counts as 2)."""
    if end <= start:
        return 0, 0
    lf = raw.count(b"\n", start, end)
    if lf == 0:
        return end - start, 0
    crlf = raw.count(b"\r\n", start, end)
    return end - start + lf - crlf, lf


def read_header(raw: bytes, pos: int, end: int) -> tuple[Header | None, int, int]:
    """Read one header field at `pos` (RFC 5322 §2.2, §2.2.3 unfolding).

    Returns (header, next position, size of the last line break). A None
    header means the blank line ending the header (next position is after
    it) or the end of input. A line without ":" is a field with an empty name,
    as Dovecot reads it.
    """
    if pos >= end:
        return None, pos, 0
    lf = raw.find(b"\n", pos, end)
    if lf < 0:
        line_end, nxt, nl = end, end, 0
    else:
        nxt = lf + 1
        if lf > pos and raw[lf - 1] == _CR:
            line_end, nl = lf - 1, 2
        else:
            line_end, nl = lf, 1
    if line_end == pos:
        return None, nxt, nl
    colon = raw.find(b":", pos, line_end)
    if colon < 0:
        name = b""
        value = raw[pos:line_end]
    else:
        name_end = colon
        while name_end > pos and raw[name_end - 1] in (0x20, 0x09):
            name_end -= 1
        vstart = colon + 1
        # Skip the LWSP after ":"; if the value is only LWSP, skip just one.
        v = vstart
        while v < line_end and raw[v] in (0x20, 0x09):
            v += 1
        if v == line_end and vstart < line_end:
            v = vstart + 1
        if name_end - pos > HEADER_NAME_MAX_LEN:
            name = b""
            value = raw[pos:line_end]
        else:
            name = raw[pos:name_end]
            value = raw[v:line_end]
    if nl and nxt < end and raw[nxt] in (0x20, 0x09):
        parts = [value]
        while nl and nxt < end and raw[nxt] in (0x20, 0x09):
            lstart = nxt
            lf = raw.find(b"\n", lstart, end)
            if lf < 0:
                parts.append(raw[lstart:end])
                nxt, nl = end, 0
            else:
                le = lf - 1 if raw[lf - 1] == _CR else lf
                parts.append(raw[lstart:le])
                nxt, nl = lf + 1, (2 if le != lf else 1)
        value = b"\n".join(parts)
    return Header(name, value, pos, nxt), nxt, nl


def iter_headers(raw: bytes, start: int, end: int) -> Iterator[Header]:
    """The header fields of a header block already delimited by the parser."""
    pos = start
    while pos < end:
        hdr, pos, _ = read_header(raw, pos, end)
        if hdr is None:
            return
        yield hdr


def header_strdup(value: bytes) -> bytes:
    # Dovecot's message_header_strdup: NULs become U+FFFD.
    return value.replace(b"\0", "\ufffd".encode()) if b"\0" in value else value


# --- Content-* fields (Dovecot message-part-data.c) -------------------------


def _parse_content_type_value(value: bytes) -> tuple[bytes, int, Parser]:
    p = Parser(value)
    p.skip_lwsp()
    out = bytearray()
    ret = p.parse_content_type(out)
    return bytes(out), ret, p


def _apply_content_header(f: BodyFields, lname: bytes, value: bytes) -> None:
    name = lname[8:]
    if name == b"id":
        if f.content_id is None:
            f.content_id = header_strdup(value)
    elif name == b"md5":
        if f.md5 is None:
            f.md5 = header_strdup(value)
    elif name == b"type":
        if f.content_type is None:
            ct, ret, p = _parse_content_type_value(value)
            slash = ct.find(b"/")
            if slash >= 0:
                f.content_type, f.subtype = ct[:slash], ct[slash + 1 :]
            else:
                f.content_type, f.subtype = ct, b""
            if ret >= 0:
                f.params = parse_params(p)[0]
    elif name == b"transfer-encoding":
        if f.encoding is None:
            p = Parser(value)
            p.skip_lwsp()
            tok = bytearray()
            if p.parse_mime_token(tok) >= 0 and p.skip_lwsp() == 0 and tok:
                f.encoding = bytes(tok)
    elif name == b"language":
        if f.language is None:
            p = Parser(value)
            p.skip_lwsp()
            langs: list[bytes] = []
            while True:
                tok = bytearray()
                if p.parse_atom(tok) < 0:
                    break
                langs.append(bytes(tok))
                if p.pos >= p.end or p.data[p.pos] != 0x2C:
                    break
                p.pos += 1
                p.skip_lwsp()
            if langs:
                f.language = langs
    elif name == b"location":
        if f.location is None:
            f.location = header_strdup(value)
    elif name == b"description":
        if f.description is None:
            f.description = header_strdup(value)
    elif name == b"disposition" and f.disposition_params is None:
        # Dovecot lets a later Content-Disposition replace one without
        # parameters; kept for identical BODYSTRUCTURE output.
        p = Parser(value)
        p.skip_lwsp()
        tok = bytearray()
        if p.parse_mime_token(tok) >= 0:
            f.disposition = bytes(tok)
            params = parse_params(p)[0]
            f.disposition_params = params or None


_ENVELOPE_STR = {
    b"date": "date",
    b"subject": "subject",
    b"message-id": "message_id",
    b"in-reply-to": "in_reply_to",
}
_ENVELOPE_ADDR = {
    b"from": "from_",
    b"sender": "sender",
    b"reply-to": "reply_to",
    b"to": "to",
    b"cc": "cc",
    b"bcc": "bcc",
}


def apply_envelope_header(env: Envelope, lname: bytes, value: bytes) -> None:
    """Fold one header into an envelope the way Dovecot does.

    A repeated Date/Subject/Message-ID/In-Reply-To: the last one wins. A
    repeated address header: the lists are joined, so a second From cannot
    hide behind the first.
    """
    attr = _ENVELOPE_STR.get(lname)
    if attr is not None:
        setattr(env, attr, header_strdup(value))
        return
    attr = _ENVELOPE_ADDR.get(lname)
    if attr is not None:
        addrs = parse_addresses(value)
        cur = getattr(env, attr)
        if cur is None:
            setattr(env, attr, addrs or None)
        else:
            cur.extend(addrs)


def parse_envelope(raw: bytes, start: int, end: int) -> Envelope:
    env = Envelope()
    for hdr in iter_headers(raw, start, end):
        apply_envelope_header(env, hdr.lname, hdr.value)
    return env


# --- the tree walk ----------------------------------------------------------


class _Boundary:
    __slots__ = ("epilogue", "part", "value")

    def __init__(self, part: Part, value: bytes) -> None:
        self.part = part
        self.value = value
        self.epilogue = False


class _State(enum.Enum):
    HEADER = 1
    BODY_TO_BOUNDARY = 2
    BODY_TO_EOF = 3


class _Walker:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.n = len(raw)
        self.boundaries: list[_Boundary] = []  # innermost last
        self.total = 1
        self.nested = 0
        self.root = Part(offset=0)
        self.part = self.root
        # Where each part's accounted data ends ("acc_end" in the notes).
        self.acc: dict[int, int] = {}

    # A line "--xyz": which known boundary it is (RFC 2046 §5.1.1).
    def boundary_at(self, line: int) -> _Boundary | None:
        raw, n = self.raw, self.n
        if n - line < 2 or raw[line] != 0x2D or raw[line + 1] != 0x2D:
            return None
        if self.total >= MAX_TOTAL_PARTS:
            self.part.flags |= Flags.OVERFLOW
            return None
        data = line + 2
        lf = raw.find(b"\n", data)
        trailing = False
        if lf >= 0:
            size = lf - data
            if size > 0 and raw[data + size - 1] == _CR:
                size -= 1
            if size > 2 and raw[data + size - 1] == 0x2D and raw[data + size - 2] == 0x2D:
                trailing = True
        else:
            size = min(n - data, BOUNDARY_MAX_LEN + 4)
        best: _Boundary | None = None
        for b in reversed(self.boundaries):
            blen = len(b.value)
            if (
                blen <= size
                and raw.startswith(b.value, data)
                and (best is None or len(best.value) < blen)
            ):
                best = b
                if blen == size or (blen == size - 2 and trailing):
                    break
        if best is not None:
            blen = len(best.value)
            best.epilogue = n - data >= blen + 2 and raw.startswith(b"--", data + blen)
        return best

    def account(self, part: Part, end: int) -> None:
        if self.acc.get(id(part), -1) < end:
            self.acc[id(part)] = end

    def finish(self) -> None:
        part = self.part
        parent = part.parent
        assert parent is not None
        part.end = max(self.acc.get(id(part), part.header_end), part.header_end)
        self.account(parent, part.end)
        self.nested -= 1
        self.part = parent

    def append_child(self, pos: int, flags: Flags) -> None:
        parent = self.part
        child = Part(offset=pos, flags=flags, parent=parent)
        parent.children.append(child)
        self.part = child
        self.nested += 1
        self.total += 1

    def parse_headers(self, pos: int) -> tuple[int, _State]:
        raw, n = self.raw, self.n
        part = self.part
        parent = part.parent
        parent_rfc822 = parent is not None and bool(parent.flags & Flags.MESSAGE_RFC822)
        want_env = parent is None or parent_rfc822
        env = Envelope() if want_env else None
        fields = part.fields
        last_boundary: bytes | None = None
        seen_ct = False
        multipart = False
        prev_nl = 0
        eoh = False
        cut = False
        header_end = pos
        while True:
            hdr: Header | None = None
            found = None
            if pos < n:
                at_eoh = raw[pos] == _LF or (
                    raw[pos] == _CR and pos + 1 < n and raw[pos + 1] == _LF
                )
                if at_eoh and last_boundary is not None and part.flags & Flags.IS_MIME:
                    # Register our boundary before the body starts so that a
                    # "--x" line is matched against the innermost part first.
                    if self.nested + 1 < MAX_NESTED_PARTS:
                        self.boundaries.append(_Boundary(part, last_boundary))
                        multipart = True
                        last_boundary = None
                    else:
                        part.flags |= Flags.OVERFLOW
                        part.flags &= ~Flags.MULTIPART
                if self.boundaries:
                    b = self.boundary_at(pos)
                    if b is not None and b.part is not part:
                        found = b
            if found is not None:
                # An enclosing boundary ends these headers; the line break
                # before it belongs to the boundary (the enclosing body).
                header_end = pos - prev_nl
                cut = True
                if parent is not None:
                    self.account(parent, pos)
                break
            if eoh:
                break
            hdr, nxt, nl = read_header(raw, pos, n)
            if hdr is None:
                if nxt == pos:  # end of input
                    header_end = pos
                    break
                eoh = True
                pos = header_end = nxt
                prev_nl = nl
                continue
            pos = header_end = nxt
            prev_nl = nl
            lname = hdr.lname
            if lname == b"mime-version":
                part.flags |= Flags.IS_MIME
            elif lname == b"content-type":
                part.flags |= Flags.IS_MIME
                if not seen_ct:
                    seen_ct = True
                    last_boundary = self._content_type_flags(part, hdr.value)
            if lname.startswith(b"content-"):
                _apply_content_header(fields, lname, hdr.value)
            if env is not None:
                apply_envelope_header(env, lname, hdr.value)

        part.header_end = header_end
        self.acc[id(part)] = header_end
        part.envelope = env
        if not part.flags & Flags.IS_MIME:
            part.flags = Flags(0)
            part.fields = BodyFields()
        if not seen_ct or not part.flags & Flags.IS_MIME:
            if parent is not None and parent.flags & Flags.MULTIPART_DIGEST:
                # RFC 2046 §5.1.5: digest parts default to message/rfc822.
                part.flags |= Flags.MESSAGE_RFC822
            else:
                part.flags |= Flags.TEXT
        if multipart:
            return pos, _State.BODY_TO_BOUNDARY
        if not part.flags & Flags.MESSAGE_RFC822:
            return pos, (_State.BODY_TO_BOUNDARY if self.boundaries else _State.BODY_TO_EOF)
        if self.nested + 1 < MAX_NESTED_PARTS and self.total < MAX_TOTAL_PARTS:
            if cut:
                # The boundary that cut our header also ends the message we
                # hold: it is empty, and sits where our header ended (Dovecot
                # counts its position from sizes, before the moved line break).
                self.append_child(header_end, Flags.TEXT)
                self.part.header_end = header_end
                self.acc[id(self.part)] = header_end
                self.finish()
                return pos, _State.BODY_TO_BOUNDARY
            self.append_child(pos, Flags(0))
            return pos, _State.HEADER
        part.flags |= Flags.OVERFLOW
        part.flags &= ~Flags.MESSAGE_RFC822
        return pos, (_State.BODY_TO_BOUNDARY if self.boundaries else _State.BODY_TO_EOF)

    def _content_type_flags(self, part: Part, value: bytes) -> bytes | None:
        ct, ret, p = _parse_content_type_value(value)
        lct = ct.lower()
        if lct == b"message/rfc822":
            part.flags |= Flags.MESSAGE_RFC822
        elif lct.startswith(b"text") and (len(lct) == 4 or lct[4] == 0x2F):
            part.flags |= Flags.TEXT
        elif lct.startswith(b"multipart/"):
            part.flags |= Flags.MULTIPART
            if lct[10:] == b"digest":
                part.flags |= Flags.MULTIPART_DIGEST
        if ret < 0 or not part.flags & Flags.MULTIPART:
            return None
        for key, val in parse_params(p)[0]:
            if key.lower() == b"boundary":
                return val[:BOUNDARY_MAX_LEN]
        return None

    def end_part_at_boundary(self, b: _Boundary, line: int, first_line: bool) -> tuple[int, _State]:
        while self.part is not b.part:
            self.finish()
        if b.epilogue:
            while self.boundaries and self.boundaries[-1] is not b:
                self.boundaries.pop()
            if self.boundaries:
                self.boundaries.pop()
        else:
            while self.boundaries and self.boundaries[-1] is not b:
                self.boundaries.pop()
        # The boundary line, up to and including its LF, is multipart data.
        after = line + 2 + len(b.value) + (2 if b.epilogue else 0)
        lf = self.raw.find(b"\n", min(after, self.n))
        pos = self.n if lf < 0 else lf + 1
        self.account(self.part, pos)
        if not self.boundaries or self.boundaries[-1].part is not self.part:
            # Epilogue (RFC 2046 §5.1.1), up to an enclosing boundary.
            return pos, (_State.BODY_TO_BOUNDARY if self.boundaries else _State.BODY_TO_EOF)
        self.append_child(pos, Flags.IS_MIME)
        return pos, _State.HEADER

    def body_to_boundary(self, pos: int) -> tuple[int, _State]:
        raw = self.raw
        if pos < self.n:
            b = self.boundary_at(pos)
            if b is not None:
                return self.end_part_at_boundary(b, pos, True)
        k = raw.find(b"\n--", pos)
        while k >= 0:
            b = self.boundary_at(k + 1)
            if b is not None:
                start = k - 1 if k > pos and raw[k - 1] == _CR else k
                self.account(self.part, start)
                return self.end_part_at_boundary(b, k + 1, False)
            k = raw.find(b"\n--", k + 1)
        self.account(self.part, self.n)
        return self.n, _State.BODY_TO_EOF

    def run(self) -> Part:
        pos = 0
        state = _State.HEADER
        while True:
            if state is _State.HEADER:
                pos, state = self.parse_headers(pos)
            elif state is _State.BODY_TO_BOUNDARY:
                pos, state = self.body_to_boundary(pos)
            else:
                self.account(self.part, self.n)
                break
        while self.part.parent is not None:
            self.finish()
        root = self.root
        root.end = max(self.acc.get(id(root), root.header_end), root.header_end)
        raw = self.raw
        for p in root.walk():
            p.header_vsize, p.header_lines = vsize(raw, p.offset, p.header_end)
            p.body_vsize, p.body_lines = vsize(raw, p.header_end, p.end)
        return root


def parse_message(raw: bytes) -> ParsedMessage:
    """Parse a message into its MIME tree. Never raises on any input.

    Give it the message as stored (see `to_crlf`); offsets index `raw`.
    """
    root = _Walker(raw).run()
    env = root.envelope if root.envelope is not None else Envelope()
    return ParsedMessage(root=root, envelope=env, size=root.header_vsize + root.body_vsize)


def to_crlf(raw: bytes) -> bytes:
    """The form the store keeps: every LF preceded by CR (RFC 5322 §2.1).

    The mailbox store keeps messages with CRLF line endings, so RFC822.SIZE,
    BODYSTRUCTURE sizes and section offsets are plain byte counts of what is
    on disk, and `BODY[]` is a slice. Only bare LFs change; lone CRs stay, so
    the conversion is idempotent. (Dovecot stores LF and re-adds CRs, which
    also drops one CR of a "CR CR LF" run; that loses bytes and isn't copied.)
    """
    if b"\n" not in raw:
        return raw
    if b"\r" not in raw:
        return raw.replace(b"\n", b"\r\n")
    return _BARE_LF.sub(b"\r\n", raw)


_BARE_LF = re.compile(rb"(?<!\r)\n")


def find_part(root: Part, section: str) -> Part | None:
    """Resolve "1.2.3" like Dovecot's imap_msgpart_find (RFC 9051 §6.4.5).

    A non-multipart part has only part 1 (itself); a message/rfc822 part's
    sub-parts are those of the message it contains.
    """
    if not section:
        return root
    nums = section.split(".")
    part: Part | None = root
    for i, s in enumerate(nums):
        if part is None:
            return None
        num = int(s)
        more = i + 1 < len(nums)
        if part.flags & Flags.MULTIPART:
            part = part.children[num - 1] if 1 <= num <= len(part.children) else None
        elif num != 1 or (more and not part.flags & Flags.MESSAGE_RFC822):
            part = None
        if part is not None and part.flags & Flags.MESSAGE_RFC822 and more:
            part = part.children[0] if part.children else None
    return part
