"""The IMAP connection state machine (RFC 9051 §3) and capability computation.

::

    not authenticated --LOGIN/AUTHENTICATE OK--> authenticated --SELECT/EXAMINE OK--> selected
            ^                                          ^   <--CLOSE/UNSELECT OK, SELECT NO--'
            |                          (PREAUTH greeting)
    any state --LOGOUT--> logout

:class:`ImapSession` holds the state and the facts that change what a client may do:
whether TLS is active (the server tells it), which extensions the client ENABLEd, and
the selected mailbox.  :meth:`ImapSession.check` is the gate every parsed command passes
before the server runs it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

from mailfort.imap import commands as c
from mailfort.imap.parser import ParseError
from mailfort.imap.wire import Limits

__all__ = ["ENABLEABLE", "ImapSession", "ServerPolicy", "State", "allowed_states"]


class State(enum.Enum):
    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


_ANY: Final = frozenset({State.NOT_AUTHENTICATED, State.AUTHENTICATED, State.SELECTED})
_NOT_AUTH: Final = frozenset({State.NOT_AUTHENTICATED})
_AUTH: Final = frozenset({State.AUTHENTICATED, State.SELECTED})
_AUTH_ONLY: Final = frozenset({State.AUTHENTICATED})
_SELECTED: Final = frozenset({State.SELECTED})

# RFC 9051 §6.1 (any state), §6.2 (not authenticated), §6.3 (authenticated; also valid
# when selected), §6.4 (selected).  Extension commands go where their RFCs put them.
_STATES: Final[dict[type, frozenset[State]]] = {
    c.Capability: _ANY,
    c.Noop: _ANY,
    c.Logout: _ANY,
    c.Id: _ANY,  # RFC 2971 §3.1: any state
    c.StartTLS: _NOT_AUTH,
    c.Authenticate: _NOT_AUTH,
    c.Login: _NOT_AUTH,
    c.Enable: _AUTH_ONLY,  # RFC 5161 §3.1: authenticated state, before any SELECT
    c.Select: _AUTH,
    c.Create: _AUTH,
    c.Delete: _AUTH,
    c.Rename: _AUTH,
    c.Subscribe: _AUTH,
    c.Unsubscribe: _AUTH,
    c.List: _AUTH,
    c.Lsub: _AUTH,
    c.Namespace: _AUTH,
    c.Status: _AUTH,
    c.Append: _AUTH,
    c.Idle: _AUTH,
    c.GetQuota: _AUTH,
    c.GetQuotaRoot: _AUTH,
    c.SetQuota: _AUTH,
    c.Compress: _AUTH,  # RFC 4978 §3: after authentication
    c.Check: _SELECTED,
    c.Close: _SELECTED,
    c.Unselect: _SELECTED,
    c.Expunge: _SELECTED,
    c.UidExpunge: _SELECTED,
    c.Search: _SELECTED,
    c.Fetch: _SELECTED,
    c.Store: _SELECTED,
    c.Copy: _SELECTED,
    c.Move: _SELECTED,
}

#: What ENABLE can switch on (RFC 5161 §4): CONDSTORE/QRESYNC (RFC 7162 §3.1.8/§3.2.3),
#: IMAP4rev2 (RFC 9051 §6.3.1), UTF8=ACCEPT (RFC 6855 §3).
ENABLEABLE: Final = ("CONDSTORE", "QRESYNC", "IMAP4REV2", "UTF8=ACCEPT")


def allowed_states(command: c.Command) -> frozenset[State]:
    return _STATES[type(command)]


@dataclass(frozen=True, slots=True)
class ServerPolicy:
    """Server configuration the protocol core needs.

    ``tls_available`` is false on an implicit-TLS port (already encrypted) or when no
    certificate is configured; ``allow_plaintext_auth`` permits passwords without TLS
    and exists for tests on loopback only.
    """

    tls_available: bool = True
    allow_plaintext_auth: bool = False
    auth_mechanisms: tuple[str, ...] = ("PLAIN",)
    literal_plus: bool = True
    append_limit: int | None = 64 * 1024 * 1024
    compress: bool = True
    quota: bool = True
    object_ids: bool = False  # RFC 8474, once the store has EMAILID/THREADID
    limits: Limits = field(default_factory=Limits)
    #: Before login only LOGIN/AUTHENTICATE carry literals, and they are small: an
    #: unauthenticated client must not make the server hold megabytes.
    preauth_max_literal: int = 8192
    preauth_max_command: int = 64 * 1024

    def framer_limits(self) -> Limits:
        """Limits with literal sizes made consistent with LITERAL+ and APPENDLIMIT."""
        base = self.limits
        max_literal = base.max_literal
        if self.append_limit is not None:
            # RFC 7889: larger messages are refused; refusing the literal before it is
            # sent (synchronising) or at once (non-synchronising) spares the upload.
            max_literal = min(max_literal, self.append_limit)
        nonsync = max_literal if self.literal_plus else min(base.max_nonsync_literal, 4096)
        return Limits(base.max_line, max_literal, nonsync, base.max_command, base.max_literals)

    def preauth_limits(self) -> Limits:
        """Limits for the not-authenticated state (see ``preauth_max_literal``)."""
        full = self.framer_limits()
        max_literal = min(full.max_literal, self.preauth_max_literal)
        return Limits(
            min(full.max_line, self.preauth_max_command),
            max_literal,
            min(full.max_nonsync_literal, max_literal),
            min(full.max_command, self.preauth_max_command),
            min(full.max_literals, 16),
        )


@dataclass(slots=True)
class ImapSession:
    """State of one IMAP connection as far as the protocol is concerned."""

    policy: ServerPolicy = field(default_factory=ServerPolicy)
    tls_active: bool = False
    state: State = State.NOT_AUTHENTICATED
    enabled: set[str] = field(default_factory=set)
    #: RFC 7162 §3.1: CONDSTORE is on after ENABLE or any CONDSTORE-enabling command.
    condstore: bool = False
    compress_active: bool = False
    mailbox: str | None = None
    read_only: bool = False

    # -- derived ------------------------------------------------------------------

    @property
    def utf8(self) -> bool:
        """Mailbox names and quoted strings are UTF-8 (RFC 9051 §5.1, RFC 6855 §3)."""
        return bool(self.enabled & {"IMAP4REV2", "UTF8=ACCEPT"})

    @property
    def imap4rev2(self) -> bool:
        return "IMAP4REV2" in self.enabled

    @property
    def qresync(self) -> bool:
        return "QRESYNC" in self.enabled

    @property
    def auth_permitted(self) -> bool:
        # RFC 9051 §6.2.3 / §11.1: no plaintext passwords unless TLS protects them.
        return self.tls_active or self.policy.allow_plaintext_auth

    def capabilities(self) -> list[str]:
        """The CAPABILITY list for the current state (RFC 9051 §6.1.1, §7.2.2).

        Before authentication only what a client needs to log in is shown: the version,
        STARTTLS/LOGINDISABLED or the SASL mechanisms, and the syntax extensions it may
        use right away.  The full list follows authentication.
        """
        p = self.policy
        caps = ["IMAP4rev2", "IMAP4rev1"]
        if self.state is State.NOT_AUTHENTICATED:
            if not self.tls_active and p.tls_available:
                caps.append("STARTTLS")
            if self.auth_permitted:
                caps.extend(f"AUTH={m}" for m in p.auth_mechanisms)
            else:
                caps.append("LOGINDISABLED")  # RFC 9051 §6.2.3
            caps.append("SASL-IR")
            caps.append("LITERAL+" if p.literal_plus else "LITERAL-")
            caps.extend(("ID", "ENABLE", "IDLE"))
            return caps
        caps.append("LITERAL+" if p.literal_plus else "LITERAL-")
        caps.extend(
            (
                "ID",
                "ENABLE",
                "IDLE",
                "NAMESPACE",
                "UNSELECT",
                "UIDPLUS",
                "MOVE",
                "CHILDREN",
                "SPECIAL-USE",
                "CREATE-SPECIAL-USE",
                "CONDSTORE",
                "QRESYNC",
                "ESEARCH",
                "SEARCHRES",
                "WITHIN",
                "LIST-EXTENDED",
                "LIST-STATUS",
                "STATUS=SIZE",
                "BINARY",
                "MULTIAPPEND",
                "UTF8=ACCEPT",
            )
        )
        if p.append_limit is not None:
            caps.append(f"APPENDLIMIT={p.append_limit}")
        if p.quota:
            caps.extend(("QUOTA", "QUOTA=RES-STORAGE", "QUOTA=RES-MESSAGE"))
        if p.object_ids:
            caps.append("OBJECTID")
        if p.compress and not self.compress_active:
            caps.append("COMPRESS=DEFLATE")
        return caps

    # -- the gate ------------------------------------------------------------------

    def check(self, cmd: c.Command) -> ParseError | None:
        """Refuse a command the current state or session does not allow, else None."""
        tag = cmd.tag
        if self.state is State.LOGOUT:
            return ParseError(tag, "Logging out")
        if self.state not in allowed_states(cmd):
            if self.state is State.NOT_AUTHENTICATED:
                return ParseError(tag, "Log in first")
            return ParseError(
                tag, f"{type(cmd).__name__.upper()} not valid in the {self.state.value} state"
            )
        if isinstance(cmd, c.StartTLS):
            if self.tls_active or not self.policy.tls_available:
                return ParseError(tag, "TLS is not available or already active")
        elif isinstance(cmd, c.Login):
            if not self.auth_permitted:
                # RFC 9051 §6.2.3 (LOGINDISABLED) and §7.1 PRIVACYREQUIRED.
                return ParseError(tag, "Use STARTTLS first", "NO", "PRIVACYREQUIRED")
        elif isinstance(cmd, c.Authenticate):
            if not self.auth_permitted:
                return ParseError(tag, "Use STARTTLS first", "NO", "PRIVACYREQUIRED")
            if cmd.mechanism not in self.policy.auth_mechanisms:
                # RFC 9051 §6.2.2: an unsupported mechanism gets a tagged NO.
                return ParseError(tag, "Unsupported authentication mechanism", "NO", "CANNOT")
        elif isinstance(cmd, c.Select):
            if cmd.qresync is not None and not self.qresync:
                # RFC 7162 §3.2.5: QRESYNC parameter without ENABLE QRESYNC is BAD.
                return ParseError(tag, "QRESYNC is not enabled")
        elif isinstance(cmd, c.Fetch):
            if cmd.vanished and not self.qresync:
                # RFC 7162 §3.2.6: VANISHED modifier without ENABLE QRESYNC is BAD.
                return ParseError(tag, "QRESYNC is not enabled")
        elif isinstance(cmd, c.Compress):
            if self.compress_active:
                return ParseError(tag, "Compression already active", "NO", "COMPRESSIONACTIVE")
            if not self.policy.compress or cmd.mechanism != "DEFLATE":
                return ParseError(tag, "Unsupported compression mechanism")  # RFC 4978 §3
        elif isinstance(cmd, c.Append):
            limit = self.policy.append_limit
            if limit is not None and any(len(m.data) > limit for m in cmd.messages):
                return ParseError(tag, "Message too large", "NO", "TOOBIG")  # RFC 7889 §4
        return None

    # -- transitions ---------------------------------------------------------------

    def enable(self, capabilities: tuple[str, ...]) -> list[str]:
        """RFC 5161 §3.1: switch on what is known and not yet on; report only those."""
        newly: list[str] = []
        for cap in capabilities:
            if cap in ENABLEABLE and cap not in self.enabled:
                self.enabled.add(cap)
                newly.append("IMAP4rev2" if cap == "IMAP4REV2" else cap)
        if self.enabled & {"CONDSTORE", "QRESYNC"}:
            # RFC 7162 §3.2.3: QRESYNC implies CONDSTORE.
            self.condstore = True
        return newly

    def authenticated(self) -> None:
        self.state = State.AUTHENTICATED

    def selected(self, mailbox: str, *, read_only: bool) -> None:
        self.state = State.SELECTED
        self.mailbox = mailbox
        self.read_only = read_only

    def unselected(self) -> None:
        # RFC 9051 §6.3.2: a failed SELECT also leaves no mailbox selected.
        self.state = State.AUTHENTICATED
        self.mailbox = None
        self.read_only = False

    def logout(self) -> None:
        self.state = State.LOGOUT
        self.mailbox = None
