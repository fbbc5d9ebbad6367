"""A private Dovecot (Debian `dovecot-imapd`, `dovecot-pop3d`) for tests and benchmarks.

It runs in the foreground (`dovecot -F -c CONF`) with every path under one temporary
directory: its own base_dir, state, log, passwd-file and Maildirs, on 127.0.0.1 high ports.
Nothing under /etc is read or changed, so several instances (and a system Dovecot) coexist.
The settings mirror what mailfort offers: no authentication before TLS, IMAP and POP3 both
with implicit TLS and STARTTLS/STLS, a Maildir per user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mailfort import tls

PORT_NAMES = ("imap", "imaps", "pop3", "pop3s")


def dovecot_binary() -> str | None:
    # /usr/sbin is not on a normal user's PATH.
    return shutil.which("dovecot") or shutil.which("dovecot", path="/usr/sbin:/sbin")


def doveadm_binary() -> str | None:
    return shutil.which("doveadm") or shutil.which("doveadm", path="/usr/bin:/usr/sbin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hash_password(password: str) -> str:
    """SHA512-CRYPT, the scheme a Debian admin gets from `doveadm pw -s SHA512-CRYPT`.

    A salted, iterated hash (not PLAIN) so that LOGIN costs what it costs in a real install.
    """
    doveadm = doveadm_binary()
    if doveadm is None:
        raise RuntimeError("doveadm not found (Debian package dovecot-core)")
    # -p puts the password on doveadm's command line; these are throwaway test secrets.
    out = subprocess.run(
        [doveadm, "pw", "-s", "SHA512-CRYPT", "-p", password],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return out.stdout.strip()


@dataclass
class Dovecot:
    root: Path
    ports: dict[str, int]
    cert: Path
    proc: subprocess.Popen[bytes] | None = None
    users: dict[str, str] = field(default_factory=dict)  # user -> hashed password

    host: str = "127.0.0.1"

    @property
    def config_path(self) -> Path:
        return self.root / "dovecot.conf"

    @property
    def log_path(self) -> Path:
        return self.root / "dovecot.log"

    @property
    def passwd_path(self) -> Path:
        return self.root / "passwd"

    def maildir(self, user: str) -> Path:
        return self.root / "home" / user / "Maildir"

    def add_user(self, user: str, password: str) -> None:
        """Add a login; passwd-file is re-read when its mtime changes, so no reload needed."""
        self.users[user] = hash_password(password)
        self._write_passwd()

    def _write_passwd(self) -> None:
        lines = [f"{u}:{h}::::::\n" for u, h in self.users.items()]
        tmp = self.passwd_path.with_suffix(".tmp")
        tmp.write_text("".join(lines))
        os.chmod(tmp, 0o644)
        # A fresh inode guarantees the changed stat that makes Dovecot re-read it.
        tmp.replace(self.passwd_path)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def pids(self) -> list[int]:
        """The master and every process under it, for memory measurements."""
        if self.proc is None:
            return []
        return process_tree(self.proc.pid)


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces: split after it.
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def mail_ids() -> tuple[int, int]:
    """The uid/gid the mail processes run as: ours, or `nobody` when we are root.

    Dovecot refuses uid 0 for mail access ("userdb returned 0 as uid") whatever
    first_valid_uid says, so as root the Maildirs belong to nobody (root still reads them).
    """
    if os.getuid() != 0:
        return os.getuid(), os.getgid()
    nobody = pwd.getpwnam("nobody")
    return nobody.pw_uid, nobody.pw_gid


def _config(d: Dovecot, max_connections: int) -> str:
    uid, gid = mail_ids()
    me = pwd.getpwuid(os.getuid()).pw_name
    if os.getuid() == 0:
        # As root, keep Dovecot's own privilege separation (dovenull/dovecot users, chroot).
        privileges = ""
    else:
        # As a normal user every process runs as that user and nothing can chroot.
        privileges = (
            f"default_internal_user = {me}\n"
            f"default_login_user = {me}\n"
            "service imap-login {\n  chroot =\n}\n"
            "service pop3-login {\n  chroot =\n}\n"
            "service anvil {\n  chroot =\n}\n"
        )
    key = d.cert.with_name("key.pem")
    p = d.ports
    r = d.root
    return f"""\
