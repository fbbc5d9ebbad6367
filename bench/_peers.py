"""The peers the inbound benchmark measures mailfort against, each private to one run.

- `CachingDNS`: the test zone of ``tests/dnsserver.py`` behind a reply cache, on loopback.
- `Postfix`: a Postfix instance with its own config directory (``postfix -c DIR start-fg``,
  master in the foreground), delivering to Maildir with its ``virtual`` agent or over LMTP.
- `DovecotLMTP`: ``dovecot -F -c FILE`` serving only LMTP on a unix socket, into Maildir.

Nothing here reads or writes the system's /etc/postfix or /etc/dovecot: every path (config,
queue, data, state, sockets, logs, mail) lives under the directory the caller hands in, and
every process is started as a child of the caller and stopped by it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from postfix_peer import _MASTER_CF as _TEST_MASTER_CF

CLK_TCK = os.sysconf("SC_CLK_TCK")
Proc = subprocess.Popen[bytes]

# ---- processes ---------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _proc_stat(pid: int) -> tuple[int, float, float] | None:
    """(parent pid, user and system CPU seconds of the process and its reaped children)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return ppid, (utime + cutime) / CLK_TCK, (stime + cstime) / CLK_TCK


def descendants(root: int) -> list[int]:
    """``root`` and every live process below it."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st is not None:
                parents[int(entry)] = st[0]
    found = [root]
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - set(found)
        found.extend(sorted(frontier))
    return found


def tree_cpu(root: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process tree: live processes plus the children they
    reaped.

    A delta of two readings is the CPU the tree used in between (a child reaped in between
    moves from its own count into its parent's).
    """
    user = system = 0.0
    for pid in descendants(root):
        st = _proc_stat(pid)
        if st is not None:
            user += st[1]
            system += st[2]
    return user, system


