"""IMAP server responses as values that serialise to bytes (RFC 9051 §7).

Response data is a small tree of values rendered by :func:`render`:

=====================  =========================================================
Python value           wire form
=====================  =========================================================
``None``               ``NIL``
``int``                a number
``str``                a string: quoted if safe, else a literal (RFC 9051 §4.3)
``bytes``              a string of octets: quoted if short and 7-bit, else literal
``list``/``tuple``     a parenthesised list
:class:`Atom`          the text as is (flags, keywords, capability names)
:class:`Literal`       always a literal; ``binary`` makes it ``~{N}`` (RFC 3516)
:class:`MailboxName`   a mailbox name, mUTF-7 or UTF-8 per the client (RFC 9051 §5.1)
:class:`Raw`           pre-rendered bytes, the escape hatch
=====================  =========================================================

``utf8`` (passed to every ``to_bytes``) says the client enabled IMAP4rev2 or
UTF8=ACCEPT: quoted strings may then carry UTF-8 and mailbox names are not mUTF-7.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from mailfort.imap.mailbox import INBOX, encode_mailbox
from mailfort.imap.sequence import SequenceSet

__all__ = [
    "Atom",
    "ContinuationResponse",
    "DataResponse",
    "Literal",
    "MailboxName",
    "Raw",
    "Response",
    "ResponseCode",
    "Status",
    "StatusResponse",
    "TaggedResponse",
    "Value",
    "address",
    "astring",
    "bye",
    "capability",
    "enabled",
    "envelope",
    "esearch",
    "exists",
    "expunge",
    "fetch",
    "flags",
    "format_datetime",
    "id_response",
    "list_response",
    "lsub_response",
    "namespace",
    "quota",
    "quotaroot",
    "recent",
    "render",
    "search",
    "status",
    "string",
    "vanished",
]


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Atom:
    """Text sent as is.  Only for server-chosen tokens: never put client text here."""

    text: str


@dataclass(frozen=True, slots=True)
class Literal:
    """Octets always sent as a literal; ``binary`` selects literal8 (RFC 3516 §4.2)."""

    data: bytes
    binary: bool = False


@dataclass(frozen=True, slots=True)
class MailboxName:
    """A mailbox name, encoded for the client at serialisation time."""

    name: str


@dataclass(frozen=True, slots=True)
class Raw:
    data: bytes


Value: TypeAlias = (
    int
    | str
    | bytes
    | Atom
    | Literal
    | MailboxName
    | Raw
    | list["Value"]
    | tuple["Value", ...]
    | None
)

# Quoted strings: at most this long, else a literal (keeps response lines short).
_MAX_QUOTED = 1024
# ASTRING-CHAR (RFC 9051 §9): ATOM-CHAR plus "]".
_ASTRING_RE = re.compile(r"[\x21\x23\x24\x26\x27\x2b-\x5b\x5d-\x7a\x7c-\x7e]+\Z")


def _literal(data: bytes, *, binary: bool = False) -> bytes:
    # RFC 9051 §4.3: "{" number "}" CRLF *CHAR8; RFC 3516 §4.2: "~{" number "}" for literal8.
    return (b"~" if binary else b"") + b"{%d}\r\n" % len(data) + data


def string(value: str | bytes, *, utf8: bool = False) -> bytes:
    """Render an IMAP ``string`` choosing quoted or literal form (RFC 9051 §4.3).

    Quoted strings cannot hold CR, LF or NUL, and before UTF8=ACCEPT/IMAP4rev2 they
    are 7-bit only; anything else, and anything long, goes out as a literal.
    """
    data = value.encode("utf-8") if isinstance(value, str) else value
    if b"\x00" in data:
        # Only literal8 may carry NUL (RFC 3516 §4.2); a plain string cannot.
        return _literal(data, binary=True)
    short = len(data) <= _MAX_QUOTED and b"\r" not in data and b"\n" not in data
    if short and (data.isascii() or (utf8 and _is_utf8(data))):
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return _literal(data)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def astring(value: str, *, utf8: bool = False) -> bytes:
    """An atom when the text allows it (never ``NIL``), else a string."""
    if _ASTRING_RE.match(value) and value.upper() != "NIL":
        return value.encode("ascii")
    return string(value, utf8=utf8)


def render(value: Value, *, utf8: bool = False) -> bytes:
    """Serialise one response value (see the module docstring)."""
    if value is None:
        return b"NIL"
    if isinstance(value, bool):
        raise TypeError("booleans have no IMAP form")
    if isinstance(value, int):
        return str(value).encode("ascii")
    if isinstance(value, str | bytes):
        return string(value, utf8=utf8)
    if isinstance(value, Atom):
        return value.text.encode("utf-8" if utf8 else "ascii")
    if isinstance(value, Literal):
        return _literal(value.data, binary=value.binary)
    if isinstance(value, MailboxName):
        if value.name == INBOX:
            return b"INBOX"
        return astring(encode_mailbox(value.name, utf8=utf8), utf8=utf8)
    if isinstance(value, Raw):
        return value.data
    return b"(" + b" ".join(render(v, utf8=utf8) for v in value) + b")"


def format_datetime(when: dt.datetime) -> str:
    """RFC 9051 §9 date-time text, e.g. ``17-Jul-1996 02:44:25 -0700``."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    offset = when.utcoffset() or dt.timedelta(0)
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    minutes = abs(minutes)
    month = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")[
        when.month - 1
    ]
    return (
        f"{when.day:02d}-{month}-{when.year:04d} {when.hour:02d}:{when.minute:02d}:"
        f"{when.second:02d} {sign}{minutes // 60:02d}{minutes % 60:02d}"
    )