# Private test instance; see tests/interop/dovecot.py.
instance_name = mailfort-test-{p["imap"]}
base_dir = {r}/run
state_dir = {r}/state
log_path = {d.log_path}
protocols = imap pop3
listen = 127.0.0.1
{privileges}
ssl = required
ssl_cert = <{d.cert}
ssl_key = <{key}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
auth_mechanisms = plain login
passdb {{
  driver = passwd-file
  args = {d.passwd_path}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={r}/home/%u
}}
mail_location = maildir:~/Maildir
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Archive {{
    special_use = \\Archive
    auto = subscribe
  }}
  mailbox Sent {{
    special_use = \\Sent
    auto = subscribe
  }}
  mailbox Trash {{
    special_use = \\Trash
    auto = subscribe
  }}
}}
# The benchmark holds ~1,000 idle connections from one address for one user.
mail_max_userip_connections = {max_connections + 50}
default_process_limit = {max_connections + 100}
default_client_limit = {2 * max_connections + 200}
default_vsz_limit = 0
service auth {{
  client_limit = {4 * max_connections + 1000}
}}
service anvil {{
  client_limit = {4 * max_connections + 1000}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {p["imap"]}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {p["imaps"]}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {p["pop3"]}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {p["pop3s"]}
    ssl = yes
  }}
}}
service stats {{
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
pop3_uidl_format = %08Xu%08Xv
"""


def _wait_listening(d: Dovecot, deadline: float) -> None:
    for port in d.ports.values():
        while True:
            if d.proc is not None and d.proc.poll() is not None:
                raise RuntimeError(f"dovecot exited with {d.proc.returncode}:\n{d.log_tail()}")
            try:
                socket.create_connection((d.host, port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"dovecot not listening on {port}:\n{d.log_tail()}"
                    ) from None
                time.sleep(0.05)


@contextlib.contextmanager
def running_dovecot(root: Path | None = None, max_connections: int = 200) -> Iterator[Dovecot]:
    """Start a private Dovecot under `root` (default: a new directory, removed afterwards)."""
    binary = dovecot_binary()
    if binary is None:
        raise RuntimeError("dovecot not found (Debian packages dovecot-imapd, dovecot-pop3d)")
    with contextlib.ExitStack() as stack:
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dovecot-")))
        yield stack.enter_context(_running(binary, root, max_connections))


@contextlib.contextmanager
def _running(binary: str, root: Path, max_connections: int) -> Iterator[Dovecot]:
    root.mkdir(parents=True, exist_ok=True)
    # Dovecot's unprivileged processes (dovenull; nobody for mail when we are root) must
    # reach base_dir and the homes, so every directory above `root` must let them pass:
    # pytest's 0700 temporary directories do not (and pytest resets them to 0700 whenever
    # another session starts), which is why the default root is a directory of /tmp's own.
    os.chmod(root, 0o711)  # noqa: S103 - search bit only: names inside are not listed
    blocked = [str(p) for p in root.resolve().parents if not os.stat(p).st_mode & 0o001]
    if blocked and os.getuid() == 0:
        raise RuntimeError(f"dovecot's users cannot traverse {blocked}; use another root")
    for sub in ("run", "state", "home"):
        (root / sub).mkdir(exist_ok=True)
    uid, gid = mail_ids()
    os.chown(root / "home", uid, gid)
    tls_dir = root / "tls"
    cert = tls_dir / "cert.pem"
    tls.ensure_self_signed(cert, tls_dir / "key.pem", "localhost")
    d = Dovecot(root=root, ports={name: free_port() for name in PORT_NAMES}, cert=cert)
    d.passwd_path.write_text("")
    d.config_path.write_text(_config(d, max_connections))
    with open(root / "dovecot.stderr", "wb") as stderr:
        d.proc = subprocess.Popen(
            [binary, "-F", "-c", str(d.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        _wait_listening(d, time.monotonic() + 30)
        yield d
    finally:
        stop(d)


def stop(d: Dovecot) -> None:
    if d.proc is None or d.proc.poll() is not None:
        return
    # The master stops its children on SIGTERM; the process group catches stragglers.
    d.proc.send_signal(signal.SIGTERM)
    try:
        d.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(d.proc.pid, signal.SIGKILL)
        d.proc.wait(timeout=5)
