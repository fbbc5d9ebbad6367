"""IMAP command handlers over the encrypted store (RFC 9051, RFC 3501 and extensions).

A :class:`Session` is one logged-in (or logging-in) client.  The asyncio server feeds it
the events of its :class:`~mailfort.imap.connection.ImapConnection`; the session runs
each command against the :class:`~mailfort.store.mailbox.Mailbox` and writes responses
through an :class:`Output`, so it can be driven without sockets.

The selected folder is a :class:`Selected` view: the UIDs the client knows (index + 1 is
the sequence number) and the MODSEQ up to which it has been told about changes.  After
every command (and during IDLE, on notification) :meth:`Session.sync` reads what changed
since that MODSEQ -- new messages, flag changes, expunges, by this or any other session
or process -- and announces it (RFC 9051 §5.2, §7.4).
"""

from __future__ import annotations

import bisect
import datetime as dt
import logging
import time
import weakref
from array import array
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mailfort.imap import commands as c
from mailfort.imap import response as r
from mailfort.imap.connection import AuthResponse, CommandReceived, IdleEnded, ImapConnection
from mailfort.imap.fetch import FetchPlan, MessageSource, render_fetch
from mailfort.imap.mailbox import INBOX, list_matcher
from mailfort.imap.mailboxes import MailAccess, SharedMailbox
from mailfort.imap.search import SearchContext, run_search
from mailfort.imap.searching import SearchPlan
from mailfort.imap.sequence import SequenceSet
from mailfort.mail import UnknownCTEError
from mailfort.store.mailbox import (
    DELIMITER,
    Appended,
    AppendItem,
    Folder,
    FolderEntry,
    FolderError,
    FolderExists,
    FolderHasChildren,
    FolderNotFound,
    Mailbox,
)
from mailfort.store.quota import Quota, QuotaExceeded

__all__ = ["Output", "Selected", "Session"]

log = logging.getLogger(__name__)

SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
_MAX_NAME = 1024
_FLUSH_AT = 256 * 1024
_ROWS_PER_WRITE = 2000
_MAX_RANGES = 64  # beyond this many runs, one scan and a filter


class Output(Protocol):
    """Where a session's bytes go; the server's transport implements it."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    async def start_tls(self) -> None: ...

    def start_compression(self, tail: bytes) -> None: ...


@dataclass(eq=False)
class Selected:
    """The client's view of its selected folder."""

    folder_id: int
    name: str
    uidvalidity: int
    read_only: bool
    uids: array[int]
    known_modseq: int
    #: UIDs \\Recent to this session (RFC 3501 §2.3.2), as ascending half-open ranges:
    #: those it claimed at SELECT and those it claimed as they arrived.  Usually one or
    #: two ranges, however many messages: an idle session must stay small.
    recent: list[tuple[int, int]]
    saved: frozenset[int] = frozenset()  # RFC 5182 "$"
    #: Flag changes this session already reported itself: uid -> modseq.
    own: dict[int, int] = field(default_factory=dict)
    #: Expunges seen while EXPUNGE responses were not allowed (RFC 9051 §7.5.1).
    pending_expunge: set[int] = field(default_factory=set)

    def seq_of(self, uid: int) -> int:
        """Sequence number of ``uid``, or 0 if the client does not know it."""
        i = bisect.bisect_left(self.uids, uid)
        return i + 1 if i < len(self.uids) and self.uids[i] == uid else 0

    def recent_count(self) -> int:
        uids = self.uids
        return sum(
            bisect.bisect_left(uids, hi) - bisect.bisect_left(uids, lo) for lo, hi in self.recent
        )

    def is_recent(self, uid: int) -> bool:
        return any(lo <= uid < hi for lo, hi in self.recent)

    def recent_floor(self) -> int:
        """No UID below this is \\Recent (a fast path for FETCH FLAGS)."""
        return self.recent[0][0] if self.recent else 1 << 62

    def add_recent(self, uids: Sequence[int]) -> None:
        for uid in uids:
            if self.recent and self.recent[-1][1] == uid:
                self.recent[-1] = (self.recent[-1][0], uid + 1)
            else:
                self.recent.append((uid, uid + 1))


# Command type -> handler method name: one table for all sessions, not a dict of bound
# methods per connection (an idle connection should cost as little as possible).
_HANDLERS: dict[type, str] = {
    c.Noop: "_noop",
    c.Check: "_noop",
    c.Logout: "_logout",
    c.StartTLS: "_starttls",
    c.Login: "_login",
    c.Authenticate: "_authenticate",
    c.Select: "_select",
    c.Create: "_create",
    c.Delete: "_delete",
    c.Rename: "_rename",
    c.Subscribe: "_subscribe",
    c.Unsubscribe: "_subscribe",
    c.List: "_list",
    c.Lsub: "_lsub",
    c.Namespace: "_namespace",
    c.Status: "_status",
    c.Append: "_append",
    c.Idle: "_idle",
    c.Close: "_close",
    c.Unselect: "_close",
    c.Expunge: "_expunge",
    c.UidExpunge: "_expunge",
    c.Search: "_search",
    c.Fetch: "_fetch",
    c.Store: "_store",
    c.Copy: "_copy",
    c.Move: "_copy",
    c.Id: "_id",
    c.GetQuota: "_getquota",
    c.GetQuotaRoot: "_getquota",
    c.SetQuota: "_setquota",
    c.Compress: "_compress",
}


#: UID maps of selected folders, shared by the sessions whose views are equal (a client's
#: several connections, many IDLE connections on one INBOX, or any two folders holding
#: the same UIDs): 40 KB per 10,000 messages held once, not per session.  Sessions never
#: change an array in place (they replace it), so sharing equal contents is safe.
_UID_MAPS: weakref.WeakValueDictionary[tuple[int, int], array[int]] = weakref.WeakValueDictionary()


