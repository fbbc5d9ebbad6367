"""What the store indexes for a message at delivery: `extract_meta`.

Everything IMAP needs without opening the message body again: the ENVELOPE,
BODY and BODYSTRUCTURE strings, decoded header fields for SEARCH and sorting,
and the plain text of the text parts for full-text SEARCH BODY/TEXT.
"""

from __future__ import annotations

import codecs
import email.utils
import json
import re
from dataclasses import asdict, dataclass, field
from html.parser import HTMLParser
from typing import Any

from ._codec import decode_base64, decode_qp
from ._rfc822 import Address
from .imap import body, bodystructure, envelope
from .parser import Flags, Header, ParsedMessage, Part, iter_headers, parse_message, to_crlf
from .section import CTE_BASE64, CTE_QP, part_cte

TEXT_CAP = 1 << 20  # bytes of UTF-8 kept for full-text search
_META_VERSION = 1

_ENCODED_WORD = re.compile(rb"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_WS_ONLY = re.compile(rb"[ \t\r\n]*")
_MSG_ID = re.compile(r"<[^<>\s]*>")
_BLOCK_TAGS = frozenset(
    (
        "address",
        "article",
        "aside",
        "blockquote",
        "br",
        "dd",
        "div",
        "dl",
        "dt",
        "fieldset",
        "figcaption",
        "figure",
        "footer",
        "form",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "header",
        "hr",
        "li",
        "main",
        "nav",
        "ol",
        "p",
        "pre",
        "section",
        "table",
        "td",
        "th",
        "tr",
        "ul",
    )
)
# Charset labels whose Python codecs are not charsets at all.
_NOT_CHARSETS = ("escape", "idna", "punycode", "undefined", "_codec", "mbcs", "oem")


@dataclass(slots=True)
class MessageMeta:
    """Indexed data of one message; `to_bytes()`/`from_bytes()` round-trip.

    Address lists hold (display name, address) pairs, the name decoded
    (RFC 2047) and "" when absent; group syntax is flattened.
    """

    size: int
    envelope: str
    bodystructure: str
    body: str
    subject: str | None = None
    from_: list[tuple[str, str]] = field(default_factory=list)
    to: list[tuple[str, str]] = field(default_factory=list)
    cc: list[tuple[str, str]] = field(default_factory=list)
    bcc: list[tuple[str, str]] = field(default_factory=list)
    date: int | None = None  # Date: header as a UTC Unix timestamp
    message_id: str | None = None
    in_reply_to: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    text: str = ""

    def to_bytes(self) -> bytes:
        d: dict[str, Any] = asdict(self)
        d["v"] = _META_VERSION
        # ensure_ascii keeps lone surrogates (8-bit header bytes) intact.
        return json.dumps(d, separators=(",", ":"), ensure_ascii=True).encode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes) -> MessageMeta:
        d = json.loads(data)
        d.pop("v", None)
        for key in ("from_", "to", "cc", "bcc"):
            d[key] = [(str(n), str(a)) for n, a in d.get(key, [])]
        return cls(**d)


# --- header decoding ---------------------------------------------------------


def decode_bytes(data: bytes, charset: str | None = None) -> str:
    """Bytes in a declared charset to text, never failing.

    Unknown or unusable labels fall back to UTF-8, then Windows-1252 (which
    is also what "us-ascii"/"iso-8859-1" mail usually is when 8-bit).
    """
    if charset:
        label = charset.strip().strip('"').lower()
        label = label.split("*", 1)[0]  # RFC 2231 §5 language suffix
        if label in ("us-ascii", "ascii", "iso-8859-1", "latin1", "latin-1"):
            label = ""
        if label and not any(bad in label for bad in _NOT_CHARSETS):
            try:
                if codecs.lookup(label)._is_text_encoding:
                    return data.decode(label, "replace")
            except (LookupError, UnicodeError, ValueError):
                pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


def _decode_word(charset: bytes, enc: bytes, text: bytes) -> str | None:
    # RFC 2047 §4.2: "_" is a space in the Q encoding.
    raw = decode_base64(text) if enc in (b"b", b"B") else decode_qp(text.replace(b"_", b" "))
    return decode_bytes(raw, charset.decode("ascii", "replace"))


def decode_header(value: bytes) -> str:
    """Unfold (RFC 5322 §2.2.3) and decode encoded-words (RFC 2047 §6).

    Whitespace between two adjacent encoded-words is dropped (§6.2); other
    text is taken as UTF-8 (RFC 6532), else Windows-1252.
    """
    value = value.replace(b"\r", b"").replace(b"\n", b"")
    out: list[str] = []
    pos = 0
    prev_word = False
    for m in _ENCODED_WORD.finditer(value):
        gap = value[pos : m.start()]
        if not (prev_word and _WS_ONLY.fullmatch(gap)):
            out.append(decode_bytes(gap))
        word = _decode_word(m.group(1), m.group(2), m.group(3))
        out.append(word if word is not None else decode_bytes(m.group(0)))
        pos = m.end()
        prev_word = True
    out.append(decode_bytes(value[pos:]))
    return "".join(out).strip()