# --------------------------------------------------------------------------- responses


class Status(enum.Enum):
    """RFC 9051 §7.1 status responses."""

    OK = "OK"
    NO = "NO"
    BAD = "BAD"
    PREAUTH = "PREAUTH"
    BYE = "BYE"


@dataclass(frozen=True, slots=True)
class ResponseCode:
    """A response code in brackets (RFC 9051 §7.1), e.g. ``[UIDNEXT 4392]``.

    ``args`` is rendered as given, so build codes with the class methods below.
    """

    name: str
    args: str | None = None

    def to_bytes(self) -> bytes:
        inner = self.name if self.args is None else f"{self.name} {self.args}"
        return b"[" + _text(inner).replace(b"]", b"") + b"]"

    # RFC 9051 §7.1 -----------------------------------------------------------------
    @classmethod
    def alert(cls) -> ResponseCode:
        return cls("ALERT")

    @classmethod
    def capability(cls, caps: Iterable[str]) -> ResponseCode:
        return cls("CAPABILITY", " ".join(caps))

    @classmethod
    def permanentflags(cls, flags: Iterable[str], *, new_keywords: bool = True) -> ResponseCode:
        items = list(flags) + (["\\*"] if new_keywords else [])
        return cls("PERMANENTFLAGS", "(" + " ".join(items) + ")")

    @classmethod
    def uidnext(cls, uid: int) -> ResponseCode:
        return cls("UIDNEXT", str(uid))

    @classmethod
    def uidvalidity(cls, value: int) -> ResponseCode:
        return cls("UIDVALIDITY", str(value))

    @classmethod
    def badcharset(cls, charsets: Iterable[str] = ("US-ASCII", "UTF-8")) -> ResponseCode:
        return cls("BADCHARSET", "(" + " ".join(charsets) + ")")

    # RFC 4315 §3 (UIDPLUS) ---------------------------------------------------------
    @classmethod
    def appenduid(cls, uidvalidity: int, uids: SequenceSet) -> ResponseCode:
        return cls("APPENDUID", f"{uidvalidity} {uids}")

    @classmethod
    def copyuid(cls, uidvalidity: int, source: SequenceSet, dest: SequenceSet) -> ResponseCode:
        return cls("COPYUID", f"{uidvalidity} {source} {dest}")

    # RFC 7162 §3.1.2, §3.1.3 (CONDSTORE) -------------------------------------------
    @classmethod
    def highestmodseq(cls, modseq: int) -> ResponseCode:
        return cls("HIGHESTMODSEQ", str(modseq))

    @classmethod
    def modified(cls, messages: SequenceSet) -> ResponseCode:
        return cls("MODIFIED", str(messages))

    @classmethod
    def nomodseq(cls) -> ResponseCode:
        return cls("NOMODSEQ")

    @classmethod
    def simple(cls, name: str) -> ResponseCode:
        """Codes without arguments: READ-ONLY, READ-WRITE, TRYCREATE, TOOBIG, OVERQUOTA,
        AUTHENTICATIONFAILED, PRIVACYREQUIRED, NONEXISTENT, ALREADYEXISTS, CLOSED,
        UIDNOTSTICKY, COMPRESSIONACTIVE, LIMIT, INUSE, SERVERBUG, CANNOT, ..."""
        return cls(name)


def _text(text: str) -> bytes:
    # resp-text is TEXT-CHARs only: no CR/LF/NUL may reach the wire from any source.
    return re.sub(r"[\r\n\x00]", " ", text).encode("utf-8")


