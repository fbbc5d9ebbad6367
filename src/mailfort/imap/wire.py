"""IMAP connection-level framer, free of I/O (sans-IO, in the style of h11).

The framer turns the client's byte stream into complete commands.  An IMAP command is
one or more CRLF-terminated lines joined by literals: a line ending in ``{N}`` (or
``{N+}``, ``~{N}``) announces ``N`` octets of literal data that follow the CRLF, after
which the command line continues (RFC 9051 §4.3).  The framer only frames; it does not
parse.  It returns a :class:`RawCommand` holding the line segments and the literal
bodies, which :mod:`mailfort.imap.parser` turns into typed commands.

The server pulls events one at a time with :meth:`Framer.next_event` so that it can
switch the framer's mode (IDLE, AUTHENTICATE) between two events: a client may pipeline
``DONE`` right behind ``IDLE`` in the same TCP segment, and the line must then be read as
the end of IDLE, not as a command.

Every limit is checked *before* the data it governs is buffered: a literal's size is
judged from its ``{N}`` announcement, a line's length as soon as the buffer holds more
than the limit without a line end.  A connection therefore never holds more than one
line limit plus one literal limit plus one read of unconsumed input.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

__all__ = [
    "AuthLine",
    "ContinuationRequest",
    "FrameError",
    "Framer",
    "FramerMode",
    "IdleDone",
    "Limits",
    "RawCommand",
    "WireEvent",
    "extract_tag",
]


class FramerMode(enum.Enum):
    """What the next client line means; the server switches it."""

    COMMAND = "command"
    #: RFC 2177 / RFC 9051 §6.3.13: the only valid client line is ``DONE``.
    IDLE = "idle"
    #: RFC 9051 §6.2.2: each line is a base64 SASL response, or ``*`` to cancel.
    AUTHENTICATE = "authenticate"


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits of one connection.

    ``max_line`` bounds one line segment (RFC 7162 §4 asks servers to accept at
    least 8192 octets, because CONDSTORE/QRESYNC clients send long sequence sets).
    ``max_nonsync_literal`` is 4096 for LITERAL- (RFC 7888 §5, RFC 9051 §4.3); a
    server advertising LITERAL+ raises it to ``max_literal``.
    """

    max_line: int = 64 * 1024
    max_literal: int = 64 * 1024 * 1024
    max_nonsync_literal: int = 4096
    max_command: int = 256 * 1024 * 1024
    max_literals: int = 1000


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class RawCommand:
    """One complete command as framed from the wire.

    ``lines`` has one more element than ``literals``: every line but the last ends in
    the literal announcement (``{N}``, ``{N+}`` or ``~{N}``) whose data is the literal
    at the same index.  Line segments carry no CRLF.
    """

    tag: bytes
    lines: tuple[bytes, ...]
    literals: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ContinuationRequest:
    """A synchronising literal was announced: the server must send ``+`` now.

    RFC 9051 §4.3 / §7.5: the client waits for a command continuation request before
    sending the literal's octets.
    """

    tag: bytes
    size: int

    def response(self) -> bytes:
        return b"+ Ready for literal data\r\n"


@dataclass(frozen=True, slots=True)
class FrameError:
    """The input cannot be framed; send :meth:`response`, then close if ``close``."""

    tag: bytes
    status: str  # "BAD" or "NO"
    code: str | None
    text: str
    close: bool

    def response(self) -> bytes:
        code = f"[{self.code}] " if self.code else ""
        line = f"{self.status} {code}{self.text}".encode("ascii", "replace")
        out = self.tag + b" " + line + b"\r\n"
        if self.close:
            # RFC 9051 §7.1.5: BYE announces that the server is closing the connection.
            out += b"* BYE Closing connection\r\n"
        return out


@dataclass(frozen=True, slots=True)
class IdleDone:
    """The client ended IDLE (RFC 9051 §6.3.13); ``ok`` is false if it sent anything else."""

    ok: bool


