"""Checks on received message bytes, free of I/O.

SMTP smuggling (2023) abuses servers that disagree on where DATA ends: a bare LF or CR
before the final dot. Our core ends DATA only at CRLF.CRLF, so nothing is split here, but
a message carrying bare line ends could be split by the next hop when forwarded. Like
Postfix 3.9 (`smtpd_forbid_bare_newline`), we refuse such content outright.
"""

from __future__ import annotations

import re

# Matched in "\n" + the lower-cased header section: the same fields as
# ``^received[ \t]*:`` with IGNORECASE and MULTILINE, but a literal start the regex
# engine finds by a fast search instead of trying every position.
_RECEIVED = re.compile(rb"\nreceived[ \t]*:")

MAX_RECEIVED = 25  # RFC 5321 §6.3: a loop shows as a long trace


# RFC 5321 §4.1.2 Mailbox, with RFC 6531 UTF-8 allowed in both parts (SMTPUTF8).
_DOT_ATOM = r"[^\x00-\x20\x7f()<>\[\]:;@\\,.\"]+(?:\.[^\x00-\x20\x7f()<>\[\]:;@\\,.\"]+)*"
_QUOTED = r'"(?:[^"\\\r\n]|\\[\x20-\x7e])*"'
_DOMAIN = r"(?:[^\x00-\x20\x7f()<>\[\]:;@\\,.\"]+(?:\.[^\x00-\x20\x7f()<>\[\]:;@\\,.\"]+)*|\[[^\[\]\\\s]+\])"
_MAILBOX = re.compile(rf"^(?:{_DOT_ATOM}|{_QUOTED})@{_DOMAIN}$")


def valid_mailbox(address: str) -> bool:
    """Syntax check of an envelope address (the core hands over what sat between <>)."""
    return len(address) <= 320 and _MAILBOX.match(address) is not None


def rcpt_refusal(address: str, options: list[str], accepted: int, limit: int) -> str | None:
    """The reply refusing a RCPT on its form alone, or None (both listeners share it)."""
    if options:
        return "555 5.5.4 RCPT TO parameters not supported"
    if not valid_mailbox(address):
        return "501 5.1.3 Bad recipient address syntax"
    if accepted >= limit:
        # RFC 5321 §4.5.3.1.10: the client sends the rest in another transaction.
        return "452 4.5.3 Too many recipients"
    return None


def has_bare_line_end(raw: bytes) -> bool:
    """A CR not followed by LF, or an LF not preceded by CR, anywhere in ``raw``.

    Every CRLF pair holds one CR and one LF, and pairs never overlap, so the message is
    clean exactly when all three counts agree; ``bytes.count`` runs in C at memchr speed,
    where the two regular-expression scans this replaces cost ~40 µs on 5 KB.
    """
    pairs = raw.count(b"\r\n")
    return raw.count(b"\r") != pairs or raw.count(b"\n") != pairs


def header_block(raw: bytes) -> bytes:
    end = raw.find(b"\r\n\r\n")
    return raw if end < 0 else raw[: end + 2]


def received_count(raw: bytes) -> int:
    return len(_RECEIVED.findall(b"\n" + header_block(raw).lower()))
