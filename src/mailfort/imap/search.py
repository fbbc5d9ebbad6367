"""SEARCH semantics: evaluation of a search-key tree against messages (RFC 9051 §6.4.4).

The store implements :class:`SearchableMessage` (it may be a lazy view that decrypts and
parses only what a key asks for); this module decides what matches and builds the
SEARCH / ESEARCH reply, so the semantics are unit-tested here, away from the store.
"""

from __future__ import annotations

import datetime as dt
import email.utils
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from mailfort.imap import commands as c
from mailfort.imap import response as r
from mailfort.imap.sequence import SequenceSet

__all__ = [
    "HasObjectIds",
    "SearchContext",
    "SearchOutcome",
    "SearchableMessage",
    "matches",
    "run_search",
    "uses_modseq",
]


class SearchableMessage(Protocol):
    """What SEARCH needs from a message; the store provides it."""

    @property
    def uid(self) -> int: ...

    @property
    def seq(self) -> int: ...

    @property
    def flags(self) -> AbstractSet[str]:
        """Flags and keywords; ``\\Recent`` included if the message is recent."""
        ...

    @property
    def internal_date(self) -> dt.datetime: ...

    @property
    def size(self) -> int:
        """RFC822.SIZE."""
        ...

    @property
    def modseq(self) -> int: ...

    def header(self, name: str) -> Sequence[str]:
        """Decoded (RFC 2047) values of every header field called ``name`` (lower case)."""
        ...

    def contains_text(self, needle: str, *, headers: bool) -> bool:
        """Does the decoded body (and, if ``headers``, the header) contain ``needle``?

        ``needle`` is already case-folded; the store case-folds what it searches.
        """
        ...


@runtime_checkable
class HasObjectIds(Protocol):
    """Optional RFC 8474 object identifiers."""

    @property
    def email_id(self) -> str | None: ...

    @property
    def thread_id(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class SearchContext:
    """Mailbox-wide facts a search key may refer to."""

    max_seq: int  # number of messages: "*" for sequence numbers
    max_uid: int  # largest UID in the mailbox: "*" for UIDs
    saved_uids: frozenset[int] = frozenset()  # RFC 5182: the "$" result
    now: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))


def _has_flag(msg: SearchableMessage, flag: str) -> bool:
    # RFC 9051 §2.3.2: flag names are case-insensitive.
    want = flag.casefold()
    return any(f.casefold() == want for f in msg.flags)


def _sent_date(msg: SearchableMessage) -> dt.date | None:
    # RFC 9051 §6.4.4 SENT*: the Date header's date, disregarding time and timezone.
    for value in msg.header("date"):
        try:
            return email.utils.parsedate_to_datetime(value).date()
        except (TypeError, ValueError, IndexError):
            continue
    return None


def _compare_date(op: str, have: dt.date, want: dt.date) -> bool:
    if op == "before":
        return have < want
    if op == "on":
        return have == want
    return have >= want  # since: "within or later than"


def matches(key: c.SearchKey, msg: SearchableMessage, ctx: SearchContext) -> bool:
    """Does ``msg`` satisfy ``key``?  (RFC 9051 §6.4.4 for each key.)"""
    if isinstance(key, c.SearchAll):
        return True
    if isinstance(key, c.SearchAnd):
        return all(matches(k, msg, ctx) for k in key.keys)
    if isinstance(key, c.SearchOr):
        return matches(key.left, msg, ctx) or matches(key.right, msg, ctx)
    if isinstance(key, c.SearchNot):
        return not matches(key.key, msg, ctx)
    if isinstance(key, c.SearchFlag):
        return _has_flag(msg, key.flag) == key.present
    if isinstance(key, c.SearchSequence):
        if key.messages.saved:
            # RFC 5182 §2.1: "$" names the messages of the saved result, whatever their
            # sequence numbers are now.
            return msg.uid in ctx.saved_uids
        if key.uid:
            return key.messages.contains(msg.uid, ctx.max_uid)
        return key.messages.contains(msg.seq, ctx.max_seq)
    if isinstance(key, c.SearchHeader):
        values = msg.header(key.name)
        if not key.value:
            # RFC 9051 §6.4.4 HEADER: an empty string matches every message that has
            # the field, whatever its content.
            return bool(values)
        needle = key.value.casefold()
        return any(needle in v.casefold() for v in values)
    if isinstance(key, c.SearchText):
        # RFC 9051 §6.4.4: substring match, case-insensitive ("SHOULD ignore case").
        return msg.contains_text(key.value.casefold(), headers=key.headers)
    if isinstance(key, c.SearchDate):
        if key.sent:
            sent = _sent_date(msg)
            return sent is not None and _compare_date(key.op, sent, key.date)
        # Internal date in its own time zone, time disregarded (RFC 9051 §6.4.4).
        return _compare_date(key.op, msg.internal_date.date(), key.date)
    if isinstance(key, c.SearchWithin):
        # RFC 5032 §3: OLDER/YOUNGER compare the age of the internal date in seconds;
        # OLDER n and YOUNGER n partition the mailbox.
        age = (ctx.now - msg.internal_date).total_seconds()
        return age >= key.seconds if key.op == "older" else age < key.seconds
    if isinstance(key, c.SearchSize):
        return msg.size > key.size if key.op == "larger" else msg.size < key.size
    if isinstance(key, c.SearchModSeq):
        # RFC 7162 §3.1.5: mod-sequence greater than or equal to the given value.
        return msg.modseq >= key.modseq
    if isinstance(key, c.SearchObjectId):
        if not isinstance(msg, HasObjectIds):
            return False
        have = msg.email_id if key.kind == "EMAILID" else msg.thread_id
        return have is not None and have == key.value
    raise TypeError(f"unknown search key {key!r}")  # unreachable for parser output