def _shared_uids(uids: array[int]) -> array[int]:
    if len(uids) < 64:
        return uids
    key = (len(uids), hash(uids.tobytes()))
    known = _UID_MAPS.get(key)
    if known is not None and known == uids:
        return known
    _UID_MAPS[key] = uids
    return uids


class CommandFailed(Exception):
    """Ends a command with a tagged NO or BAD."""

    def __init__(self, text: str, code: str | None = None, *, bad: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.code = code
        self.bad = bad


class Session:
    """One IMAP client session over :class:`MailAccess` (see the module docstring)."""

    __slots__ = (
        "_prefiled",
        "access",
        "conn",
        "idling",
        "must_close",
        "out",
        "peer_ip",
        "sel",
        "shared",
    )

    def __init__(self, access: MailAccess, conn: ImapConnection, out: Output, peer_ip: str) -> None:
        self.access = access
        self.conn = conn
        self.out = out
        self.peer_ip = peer_ip
        self.shared: SharedMailbox | None = None
        self.sel: Selected | None = None
        self.idling: c.Idle | None = None
        #: Set when the session must end after the current output (mailbox deleted).
        self.must_close = False
        #: Outcomes of pipelined APPENDs already filed together (:meth:`run_appends`).
        #: Keyed by id(): the commands are alive until answered, and equal commands
        #: (a reused tag) must not share an outcome.
        self._prefiled: dict[int, Appended | Exception] | None = None

    # ---- plumbing ------------------------------------------------------------------

    @property
    def mailbox(self) -> Mailbox:
        if self.shared is None:
            raise CommandFailed("Not logged in")
        return self.shared.mailbox

    @property
    def _utf8(self) -> bool:
        return self.conn.session.utf8

    def _write(self, *responses: r.Response) -> None:
        self.out.write(self.conn.send(*responses))

    def _done(
        self,
        cmd: c.Command,
        status: r.Status = r.Status.OK,
        text: str | None = None,
        code: r.ResponseCode | None = None,
        *,
        expunge_ok: bool = True,
    ) -> None:
        if self.sel is not None:
            self.out.write(self.sync(expunge_ok=expunge_ok))
        self.out.write(self.conn.complete(cmd, status, text, code))

    async def handle(self, event: CommandReceived | IdleEnded | AuthResponse) -> None:
        if isinstance(event, CommandReceived):
            await self.run(event.command)
        elif isinstance(event, IdleEnded):
            self._idle_ended(event)
        else:
            await self._sasl_plain(event.command, event.data)

    async def run(self, cmd: c.Command) -> None:
        name = _HANDLERS.get(type(cmd))
        try:
            if name is None:  # the core answers CAPABILITY and ENABLE itself
                raise CommandFailed("Command not supported", bad=True)
            handler: Callable[[Any], Awaitable[None]] = getattr(self, name)
            await handler(cmd)
        except CommandFailed as exc:
            status = r.Status.BAD if exc.bad else r.Status.NO
            code = r.ResponseCode(exc.code) if exc.code else None
            # No untagged updates on failure: nothing changed, and for FETCH/STORE/SEARCH
            # an EXPUNGE would be out of place (RFC 9051 §7.5.1).
            self.out.write(self.conn.complete(cmd, status, exc.text, code))
        except (ConnectionError, OSError):
            raise
        except Exception:
            log.exception("IMAP command %s failed", type(cmd).__name__)
            self.out.write(
                self.conn.complete(
                    cmd, r.Status.NO, "Internal error", r.ResponseCode.simple("SERVERBUG")
                )
            )

    async def run_appends(self, cmds: Sequence[c.Append]) -> None:
        """Pipelined APPENDs the client sent back to back: filed in one store commit
        (one fsync instead of one each), then answered one by one, in order, exactly as
        :meth:`run` would answer each (RFC 9051 §5.5 lets a server pipeline them)."""
        requests: list[c.Append] = []
        batch: list[tuple[str, list[AppendItem], Quota | None]] = []
        if self.shared is not None:
            for cmd in cmds:
                try:
                    name, items = self._append_request(cmd)
                except CommandFailed:
                    continue  # answered by run() below, the same way
                requests.append(cmd)
                batch.append((name, items, self._quota))
        if batch:
            outcomes = await self.mailbox.append_many(batch)
            self._prefiled = {id(c): o for c, o in zip(requests, outcomes, strict=True)}
        try:
            for cmd in cmds:
                await self.run(cmd)
        finally:
            self._prefiled = None

    async def close(self) -> None:
        """The connection ended: let go of the mailbox (and so of the keys)."""
        shared, self.shared = self.shared, None
        self.sel = None
        self.idling = None
        if shared is not None:
            shared.unlisten(self)
            await self.access.release(shared)

    def _notify_others(self) -> None:
        if self.shared is not None:
            self.shared.notify(origin=self)

    # ---- change announcements ---------------------------------------------------------

    def mailbox_changed(self) -> None:
        """Another session or process may have changed the mailbox (MailboxListener)."""
        if self.idling is not None and self.sel is not None:
            # RFC 9051 §6.3.13: during IDLE, updates are sent as they happen.
            self.out.write(self.sync(expunge_ok=True))

    def sync(self, *, expunge_ok: bool) -> bytes:
        """Untagged EXPUNGE/VANISHED, EXISTS and FETCH FLAGS for changes since the client
        was last told (RFC 9051 §7.4.1, §7.5.1; RFC 7162 §3.2.10 with QRESYNC)."""
        sel, shared = self.sel, self.shared
        if sel is None or shared is None:
            return b""
        ch = shared.mailbox.changes(sel.folder_id, sel.known_modseq)
        if ch is None:
            # Deleted under us (another session): end the session, as Dovecot does.
            self.must_close = True
            return b"* BYE Selected mailbox was deleted\r\n"
        out: list[bytes] = []
        if ch.vanished:
            sel.pending_expunge.update(u for u in ch.vanished if sel.seq_of(u))
        if expunge_ok and sel.pending_expunge:
            out.append(self._announce_expunge(sorted(sel.pending_expunge)))
            sel.pending_expunge.clear()
        last = sel.uids[-1] if sel.uids else 0
        new: list[int] = []
        changed: list[bytes] = []
        condstore = self.conn.session.condstore
        rev1 = not self.conn.session.imap4rev2
        for uid, flags, modseq in ch.changed:
            if uid > last:
                new.append(uid)
                continue
            if sel.own.get(uid) == modseq or uid in sel.pending_expunge:
                continue
            seq = sel.seq_of(uid)
            if not seq:
                continue
            recent = " \\Recent" if sel.is_recent(uid) else ""
            item = f"* {seq} FETCH (UID {uid} FLAGS ({flags}{recent})"
            if condstore:
                item += f" MODSEQ ({modseq})"
            changed.append(item.encode() + b")\r\n")
        if new:
            if rev1:
                # RFC 3501 §2.3.2: new mail is \\Recent to the first session told of it.
                mark = ch.folder.recent_uid
                if sel.read_only:
                    sel.add_recent(shared.unclaimed(sel.folder_id, mark, new))
                else:
                    sel.add_recent(shared.claim_recent(sel.folder_id, mark, new))
            # Copy on write: the array may be shared with other sessions (_shared_uids).
            sel.uids = sel.uids + array("I", new)
            out.append(b"* %d EXISTS\r\n" % len(sel.uids))
            if rev1:
                out.append(b"* %d RECENT\r\n" % sel.recent_count())
        out.extend(changed)
        sel.own.clear()
        sel.known_modseq = max(sel.known_modseq, ch.folder.highestmodseq)
        return b"".join(out)

    def _announce_expunge(self, uids: Sequence[int]) -> bytes:
        """Remove ``uids`` from the view and tell the client (ascending UIDs in)."""
        sel = self.sel
        assert sel is not None
        present = [u for u in uids if sel.seq_of(u)]
        if not present:
            return b""
        if self.conn.session.qresync:
            # RFC 7162 §3.2.10: VANISHED replaces EXPUNGE once QRESYNC is enabled.
            text = b"* VANISHED %s\r\n" % str(SequenceSet.from_numbers(present)).encode()
        else:
            # Highest first: each number is still right when the client reads it.
            text = b"".join(
                b"* %d EXPUNGE\r\n" % sel.seq_of(u) for u in sorted(present, reverse=True)
            )
        gone = set(present)
        sel.uids = array("I", (u for u in sel.uids if u not in gone))
        sel.saved = sel.saved - gone
        return text

    # ---- any state --------------------------------------------------------------------

    async def _noop(self, cmd: c.Noop | c.Check) -> None:
        # RFC 9051 §6.1.2: NOOP is how clients poll; the sync in _done does the work.
        # Mail sealed by another process is drained here too, not only at the next poll.
        if self.shared is not None:
            await self.shared.poll()
        self._done(cmd)

    async def _logout(self, cmd: c.Logout) -> None:
        self.out.write(self.conn.complete(cmd))

    async def _id(self, cmd: c.Id) -> None:
        # RFC 2971 §3.3: no version: it only helps attackers pick exploits.
        self._write(r.id_response([("name", "Mailfort")]))
        self._done(cmd)

    # ---- not authenticated ------------------------------------------------------------

    async def _starttls(self, cmd: c.StartTLS) -> None:
        self.out.write(self.conn.complete(cmd))
        await self.out.start_tls()
        self.conn.tls_started()

    async def _login(self, cmd: c.Login) -> None:
        await self._log_in(cmd, cmd.username, cmd.password)

    async def _authenticate(self, cmd: c.Authenticate) -> None:
        # The core refused mechanisms other than PLAIN.  RFC 4959: with SASL-IR the
        # response came with the command; otherwise ask with an empty challenge.
        if cmd.initial_response is not None:
            await self._sasl_plain(cmd, cmd.initial_response)
        else:
            self.out.write(self.conn.auth_challenge(b""))

    async def _sasl_plain(self, cmd: c.Authenticate, data: bytes) -> None:
        # RFC 4616 §2: [authzid] NUL authcid NUL passwd
        parts = data.split(b"\x00")
        try:
            if len(parts) != 3:
                raise ValueError
            authzid, authcid, passwd = (p.decode("utf-8") for p in parts)
        except ValueError:
            self.out.write(self.conn.complete(cmd, r.Status.BAD, "Invalid PLAIN response"))
            return
        if authzid and authzid != authcid:
            # Acting as another user is not offered (RFC 4616 §2 authorization identity).
            self.out.write(
                self.conn.complete(
                    cmd,
                    r.Status.NO,
                    "Authorization identity refused",
                    r.ResponseCode.simple("AUTHORIZATIONFAILED"),
                )
            )
            return
        await self._log_in(cmd, authcid, passwd)

    async def _log_in(self, cmd: c.Login | c.Authenticate, user: str, secret: str) -> None:
        result = await self.access.login(self.peer_ip, user, secret)
        if result.shared is None:
            if result.refused:
                text, code = "Too many failed logins; try again later", "UNAVAILABLE"
            elif result.unavailable:
                text, code = "Mailbox temporarily unavailable", "UNAVAILABLE"
            else:
                # RFC 9051 §7.1: the same answer for an unknown user and a wrong secret.
                text, code = "Authentication failed", "AUTHENTICATIONFAILED"
            self.out.write(self.conn.complete(cmd, r.Status.NO, text, r.ResponseCode(code)))
            return
        self.shared = result.shared
        result.shared.listen(self)
        self.out.write(self.conn.complete(cmd, text="Logged in"))

    # ---- authenticated ----------------------------------------------------------------

    def _name(self, name: str) -> str:
        """A folder name as stored; refuses names this server cannot hold."""
        if name == INBOX:
            return name
        if name.upper().startswith(INBOX + DELIMITER):
            name = INBOX + name[len(INBOX) :]  # RFC 9051 §5.1: "inbox/x" is INBOX's child
        if (
            not name
            or len(name.encode("utf-8")) > _MAX_NAME
            or name.startswith(DELIMITER)
            or (DELIMITER * 2) in name
            or "*" in name
            or "%" in name
        ):
            raise CommandFailed("Invalid mailbox name", "CANNOT")
        return name

    def _folder(self, name: str, missing_code: str = "NONEXISTENT") -> Folder:
        folder = self.mailbox.find_folder(self._name(name))
        if folder is None:
            raise CommandFailed("No such mailbox", missing_code)
        return folder

    async def _select(self, cmd: c.Select) -> None:
        previous = self.sel
        self.sel = None
        self.conn.session.unselected()
        if previous is not None:
            # RFC 9051 §6.3.2, RFC 7162 §3.2.11: the old mailbox is closed, no expunge.
            self.out.write(b"* OK [CLOSED] Previous mailbox closed\r\n")
        try:
            folder = self._folder(cmd.mailbox)
        except CommandFailed as exc:
            # complete() of a failed SELECT leaves the connection unselected.
            self.out.write(
                self.conn.complete(cmd, r.Status.NO, exc.text, r.ResponseCode(exc.code or ""))
            )
            return
        mbx = self.mailbox
        # The folder row first, then the UIDs: a message arriving in between is then
        # reported again as a flag change (harmless), never missed.
        uids = _shared_uids(mbx.uid_list(folder.id))
        s = self.conn.session
        recent: list[tuple[int, int]] = []
        if not s.imap4rev2:  # RFC 9051 has no \\Recent: a rev2 session claims nothing
            shared = self.shared
            assert shared is not None
            if cmd.read_only:
                # RFC 3501 §6.3.2: EXAMINE must not take \\Recent away from anyone.
                lo = max(folder.recent_uid, shared.recent_marks.get(folder.id, 0))
                if lo < folder.uidnext:
                    recent.append((lo, folder.uidnext))
            else:
                lo, hi = await mbx.claim_recent(folder.id)
                if lo < hi:
                    shared.claimed(folder.id, hi)
                    recent.append((lo, hi))
        sel = Selected(
            folder.id,
            folder.name,
            folder.uidvalidity,
            cmd.read_only,
            uids,
            folder.highestmodseq,
            recent,
        )
        keywords = sorted(mbx.keywords(folder.id))
        flags = [*SYSTEM_FLAGS, *keywords]
        out = [r.flags(flags).to_bytes(), b"* %d EXISTS\r\n" % len(uids)]
        if not s.imap4rev2:
            out.append(b"* %d RECENT\r\n" % sel.recent_count())  # RFC 3501 §7.3.2
            unseen = mbx.first_unseen(folder.id)
            seq = sel.seq_of(unseen) if unseen is not None else 0
            if seq:
                out.append(b"* OK [UNSEEN %d] First unseen\r\n" % seq)  # RFC 3501 §6.3.1
        perm = r.ResponseCode.permanentflags(flags if not cmd.read_only else [])
        if cmd.read_only:
            perm = r.ResponseCode("PERMANENTFLAGS", "()")
        out.append(r.StatusResponse(r.Status.OK, "Flags permitted", perm).to_bytes())
        out.append(b"* OK [UIDVALIDITY %d] UIDs valid\r\n" % folder.uidvalidity)
        out.append(b"* OK [UIDNEXT %d] Predicted next UID\r\n" % folder.uidnext)
        # RFC 7162 §3.1.2.1: sent on every SELECT/EXAMINE by a server with persistent
        # mod-sequences.
        out.append(b"* OK [HIGHESTMODSEQ %d] Highest\r\n" % folder.highestmodseq)
        if s.imap4rev2:
            # RFC 9051 §6.3.2: a LIST response with the mailbox name is required.
            out.append(self.conn.send(r.list_response([], DELIMITER, folder.name)))
        self.out.write(b"".join(out))
        self.sel = sel
        if cmd.qresync is not None and cmd.qresync.uidvalidity == folder.uidvalidity:
            self.out.write(self._qresync(sel, cmd.qresync))
        code = r.ResponseCode.simple("READ-ONLY" if cmd.read_only else "READ-WRITE")
        self._done(cmd, code=code)

    def _qresync(self, sel: Selected, q: c.QResync) -> bytes:
        """RFC 7162 §3.2.5.1: what the client missed since its last MODSEQ."""
        mbx = self.mailbox
        gone = mbx.vanished_since(sel.folder_id, q.modseq)
        if q.known_uids is not None and gone:
            top = max(gone)
            gone = [u for u in gone if q.known_uids.contains(u, top)]
        out: list[bytes] = []
        if gone:
            out.append(
                b"* VANISHED (EARLIER) %s\r\n" % str(SequenceSet.from_numbers(gone)).encode()
            )
        if sel.uids:
            rows = mbx.message_columns(
                sel.folder_id,
                [(sel.uids[0], sel.uids[-1])],
                ("flags", "modseq"),
                changed_since=q.modseq,
            )
            for uid, flags, modseq in rows:
                seq = sel.seq_of(uid)
                if seq:
                    recent = " \\Recent" if sel.is_recent(uid) else ""
                    out.append(
                        f"* {seq} FETCH (UID {uid} FLAGS ({flags}{recent}) MODSEQ ({modseq}))\r\n".encode()
                    )
        return b"".join(out)

    async def _create(self, cmd: c.Create) -> None:
        name = cmd.mailbox
        if name.endswith(DELIMITER):
            # RFC 9051 §6.3.4: a trailing delimiter declares intent to create children.
            name = name.rstrip(DELIMITER)
        name = self._name(name)
        if name == INBOX:
            raise CommandFailed("INBOX exists", "ALREADYEXISTS")
        use = " ".join(cmd.special_use) or None
        try:
            await self.mailbox.create_folder(name, use)
        except FolderExists as exc:
            raise CommandFailed("Mailbox exists", "ALREADYEXISTS") from exc
        self._done(cmd)

    async def _delete(self, cmd: c.Delete) -> None:
        name = self._name(cmd.mailbox)
        try:
            await self.mailbox.delete_folder(name)
        except FolderNotFound as exc:
            raise CommandFailed("No such mailbox", "NONEXISTENT") from exc
        except FolderHasChildren as exc:
            raise CommandFailed("Delete the mailbox's children first", "HASCHILDREN") from exc
        except FolderError as exc:
            raise CommandFailed(str(exc), "CANNOT") from exc
        self._notify_others()
        self._done(cmd)

    async def _rename(self, cmd: c.Rename) -> None:
        old, new = self._name(cmd.mailbox), self._name(cmd.new_name)
        try:
            await self.mailbox.rename_folder(old, new)
        except FolderNotFound as exc:
            raise CommandFailed("No such mailbox", "NONEXISTENT") from exc
        except FolderExists as exc:
            raise CommandFailed("Target mailbox exists", "ALREADYEXISTS") from exc
        except FolderError as exc:
            raise CommandFailed(str(exc), "CANNOT") from exc
        if self.sel is not None:
            f = self.mailbox.folder_by_id(self.sel.folder_id)
            if f is not None:
                self.sel.name = f.name
        self._notify_others()
        self._done(cmd)

    async def _subscribe(self, cmd: c.Subscribe | c.Unsubscribe) -> None:
        try:
            await self.mailbox.set_subscribed(self._name(cmd.mailbox), isinstance(cmd, c.Subscribe))
        except FolderNotFound as exc:
            raise CommandFailed("No such mailbox", "NONEXISTENT") from exc
        self._done(cmd)

    async def _namespace(self, cmd: c.Namespace) -> None:
        # RFC 2342: one personal namespace, no prefix; no other users' or shared folders.
        self._write(r.namespace([("", DELIMITER)]))
        self._done(cmd)

    async def _list(self, cmd: c.List) -> None:
        """RFC 9051 §6.3.9 with LIST-EXTENDED (RFC 5258), SPECIAL-USE (RFC 6154) and
        LIST-STATUS (RFC 5819)."""
        patterns = cmd.patterns
        if patterns == ("",) and not cmd.extended:
            # RFC 9051 §6.3.9: an empty pattern asks for the delimiter and root.
            self._write(r.list_response(["\\Noselect"], DELIMITER, ""))
            self._done(cmd)
            return
        entries = self.mailbox.folder_entries()
        names = {e.folder.name for e in entries}
        matchers = [list_matcher(cmd.reference, p, DELIMITER) for p in patterns if p]
        sel_subscribed = "SUBSCRIBED" in cmd.selection
        sel_special = "SPECIAL-USE" in cmd.selection
        recursive = "RECURSIVEMATCH" in cmd.selection

        def selected(e: FolderEntry) -> bool:
            return (not sel_subscribed or e.subscribed) and (
                not sel_special or bool(e.folder.special_use)
            )

        chosen = {e.folder.name for e in entries if selected(e)}
        out: list[r.Response] = []
        for e in sorted(entries, key=lambda e: (e.folder.name != INBOX, e.folder.name)):
            name = e.folder.name
            if not any(m(name) for m in matchers):
                continue
            extended: list[tuple[str, r.Value]] = []
            if name not in chosen:
                # RFC 5258 §3.5: with RECURSIVEMATCH, a parent of selected folders is
                # listed with CHILDINFO even when it is not selected itself.
                prefix = name + DELIMITER
                if not (recursive and any(n.startswith(prefix) for n in chosen)):
                    continue
                extended.append(("CHILDINFO", ["SUBSCRIBED"] if sel_subscribed else []))
            attrs: list[str] = []
            children = any(n.startswith(name + DELIMITER) for n in names)
            attrs.append("\\HasChildren" if children else "\\HasNoChildren")
            if e.folder.special_use:
                attrs.extend(e.folder.special_use.split())
            if (cmd.returns.subscribed or sel_subscribed) and e.subscribed and name in chosen:
                attrs.append("\\Subscribed")
            out.append(r.list_response(attrs, DELIMITER, name, extended))
            if cmd.returns.status is not None and name in chosen:
                out.append(self._status_response(e.folder, cmd.returns.status))
        self._write(*out)
        self._done(cmd)

    async def _lsub(self, cmd: c.Lsub) -> None:
        match = list_matcher(cmd.reference, cmd.pattern, DELIMITER)
        out = [
            r.lsub_response([], DELIMITER, e.folder.name)
            for e in sorted(
                self.mailbox.folder_entries(),
                key=lambda e: (e.folder.name != INBOX, e.folder.name),
            )
            if e.subscribed and match(e.folder.name)
        ]
        self._write(*out)
        self._done(cmd)

    def _status_response(self, folder: Folder, items: Sequence[str]) -> r.DataResponse:
        """RFC 9051 §6.3.11 (with RFC 8438 SIZE, RFC 7162 HIGHESTMODSEQ)."""
        counts = None
        if {"MESSAGES", "UNSEEN", "DELETED", "SIZE"} & set(items):
            counts = self.mailbox.folder_counts(folder.id, size="SIZE" in items)
        values: list[tuple[str, int | None]] = []
        for item in items:
            if item == "MESSAGES" and counts is not None:
                values.append((item, counts.messages))
            elif item == "UNSEEN" and counts is not None:
                values.append((item, counts.unseen))
            elif item == "DELETED" and counts is not None:
                values.append((item, counts.deleted))
            elif item == "SIZE" and counts is not None:
                values.append((item, counts.size))
            elif item == "UIDNEXT":
                values.append((item, folder.uidnext))
            elif item == "UIDVALIDITY":
                values.append((item, folder.uidvalidity))
            elif item == "HIGHESTMODSEQ":
                values.append((item, folder.highestmodseq))
            elif item == "RECENT":
                # RFC 3501 §6.3.10: messages the next session to select would see \Recent.
                floor = folder.recent_uid
                if self.shared is not None:
                    floor = max(floor, self.shared.recent_marks.get(folder.id, 0))
                values.append((item, self.mailbox.count_from(folder.id, floor)))
            elif item == "APPENDLIMIT":
                values.append((item, self.conn.policy.append_limit))
            # MAILBOXID needs OBJECTID, which is not advertised: left out.
        return r.status(folder.name, values)

    async def _status(self, cmd: c.Status) -> None:
        folder = self._folder(cmd.mailbox)
        self._write(self._status_response(folder, cmd.items))
        self._done(cmd)

    @property
    def _quota(self) -> Quota:
        return Quota(self.access.quota_storage, self.access.quota_messages)

    def _append_request(self, cmd: c.Append) -> tuple[str, list[AppendItem]]:
        name = self._name(cmd.mailbox)
        if self.mailbox.find_folder(name) is None:
            # RFC 9051 §6.3.12: TRYCREATE tells the client that CREATE would help.
            raise CommandFailed("No such mailbox", "TRYCREATE")
        if any(not m.data for m in cmd.messages):
            raise CommandFailed("Empty message")
        now_ms = int(time.time() * 1000)
        items = [
            AppendItem(
                m.data,
                m.flags,
                int(m.internal_date.timestamp() * 1000) if m.internal_date else now_ms,
                _zone_minutes(m.internal_date),
            )
            for m in cmd.messages
        ]
        return name, items

    async def _append(self, cmd: c.Append) -> None:
        try:
            prefiled = self._prefiled.pop(id(cmd), None) if self._prefiled else None
            if prefiled is None:
                name, items = self._append_request(cmd)
                done = await self.mailbox.append(name, items, self._quota)
            elif isinstance(prefiled, Exception):
                raise prefiled
            else:
                done = prefiled
        except FolderNotFound as exc:
            raise CommandFailed("No such mailbox", "TRYCREATE") from exc
        except QuotaExceeded as exc:
            raise CommandFailed("Over quota", "OVERQUOTA") from exc  # RFC 9208 §4.3
        self._notify_others()
        # RFC 4315 §3: APPENDUID uidvalidity uid-set.
        code = r.ResponseCode.appenduid(done.uidvalidity, SequenceSet.from_numbers(done.uids))
        self._done(cmd, code=code)

    async def _idle(self, cmd: c.Idle) -> None:
        # RFC 9051 §6.3.13: report what is pending, then the continuation; updates follow
        # as they happen until DONE.
        if self.sel is not None:
            self.out.write(self.sync(expunge_ok=True))
        self.out.write(self.conn.continuation("idling"))
        self.idling = cmd

    def _idle_ended(self, event: IdleEnded) -> None:
        self.idling = None
        if event.ok:
            self._done(event.command)
        else:
            self.out.write(self.conn.complete(event.command, r.Status.BAD, "Expected DONE"))

    async def _getquota(self, cmd: c.GetQuota | c.GetQuotaRoot) -> None:
        """RFC 9208: one quota root, "", over the whole account."""
        a = self.access
        limited = a.quota_storage is not None or a.quota_messages is not None
        if isinstance(cmd, c.GetQuotaRoot):
            folder = self._folder(cmd.mailbox)
            # RFC 9208 §5.2: no root at all when no limit applies.
            self._write(r.quotaroot(folder.name, [""] if limited else []))
            if not limited:
                self._done(cmd)
                return
        elif cmd.root != "" or not limited:
            raise CommandFailed("No such quota root", "NONEXISTENT")
        used, count = self.mailbox.usage()
        resources: list[tuple[str, int, int]] = []
        if a.quota_storage is not None:
            # RFC 9208 §5.1: STORAGE in units of 1024 octets.
            resources.append(("STORAGE", (used + 1023) // 1024, a.quota_storage // 1024))
        if a.quota_messages is not None:
            resources.append(("MESSAGE", count, a.quota_messages))
        self._write(r.quota("", resources))
        self._done(cmd)

    async def _setquota(self, cmd: c.SetQuota) -> None:
        raise CommandFailed("Quotas are set by the administrator", "NOPERM")

    async def _compress(self, cmd: c.Compress) -> None:
        # RFC 4978 §3: the OK goes out uncompressed; everything after it is compressed.
        self.out.write(self.conn.complete(cmd))
        self.out.start_compression(self.conn.take_compressed_tail())

    # ---- selected ---------------------------------------------------------------------

    def _selected(self) -> Selected:
        if self.sel is None:
            raise CommandFailed("No mailbox selected", bad=True)
        return self.sel

    def _writable(self) -> Selected:
        sel = self._selected()
        if sel.read_only:
            raise CommandFailed("Mailbox is read-only", "READ-ONLY")
        return sel

    def _index_ranges(self, messages: SequenceSet, uid: bool) -> list[tuple[int, int]]:
        """The messages a set names, as half-open ranges of positions in the view
        (position + 1 is the sequence number), ascending (RFC 9051 §9 sequence-set)."""
        sel = self._selected()
        view = sel.uids
        if messages.saved:
            # RFC 5182 §2.1: "$" is the UIDs of the last SEARCH ... RETURN (SAVE).
            positions = [s - 1 for u in sorted(sel.saved) if (s := sel.seq_of(u))]
            return _runs(positions)
        if uid:
            if not view:
                return []
            out: list[tuple[int, int]] = []
            for a, b in messages.ranges_for(view[-1]):
                lo = bisect.bisect_left(view, a)
                hi = bisect.bisect_right(view, b)
                if lo < hi:
                    out.append((lo, hi))
            return out
        if messages.largest_explicit() > len(view):
            # RFC 9051 §9: a sequence number must exist ("*" is the last one).
            raise CommandFailed("Invalid message sequence number", bad=True)
        return [(a - 1, b) for a, b in messages.ranges_for(len(view))]

    def _resolve(self, messages: SequenceSet, uid: bool) -> list[tuple[int, int]]:
        """(seq, uid) of the messages a set names, ascending."""
        view = self._selected().uids
        return [
            (i + 1, view[i]) for lo, hi in self._index_ranges(messages, uid) for i in range(lo, hi)
        ]

    def _rows(
        self,
        ranges: Sequence[tuple[int, int]],
        columns: Sequence[str],
        *,
        changed_since: int | None = None,
    ) -> tuple[list[int], list[tuple[Any, ...]]]:
        """(sequence numbers, store rows) of the messages at view positions ``ranges``.

        A run of positions is one UID range query; when every message of the run is
        still in the store (the usual case), the sequence numbers are the run itself and
        no per-message lookup is needed.
        """
        sel = self._selected()
        view = sel.uids
        mbx = self.mailbox
        seqs: list[int] = []
        rows: list[tuple[Any, ...]] = []
        if len(ranges) > _MAX_RANGES:
            # Scattered numbers (a client's list of UIDs): one scan, then a filter.
            wanted = {view[i]: i + 1 for lo, hi in ranges for i in range(lo, hi)}
            span = [(view[ranges[0][0]], view[ranges[-1][1] - 1])]
            for row in mbx.message_columns(
                sel.folder_id, span, columns, changed_since=changed_since
            ):
                seq = wanted.get(row[0])
                if seq is not None:
                    seqs.append(seq)
                    rows.append(row)
            return seqs, rows
        for lo, hi in ranges:
            got = mbx.message_columns(
                sel.folder_id, [(view[lo], view[hi - 1])], columns, changed_since=changed_since
            )
            if len(got) == hi - lo:
                seqs.extend(range(lo + 1, hi + 1))
            else:  # some expunged by another session, or filtered by CHANGEDSINCE
                seqs.extend(sel.seq_of(r[0]) for r in got)
            rows.extend(got)
        return seqs, rows

    async def _close(self, cmd: c.Close | c.Unselect) -> None:
        sel = self._selected()
        if isinstance(cmd, c.Close) and not sel.read_only:
            # RFC 9051 §6.4.1: CLOSE expunges silently.
            gone = await self.mailbox.expunge_messages(sel.folder_id, list(sel.uids))
            if gone:
                self._notify_others()
        self.sel = None
        self.out.write(self.conn.complete(cmd))

    async def _expunge(self, cmd: c.Expunge | c.UidExpunge) -> None:
        sel = self._writable()
        if isinstance(cmd, c.UidExpunge):
            # RFC 4315 §2.1: only the named messages, and only if \Deleted.
            uids: list[int] | None = [u for _, u in self._resolve(cmd.uids, True)]
        else:
            uids = None
        gone = await self.mailbox.expunge_messages(sel.folder_id, uids)
        if gone:
            sel.pending_expunge.update(u for u in gone if sel.seq_of(u))
            self._notify_others()
        self._done(cmd)

    async def _store(self, cmd: c.Store) -> None:
        sel = self._writable()
        targets = self._resolve(cmd.messages, cmd.uid)
        if not targets:
            self._done(cmd, expunge_ok=cmd.uid)
            return
        update = await self.mailbox.store_flags(
            sel.folder_id,
            [u for _, u in targets],
            cmd.mode,
            cmd.flags,
            unchanged_since=cmd.unchanged_since,
        )
        condstore = self.conn.session.condstore
        seq_of = dict((u, s) for s, u in targets)
        lines: list[bytes] = []
        for uid, flags, modseq in update.rows:
            if uid in update.changed:
                sel.own[uid] = modseq
            parts: list[str] = []
            if not cmd.silent:
                recent = " \\Recent" if sel.is_recent(uid) else ""
                parts.append(f"FLAGS ({flags}{recent})")
            elif not (condstore and uid in update.changed):
                continue
            if cmd.uid:
                parts.append(f"UID {uid}")
            if condstore:
                # RFC 7162 §3.1.3: MODSEQ in the FETCH, even with .SILENT.
                parts.append(f"MODSEQ ({modseq})")
            lines.append(f"* {seq_of[uid]} FETCH ({' '.join(parts)})\r\n".encode())
        self.out.write(b"".join(lines))
        code = None
        if update.conflicts:
            # RFC 7162 §3.1.3: MODIFIED lists what UNCHANGEDSINCE kept from changing.
            numbers = update.conflicts if cmd.uid else [seq_of[u] for u in update.conflicts]
            code = r.ResponseCode.modified(SequenceSet.from_numbers(numbers))
        if update.changed:
            self._notify_others()
        self._done(cmd, code=code, expunge_ok=cmd.uid)

    async def _copy(self, cmd: c.Copy | c.Move) -> None:
        move = isinstance(cmd, c.Move)
        sel = self._writable() if move else self._selected()
        targets = self._resolve(cmd.messages, cmd.uid)
        dest = self._name(cmd.mailbox)
        if self.mailbox.find_folder(dest) is None:
            raise CommandFailed("No such mailbox", "TRYCREATE")
        if not targets:
            self._done(cmd)
            return
        uids = [u for _, u in targets]
        try:
            result = await self.mailbox.copy_messages(
                sel.folder_id, uids, dest, move=move, quota=self._quota
            )
        except FolderNotFound as exc:
            raise CommandFailed("No such mailbox", "TRYCREATE") from exc
        except QuotaExceeded as exc:
            raise CommandFailed("Over quota", "OVERQUOTA") from exc  # RFC 9208 §4.3
        code = None
        if result.source:
            code = r.ResponseCode.copyuid(
                result.uidvalidity,
                SequenceSet.from_numbers(result.source),
                SequenceSet.from_numbers(result.dest),
            )
            self._notify_others()
        if move:
            # RFC 6851 §4.3: COPYUID in an untagged OK before the expunges.
            if code is not None:
                self.out.write(r.StatusResponse(r.Status.OK, "Moved", code).to_bytes())
            self.out.write(self._announce_expunge(result.source))
            self._done(cmd)
        else:
            self._done(cmd, code=code)

    async def _search(self, cmd: c.Search) -> None:
        sel = self._selected()
        plan = SearchPlan(self.mailbox, sel, cmd.criteria)
        messages = plan.messages()
        ctx = SearchContext(
            max_seq=len(sel.uids),
            max_uid=sel.uids[-1] if sel.uids else 0,
            saved_uids=sel.saved,
        )
        outcome = run_search(cmd, messages, ctx, esearch_default=self.conn.session.imap4rev2)
        if outcome.saved_uids is not None:
            sel.saved = outcome.saved_uids
        self._write(*outcome.responses)
        self._done(cmd, expunge_ok=cmd.uid)

    async def _fetch(self, cmd: c.Fetch) -> None:
        sel = self._selected()
        ranges = self._index_ranges(cmd.messages, cmd.uid)
        plan = FetchPlan.of(cmd.attributes)
        mbx = self.mailbox
        if cmd.vanished and cmd.changed_since is not None:
            # RFC 7162 §3.2.6: expunged messages of the set, first.
            gone = mbx.vanished_since(sel.folder_id, cmd.changed_since)
            if gone and not cmd.messages.saved:
                top = max(max(gone), sel.uids[-1] if sel.uids else 0)
                gone = [u for u in gone if cmd.messages.contains(u, top)]
            if gone:
                self.out.write(
                    b"* VANISHED (EARLIER) %s\r\n" % str(SequenceSet.from_numbers(gone)).encode()
                )
        if not ranges:
            self._done(cmd, expunge_ok=cmd.uid)
            return
        seen_now: dict[int, tuple[str, int]] = {}
        if plan.sets_seen and not sel.read_only:
            # RFC 9051 §6.4.5: BODY[...] sets \Seen; do it in one write before answering,
            # so the FLAGS sent are the new ones.
            _, flag_rows = self._rows(ranges, ("flags",))
            unseen = [u for u, flags in flag_rows if "\\Seen" not in flags.split()]
            if unseen:
                update = await mbx.store_flags(sel.folder_id, unseen, "+", ["\\Seen"])
                for uid, flags, modseq in update.rows:
                    if uid in update.changed:
                        seen_now[uid] = (flags, modseq)
                        sel.own[uid] = modseq
                self._notify_others()
        seqs, rows = self._rows(ranges, plan.columns, changed_since=cmd.changed_since)
        source = MessageSource(mbx)
        # Rows below the first \Recent UID render without a per-row check.
        recent_from = sel.recent_floor()
        is_recent = sel.is_recent
        fmt, render_lines = plan.fmt, plan.lines
        for start in range(0, len(rows), _ROWS_PER_WRITE):
            end = start + _ROWS_PER_WRITE
            chunk = zip(seqs[start:end], rows[start:end], strict=True)
            if fmt is not None and render_lines is not None:
                # Simple items: one format operation per message (10,000 FLAGS in ms).
                if not plan.has_flags or rows[min(end, len(rows)) - 1][0] < recent_from:
                    lines = render_lines(fmt, chunk)
                else:
                    # \Recent goes into the flags column, so the format still does the rest.
                    fx = plan.index["flags_wire"]
                    lines = render_lines(
                        fmt,
                        ((seq, _with_recent(r, fx) if is_recent(r[0]) else r) for seq, r in chunk),
                    )
            else:
                lines = []
                size = 0
                for seq, row in chunk:
                    uid = row[0]
                    try:
                        line = render_fetch(
                            plan,
                            seq,
                            row,
                            source,
                            recent=is_recent(uid),
                            seen_now=seen_now.get(uid),
                        )
                    except UnknownCTEError as exc:
                        self.out.write(b"".join(lines))
                        # UNKNOWN-CTE or PARSE (RFC 3516 §4.2), as the decoder found it.
                        raise CommandFailed(exc.text, exc.code) from exc
                    lines.append(line)
                    size += len(line)
                    if size > _FLUSH_AT:
                        self.out.write(b"".join(lines))
                        lines.clear()
                        size = 0
                        await self.out.drain()
            self.out.write(b"".join(lines))
            await self.out.drain()
        self._done(cmd, expunge_ok=cmd.uid)


def _with_recent(row: tuple[Any, ...], flags_at: int) -> tuple[Any, ...]:
    flags = bytes(row[flags_at])
    flags = flags + b" \\Recent" if flags else b"\\Recent"
    return (*row[:flags_at], flags, *row[flags_at + 1 :])


def _zone_minutes(when: dt.datetime | None) -> int:
    """The zone of an APPEND date-time in minutes east of UTC (RFC 9051 §9 zone)."""
    offset = when.utcoffset() if when is not None else None
    return int(offset.total_seconds() // 60) if offset is not None else 0


def _runs(positions: Sequence[int]) -> list[tuple[int, int]]:
    """Half-open ranges covering ascending ``positions``."""
    out: list[tuple[int, int]] = []
    for p in positions:
        if out and out[-1][1] == p:
            out[-1] = (out[-1][0], p + 1)
        else:
            out.append((p, p + 1))
    return out
