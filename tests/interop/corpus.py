"""The varied messages the client tests deliver, and how a client's copy is matched to one.

Messages come from the shared MIME corpora (flanker, mime4j, Stalwart's parser tests): real
and malformed mail, 8-bit headers, huge and tiny parts, missing final newlines.  Clients store
them differently (Maildir with LF, an MDA pipe, headers added on top), so a copy is compared
after :func:`normalize` and may carry extra header fields before the original ones.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

MIME = Path(__file__).resolve().parents[3] / "shared" / "corpora" / "mime"

_PATTERNS = (
    ("flanker", "**/*.eml"),
    ("mime4j", "**/*.msg"),
    ("stalwart-mail-parser", "eml/**/*.eml"),
)
_EOL = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class Message:
    name: str  # path relative to the corpus root
    raw: bytes  # what is delivered

    @property
    def message_id(self) -> str | None:
        return message_id(self.raw)

    @property
    def digest(self) -> str:
        return digest(self.raw)

    @property
    def accepted_digests(self) -> set[str]:
        """Digests of every form a server may rightly hand out.

        RFC 9051 §4.3.1: a literal outside BINARY cannot carry NUL, so a server must alter a
        message that holds NUL bytes; Dovecot sends each as 0x80.
        """
        forms = {self.digest}
        if b"\0" in self.raw:
            forms.add(digest(self.raw.replace(b"\0", b"\x80")))
        return forms


def normalize(data: bytes) -> bytes:
    """Line ends as LF and no trailing blank lines.

    IMAP sends CRLF, Maildir clients write LF, and a message without a final newline may gain
    one on the way: none of that is a content difference.
    """
    return _EOL.sub(b"\n", data).rstrip(b"\n")


_TO_CRLF = re.compile(rb"\r\n|\r(?!\n)|\n")


def to_crlf(data: bytes) -> bytes:
    """Every line end as CRLF, as IMAP and POP3 carry a message (and as imaplib APPENDs)."""
    return _TO_CRLF.sub(b"\r\n", data)


def digest(data: bytes) -> str:
    return hashlib.sha256(normalize(data)).hexdigest()


def header_block(data: bytes) -> bytes:
    data = normalize(data)
    end = data.find(b"\n\n")
    return data if end < 0 else data[:end]


def header(data: bytes, name: str) -> str | None:
    """The first field `name` (unfolded), or None."""
    wanted = name.lower().encode()
    current: list[bytes] | None = None
    for line in header_block(data).split(b"\n"):
        if current is not None and line[:1] in (b" ", b"\t"):
            current.append(line)
            continue
        if current is not None:
            break
        field, sep, value = line.partition(b":")
        if sep and field.strip().lower() == wanted:
            current = [value]
    if current is None:
        return None
    return b" ".join(part.strip() for part in current).decode("utf-8", "replace")


def message_id(data: bytes) -> str | None:
    value = header(data, "Message-ID")
    return value.strip() if value else None


def load(limit: int | None = None) -> list[Message]:
    """Every message of the three corpora, in a stable order.

    A leading mbox "From " line is not part of a message (mailfort deliver and IMAP APPEND
    both take RFC 5322 text), and a file holding no message at all is left out.
    """
    found: list[Message] = []
    for sub, pattern in _PATTERNS:
        for path in sorted((MIME / sub).glob(pattern)):
            data = path.read_bytes()
            if data.startswith(b"From "):
                nl = data.find(b"\n")
                data = data[nl + 1 :] if nl >= 0 else b""
            if not data.strip():
                continue
            found.append(Message(str(path.relative_to(MIME)), data))
    return found[:limit] if limit is not None else found


def unique_ids(messages: Iterable[Message]) -> dict[str, Message]:
    """Messages whose Message-ID occurs once in the set (usable to find one on a server)."""
    counts = Counter(m.message_id for m in messages)
    return {m.message_id: m for m in messages if m.message_id and counts[m.message_id] == 1}


@dataclass(frozen=True)
class Expected:
    """One message a client should hold: any of `digests` (normalised SHA-256) will do."""

    name: str
    digests: frozenset[str]


def expected(
    messages: Iterable[Message], skip: Callable[[Message], bool] | None = None
) -> list[Expected]:
    """The messages as a server may serve them, less those a client is known to skip."""
    return [
        Expected(m.name, frozenset(m.accepted_digests))
        for m in messages
        if skip is None or not skip(m)
    ]


@dataclass
class Match:
    matched: Counter[frozenset[str]]  # Expected.digests -> copies found
    unmatched: list[str]  # names of copies that match no expected message

    def problems(self, want: Sequence[Expected], limit: int = 25) -> list[str]:
        """What is missing, duplicated or foreign; empty when the copies are exactly right."""
        counts = Counter(e.digests for e in want)
        names = {e.digests: e.name for e in want}
        out = [f"unexpected copy {n}" for n in self.unmatched]
        for key, n in counts.items():
            got = self.matched.get(key, 0)
            if got != n:
                out.append(f"{names[key]}: {got} copies, want {n}")
        if len(out) > limit:
            out = [*out[:limit], f"... and {len(out) - limit} more"]
        return out


def match_copies(
    copies: dict[str, bytes], want: Iterable[Expected], added: Collection[str] = ()
) -> Match:
    """Assign each client copy to the expected message it holds.

    A copy equals the message after normalisation, except that a client may add header
    fields named in `added` on top of the header (fetchmail's Received, getmail's
    Return-Path) or at its end (mbsync's X-TUID).  Only such a leading or trailing run is
    tried away, so a field of the original is never discounted.
    """
    by_digest = {d: e.digests for e in want for d in e.digests}
    names = {n.lower() for n in added}
    result = Match(Counter(), [])
    for name, data in copies.items():
        found = None
        for candidate in _without_added(normalize(data), names):
            found = by_digest.get(hashlib.sha256(candidate).hexdigest())
            if found is not None:
                break
        if found is None:
            result.unmatched.append(name)
        else:
            result.matched[found] += 1
    return result


def check_copies(
    copies: dict[str, bytes], want: Sequence[Expected], added: Collection[str] = ()
) -> list[str]:
    return match_copies(copies, want, added).problems(want)


def _without_added(copy: bytes, names: set[str]) -> Iterator[bytes]:
    yield copy
    if not names:
        return
    end = copy.find(b"\n\n")
    head, rest = (copy, b"") if end < 0 else (copy[:end], copy[end:])
    fields: list[bytes] = []
    for line in head.split(b"\n"):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += b"\n" + line
        else:
            fields.append(line)

    def is_added(f: bytes) -> bool:
        return f.partition(b":")[0].strip().lower().decode("latin-1") in names

    lead = 0
    while lead < len(fields) and is_added(fields[lead]):
        lead += 1
    trail = 0
    while trail < len(fields) and is_added(fields[len(fields) - 1 - trail]):
        trail += 1
    for i in range(lead + 1):
        for j in range(trail + 1):
            if (i, j) == (0, 0) or i + j > len(fields):
                continue
            yield b"\n".join(fields[i : len(fields) - j]) + rest


def maildir_files(root: Path) -> dict[str, bytes]:
    """Every message file in a Maildir folder (new/ and cur/), by relative path."""
    out: dict[str, bytes] = {}
    for sub in ("new", "cur"):
        d = root / sub
        if d.is_dir():
            for f in sorted(d.iterdir()):
                if f.is_file():
                    out[f"{sub}/{f.name}"] = f.read_bytes()
    return out
