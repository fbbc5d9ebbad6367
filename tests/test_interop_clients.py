"""Real mail clients against `mailfort dev`: each syncs or fetches a few hundred varied
messages completely and correctly, checked by content, and changes go both ways.

One server for the module; every client has its own account (its own mailbox), so the
clients' first full syncs run in parallel. Clients verify the server certificate against
`DIR/tls/cert.pem`. Set MAILFORT_INTEROP_TARGET=dovecot to run the same tests against a
private Dovecot, the reference these tests were validated on.
"""

from __future__ import annotations

import contextlib
import imaplib
import os
import poplib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from interop import corpus
from interop.clients import (
    Client,
    ClientFailed,
    Fetchmail,
    FetchmailImap,
    Getmail,
    GetmailImap,
    Mbsync,
    Neomutt,
    OfflineImap,
    bad_header_line,
    expected_forms,
    find_by_message_id,
    maildir_flags,
    move_local,
    no_empty_line,
    set_local_flags,
)
from interop.dovecot import dovecot_binary
from interop.servers import (
    Account,
    Entry,
    ListenerMissing,
    Target,
    fetch_messages,
    imap_login,
    mailbox_index,
    running_dovecot_target,
    running_mailfort,
    tls_context,
)

from conftest import require_tool

# One server process and its clients for the whole module: keep them on one xdist worker
# (honoured with --dist loadgroup).
pytestmark = pytest.mark.xdist_group("interop-clients")

ACCOUNTS = (
    "mbsync",
    "offlineimap",
    "fetchmail-pop",
    "fetchmail-imap",
    "getmail-pop",
    "getmail-imap",
    "neomutt",
    "pyclients",
)
# The tool each client test needs (Debian package in scripts/debian-test-packages.txt).
TOOLS = {
    "mbsync": "mbsync",
    "offlineimap": "offlineimap",
    "fetchmail-pop": "fetchmail",
    "fetchmail-imap": "fetchmail",
    "getmail-pop": "getmail",
    "getmail-imap": "getmail",
    "neomutt": "neomutt",
}
# A message neomutt shows: an RFC 2047 UTF-8 subject and a quoted-printable Cyrillic body.
NEOMUTT_MESSAGE = "flanker/bilingual-simple.eml"


@dataclass
class World:
    target: Target
    accounts: dict[str, Account]
    messages: list[corpus.Message]
    root: Path
    _forms: dict[str, list[corpus.Expected]] = field(default_factory=dict)

    def client_dir(self, name: str) -> Path:
        return self.root / "clients" / name

    def forms(self, tool: str) -> list[corpus.Expected]:
        """What `tool` (offlineimap, getmail) writes for each message, computed once."""
        if tool not in self._forms:
            want, unwritable = expected_forms(tool, tool, self.messages, self.root)
            assert not unwritable, f"{tool} cannot write {unwritable}"
            self._forms[tool] = want
        return self._forms[tool]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    kind = os.environ.get("MAILFORT_INTEROP_TARGET", "mailfort")
    messages = corpus.load()
    assert len(messages) >= 200, "the shared MIME corpora are missing"
    # Not under pytest's 0700 basetemp: getmail delivers (and Dovecot reads mail) as
    # `nobody` when the tests run as root, and both must reach their directories.
    with tempfile.TemporaryDirectory(prefix="mailfort-interop-") as tmp:
        root = Path(tmp)
        root.chmod(0o711)
        context: contextlib.AbstractContextManager[Target]
        if kind == "dovecot":
            if dovecot_binary() is None:
                require_tool("dovecot")
            context = running_dovecot_target(root / "dovecot")
        else:
            need = ("imap", "imaps", "pop3", "pop3s")
            context = running_mailfort(root / "mailfort", need=need)
        try:
            with context as target:
                accounts = {name: target.add_account(name) for name in ACCOUNTS}
                target.fill(list(accounts.values()), messages)
                yield World(target, accounts, messages, root)
        except ListenerMissing as exc:
            pytest.skip(str(exc))


CLIENTS: dict[str, type[Client]] = {
    "mbsync": Mbsync,
    "offlineimap": OfflineImap,
    "fetchmail-pop": Fetchmail,
    "fetchmail-imap": FetchmailImap,
    "getmail-pop": Getmail,
    "getmail-imap": GetmailImap,
}


def _first_sync(world: World, name: str) -> Client:
    client = CLIENTS[name](world.target, world.accounts[name], world.client_dir(name))
    client.configure()
    client.first_run()
    return client


Syncs = dict[str, Future[Client]]


@pytest.fixture(scope="module")
def first_syncs(world: World) -> Iterator[Syncs]:
    """Every installed client's first full sync, started at once (separate accounts)."""
    with ThreadPoolExecutor(max_workers=len(CLIENTS)) as pool:
        yield {
            name: pool.submit(_first_sync, world, name)
            for name in CLIENTS
            if shutil.which(TOOLS[name])
        }


