"""The servers the client tests run against: `mailfort dev`, or a private Dovecot.

Both offer the same face (:class:`Target`): loopback ports for IMAP/IMAPS/POP3/POP3S, a CA
file that verifies the server certificate for the name "localhost", accounts, and a way to
fill a mailbox.  Mail reaches mailfort through its delivery agent (`mailfort deliver`), as it
does in production; Dovecot gets the same bytes by IMAP APPEND.
"""

from __future__ import annotations

import contextlib
import imaplib
import json
import os
import re
import secrets
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from interop import corpus
from interop.corpus import Message
from interop.dovecot import Dovecot, running_dovecot

HOST = "localhost"  # the name every client checks the certificate against
DOMAIN = "example.test"  # `mailfort dev` creates it


class ListenerMissing(Exception):
    """`mailfort dev` came up without the listeners a test needs."""


@dataclass(frozen=True)
class Account:
    user: str
    password: str  # what a client logs in with: an app password on mailfort


class Target(Protocol):
    name: str

    @property
    def ports(self) -> dict[str, int]: ...

    @property
    def cafile(self) -> Path: ...

    def add_account(self, local: str) -> Account: ...

    def fill(self, accounts: Sequence[Account], messages: Sequence[Message]) -> None: ...

    def diagnostics(self) -> str: ...


def tls_context(cafile: Path) -> ssl.SSLContext:
    """Full verification (chain and host name) against the server's own certificate."""
    return ssl.create_default_context(cafile=str(cafile))


def imap_login(target: Target, account: Account) -> imaplib.IMAP4_SSL:
    conn = imaplib.IMAP4_SSL(
        HOST, target.ports["imaps"], ssl_context=tls_context(target.cafile), timeout=60
    )
    conn.login(account.user, account.password)
    return conn


def append_all(target: Target, account: Account, mailbox: str, messages: Sequence[Message]) -> None:
    conn = imap_login(target, account)
    try:
        for m in messages:
            typ, data = conn.append(mailbox, None, None, m.raw)
            if typ != "OK":
                raise AssertionError(f"APPEND {m.name} to {target.name}: {typ} {data!r}")
    finally:
        conn.logout()


# ---- mailfort -----------------------------------------------------------------------------


def mailfort_cli(data_dir: Path) -> list[str]:
    return [sys.executable, "-m", "mailfort.cli", "--data-dir", str(data_dir)]


@dataclass
class MailfortDev:
    data_dir: Path
    proc: subprocess.Popen[bytes]
    ports: dict[str, int] = field(default_factory=dict)
    name: str = "mailfort"

    @property
    def cafile(self) -> Path:
        return self.data_dir / "tls" / "cert.pem"

    @property
    def log_path(self) -> Path:
        return self.data_dir.with_name(self.data_dir.name + ".log")

    def cli(self, *args: str, stdin: str | bytes | None = None) -> str:
        data = stdin.encode() if isinstance(stdin, str) else stdin
        proc = subprocess.run(
            [*mailfort_cli(self.data_dir), *args],
            input=data,
            capture_output=True,
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"mailfort {' '.join(args)}: exit {proc.returncode}: {proc.stderr.decode()}"
            )
        return proc.stdout.decode()

    def add_account(self, local: str) -> Account:
        address = f"{local}@{DOMAIN}"
        # Random: the password policy refuses one that contains the account name.
        password = "interop " + secrets.token_urlsafe(18)
        self.cli("user", "add", address, "--password-stdin", stdin=password + "\n")
        # Mail clients log in with app passwords, the fast path the design intends for them.
        app = self.cli(
            "app-password", "add", address, "--label", "interop", stdin=password + "\n"
        ).strip()
        return Account(address, app)

    def fill(self, accounts: Sequence[Account], messages: Sequence[Message]) -> None:
        """Deliver every message to every account with `mailfort deliver`.

        One delivery to an alias files a copy in each of its accounts, so the cost of
        starting the agent (~0.3 s, mostly imports) is paid per message, not per account.
        Two agents run at once, each for its own half of the accounts: concurrent agents
        writing the same spool have failed with BusyError (exit 75) after filing the
        message for some of an alias's targets, so a retry would duplicate it there.
        """
        workers = max(1, min(os.cpu_count() or 1, len(accounts)))
        groups = [list(accounts[i::workers]) for i in range(workers)]
        tag = f"{os.getpid()}-{time.monotonic_ns()}"
        aliases = [f"fill-{tag}-{i}@{DOMAIN}" for i in range(workers)]
        for alias, group in zip(aliases, groups, strict=True):
            self.cli("alias", "add", alias, *(a.user for a in group))

        def deliver_all(alias: str) -> list[str]:
            errors = []
            for m in messages:
                proc = subprocess.run(
                    [*mailfort_cli(self.data_dir), "deliver", "--to", alias],
                    input=m.raw,
                    capture_output=True,
                    timeout=120,
                    check=False,
                )
                if proc.returncode != 0:
                    errors.append(
                        f"{m.name} to {alias}: exit {proc.returncode}: "
                        + proc.stderr.decode().strip()
                    )
            return errors

        with ThreadPoolExecutor(max_workers=workers) as pool:
            errors = [e for errs in pool.map(deliver_all, aliases) for e in errs]
        for alias in aliases:
            self.cli("alias", "remove", alias)
        if errors:
            raise AssertionError("mailfort deliver failed:\n" + "\n".join(errors))

    def diagnostics(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no mailfort log)"
        return "mailfort dev log (tail):\n" + "\n".join(lines[-60:])


