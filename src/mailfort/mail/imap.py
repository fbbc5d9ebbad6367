"""ENVELOPE, BODY and BODYSTRUCTURE wire text (RFC 9051 §7.5.2), as Dovecot.

Strings are quoted or sent as literals exactly where Dovecot 2.3.19 does it
(`imap-quote.c`): a literal for 8-bit bytes, CR/LF, or more than four
quoted-specials; Subject and display names are whitespace-collapsed "for
humans". The functions return `str` holding the wire bytes decoded as UTF-8
with surrogateescape, so `to_wire()` gives back the exact bytes, including
8-bit header bytes and the byte counts in `{N}` literal prefixes.
"""

from __future__ import annotations

from ._rfc822 import Address
from .parser import Envelope, Flags, ParsedMessage, Part

_QUOTED_MAX_ESCAPES = 4
DEFAULT_CHARSET = b"us-ascii"
_EMPTY_BODY = b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0)'
_EMPTY_BODYSTRUCTURE = b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL NIL NIL)'


def to_wire(text: str) -> bytes:
    """The exact bytes of a string returned by this module's renderers."""
    return text.encode("utf-8", "surrogateescape")


def _from_wire(data: bytes | bytearray) -> str:
    return bytes(data).decode("utf-8", "surrogateescape")


def _cstr(s: bytes) -> bytes:
    # Dovecot handles these values as C strings: a NUL ends them.
    i = s.find(b"\0")
    return s if i < 0 else s[:i]


def _quoted(out: bytearray, s: bytes) -> None:
    out.append(0x22)
    for c in s:
        if c in (0x0D, 0x0A) or c >= 0x80:
            continue
        if c in (0x22, 0x5C):
            out.append(0x5C)
        out.append(c)
    out.append(0x22)


def append_nstring(out: bytearray, s: bytes | None) -> None:
    """RFC 9051 §4.3 string or NIL, quoted unless a literal is needed."""
    if s is None:
        out += b"NIL"
        return
    s = _cstr(s)
    escapes = 0
    for c in s:
        if c in (0x22, 0x5C):
            escapes += 1
            if escapes <= _QUOTED_MAX_ESCAPES:
                continue
            break
        if c in (0x0D, 0x0A) or c >= 0x80:
            break
    else:
        _quoted(out, s)
        return
    out += b"{%d}\r\n" % len(s)
    out += s


def append_nstring_nolf(out: bytearray, s: bytes | None) -> None:
    """nstring with folding line breaks removed (a space kept between lines)."""
    if s is None or (b"\r" not in s and b"\n" not in s):
        append_nstring(out, s)
        return
    s = _cstr(s)
    buf = bytearray()
    n = len(s)
    for i, c in enumerate(s):
        if c not in (0x0D, 0x0A):
            buf.append(c)
        elif i + 1 < n and s[i + 1] not in (0x20, 0x09, 0x0D, 0x0A, 0):
            buf.append(0x20)
    append_nstring(out, bytes(buf))


def append_string_for_humans(out: bytearray, s: bytes) -> None:
    """Subject/display-name text: whitespace runs become one space, leading
    and trailing whitespace go, NUL becomes 0x80; literal if anything changed.
    """
    s = _cstr(s)
    size = len(s)
    remove = 0
    last_lwsp = True
    ws_prefix = True
    modify = False
    for c in s:
        if c in (0x0D, 0x0A, 0x09, 0x20):
            if c != 0x20:
                modify = True
            if last_lwsp:
                modify = True
                remove += 1
            last_lwsp = True
        elif c in (0x22, 0x5C):
            modify = True
            last_lwsp = False
        else:
            if c >= 0x80:
                modify = True
            last_lwsp = False
        if not last_lwsp:
            ws_prefix = False
    if last_lwsp and size > 0 and not ws_prefix:
        modify = True
        remove += 1
    if not modify:
        out += b'"' + s + b'"'
        return
    if size == remove:
        out += b'""'
        return
    out += b"{%d}\r\n" % (size - remove)
    start = len(out)
    last_lwsp = True
    ws_prefix = True
    for c in s:
        if c in (0x0D, 0x0A, 0x09, 0x20):
            if not last_lwsp:
                out.append(0x20)
            last_lwsp = True
        else:
            last_lwsp = False
            out.append(c)
        if not last_lwsp:
            ws_prefix = False
    if last_lwsp and size > 0 and not ws_prefix and len(out) > start:
        del out[-1]


