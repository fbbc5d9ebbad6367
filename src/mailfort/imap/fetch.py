"""FETCH responses from store rows (RFC 9051 §6.4.5, §7.5.2; RFC 3516 BINARY; RFC 7162).

:class:`FetchPlan` decides once per command which store columns a FETCH needs, so a
``FETCH 1:* (FLAGS)`` reads only the messages table and ``ENVELOPE`` reads the small
pre-rendered summaries, never the message itself.  :func:`render_fetch` turns one row
into the response line; body sections go through :class:`MessageSource`, which reads
only the header of a message when that is all a section needs.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from mailfort.imap import commands as c
from mailfort.mail import (
    Envelope,
    ParsedMessage,
    Part,
    SectionSpec,
    binary_section,
    binary_size,
    parse_message,
    section,
)
from mailfort.store.mailbox import Mailbox

__all__ = ["FetchPlan", "MessageSource", "render_fetch"]

# Simple items and the store column each needs.
_SIMPLE_COLUMNS: dict[str, str | None] = {
    "UID": None,
    "FLAGS": "flags_wire",
    "INTERNALDATE": "internal_date_wire",
    "MODSEQ": "modseq",
    "RFC822.SIZE": "size",
    "ENVELOPE": "envelope",
    "BODYSTRUCTURE": "bodystructure",
    "BODY": "body",
    "RFC822": "content_id",
    "RFC822.HEADER": "content_id",
    "RFC822.TEXT": "content_id",
    "EMAILID": "content_id",
    "THREADID": None,
    "SAVEDATE": None,
}
# Items rendered by a format string alone: (format, column or None for the UID).
_FORMATS: dict[str, tuple[bytes, str | None]] = {
    "UID": (b"UID %d", None),
    "FLAGS": (b"FLAGS (%b)", "flags_wire"),
    "INTERNALDATE": (b"INTERNALDATE %b", "internal_date_wire"),
    "MODSEQ": (b"MODSEQ (%d)", "modseq"),
    "RFC822.SIZE": (b"RFC822.SIZE %d", "size"),
    "ENVELOPE": (b"ENVELOPE %b", "envelope"),
    "BODYSTRUCTURE": (b"BODYSTRUCTURE %b", "bodystructure"),
    "BODY": (b"BODY %b", "body"),
}
_HEADER_TEXTS = frozenset({"HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT"})


def _uid_first(att: c.FetchAttribute) -> bool:
    return not (isinstance(att, c.FetchSimple) and att.name == "UID")


@dataclass(frozen=True, slots=True)
class FetchPlan:
    items: tuple[c.FetchAttribute, ...]
    columns: tuple[str, ...]  # store columns after the UID, in row order
    index: dict[str, int]  # column name -> row index
    sets_seen: bool
    #: When every item is simple: ``fmt % ((seq,) + getter(row))`` is the whole line.
    fmt: bytes | None = None
    getter: Callable[[Sequence[Any]], tuple[Any, ...]] | None = None
    has_flags: bool = False
    lines: Lines | None = None

    @classmethod
    def of(cls, attributes: Sequence[c.FetchAttribute]) -> FetchPlan:
        # UID first, as Dovecot answers UID FETCH (the parser appends it last).
        items = sorted(attributes, key=_uid_first)
        columns: list[str] = ["flags_wire"]  # always: a \Seen set by this FETCH is reported
        sets_seen = False
        for att in items:
            if isinstance(att, c.FetchBody):
                needed: str | None = "content_id"
                sets_seen |= att.sets_seen
            else:
                needed = _SIMPLE_COLUMNS.get(att.name)
                sets_seen |= att.name in ("RFC822", "RFC822.TEXT")  # RFC 9051 §6.4.5
            if needed is not None and needed not in columns:
                columns.append(needed)
        index = {name: i + 1 for i, name in enumerate(columns)}
        has_flags = any(isinstance(a, c.FetchSimple) and a.name == "FLAGS" for a in items)
        if all(isinstance(a, c.FetchSimple) and a.name in _FORMATS for a in items):
            parts = [_FORMATS[a.name] for a in items if isinstance(a, c.FetchSimple)]
            fmt = b"* %d FETCH (" + b" ".join(f for f, _ in parts) + b")\r\n"
            positions = [0 if col is None else index[col] for _, col in parts]
            getter = _tuple_getter(positions)
            lines = _lines_renderer(positions)
            return cls(
                tuple(items), tuple(columns), index, sets_seen, fmt, getter, has_flags, lines
            )
        return cls(tuple(items), tuple(columns), index, sets_seen, has_flags=has_flags)


def _tuple_getter(positions: list[int]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    if len(positions) == 1:
        pos = positions[0]
        return lambda row: (row[pos],)
    getter = operator.itemgetter(*positions)
    return getter


Lines = Callable[[bytes, Iterable[tuple[int, Sequence[Any]]]], list[bytes]]


def _lines_renderer(positions: list[int]) -> Lines:
    """``fmt % (seq, row[p1], row[p2], ...)`` for every (seq, row): written out per arity,
    since direct indexing runs twice as fast as unpacking an itemgetter's tuple."""
    n = len(positions)
    if n == 1:
        (a,) = positions
        return lambda fmt, pairs: [fmt % (s, r[a]) for s, r in pairs]
    if n == 2:
        a, b = positions
        return lambda fmt, pairs: [fmt % (s, r[a], r[b]) for s, r in pairs]
    if n == 3:
        a, b, c3 = positions
        return lambda fmt, pairs: [fmt % (s, r[a], r[b], r[c3]) for s, r in pairs]
    if n == 4:
        a, b, c3, d = positions
        return lambda fmt, pairs: [fmt % (s, r[a], r[b], r[c3], r[d]) for s, r in pairs]
    getter = _tuple_getter(positions)
    return lambda fmt, pairs: [fmt % (s, *getter(r)) for s, r in pairs]


