"""Parser of framed IMAP commands into typed command objects.

Grammar references are to RFC 9051 §9 (formal syntax) unless noted; extensions cite
their own RFCs.  The parser is a hand-written recursive descent over a cursor that walks
the line segments of a :class:`~mailfort.imap.wire.RawCommand` and steps into its
literals where the line announces one.

:func:`parse_command` never raises for bad input: every syntax problem becomes a
:class:`ParseError` that serialises to the tagged ``BAD`` (or ``NO`` for an unsupported
charset) response the server must send.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, NoReturn

from mailfort.imap import commands as c
from mailfort.imap.mailbox import MailboxNameError, decode_mailbox
from mailfort.imap.sequence import SequenceSet
from mailfort.imap.wire import FrameError, Framer, RawCommand

__all__ = [
    "SUPPORTED_CHARSETS",
    "ParseError",
    "parse_command",
    "parse_one",
]

#: RFC 9051 §6.4.4: US-ASCII and UTF-8 MUST be supported; nothing else is.
SUPPORTED_CHARSETS: Final = ("US-ASCII", "UTF-8")


@dataclass(frozen=True, slots=True)
class ParseError:
    """A command that cannot be run; :meth:`response` is the reply to send."""

    tag: str
    text: str
    status: Literal["BAD", "NO"] = "BAD"
    code: str | None = None

    def response(self) -> bytes:
        code = f"[{self.code}] " if self.code else ""
        return f"{self.tag} {self.status} {code}{self.text}\r\n".encode("ascii", "replace")


class _Fail(Exception):
    def __init__(self, text: str, status: Literal["BAD", "NO"] = "BAD", code: str | None = None):
        super().__init__(text)
        self.text = text
        self.status: Literal["BAD", "NO"] = status
        self.code = code


def _fail(text: str) -> NoReturn:
    raise _Fail(text)


def _short(text: str) -> str:
    """Client text echoed in a reply, cut short so a reply line stays small."""
    return text if len(text) <= 32 else text[:32] + "..."


# --------------------------------------------------------------------------- lexing

# RFC 9051 §9: ATOM-CHAR is any CHAR (0x01-0x7f) except atom-specials:
#   "(" / ")" / "{" / SP / CTL / "%" / "*" / DQUOTE / "\" / "]".
_ATOM_CLASS = rb"\x21\x23\x24\x26\x27\x2b-\x5b\x5e-\x7a\x7c-\x7e"
_ATOM_RE = re.compile(rb"[" + _ATOM_CLASS + rb"]+")
# ASTRING-CHAR adds "]".
_ASTRING_RE = re.compile(rb"[" + _ATOM_CLASS + rb"\x5d]+")
# list-char adds the wildcards "%" / "*" and "]" (RFC 9051 §9 list-mailbox).
_LIST_RE = re.compile(rb"[" + _ATOM_CLASS + rb"\x5d\x25\x2a]+")
_TAG_RE = re.compile(rb"[\x21\x23\x24\x26\x27\x2c-\x5b\x5d-\x7a\x7c-\x7e]+")
# quoted = DQUOTE *QUOTED-CHAR DQUOTE; QUOTED-CHAR excludes CR, LF and NUL; only " and \
# may be escaped.  8-bit octets are allowed here and validated as UTF-8 by the caller
# (RFC 9051 §9 admits UTF8-2/3/4 in quoted strings; RFC 6855 §3).
_QUOTED_RE = re.compile(rb'"((?:[^"\\\r\n\x00]|\\["\\])*)"')
_UNESCAPE_RE = re.compile(rb"\\([\"\\])")
_LITERAL_RE = re.compile(rb"(~?)\{([0-9]{1,20})(\+?)\}\Z")
_NUMBER_RE = re.compile(rb"[0-9]+")
_SEQSET_RE = re.compile(rb"[0-9*:,$]+")
_FETCH_NAME_RE = re.compile(rb"[A-Za-z0-9.]+")
_SECTION_SPEC_RE = re.compile(rb"[A-Za-z0-9.]*")
_DATE_RE = re.compile(rb"([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})")
_DATE_TIME_RE = re.compile(
    rb'"([ 0-9][0-9])-([A-Za-z]{3})-([0-9]{4}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) ([+-])([0-9]{2})([0-9]{2})"'
)
_MONTHS: Final = {
    m: i + 1
    for i, m in enumerate(
        (
            b"JAN",
            b"FEB",
            b"MAR",
            b"APR",
            b"MAY",
            b"JUN",
            b"JUL",
            b"AUG",
            b"SEP",
            b"OCT",
            b"NOV",
            b"DEC",
        )
    )
}

MAX_NUMBER: Final = 4294967295  # RFC 9051 §9 number
MAX_NUMBER64: Final = 9223372036854775807  # RFC 9051 §9 number64 / RFC 7162 mod-sequence-value


class _Cursor:
    """Position in a framed command: a line segment index and an offset in it."""

    __slots__ = ("li", "line", "lines", "literals", "pos", "utf8")

    def __init__(self, raw: RawCommand, *, utf8: bool) -> None:
        self.lines = raw.lines
        self.literals = raw.literals
        self.li = 0
        self.line = raw.lines[0]
        self.pos = 0
        self.utf8 = utf8

    # -- primitives ---------------------------------------------------------------

    def peek(self) -> int:
        return self.line[self.pos] if self.pos < len(self.line) else -1

    def at_end(self) -> bool:
        return self.pos >= len(self.line) and self.li == len(self.lines) - 1

    def end(self) -> None:
        if not self.at_end():
            _fail("Unexpected extra arguments")

    def sp(self) -> None:
        if self.peek() != 0x20:
            _fail("Expected a space")
        self.pos += 1

    def try_sp(self) -> bool:
        if self.peek() == 0x20:
            self.pos += 1
            return True
        return False

    def char(self, ch: bytes) -> None:
        if self.peek() != ch[0]:
            _fail(f"Expected {ch.decode()!r}")
        self.pos += 1

    def try_char(self, ch: bytes) -> bool:
        if self.peek() == ch[0]:
            self.pos += 1
            return True
        return False

    def match(self, rx: re.Pattern[bytes]) -> re.Match[bytes] | None:
        m = rx.match(self.line, self.pos)
        if m is not None:
            self.pos = m.end()
        return m

    def take(self, rx: re.Pattern[bytes], what: str) -> bytes:
        m = self.match(rx)
        if m is None or m.end() == m.start():
            _fail(f"Expected {what}")
        return m.group(0)

    def keyword(self, word: bytes) -> bool:
        """Consume ``word`` case-insensitively if it is next and not a prefix of an atom."""
        end = self.pos + len(word)
        if self.line[self.pos : end].upper() != word:
            return False
        nxt = self.line[end : end + 1]
        if nxt and _ATOM_RE.match(nxt):
            return False
        self.pos = end
        return True

    # -- IMAP data types ----------------------------------------------------------

    def atom(self) -> bytes:
        return self.take(_ATOM_RE, "an atom")

    def literal(self) -> tuple[bytes, bool]:
        """A literal or literal8 whose announcement ends this line segment (RFC 9051 §4.3)."""
        m = _LITERAL_RE.match(self.line, self.pos)
        if m is None or self.li >= len(self.literals):
            _fail("Invalid literal")
        data = self.literals[self.li]
        self.li += 1
        self.line = self.lines[self.li]
        self.pos = 0
        return data, m.group(1) == b"~"

    def quoted(self) -> bytes:
        m = self.match(_QUOTED_RE)
        if m is None:
            _fail("Invalid quoted string")
        return _UNESCAPE_RE.sub(rb"\1", m.group(1))

    def string(self) -> bytes:
        ch = self.peek()
        if ch == 0x22:
            return self.quoted()
        if ch == 0x7B:  # "{"
            data, binary = self.literal()
            if binary:
                _fail("literal8 is not allowed here")
            return data
        _fail("Expected a string")

    def astring(self) -> bytes:
        if self.peek() in (0x22, 0x7B):
            return self.string()
        return self.take(_ASTRING_RE, "an atom or string")

    def nstring(self) -> bytes | None:
        if self.keyword(b"NIL"):
            return None
        return self.string()

    def number(self, maximum: int = MAX_NUMBER) -> int:
        digits = self.take(_NUMBER_RE, "a number")
        if len(digits) > len(str(maximum)) or int(digits) > maximum:
            _fail("Number out of range")
        return int(digits)

    def nz_number(self, maximum: int = MAX_NUMBER) -> int:
        n = self.number(maximum)
        if n == 0:
            _fail("Expected a non-zero number")
        return n

    def sequence_set(self) -> SequenceSet:
        token = self.take(_SEQSET_RE, "a sequence set")
        try:
            return SequenceSet.parse(token)
        except ValueError:
            _fail("Invalid sequence set")

    def text(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            _fail("Invalid UTF-8")

    def mailbox(self) -> str:
        raw = self.astring()
        try:
            return decode_mailbox(raw, utf8=self.utf8)
        except MailboxNameError as exc:
            _fail(f"Invalid mailbox name: {exc}")

    def list_mailbox(self) -> str:
        """RFC 9051 §9 list-mailbox: 1*list-char / string, then name decoding."""
        raw = (
            self.string()
            if self.peek() in (0x22, 0x7B)
            else self.take(_LIST_RE, "a mailbox pattern")
        )
        if not raw:
            return ""
        try:
            return decode_mailbox(raw, utf8=self.utf8)
        except MailboxNameError as exc:
            _fail(f"Invalid mailbox pattern: {exc}")

    def paren_list(self, item: Callable[[], object], *, allow_empty: bool = True) -> list[object]:
        self.char(b"(")
        out: list[object] = []
        if self.try_char(b")"):
            if not allow_empty:
                _fail("Empty list")
            return out
        out.append(item())
        while self.try_sp():
            out.append(item())
        self.char(b")")
        return out

    def atom_list(self) -> list[str]:
        return [str(x) for x in self.paren_list(lambda: self.atom().decode("ascii").upper())]

    def date(self) -> dt.date:
        """RFC 9051 §9 date = date-text / DQUOTE date-text DQUOTE."""
        quoted = self.try_char(b'"')
        m = self.match(_DATE_RE)
        if m is None:
            _fail("Invalid date")
        if quoted:
            self.char(b'"')
        month = _MONTHS.get(m.group(2).upper())
        if month is None:
            _fail("Invalid month")
        try:
            return dt.date(int(m.group(3)), month, int(m.group(1)))
        except ValueError:
            _fail("Invalid date")

    def date_time(self) -> dt.datetime:
        """RFC 9051 §9 date-time, e.g. ``"17-Jul-1996 02:44:25 -0700"``."""
        m = self.match(_DATE_TIME_RE)
        if m is None:
            _fail("Invalid date-time")
        day, mon, year, hh, mm, ss, sign, zh, zm = m.groups()
        month = _MONTHS.get(mon.upper())
        if month is None:
            _fail("Invalid month")
        offset = dt.timedelta(hours=int(zh), minutes=int(zm))
        if offset >= dt.timedelta(hours=24) or int(zm) >= 60:
            _fail("Invalid time zone")
        tz = dt.timezone(-offset if sign == b"-" else offset)
        try:
            return dt.datetime(
                int(year), month, int(day.strip()), int(hh), int(mm), int(ss), tzinfo=tz
            )
        except ValueError:
            _fail("Invalid date-time")


# --------------------------------------------------------------------------- flags

# RFC 9051 §2.3.2: system flags; matched case-insensitively, stored in canonical case.
_SYSTEM_FLAGS: Final = {
    f.upper(): f for f in ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")
}
_SPECIAL_USE: Final = {
    f.upper(): f
    for f in (
        "\\All",
        "\\Archive",
        "\\Drafts",
        "\\Flagged",
        "\\Junk",
        "\\Sent",
        "\\Trash",
        "\\Important",  # RFC 8457
    )
}


def _flag(cur: _Cursor) -> str:
    """RFC 9051 §9 flag, for STORE and APPEND (no ``\\Recent``, no ``\\*``)."""
    if cur.try_char(b"\\"):
        name = "\\" + cur.atom().decode("ascii")
        canon = _SYSTEM_FLAGS.get(name.upper())
        if canon is None:
            # RFC 9051 §2.3.2: \Recent cannot be set by a client; other \-names are
            # reserved for future system flags, which this server does not know.
            _fail(f"Invalid system flag {_short(name)}")
        return canon
    return cur.atom().decode("ascii")


def _flag_list(cur: _Cursor) -> tuple[str, ...]:
    return tuple(str(f) for f in cur.paren_list(lambda: _flag(cur)))


# --------------------------------------------------------------------------- commands


def _no_args(
    cls: type[
        c.Capability
        | c.Noop
        | c.Logout
        | c.StartTLS
        | c.Namespace
        | c.Idle
        | c.Check
        | c.Close
        | c.Unselect
        | c.Expunge
    ],
) -> Callable[[_Cursor, str], c.Command]:
    def parse(cur: _Cursor, tag: str) -> c.Command:
        cur.end()
        return cls(tag)

    return parse


def _login(cur: _Cursor, tag: str) -> c.Command:
    # RFC 9051 §6.2.3: LOGIN SP userid SP password, both astrings.
    cur.sp()
    user = cur.text(cur.astring())
    cur.sp()
    password = cur.text(cur.astring())
    cur.end()
    return c.Login(tag, user, password)


def _authenticate(cur: _Cursor, tag: str) -> c.Command:
    # RFC 9051 §6.2.2 with RFC 4959 SASL-IR: AUTHENTICATE SP mech [SP (base64 / "=")].
    cur.sp()
    mech = cur.atom().decode("ascii").upper()
    initial: bytes | None = None
    if cur.try_sp():
        token = cur.atom()
        if token == b"=":
            initial = b""
        else:
            initial = decode_base64(token)
            if initial is None:
                _fail("Invalid base64 in initial response")
    cur.end()
    return c.Authenticate(tag, mech, initial)


def decode_base64(token: bytes) -> bytes | None:
    """Strict base64 of a SASL line (RFC 9051 §6.2.2); None if it is not base64."""
    try:
        return base64.b64decode(token, validate=True)
    except (binascii.Error, ValueError):
        return None


def _enable(cur: _Cursor, tag: str) -> c.Command:
    # RFC 5161 §3.1: ENABLE 1*(SP capability)
    caps: list[str] = []
    cur.sp()
    caps.append(cur.atom().decode("ascii").upper())
    while cur.try_sp():
        caps.append(cur.atom().decode("ascii").upper())
    cur.end()
    return c.Enable(tag, tuple(caps))


def _select(read_only: bool) -> Callable[[_Cursor, str], c.Command]:
    def parse(cur: _Cursor, tag: str) -> c.Command:
        cur.sp()
        mailbox = cur.mailbox()
        condstore = False
        qresync: c.QResync | None = None
        if cur.try_sp():
            # RFC 4466 §2.2 select-params; RFC 7162 §3.1.8 CONDSTORE, §3.2.5 QRESYNC.
            cur.char(b"(")
            while True:
                if cur.keyword(b"CONDSTORE"):
                    condstore = True
                elif cur.keyword(b"QRESYNC"):
                    if qresync is not None:
                        _fail("QRESYNC given twice")
                    cur.sp()
                    qresync = _qresync(cur)
                else:
                    _fail("Unknown SELECT parameter")
                if not cur.try_sp():
                    break
            cur.char(b")")
        cur.end()
        return c.Select(tag, mailbox, read_only, condstore, qresync)

    return parse


def _qresync(cur: _Cursor) -> c.QResync:
    # RFC 7162 §3.2.5: "(" uidvalidity SP mod-sequence-value [SP known-uids]
    #                  [SP seq-match-data] ")"
    cur.char(b"(")
    uidvalidity = cur.nz_number()
    cur.sp()
    modseq = cur.nz_number(MAX_NUMBER64)
    known_uids = known_seqs = known_seq_uids = None
    if cur.try_sp():
        if cur.peek() != 0x28:
            known_uids = cur.sequence_set()
            if known_uids.saved:
                _fail("$ is not allowed here")
        if cur.peek() == 0x28 or cur.try_sp():
            cur.char(b"(")
            known_seqs = cur.sequence_set()
            cur.sp()
            known_seq_uids = cur.sequence_set()
            cur.char(b")")
    cur.char(b")")
    return c.QResync(uidvalidity, modseq, known_uids, known_seqs, known_seq_uids)


def _create(cur: _Cursor, tag: str) -> c.Command:
    cur.sp()
    mailbox = cur.mailbox()
    uses: list[str] = []
    if cur.try_sp():
        # RFC 4466 create-params; RFC 6154 §3: USE (special-use attributes).
        cur.char(b"(")
        if not cur.keyword(b"USE"):
            _fail("Unknown CREATE parameter")
        cur.sp()

        def use_attr() -> str:
            cur.char(b"\\")
            name = "\\" + cur.atom().decode("ascii")
            canon = _SPECIAL_USE.get(name.upper())
            if canon is None:
                raise _Fail("Unknown special-use attribute", "NO", "USEATTR")
            return canon

        uses = [str(u) for u in cur.paren_list(use_attr)]
        cur.char(b")")
    cur.end()
    return c.Create(tag, mailbox, tuple(uses))


def _one_mailbox(
    cls: type[c.Delete | c.Subscribe | c.Unsubscribe | c.GetQuotaRoot],
) -> Callable[[_Cursor, str], c.Command]:
    def parse(cur: _Cursor, tag: str) -> c.Command:
        cur.sp()
        mailbox = cur.mailbox()
        cur.end()
        return cls(tag, mailbox)

    return parse


def _rename(cur: _Cursor, tag: str) -> c.Command:
    cur.sp()
    old = cur.mailbox()
    cur.sp()
    new = cur.mailbox()
    cur.end()
    return c.Rename(tag, old, new)


_SELECT_OPTS: Final = frozenset({"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"})
_STATUS_ITEMS: Final = frozenset(
    {
        "MESSAGES",
        "RECENT",  # RFC 3501 only
        "UIDNEXT",
        "UIDVALIDITY",
        "UNSEEN",
        "DELETED",  # RFC 9051 §6.3.11
        "SIZE",  # RFC 8438 STATUS=SIZE
        "HIGHESTMODSEQ",  # RFC 7162 §3.1.6
        "APPENDLIMIT",  # RFC 7889 §3
        "MAILBOXID",  # RFC 8474 §4.1
    }
)


def _list(cur: _Cursor, tag: str) -> c.Command:
    # RFC 5258 §6: LIST [SP list-select-opts] SP mailbox SP mbox-or-pat [SP list-return-opts]
    cur.sp()
    selection: set[str] = set()
    extended = False
    if cur.peek() == 0x28:
        extended = True
        for opt in cur.atom_list():
            if opt not in _SELECT_OPTS:
                _fail(f"Unknown LIST selection option {_short(opt)}")
            selection.add(opt)
        # RFC 5258 §3.1: RECURSIVEMATCH alone is an error.
        if "RECURSIVEMATCH" in selection and not selection - {"RECURSIVEMATCH", "REMOTE"}:
            _fail("RECURSIVEMATCH needs another selection option")
        cur.sp()
    reference = cur.mailbox() if cur.peek() in (0x22, 0x7B) else cur.list_mailbox()
    cur.sp()
    if cur.peek() == 0x28:
        extended = True
        patterns = tuple(str(p) for p in cur.paren_list(cur.list_mailbox, allow_empty=False))
    else:
        patterns = (cur.list_mailbox(),)
    returns = c.ListReturn()
    if cur.try_sp():
        if not cur.keyword(b"RETURN"):
            _fail("Expected RETURN")
        extended = True
        cur.sp()
        returns = _list_return(cur)
    cur.end()
    # RFC 6154 §2 / RFC 5258 §3.1: selecting SUBSCRIBED implies returning it.
    if "SUBSCRIBED" in selection:
        returns = c.ListReturn(True, returns.children, returns.special_use, returns.status)
    return c.List(tag, reference, patterns, frozenset(selection), returns, extended)


def _list_return(cur: _Cursor) -> c.ListReturn:
    subscribed = children = special_use = False
    status: tuple[str, ...] | None = None
    cur.char(b"(")
    if not cur.try_char(b")"):
        while True:
            if cur.keyword(b"SUBSCRIBED"):
                subscribed = True
            elif cur.keyword(b"CHILDREN"):
                children = True
            elif cur.keyword(b"SPECIAL-USE"):
                special_use = True
            elif cur.keyword(b"STATUS"):
                # RFC 5819 §2: STATUS (status-att ...)
                cur.sp()
                status = _status_items(cur)
            else:
                _fail("Unknown LIST return option")
            if not cur.try_sp():
                break
        cur.char(b")")
    return c.ListReturn(subscribed, children, special_use, status)


def _status_items(cur: _Cursor) -> tuple[str, ...]:
    items = cur.atom_list()
    if not items:
        _fail("Empty STATUS item list")
    for item in items:
        if item not in _STATUS_ITEMS:
            _fail(f"Unknown STATUS item {_short(item)}")
    return tuple(items)


def _lsub(cur: _Cursor, tag: str) -> c.Command:
    cur.sp()
    reference = cur.mailbox() if cur.peek() in (0x22, 0x7B) else cur.list_mailbox()
    cur.sp()
    pattern = cur.list_mailbox()
    cur.end()
    return c.Lsub(tag, reference, pattern)


def _status(cur: _Cursor, tag: str) -> c.Command:
    cur.sp()
    mailbox = cur.mailbox()
    cur.sp()
    items = _status_items(cur)
    cur.end()
    return c.Status(tag, mailbox, items)


def _append(cur: _Cursor, tag: str) -> c.Command:
    # RFC 9051 §6.3.12, RFC 3502 §6.3.11 (MULTIAPPEND): mailbox 1*append-message,
    # append-message = [SP flag-list] [SP date-time] SP (literal / literal8).
    cur.sp()
    mailbox = cur.mailbox()
    messages: list[c.AppendMessage] = []
    while not cur.at_end():
        cur.sp()
        flags: tuple[str, ...] = ()
        date: dt.datetime | None = None
        if cur.peek() == 0x28:
            flags = _flag_list(cur)
            cur.sp()
        if cur.peek() == 0x22:
            date = cur.date_time()
            cur.sp()
        if cur.keyword(b"UTF8"):
            # RFC 6855 §4: append-data =/ "UTF8" SP "(" literal8 ")", a message with
            # UTF-8 headers from a UTF8=ACCEPT client.
            cur.sp()
            cur.char(b"(")
            if cur.peek() != 0x7E:
                _fail("UTF8 needs a literal8")
            data, binary = cur.literal()
            cur.char(b")")
            messages.append(c.AppendMessage(flags, date, data, binary, utf8=True))
            continue
        if cur.peek() not in (0x7B, 0x7E):
            _fail("Expected a message literal")
        data, binary = cur.literal()
        messages.append(c.AppendMessage(flags, date, data, binary))
    if not messages:
        _fail("APPEND needs a message")
    return c.Append(tag, mailbox, tuple(messages))


def _compress(cur: _Cursor, tag: str) -> c.Command:
    cur.sp()
    mech = cur.atom().decode("ascii").upper()
    cur.end()
    return c.Compress(tag, mech)


def _id(cur: _Cursor, tag: str) -> c.Command:
    # RFC 2971 §3.3: ID SP ("(" *(string SP nstring) ")" / NIL), at most 30 pairs,
    # fields of 30 octets, values of 1024 octets.
    cur.sp()
    if cur.keyword(b"NIL"):
        cur.end()
        return c.Id(tag, None)
    cur.char(b"(")
    params: list[tuple[str, str | None]] = []
    if not cur.try_char(b")"):
        while True:
            key = cur.string()
            cur.sp()
            value = cur.nstring()
            if len(key) > 30 or (value is not None and len(value) > 1024):
                _fail("ID field or value too long")
            params.append(
                (
                    key.decode("utf-8", "replace"),
                    None if value is None else value.decode("utf-8", "replace"),
                )
            )
            if len(params) > 30:
                _fail("Too many ID fields")
            if not cur.try_sp():
                break
        cur.char(b")")
    cur.end()
    return c.Id(tag, tuple(params))


def _getquota(cur: _Cursor, tag: str) -> c.Command:
    cur.sp()
    root = cur.text(cur.astring())
    cur.end()
    return c.GetQuota(tag, root)


def _setquota(cur: _Cursor, tag: str) -> c.Command:
    # RFC 9208 §4.1 / §9: SETQUOTA SP quota-root SP "(" [resource SP number64 ...] ")"
    cur.sp()
    root = cur.text(cur.astring())
    cur.sp()

    def limit() -> tuple[str, int]:
        name = cur.atom().decode("ascii").upper()
        cur.sp()
        return name, cur.number(MAX_NUMBER64)

    limits = tuple(x for x in cur.paren_list(limit) if isinstance(x, tuple))
    cur.end()
    return c.SetQuota(tag, root, limits)


def _copy_move(cls: type[c.Copy | c.Move], uid: bool) -> Callable[[_Cursor, str], c.Command]:
    def parse(cur: _Cursor, tag: str) -> c.Command:
        cur.sp()
        seq = cur.sequence_set()
        cur.sp()
        mailbox = cur.mailbox()
        cur.end()
        return cls(tag, uid, seq, mailbox)

    return parse


def _uid_expunge(cur: _Cursor, tag: str) -> c.Command:
    cur.sp()
    seq = cur.sequence_set()
    cur.end()
    return c.UidExpunge(tag, seq)


# -- FETCH ---------------------------------------------------------------------------

_SIMPLE_FETCH: Final = frozenset(
    {
        "ENVELOPE",
        "FLAGS",
        "INTERNALDATE",
        "RFC822",
        "RFC822.HEADER",
        "RFC822.SIZE",
        "RFC822.TEXT",
        "BODY",
        "BODYSTRUCTURE",
        "UID",
        "MODSEQ",  # RFC 7162 §3.1.4
        "EMAILID",  # RFC 8474 §5
        "THREADID",  # RFC 8474 §5
        "SAVEDATE",  # RFC 8514
    }
)
# RFC 9051 §6.4.5: macros, valid only alone.
_FETCH_MACROS: Final = {
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
_SECTION_TEXTS: Final = frozenset({"HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"})


def _fetch_att(cur: _Cursor) -> c.FetchAttribute:
    name = cur.take(_FETCH_NAME_RE, "a fetch attribute").decode("ascii").upper()
    if name in ("BODY", "BODY.PEEK", "BINARY", "BINARY.PEEK", "BINARY.SIZE") and cur.peek() == 0x5B:
        binary = name.startswith("BINARY")
        size_only = name == "BINARY.SIZE"
        section = _section(cur, binary=binary)
        partial: tuple[int, int] | None = None
        if not size_only and cur.try_char(b"<"):
            # RFC 9051 §9 partial = "<" number64 "." nz-number64 ">"
            origin = cur.number(MAX_NUMBER64)
            cur.char(b".")
            length = cur.nz_number(MAX_NUMBER64)
            cur.char(b">")
            partial = (origin, length)
        return c.FetchBody(section, name.endswith(".PEEK"), binary, size_only, partial)
    if name in _SIMPLE_FETCH:
        return c.FetchSimple(name)
    _fail(f"Unknown fetch attribute {_short(name)}")


def _section(cur: _Cursor, *, binary: bool) -> c.Section:
    # RFC 9051 §9 section / RFC 3516 §6 section-binary = "[" [section-part] "]"
    cur.char(b"[")
    spec = cur.match(_SECTION_SPEC_RE)
    text_spec = spec.group(0).decode("ascii").upper() if spec else ""
    part: list[int] = []
    rest = ""
    if text_spec:
        pieces = text_spec.split(".")
        if "" in pieces:
            _fail("Invalid section")
        i = 0
        while i < len(pieces) and pieces[i].isdigit():
            if pieces[i].startswith("0") or len(pieces[i]) > 10 or int(pieces[i]) > MAX_NUMBER:
                _fail("Invalid section part")
            part.append(int(pieces[i]))
            i += 1
        rest = ".".join(pieces[i:])
    if binary and rest:
        _fail("BINARY takes only a part number")
    if rest and rest not in _SECTION_TEXTS:
        _fail(f"Invalid section {_short(text_spec)}")
    if rest == "MIME" and not part:
        _fail("MIME needs a part number")
    fields: tuple[str, ...] = ()
    if rest.startswith("HEADER.FIELDS"):
        cur.sp()
        # header-list = "(" header-fld-name *(SP header-fld-name) ")", astrings.  The
        # client's spelling is kept: the response echoes the section as requested
        # (RFC 9051 §7.5.2) and some clients match it literally.
        fields = tuple(
            str(f) for f in cur.paren_list(lambda: cur.text(cur.astring()), allow_empty=False)
        )
    cur.char(b"]")
    return c.Section(tuple(part), rest or None, fields)


def _fetch(uid: bool) -> Callable[[_Cursor, str], c.Command]:
    def parse(cur: _Cursor, tag: str) -> c.Command:
        cur.sp()
        seq = cur.sequence_set()
        cur.sp()
        macro: str | None = None
        attrs: list[c.FetchAttribute]
        if cur.peek() == 0x28:
            attrs = [
                a
                for a in cur.paren_list(lambda: _fetch_att(cur), allow_empty=False)
                if isinstance(a, c.FetchSimple | c.FetchBody)
            ]
        else:
            for name in _FETCH_MACROS:
                if cur.keyword(name.encode()):
                    macro = name
                    break
            if macro is not None:
                attrs = [c.FetchSimple(n) for n in _FETCH_MACROS[macro]]
            else:
                attrs = [_fetch_att(cur)]
        changed_since: int | None = None
        vanished = False
        if cur.try_sp():
            # RFC 7162 §3.1.4.1 / §3.2.6: fetch-modifiers
            cur.char(b"(")
            while True:
                if cur.keyword(b"CHANGEDSINCE"):
                    cur.sp()
                    changed_since = cur.nz_number(MAX_NUMBER64)
                elif cur.keyword(b"VANISHED"):
                    vanished = True
                else:
                    _fail("Unknown FETCH modifier")
                if not cur.try_sp():
                    break
            cur.char(b")")
        cur.end()
        if vanished and (not uid or changed_since is None):
            # RFC 7162 §3.2.6: VANISHED only in UID FETCH, and only with CHANGEDSINCE.
            _fail("VANISHED requires UID FETCH with CHANGEDSINCE")
        # RFC 9051 §6.4.9: UID FETCH responses always include UID; RFC 7162 §3.1.4.1:
        # CHANGEDSINCE implies MODSEQ.  Adding them here keeps servers from forgetting.
        names = {a.name for a in attrs if isinstance(a, c.FetchSimple)}
        if uid and "UID" not in names:
            attrs.append(c.FetchSimple("UID"))
        if changed_since is not None and "MODSEQ" not in names:
            attrs.append(c.FetchSimple("MODSEQ"))
        return c.Fetch(tag, uid, seq, tuple(attrs), changed_since, vanished, macro)

    return parse


# -- STORE ---------------------------------------------------------------------------

_STORE_RE = re.compile(rb"([+-]?)FLAGS(\.SILENT)?", re.IGNORECASE)


def _store(uid: bool) -> Callable[[_Cursor, str], c.Command]:
    def parse(cur: _Cursor, tag: str) -> c.Command:
        cur.sp()
        seq = cur.sequence_set()
        cur.sp()
        unchanged_since: int | None = None
        if cur.peek() == 0x28:
            # RFC 7162 §3.1.3: store-modifier UNCHANGEDSINCE mod-sequence-valzer
            cur.char(b"(")
            if not cur.keyword(b"UNCHANGEDSINCE"):
                _fail("Unknown STORE modifier")
            cur.sp()
            unchanged_since = cur.number(MAX_NUMBER64)
            cur.char(b")")
            cur.sp()
        m = cur.match(_STORE_RE)
        if m is None:
            _fail("Expected FLAGS, +FLAGS or -FLAGS")
        cur.sp()
        if cur.peek() == 0x28:
            flags = _flag_list(cur)
        else:
            # store-att-flags also allows flags without parentheses.
            items = [_flag(cur)]
            while cur.try_sp():
                items.append(_flag(cur))
            flags = tuple(items)
        cur.end()
        sign = m.group(1)
        mode: Literal["+", "-", ""] = "+" if sign == b"+" else "-" if sign == b"-" else ""
        return c.Store(tag, uid, seq, mode, m.group(2) is not None, flags, unchanged_since)

    return parse


# -- SEARCH --------------------------------------------------------------------------

_RETURN_OPTS: Final = frozenset({"MIN", "MAX", "ALL", "COUNT", "SAVE"})
_FLAG_KEYS: Final = {
    "ANSWERED": ("\\Answered", True),
    "DELETED": ("\\Deleted", True),
    "DRAFT": ("\\Draft", True),
    "FLAGGED": ("\\Flagged", True),
    "SEEN": ("\\Seen", True),
    "RECENT": ("\\Recent", True),
    "UNANSWERED": ("\\Answered", False),
    "UNDELETED": ("\\Deleted", False),
    "UNDRAFT": ("\\Draft", False),
    "UNFLAGGED": ("\\Flagged", False),
    "UNSEEN": ("\\Seen", False),
}
_HEADER_KEYS: Final = {"BCC": "bcc", "CC": "cc", "FROM": "from", "SUBJECT": "subject", "TO": "to"}
_DATE_KEYS: Final[dict[str, tuple[Literal["before", "on", "since"], bool]]] = {
    "BEFORE": ("before", False),
    "ON": ("on", False),
    "SINCE": ("since", False),
    "SENTBEFORE": ("before", True),
    "SENTON": ("on", True),
    "SENTSINCE": ("since", True),
}
# Nesting bound: a hostile "NOT NOT NOT ..." must not exhaust the Python stack.
_MAX_SEARCH_DEPTH: Final = 64


class _SearchParser:
    def __init__(self, cur: _Cursor, charset: str | None) -> None:
        self.cur = cur
        self.charset = charset

    def string(self) -> str:
        raw = self.cur.astring()
        if self.charset == "US-ASCII" and not raw.isascii():
            _fail("Search string is not US-ASCII")
        # RFC 9051 §6.4.4: without CHARSET, US-ASCII is meant; UTF-8 is a superset, and
        # IMAP4rev2 clients send UTF-8, so decode as UTF-8 either way.
        return self.cur.text(raw)

    def program(self) -> c.SearchKey:
        keys = [self.key(0)]
        while self.cur.try_sp():
            keys.append(self.key(0))
        self.cur.end()
        return keys[0] if len(keys) == 1 else c.SearchAnd(tuple(keys))

    def key(self, depth: int) -> c.SearchKey:
        if depth > _MAX_SEARCH_DEPTH:
            _fail("Search program nested too deeply")
        cur = self.cur
        ch = cur.peek()
        if ch == 0x28:
            cur.pos += 1
            keys = [self.key(depth + 1)]
            while cur.try_sp():
                keys.append(self.key(depth + 1))
            cur.char(b")")
            return keys[0] if len(keys) == 1 else c.SearchAnd(tuple(keys))
        if ch >= 0 and ch in b"0123456789*$":
            return c.SearchSequence(cur.sequence_set())
        word = cur.atom().decode("ascii").upper()
        if word == "ALL":
            return c.SearchAll()
        if word in _FLAG_KEYS:
            flag, present = _FLAG_KEYS[word]
            return c.SearchFlag(flag, present)
        if word == "NEW":  # RFC 3501 §6.4.4: RECENT and UNSEEN
            return c.SearchAnd((c.SearchFlag("\\Recent"), c.SearchFlag("\\Seen", False)))
        if word == "OLD":  # RFC 3501 §6.4.4: NOT RECENT
            return c.SearchFlag("\\Recent", False)
        if word in ("KEYWORD", "UNKEYWORD"):
            cur.sp()
            return c.SearchFlag(cur.atom().decode("ascii"), word == "KEYWORD")
        if word in _HEADER_KEYS:
            cur.sp()
            return c.SearchHeader(_HEADER_KEYS[word], self.string())
        if word == "HEADER":
            cur.sp()
            name = self.string().lower()
            cur.sp()
            return c.SearchHeader(name, self.string())
        if word in ("BODY", "TEXT"):
            cur.sp()
            return c.SearchText(self.string(), word == "TEXT")
        if word in _DATE_KEYS:
            op, sent = _DATE_KEYS[word]
            cur.sp()
            return c.SearchDate(op, cur.date(), sent)
        if word in ("OLDER", "YOUNGER"):  # RFC 5032 §3
            cur.sp()
            return c.SearchWithin("older" if word == "OLDER" else "younger", cur.nz_number())
        if word in ("LARGER", "SMALLER"):
            cur.sp()
            return c.SearchSize(
                "larger" if word == "LARGER" else "smaller", cur.number(MAX_NUMBER64)
            )
        if word == "UID":
            cur.sp()
            return c.SearchSequence(cur.sequence_set(), uid=True)
        if word == "NOT":
            cur.sp()
            return c.SearchNot(self.key(depth + 1))
        if word == "OR":
            cur.sp()
            left = self.key(depth + 1)
            cur.sp()
            return c.SearchOr(left, self.key(depth + 1))
        if word == "MODSEQ":
            return self.modseq()
        if word == "EMAILID":  # RFC 8474 §6
            cur.sp()
            return c.SearchObjectId("EMAILID", cur.atom().decode("ascii"))
        if word == "THREADID":
            cur.sp()
            return c.SearchObjectId("THREADID", cur.atom().decode("ascii"))
        _fail(f"Unknown search key {_short(word)}")

    def modseq(self) -> c.SearchKey:
        # RFC 7162 §3.1.5: MODSEQ [SP entry-name SP entry-type-req] SP mod-sequence-valzer
        cur = self.cur
        cur.sp()
        entry = entry_type = None
        if cur.peek() == 0x22:
            entry = cur.text(cur.quoted())
            cur.sp()
            entry_type = cur.atom().decode("ascii").lower()
            if entry_type not in ("priv", "shared", "all"):
                _fail("Invalid MODSEQ entry type")
            cur.sp()
        return c.SearchModSeq(cur.number(MAX_NUMBER64), entry, entry_type)


def _search(uid: bool) -> Callable[[_Cursor, str], c.Command]:
    def parse(cur: _Cursor, tag: str) -> c.Command:
        cur.sp()
        returns: tuple[str, ...] | None = None
        if cur.keyword(b"RETURN"):
            # RFC 4731 §3.1 / RFC 9051 §6.4.4: RETURN (opts); RETURN () means ALL.
            cur.sp()
            opts = cur.atom_list()
            for opt in opts:
                if opt not in _RETURN_OPTS:
                    _fail(f"Unknown SEARCH return option {_short(opt)}")
            returns = tuple(dict.fromkeys(opts))
            cur.sp()
        charset: str | None = None
        if cur.keyword(b"CHARSET"):
            cur.sp()
            charset = cur.text(cur.astring()).upper()
            if charset in ("UTF8", "ASCII"):  # common aliases, harmless to accept
                charset = "UTF-8" if charset == "UTF8" else "US-ASCII"
            if charset not in SUPPORTED_CHARSETS:
                # RFC 9051 §6.4.4: an unsupported charset is NO [BADCHARSET], not BAD.
                raise _Fail(
                    "Unsupported charset", "NO", "BADCHARSET (" + " ".join(SUPPORTED_CHARSETS) + ")"
                )
            cur.sp()
        criteria = _SearchParser(cur, charset).program()
        return c.Search(tag, uid, criteria, charset, returns)

    return parse


def _uid(cur: _Cursor, tag: str) -> c.Command:
    # RFC 9051 §6.4.9: UID SP (copy / move / fetch / search / store / uid-expunge)
    cur.sp()
    word = cur.atom().decode("ascii").upper()
    sub = _UID_COMMANDS.get(word)
    if sub is None:
        _fail(f"Unknown UID command {_short(word)}")
    return sub(cur, tag)


_Parser = Callable[[_Cursor, str], c.Command]

_UID_COMMANDS: Final[dict[str, _Parser]] = {
    "COPY": _copy_move(c.Copy, True),
    "MOVE": _copy_move(c.Move, True),
    "FETCH": _fetch(True),
    "SEARCH": _search(True),
    "STORE": _store(True),
    "EXPUNGE": _uid_expunge,
}

_COMMANDS: Final[dict[str, _Parser]] = {
    "CAPABILITY": _no_args(c.Capability),
    "NOOP": _no_args(c.Noop),
    "LOGOUT": _no_args(c.Logout),
    "STARTTLS": _no_args(c.StartTLS),
    "AUTHENTICATE": _authenticate,
    "LOGIN": _login,
    "ENABLE": _enable,
    "SELECT": _select(False),
    "EXAMINE": _select(True),
    "CREATE": _create,
    "DELETE": _one_mailbox(c.Delete),
    "RENAME": _rename,
    "SUBSCRIBE": _one_mailbox(c.Subscribe),
    "UNSUBSCRIBE": _one_mailbox(c.Unsubscribe),
    "LIST": _list,
    "LSUB": _lsub,
    "NAMESPACE": _no_args(c.Namespace),
    "STATUS": _status,
    "APPEND": _append,
    "IDLE": _no_args(c.Idle),
    "CHECK": _no_args(c.Check),
    "CLOSE": _no_args(c.Close),
    "UNSELECT": _no_args(c.Unselect),
    "EXPUNGE": _no_args(c.Expunge),
    "SEARCH": _search(False),
    "FETCH": _fetch(False),
    "STORE": _store(False),
    "COPY": _copy_move(c.Copy, False),
    "MOVE": _copy_move(c.Move, False),
    "UID": _uid,
    "ID": _id,
    "GETQUOTA": _getquota,
    "GETQUOTAROOT": _one_mailbox(c.GetQuotaRoot),
    "SETQUOTA": _setquota,
    "COMPRESS": _compress,
}

_NAME_RE = re.compile(rb"[A-Za-z]+")


def parse_command(raw: RawCommand, *, utf8: bool = False) -> c.Command | ParseError:
    """Parse one framed command.

    ``utf8`` says mailbox names are UTF-8 rather than modified UTF-7 (the client
    enabled IMAP4rev2 or UTF8=ACCEPT).  Returns a command or the error to answer with.
    """
    cur = _Cursor(raw, utf8=utf8)
    m = cur.match(_TAG_RE)
    if m is None:
        return ParseError("*", "Missing or invalid tag")
    tag = m.group(0).decode("ascii")
    try:
        cur.sp()
        name = cur.take(_NAME_RE, "a command name").decode("ascii").upper()
        parser = _COMMANDS.get(name)
        if parser is None:
            return ParseError(tag, f"Unknown command {_short(name)}")
        return parser(cur, tag)
    except _Fail as exc:
        return ParseError(tag, exc.text, exc.status, exc.code)
    except RecursionError:
        return ParseError(tag, "Command nested too deeply")


def parse_one(data: bytes, *, utf8: bool = False) -> c.Command | ParseError | FrameError:
    """Frame and parse one complete command given as bytes (for tests and tools).

    Synchronising literals are accepted as if the continuation had been sent.
    """
    framer = Framer()
    framer.receive_data(data)
    while True:
        event = framer.next_event()
        if event is None:
            return ParseError("*", "Incomplete command")
        if isinstance(event, FrameError):
            return event
        if isinstance(event, RawCommand):
            return parse_command(event, utf8=utf8)
