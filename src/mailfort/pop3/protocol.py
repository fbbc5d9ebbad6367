"""POP3 server protocol core, free of I/O (RFC 1939, RFC 2449, RFC 2595, RFC 5034).

The server feeds bytes with :meth:`Pop3Connection.receive_data` and pulls events with
:meth:`Pop3Connection.next_event`:

- :class:`Send`: bytes the core produced itself (most replies); write them.
- :class:`AuthRequest`: check the credentials, then call :meth:`~Pop3Connection.auth_result`
  with the maildrop listing (sizes and unique ids) on success.
- :class:`StartTLS`: write ``data``, run the TLS handshake, call ``tls_started()``.
- :class:`Retrieve`: RETR or TOP; load the message and call :meth:`~Pop3Connection.message`.
- :class:`Quit`: QUIT in the TRANSACTION state: delete ``deletions`` (UPDATE state,
  RFC 1939 §6), then call :meth:`~Pop3Connection.update_done` and close.

While an event waits for its answer the core reads no further command, so pipelined
commands (RFC 2449 PIPELINING) are answered strictly in order.  STAT, LIST, UIDL, DELE,
RSET and NOOP need no store access and are answered by the core from the listing it got
at login; deletions are only marks until QUIT.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "AuthRequest",
    "MaildropEntry",
    "Pop3Connection",
    "Pop3Policy",
    "Pop3State",
    "Quit",
    "Retrieve",
    "Send",
    "StartTLS",
    "dot_stuff",
]


class Pop3State(enum.Enum):
    """RFC 1939 §3 session states (plus CLOSED once the connection must end)."""

    AUTHORIZATION = "authorization"
    TRANSACTION = "transaction"
    UPDATE = "update"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class MaildropEntry:
    """One message of the maildrop as fixed at login (RFC 1939 §5: numbers are stable).

    ``size`` is the exact octet count the server will send (CRLF line ends, before
    dot-stuffing, RFC 1939 §5 LIST).  ``uid`` is the UIDL id: 1 to 70 characters in
    0x21-0x7E (RFC 1939 §7).
    """

    size: int
    uid: str

    def __post_init__(self) -> None:
        if not _UID_RE.fullmatch(self.uid):
            raise ValueError("UIDL ids are 1-70 characters in 0x21-0x7E (RFC 1939 §7)")


@dataclass(frozen=True, slots=True)
class Pop3Policy:
    tls_available: bool = True
    allow_plaintext_auth: bool = False  # tests on loopback only
    max_line: int = 1024  # RFC 2449 §4 asks for 255; be lenient, stay bounded
    max_sasl_line: int = 8192  # SASL responses may be longer (RFC 5034 §4)
    max_auth_failures: int = 3
    implementation: str | None = None  # RFC 2449 §6.9, off by default (fingerprinting)


# -------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes
    close: bool = False


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """Credentials to check: from USER/PASS (``mechanism="USER"``) or AUTH PLAIN."""

    user: str
    secret: str = field(repr=False)
    mechanism: str


@dataclass(frozen=True, slots=True)
class StartTLS:
    """RFC 2595 §4: write ``data`` (the +OK), then start TLS."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Retrieve:
    """RETR (``top_lines`` None) or TOP (RFC 1939 §7) of message ``number``."""

    number: int
    uid: str
    top_lines: int | None = None


@dataclass(frozen=True, slots=True)
class Quit:
    """QUIT from TRANSACTION: remove these messages (by UIDL id), then ``update_done``."""

    deletions: tuple[str, ...]


Event = Send | AuthRequest | StartTLS | Retrieve | Quit

_UID_RE = re.compile(r"[\x21-\x7e]{1,70}")
_NUMBER_RE = re.compile(rb"[0-9]{1,10}")


def dot_stuff(message: bytes) -> bytes:
    """A multi-line response body (RFC 1939 §3): CRLF line ends, a leading "." doubled,
    terminated by ``.CRLF``."""
    lines = message.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = bytearray()
    for line in lines:
        if line.endswith(b"\r"):
            line = line[:-1]
        if line.startswith(b"."):
            out += b"."
        out += line + b"\r\n"
    out += b".\r\n"
    return bytes(out)