class MessageSource:
    """Message bytes for the body items of one FETCH, decrypted and parsed at most once
    per message (and only the header when that is enough)."""

    def __init__(self, mailbox: Mailbox) -> None:
        self.mailbox = mailbox
        self._id = -1
        self._head: tuple[ParsedMessage, bytes] | None = None
        self._full: tuple[ParsedMessage, bytes] | None = None
        self._raw: bytes | None = None

    def _at(self, content_id: int) -> None:
        if content_id != self._id:
            self._id = content_id
            self._head = self._full = None
            self._raw = None

    def raw(self, content_id: int) -> bytes:
        self._at(content_id)
        if self._raw is None:
            self._raw = self.mailbox.content(content_id)
        return self._raw

    def parsed(self, content_id: int) -> tuple[ParsedMessage, bytes]:
        self._at(content_id)
        if self._full is None:
            raw = self.raw(content_id)
            self._full = (parse_message(raw), raw)
        return self._full

    def parsed_head(self, content_id: int) -> tuple[ParsedMessage, bytes]:
        """The message's header block alone, parsed: enough for top-level HEADER,
        HEADER.FIELDS and HEADER.FIELDS.NOT."""
        self._at(content_id)
        if self._full is not None:
            return self._full
        if self._head is None:
            head = self._raw if self._raw is not None else self.mailbox.content_head(content_id)
            self._head = (_header_only(head), head)
        return self._head


def _header_only(head: bytes) -> ParsedMessage:
    """The top-level part of a message whose header block is ``head``.

    The header ends at the first empty line (RFC 5322 §2.1; the store keeps CRLF line
    ends, so that is the first CRLF CRLF, or a CRLF at the very start).  Knowing that, no
    parse is needed: HEADER and HEADER.FIELDS cut by offsets alone, which keeps a
    client's ``BODY.PEEK[HEADER.FIELDS (...)]`` of a whole folder cheap.  Anything
    unusual (no empty line at all) goes through the full parser.
    """
    if head.startswith(b"\r\n"):
        end = 2
    else:
        blank = head.find(b"\r\n\r\n")
        if blank < 0:
            return parse_message(head)
        end = blank + 4
    return ParsedMessage(Part(offset=0, header_end=end, end=len(head)), Envelope(), len(head))


@functools.lru_cache(maxsize=256)
def _spec(sec: c.Section) -> SectionSpec:
    fields = tuple(f.encode("utf-8", "surrogateescape").lower() for f in sec.fields)
    return SectionSpec(".".join(str(p) for p in sec.part), sec.text or "", fields)


def _literal(data: bytes, *, binary: bool = False) -> bytes:
    # RFC 9051 §4.3 literal; RFC 3516 §4.2: literal8 when the octets include NUL.
    prefix = b"~{" if binary and b"\x00" in data else b"{"
    return prefix + b"%d}\r\n" % len(data) + data


