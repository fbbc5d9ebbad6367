"""Real mail clients, each configured in its own directory against a :class:`Target`.

Every client verifies the server certificate against the target's own CA file (no
"accept anything" switches) and names the server "localhost", which the certificate carries.
A client run that fails raises :class:`ClientFailed` with the client's own output, so a
failure against mailfort reads as the client reported it.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from interop import corpus
from interop.servers import HOST, Account, Target

CLIENT_FORMS = Path(__file__).with_name("client_forms.py")
GETMAIL_LAUNCHER = Path(__file__).with_name("getmail_launcher.py")
TIMEOUT = 120  # seconds for one client run; a healthy full sync takes a few


class ClientFailed(AssertionError):
    pass


@dataclass
class Run:
    argv: list[str]
    returncode: int
    output: str
    seconds: float

    def describe(self) -> str:
        tail = "\n".join(self.output.splitlines()[-60:])
        return (
            f"$ {shlex.join(self.argv)}\nexit {self.returncode} after {self.seconds:.1f}s\n{tail}"
        )


def run(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: dict[str, str] | None = None,
    ok: Sequence[int] = (0,),
    timeout: float = TIMEOUT,
) -> Run:
    start = time.monotonic()
    # A Python client that hangs prints where it is on SIGABRT (sent on timeout, below).
    full_env = {**os.environ, "LC_ALL": "C.UTF-8", "PYTHONFAULTHANDLER": "1", **(env or {})}
    with subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as proc:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            try:
                out, _ = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            raise ClientFailed(
                f"$ {shlex.join(argv)}\ntimed out after {timeout}s\n"
                + out.decode(errors="replace")[-20000:]
            ) from None
    result = Run(
        list(argv), proc.returncode, out.decode(errors="replace"), time.monotonic() - start
    )
    if proc.returncode not in ok:
        raise ClientFailed(result.describe())
    return result


def as_nobody_if_root(path: Path) -> str | None:
    """Tools that refuse to write mail as root (getmail) write as nobody instead."""
    if os.getuid() != 0:
        return None
    nobody = pwd.getpwnam("nobody")
    for p in (path, *path.rglob("*")):
        os.chown(p, nobody.pw_uid, nobody.pw_gid)
    return "nobody"


def make_maildir(path: Path) -> Path:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


# ---- which messages a client cannot take, and why ----------------------------------------


def no_empty_line(m: corpus.Message) -> bool:
    """isync 1.4 skips a message with no empty line at all ("incomplete header; skipping")."""
    return re.search(rb"(?:\r?\n|^)\r?\n", m.raw) is None


_FIELD_OR_CONTINUATION = re.compile(rb"[^\s:]+[ \t]*:|[ \t]")


def bad_header_line(m: corpus.Message) -> bool:
    """fetchmail drops a message whose header holds a line that is neither a field nor a
    continuation (it logs "line: ..." and delivers nothing)."""
    data = corpus.normalize(m.raw)
    end = data.find(b"\n\n")
    head = data if end < 0 else data[:end]
    return any(not _FIELD_OR_CONTINUATION.match(line) for line in head.split(b"\n"))


# ---- clients that re-generate messages ----------------------------------------------------


def _interpreter(tool: str) -> tuple[str, Path]:
    """The Python a (Python) client runs under, and the directory of its script."""
    path = Path(shutil.which(tool) or tool).resolve()
    first = path.read_bytes().split(b"\n", 1)[0].decode()
    if not first.startswith("#!"):
        raise RuntimeError(f"{path}: no #! line")
    parts = first[2:].split()
    if Path(parts[0]).name == "env":
        parts = parts[1:]
    return shutil.which(parts[0]) or parts[0], path.parent


def expected_forms(
    tool: str, mode: str, messages: Sequence[corpus.Message], workdir: Path
) -> tuple[list[corpus.Expected], list[str]]:
    """What `tool` writes for each message (client_forms.py), and the ones it cannot write."""
    python, script_dir = _interpreter(tool)
    src = workdir / f"forms-{mode}"
    src.mkdir(parents=True, exist_ok=True)
    variants: dict[str, tuple[int, str]] = {}
    for i, m in enumerate(messages):
        # The client gets the message as IMAP/POP3 carry it: CRLF line ends.
        forms = [m.raw] + ([m.raw.replace(b"\0", b"\x80")] if b"\0" in m.raw else [])
        for j, raw in enumerate(forms):
            name = f"{i:05d}-{j}"
            (src / name).write_bytes(corpus.to_crlf(raw))
            variants[name] = (i, m.name)
    out = run([python, str(CLIENT_FORMS), mode, str(src), str(script_dir)], cwd=workdir)
    digests: dict[int, set[str]] = {}
    for name, digest in json.loads(out.output.splitlines()[-1]).items():
        if digest is not None:
            digests.setdefault(variants[name][0], set()).add(digest)
    want, unwritable = [], []
    for i, m in enumerate(messages):
        if i in digests:
            want.append(corpus.Expected(m.name, frozenset(digests[i])))
        else:
            unwritable.append(m.name)
    return want, unwritable


# ---- the clients --------------------------------------------------------------------------


@dataclass
class Client:
    target: Target
    account: Account
    workdir: Path
    runs: list[Run] = field(default_factory=list)

    def configure(self) -> None:
        raise NotImplementedError

    def first_run(self) -> Run:
        """The complete first sync or fetch."""
        raise NotImplementedError

    def _run(self, argv: Sequence[str], env: dict[str, str] | None = None) -> Run:
        r = run(argv, cwd=self.workdir, env=env)
        self.runs.append(r)
        return r


class Mbsync(Client):
    """isync: INBOX and Archive both ways, IMAPS, Maildir."""

    def configure(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mail = self.workdir / "mail"
        self.mail.mkdir(exist_ok=True)
        rc = f"""\