def _top(message: bytes, lines: int) -> bytes:
    """RFC 1939 §7 TOP: the header, the blank line, then ``lines`` lines of the body."""
    m = re.search(rb"\r?\n\r?\n", message)
    if m is None:
        return message
    head = message[: m.end()]
    body_lines = message[m.end() :].split(b"\n")
    return (
        head
        + b"\n".join(body_lines[:lines])
        + (b"\n" if lines and len(body_lines) > lines else b"")
    )


def _ok(text: str = "") -> bytes:
    return b"+OK" + (b" " + text.encode("utf-8") if text else b"") + b"\r\n"


def _err(text: str, code: str | None = None) -> bytes:
    # RFC 2449 §8: extended response codes in brackets after -ERR.
    prefix = f"[{code}] " if code else ""
    return f"-ERR {prefix}{text}\r\n".encode()


class Pop3Connection:
    """Sans-IO POP3 server connection."""

    def __init__(self, policy: Pop3Policy | None = None, *, tls_active: bool = False) -> None:
        self.policy = policy or Pop3Policy()
        self.tls_active = tls_active
        self.state = Pop3State.AUTHORIZATION
        self._buf = bytearray()
        self._user: str | None = None
        self._sasl: bool = False  # waiting for an AUTH PLAIN response line
        self._pending: Event | None = None  # event awaiting the server's answer
        self._maildrop: list[MaildropEntry] = []
        self._deleted: set[int] = set()
        self._failures = 0

    # -- output the server asks for ------------------------------------------------

    def greeting(self, text: str = "Mailfort POP3 ready") -> bytes:
        return _ok(text)

    @property
    def closed(self) -> bool:
        return self.state is Pop3State.CLOSED

    # -- input ----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self.state is not Pop3State.CLOSED:
            self._buf += data

    def next_event(self) -> Event | None:
        """The next event, or None if more input (or an answer to an event) is needed."""
        while self._pending is None and self.state is not Pop3State.CLOSED:
            limit = self.policy.max_sasl_line if self._sasl else self.policy.max_line
            idx = self._buf.find(b"\n")
            if idx < 0:
                if len(self._buf) > limit:
                    return self._close(_err("Line too long"))
                return None
            if idx > limit:
                return self._close(_err("Line too long"))
            line = bytes(self._buf[:idx]).rstrip(b"\r")
            del self._buf[: idx + 1]
            event = self._sasl_line(line) if self._sasl else self._command(line)
            if event is not None:
                if not isinstance(event, Send):
                    self._pending = event
                return event
        return None

    def _close(self, data: bytes) -> Send:
        self.state = Pop3State.CLOSED
        self._buf.clear()
        return Send(data, close=True)

    # -- commands -------------------------------------------------------------------

    def _command(self, line: bytes) -> Event | None:
        if not line:
            return None
        verb, _, arg = line.partition(b" ")
        try:
            name = verb.decode("ascii").upper()
        except UnicodeDecodeError:
            return Send(_err("Unknown command"))
        if name in ("CAPA", "QUIT"):
            return self._capa() if name == "CAPA" else self._quit()
        if self.state is Pop3State.AUTHORIZATION:
            return self._authorization(name, arg)
        return self._transaction(name, arg)

    def _capa(self) -> Event:
        # RFC 2449 §5: CAPA is valid in both states.
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state is Pop3State.AUTHORIZATION:
            if not self.tls_active and self.policy.tls_available:
                caps.append("STLS")
            if self._auth_permitted:
                # RFC 2595 §4: don't offer plaintext mechanisms before TLS.
                caps.extend(("USER", "SASL PLAIN"))
        if self.policy.implementation:
            caps.append(f"IMPLEMENTATION {self.policy.implementation}")
        body = "".join(f"{c}\r\n" for c in caps)
        return Send(_ok("Capability list follows") + body.encode() + b".\r\n")

    def _quit(self) -> Event:
        if self.state is Pop3State.TRANSACTION:
            # RFC 1939 §6: QUIT from TRANSACTION enters UPDATE; only now are the
            # messages marked deleted actually removed.
            self.state = Pop3State.UPDATE
            uids = tuple(self._maildrop[i - 1].uid for i in sorted(self._deleted))
            return Quit(uids)
        return self._close(_ok("Bye"))

    @property
    def _auth_permitted(self) -> bool:
        return self.tls_active or self.policy.allow_plaintext_auth

    def _authorization(self, name: str, arg: bytes) -> Event | None:
        if name == "STLS":
            if self.tls_active or not self.policy.tls_available:
                return Send(_err("TLS not available or already active"))
            # RFC 2595 §4: drop anything pipelined behind STLS, it was sent in clear.
            self._buf.clear()
            self._user = None
            return StartTLS(_ok("Begin TLS negotiation"))
        if name in ("USER", "PASS", "AUTH", "APOP") and not self._auth_permitted:
            return Send(_err("Authentication requires TLS; use STLS first", "AUTH"))
        if name == "USER":
            # RFC 1939 §7 USER name: take the rest of the line.
            if not arg:
                return Send(_err("USER needs a name"))
            try:
                self._user = arg.decode("utf-8")
            except UnicodeDecodeError:
                return Send(_err("Invalid UTF-8"))
            return Send(_ok("Send password"))
        if name == "PASS":
            # RFC 1939 §7: the password is the rest of the line and may hold spaces.
            if self._user is None:
                return Send(_err("USER first"))
            user, self._user = self._user, None
            try:
                secret = arg.decode("utf-8")
            except UnicodeDecodeError:
                return Send(_err("Invalid UTF-8"))
            return AuthRequest(user, secret, "USER")
        if name == "AUTH":
            return self._auth(arg)
        if name == "APOP":
            # APOP needs the plaintext password stored on the server; mailfort never has it.
            return Send(_err("APOP not supported"))
        return Send(_err("Command not valid in this state"))

    def _auth(self, arg: bytes) -> Event | None:
        # RFC 5034 §4: AUTH mechanism [initial-response]
        if not arg:
            # Not in RFC 5034, but Outlook and others probe with a bare AUTH for the list.
            return Send(_ok("Mechanisms follow") + b"PLAIN\r\n.\r\n")
        mech, _, initial = arg.partition(b" ")
        if mech.upper() != b"PLAIN":
            return Send(_err("Unsupported mechanism"))
        if not initial:
            self._sasl = True
            return Send(b"+ \r\n")  # RFC 5034 §4: empty challenge
        return self._plain(b"" if initial == b"=" else initial)

    def _sasl_line(self, line: bytes) -> Event | None:
        self._sasl = False
        if line == b"*":
            return Send(_err("Authentication cancelled"))  # RFC 5034 §4
        return self._plain(line)

    def _plain(self, token: bytes) -> Event | None:
        try:
            msg = base64.b64decode(token, validate=True)
            authzid, authcid, passwd = msg.decode("utf-8").split("\x00")
        except (binascii.Error, ValueError):
            # ValueError covers bad UTF-8 and a wrong number of NULs.
            return Send(_err("Invalid SASL PLAIN response"))
        # RFC 4616 §2: authzid is the identity to act as.  Acting as someone else is
        # not offered here, so only an empty or identical authzid is accepted.
        if not authcid or (authzid and authzid != authcid):
            return self._auth_failed()
        return AuthRequest(authcid, passwd, "PLAIN")

    def _auth_failed(self, code: str = "AUTH", text: str = "Authentication failed") -> Send:
        self._failures += 1
        if self._failures >= self.policy.max_auth_failures:
            return self._close(_err(text, code))
        return Send(_err(text, code))

    def _message_number(self, arg: bytes) -> int | bytes:
        """A live message number, or the -ERR to answer with."""
        if not _NUMBER_RE.fullmatch(arg):
            return _err("Invalid message number")
        n = int(arg)
        if n < 1 or n > len(self._maildrop):
            return _err("No such message")
        if n in self._deleted:
            return _err(f"Message {n} already deleted")
        return n

    def _transaction(self, name: str, arg: bytes) -> Event | None:
        live = [(i, m) for i, m in enumerate(self._maildrop, 1) if i not in self._deleted]
        if name == "STAT":
            return Send(_ok(f"{len(live)} {sum(m.size for _, m in live)}"))
        if name in ("LIST", "UIDL"):

            def item(m: MaildropEntry) -> str:
                return str(m.size) if name == "LIST" else m.uid

            if arg:
                n = self._message_number(arg)
                if isinstance(n, bytes):
                    return Send(n)
                return Send(_ok(f"{n} {item(self._maildrop[n - 1])}"))
            body = "".join(f"{i} {item(m)}\r\n" for i, m in live)
            return Send(_ok(f"{len(live)} messages") + body.encode() + b".\r\n")
        if name == "DELE":
            n = self._message_number(arg)
            if isinstance(n, bytes):
                return Send(n)
            self._deleted.add(n)
            return Send(_ok(f"Message {n} deleted"))
        if name == "RSET":
            self._deleted.clear()
            return Send(_ok(f"{len(self._maildrop)} messages"))
        if name == "NOOP":
            return Send(_ok())
        if name == "RETR":
            n = self._message_number(arg)
            if isinstance(n, bytes):
                return Send(n)
            return Retrieve(n, self._maildrop[n - 1].uid)
        if name == "TOP":
            num, _, count = arg.partition(b" ")
            n = self._message_number(num)
            if isinstance(n, bytes):
                return Send(n)
            if not _NUMBER_RE.fullmatch(count):
                return Send(_err("Invalid line count"))
            return Retrieve(n, self._maildrop[n - 1].uid, int(count))
        return Send(_err("Command not valid in this state"))

    # -- answers from the server ----------------------------------------------------

    def _answer(self, kind: type) -> Event:
        pending = self._pending
        if pending is None or not isinstance(pending, kind):
            raise RuntimeError(f"no {kind.__name__} is waiting for an answer")
        self._pending = None
        return pending

    def auth_result(
        self,
        ok: bool,
        maildrop: Sequence[MaildropEntry] = (),
        *,
        code: str | None = None,
        text: str | None = None,
    ) -> bytes:
        """Answer an :class:`AuthRequest`.

        On failure ``code`` may be ``SYS/TEMP`` or ``IN-USE`` (RFC 2449 §8.1, RFC 3206)
        instead of the default ``AUTH``.  Repeated failures close the connection.
        """
        self._answer(AuthRequest)
        if not ok:
            sent = self._auth_failed(code or "AUTH", text or "Authentication failed")
            return sent.data
        self._maildrop = list(maildrop)
        self._deleted.clear()
        self.state = Pop3State.TRANSACTION
        return _ok(text or f"{len(self._maildrop)} messages ready")

    def tls_started(self) -> None:
        self._answer(StartTLS)
        self.tls_active = True
        self._buf.clear()  # RFC 2595 §4: nothing from before the handshake counts

    def message(self, data: bytes | None) -> bytes:
        """Answer a :class:`Retrieve` with the message (None if it vanished)."""
        event = self._answer(Retrieve)
        assert isinstance(event, Retrieve)
        if data is None:
            return _err("Message no longer available", "SYS/TEMP")
        if event.top_lines is not None:
            data = _top(data, event.top_lines)
            return _ok("Top of message follows") + dot_stuff(data)
        return _ok(f"{self._maildrop[event.number - 1].size} octets") + dot_stuff(data)

    def update_done(self, ok: bool = True) -> bytes:
        """Answer a :class:`Quit`: ``ok`` if every deletion succeeded (RFC 1939 §6)."""
        self._answer(Quit)
        self.state = Pop3State.CLOSED
        self._buf.clear()
        if ok:
            return _ok("Bye")
        return _err("Some deleted messages not removed", "SYS/TEMP")