def synced(first_syncs: Syncs, name: str, world: World) -> Client:
    require_tool(TOOLS[name])
    try:
        return first_syncs[name].result(timeout=300)
    except ClientFailed as exc:
        pytest.fail(
            f"{name} against {world.target.name} failed:\n{exc}\n\n{world.target.diagnostics()}"
        )


def explain(world: World, client: Client, problems: list[str]) -> str:
    runs = "\n\n".join(r.describe() for r in client.runs[-2:])
    return (
        f"{len(problems)} problems with {type(client).__name__}'s copy "
        f"against {world.target.name}:\n" + "\n".join(problems) + f"\n\nclient runs:\n{runs}"
    )


def pick(world: World, n: int, skip: Callable[[corpus.Message], bool]) -> list[corpus.Message]:
    """n plain messages a client can take, each findable by a Message-ID of its own."""
    unique = corpus.unique_ids(world.messages)
    chosen = [
        m
        for m in world.messages
        if m.message_id in unique
        and not skip(m)
        and m.message_id is not None
        and m.message_id.isascii()
        and b"\0" not in m.raw
        and len(m.raw) < 50_000
    ]
    assert len(chosen) >= n
    return chosen[:n]


def by_id(entries: list[Entry], message_id: str | None) -> list[Entry]:
    return [e for e in entries if e.message_id == message_id]


def two_way_checks(
    world: World,
    client: Mbsync | OfflineImap,
    skip: Callable[[corpus.Message], bool],
    markers: tuple[str, ...],
) -> None:
    """Flag one message and move another locally, change a flag on the server, sync once:
    the server must show the local changes and the local copy the server's."""
    flagged, moved, remote = pick(world, 3, skip)
    inbox = client.mail / "INBOX"
    [path] = find_by_message_id(inbox, flagged.message_id or "")
    set_local_flags(path, "F")
    [path] = find_by_message_id(inbox, moved.message_id or "")
    move_local(path, client.mail / "Archive", markers)

    account = client.account
    conn = imap_login(world.target, account)
    try:
        [entry] = by_id(mailbox_index(conn, "INBOX"), remote.message_id)
        conn.select("INBOX")
        typ, data = conn.uid("STORE", str(entry.uid), "+FLAGS", r"(\Answered \Seen)")
        assert typ == "OK", data
        conn.close()

        client.sync()

        after = mailbox_index(conn, "INBOX")
        archive = mailbox_index(conn, "Archive")
    finally:
        conn.logout()
    context = explain(world, client, [])
    found = by_id(after, flagged.message_id)
    assert len(found) == 1 and "\\Flagged" in found[0].flags, (
        f"local flag not pushed: {found}\n{context}"
    )
    assert not by_id(after, moved.message_id), f"moved message still in INBOX\n{context}"
    assert len(by_id(archive, moved.message_id)) == 1, f"moved message not in Archive\n{context}"
    [path] = find_by_message_id(inbox, remote.message_id or "")
    assert set("RS") <= set(maildir_flags(path.name)), (
        f"server flags not pulled: {path.name}\n{context}"
    )
    # Everything else is still there exactly once, and nothing was lost in the move.
    ids = [e.message_id for e in after]
    assert len(after) == len(world.messages) - 1, context
    assert ids.count(flagged.message_id) == 1 and ids.count(remote.message_id) == 1


# ---- the tests ----------------------------------------------------------------------------


def test_mbsync_full_sync_and_changes_both_ways(world: World, first_syncs: Syncs) -> None:
    client = synced(first_syncs, "mbsync", world)
    assert isinstance(client, Mbsync)
    want = corpus.expected(world.messages, skip=no_empty_line)
    copies = corpus.maildir_files(client.mail / "INBOX")
    # mbsync adds X-TUID at the end of the header to find its own uploads again.
    problems = corpus.check_copies(copies, want, added=("X-TUID",))
    assert not problems, explain(world, client, problems)
    two_way_checks(world, client, no_empty_line, ("U",))


def test_offlineimap_full_sync_and_changes_both_ways(world: World, first_syncs: Syncs) -> None:
    client = synced(first_syncs, "offlineimap", world)
    assert isinstance(client, OfflineImap)
    # offlineimap3 writes what Python's email generator makes of each message.
    want = world.forms("offlineimap")
    copies = corpus.maildir_files(client.mail / "INBOX")
    problems = corpus.check_copies(copies, want)
    assert not problems, explain(world, client, problems)
    two_way_checks(world, client, lambda m: False, ("U", "FMD5"))