def _addresses(addrs: list[Address] | None) -> list[tuple[str, str]]:
    result: list[tuple[str, str]] = []
    for a in addrs or ():
        if a.domain is None:  # group start/end markers
            continue
        name = decode_header(a.name) if a.name else ""
        mailbox = (a.mailbox or b"").decode("utf-8", "replace")
        domain = a.domain.decode("utf-8", "replace")
        if a.mailbox in (None, b"MISSING_MAILBOX") or not mailbox:
            addr = ""
        elif domain in ("", "MISSING_DOMAIN", "SYNTAX_ERROR"):
            addr = mailbox
        else:
            addr = f"{mailbox}@{domain}"
        if addr or name:
            result.append((name, addr))
    return result


def parse_date(value: bytes) -> int | None:
    """RFC 5322 §3.3 date-time (obsolete forms too) to a UTC timestamp."""
    text = value.decode("ascii", "replace").replace("\n", " ").strip()
    if not text:
        return None
    try:
        parts = email.utils.parsedate_tz(text)
        if parts is None:
            return None
        return int(email.utils.mktime_tz(parts))
    except (ValueError, OverflowError, TypeError, IndexError):
        return None


def _msg_ids(value: bytes) -> list[str]:
    # RFC 5322 §3.6.4 msg-id lists; comments and phrases around them ignored.
    return _MSG_ID.findall(value.replace(b"\n", b"").decode("utf-8", "replace"))


# --- text extraction -----------------------------------------------------------


class _HTMLText(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style", "head", "title"):
            self.skip += 1
        elif tag in _BLOCK_TAGS:
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head", "title"):
            self.skip = max(0, self.skip - 1)
        elif tag in _BLOCK_TAGS:
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.out.append(data)


def html_to_text(html: str) -> str:
    """Visible text of an HTML body (scripts, styles and markup dropped)."""
    p = _HTMLText()
    try:
        p.feed(html)
        p.close()
    except (AssertionError, ValueError):  # pragma: no cover - parser is lenient
        pass
    text = "".join(p.out)
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    return re.sub(r"\n\s*\n+", "\n\n", text).strip()


def _param(part: Part, name: bytes) -> str | None:
    for k, v in part.fields.params:
        if k.lower() == name:
            return v.decode("ascii", "replace")
    return None


def part_text(raw: bytes, part: Part) -> str:
    """Decoded, charset-converted text of one text/* leaf part."""
    data = raw[part.header_end : part.end]
    cte = part_cte(raw, part)
    if cte == CTE_QP:
        data = decode_qp(data)
    elif cte == CTE_BASE64:
        data = decode_base64(data)
    text = decode_bytes(data, _param(part, b"charset"))
    if (part.fields.subtype or b"").lower() in (b"html", b"xhtml+xml"):
        text = html_to_text(text)
    return text.replace("\r\n", "\n")


def _text_parts(root: Part) -> list[Part]:
    return [
        p
        for p in root.walk()
        if not p.children and p.flags & Flags.TEXT and not p.flags & Flags.MESSAGE_RFC822
    ]


def extract_text(raw: bytes, msg: ParsedMessage, cap: int = TEXT_CAP) -> str:
    """Plain text of all text/* parts for SEARCH BODY/TEXT, at most `cap` bytes."""
    chunks: list[str] = []
    used = 0
    for part in _text_parts(msg.root):
        if used >= cap:
            break
        # Decoding more than the cap's worth of source can't add anything.
        if part.end - part.header_end > 8 * cap:
            part = Part(
                offset=part.offset,
                header_end=part.header_end,
                end=part.header_end + 8 * cap,
                flags=part.flags,
                fields=part.fields,
            )
        t = part_text(raw, part).strip()
        if not t:
            continue
        enc = t.encode("utf-8", "surrogatepass")
        if used + len(enc) + 1 > cap:
            t = enc[: max(0, cap - used)].decode("utf-8", "ignore")
        chunks.append(t)
        used += len(t.encode("utf-8", "surrogatepass")) + 1
    return "\n".join(chunks)


def _root_headers(raw: bytes, msg: ParsedMessage) -> list[Header]:
    return list(iter_headers(raw, msg.root.offset, msg.root.header_end))


def extract_meta(raw: bytes) -> MessageMeta:
    """Everything the store indexes at delivery. Never raises on any input.

    `raw` is normalised with `to_crlf` first, matching what the store keeps.
    """
    raw = to_crlf(raw)
    msg = parse_message(raw)
    env = msg.envelope
    refs: list[str] = []
    for h in _root_headers(raw, msg):
        if h.lname == b"references":
            refs.extend(_msg_ids(h.value))
    mid = _msg_ids(env.message_id) if env.message_id is not None else []
    message_id = (
        mid[0]
        if mid
        else (
            env.message_id.decode("utf-8", "replace").strip() or None
            if env.message_id is not None
            else None
        )
    )
    return MessageMeta(
        size=msg.size,
        envelope=envelope(msg),
        bodystructure=bodystructure(msg),
        body=body(msg),
        subject=decode_header(env.subject) if env.subject is not None else None,
        from_=_addresses(env.from_),
        to=_addresses(env.to),
        cc=_addresses(env.cc),
        bcc=_addresses(env.bcc),
        date=parse_date(env.date) if env.date is not None else None,
        message_id=message_id,
        in_reply_to=_msg_ids(env.in_reply_to) if env.in_reply_to is not None else [],
        references=refs,
        text=extract_text(raw, msg),
    )
