"""Typed IMAP commands, fetch attributes and search keys produced by the parser.

All types are frozen dataclasses: a command is a value, safe to log (except the secrets
of LOGIN/AUTHENTICATE, whose ``repr`` is redacted) and to compare in tests.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Literal

from mailfort.imap.sequence import SequenceSet

__all__ = [
    "Append",
    "AppendMessage",
    "Authenticate",
    "Capability",
    "Check",
    "Close",
    "Command",
    "Compress",
    "Copy",
    "Create",
    "Delete",
    "Enable",
    "Examine",
    "Expunge",
    "Fetch",
    "FetchAttribute",
    "FetchBody",
    "FetchSimple",
    "GetQuota",
    "GetQuotaRoot",
    "Id",
    "Idle",
    "List",
    "ListReturn",
    "Login",
    "Logout",
    "Lsub",
    "Move",
    "Namespace",
    "Noop",
    "QResync",
    "Rename",
    "Search",
    "SearchAll",
    "SearchAnd",
    "SearchDate",
    "SearchFlag",
    "SearchHeader",
    "SearchKey",
    "SearchModSeq",
    "SearchNot",
    "SearchObjectId",
    "SearchOr",
    "SearchSequence",
    "SearchSize",
    "SearchText",
    "SearchWithin",
    "Section",
    "Select",
    "SetQuota",
    "StartTLS",
    "Status",
    "Store",
    "Subscribe",
    "UidExpunge",
    "Unselect",
    "Unsubscribe",
]


# ------------------------------------------------------------------ base / simple


@dataclass(frozen=True, slots=True)
class _Base:
    tag: str


@dataclass(frozen=True, slots=True)
class Capability(_Base):
    """RFC 9051 §6.1.1."""


@dataclass(frozen=True, slots=True)
class Noop(_Base):
    """RFC 9051 §6.1.2."""


@dataclass(frozen=True, slots=True)
class Logout(_Base):
    """RFC 9051 §6.1.3."""


@dataclass(frozen=True, slots=True)
class StartTLS(_Base):
    """RFC 9051 §6.2.1."""


@dataclass(frozen=True, slots=True)
class Authenticate(_Base):
    """RFC 9051 §6.2.2; ``initial_response`` is RFC 4959 SASL-IR (decoded; ``b""`` for ``=``)."""

    mechanism: str
    initial_response: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Login(_Base):
    """RFC 9051 §6.2.3."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Enable(_Base):
    """RFC 5161 / RFC 9051 §6.3.1; capability names upper-cased."""

    capabilities: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class QResync:
    """RFC 7162 §3.2.5 QRESYNC parameter of SELECT/EXAMINE."""

    uidvalidity: int
    modseq: int
    known_uids: SequenceSet | None = None
    known_seqs: SequenceSet | None = None  # seq-match-data: sequence numbers ...
    known_seq_uids: SequenceSet | None = None  # ... and the UIDs they map to


@dataclass(frozen=True, slots=True)
class Select(_Base):
    """RFC 9051 §6.3.2 (SELECT) and §6.3.3 (EXAMINE, ``read_only``)."""

    mailbox: str
    read_only: bool = False
    condstore: bool = False  # RFC 7162 §3.1.8
    qresync: QResync | None = None  # RFC 7162 §3.2.5


# EXAMINE is SELECT with read_only=True; the name is kept for readers of the code.
Examine = Select


@dataclass(frozen=True, slots=True)
class Create(_Base):
    """RFC 9051 §6.3.4; ``special_use`` from RFC 6154 §3 ``CREATE ... (USE (...))``."""

    mailbox: str
    special_use: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Delete(_Base):
    """RFC 9051 §6.3.5."""

    mailbox: str


@dataclass(frozen=True, slots=True)
class Rename(_Base):
    """RFC 9051 §6.3.6."""

    mailbox: str
    new_name: str


@dataclass(frozen=True, slots=True)
class Subscribe(_Base):
    """RFC 9051 §6.3.7."""

    mailbox: str