@dataclass(frozen=True, slots=True)
class AuthLine:
    """One client line of a SASL exchange (RFC 9051 §6.2.2), CRLF stripped."""

    data: bytes

    @property
    def cancelled(self) -> bool:
        # RFC 9051 §6.2.2: a single "*" cancels the exchange.
        return self.data == b"*"


WireEvent = RawCommand | ContinuationRequest | FrameError | IdleDone | AuthLine


# --------------------------------------------------------------------------- helpers

# The literal announcement at the very end of a line segment.  The digits are bounded
# so that int() never sees an absurd string; anything longer is "too big" anyway.
_LITERAL_RE = re.compile(rb"(~?)\{([0-9]{1,20})(\+?)\}\Z")

# RFC 9051 §9: tag = 1*<any ASTRING-CHAR except "+">.  ASTRING-CHAR is ATOM-CHAR or "]".
_TAG_RE = re.compile(rb"[\x21\x23\x24\x26\x27\x2c-\x5b\x5d-\x7a\x7c-\x7e]+")


def extract_tag(line: bytes) -> bytes:
    """The tag a reply to ``line`` should carry, or ``*`` if it has no valid tag."""
    head = line.split(b" ", 1)[0]
    m = _TAG_RE.fullmatch(head)
    if m is None:
        return b"*"
    return head


def _ends_outside_quotes(line: bytes) -> bool:
    """True if the end of ``line`` is not inside a quoted string.

    A line ending in ``"...{5}`` is an unterminated quoted string, not a literal
    announcement.  Each segment starts outside a string (a literal cannot sit inside one).
    """
    in_quote = False
    escaped = False
    for byte in line:
        if in_quote:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_quote = False
        elif byte == 0x22:
            in_quote = True
    return not in_quote


# --------------------------------------------------------------------------- framer


