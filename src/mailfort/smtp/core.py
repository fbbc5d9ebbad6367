"""The SMTP server protocol, free of I/O: bytes in, events and reply bytes out.

`ServerCore` is one session's state machine in the style of ``h11``: the caller hands it
what the socket read (`receive`), takes events that need a decision from outside
(`next_event`: MAIL, RCPT, a complete message, credentials, STARTTLS, closing), answers
them (`reply`, `auth_result`, `tls_established`) and writes what `outgoing` returns.
Everything else (greeting, EHLO, sequence and syntax errors, DATA framing and
dot-unstuffing, BDAT framing, the SASL exchange) is answered here. Nothing here reads a
clock or a socket, so every byte sequence can be replayed in a unit test or a fuzzer.

RFC 5321 (SMTP), RFC 1870 (SIZE), RFC 2920 (PIPELINING), RFC 3030 (CHUNKING), RFC 3207
(STARTTLS), RFC 3463 and RFC 2034 (enhanced codes), RFC 4954 (AUTH), RFC 4616 (PLAIN),
RFC 6152 (8BITMIME), RFC 6531 (SMTPUTF8).

DATA ends only at CRLF "." CRLF, the start of the data counting as the start of a line
(RFC 5321 §4.1.1.4); a bare LF or CR never ends it, so a message is never split or joined
by the 2023 smuggling variants. Whether bare line ends are acceptable inside a message is
the caller's decision (it refuses them, `hygiene.has_bare_line_end`).
"""

from __future__ import annotations

import binascii
import enum
import re
from base64 import b64decode
from dataclasses import dataclass

from mailfort.smtp.codes import with_enhanced_code

DATA_SIZE_LIMIT = 50 * 1024 * 1024
# RFC 5321 §4.5.3.1.4 says 512 for a command line; AUTH's initial response may be 12288
# (RFC 4954 §4) and real clients send long MAIL parameters. Past this, 500 and the line is
# dropped up to its end.
LINE_LIMIT = 16 * 1024
MAX_ERRORS = 20  # protocol errors before the session is closed (Postfix: smtpd_hard_error_limit)


# ---- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MailFrom:
    """MAIL FROM, syntax and parameters checked; ``address`` is "" for the null path."""

    address: str
    options: tuple[str, ...]
    size: int | None
    smtputf8: bool


@dataclass(frozen=True, slots=True)
class RcptTo:
    address: str
    options: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Message:
    """A complete message (DATA after dot-unstuffing, or the BDAT chunks joined)."""

    content: bytes


@dataclass(frozen=True, slots=True)
class Credentials:
    """AUTH PLAIN or LOGIN completed its exchange; answer with `ServerCore.auth_result`."""

    mechanism: str
    authzid: bytes
    login: bytes
    password: bytes


@dataclass(frozen=True, slots=True)
class StartTLS:
    """The 220 to STARTTLS is queued; write it, run the handshake, `tls_established`."""


@dataclass(frozen=True, slots=True)
class Close:
    """Write what is queued, then close the connection (QUIT, 421, framing lost)."""


Event = MailFrom | RcptTo | Message | Credentials | StartTLS | Close


@dataclass(frozen=True)
class CoreConfig:
    hostname: str
    size_limit: int = DATA_SIZE_LIMIT
    tls_available: bool = False  # STARTTLS offered (a certificate is configured)
    require_tls: bool = (
        False  # RFC 3207 §4: nothing but EHLO/HELO/NOOP/RSET/QUIT/STARTTLS before it
    )
    auth_mechanisms: tuple[str, ...] = ()  # of "PLAIN", "LOGIN"
    auth_required: bool = False  # no MAIL, RCPT, DATA or BDAT before AUTH succeeded
    auth_requires_tls: bool = True  # RFC 4954 §4: no credentials in the clear
    chunking: bool = False  # RFC 3030 BDAT
    max_errors: int = MAX_ERRORS


