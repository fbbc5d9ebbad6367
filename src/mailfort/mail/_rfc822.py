"""RFC 5322 / RFC 2045 token parsing, with Dovecot 2.3's exact leniency.

IMAP clients are tested against Dovecot, so BODYSTRUCTURE parameters and
ENVELOPE addresses must come out the way Dovecot's `rfc822-parser.c`,
`rfc2231-parser.c` and `message-address.c` produce them, including their
answers for broken input. This module follows their rules on bytes; it never
raises on any input.

The functions return Dovecot's three-way result: 1 = more data follows,
0 = input ended (a value may still have been produced), -1 = invalid input.
"""

from __future__ import annotations

from dataclasses import dataclass

# Character classes of RFC 5322 §3.2.3 `atext` (1 = atext, 2 = alpha/digit or
# 8-bit, 4 = atext that is a MIME tspecial of RFC 2045 §5.1: "/", "=", "?").
# 8-bit bytes count as atext so that raw UTF-8 survives (RFC 6532).
_ATEXT = bytearray(256)
for _c in b"!#$%&'*+-^_`{|}~":
    _ATEXT[_c] = 1
for _c in b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz":
    _ATEXT[_c] = 2
for _c in b"/=?":
    _ATEXT[_c] = 4
for _c in range(128, 256):
    _ATEXT[_c] = 2
ATEXT = bytes(_ATEXT)
# MIME token chars (RFC 2045 §5.1): atext minus tspecials, plus ".".
TOKEN = bytes(1 if (ATEXT[c] & 3) or c == 0x2E else 0 for c in range(256))

NUL_REPLACEMENT = "\ufffd".encode()
_LWSP = b" \t\r\n"