IMAPAccount acct
Host {HOST}
Port {self.target.ports["imaps"]}
User {self.account.user}
Pass "{self.account.password}"
SSLType IMAPS
CertificateFile {self.target.cafile}
SystemCertificates no
Timeout 60

IMAPStore far
Account acct

MaildirStore near
Path {self.mail}/
Inbox {self.mail}/INBOX
SubFolders Verbatim

Channel ch
Far :far:
Near :near:
Patterns INBOX Archive
Create Both
Expunge Both
SyncState *
"""
        self.rc = self.workdir / "mbsyncrc"
        self.rc.write_text(rc)
        self.rc.chmod(0o600)

    def sync(self) -> Run:
        return self._run(["mbsync", "-c", str(self.rc), "-a"])

    first_run = sync


class OfflineImap(Client):
    """offlineimap3: INBOX and Archive both ways, IMAPS, Maildir."""

    def configure(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mail = self.workdir / "mail"
        rc = f"""\
[general]
accounts = acct
metadata = {self.workdir}/metadata
maxsyncaccounts = 1

[Account acct]
localrepository = near
remoterepository = far

[Repository near]
type = Maildir
localfolders = {self.mail}

[Repository far]
type = IMAP
remotehost = {HOST}
remoteport = {self.target.ports["imaps"]}
ssl = yes
sslcacertfile = {self.target.cafile}
remoteuser = {self.account.user}
remotepass = {self.account.password}
folderfilter = lambda name: name in ("INBOX", "Archive")
maxconnections = 1
holdconnectionopen = no
"""
        self.rc = self.workdir / "offlineimaprc"
        self.rc.write_text(rc)

    def sync(self) -> Run:
        r = self._run(["offlineimap", "-c", str(self.rc), "-o", "-u", "basic"])
        # offlineimap reports per-message failures and still exits 0.
        errors = [line for line in r.output.splitlines() if line.startswith("ERROR")]
        if errors:
            raise ClientFailed(r.describe())
        return r

    first_run = sync


class Fetchmail(Client):
    """fetchmail into an MDA that writes one file per message."""

    protocol = "POP3"

    def configure(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.out = self.workdir / "delivered"
        self.out.mkdir(exist_ok=True)
        if self.protocol == "POP3":
            # POP3 over implicit TLS (port 995's role).
            port, tls = self.target.ports["pop3s"], "ssl"
        else:
            # IMAP on the plain port: an explicit sslproto makes STARTTLS mandatory.
            port, tls = self.target.ports["imap"], "sslproto 'TLS1.2+'"
        # The rc file's string syntax has no room for inner double quotes; the path is ours
        # and has no spaces.
        mda = f"/bin/sh -c 'cat > $(mktemp {self.out}/msg.XXXXXXXX)'"
        rc = f"""\
set no syslog
set no bouncemail
poll {HOST} with proto {self.protocol} port {port}
  user "{self.account.user}" there with password "{self.account.password}" is "{_me()}" here
  options {tls} sslcertck sslcertfile "{self.target.cafile}" keep fetchall no rewrite
  mda "{mda}"
"""
        self.rc = self.workdir / "fetchmailrc"
        self.rc.write_text(rc)
        self.rc.chmod(0o600)  # fetchmail refuses a readable rc file

    def fetch(self) -> Run:
        return self._run(
            [
                *("fetchmail", "-f", str(self.rc), "-i", str(self.workdir / "ids")),
                *("--invisible", "-v"),
                # Its own lock file: as root fetchmail would share /var/run/fetchmail.pid
                # with any other fetchmail and refuse to run beside it.
                *("--pidfile", str(self.workdir / "fetchmail.pid")),
            ],
            env={"FETCHMAILHOME": str(self.workdir), "HOME": str(self.workdir)},
        )

    first_run = fetch

    def copies(self) -> dict[str, bytes]:
        return {f.name: f.read_bytes() for f in sorted(self.out.iterdir())}


class FetchmailImap(Fetchmail):
    protocol = "IMAP"


class Getmail(Client):
    """getmail6 into a Maildir."""

    retriever = "SimplePOP3SSLRetriever"

    def configure(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mail = make_maildir(self.workdir / "Maildir")
        imap = "IMAP" in self.retriever
        port = self.target.ports["imaps" if imap else "pop3s"]
        user = as_nobody_if_root(self.mail)
        rc = f"""\