@dataclass(frozen=True, slots=True)
class Unsubscribe(_Base):
    """RFC 9051 §6.3.8."""

    mailbox: str


@dataclass(frozen=True, slots=True)
class ListReturn:
    """RFC 5258 §3 return options (plus RFC 5819 STATUS, RFC 6154 SPECIAL-USE)."""

    subscribed: bool = False
    children: bool = False
    special_use: bool = False
    status: tuple[str, ...] | None = None  # RFC 5819 LIST-STATUS items


@dataclass(frozen=True, slots=True)
class List(_Base):
    """RFC 9051 §6.3.9 with LIST-EXTENDED (RFC 5258) selection and return options.

    ``selection`` holds upper-cased options: SUBSCRIBED, REMOTE, RECURSIVEMATCH,
    SPECIAL-USE.  ``patterns`` are decoded names with wildcards left in place.
    ``extended`` is true if the client used any extended syntax (then the reply may
    carry extended data items, RFC 5258 §3.5).
    """

    reference: str
    patterns: tuple[str, ...]
    selection: frozenset[str] = frozenset()
    returns: ListReturn = ListReturn()
    extended: bool = False


@dataclass(frozen=True, slots=True)
class Lsub(_Base):
    """RFC 3501 §6.3.9 (gone from RFC 9051, still sent by IMAP4rev1 clients)."""

    reference: str
    pattern: str


@dataclass(frozen=True, slots=True)
class Namespace(_Base):
    """RFC 2342 / RFC 9051 §6.3.10."""


@dataclass(frozen=True, slots=True)
class Status(_Base):
    """RFC 9051 §6.3.11; items upper-cased (MESSAGES, UIDNEXT, ..., SIZE, HIGHESTMODSEQ)."""

    mailbox: str
    items: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AppendMessage:
    """One message of an APPEND (MULTIAPPEND, RFC 3502, allows several)."""

    flags: tuple[str, ...]
    internal_date: dt.datetime | None
    data: bytes = field(repr=False)
    binary: bool = False  # RFC 3516 §4.4: sent as literal8 ~{N}
    utf8: bool = False  # RFC 6855 §4: sent as UTF8 (~{N})


@dataclass(frozen=True, slots=True)
class Append(_Base):
    """RFC 9051 §6.3.12 / RFC 3502 MULTIAPPEND."""

    mailbox: str
    messages: tuple[AppendMessage, ...]


@dataclass(frozen=True, slots=True)
class Idle(_Base):
    """RFC 2177 / RFC 9051 §6.3.13."""


@dataclass(frozen=True, slots=True)
class Check(_Base):
    """RFC 3501 §6.4.1 (removed in RFC 9051; treat as NOOP)."""


@dataclass(frozen=True, slots=True)
class Close(_Base):
    """RFC 9051 §6.4.1."""


@dataclass(frozen=True, slots=True)
class Unselect(_Base):
    """RFC 3691 / RFC 9051 §6.4.2."""


@dataclass(frozen=True, slots=True)
class Expunge(_Base):
    """RFC 9051 §6.4.3."""


@dataclass(frozen=True, slots=True)
class UidExpunge(_Base):
    """RFC 4315 §2.1 / RFC 9051 §6.4.9 UID EXPUNGE."""

    uids: SequenceSet


@dataclass(frozen=True, slots=True)
class Copy(_Base):
    """RFC 9051 §6.4.7 (and UID COPY)."""

    uid: bool
    messages: SequenceSet
    mailbox: str


@dataclass(frozen=True, slots=True)
class Move(_Base):
    """RFC 6851 / RFC 9051 §6.4.8 (and UID MOVE)."""

    uid: bool
    messages: SequenceSet
    mailbox: str


@dataclass(frozen=True, slots=True)
class Store(_Base):
    """RFC 9051 §6.4.6; ``mode`` is ``"+"`` add, ``"-"`` remove, ``""`` replace."""

    uid: bool
    messages: SequenceSet
    mode: Literal["+", "-", ""]
    silent: bool
    flags: tuple[str, ...]
    unchanged_since: int | None = None  # RFC 7162 §3.1.3