@dataclass(frozen=True, slots=True)
class TaggedResponse:
    """``tag OK|NO|BAD [code] text`` completing a command (RFC 9051 §7.1)."""

    tag: str
    status: Status
    text: str
    code: ResponseCode | None = None

    def to_bytes(self, *, utf8: bool = False) -> bytes:
        code = self.code.to_bytes() + b" " if self.code else b""
        return (
            self.tag.encode("ascii")
            + b" "
            + self.status.value.encode()
            + b" "
            + code
            + _text(self.text or self.status.value)
            + b"\r\n"
        )


@dataclass(frozen=True, slots=True)
class StatusResponse:
    """Untagged ``* OK|NO|BAD|PREAUTH|BYE [code] text``."""

    status: Status
    text: str
    code: ResponseCode | None = None

    def to_bytes(self, *, utf8: bool = False) -> bytes:
        code = self.code.to_bytes() + b" " if self.code else b""
        return b"* " + self.status.value.encode() + b" " + code + _text(self.text or "-") + b"\r\n"


@dataclass(frozen=True, slots=True)
class DataResponse:
    """Untagged data: ``*`` followed by the rendered values separated by spaces."""

    values: tuple[Value, ...]

    def to_bytes(self, *, utf8: bool = False) -> bytes:
        return b"* " + b" ".join(render(v, utf8=utf8) for v in self.values) + b"\r\n"


@dataclass(frozen=True, slots=True)
class ContinuationResponse:
    """``+ text`` or, for SASL challenges, ``+ base64`` (RFC 9051 §7.5)."""

    text: str = ""
    challenge: bytes | None = None

    def to_bytes(self, *, utf8: bool = False) -> bytes:
        if self.challenge is not None:
            return b"+ " + base64.b64encode(self.challenge) + b"\r\n"
        return b"+ " + _text(self.text) + b"\r\n" if self.text else b"+ \r\n"


Response = TaggedResponse | StatusResponse | DataResponse | ContinuationResponse


# --------------------------------------------------------------------------- builders


def _data(*values: Value) -> DataResponse:
    return DataResponse(values)


def bye(text: str = "Logging out") -> StatusResponse:
    return StatusResponse(Status.BYE, text)


def capability(caps: Iterable[str]) -> DataResponse:
    """RFC 9051 §7.2.2."""
    return _data(Atom("CAPABILITY"), *(Atom(c) for c in caps))


def enabled(caps: Iterable[str]) -> DataResponse:
    """RFC 5161 §3.2 / RFC 9051 §7.2.1."""
    return _data(Atom("ENABLED"), *(Atom(c) for c in caps))


def exists(count: int) -> DataResponse:
    """RFC 9051 §7.4.1."""
    return _data(count, Atom("EXISTS"))


def recent(count: int) -> DataResponse:
    """RFC 3501 §7.3.2 (IMAP4rev1 clients only)."""
    return _data(count, Atom("RECENT"))


def expunge(seq: int) -> DataResponse:
    """RFC 9051 §7.5.1."""
    return _data(seq, Atom("EXPUNGE"))


def vanished(uids: SequenceSet, *, earlier: bool = False) -> DataResponse:
    """RFC 7162 §3.2.10: ``* VANISHED [(EARLIER)] uid-set``."""
    head: list[Value] = [Atom("VANISHED")]
    if earlier:
        head.append([Atom("EARLIER")])
    return _data(*head, Atom(str(uids)))


def flags(names: Iterable[str]) -> DataResponse:
    """RFC 9051 §7.3.5."""
    return _data(Atom("FLAGS"), [Atom(f) for f in names])


def fetch(seq: int, items: Sequence[tuple[str, Value]]) -> DataResponse:
    """RFC 9051 §7.5.2: ``* seq FETCH (name value ...)``.

    ``name`` is the item name as the response spells it, e.g. from
    :meth:`~mailfort.imap.commands.FetchBody.response_name`.
    """
    body: list[Value] = []
    for name, value in items:
        body.append(Atom(name))
        body.append(value)
    return _data(seq, Atom("FETCH"), body)


def list_response(
    attributes: Iterable[str],
    delimiter: str | None,
    name: str,
    extended: Sequence[tuple[str, Value]] = (),
    *,
    command: str = "LIST",
) -> DataResponse:
    """RFC 9051 §7.3.1 with RFC 5258 §3.5 extended data (CHILDINFO, OLDNAME)."""
    values: list[Value] = [
        Atom(command),
        [Atom(a) for a in attributes],
        delimiter,
        MailboxName(name),
    ]
    if extended:
        ext: list[Value] = []
        for tag, value in extended:
            ext.append(tag)  # RFC 5258: the tag is an astring; quoted like other servers do
            ext.append(value)
        values.append(ext)
    return DataResponse(tuple(values))


def lsub_response(attributes: Iterable[str], delimiter: str | None, name: str) -> DataResponse:
    """RFC 3501 §7.2.3."""
    return list_response(attributes, delimiter, name, command="LSUB")