class Parser:
    """A cursor over one header value (the `rfc822_parser_context`)."""

    __slots__ = ("data", "end", "last_comment", "nul_replacement", "pos")

    def __init__(self, data: bytes, *, keep_comment: bool = False) -> None:
        self.data = data
        self.pos = 0
        self.end = len(data)
        self.last_comment: bytearray | None = bytearray() if keep_comment else None
        self.nul_replacement: bytes | None = None

    def peek(self) -> int:
        """The current byte, or -1 at the end (C reads the terminating NUL)."""
        return self.data[self.pos] if self.pos < self.end else -1

    # RFC 5322 §3.2.2: comments nest; a quoted-pair may not escape CR/LF/NUL.
    def skip_comment(self) -> int:
        data = self.data
        level = 1
        if self.last_comment is not None:
            del self.last_comment[:]
        self.pos += 1
        start = self.pos
        while self.pos < self.end:
            c = data[self.pos]
            if c == 0:
                if self.last_comment is not None and self.nul_replacement is not None:
                    self.last_comment += data[start : self.pos] + self.nul_replacement
                    start = self.pos + 1
            elif c == 0x28:
                level += 1
            elif c == 0x29:
                level -= 1
                if level == 0:
                    if self.last_comment is not None:
                        self.last_comment += data[start : self.pos]
                    self.pos += 1
                    return 1 if self.pos < self.end else 0
            elif c == 0x0A:
                if self.last_comment is not None:
                    seg = data[start : self.pos]
                    if seg.endswith(b"\r"):
                        seg = seg[:-1]
                    self.last_comment += seg
                    start = self.pos + 1
            elif c == 0x5C:
                self.pos += 1
                if self.pos >= self.end:
                    return -1
                if data[self.pos] in (0x0D, 0x0A, 0):
                    self.pos -= 1
                else:
                    if self.last_comment is not None:
                        self.last_comment += data[start : self.pos - 1]
                    start = self.pos
            self.pos += 1
        return -1

    def skip_lwsp(self) -> int:
        data = self.data
        while self.pos < self.end:
            c = data[self.pos]
            if c in (0x20, 0x09, 0x0D, 0x0A):
                self.pos += 1
                continue
            if c != 0x28:
                break
            if self.skip_comment() < 0:
                return -1
        return 1 if self.pos < self.end else 0

    def parse_atom(self, out: bytearray) -> int:
        data = self.data
        if self.pos >= self.end or not ATEXT[data[self.pos]]:
            return -1
        start = self.pos
        self.pos += 1
        while self.pos < self.end:
            if not ATEXT[data[self.pos]]:
                out += data[start : self.pos]
                return self.skip_lwsp()
            self.pos += 1
        out += data[start : self.pos]
        return 0

    def parse_dot_atom(self, out: bytearray) -> int:
        # RFC 5322 §3.2.3 dot-atom; LWSP around "." accepted for RFC 822.
        data = self.data
        if self.pos >= self.end or not ATEXT[data[self.pos]]:
            return -1
        start = self.pos
        self.pos += 1
        while self.pos < self.end:
            if ATEXT[data[self.pos]]:
                self.pos += 1
                continue
            if start == self.pos:
                return -1
            out += data[start : self.pos]
            ret = self.skip_lwsp()
            if ret <= 0:
                return ret
            if data[self.pos] != 0x2E:
                return 1
            self.pos += 1
            out.append(0x2E)
            if self.skip_lwsp() <= 0:
                return -1
            start = self.pos
        out += data[start : self.pos]
        return 0

    def parse_mime_token(self, out: bytearray) -> int:
        data = self.data
        start = self.pos
        while self.pos < self.end:
            if not TOKEN[data[self.pos]]:
                out += data[start : self.pos]
                return self.skip_lwsp()
            self.pos += 1
        out += data[start : self.pos]
        return 0

    def parse_quoted_string(self, out: bytearray) -> int:
        # RFC 5322 §3.2.4; folding (CR)LF inside the quotes is removed.
        data = self.data
        self.pos += 1
        start = self.pos
        while self.pos < self.end:
            c = data[self.pos]
            if c == 0:
                if self.nul_replacement is not None:
                    out += data[start : self.pos] + self.nul_replacement
                    start = self.pos + 1
            elif c == 0x22:
                out += data[start : self.pos]
                self.pos += 1
                return self.skip_lwsp()
            elif c == 0x0A:
                seg = data[start : self.pos]
                if seg.endswith(b"\r"):
                    seg = seg[:-1]
                out += seg
                start = self.pos + 1
            elif c == 0x5C:
                self.pos += 1
                if self.pos >= self.end:
                    return -1
                if data[self.pos] in (0x0D, 0x0A, 0):
                    self.pos -= 1
                else:
                    out += data[start : self.pos - 1]
                    start = self.pos
            self.pos += 1
        return -1

    def _parse_atom_or_dot(self, out: bytearray) -> int:
        data = self.data
        start = self.pos
        while self.pos < self.end:
            c = data[self.pos]
            if ATEXT[c] or c == 0x2E:
                self.pos += 1
                continue
            out += data[start : self.pos]
            return self.skip_lwsp()
        out += data[start : self.pos]
        return 0

    def parse_phrase(self, out: bytearray) -> int:
        # RFC 5322 §4.1 obs-phrase: words and "." separated by CFWS.
        if self.pos >= self.end:
            return 0
        if self.data[self.pos] == 0x2E:
            return -1
        while True:
            if self.peek() == 0x22:
                ret = self.parse_quoted_string(out)
            else:
                ret = self._parse_atom_or_dot(out)
            if ret <= 0:
                return ret
            c = self.peek()
            if not (c >= 0 and ATEXT[c]) and c != 0x22 and c != 0x2E:
                break
            out.append(0x20)
        return self.skip_lwsp()

    def _parse_domain_literal(self, out: bytearray) -> int:
        # RFC 5322 §3.4.1 domain-literal; the brackets and "\" are kept.
        data = self.data
        start = self.pos
        self.pos += 1
        while self.pos < self.end:
            c = data[self.pos]
            if c == 0:
                if self.nul_replacement is not None:
                    out += data[start : self.pos] + self.nul_replacement
                    start = self.pos + 1
            elif c == 0x5B:
                return -1
            elif c == 0x5D:
                out += data[start : self.pos + 1]
                self.pos += 1
                return self.skip_lwsp()
            elif c == 0x0A:
                seg = data[start : self.pos]
                if seg.endswith(b"\r"):
                    seg = seg[:-1]
                out += seg
                start = self.pos + 1
            elif c == 0x5C:
                self.pos += 1
                if self.pos >= self.end:
                    return -1
                if data[self.pos] in (0x0D, 0x0A, 0):
                    out += data[start : self.pos]
                    start = self.pos
                    self.pos -= 1
            self.pos += 1
        return -1

    def parse_domain(self, out: bytearray) -> int:
        self.pos += 1  # the "@"
        if self.skip_lwsp() <= 0:
            return -1
        if self.data[self.pos] == 0x5B:
            return self._parse_domain_literal(out)
        return self.parse_dot_atom(out)

    def parse_content_type(self, out: bytearray) -> int:
        """RFC 2045 §5.1 type "/" subtype into `out` (as Dovecot keeps it)."""
        start_len = len(out)
        if self.skip_lwsp() <= 0:
            return -1
        if self.parse_mime_token(out) <= 0 or len(out) == start_len:
            # Dovecot keeps a bare type here ("text" at the end of the value).
            return -1
        if self.peek() != 0x2F:
            del out[start_len:]
            return -1
        self.pos += 1
        if self.skip_lwsp() <= 0:
            del out[start_len:]
            return -1
        out.append(0x2F)
        sub_start = len(out)
        ret = self.parse_mime_token(out)
        if ret < 0 or len(out) == sub_start or (self.pos != self.end and self.peek() != 0x3B):
            del out[start_len:]
            return -1
        return ret

    def parse_content_param(self) -> tuple[int, bytes, bytes]:
        """One `; attribute=value` (RFC 2045 §5.1); returns (ret, key, value)."""
        if self.pos >= self.end:
            return 0, b"", b""
        if self.data[self.pos] != 0x3B:
            return -1, b"", b""
        self.pos += 1
        if self.skip_lwsp() <= 0:
            return -1, b"", b""
        key = bytearray()
        if self.parse_mime_token(key) <= 0:
            return -1, b"", b""
        if self.peek() != 0x3D:
            return -1, b"", b""
        self.pos += 1
        value = bytearray()
        ret = self.skip_lwsp()
        if ret <= 0:
            pass
        elif self.data[self.pos] == 0x22:
            ret = self.parse_quoted_string(value)
        elif self.data[self.pos] == 0x3D:
            # Broken senders write name==?utf-8?b?...?= unquoted.
            while self.pos < self.end and self.data[self.pos] not in b"; \t\r\n":
                value.append(self.data[self.pos])
                self.pos += 1
        else:
            ret = self.parse_mime_token(value)
        return (-1 if ret < 0 else 1), bytes(key), bytes(value)


