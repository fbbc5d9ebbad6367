"""A small IMAP client on a raw TLS socket, for exact answers and for timing servers.

imaplib reshapes answers (and its parsing costs more than a fast server's work on large
responses, stack-notes), so the Dovecot comparison and the benchmark talk IMAP themselves:
commands go out as bytes, answers come back as bytes with literals in place, and
:func:`parse` turns a FETCH answer into nested values for comparison.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_LITERAL_AT_END = re.compile(rb"~?\{(\d+)\+?\}$")


class ImapError(Exception):
    pass


@dataclass
class Literal:
    data: bytes
    binary: bool = False  # literal8 (RFC 3516), for messages holding NUL


@dataclass
class Response:
    untagged: list[bytes]  # each "* ..." response, literals inline as {N}\r\n<bytes>
    status: bytes  # OK, NO or BAD
    text: bytes  # the tagged line after the status
    size: int  # bytes read for the whole answer


def tls_client_context(cafile: Path | str | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cafile) if cafile else None)


class RawImap:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        context: ssl.SSLContext | None = None,
        server_hostname: str = "localhost",
        timeout: float = 60,
    ) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = (
            context.wrap_socket(sock, server_hostname=server_hostname) if context else sock
        )
        self.buf = bytearray()
        self.greeting = self._line()
        self.capabilities: set[bytes] = set()

    # ---- transport --------------------------------------------------------------------

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 18)
        if not chunk:
            raise ImapError("connection closed by the server")
        self.buf += chunk

    def _line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[: end + 2]
                return line
            self._fill()

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    # ---- commands ---------------------------------------------------------------------

    def new_tag(self) -> bytes:
        # Random, so that the fast reader can look for "\r\nTAG " without parsing literals.
        return b"T" + secrets.token_hex(4).encode()

    def command(self, *parts: bytes | Literal) -> Response:
        """Send one command; literals go non-synchronising (LITERAL+) when offered."""
        tag = self.new_tag()
        self._send_command(tag, parts)
        return self.read_response(tag)

    def _send_command(self, tag: bytes, parts: Sequence[bytes | Literal]) -> None:
        plus = b"LITERAL+" in self.capabilities
        out = bytearray(tag)
        for part in parts:
            out += b" "
            if isinstance(part, Literal):
                prefix = b"~" if part.binary else b""
                if plus:
                    out += b"%s{%d+}\r\n" % (prefix, len(part.data)) + part.data
                else:
                    out += b"%s{%d}\r\n" % (prefix, len(part.data))
                    self.send(bytes(out))
                    out.clear()
                    cont = self._line()
                    if not cont.startswith(b"+"):
                        raise ImapError(f"no continuation for a literal: {cont!r}")
                    out += part.data
            else:
                out += part
        out += b"\r\n"
        self.send(bytes(out))

    def read_response(self, tag: bytes) -> Response:
        untagged: list[bytes] = []
        size = 0
        current = bytearray()
        while True:
            line = self._line()
            size += len(line) + 2
            m = _LITERAL_AT_END.search(line)
            if m:
                n = int(m.group(1))
                current += line + b"\r\n" + self._exact(n)
                size += n
                continue
            current += line
            whole = bytes(current)
            current = bytearray()
            if whole.startswith(tag + b" "):
                status, _, text = whole[len(tag) + 1 :].partition(b" ")
                return Response(untagged, status, text, size)
            if whole.startswith(b"+"):
                continue  # an unexpected continuation request (e.g. IDLE): caller's business
            untagged.append(whole)

    def timed(self, *parts: bytes) -> tuple[bytes, int]:
        """Send a command and read to its tagged answer without parsing the untagged ones:
        the client's cost is one search per received chunk. Returns (status, bytes read)."""
        tag = self.new_tag()
        self._send_command(tag, parts)
        marker = b"\r\n" + tag + b" "
        size = 0
        while True:
            start = 0 if self.buf.startswith(tag + b" ") else None
            if start is None:
                at = self.buf.find(marker)
                start = at + 2 if at >= 0 else None
            if start is not None:
                end = self.buf.find(b"\r\n", start)
                if end >= 0:
                    status = bytes(self.buf[start + len(tag) + 1 : end]).split(b" ", 1)[0]
                    size += end + 2
                    del self.buf[: end + 2]
                    return status, size
            elif len(self.buf) > 1 << 16:
                # Only a tail that may hold the start of the marker is worth keeping.
                cut = len(self.buf) - len(marker)
                size += cut
                del self.buf[:cut]
            self._fill()

    # ---- conveniences -----------------------------------------------------------------

    def ok(self, *parts: bytes | Literal) -> Response:
        r = self.command(*parts)
        if r.status != b"OK":
            raise ImapError(
                f"{b' '.join(p for p in parts if isinstance(p, bytes))!r}: {r.status!r} {r.text!r}"
            )
        return r

    def capability(self) -> set[bytes]:
        r = self.ok(b"CAPABILITY")
        for line in r.untagged:
            if line.upper().startswith(b"* CAPABILITY "):
                self.capabilities = set(line[13:].upper().split())
        return self.capabilities

    def login(self, user: str, password: str) -> None:
        self.ok(b"LOGIN", quote(user.encode()), quote(password.encode()))
        self.capability()

    def logout(self) -> None:
        with contextlib.suppress(OSError, ImapError):
            self.command(b"LOGOUT")
        self.close()