def _body_data(att: c.FetchBody, content_id: int, source: MessageSource) -> bytes:
    sec = att.section
    if att.binary:
        msg, raw = source.parsed(content_id)
        data = binary_section(msg, raw, ".".join(str(p) for p in sec.part))
        return data or b""
    if not sec.part and sec.text is None:
        # BODY[]: the stored message itself (CRLF already); NUL cannot go in a literal.
        raw = source.raw(content_id)
        return raw.replace(b"\x00", b"\x80") if b"\x00" in raw else raw
    if not sec.part and sec.text in _HEADER_TEXTS:
        msg, raw = source.parsed_head(content_id)
    else:
        msg, raw = source.parsed(content_id)
    return section(msg, raw, _spec(sec)) or b""


def _simple_body(name: str, content_id: int, source: MessageSource) -> bytes:
    # RFC 9051 §6.4.5: RFC822 = BODY[], RFC822.HEADER = BODY.PEEK[HEADER],
    # RFC822.TEXT = BODY[TEXT]; the response keeps the old names.
    text = {"RFC822": None, "RFC822.HEADER": "HEADER", "RFC822.TEXT": "TEXT"}[name]
    data = _body_data(c.FetchBody(c.Section((), text)), content_id, source)
    return name.encode() + b" " + _literal(data)


def render_fetch(
    plan: FetchPlan,
    seq: int,
    row: Sequence[Any],
    source: MessageSource,
    *,
    recent: bool = False,
    seen_now: tuple[str, int] | None = None,
) -> bytes:
    """``* seq FETCH (...)`` for one row of :meth:`Mailbox.message_columns`.

    Raises :class:`~mailfort.mail.UnknownCTEError` for BINARY of an undecodable part
    (its subclass ``InvalidPartDataError`` when the content is not valid base64 or
    quoted-printable: Dovecot's ``NO [PARSE]``).
    """
    ix = plan.index
    uid = row[0]
    parts: list[bytes] = []
    saw_flags = False
    for att in plan.items:
        if isinstance(att, c.FetchBody):
            if att.size_only:
                # BINARY.SIZE (RFC 3516 §4.2) is Dovecot's count, which
                # differs from the length of BINARY for parts inside parts.
                msg, raw = source.parsed(row[ix["content_id"]])
                size = binary_size(msg, raw, ".".join(str(p) for p in att.section.part))
                parts.append(att.response_name().encode() + b" %d" % (size or 0))
                continue
            data = _body_data(att, row[ix["content_id"]], source)
            if att.partial is not None:
                origin, length = att.partial
                data = data[origin : origin + length]
            parts.append(att.response_name().encode() + b" " + _literal(data, binary=att.binary))
            continue
        name = att.name
        if name == "UID":
            parts.append(b"UID %d" % uid)
        elif name == "FLAGS":
            saw_flags = True
            flags = bytes(row[ix["flags_wire"]])
            if recent:
                flags = flags + b" \\Recent" if flags else b"\\Recent"
            parts.append(b"FLAGS (" + flags + b")")
        elif name == "MODSEQ":
            parts.append(b"MODSEQ (%d)" % row[ix["modseq"]])
        elif name == "INTERNALDATE":
            parts.append(b"INTERNALDATE " + bytes(row[ix["internal_date_wire"]]))
        elif name == "RFC822.SIZE":
            parts.append(b"RFC822.SIZE %d" % row[ix["size"]])
        elif name in ("ENVELOPE", "BODYSTRUCTURE", "BODY"):
            parts.append(name.encode() + b" " + bytes(row[ix[name.lower()]]))
        elif name in ("RFC822", "RFC822.HEADER", "RFC822.TEXT"):
            parts.append(_simple_body(name, row[ix["content_id"]], source))
        elif name == "EMAILID":
            # RFC 8474 §5.1: the same content (stored once) is the same email.
            parts.append(b"EMAILID (M%d)" % row[ix["content_id"]])
        elif name in ("THREADID", "SAVEDATE"):
            parts.append(name.encode() + b" NIL")
    if seen_now is not None and not saw_flags:
        # RFC 9051 §6.4.5: a \Seen set by this FETCH is reported with the new flags.
        parts.append(b"FLAGS (" + seen_now[0].encode() + b")")
    return b"* %d FETCH (" % seq + b" ".join(parts) + b")\r\n"