@contextlib.contextmanager
def running_mailfort(data_dir: Path, need: Sequence[str] = ()) -> Iterator[MailfortDev]:
    """`mailfort --data-dir DIR dev`, stopped (SIGTERM) on exit."""
    data_dir.mkdir(parents=True, exist_ok=True)
    info = data_dir / "dev.json"
    info.unlink(missing_ok=True)
    log = open(data_dir.with_name(data_dir.name + ".log"), "wb")  # noqa: SIM115 - kept while it runs
    proc = subprocess.Popen(
        [*mailfort_cli(data_dir), "dev"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = MailfortDev(data_dir, proc)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mailfort dev exited {proc.returncode}\n{server.diagnostics()}")
            if info.exists():
                with contextlib.suppress(ValueError):
                    server.ports = {
                        k: int(v) for k, v in json.loads(info.read_text())["ports"].items()
                    }
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"mailfort dev did not start\n{server.diagnostics()}")
            time.sleep(0.1)
        missing = [n for n in need if n not in server.ports]
        if missing:
            raise ListenerMissing(
                f"mailfort dev has no {', '.join(missing)} listener yet (ports: {server.ports})"
            )
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        log.close()


# ---- Dovecot ------------------------------------------------------------------------------


@dataclass
class DovecotTarget:
    server: Dovecot
    name: str = "dovecot"

    @property
    def ports(self) -> dict[str, int]:
        return self.server.ports

    @property
    def cafile(self) -> Path:
        return self.server.cert

    def add_account(self, local: str) -> Account:
        account = Account(f"{local}@{DOMAIN}", f"interop passphrase for {local}")
        self.server.add_user(account.user, account.password)
        return account

    def fill(self, accounts: Sequence[Account], messages: Sequence[Message]) -> None:
        with ThreadPoolExecutor(max_workers=len(accounts) or 1) as pool:
            list(pool.map(lambda a: append_all(self, a, "INBOX", messages), accounts))

    def diagnostics(self) -> str:
        return "dovecot log (tail):\n" + self.server.log_tail(60)


@contextlib.contextmanager
def running_dovecot_target(
    root: Path | None = None, max_connections: int = 200
) -> Iterator[DovecotTarget]:
    with running_dovecot(root, max_connections) as d:
        yield DovecotTarget(d)


# ---- reading a mailbox back with imaplib, to check what a client did ---------------------


@dataclass(frozen=True)
class Entry:
    seq: int
    uid: int
    flags: frozenset[str]
    message_id: str | None


_UID = re.compile(rb"\bUID (\d+)")
_FLAGS = re.compile(rb"\bFLAGS \(([^)]*)\)")


def _records(data: list[Any]) -> list[tuple[bytes, bytes]]:
    """imaplib's FETCH answer as (response text without literals, first literal) pairs."""
    out: list[tuple[bytes, bytes]] = []
    for item in data:
        if isinstance(item, tuple):
            out.append((item[0], item[1]))
        elif isinstance(item, bytes) and out and item != b")":
            # Items after the literal (e.g. " FLAGS (...))") belong to the same response.
            out[-1] = (out[-1][0] + item, out[-1][1])
        elif isinstance(item, bytes) and item != b")":
            out.append((item, b""))
    return out


def mailbox_index(conn: imaplib.IMAP4, mailbox: str) -> list[Entry]:
    typ, data = conn.select(f'"{mailbox}"', readonly=True)
    if typ != "OK":
        raise AssertionError(f"EXAMINE {mailbox}: {typ} {data!r}")
    if int(data[0] or 0) == 0:
        return []
    typ, answer = conn.fetch("1:*", "(UID FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    if typ != "OK":
        raise AssertionError(f"FETCH in {mailbox}: {typ} {answer!r}")
    entries = []
    for text, literal in _records(answer):
        uid, flags = _UID.search(text), _FLAGS.search(text)
        if uid is None or flags is None:
            raise AssertionError(f"FETCH answer without UID or FLAGS: {text!r}")
        entries.append(
            Entry(
                int(text.split(b" ", 1)[0]),
                int(uid.group(1)),
                frozenset(f.decode() for f in flags.group(1).split()),
                corpus.message_id(literal + b"\r\n"),
            )
        )
    return sorted(entries, key=lambda e: e.uid)


def fetch_messages(conn: imaplib.IMAP4, mailbox: str) -> dict[str, bytes]:
    """Every message of a mailbox (BODY.PEEK[]), keyed "UID n"."""
    typ, data = conn.select(f'"{mailbox}"', readonly=True)
    if typ != "OK":
        raise AssertionError(f"EXAMINE {mailbox}: {typ} {data!r}")
    if int(data[0] or 0) == 0:
        return {}
    typ, answer = conn.uid("FETCH", "1:*", "(BODY.PEEK[])")
    if typ != "OK":
        raise AssertionError(f"UID FETCH BODY.PEEK[] in {mailbox}: {typ} {answer!r}")
    out = {}
    for text, literal in _records(answer):
        uid = _UID.search(text)
        if uid is None:
            raise AssertionError(f"FETCH answer without UID: {text!r}")
        out[f"UID {int(uid.group(1))}"] = literal
    return out