@pytest.mark.parametrize("name", ["fetchmail-pop", "fetchmail-imap"])
def test_fetchmail_delivers_every_message_to_the_mda(
    world: World,
    first_syncs: Syncs,
    name: str,
) -> None:
    client = synced(first_syncs, name, world)
    assert isinstance(client, Fetchmail)
    want = corpus.expected(world.messages, skip=bad_header_line)
    problems = corpus.check_copies(client.copies(), want)
    assert not problems, explain(world, client, problems)
    conn = imap_login(world.target, client.account)
    try:
        entries = mailbox_index(conn, "INBOX")
    finally:
        conn.logout()
    # `keep`: nothing deleted; over IMAP fetchmail marks what it delivered \Seen.
    assert len(entries) == len(world.messages)
    if isinstance(client, FetchmailImap):
        # The plain port, upgraded: sslproto without ssl makes fetchmail insist on STARTTLS.
        assert "upgrade to TLS succeeded" in client.runs[0].output, client.runs[0].describe()
        unseen = [e.uid for e in entries if "\\Seen" not in e.flags]
        assert len(unseen) == len(world.messages) - len(want), unseen


@pytest.mark.parametrize("name", ["getmail-pop", "getmail-imap"])
def test_getmail_retrieves_every_message_to_a_maildir(
    world: World,
    first_syncs: Syncs,
    name: str,
) -> None:
    client = synced(first_syncs, name, world)
    assert isinstance(client, Getmail)
    # getmail re-generates each message with Python's email package and puts a
    # Return-Path (from the message, or <unknown>) on top.
    want = world.forms("getmail")
    problems = corpus.check_copies(corpus.maildir_files(client.mail), want)
    assert not problems, explain(world, client, problems)


def test_neomutt_opens_the_inbox_and_shows_a_message(world: World) -> None:
    require_tool("neomutt")
    require_tool("tmux")
    [message] = [m for m in world.messages if m.name == NEOMUTT_MESSAGE]
    account = world.accounts["neomutt"]
    conn = imap_login(world.target, account)
    try:
        [entry] = by_id(mailbox_index(conn, "INBOX"), message.message_id)
    finally:
        conn.logout()
    client = Neomutt(world.target, account, world.client_dir("neomutt"))
    client.configure()
    client.start()
    try:
        # The index lists the whole mailbox: the message count shows in the status line.
        client.wait_for(rf"Msgs:{len(world.messages)}\b")
        client.keys(str(entry.seq), "Enter")  # jump to the message number
        client.keys("Enter")  # and open it in the pager
        screen = client.wait_for("Subject: Simple text")
        assert "Subject: Simple text. How are you? Как ты поживаешь?" in screen, screen
        assert "This line is in English" in screen, screen
        assert "А эта линия по-русски." in screen, screen
        assert "From: Hello <hello@example.com>" in screen, screen
    finally:
        client.stop()


def test_imaplib_and_poplib_fetch_every_message_byte_for_byte(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # poplib refuses lines over 2,048 bytes; the corpus has longer ones (RFC 5322 allows 998
    # characters, real mail exceeds it) and the server must pass them through.
    monkeypatch.setattr(poplib, "_MAXLINE", 1 << 20)
    account = world.accounts["pyclients"]
    want = corpus.expected(world.messages)
    conn = imap_login(world.target, account)
    try:
        imap_copies = fetch_messages(conn, "INBOX")
    finally:
        conn.logout()
    problems = corpus.check_copies(imap_copies, want)
    assert not problems, "IMAP BODY.PEEK[]:\n" + "\n".join(problems)

    pop = poplib.POP3_SSL(
        "localhost", world.target.ports["pop3s"], context=tls_context(world.target.cafile)
    )
    try:
        pop.user(account.user)
        pop.pass_(account.password)
        count, _size = pop.stat()
        pop_copies = {}
        for i in range(1, count + 1):
            _resp, lines, _octets = pop.retr(i)
            # poplib has already undone the dot-stuffing and split the CRLFs.
            pop_copies[f"msg {i}"] = b"\r\n".join(lines)
    finally:
        pop.quit()
    problems = corpus.check_copies(pop_copies, want)
    assert not problems, "POP3 RETR:\n" + "\n".join(problems)


def test_imap_login_needs_tls(world: World) -> None:
    """No authentication before TLS (RFC 9051 §6.2.3 LOGINDISABLED) on the plain port."""
    if world.target.name == "dovecot":
        pytest.skip("Dovecot counts loopback connections as secure and allows LOGIN there")
    conn = imaplib.IMAP4("localhost", world.target.ports["imap"], timeout=30)
    try:
        assert "LOGINDISABLED" in conn.capabilities
        assert "STARTTLS" in conn.capabilities
    finally:
        conn.shutdown()