def _rfc2231_escape(value: bytes) -> bytes:
    return value.replace(b"%", b"%25")


def parse_params(p: Parser) -> tuple[list[tuple[bytes, bytes]], bool]:
    """Parameters after the type, RFC 2231 continuations merged (§3, §4).

    Plain parameters come first in header order, merged RFC 2231 ones after,
    sorted by name: that is the order Dovecot reports them in.
    """
    prev_nul = p.nul_replacement
    p.nul_replacement = NUL_REPLACEMENT
    result: list[tuple[bytes, bytes]] = []
    ext: list[tuple[bytes, int, bool, bytes]] = []
    broken = False
    # Dovecot reuses one struct: a bare "name*" inherits the previous index.
    idx = 0
    while True:
        ret, key, value = p.parse_content_param()
        if ret == 0:
            break
        if ret < 0:
            broken = True
            if p.pos >= p.end:
                break
            p.pos += 1
            continue
        star = key.find(b"*")
        if star < 0:
            result.append((key, value))
            continue
        q = star
        if q + 1 < len(key):
            q += 1
            idx = 0
            while q < len(key) and 0x30 <= key[q] <= 0x39:
                idx = idx * 10 + key[q] - 0x30
                q += 1
        extended = q < len(key) and key[q] == 0x2A
        if extended:
            q += 1
        if q < len(key):
            result.append((key, value))
        else:
            ext.append((key[:star], idx, extended, value))
    p.nul_replacement = prev_nul
    if not ext:
        return result, broken
    ext.sort(key=lambda e: (e[0], e[1]))
    i = 0
    while i < len(ext):
        name = ext[i][0].lower()
        j = i
        ok = True
        have_ext = False
        next_idx = 0
        while j < len(ext) and ext[j][0].lower() == name:
            if ext[j][1] != next_idx:
                ok = False
            if ext[j][2]:
                have_ext = True
            next_idx += 1
            j += 1
        if not ok:
            for k in range(i, j):
                suffix = b"*%d*" if ext[k][2] else b"*%d"
                result.append((ext[k][0] + suffix % ext[k][1], ext[k][3]))
        else:
            merged = bytearray()
            if not ext[i][2] and have_ext:
                merged += b"''"
            for k in range(i, j):
                if not ext[k][2] and have_ext:
                    merged += _rfc2231_escape(ext[k][3])
                else:
                    merged += ext[k][3]
            out_key = ext[i][0] + b"*" if have_ext else ext[i][0]
            result.append((out_key, bytes(merged)))
        i = j
    return result, broken