class _Mode(enum.Enum):
    COMMAND = enum.auto()
    DATA = enum.auto()
    BDAT = enum.auto()
    SKIP_LINE = enum.auto()  # after an over-long command line: drop up to its LF
    AUTH = enum.auto()  # a SASL response line is due
    WAIT = enum.auto()  # an event awaits its answer
    TLS = enum.auto()  # the handshake is due: input waits for `tls_established`
    CLOSED = enum.auto()


_BDAT_ARGS = re.compile(r"([0-9]{1,18})(?:[ \t]+(LAST))?[ \t]*", re.IGNORECASE)
_BDAT_SIZE_ONLY = re.compile(r"([0-9]{1,18})(?:[ \t].*)?")
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?")
_BODY_TYPES = frozenset({"7BIT", "8BITMIME"})

# RFC 4954 §4: the server's challenges are base64; LOGIN's are the de-facto "Username:" and
# "Password:".
_LOGIN_USER = "334 VXNlcm5hbWU6"
_LOGIN_PASS = "334 UGFzc3dvcmQ6"  # noqa: S105  # the word "Password:", no secret

_HELP = {
    "AUTH": "AUTH <mechanism> [initial-response]",
    "BDAT": "BDAT <size> [LAST]",
    "DATA": "DATA",
    "EHLO": "EHLO hostname",
    "HELO": "HELO hostname",
    "HELP": "HELP [command]",
    "MAIL": "MAIL FROM:<address> [parameters]",
    "NOOP": "NOOP [string]",
    "QUIT": "QUIT",
    "RCPT": "RCPT TO:<address> [parameters]",
    "RSET": "RSET",
    "STARTTLS": "STARTTLS",
    "VRFY": "VRFY <address>",
}
# Commands allowed before STARTTLS when it is required (RFC 3207 §4).
_BEFORE_TLS = frozenset({"EHLO", "HELO", "NOOP", "RSET", "QUIT", "STARTTLS", "HELP"})
_NEED_AUTH = frozenset({"MAIL", "RCPT", "DATA", "BDAT", "VRFY"})


class _More:
    """Returned by a step that needs more input."""


_MORE = _More()
# What one step of `next_event` gives: an event for the caller, None to go on, _MORE to stop.
_Step = Event | _More | None


class ProtocolError(ValueError):
    """A reply of the core's own to a malformed or misplaced command."""


def parse_path(text: str) -> tuple[str, str] | None:
    """(address, rest) from what follows ``FROM:`` or ``TO:`` (RFC 5321 §4.1.2), or None.

    ``<>`` gives ""; a source route (``<@a,@b:user@d>``, §C) is dropped; a quoted local
    part keeps its quotes. A path without angle brackets is taken up to the first space,
    as Postfix does (``strict_rfc821_envelopes = no``). The address is not checked further
    here: the handlers check the mailbox syntax they accept.
    """
    text = text.lstrip(" ")
    if not text.startswith("<"):
        address, _, rest = text.partition(" ")
        if not address or "<" in address or ">" in address:
            return None
        return address, rest
    i, quoted, n = 1, False, len(text)
    while i < n:
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == ">":
            break
        elif c == "<":
            return None
        i += 1
    else:
        return None
    inner, rest = text[1:i], text[i + 1 :]
    if rest and not rest.startswith(" "):
        return None
    if inner.startswith("@"):  # RFC 5321 §4.1.2 A-d-l: accepted and ignored
        _, colon, inner = inner.partition(":")
        if not colon:
            return None
    return inner, rest


def _params(rest: str) -> list[tuple[str, str | None, str]]:
    """(KEYWORD, value, as sent) per ESMTP parameter; ProtocolError when malformed."""
    out = []
    for word in rest.split():
        m = _PARAM.fullmatch(word)
        if m is None:
            raise ProtocolError("501 5.5.4 Syntax error in parameters")
        out.append((m.group(1).upper(), m.group(2), word))
    return out