def status(mailbox: str, items: Sequence[tuple[str, int | None]]) -> DataResponse:
    """RFC 9051 §7.3.2; APPENDLIMIT may be NIL (RFC 7889 §3)."""
    body: list[Value] = []
    for name, value in items:
        body.extend((Atom(name), value))
    return _data(Atom("STATUS"), MailboxName(mailbox), body)


def search(numbers: Iterable[int], *, modseq: int | None = None) -> DataResponse:
    """RFC 3501 §7.2.5 SEARCH, with RFC 7162 §3.1.5 ``(MODSEQ n)``."""
    values: list[Value] = [Atom("SEARCH"), *numbers]
    if modseq is not None:
        values.append([Atom("MODSEQ"), modseq])
    return DataResponse(tuple(values))


def esearch(
    tag: str | None,
    *,
    uid: bool,
    minimum: int | None = None,
    maximum: int | None = None,
    count: int | None = None,
    all_: SequenceSet | None = None,
    modseq: int | None = None,
) -> DataResponse:
    """RFC 4731 §3.1 / RFC 9051 §7.3.4: ``* ESEARCH (TAG "t") [UID] MIN n ...``.

    Empty results leave MIN/MAX/ALL out (RFC 9051 §6.4.4.1), COUNT stays.
    """
    values: list[Value] = [Atom("ESEARCH")]
    if tag is not None:
        values.append([Atom("TAG"), tag])
    if uid:
        values.append(Atom("UID"))
    if minimum is not None:
        values.extend((Atom("MIN"), minimum))
    if maximum is not None:
        values.extend((Atom("MAX"), maximum))
    if all_ is not None and all_.ranges:
        values.extend((Atom("ALL"), Atom(str(all_))))
    if count is not None:
        values.extend((Atom("COUNT"), count))
    if modseq is not None:
        values.extend((Atom("MODSEQ"), modseq))
    return DataResponse(tuple(values))


def namespace(
    personal: Sequence[tuple[str, str | None]] | None,
    other: Sequence[tuple[str, str | None]] | None = None,
    shared: Sequence[tuple[str, str | None]] | None = None,
) -> DataResponse:
    """RFC 2342 §5 / RFC 9051 §7.3.3: each namespace is a list of (prefix, delimiter)."""

    def ns(entries: Sequence[tuple[str, str | None]] | None) -> Value:
        if not entries:
            return None
        return [[prefix, delim] for prefix, delim in entries]

    return _data(Atom("NAMESPACE"), ns(personal), ns(other), ns(shared))


def id_response(params: Sequence[tuple[str, str | None]] | None) -> DataResponse:
    """RFC 2971 §3.2."""
    if params is None:
        return _data(Atom("ID"), None)
    body: list[Value] = []
    for key, value in params:
        body.extend((key, value))
    return _data(Atom("ID"), body)


def quota(root: str, resources: Sequence[tuple[str, int, int]]) -> DataResponse:
    """RFC 9208 §5.1: ``* QUOTA root (STORAGE usage limit ...)``; STORAGE in KiB."""
    body: list[Value] = []
    for name, usage, limit in resources:
        body.extend((Atom(name), usage, limit))
    return _data(Atom("QUOTA"), root, body)


def quotaroot(mailbox: str, roots: Iterable[str]) -> DataResponse:
    """RFC 9208 §5.2."""
    return _data(Atom("QUOTAROOT"), MailboxName(mailbox), *roots)


def address(
    name: str | None, mailbox: str | None, host: str | None, adl: str | None = None
) -> Value:
    """RFC 9051 §9 address = "(" addr-name SP addr-adl SP addr-mailbox SP addr-host ")"."""
    return [name, adl, mailbox, host]


def envelope(
    *,
    date: str | None,
    subject: str | None,
    from_: Sequence[Value] | None,
    sender: Sequence[Value] | None,
    reply_to: Sequence[Value] | None,
    to: Sequence[Value] | None,
    cc: Sequence[Value] | None,
    bcc: Sequence[Value] | None,
    in_reply_to: str | None,
    message_id: str | None,
) -> Value:
    """RFC 9051 §7.5.2 ENVELOPE; address lists are lists of :func:`address` or NIL.

    RFC 9051 §7.5.2: if Sender or Reply-To is absent, the server fills in From.
    """
    sender = sender or from_
    reply_to = reply_to or from_

    def addrs(items: Sequence[Value] | None) -> Value:
        return list(items) if items else None

    return [
        date,
        subject,
        addrs(from_),
        addrs(sender),
        addrs(reply_to),
        addrs(to),
        addrs(cc),
        addrs(bcc),
        in_reply_to,
        message_id,
    ]
