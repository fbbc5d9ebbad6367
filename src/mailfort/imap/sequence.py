"""IMAP sequence sets (RFC 9051 §9 ``sequence-set``, RFC 5182 ``$``)."""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = ["MAX_NZ", "STAR", "SequenceSet"]

#: Internal stand-in for ``*`` ("the largest number in use"); 0 is never a valid nz-number.
STAR: Final = 0
#: RFC 9051 §9: nz-number fits in 32 bits.
MAX_NZ: Final = 4294967295

_NUM_RE = re.compile(r"[1-9][0-9]{0,9}\Z")


def _parse_number(text: str) -> int:
    if text == "*":
        return STAR
    if not _NUM_RE.match(text):
        raise ValueError(f"invalid sequence number {text!r}")
    value = int(text)
    if value > MAX_NZ:
        raise ValueError(f"sequence number {text} out of range")
    return value


@dataclass(frozen=True, slots=True)
class SequenceSet:
    """A set of message numbers (sequence numbers or UIDs) as the client wrote it.

    ``ranges`` keeps each element as written, ``(lo, hi)`` with ``STAR`` for ``*``; a
    single number ``n`` is ``(n, n)``.  Ranges may be written in either order (RFC
    9051 §9: "4:2" is "2:4").  ``saved`` is RFC 5182's ``$``, the result saved by
    ``SEARCH RETURN (SAVE)``; it has no ranges and must be resolved by the caller.
    """

    ranges: tuple[tuple[int, int], ...] = ()
    saved: bool = False

    # -- construction -----------------------------------------------------------

    @classmethod
    def parse(cls, text: str | bytes) -> SequenceSet:
        """Parse the wire form; raises ``ValueError`` if it is not a sequence-set."""
        if isinstance(text, bytes):
            text = text.decode("ascii")
        if text == "$":
            return cls(saved=True)
        if not text:
            raise ValueError("empty sequence set")
        ranges: list[tuple[int, int]] = []
        for item in text.split(","):
            lo, sep, hi = item.partition(":")
            first = _parse_number(lo)
            ranges.append((first, _parse_number(hi) if sep else first))
        return cls(tuple(ranges))

    @classmethod
    def from_numbers(cls, numbers: Iterable[int]) -> SequenceSet:
        """The most compact set holding exactly ``numbers`` (for ESEARCH ALL, COPYUID)."""
        ranges: list[tuple[int, int]] = []
        for n in sorted(set(numbers)):
            if n < 1:
                raise ValueError("message numbers start at 1")
            if ranges and ranges[-1][1] == n - 1:
                ranges[-1] = (ranges[-1][0], n)
            else:
                ranges.append((n, n))
        return cls(tuple(ranges))

    @classmethod
    def of(cls, *items: int | tuple[int, int]) -> SequenceSet:
        """Build a set in code: ``SequenceSet.of(1, (3, STAR))``."""
        return cls(tuple(i if isinstance(i, tuple) else (i, i) for i in items))

    # -- rendering --------------------------------------------------------------

    def __str__(self) -> str:
        if self.saved:
            return "$"

        def num(n: int) -> str:
            return "*" if n == STAR else str(n)

        return ",".join(num(lo) if lo == hi else f"{num(lo)}:{num(hi)}" for lo, hi in self.ranges)

    # -- resolution against a mailbox -------------------------------------------

    @property
    def uses_star(self) -> bool:
        return any(STAR in r for r in self.ranges)

    def largest_explicit(self) -> int:
        """The largest number written (not ``*``); 0 if none."""
        return max((n for r in self.ranges for n in r if n != STAR), default=0)

    def ranges_for(self, largest: int) -> list[tuple[int, int]]:
        """Sorted, merged, inclusive ranges within ``1..largest``.

        ``*`` stands for ``largest`` (RFC 9051 §9).  As RFC 9051 §6.4.9 notes for UIDs,
        ``559:*`` still includes the largest number even if it is below 559, which
        falls out of ordering the range ends.  Numbers above ``largest`` are dropped:
        for UIDs they name no message; for sequence numbers the caller should have
        refused them (see :meth:`largest_explicit`).
        """
        if self.saved:
            raise ValueError("the saved result ($) must be resolved by the caller")
        if largest < 1:
            return []
        spans: list[tuple[int, int]] = []
        for lo, hi in self.ranges:
            a = largest if lo == STAR else lo
            b = largest if hi == STAR else hi
            if a > b:
                a, b = b, a
            b = min(b, largest)
            if a <= b:
                spans.append((a, b))
        spans.sort()
        merged: list[tuple[int, int]] = []
        for a, b in spans:
            if merged and a <= merged[-1][1] + 1:
                if b > merged[-1][1]:
                    merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        return merged

    def contains(self, n: int, largest: int) -> bool:
        """Is message number ``n`` in the set, ``*`` being ``largest``?"""
        if self.saved:
            raise ValueError("the saved result ($) must be resolved by the caller")
        if n < 1 or n > largest:
            return False
        for lo, hi in self.ranges:
            a = largest if lo == STAR else lo
            b = largest if hi == STAR else hi
            if min(a, b) <= n <= max(a, b):
                return True
        return False

    def expand(self, largest: int) -> Iterator[int]:
        """Every number in the set, ascending, without duplicates."""
        for a, b in self.ranges_for(largest):
            yield from range(a, b + 1)

    def select(self, existing: Sequence[int]) -> list[int]:
        """The members of the ascending sequence ``existing`` (e.g. UIDs) in the set.

        ``*`` is the last element of ``existing``.  Cost is logarithmic per range, so a
        client's ``1:4294967295`` does not expand four billion numbers.
        """
        if not existing:
            return []
        out: list[int] = []
        for a, b in self.ranges_for(existing[-1]):
            lo = bisect.bisect_left(existing, a)
            hi = bisect.bisect_right(existing, b)
            out.extend(existing[lo:hi])
        return out