def quote(data: bytes) -> bytes:
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


# ---- parsing answers ----------------------------------------------------------------------


class Atom(bytes):
    """An atom (or number) as opposed to a string: the two compare differently."""

    def __repr__(self) -> str:
        return f"Atom({bytes(self)!r})"


Value = Atom | bytes | None | list["Value"]


class _Parser:
    def __init__(self, data: bytes) -> None:
        self.d = data
        self.i = 0

    def ws(self) -> None:
        while self.i < len(self.d) and self.d[self.i] == 0x20:
            self.i += 1

    def value(self) -> Value:
        self.ws()
        c = self.d[self.i : self.i + 1]
        if c == b"(":
            self.i += 1
            items: list[Value] = []
            while True:
                self.ws()
                if self.d[self.i : self.i + 1] == b")":
                    self.i += 1
                    return items
                items.append(self.value())
        if c == b'"':
            self.i += 1
            out = bytearray()
            while self.d[self.i] != 0x22:
                if self.d[self.i] == 0x5C:
                    self.i += 1
                out.append(self.d[self.i])
                self.i += 1
            self.i += 1
            return bytes(out)
        if c in (b"{", b"~"):
            m = re.compile(rb"~?\{(\d+)\+?\}\r\n").match(self.d, self.i)
            if m is None:
                raise ImapError(f"bad literal at {self.i}: {self.d[self.i : self.i + 20]!r}")
            n = int(m.group(1))
            self.i = m.end() + n
            return self.d[m.end() : self.i]
        start = self.i
        depth = 0
        while self.i < len(self.d):
            ch = self.d[self.i]
            if ch == 0x5B:  # [ : a section spec may hold spaces and parentheses
                depth += 1
            elif ch == 0x5D:
                depth -= 1
            elif depth == 0 and ch in b" ()":
                break
            self.i += 1
        atom = self.d[start : self.i]
        if atom.upper() == b"NIL":
            return None
        return Atom(atom)


def parse_fetch(line: bytes) -> tuple[int, dict[bytes, Value]]:
    """`* N FETCH (NAME VALUE ...)` as (N, {NAME upper-cased: value})."""
    m = re.match(rb"\* (\d+) FETCH ", line)
    if m is None:
        raise ImapError(f"not a FETCH response: {line[:80]!r}")
    p = _Parser(line)
    p.i = m.end()
    items = p.value()
    if not isinstance(items, list) or len(items) % 2:
        raise ImapError(f"odd FETCH item list: {line[:200]!r}")
    out: dict[bytes, Value] = {}
    for k, v in zip(items[::2], items[1::2], strict=True):
        assert isinstance(k, bytes)
        out[bytes(k).upper()] = v
    return int(m.group(1)), out