def stop_process(proc: Proc, timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL to the process group it leads (``start_new_session=True``)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for pid in reversed(descendants(proc.pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait(5)


def wait_for(check: Callable[[], bool], timeout: float, what: str, proc: Proc | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f} s")


def smtp_banner(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.settimeout(2)
            ok = s.recv(512).startswith(b"220")
            with contextlib.suppress(OSError):
                s.sendall(b"QUIT\r\n")
            return ok
    except OSError:
        return False


def unix_connectable(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1)
            s.connect(str(path))
            return True
    except OSError:
        return False


# ---- DNS -----------------------------------------------------------------------------------


class CachingDNS:
    """UDP and TCP on one loopback port, answering from ``answer(query, transport)``.

    ``tests/dnsserver.py`` parses and builds every reply with dnslib in a fresh thread
    (~1 ms of CPU per query here); at four to five lookups per message it would take CPU
    from the two cores the servers are measured on. A static zone's reply depends only on
    the query bytes after the 2-byte ID, so UDP replies are cached by those bytes and
    re-stamped with the query's ID: a production MX has a local caching resolver too.
    """

    def __init__(self, answer: Callable[[bytes, str], bytes | None]) -> None:
        self._answer = answer
        self._cache: dict[bytes, bytes] = {}
        self.queries = 0
        self.misses = 0
        self._stop = threading.Event()
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            self.port = int(udp.getsockname()[1])
            tcp = socket.socket()
            try:
                tcp.bind(("127.0.0.1", self.port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            break
        else:
            raise RuntimeError("no free port for DNS over both UDP and TCP")
        tcp.listen(64)
        udp.settimeout(0.2)
        tcp.settimeout(0.2)
        self._udp, self._tcp = udp, tcp
        self._threads = [
            threading.Thread(target=self._serve_udp, name="dns-udp", daemon=True),
            threading.Thread(target=self._serve_tcp, name="dns-tcp", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self._udp.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            if len(data) < 12:
                continue
            self.queries += 1
            key = data[2:]
            wire = self._cache.get(key)
            if wire is None:
                self.misses += 1
                fresh = self._answer(data, "udp")
                if fresh is None:
                    continue  # the zone says: time out
                wire = self._cache[key] = fresh
            with contextlib.suppress(OSError):
                self._udp.sendto(data[:2] + wire[2:], addr)

    def _serve_tcp(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _addr = self._tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._tcp_conn, args=(conn,), daemon=True).start()

    def _tcp_conn(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                while True:
                    head = _recv_exact(conn, 2)
                    if head is None:
                        return
                    data = _recv_exact(conn, struct.unpack("!H", head)[0])
                    if data is None:
                        return
                    self.queries += 1
                    wire = self._answer(data, "tcp")
                    if wire is None:
                        return
                    conn.sendall(struct.pack("!H", len(wire)) + wire)
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(2)
        self._udp.close()
        self._tcp.close()


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


# ---- Maildir -------------------------------------------------------------------------------


def maildir_count(maildirs: Iterable[Path]) -> int:
    """Messages delivered into these Maildirs (``new/`` and ``cur/``)."""
    total = 0
    for md in maildirs:
        for sub in ("new", "cur"):
            with contextlib.suppress(FileNotFoundError):
                total += sum(1 for _ in os.scandir(md / sub))
    return total


def _mail_ids() -> tuple[int, int]:
    """The unprivileged uid/gid that owns the peers' Maildirs."""
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


# ---- Dovecot -------------------------------------------------------------------------------


class DovecotLMTP:
    """Dovecot serving LMTP only, on a unix socket, into ``mail_root/<local>/Maildir``.

    Everything else is Dovecot 2.3's default: ``mail_fsync = optimized`` (a delivered
    message is fsynced before LMTP answers 250), one lmtp process per connection, logging
    each delivery.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mail_root = root / "mail"
        self.socket = root / "run" / "lmtp"
        self.conf = root / "dovecot.conf"
        self.proc: Proc | None = None

    def maildirs(self, locals_: Iterable[str]) -> list[Path]:
        return [self.mail_root / local / "Maildir" for local in locals_]

    def start(self, timeout: float = 30.0) -> None:
        binary = shutil.which("dovecot")
        if binary is None:
            raise RuntimeError("dovecot not found: install Debian's dovecot-lmtpd")
        uid, gid = _mail_ids()
        self.mail_root.mkdir(parents=True)
        os.chown(self.mail_root, uid, gid)
        self.conf.write_text(
            f"""# private instance for bench/smtp_inbound.py
instance_name = mailfort-bench-{os.getpid()}
base_dir = {self.root / "run"}
state_dir = {self.root / "state"}
log_path = {self.root / "dovecot.log"}
protocols = lmtp
listen = 127.0.0.1
ssl = no
mail_location = maildir:~/Maildir
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = {min(uid, 100)}
passdb {{
  driver = static
  args = nopassword=y
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={self.mail_root}/%n allow_all_users=yes
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
}}
"""
        )
        log = (self.root / "dovecot.out").open("wb")
        self.proc = subprocess.Popen(
            [binary, "-F", "-c", str(self.conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        try:
            wait_for(lambda: unix_connectable(self.socket), timeout, "dovecot lmtp", self.proc)
        except BaseException:
            raise RuntimeError(f"dovecot did not start:\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 20) -> str:
        out = []
        for name in ("dovecot.out", "dovecot.log"):
            with contextlib.suppress(OSError):
                out.extend((self.root / name).read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(out)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


# ---- Postfix -------------------------------------------------------------------------------

# The tests' master.cf (Debian's with chroot off and without the services a private
# instance never uses), plus what the benches add: LMTP delivery and proxywrite.
MASTER_CF = (
    _TEST_MASTER_CF
    + "lmtp      unix  -       -       n       -       -       lmtp\n"
    + "proxywrite unix -       -       n       -       1       proxymap\n"
)


class PrivatePostfix:
    """A private Postfix 3.7 (``postfix -c DIR start-fg``): its own config directory, queue,
    data directory and log, listening on ``address:port``. Subclasses give the main.cf
    lines of their setup (`settings`); everything else is Postfix's default (queue files
    fsynced before 250, delivery concurrency up to 20 per destination)."""

    purpose = "a benchmark"
    hostname = "mx.postfix.test"
    interfaces = "127.0.0.1"  # "loopback-only" to listen on another 127.0.0.x address
    relayhost = ""

    def __init__(self, root: Path, port: int, address: str = "127.0.0.1") -> None:
        self.root = root
        self.port = port
        self.address = address
        self.conf = root / "conf"
        self.proc: Proc | None = None

    def settings(self) -> str:
        """main.cf lines of this setup, after the common ones; files it needs are written
        here (the conf directory exists)."""
        return ""

    def _postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["postfix", "-c", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def start(self, timeout: float = 60.0) -> None:
        if shutil.which("postfix") is None:
            raise RuntimeError("postfix not found: install Debian's postfix")
        if os.geteuid() != 0:
            raise RuntimeError("a private Postfix needs root (master drops to mail_owner)")
        for sub in ("conf", "queue", "data"):
            (self.root / sub).mkdir(parents=True)
        shutil.chown(self.root / "data", "postfix")
        domain = self.hostname.partition(".")[2]
        (self.conf / "main.cf").write_text(
            f"""# private instance for {self.purpose}
compatibility_level = 3.6
queue_directory = {self.root / "queue"}
data_directory = {self.root / "data"}
mail_owner = postfix
setgid_group = postdrop
maillog_file = {self.root / "postfix.log"}
maillog_file_prefixes = {self.root}
myhostname = {self.hostname}
mydomain = {domain}
myorigin = $myhostname
mydestination =
inet_interfaces = {self.interfaces}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = {self.relayhost}
alias_maps =
alias_database =
local_recipient_maps =
biff = no
"""
            + self.settings()
        )
        (self.conf / "master.cf").write_text(MASTER_CF.format(listen=f"{self.address}:{self.port}"))
        check = self._postfix("check")  # also creates the queue's subdirectories
        if check.returncode != 0:
            raise RuntimeError(f"postfix check failed: {check.stderr}{self.log_tail()}")
        with (self.root / "postfix.out").open("wb") as out:
            self.proc = subprocess.Popen(
                ["postfix", "-c", str(self.conf), "start-fg"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            wait_for(
                lambda: smtp_banner(self.port, self.address), timeout, "postfix smtpd", self.proc
            )
        except BaseException:
            raise RuntimeError(f"postfix did not start:\n{self.log_tail()}") from None

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "postfix.log").read_text(errors="replace")
        return ""

    def log_tail(self, lines: int = 20) -> str:
        out = []
        for name in ("postfix.out", "postfix.log"):
            with contextlib.suppress(OSError):
                out.extend((self.root / name).read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(out)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._postfix("stop", timeout=30)
        stop_process(self.proc)


class Postfix(PrivatePostfix):
    """Recipients ``<local>@<domain>`` are the ``virtual_mailbox_maps`` (unknown ones are
    refused at RCPT, as mailfort does). With ``lmtp_socket`` None the ``virtual`` agent
    writes ``<root>/vmail/<local>/Maildir``; otherwise ``virtual_transport`` hands every
    message to that LMTP socket."""

    purpose = "bench/smtp_inbound.py"

    def __init__(
        self, root: Path, port: int, domain: str, locals_: list[str], lmtp_socket: Path | None
    ) -> None:
        super().__init__(root, port)
        self.domain = domain
        self.locals = locals_
        self.lmtp_socket = lmtp_socket
        self.vmail = root / "vmail"

    def maildirs(self) -> list[Path]:
        return [self.vmail / local / "Maildir" for local in self.locals]

    def settings(self) -> str:
        uid, gid = _mail_ids()
        self.vmail.mkdir()
        os.chown(self.vmail, uid, gid)
        (self.conf / "vmailbox").write_text(
            "".join(f"{local}@{self.domain} {local}/Maildir/\n" for local in self.locals)
        )
        transport = f"lmtp:unix:{self.lmtp_socket}" if self.lmtp_socket else "virtual"
        return f"""virtual_mailbox_domains = {self.domain}
virtual_mailbox_base = {self.vmail}
virtual_mailbox_maps = texthash:{self.conf / "vmailbox"}
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_minimum_uid = {min(uid, 100)}
virtual_transport = {transport}
"""
