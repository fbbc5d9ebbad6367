"""Mailbox names: modified UTF-7, UTF-8 (UTF8=ACCEPT / IMAP4rev2), INBOX, LIST patterns."""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from collections.abc import Callable

__all__ = [
    "INBOX",
    "MailboxNameError",
    "decode_mailbox",
    "encode_mailbox",
    "list_matcher",
    "mutf7_decode",
    "mutf7_encode",
]

INBOX = "INBOX"

_B64_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,")


class MailboxNameError(ValueError):
    """A mailbox name is not valid on the wire."""


# --------------------------------------------------------------------------- mUTF-7


def _is_direct(ch: str) -> bool:
    # RFC 3501 §5.1.3: printable US-ASCII except "&" represents itself.
    return "\x20" <= ch <= "\x7e" and ch != "&"


def mutf7_encode(name: str) -> str:
    """Encode ``name`` in modified UTF-7 (RFC 3501 §5.1.3)."""
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            raw = "".join(run).encode("utf-16-be", "surrogatepass")
            b64 = base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",")
            out.append("&" + b64 + "-")
            run.clear()

    for ch in name:
        if _is_direct(ch):
            flush()
            out.append(ch)
        elif ch == "&":
            flush()
            out.append("&-")
        else:
            run.append(ch)
    flush()
    return "".join(out)


def mutf7_decode(text: str) -> str:
    """Decode modified UTF-7, strictly (RFC 3501 §5.1.3).

    Non-canonical forms are refused: encoded printable ASCII, non-zero padding bits,
    a missing ``-``, raw 8-bit or control characters.  Strictness keeps one name from
    having two spellings, which would let two mailboxes look the same to a user.
    """
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "&":
            end = text.find("-", i + 1)
            if end < 0:
                raise MailboxNameError("unterminated modified UTF-7 sequence")
            chunk = text[i + 1 : end]
            if not chunk:
                out.append("&")
            else:
                out.append(_decode_chunk(chunk))
            i = end + 1
        elif _is_direct(ch):
            out.append(ch)
            i += 1
        else:
            raise MailboxNameError("mailbox name has a character modified UTF-7 must encode")
    return "".join(out)


def _decode_chunk(chunk: str) -> str:
    if not set(chunk) <= _B64_ALPHABET or len(chunk) % 4 == 1:
        raise MailboxNameError("invalid modified BASE64")
    b64 = chunk.replace(",", "/")
    try:
        raw = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MailboxNameError("invalid modified BASE64") from exc
    # Canonical check: the same octets must encode back to the same text, which also
    # rejects non-zero padding bits.
    if base64.b64encode(raw).decode("ascii").rstrip("=") != b64:
        raise MailboxNameError("non-canonical modified BASE64")
    if len(raw) % 2:
        raise MailboxNameError("modified BASE64 does not hold UTF-16")
    try:
        decoded = raw.decode("utf-16-be")  # strict: lone surrogates are refused
    except UnicodeDecodeError as exc:
        raise MailboxNameError("invalid UTF-16 in modified BASE64") from exc
    if any(_is_direct(c) or c == "&" for c in decoded):
        raise MailboxNameError("modified BASE64 encodes printable ASCII")
    return decoded


# --------------------------------------------------------------------------- names

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def decode_mailbox(raw: bytes, *, utf8: bool) -> str:
    """Turn a mailbox name from the wire into the canonical Unicode name.

    With ``utf8`` (IMAP4rev2 or UTF8=ACCEPT enabled; RFC 9051 §5.1, RFC 6855 §3) names
    are UTF-8 and ``&`` is an ordinary character.  Otherwise ASCII names are modified
    UTF-7 (RFC 3501 §5.1.3); a name that arrives as raw UTF-8 anyway (some clients do
    that) is accepted rather than refused, since it cannot be mistaken for mUTF-7.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MailboxNameError("mailbox name is not valid UTF-8") from exc
    if not utf8 and text.isascii():
        text = mutf7_decode(text)
    # RFC 9051 §5.1: names are Net-Unicode (RFC 5198): no controls, NFC normalised.
    if _CONTROL_RE.search(text):
        raise MailboxNameError("mailbox name contains a control character")
    text = unicodedata.normalize("NFC", text)
    # RFC 9051 §5.1: the name INBOX is case-insensitive.
    if text.upper() == INBOX:
        return INBOX
    return text


def encode_mailbox(name: str, *, utf8: bool) -> str:
    """The wire form of ``name`` for a client with or without UTF-8 names."""
    return name if utf8 else mutf7_encode(name)


# --------------------------------------------------------------------------- LIST


def list_matcher(reference: str, pattern: str, delimiter: str | None) -> Callable[[str], bool]:
    """A predicate matching mailbox names against a LIST reference and pattern.

    RFC 9051 §6.3.9: ``*`` matches zero or more characters at any level, ``%`` the
    same but not the hierarchy delimiter.  The reference is prefixed to the pattern
    (the usual interpretation).  INBOX matches case-insensitively (RFC 9051 §5.1).
    """
    full = reference + pattern if reference else pattern
    if full[:5].upper() == INBOX and (len(full) == 5 or full[5:6] in ("*", "%", delimiter or "")):
        full = INBOX + full[5:]
    parts: list[str] = []
    for ch in full:
        if ch == "*":
            parts.append(".*")
        elif ch == "%":
            parts.append(f"[^{re.escape(delimiter)}]*" if delimiter else ".*")
        else:
            parts.append(re.escape(ch))
    rx = re.compile("".join(parts) + r"\Z", re.DOTALL)
    return lambda name: rx.match(name) is not None