def uses_modseq(key: c.SearchKey) -> bool:
    """True if the program has a MODSEQ key (RFC 7162 §3.1.5 then adds MODSEQ to the reply)."""
    if isinstance(key, c.SearchModSeq):
        return True
    if isinstance(key, c.SearchAnd):
        return any(uses_modseq(k) for k in key.keys)
    if isinstance(key, c.SearchOr):
        return uses_modseq(key.left) or uses_modseq(key.right)
    if isinstance(key, c.SearchNot):
        return uses_modseq(key.key)
    return False


@dataclass(frozen=True, slots=True)
class SearchOutcome:
    """The matches of a SEARCH and what to do with them.

    ``responses`` are the untagged replies to send (none for ``RETURN (SAVE)`` alone);
    ``saved_uids`` is the new ``$`` if the client asked for SAVE, else None.
    """

    numbers: tuple[int, ...]
    responses: tuple[r.DataResponse, ...]
    saved_uids: frozenset[int] | None


def run_search(
    cmd: c.Search,
    messages: Iterable[SearchableMessage],
    ctx: SearchContext,
    *,
    esearch_default: bool = False,
) -> SearchOutcome:
    """Evaluate ``cmd`` over ``messages`` (in sequence order) and build the reply.

    ``esearch_default`` is true once the client enabled IMAP4rev2: its SEARCH without
    RETURN then answers with ESEARCH ALL (RFC 9051 §6.4.4) instead of ``* SEARCH``.
    """
    hits = [m for m in messages if matches(cmd.criteria, m, ctx)]
    numbers = tuple(m.uid if cmd.uid else m.seq for m in hits)
    modseq = max((m.modseq for m in hits), default=None) if uses_modseq(cmd.criteria) else None

    if cmd.returns is None and not esearch_default:
        return SearchOutcome(numbers, (r.search(numbers, modseq=modseq),), None)

    # RFC 4731 §3.1: RETURN () means ALL; RFC 9051 §6.4.4: so does no RETURN in rev2.
    opts = set(cmd.returns or ()) or {"ALL"}
    want_min, want_max = "MIN" in opts, "MAX" in opts
    saved: frozenset[int] | None = None
    if "SAVE" in opts:
        # RFC 5182 §2.4: with MIN and/or MAX only (no ALL/COUNT), SAVE keeps just
        # those messages; otherwise it keeps every match.
        if (want_min or want_max) and not opts & {"ALL", "COUNT"}:
            keep = []
            if hits and want_min:
                keep.append(hits[0].uid)
            if hits and want_max:
                keep.append(hits[-1].uid)
            saved = frozenset(keep)
        else:
            saved = frozenset(m.uid for m in hits)
        if opts == {"SAVE"}:
            # RFC 5182 §2.4: SAVE alone returns no ESEARCH response.
            return SearchOutcome(numbers, (), saved)

    reply = r.esearch(
        cmd.tag,
        uid=cmd.uid,
        minimum=min(numbers) if want_min and numbers else None,
        maximum=max(numbers) if want_max and numbers else None,
        count=len(numbers) if "COUNT" in opts else None,
        all_=SequenceSet.from_numbers(numbers) if "ALL" in opts and numbers else None,
        modseq=modseq,
    )
    return SearchOutcome(numbers, (reply,), saved)