def _addresses(out: bytearray, addrs: list[Address] | None) -> None:
    if not addrs:
        out += b"NIL"
        return
    out.append(0x28)
    for a in addrs:
        out.append(0x28)
        if a.name is None:
            out += b"NIL"
        else:
            append_string_for_humans(out, a.name)
        out.append(0x20)
        append_nstring(out, a.route)
        out.append(0x20)
        append_nstring(out, a.mailbox)
        out.append(0x20)
        append_nstring(out, a.domain)
        out.append(0x29)
    out.append(0x29)


def write_envelope(out: bytearray, env: Envelope | None) -> None:
    """The ENVELOPE fields without the enclosing parentheses."""
    if env is None:
        out += b"NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL"
        return
    append_nstring_nolf(out, env.date)
    out.append(0x20)
    if env.subject is None:
        out += b"NIL"
    else:
        append_string_for_humans(out, env.subject)
    out.append(0x20)
    _addresses(out, env.from_)
    out.append(0x20)
    # RFC 9051 §7.5.2: Sender and Reply-To default to From.
    _addresses(out, env.sender if env.sender is not None else env.from_)
    out.append(0x20)
    _addresses(out, env.reply_to if env.reply_to is not None else env.from_)
    out.append(0x20)
    _addresses(out, env.to)
    out.append(0x20)
    _addresses(out, env.cc)
    out.append(0x20)
    _addresses(out, env.bcc)
    out.append(0x20)
    append_nstring_nolf(out, env.in_reply_to)
    out.append(0x20)
    append_nstring_nolf(out, env.message_id)


def _params(
    out: bytearray, params: list[tuple[bytes, bytes]] | None, default_charset: bool
) -> None:
    if not params and not default_charset:
        out += b"NIL"
        return
    out.append(0x28)
    seen_charset = False
    for i, (name, value) in enumerate(params or ()):
        if i:
            out.append(0x20)
        if default_charset and _cstr(name).lower() == b"charset":
            seen_charset = True
        append_nstring(out, name)
        out.append(0x20)
        append_nstring(out, value)
    if default_charset and not seen_charset:
        if params:
            out.append(0x20)
        out += b'"charset" "us-ascii"'
    out.append(0x29)


def _common_ext(out: bytearray, part: Part) -> None:
    # RFC 9051 §7.5.2 body-ext-1part/mpart tail: disposition, language, location.
    f = part.fields
    out.append(0x20)
    if f.disposition is None:
        out += b"NIL"
    else:
        out.append(0x28)
        append_nstring(out, f.disposition)
        out.append(0x20)
        _params(out, f.disposition_params, False)
        out.append(0x29)
    out.append(0x20)
    if f.language is None:
        out += b"NIL"
    else:
        out.append(0x28)
        for i, lang in enumerate(f.language):
            if i:
                out.append(0x20)
            append_nstring(out, lang)
        out.append(0x29)
    out.append(0x20)
    append_nstring_nolf(out, f.location)


def _is_truncated(part: Part) -> bool:
    # Parts whose declared type the parser could not honour (nesting limits,
    # or a type without subtype): Dovecot reports application/octet-stream.
    f = part.fields
    if f.content_type is not None:
        ct = _cstr(f.content_type).lower()
        if ct == b"message" and _cstr(f.subtype or b"").lower() == b"rfc822":
            return True
        return ct == b"multipart"
    parent = part.parent
    return parent is not None and bool(parent.flags & Flags.MULTIPART_DIGEST)