@dataclass(frozen=True, slots=True)
class Id(_Base):
    """RFC 2971; ``None`` for ``ID NIL``."""

    params: tuple[tuple[str, str | None], ...] | None


@dataclass(frozen=True, slots=True)
class GetQuota(_Base):
    """RFC 9208 §4.2."""

    root: str


@dataclass(frozen=True, slots=True)
class GetQuotaRoot(_Base):
    """RFC 9208 §4.3."""

    mailbox: str


@dataclass(frozen=True, slots=True)
class SetQuota(_Base):
    """RFC 9208 §4.1; ``limits`` are (resource upper-cased, limit)."""

    root: str
    limits: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Compress(_Base):
    """RFC 4978 §3; ``mechanism`` upper-cased."""

    mechanism: str


# ------------------------------------------------------------------ FETCH


@dataclass(frozen=True, slots=True)
class Section:
    """A body section specifier (RFC 9051 §6.4.5 ``section``).

    ``part`` is the MIME part path (``(1, 2)`` for ``1.2``; empty for the whole
    message).  ``text`` is None, HEADER, HEADER.FIELDS, HEADER.FIELDS.NOT, TEXT or MIME.
    ``fields`` holds the header names of HEADER.FIELDS[.NOT] as the client spelled them
    (compare them case-insensitively).
    """

    part: tuple[int, ...] = ()
    text: str | None = None
    fields: tuple[str, ...] = ()

    def __str__(self) -> str:
        out = ".".join(str(p) for p in self.part)
        if self.text:
            out = f"{out}.{self.text}" if out else self.text
            if self.fields:
                out += " (" + " ".join(self.fields) + ")"
        return out