class ServerCore:
    """One SMTP session, server side. Not thread-safe; one per connection."""

    def __init__(self, config: CoreConfig, *, tls: bool = False) -> None:
        self.config = config
        self.tls = tls
        self.helo: str | None = None  # the HELO/EHLO name, once given
        self.extended = False  # EHLO (not HELO)
        self.authenticated = False
        self.in_transaction = False  # MAIL accepted
        self.recipients = 0  # RCPT accepted in this transaction
        self._buf = bytearray()
        self._pos = 0
        self._out: list[bytes] = []
        self._mode = _Mode.COMMAND
        self._pending: Event | None = None  # the event awaiting its answer
        self._errors = 0
        # DATA: where the body starts in _buf, where the terminator search resumes, what
        # was dropped for being over the limit
        self._data_start = 0
        self._scan = 0
        self._dropped = 0
        self._data_cap = 0
        # BDAT: octets of the chunk still to come, chunks so far, refusal once known
        self._bdat_left = 0
        self._bdat_last = False
        self._bdat_keep = False
        self._bdat_answer = False
        self._bdat_size = 0
        self._chunks: list[bytes] = []
        self._chunk_size = 0
        self._bdat_refusal: str | None = None
        self._bdat_active = False  # a BDAT transaction is under way (no DATA now)
        # AUTH: mechanism, step, what was gathered
        self._sasl: tuple[str, int, bytes] | None = None

    # ---- input and output ----------------------------------------------------------------

    def greeting(self) -> None:
        """Queue the 220 banner (RFC 5321 §4.2: no software or version named)."""
        self._send(f"220 {self.config.hostname} ESMTP")

    def refuse_connection(self, text: str) -> None:
        """Queue a 421 instead of the banner; the session is over."""
        self._send(text)
        self._mode = _Mode.CLOSED

    def receive(self, data: bytes) -> None:
        """Octets from the client. After `StartTLS`, only what came over TLS: the caller
        stops reading the plain socket there (what was already read behind STARTTLS is
        dropped here, RFC 3207 §4.2)."""
        if self._mode is not _Mode.CLOSED:
            self._buf += data

    def outgoing(self) -> bytes:
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    @property
    def buffered(self) -> int:
        """Octets received and not yet consumed."""
        return len(self._buf) - self._pos

    @property
    def closed(self) -> bool:
        return self._mode is _Mode.CLOSED

    @property
    def waiting(self) -> bool:
        """An event has been handed out and awaits its answer."""
        return self._mode is _Mode.WAIT or self._mode is _Mode.TLS

    def _send(self, text: str) -> None:
        self._out.append(text.encode("utf-8") + b"\r\n")

    def _error(self, text: str) -> None:
        self._send(text)
        self._errors += 1
        if self._errors >= self.config.max_errors and self._mode is not _Mode.CLOSED:
            self._send("421 4.7.0 Too many errors, closing connection")
            self._mode = _Mode.CLOSED

    def _compact(self) -> None:
        if self._pos:
            del self._buf[: self._pos]
            if self._mode is _Mode.DATA:
                self._data_start -= self._pos
                self._scan -= self._pos
            self._pos = 0

    # ---- events ------------------------------------------------------------------------

    def next_event(self) -> Event | None:
        """The next event that needs the caller, or None when more input is needed (or an
        event still awaits its answer). `Close` comes once; nothing after it."""
        while True:
            mode = self._mode
            if mode is _Mode.COMMAND:
                line = self._line()
                step = _MORE if line is None else self._command(line)
            elif mode is _Mode.DATA:
                step = self._data()
            elif mode is _Mode.BDAT:
                step = self._bdat()
            elif mode is _Mode.AUTH:
                line = self._line()
                step = _MORE if line is None else self._sasl_step(line)
            elif mode is _Mode.SKIP_LINE:
                step = self._skip_line()
            elif mode is _Mode.CLOSED:
                if isinstance(self._pending, Close):
                    return None
                self._pending = Close()
                return self._pending
            else:  # WAIT, TLS: an event awaits its answer
                return None
            if isinstance(step, _More):
                if self._mode is _Mode.CLOSED:
                    continue  # an error closed the session: Close comes next
                return None
            if step is not None:
                return self._wait(step)

    def _wait(self, event: Event) -> Event:
        self._pending = event
        if isinstance(event, Close):
            self._mode = _Mode.CLOSED
        elif isinstance(event, StartTLS):
            self._mode = _Mode.TLS
        else:
            self._mode = _Mode.WAIT
        return event

    def _line(self) -> str | bytes | None:
        """The next command line without its line end (str, or bytes when not UTF-8); None
        when no whole line is buffered."""
        buf = self._buf
        while True:
            pos = self._pos
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if len(buf) - pos > LINE_LIMIT:
                    self._pos = len(buf)
                    self._mode = _Mode.SKIP_LINE
                    self._error("500 5.5.2 Line too long")
                self._compact()
                return None
            self._pos = nl + 1
            if nl - pos > LINE_LIMIT:
                self._error("500 5.5.2 Line too long")
                if self._mode is _Mode.CLOSED:
                    return None
                continue
            end = nl - 1 if nl > pos and buf[nl - 1] == 0x0D else nl
            raw = bytes(buf[pos:end])
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                return raw

    def _skip_line(self) -> _Step:
        nl = self._buf.find(b"\n", self._pos)
        if nl < 0:
            self._pos = len(self._buf)
            self._compact()
            return _MORE
        self._pos = nl + 1
        self._mode = _Mode.COMMAND
        return None

    # ---- answers from the caller -------------------------------------------------------

    def reply(self, text: str) -> None:
        """Answer the pending MailFrom, RcptTo or Message with a handler's reply line."""
        event = self._pending
        if self._mode is not _Mode.WAIT or not isinstance(event, MailFrom | RcptTo | Message):
            raise RuntimeError("no MAIL, RCPT or message awaits an answer")
        self._pending = None
        self._mode = _Mode.COMMAND
        text = with_enhanced_code(text.rstrip("\r\n"))
        self._out.append(text.replace("\r\n", "\n").replace("\n", "\r\n").encode() + b"\r\n")
        ok = text[:1] == "2"
        if isinstance(event, MailFrom):
            self.in_transaction = ok
        elif isinstance(event, RcptTo):
            self.recipients += ok
        else:
            self._reset()
        if text.startswith("421"):
            self._mode = _Mode.CLOSED  # RFC 5321 §3.8: 421 closes the channel

    def auth_result(self, ok: bool, refusal: str | None = None) -> None:
        """Answer the pending `Credentials`; ``refusal`` replaces the usual 535 (a 454 when
        the secret was not even checked)."""
        if self._mode is not _Mode.WAIT or not isinstance(self._pending, Credentials):
            raise RuntimeError("no AUTH awaits an answer")
        self._pending = None
        self._mode = _Mode.COMMAND
        if ok:
            self.authenticated = True
            self._send("235 2.7.0 Authentication successful")
        else:
            self._error(refusal or "535 5.7.8 Authentication credentials invalid")

    def tls_established(self) -> None:
        """RFC 3207 §4.2: the session starts over; the client must say EHLO again."""
        if self._mode is not _Mode.TLS:
            raise RuntimeError("no STARTTLS is under way")
        self._pending = None
        self.tls = True
        self.helo = None
        self.extended = False
        self._reset()
        self._mode = _Mode.COMMAND

    def timed_out(self, what: str = "Idle timeout") -> None:
        """One of the caller's timers fired."""
        if self._mode is not _Mode.CLOSED:
            self._send(f"421 4.4.2 {what}, closing connection")
            self._mode = _Mode.CLOSED

    @property
    def receiving_message(self) -> bool:
        """Message octets are due (DATA or a BDAT chunk), not a command."""
        return self._mode is _Mode.DATA or self._mode is _Mode.BDAT

    def _reset(self) -> None:
        self.in_transaction = False
        self.recipients = 0
        self._chunks = []
        self._chunk_size = 0
        self._bdat_refusal = None
        self._bdat_active = False

    # ---- commands ----------------------------------------------------------------------

    def _command(self, line: str | bytes) -> _Step:
        if isinstance(line, bytes):
            self._error("500 5.5.2 Error: bad syntax (not UTF-8)")
            return None
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        arg = arg.strip()
        if not verb:
            self._error("500 5.5.2 Error: bad syntax")
            return None
        method = _COMMANDS.get(verb)
        if method is None or (verb == "BDAT" and not self.config.chunking):
            shown = verb if verb.isprintable() and len(verb) <= 32 else "?"
            self._error(f'500 5.5.2 Error: command "{shown}" not recognized')
            return None
        if self.config.require_tls and not self.tls and verb not in _BEFORE_TLS:
            if verb == "BDAT":
                return self._bdat_refused(arg, "530 5.7.0 Must issue a STARTTLS command first")
            self._error("530 5.7.0 Must issue a STARTTLS command first")
            return None
        if self.config.auth_required and not self.authenticated and verb in _NEED_AUTH:
            if verb == "BDAT":
                return self._bdat_refused(arg, "530 5.7.0 Authentication required")
            self._error("530 5.7.0 Authentication required")
            return None
        try:
            return method(self, arg)
        except ProtocolError as e:
            self._error(str(e))
            return None

    def _ehlo(self, arg: str) -> None:
        if not arg:
            raise ProtocolError("501 5.5.4 Syntax: EHLO hostname")
        self.helo, self.extended = arg, True
        self._reset()
        cfg = self.config
        lines = [
            cfg.hostname,
            "PIPELINING",
            f"SIZE {cfg.size_limit}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
        ]
        if cfg.chunking:
            lines.append("CHUNKING")
        if cfg.tls_available and not self.tls:
            lines.append("STARTTLS")
        if self._auth_offered():
            lines.append("AUTH " + " ".join(cfg.auth_mechanisms))
        lines.append("HELP")
        # EHLO keywords stay bare (RFC 2034 §3): no enhanced codes in this reply.
        last = len(lines) - 1
        self._out.append(
            "".join(f"250{' ' if i == last else '-'}{t}\r\n" for i, t in enumerate(lines)).encode()
        )

    def _helo(self, arg: str) -> None:
        if not arg:
            raise ProtocolError("501 5.5.4 Syntax: HELO hostname")
        self.helo, self.extended = arg, False
        self._reset()
        self._send(f"250 {self.config.hostname}")

    def _auth_offered(self) -> bool:
        cfg = self.config
        return bool(cfg.auth_mechanisms) and (self.tls or not cfg.auth_requires_tls)

    def _mail(self, arg: str) -> _Step:
        if self.helo is None:
            raise ProtocolError("503 5.5.1 Error: send HELO first")
        if self.in_transaction:
            raise ProtocolError("503 5.5.1 Error: nested MAIL command")
        if arg[:5].upper() != "FROM:":
            raise ProtocolError("501 5.5.4 Syntax: MAIL FROM:<address>")
        path = parse_path(arg[5:])
        if path is None:
            raise ProtocolError("501 5.5.4 Syntax: MAIL FROM:<address>")
        address, rest = path
        params = _params(rest)
        if params and not self.extended:
            raise ProtocolError("555 5.5.4 MAIL FROM parameters need EHLO")
        size = None
        smtputf8 = False
        for key, value, _ in params:
            if key == "SIZE":
                if value is None or not value.isdigit():
                    raise ProtocolError("501 5.5.4 Syntax: SIZE=<number>")
                # More digits than any limit has: over it (and no int() of 5000 digits).
                size = int(value) if len(value) <= 18 else self.config.size_limit + 1
                if size > self.config.size_limit:  # RFC 1870 §6.1
                    raise ProtocolError("552 5.3.4 Message size exceeds fixed maximum message size")
            elif key == "BODY":
                if value is None or value.upper() not in _BODY_TYPES:
                    raise ProtocolError("501 5.5.4 Syntax: BODY=7BIT or BODY=8BITMIME")
            elif key == "SMTPUTF8" and value is None:
                smtputf8 = True
            else:
                raise ProtocolError(
                    "555 5.5.4 MAIL FROM parameters not recognized or not implemented"
                )
        return MailFrom(address, tuple(word for _, _, word in params), size, smtputf8)

    def _rcpt(self, arg: str) -> _Step:
        if self.helo is None:
            raise ProtocolError("503 5.5.1 Error: send HELO first")
        if not self.in_transaction:
            raise ProtocolError("503 5.5.1 Error: need MAIL command")
        if self._bdat_active:
            raise ProtocolError("503 5.5.1 Error: RCPT after BDAT; send RSET")
        if arg[:3].upper() != "TO:":
            raise ProtocolError("501 5.5.4 Syntax: RCPT TO:<address>")
        path = parse_path(arg[3:])
        if path is None or not path[0]:
            raise ProtocolError("501 5.5.4 Syntax: RCPT TO:<address>")
        address, rest = path
        params = _params(rest)
        if params and not self.extended:
            raise ProtocolError("555 5.5.4 RCPT TO parameters need EHLO")
        return RcptTo(address, tuple(word for _, _, word in params))

    def _data_cmd(self, arg: str) -> None:
        if arg:
            raise ProtocolError("501 5.5.4 Syntax: DATA")
        if self.helo is None:
            raise ProtocolError("503 5.5.1 Error: send HELO first")
        if not self.in_transaction:
            raise ProtocolError("503 5.5.1 Error: need MAIL command")
        if self._bdat_active:
            raise ProtocolError("503 5.5.1 Error: DATA after BDAT; send RSET")  # RFC 3030 §2
        if not self.recipients:
            raise ProtocolError("503 5.5.1 Error: need RCPT command")
        self._send("354 End data with <CR><LF>.<CR><LF>")
        self._mode = _Mode.DATA
        self._data_start = self._scan = self._pos
        self._dropped = 0
        limit = self.config.size_limit
        self._data_cap = limit + (limit >> 6) + 8

    def _rset(self, arg: str) -> None:
        if arg:
            raise ProtocolError("501 5.5.4 Syntax: RSET")
        self._reset()
        self._send("250 2.0.0 OK")

    def _noop(self, arg: str) -> None:
        self._send("250 2.0.0 OK")  # RFC 5321 §4.1.1.9: a parameter is allowed and ignored

    def _quit(self, arg: str) -> _Step:
        if arg:
            raise ProtocolError("501 5.5.4 Syntax: QUIT")
        self._send("221 2.0.0 Bye")
        return Close()

    def _vrfy(self, arg: str) -> None:
        if not arg:
            raise ProtocolError("501 5.5.4 Syntax: VRFY <address>")
        # RFC 5321 §3.5.3: 252 neither confirms nor denies (no address harvesting).
        self._send("252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery")

    def _expn(self, arg: str) -> None:
        raise ProtocolError("502 5.5.1 EXPN not implemented")

    def _help(self, arg: str) -> None:
        if arg:
            syntax = _HELP.get(arg.upper())
            if syntax is None or not self._offers(arg.upper()):
                raise ProtocolError("501 5.5.4 Supported commands: " + self._commands())
            self._send(f"250 2.0.0 Syntax: {syntax}")
        else:
            self._send("250 2.0.0 Supported commands: " + self._commands())

    def _offers(self, verb: str) -> bool:
        if verb == "BDAT":
            return self.config.chunking
        if verb == "STARTTLS":
            return self.config.tls_available
        if verb == "AUTH":
            return bool(self.config.auth_mechanisms)
        return True

    def _commands(self) -> str:
        return " ".join(v for v in sorted(_HELP) if self._offers(v))

    def _starttls(self, arg: str) -> _Step:
        if arg:
            raise ProtocolError("501 5.5.4 Syntax: STARTTLS")
        if not self.config.tls_available:
            raise ProtocolError("454 4.7.0 TLS not available")
        if self.tls:
            raise ProtocolError("503 5.5.1 Error: TLS already active")
        self._send("220 2.0.0 Ready to start TLS")
        # RFC 3207 §4.2 / CVE-2011-0411: what the client pipelined after STARTTLS is
        # plaintext and must not be read as if it came over TLS.
        self._buf.clear()
        self._pos = 0
        return StartTLS()

    # ---- AUTH (RFC 4954) ---------------------------------------------------------------

    def _auth(self, arg: str) -> _Step:
        cfg = self.config
        if not cfg.auth_mechanisms:
            raise ProtocolError("502 5.5.1 AUTH not available")
        if not self.extended:
            raise ProtocolError("503 5.5.1 Error: send EHLO first")
        if self.authenticated:
            raise ProtocolError("503 5.5.1 Already authenticated")
        if self.in_transaction:
            raise ProtocolError("503 5.5.1 AUTH not permitted during a mail transaction")
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in cfg.auth_mechanisms:
            raise ProtocolError("504 5.5.4 Unrecognized authentication type")
        if cfg.auth_requires_tls and not self.tls:
            raise ProtocolError(
                "538 5.7.11 Encryption required for requested authentication mechanism"
            )
        initial = initial.strip()
        if not initial:
            self._sasl = (mechanism, 0, b"")
            self._send("334 " if mechanism == "PLAIN" else _LOGIN_USER)
            self._mode = _Mode.AUTH
            return None
        # RFC 4954 §4: "=" is an empty initial response.
        return self._sasl_data(mechanism, 0, b"", "" if initial == "=" else initial)

    def _sasl_step(self, line: str | bytes) -> _Step:
        assert self._sasl is not None
        mechanism, step, gathered = self._sasl
        self._mode = _Mode.COMMAND
        if isinstance(line, bytes) or line.strip() == "*":
            self._sasl = None
            self._error("501 5.7.0 Authentication cancelled")
            return None
        return self._sasl_data(mechanism, step, gathered, line.strip())

    def _sasl_data(self, mechanism: str, step: int, gathered: bytes, text: str) -> _Step:
        self._sasl = None
        try:
            blob = b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            self._error("501 5.5.2 Can't decode base64")
            return None
        if mechanism == "PLAIN":
            parts = blob.split(b"\x00")  # RFC 4616 §2: authzid NUL authcid NUL passwd
            if len(parts) != 3:
                self._error("501 5.5.2 Can't split auth value")
                return None
            return Credentials("PLAIN", parts[0], parts[1], parts[2])
        if step == 0:
            self._sasl = (mechanism, 1, blob)
            self._send(_LOGIN_PASS)
            self._mode = _Mode.AUTH
            return None
        return Credentials("LOGIN", b"", gathered, blob)

    # ---- DATA (RFC 5321 §4.1.1.4, §4.5.2) ----------------------------------------------

    def _data(self) -> _Step:
        buf = self._buf
        start = self._data_start
        if not self._dropped and buf.startswith(b".\r\n", start):
            body_end, self._pos = start, start + 3  # an empty message
        else:
            i = buf.find(b"\r\n.\r\n", max(self._scan, start))
            if i < 0:
                # A terminator split over two reads begins in the last four octets.
                self._scan = max(len(buf) - 4, start)
                # Slack for the dots of transparency and a terminator split over reads:
                # the limit applies to the message itself, checked once it is whole.
                if len(buf) - start > self._data_cap:
                    # Over the limit (RFC 1870 §6.3): read on to the end of the data,
                    # keeping nothing but where the terminator may begin.
                    keep = len(buf) - 4
                    self._dropped += keep - start
                    del buf[start:keep]
                    self._scan = start
                return _MORE
            body_end, self._pos = i + 2, i + 5
        self._mode = _Mode.COMMAND
        content = b"" if self._dropped else bytes(buf[start:body_end])
        # Transparency (§4.5.2): every line that starts with "." lost its first dot.
        if content[:1] == b".":
            content = content[1:]
        if b"\r\n." in content:
            content = content.replace(b"\r\n.", b"\r\n")
        if self._dropped or len(content) > self.config.size_limit:
            self._reset()
            self._error("552 5.3.4 Message size exceeds fixed maximum message size")
            return None
        return Message(content)

    # ---- BDAT (RFC 3030) ---------------------------------------------------------------

    def _bdat_cmd(self, arg: str) -> _Step:
        m = _BDAT_ARGS.fullmatch(arg)
        if m is None:
            sized = _BDAT_SIZE_ONLY.fullmatch(arg)
            if sized is None:
                # No size, so no telling where the octets end: the framing is lost.
                self._send("501 5.5.4 Syntax: BDAT <size> [LAST]; closing")
                self._mode = _Mode.CLOSED
                return None
            return self._bdat_refused(arg, "501 5.5.4 Syntax: BDAT <size> [LAST]")
        refusal = None
        if self.helo is None:
            refusal = "503 5.5.1 Error: send HELO first"
        elif not self.in_transaction:
            refusal = "503 5.5.1 Error: need MAIL command"
        elif not self.recipients:
            refusal = "503 5.5.1 Error: need RCPT command"
        if refusal is not None:
            return self._bdat_refused(arg, refusal)
        size = int(m.group(1))
        self._bdat_active = True
        if self._bdat_refusal is None and self._chunk_size + size > self.config.size_limit:
            # RFC 1870 §6: refuse, and drop what came so far rather than hold it.
            self._bdat_refusal = "552 5.3.4 Message size exceeds fixed maximum message size"
            self._chunks = []
        self._chunk_size += size
        self._bdat_left = self._bdat_size = size
        self._bdat_last = m.group(2) is not None
        self._bdat_keep = self._bdat_refusal is None
        self._bdat_answer = True
        self._mode = _Mode.BDAT
        return None

    def _bdat_refused(self, arg: str, refusal: str) -> _Step:
        """RFC 3030 §2: the octets follow the command whatever the reply: skip them. The
        reply goes out at once (the client may wait for it before sending them)."""
        m = re.match(r"[0-9]{1,18}", arg)
        if m is None:
            self._send(refusal + "; closing")
            self._mode = _Mode.CLOSED
            return None
        self._error(refusal)
        if self._mode is not _Mode.CLOSED:
            self._bdat_left = int(m.group(0))
            self._bdat_keep = self._bdat_answer = False
            self._mode = _Mode.BDAT
        return None

    def _bdat(self) -> _Step:
        take = min(len(self._buf) - self._pos, self._bdat_left)
        if take:
            if self._bdat_keep:
                self._chunks.append(bytes(self._buf[self._pos : self._pos + take]))
            self._pos += take
            self._bdat_left -= take
        if self._bdat_left:
            self._compact()
            return _MORE
        self._mode = _Mode.COMMAND
        if not self._bdat_answer:  # a refused BDAT: its reply went out already
            return None
        if not self._bdat_last:
            self._send(self._bdat_refusal or f"250 2.0.0 {self._bdat_size} octets received")
            return None
        if self._bdat_refusal is not None:
            refusal = self._bdat_refusal
            self._reset()
            self._error(refusal)
            return None
        content = b"".join(self._chunks)
        self._chunks = []
        return Message(content)


_COMMANDS = {
    "EHLO": ServerCore._ehlo,
    "HELO": ServerCore._helo,
    "MAIL": ServerCore._mail,
    "RCPT": ServerCore._rcpt,
    "DATA": ServerCore._data_cmd,
    "BDAT": ServerCore._bdat_cmd,
    "RSET": ServerCore._rset,
    "NOOP": ServerCore._noop,
    "QUIT": ServerCore._quit,
    "VRFY": ServerCore._vrfy,
    "EXPN": ServerCore._expn,
    "HELP": ServerCore._help,
    "STARTTLS": ServerCore._starttls,
    "AUTH": ServerCore._auth,
}