def write_part(out: bytearray, part: Part, extended: bool) -> None:
    """One body (RFC 9051 §7.5.2 `body`), without the outer parentheses."""
    f = part.fields
    if part.flags & Flags.MULTIPART:
        if part.children:
            for child in part.children:
                out.append(0x28)
                write_part(out, child, extended)
                out.append(0x29)
        else:
            # A multipart without parts is not allowed; Dovecot writes an
            # empty text/plain in its place.
            out += _EMPTY_BODYSTRUCTURE if extended else _EMPTY_BODY
        out.append(0x20)
        append_nstring(out, f.subtype if f.subtype is not None else b"")
        if not extended:
            return
        out.append(0x20)
        _params(out, f.params, False)
        _common_ext(out, part)
        return

    rfc822 = bool(part.flags & Flags.MESSAGE_RFC822)
    if rfc822:
        out += b'"message" "rfc822"'
        text = False
    elif _is_truncated(part):
        out += b'"application" "octet-stream"'
        text = False
    elif f.content_type is None:
        out += b'"text" "plain"'
        text = True
    else:
        text = _cstr(f.content_type).lower() == b"text"
        append_nstring(out, f.content_type)
        out.append(0x20)
        append_nstring(out, f.subtype if f.subtype is not None else b"")
    out.append(0x20)
    _params(out, f.params, text)
    out.append(0x20)
    append_nstring_nolf(out, f.content_id)
    out.append(0x20)
    append_nstring_nolf(out, f.description)
    out.append(0x20)
    if f.encoding is not None:
        append_nstring(out, f.encoding)
    else:
        out += b'"7bit"'
    out += b" %d" % part.body_vsize
    if text:
        out += b" %d" % part.body_lines
    elif rfc822:
        inner = part.children[0] if part.children else None
        out += b" ("
        write_envelope(out, inner.envelope if inner is not None else None)
        out += b") "
        if inner is not None:
            out.append(0x28)
            write_part(out, inner, extended)
            out.append(0x29)
        else:
            out += _EMPTY_BODYSTRUCTURE if extended else _EMPTY_BODY
        out += b" %d" % part.body_lines
    if not extended:
        return
    out.append(0x20)
    append_nstring_nolf(out, f.md5)
    _common_ext(out, part)


def envelope(msg: ParsedMessage) -> str:
    """ENVELOPE value, parentheses included (RFC 9051 §7.5.2)."""
    out = bytearray(b"(")
    write_envelope(out, msg.envelope)
    out.append(0x29)
    return _from_wire(out)


def is_plain_7bit(root: Part) -> bool:
    """A single text/plain us-ascii 7bit part with no other MIME fields.

    Dovecot caches such messages as a flag and then always answers the
    canonical lower-case BODYSTRUCTURE, whatever case the headers used
    ("TEXT/PLAIN; CHARSET=US-ASCII" comes back as "text" "plain" ...). We
    answer the same, since clients compare against Dovecot.
    """
    f = root.fields
    if not root.flags & Flags.TEXT or root.children or root.parent is not None:
        return False
    if f.subtype is not None and _cstr(f.subtype).lower() != b"plain":
        return False
    if f.params and (
        len(f.params) != 1
        or _cstr(f.params[0][0]).lower() != b"charset"
        or _cstr(f.params[0][1]).lower() != DEFAULT_CHARSET
    ):
        return False
    if f.content_id is not None or f.description is not None:
        return False
    if f.encoding is not None and _cstr(f.encoding).lower() != b"7bit":
        return False
    return f.md5 is None and f.disposition is None and f.language is None and f.location is None


def _structure(msg: ParsedMessage, part: Part | None, extended: bool) -> str:
    target = part or msg.root
    out = bytearray(b"(")
    if target is msg.root and is_plain_7bit(target):
        out += b'"text" "plain" ("charset" "us-ascii") NIL NIL "7bit" %d %d' % (
            target.body_vsize,
            target.body_lines,
        )
        if extended:
            out += b" NIL NIL NIL NIL"
    else:
        write_part(out, target, extended)
    out.append(0x29)
    return _from_wire(out)


def bodystructure(msg: ParsedMessage, part: Part | None = None) -> str:
    """Extended BODYSTRUCTURE value, parentheses included (RFC 9051 §7.5.2)."""
    return _structure(msg, part, True)


def body(msg: ParsedMessage, part: Part | None = None) -> str:
    """Non-extended BODY value, parentheses included (RFC 9051 §7.5.2)."""
    return _structure(msg, part, False)


def rfc822_size(msg: ParsedMessage) -> int:
    """RFC822.SIZE: the message length with CRLF line endings (RFC 9051 §7.5.2)."""
    return msg.size
