"""SEARCH over the store: which columns to read, and the full-text index for BODY/TEXT.

:mod:`mailfort.imap.search` decides what matches; this module gives it messages that
read only what the program needs.  Flags, dates, sizes and MODSEQ come from the messages
table; FROM/TO/CC/BCC/SUBJECT from the per-message summaries; other header fields from
the message's header block, read on demand.

BODY and TEXT are case-insensitive substring matches (RFC 9051 §6.4.4): BODY over the
decoded text of the text parts, TEXT over that and every header field (names and decoded
values).  The FTS5 index (``content_text``: subject and decoded text parts) only narrows
the candidates (:meth:`Mailbox.substring_candidates`: whole words, word prefixes, and
word ends or middles looked up in the index's vocabulary); each candidate's text is then
checked for the substring itself, all in one query (:meth:`Mailbox.body_containing`).
When the index cannot narrow soundly (a needle without letters or digits, a non-ASCII
word that may start mid-token, a fragment found in too many terms) the whole folder's
text is scanned that way.  When the whole program is an AND, its BODY and UID keys
narrow the candidates before any other row is read.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any

from mailfort.imap import commands as c
from mailfort.mail import decode_header, parse_message
from mailfort.mail.parser import iter_headers
from mailfort.store.mailbox import Mailbox

if TYPE_CHECKING:
    from mailfort.imap.session import Selected

__all__ = ["SearchPlan"]

_EPOCH = dt.datetime(1970, 1, 1)
_SUMMARY_HEADERS = {"subject": "subject", "from": "from", "to": "to", "cc": "cc", "bcc": "bcc"}
_TEXT_HEADERS = ("subject", "from", "to", "cc", "bcc")


def _walk(key: c.SearchKey) -> Iterator[c.SearchKey]:
    yield key
    if isinstance(key, c.SearchAnd):
        for k in key.keys:
            yield from _walk(k)
    elif isinstance(key, c.SearchOr):
        yield from _walk(key.left)
        yield from _walk(key.right)
    elif isinstance(key, c.SearchNot):
        yield from _walk(key.key)


class SearchPlan:
    def __init__(self, mailbox: Mailbox, sel: Selected, criteria: c.SearchKey) -> None:
        self.mailbox = mailbox
        self.sel = sel
        self.criteria = criteria
        self._fts: dict[str, set[int] | None] = {}
        self._body: dict[str, set[int]] = {}
        columns = ["flags", "internal_date", "internal_tz", "modseq"]
        for key in _walk(criteria):
            need: list[str] = []
            if isinstance(key, c.SearchSize):
                need = ["size"]
            elif isinstance(key, c.SearchHeader):
                summary = _SUMMARY_HEADERS.get(key.name)
                need = [summary] if summary else ["content_id"]
            elif isinstance(key, c.SearchDate) and key.sent:
                need = ["content_id"]  # the Date field in its own time zone
            elif isinstance(key, c.SearchText):
                need = ["content_id"]
                if key.headers:
                    need += list(_TEXT_HEADERS)
            columns.extend(n for n in need if n not in columns)
        self.columns = tuple(columns)
        self.index = {name: i + 1 for i, name in enumerate(self.columns)}

    # -- full text ----------------------------------------------------------------------

    def candidates(self, needle: str) -> set[int] | None:
        """A superset of the UIDs whose subject or body contains ``needle`` (case-folded),
        or None: every message is a candidate."""
        if needle not in self._fts:
            self._fts[needle] = self.mailbox.substring_candidates(self.sel.folder_id, needle)
        return self._fts[needle]

    def body_hits(self, needle: str) -> set[int]:
        """The UIDs whose body text contains ``needle`` (case-folded): the index's
        candidates (or every message of the view) checked in one pass."""
        if needle not in self._body:
            pool = self.candidates(needle)  # None: the whole folder
            self._body[needle] = self.mailbox.body_containing(self.sel.folder_id, pool, needle)
        return self._body[needle]

    def _narrowing(self) -> set[int] | None:
        """UIDs an AND program can only match within, from its FTS and UID keys."""
        keys = self.criteria.keys if isinstance(self.criteria, c.SearchAnd) else (self.criteria,)
        mbx, folder_id = self.mailbox, self.sel.folder_id
        out: set[int] | None = None
        for key in keys:
            hits: set[int] | None = None
            if isinstance(key, c.SearchText) and not key.headers and key.value:
                hits = self.body_hits(key.value.casefold())
            elif (
                isinstance(key, c.SearchHeader)
                and key.value
                and key.value.isascii()
                and key.name in _SUMMARY_HEADERS
            ):
                # SQL narrows (ASCII case-insensitive), the evaluator then decides.
                hits = mbx.uids_containing(folder_id, _SUMMARY_HEADERS[key.name], key.value)
            elif isinstance(key, c.SearchFlag) and key.flag != "\\Recent":
                if key.present:
                    hits = mbx.uids_containing(folder_id, "flags", key.flag)
                elif key.flag.startswith("\\"):
                    hits = mbx.uids_lacking_flag(folder_id, key.flag)
            if hits is not None:
                out = hits if out is None else out & hits
        return out

    # -- messages -----------------------------------------------------------------------

    def messages(self) -> list[SearchMessage]:
        sel = self.sel
        view = sel.uids
        if not view:
            return []
        narrow = self._narrowing()
        if narrow is not None:
            wanted = sorted(u for u in narrow if sel.seq_of(u))
            ranges = [(u, u) for u in wanted]
            if len(ranges) > 64:
                ranges = [(wanted[0], wanted[-1])]
            if not ranges:
                return []
        else:
            ranges = [(view[0], view[-1])]
        rows = self.mailbox.message_columns(sel.folder_id, ranges, self.columns)
        out = []
        for row in rows:
            seq = sel.seq_of(row[0])
            if seq and (narrow is None or row[0] in narrow):
                out.append(SearchMessage(self, row, seq))
        return out


class SearchMessage:
    """A store row as :class:`~mailfort.imap.search.SearchableMessage`."""

    __slots__ = ("_headers", "plan", "row", "seq")

    def __init__(self, plan: SearchPlan, row: tuple[Any, ...], seq: int) -> None:
        self.plan = plan
        self.row = row
        self.seq = seq
        self._headers: list[tuple[bytes, bytes]] | None = None

    def _col(self, name: str) -> Any:
        return self.row[self.plan.index[name]]

    @property
    def uid(self) -> int:
        return int(self.row[0])

    @property
    def flags(self) -> AbstractSet[str]:
        flags = set(str(self._col("flags")).split())
        if self.plan.sel.is_recent(self.uid):
            flags.add("\\Recent")
        return flags

    @property
    def internal_date(self) -> dt.datetime:
        # In the zone it was given in: RFC 3501 §6.4.4 BEFORE/ON/SINCE compare its date
        # "disregarding time and timezone", i.e. the date as the client wrote it.
        # Built from the wall-clock time, not the UTC instant: "01-Jan-0001 00:00:00 +2359"
        # is a valid date-time whose instant falls in year 0, which datetime cannot hold.
        minutes = int(self._col("internal_tz"))
        wall = _EPOCH + dt.timedelta(
            milliseconds=int(self._col("internal_date")) + minutes * 60_000
        )
        return wall.replace(tzinfo=dt.timezone(dt.timedelta(minutes=minutes)))

    @property
    def size(self) -> int:
        return int(self._col("size"))

    @property
    def modseq(self) -> int:
        return int(self._col("modseq"))

    def _raw_headers(self) -> list[tuple[bytes, bytes]]:
        if self._headers is None:
            head = self.plan.mailbox.content_head(int(self._col("content_id")))
            msg = parse_message(head)
            self._headers = [(h.lname, h.value) for h in iter_headers(head, 0, msg.root.header_end)]
        return self._headers

    def header(self, name: str) -> list[str]:
        column = _SUMMARY_HEADERS.get(name)
        if column is not None and column in self.plan.index:
            value = self._col(column)
            if value is None:
                return []
            return [str(value)] if column == "subject" else str(value).split("\n")
        wanted = name.encode("ascii", "replace")
        return [decode_header(v) for n, v in self._raw_headers() if n == wanted]

    def contains_text(self, needle: str, *, headers: bool) -> bool:
        """``needle`` (case-folded) in the body text, or for TEXT also in the header."""
        if not needle:
            return True
        if self.uid in self.plan.body_hits(needle):
            return True
        if headers:
            for column in _TEXT_HEADERS:
                value = self._col(column)
                if value is not None and needle in str(value).casefold():
                    return True
            return self._header_contains(needle)
        return False

    def _header_contains(self, needle: str) -> bool:
        """``needle`` in a header field, as ``name: decoded value`` (TEXT)."""
        head = self.plan.mailbox.content_head(int(self._col("content_id")))
        # Without encoded words a decoded field is its raw bytes unfolded: a needle absent
        # from the unfolded block is in no field (the common case, decided undecoded).
        plain = needle.isascii() and ":" not in needle and head.isascii() and b"=?" not in head
        if plain and needle.encode() not in head.replace(b"\r", b"").replace(b"\n", b"").lower():
            return False
        if self._headers is None:
            msg = parse_message(head)
            self._headers = [(h.lname, h.value) for h in iter_headers(head, 0, msg.root.header_end)]
        for name, value in self._headers:
            field = name.decode("ascii", "replace") + ": " + decode_header(value)
            if needle in field.casefold():
                return True
        return False