class Framer:
    """Incremental framer of the IMAP client stream.

    Feed bytes with :meth:`receive_data`, pull events with :meth:`next_event` until it
    returns ``None`` (more data needed).  After a :class:`FrameError` with ``close``
    set, the framer is dead and returns ``None`` forever.
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._buf = bytearray()
        self._mode = FramerMode.COMMAND
        self._closed = False
        self._reset_command()

    def _reset_command(self) -> None:
        self._lines: list[bytes] = []
        self._literals: list[bytes] = []
        self._need: int | None = None  # octets still missing from the current literal
        self._lit = bytearray()
        self._size = 0
        self._tag = b"*"

    # -- mode and buffer control, driven by the server ------------------------------

    @property
    def mode(self) -> FramerMode:
        return self._mode

    def set_mode(self, mode: FramerMode) -> None:
        self._mode = mode

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def in_command(self) -> bool:
        """True while part of a command has been read (used to spot idle timeouts)."""
        return bool(self._lines) or self._need is not None or bool(self._buf)

    def take_buffer(self) -> bytes:
        """Remove and return unconsumed input.

        After ``COMPRESS`` (RFC 4978 §3) the bytes that follow are compressed: the server
        hands them to its decompressor.
        """
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def discard_buffer(self) -> None:
        """Drop unconsumed input and any partial command.

        RFC 9051 §6.2.1 and RFC 2595 §3.1: after STARTTLS, anything the client sent in
        the clear behind the command must be discarded, or an attacker could inject
        commands that are later run with TLS credentials (CVE-2011-0411 class).
        """
        self._buf.clear()
        self._reset_command()

    # -- input ----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self._closed:
            return
        if self._need is None and b"\n" not in data and b"\n" not in self._buf:
            # A line without its end: keep no more than it takes to see that it is too
            # long, so a server feeding several reads before pulling events stays bounded.
            room = self.limits.max_line + 2 - len(self._buf)
            if room <= 0:
                return
            data = data[:room]
        self._buf += data

    def next_event(self) -> WireEvent | None:
        if self._closed:
            return None
        while True:
            if self._need is not None:
                if not self._read_literal():
                    return None
                continue
            line = self._read_line()
            if line is None:
                if len(self._buf) > self.limits.max_line:
                    return self._fail(
                        self._tag if self._lines else extract_tag(bytes(self._buf[:64])),
                        "BAD",
                        "TOOBIG",
                        "Command line too long",
                        close=True,
                    )
                return None
            if isinstance(line, FrameError):
                return line
            event = self._dispatch(line)
            if event is not None:
                return event

    def _read_literal(self) -> bool:
        """Move literal octets from the buffer; True once the literal is complete."""
        assert self._need is not None
        take = min(self._need, len(self._buf))
        if take:
            self._lit += self._buf[:take]
            del self._buf[:take]
            self._need -= take
        if self._need:
            return False
        self._literals.append(bytes(self._lit))
        self._lit.clear()
        self._need = None
        return True

    def _read_line(self) -> bytes | FrameError | None:
        idx = self._buf.find(b"\n")
        if idx < 0:
            return None
        # The limit applies to the line with its CRLF stripped.
        if idx > self.limits.max_line + 1:
            tag = self._tag if self._lines else extract_tag(bytes(self._buf[:64]))
            return self._fail(tag, "BAD", "TOOBIG", "Command line too long", close=True)
        line = bytes(self._buf[:idx])
        del self._buf[: idx + 1]
        # RFC 9051 §2.2: lines end in CRLF; a bare LF is tolerated (some scripts send it).
        if line.endswith(b"\r"):
            line = line[:-1]
        return line

    def _dispatch(self, line: bytes) -> WireEvent | None:
        if self._mode is FramerMode.IDLE:
            # RFC 9051 §6.3.13: "DONE" ends IDLE; anything else is a protocol error that
            # also ends it.  Either way the next line is a command again.
            self._mode = FramerMode.COMMAND
            return IdleDone(ok=line.strip().upper() == b"DONE")
        if self._mode is FramerMode.AUTHENTICATE:
            # The server switches back to COMMAND mode when the exchange completes.
            return AuthLine(line)
        return self._command_line(line)

    def _command_line(self, line: bytes) -> WireEvent | None:
        if not self._lines:
            if not line.strip():
                # A stray empty line between commands (some clients add CRLF after the
                # final literal) carries no command; skip it rather than answer BAD.
                return None
            self._tag = extract_tag(line)
        self._size += len(line) + 2
        if self._size > self.limits.max_command:
            return self._fail(self._tag, "BAD", "TOOBIG", "Command too large", close=True)
        m = _LITERAL_RE.search(line) if line.endswith(b"}") else None
        if m is None or not _ends_outside_quotes(line[: m.start()]):
            self._lines.append(line)
            event = RawCommand(self._tag, tuple(self._lines), tuple(self._literals))
            self._reset_command()
            return event
        return self._literal_announced(line, m)

    def _literal_announced(self, line: bytes, m: re.Match[bytes]) -> WireEvent | None:
        size = int(m.group(2))
        nonsync = m.group(3) == b"+"
        tag = self._tag
        too_many = len(self._literals) + 1 > self.limits.max_literals
        too_big = size > self.limits.max_literal or self._size + size > self.limits.max_command
        if nonsync and size > self.limits.max_nonsync_literal:
            too_big = True
        if too_many or too_big:
            text = "Too many literals" if too_many else "Literal too large"
            if nonsync:
                # RFC 7888 §4/§5: a non-synchronising literal over the limit is refused
                # with BAD [TOOBIG].  The client sends its octets anyway; close rather
                # than risk reading message data as commands.
                return self._fail(tag, "BAD", "TOOBIG", text, close=True)
            # RFC 9051 §4.3 / §7.1: a synchronising literal can be refused before the
            # client sends it: a tagged NO instead of "+", and the command is over.
            self._reset_command()
            return FrameError(tag, "NO", "TOOBIG", text, close=False)
        self._lines.append(line)
        self._size += size
        self._need = size
        if nonsync:
            return None  # RFC 7888 §3: data follows without waiting; keep reading
        return ContinuationRequest(tag, size)

    def _fail(
        self, tag: bytes, status: str, code: str | None, text: str, *, close: bool
    ) -> FrameError:
        if close:
            self._closed = True
            self._buf.clear()
        self._reset_command()
        return FrameError(tag, status, code, text, close)