[retriever]
type = {self.retriever}
server = {HOST}
port = {port}
username = {self.account.user}
password = {self.account.password}
ca_certs = {self.target.cafile}
{"mailboxes = ('INBOX',)" if imap else ""}
{"record_mailbox = false" if imap else ""}

[destination]
type = Maildir
path = {self.mail}/
{f"user = {user}" if user else ""}

[options]
read_all = true
delete = false
delivered_to = false
received = false
verbose = 1
"""
        self.rc = self.workdir / "getmailrc"
        self.rc.write_text(rc)

    def fetch(self) -> Run:
        python, _ = _interpreter("getmail")
        getmail = str(Path(shutil.which("getmail") or "getmail").resolve())
        return self._run(
            [
                *(python, str(GETMAIL_LAUNCHER), getmail),
                *("--getmaildir", str(self.workdir), "--rcfile", str(self.rc)),
            ]
        )

    first_run = fetch


class GetmailImap(Getmail):
    retriever = "SimpleIMAPSSLRetriever"


def _me() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


# ---- Maildir edits a user makes in a client's local copy ----------------------------------


_INFO = re.compile(r":2,([A-Za-z]*)$")


def maildir_flags(name: str) -> str:
    m = _INFO.search(name)
    return m.group(1) if m else ""


def find_by_message_id(folder: Path, message_id: str) -> list[Path]:
    found = []
    for sub in ("cur", "new"):
        d = folder / sub
        if d.is_dir():
            for f in d.iterdir():
                if corpus.message_id(f.read_bytes()) == message_id:
                    found.append(f)
    return found


def set_local_flags(path: Path, flags: str) -> Path:
    """Add Maildir flags to a message (moving it to cur/, as a mail reader does)."""
    base = _INFO.sub("", path.name)
    merged = "".join(sorted(set(maildir_flags(path.name)) | set(flags)))
    dest = path.parent.parent / "cur" / f"{base}:2,{merged}"
    path.rename(dest)
    return dest


def move_local(path: Path, folder: Path, strip: Sequence[str]) -> Path:
    """Move a message to another Maildir folder as a mail reader would: the sync tool's
    per-folder markers (mbsync's ,U=, offlineimap's ,U= and ,FMD5=) do not travel along."""
    name = path.name
    for marker in strip:
        name = re.sub(rf",{marker}=[^,:]*", "", name)
    dest = make_maildir(folder) / "cur" / name
    path.rename(dest)
    return dest


# ---- neomutt in tmux ----------------------------------------------------------------------


class Neomutt(Client):
    """neomutt on a terminal that tmux provides: keys in with send-keys, screen out with
    capture-pane. The tmux server has its own socket in the work directory."""

    def configure(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket = self.workdir / "tmux.sock"
        rc = f"""\
set folder = "imaps://{HOST}:{self.target.ports["imaps"]}/"
set spoolfile = "+INBOX"
set imap_user = "{self.account.user}"
set imap_pass = "{self.account.password}"
set ssl_ca_certificates_file = "{self.target.cafile}"
set certificate_file = "{self.workdir}/certificates"
set ssl_force_tls = yes
set header_cache = ""
set message_cachedir = ""
set sort = "mailbox-order"
set mail_check = 0
set imap_check_subscribed = no
set charset = "utf-8"
set help = no
set pager_index_lines = 0
set pager_stop = yes
ignore *
unignore from: subject: date: message-id:
"""
        self.rc = self.workdir / "neomuttrc"
        self.rc.write_text(rc)

    def tmux(self, *args: str) -> str:
        return run(["tmux", "-S", str(self.socket), *args], cwd=self.workdir, timeout=30).output

    def start(self, columns: int = 160, rows: int = 50) -> None:
        command = shlex.join(["neomutt", "-n", "-F", str(self.rc)])
        self.tmux(
            "new-session", "-d", "-s", "mail", "-x", str(columns), "-y", str(rows),
            f"env LANG=C.UTF-8 LC_ALL=C.UTF-8 TERM=xterm-256color {command}",
        )  # fmt: skip

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-t", "mail")

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "mail", *keys)

    def wait_for(self, pattern: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if re.search(pattern, screen):
                return screen
            time.sleep(0.2)
        raise ClientFailed(f"neomutt never showed {pattern!r}; the screen:\n{screen}")

    def stop(self) -> None:
        # Our own tmux server (own socket): ending it ends neomutt too.
        subprocess.run(
            ["tmux", "-S", str(self.socket), "kill-server"],
            capture_output=True,
            timeout=30,
            check=False,
        )