# ---------------------------------------------------------------------------
# Addresses (RFC 5322 §3.4), as Dovecot's message-address.c reads them with
# MESSAGE_ADDRESS_PARSE_FLAG_FILL_MISSING and non-strict dots.


@dataclass(slots=True)
class Address:
    """One ENVELOPE address; a group is bracketed by start/end markers.

    Group start: mailbox = group name, domain None (RFC 9051 §7.5.2).
    Group end: every field None.
    """

    name: bytes | None = None
    route: bytes | None = None
    mailbox: bytes | None = None
    domain: bytes | None = None
    invalid: bool = False


class _AddrParser:
    __slots__ = ("addr", "buf", "out", "p")

    def __init__(self, value: bytes) -> None:
        self.p = Parser(value, keep_comment=True)
        self.p.nul_replacement = NUL_REPLACEMENT
        self.out: list[Address] = []
        self.addr = Address()
        # Dovecot's shared scratch string: a failed local-part leaves its
        # partial text here, and the lone-word rule below reads it.
        self.buf = bytearray()

    def add(self) -> None:
        self.out.append(self.addr)
        self.addr = Address()

    def nonstrict_dot_atom(self, buf: bytearray) -> int:
        p = self.p
        ret = -1
        while True:
            while p.peek() == 0x2E:
                buf.append(0x2E)
                p.pos += 1
                if p.pos == p.end:
                    return 0
                ret = 1
            if p.peek() == 0x40:
                break
            ret = p.parse_atom(buf)
            if not (ret > 0 and p.peek() == 0x2E):
                break
        return ret

    def local_part(self) -> int:
        buf = self.buf = bytearray()
        if self.p.peek() == 0x22:
            ret = self.p.parse_quoted_string(buf)
        else:
            ret = self.nonstrict_dot_atom(buf)
        if ret < 0:
            return -1
        self.addr.mailbox = bytes(buf)
        return ret

    def domain(self) -> int:
        buf = self.buf = bytearray()
        ret = self.p.parse_domain(buf)
        if ret < 0:
            return -1
        self.addr.domain = bytes(buf)
        return ret

    def domain_list(self) -> int:
        # RFC 5322 §4.4 obs-domain-list (source routes).
        p = self.p
        buf = bytearray()
        while True:
            if p.pos >= p.end:
                return 0
            if p.peek() != 0x40:
                break
            if buf:
                buf.append(0x2C)
            buf.append(0x40)
            ret = p.parse_domain(buf)
            if ret <= 0:
                return ret
            while p.skip_lwsp() > 0 and p.peek() == 0x2C:
                p.pos += 1
        self.addr.route = bytes(buf)
        return 1

    def angle_addr(self) -> int:
        p = self.p
        p.pos += 1
        if p.skip_lwsp() <= 0:
            return -1
        if p.peek() == 0x40:
            if self.domain_list() > 0 and p.peek() == 0x3A:
                p.pos += 1
            else:
                self.addr.route = b"INVALID_ROUTE"
                if p.pos >= p.end:
                    return -1
            if p.skip_lwsp() <= 0:
                return -1
        if p.peek() != 0x3E:
            if self.local_part() <= 0:
                return -1
            if p.peek() == 0x40 and self.domain() <= 0:
                return -1
        if p.peek() != 0x3E:
            return -1
        p.pos += 1
        return p.skip_lwsp()

    def name_addr(self) -> int:
        p = self.p
        buf = bytearray()
        if p.parse_phrase(buf) <= 0 or p.peek() != 0x3C:
            return -1
        self.addr.name = bytes(buf) or None
        if self.angle_addr() < 0:
            self.addr.domain = b"SYNTAX_ERROR"
            self.addr.invalid = True
        return 1 if p.pos < p.end else 0

    def addr_spec(self) -> int:
        p = self.p
        ret2 = -2
        assert p.last_comment is not None
        del p.last_comment[:]
        quoted = p.peek() == 0x22
        ret = self.local_part()
        if ret <= 0:
            self.addr.invalid = True
        if ret != 0 and p.pos < p.end and p.peek() == 0x40:
            ret2 = self.domain()
            if ret2 <= 0:
                ret = ret2
        if p.last_comment:
            self.addr.name = bytes(p.last_comment)
        elif ret2 == -2:
            # A lone word is a mailbox; followed by more words, a name.
            buf = self.buf
            buf.append(0x20)
            orig = len(buf)
            p.parse_phrase(buf)
            if len(buf) != orig:
                self.addr.mailbox = None
                self.addr.name = bytes(buf)
            elif not quoted:
                self.addr.domain = b""
            self.addr.invalid = True
            ret = -1
        return ret

    def fixed_add(self) -> None:
        if self.addr.mailbox is None:
            self.addr.mailbox = b"MISSING_MAILBOX"
            self.addr.invalid = True
        if not self.addr.domain:
            self.addr.domain = b"MISSING_DOMAIN"
            self.addr.invalid = True
        self.add()

    def mailbox(self) -> int:
        p = self.p
        start = p.pos
        ret = self.name_addr()
        if ret < 0:
            p.pos = start
            self.addr = Address()
            ret = self.addr_spec()
            a = self.addr
            if a.invalid and a.name is None and a.mailbox is not None and a.domain is None:
                a.name, a.mailbox = a.mailbox, None
        if ret < 0:
            self.addr.invalid = True
        self.fixed_add()
        return ret

    def group(self) -> int:
        p = self.p
        buf = bytearray()
        if p.parse_phrase(buf) <= 0 or p.peek() != 0x3A:
            return -1
        p.pos += 1
        ret = p.skip_lwsp()
        if ret <= 0:
            self.addr.invalid = True
        self.addr.mailbox = bytes(buf)
        self.add()
        if ret > 0 and p.peek() != 0x3B:
            while True:
                self.mailbox()
                if p.pos >= p.end or p.peek() != 0x2C:
                    break
                p.pos += 1
                if p.skip_lwsp() <= 0:
                    ret = -1
                    break
        if ret >= 0:
            if p.pos >= p.end or p.peek() != 0x3B:
                ret = -1
            else:
                p.pos += 1
                ret = p.skip_lwsp()
        if ret < 0:
            self.addr.invalid = True
        self.add()
        return 0 if ret == 0 else 1

    def address(self) -> int:
        p = self.p
        start = p.pos
        ret = self.group()
        if ret < 0:
            p.pos = start
            self.addr = Address()
            ret = self.mailbox()
        return ret

    def address_list(self) -> None:
        p = self.p
        # Bounded only by input length: each round consumes at least a byte.
        while True:
            if self.address() == 0:
                break
            if p.pos >= p.end or p.peek() != 0x2C:
                break
            p.pos += 1
            ret = p.skip_lwsp()
            if ret <= 0:
                if ret < 0:
                    self.fixed_add()
                break


def parse_addresses(value: bytes) -> list[Address]:
    """Parse an address-list header value (RFC 5322 §3.4) like Dovecot."""
    ap = _AddrParser(value)
    if ap.p.skip_lwsp() > 0:
        ap.address_list()
    return ap.out