@dataclass(frozen=True, slots=True)
class FetchSimple:
    """A fetch attribute without arguments: ENVELOPE, FLAGS, UID, MODSEQ, RFC822.SIZE, ..."""

    name: str

    def response_name(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class FetchBody:
    """``BODY[...]``, ``BODY.PEEK[...]``, ``BINARY[...]``, ``BINARY.PEEK[...]``, ``BINARY.SIZE[...]``.

    ``partial`` is ``(origin, length)`` from ``<origin.length>``.
    """

    section: Section
    peek: bool = False
    binary: bool = False  # RFC 3516 BINARY[...]
    size_only: bool = False  # RFC 3516 BINARY.SIZE[...]
    partial: tuple[int, int] | None = None

    @property
    def sets_seen(self) -> bool:
        # RFC 9051 §6.4.5: BODY[...] and BINARY[...] set \Seen; .PEEK and .SIZE do not.
        return not (self.peek or self.size_only)

    def response_name(self) -> str:
        """The item name in the FETCH response (RFC 9051 §7.5.2).

        ``.PEEK`` is dropped and a partial range becomes ``<origin>`` only.
        """
        if self.size_only:
            return f"BINARY.SIZE[{self.section}]"
        base = "BINARY" if self.binary else "BODY"
        name = f"{base}[{self.section}]"
        if self.partial is not None:
            name += f"<{self.partial[0]}>"
        return name


FetchAttribute = FetchSimple | FetchBody


@dataclass(frozen=True, slots=True)
class Fetch(_Base):
    """RFC 9051 §6.4.5 (and UID FETCH), with RFC 7162 modifiers.

    ``attributes`` has macros expanded; for UID FETCH the parser adds UID (RFC 9051
    §6.4.9 says the response always carries it).  ``macro`` records ALL/FAST/FULL.
    """

    uid: bool
    messages: SequenceSet
    attributes: tuple[FetchAttribute, ...]
    changed_since: int | None = None  # RFC 7162 §3.1.4.1
    vanished: bool = False  # RFC 7162 §3.2.6
    macro: str | None = None


# ------------------------------------------------------------------ SEARCH


@dataclass(frozen=True, slots=True)
class SearchAll:
    """ALL."""


@dataclass(frozen=True, slots=True)
class SearchFlag:
    """ANSWERED/DELETED/DRAFT/FLAGGED/SEEN/RECENT/KEYWORD and their UN- forms."""

    flag: str  # "\\Seen", "$Forwarded", ...
    present: bool = True


@dataclass(frozen=True, slots=True)
class SearchDate:
    """BEFORE/ON/SINCE (internal date) and SENTBEFORE/SENTON/SENTSINCE (Date header)."""

    op: Literal["before", "on", "since"]
    date: dt.date
    sent: bool = False


@dataclass(frozen=True, slots=True)
class SearchWithin:
    """RFC 5032 OLDER/YOUNGER: internal date relative to now, in seconds."""

    op: Literal["older", "younger"]
    seconds: int


@dataclass(frozen=True, slots=True)
class SearchHeader:
    """BCC/CC/FROM/SUBJECT/TO and HEADER: substring of a header (lower-case name)."""

    name: str
    value: str


@dataclass(frozen=True, slots=True)
class SearchText:
    """BODY (``headers=False``) or TEXT (``headers=True``)."""

    value: str
    headers: bool


@dataclass(frozen=True, slots=True)
class SearchSize:
    """LARGER/SMALLER (RFC822.SIZE)."""

    op: Literal["larger", "smaller"]
    size: int


@dataclass(frozen=True, slots=True)
class SearchSequence:
    """A sequence set (``uid=False``) or ``UID`` set; may be ``$`` (RFC 5182)."""

    messages: SequenceSet
    uid: bool = False


@dataclass(frozen=True, slots=True)
class SearchModSeq:
    """RFC 7162 §3.1.5 MODSEQ: messages with mod-sequence >= ``modseq``."""

    modseq: int
    entry: str | None = None
    entry_type: str | None = None


@dataclass(frozen=True, slots=True)
class SearchObjectId:
    """RFC 8474 EMAILID / THREADID."""

    kind: Literal["EMAILID", "THREADID"]
    value: str


@dataclass(frozen=True, slots=True)
class SearchNot:
    key: SearchKey


@dataclass(frozen=True, slots=True)
class SearchOr:
    left: SearchKey
    right: SearchKey


@dataclass(frozen=True, slots=True)
class SearchAnd:
    """Several keys side by side, or parenthesised (RFC 9051 §6.4.4: implicit AND)."""

    keys: tuple[SearchKey, ...]


SearchKey = (
    SearchAll
    | SearchFlag
    | SearchDate
    | SearchWithin
    | SearchHeader
    | SearchText
    | SearchSize
    | SearchSequence
    | SearchModSeq
    | SearchObjectId
    | SearchNot
    | SearchOr
    | SearchAnd
)


@dataclass(frozen=True, slots=True)
class Search(_Base):
    """RFC 9051 §6.4.4 (and UID SEARCH).

    ``returns`` is None for a plain SEARCH without RETURN; otherwise the upper-cased
    RFC 4731 / RFC 9051 return options (``()`` means ALL, RFC 4731 §3.1).  ``charset``
    is upper-cased; the parser already refused charsets other than US-ASCII and UTF-8.
    """

    uid: bool
    criteria: SearchKey
    charset: str | None = None
    returns: tuple[str, ...] | None = None


Command = (
    Capability
    | Noop
    | Logout
    | StartTLS
    | Authenticate
    | Login
    | Enable
    | Select
    | Create
    | Delete
    | Rename
    | Subscribe
    | Unsubscribe
    | List
    | Lsub
    | Namespace
    | Status
    | Append
    | Idle
    | Check
    | Close
    | Unselect
    | Expunge
    | UidExpunge
    | Search
    | Fetch
    | Store
    | Copy
    | Move
    | Id
    | GetQuota
    | GetQuotaRoot
    | SetQuota
    | Compress
)
