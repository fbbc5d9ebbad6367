"""One IMAP connection as a sans-IO object: framer + parser + state machine.

The server feeds bytes in and pulls events out; it answers each command event and tells
the connection how the command ended (:meth:`ImapConnection.complete`), which moves the
state machine.  The connection itself answers what needs no store: syntax errors, state
violations, literal continuations, CAPABILITY and ENABLE.

Events are pulled one at a time and the next one is only computed when asked for, so a
command's effects (a mode switch for IDLE or AUTHENTICATE, the end of plaintext after
STARTTLS, a new charset of mailbox names after ENABLE) apply to the bytes that follow
it even when the client pipelined them in the same segment.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mailfort.imap import commands as c
from mailfort.imap import response as r
from mailfort.imap.parser import ParseError, decode_base64, parse_command
from mailfort.imap.search import uses_modseq
from mailfort.imap.state import ImapSession, ServerPolicy, State
from mailfort.imap.wire import (
    AuthLine,
    ContinuationRequest,
    FrameError,
    Framer,
    FramerMode,
    IdleDone,
    RawCommand,
)

__all__ = [
    "AuthResponse",
    "CommandReceived",
    "Event",
    "IdleEnded",
    "ImapConnection",
    "Send",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CommandReceived:
    """A valid command, allowed in the current state: the server runs it and then
    answers with :meth:`ImapConnection.complete`."""

    command: c.Command


@dataclass(frozen=True, slots=True)
class Send:
    """Bytes the connection produced by itself; write them, then close if ``close``."""

    data: bytes
    close: bool = False


@dataclass(frozen=True, slots=True)
class IdleEnded:
    """The client sent DONE (``ok``) or something else during IDLE (RFC 9051 §6.3.13)."""

    command: c.Idle
    ok: bool


@dataclass(frozen=True, slots=True)
class AuthResponse:
    """A decoded SASL response during AUTHENTICATE (RFC 9051 §6.2.2)."""

    command: c.Authenticate
    data: bytes


Event = CommandReceived | Send | IdleEnded | AuthResponse

# Commands that turn CONDSTORE on implicitly (RFC 7162 §3.1).
_CONDSTORE_FETCH = frozenset({"MODSEQ"})


class ImapConnection:
    """Sans-IO IMAP server connection.

    ``tls_active`` is true on an implicit-TLS port (993).  ``preauth`` starts in the
    authenticated state (RFC 9051 §7.1.4; for a proxy that authenticated already).
    """

    def __init__(
        self,
        policy: ServerPolicy | None = None,
        *,
        tls_active: bool = False,
        preauth: bool = False,
    ) -> None:
        self.policy = policy or ServerPolicy()
        self.session = ImapSession(self.policy, tls_active=tls_active)
        self.framer = Framer(self.policy.preauth_limits())
        if preauth:
            self._authenticated()
        self._idle: c.Idle | None = None
        self._auth: c.Authenticate | None = None
        self._closing = False

    # -- output helpers -------------------------------------------------------------

    @property
    def state(self) -> State:
        return self.session.state

    @property
    def closing(self) -> bool:
        """True once the connection must be closed after the pending output."""
        return self._closing

    def greeting(self, text: str = "Mailfort IMAP4rev2 ready") -> bytes:
        """The server greeting (RFC 9051 §7.1.1 / §7.1.4), with capabilities attached."""
        status = r.Status.PREAUTH if self.session.state is State.AUTHENTICATED else r.Status.OK
        code = r.ResponseCode.capability(self.session.capabilities())
        return r.StatusResponse(status, text, code).to_bytes()

    def send(self, *responses: r.Response) -> bytes:
        """Serialise responses for this client (UTF-8 or not, RFC 6855 §3)."""
        return b"".join(resp.to_bytes(utf8=self.session.utf8) for resp in responses)

    def continuation(self, text: str = "idling") -> bytes:
        return r.ContinuationResponse(text).to_bytes()

    def auth_challenge(self, challenge: bytes) -> bytes:
        """Send a SASL challenge; the client's answer arrives as :class:`AuthResponse`."""
        if self._auth is None:
            raise RuntimeError("no AUTHENTICATE in progress")
        self.framer.set_mode(FramerMode.AUTHENTICATE)
        return r.ContinuationResponse(challenge=challenge).to_bytes()

    # -- input ----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self.framer.receive_data(data)

    def next_event(self) -> Event | None:
        """The next event, or None when more input is needed.

        Call :meth:`complete` for a :class:`CommandReceived` before asking for the next
        event: that is when mode switches (STARTTLS, AUTHENTICATE, COMPRESS) happen.
        """
        while not self._closing:
            wire = self.framer.next_event()
            if wire is None:
                return None
            event = self._handle(wire)
            if event is not None:
                return event
        return None

    def _handle(
        self, wire: RawCommand | ContinuationRequest | FrameError | IdleDone | AuthLine
    ) -> Event | None:
        if isinstance(wire, ContinuationRequest):
            if self.session.state is State.LOGOUT:
                return None
            return Send(wire.response())
        if isinstance(wire, FrameError):
            if wire.close:
                self._closing = True
            return Send(wire.response(), close=wire.close)
        if isinstance(wire, IdleDone):
            idle, self._idle = self._idle, None
            if idle is None:
                return Send(b"* BAD Not idling\r\n")
            return IdleEnded(idle, wire.ok)
        if isinstance(wire, AuthLine):
            return self._auth_line(wire)
        return self._command(wire)

    def _auth_line(self, line: AuthLine) -> Event | None:
        auth = self._auth
        if auth is None:
            self.framer.set_mode(FramerMode.COMMAND)
            return None
        if line.cancelled:
            # RFC 9051 §6.2.2: a cancelled exchange ends with a tagged BAD.
            self._end_auth()
            return Send(f"{auth.tag} BAD Authentication cancelled\r\n".encode())
        data = decode_base64(line.data)
        if data is None:
            self._end_auth()
            return Send(f"{auth.tag} BAD Invalid base64 in SASL response\r\n".encode())
        return AuthResponse(auth, data)

    def _end_auth(self) -> None:
        self._auth = None
        self.framer.set_mode(FramerMode.COMMAND)

    def _command(self, raw: RawCommand) -> Event | None:
        try:
            parsed = parse_command(raw, utf8=self.session.utf8)
        except Exception:  # defence in depth: the parser is fuzzed and must not raise
            log.exception("IMAP parser raised; answering BAD")
            parsed = ParseError(
                raw.tag.decode("ascii", "replace"), "Internal error parsing command"
            )
        if isinstance(parsed, ParseError):
            return Send(parsed.response())
        refusal = self.session.check(parsed)
        if refusal is not None:
            return Send(refusal.response())
        self._note_condstore(parsed)
        if isinstance(parsed, c.Capability):
            return Send(
                self.send(r.capability(self.session.capabilities()))
                + self.complete(parsed, text="CAPABILITY completed")
            )
        if isinstance(parsed, c.Enable):
            newly = self.session.enable(parsed.capabilities)
            return Send(
                self.send(r.enabled(newly)) + self.complete(parsed, text="ENABLE completed")
            )
        if isinstance(parsed, c.Idle):
            # Switch now: the next line (maybe already buffered) is DONE, not a command.
            self._idle = parsed
            self.framer.set_mode(FramerMode.IDLE)
        elif isinstance(parsed, c.Authenticate):
            self._auth = parsed
        return CommandReceived(parsed)

    def _note_condstore(self, cmd: c.Command) -> None:
        # RFC 7162 §3.1: these commands enable CONDSTORE for the rest of the session.
        if (
            (isinstance(cmd, c.Select) and (cmd.condstore or cmd.qresync is not None))
            or (
                isinstance(cmd, c.Fetch)
                and (
                    cmd.changed_since is not None
                    or any(
                        isinstance(a, c.FetchSimple) and a.name in _CONDSTORE_FETCH
                        for a in cmd.attributes
                    )
                )
            )
            or (isinstance(cmd, c.Store) and cmd.unchanged_since is not None)
            or (isinstance(cmd, c.Search) and uses_modseq(cmd.criteria))
        ):
            self.session.condstore = True

    # -- completion -----------------------------------------------------------------

    def complete(
        self,
        cmd: c.Command,
        status: r.Status = r.Status.OK,
        text: str | None = None,
        code: r.ResponseCode | None = None,
    ) -> bytes:
        """The tagged response ending ``cmd``; applies the state change it implies."""
        ok = status is r.Status.OK
        s = self.session
        prefix = b""
        if isinstance(cmd, c.Login | c.Authenticate):
            if isinstance(cmd, c.Authenticate):
                self._end_auth()
            if ok:
                self._authenticated()
                # RFC 9051 §6.2.2/§6.2.3: capabilities may change after login; send them.
                code = code or r.ResponseCode.capability(s.capabilities())
        elif isinstance(cmd, c.Select):
            if ok:
                s.selected(cmd.mailbox, read_only=cmd.read_only)
            else:
                s.unselected()  # RFC 9051 §6.3.2
        elif isinstance(cmd, c.Close | c.Unselect):
            if ok:
                s.unselected()
        elif isinstance(cmd, c.Logout):
            # RFC 9051 §6.1.3: BYE, then the tagged OK, then the server closes.
            prefix = r.bye().to_bytes()
            s.logout()
            self._closing = True
        elif isinstance(cmd, c.StartTLS):
            if ok:
                # RFC 9051 §6.2.1: discard any plaintext pipelined behind STARTTLS.
                self.framer.discard_buffer()
        elif isinstance(cmd, c.Idle):
            self._idle = None
            if self.framer.mode is FramerMode.IDLE:
                self.framer.set_mode(FramerMode.COMMAND)
        elif isinstance(cmd, c.Compress) and ok:
            s.compress_active = True
        if text is None:
            text = f"{_name(cmd)} {'completed' if ok else 'failed'}"
        return prefix + r.TaggedResponse(cmd.tag, status, text, code).to_bytes(utf8=s.utf8)

    def _authenticated(self) -> None:
        self.session.authenticated()
        self.framer.limits = self.policy.framer_limits()

    def tls_started(self) -> None:
        """The server finished the TLS handshake after STARTTLS."""
        self.session.tls_active = True

    def take_compressed_tail(self) -> bytes:
        """After ``COMPRESS`` OK: input already buffered is compressed (RFC 4978 §3);
        the server feeds it to its inflater, then feeds inflated bytes back in."""
        return self.framer.take_buffer()


def _name(cmd: c.Command) -> str:
    if isinstance(cmd, c.Select):
        return "EXAMINE" if cmd.read_only else "SELECT"
    if isinstance(cmd, c.UidExpunge):
        return "UID EXPUNGE"
    prefix = "UID " if getattr(cmd, "uid", False) is True else ""
    return prefix + type(cmd).__name__.upper()
