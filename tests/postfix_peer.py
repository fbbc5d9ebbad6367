"""A private Postfix (Debian's) as a real peer MTA: the recipient's MX in outbound tests.

It runs as `postfix -c DIR start-fg` with its own config, queue and Maildirs under a temp
dir, listens on one loopback address and port, offers STARTTLS with a self-signed
certificate, accepts the virtual users it is given (others get 550 5.1.1 at RCPT), and
answers recipients listed in `access` with the reply given there (e.g. 451 for a retry test).

For TLS policy tests it can serve chosen certificates instead: ``tls_chain`` (a PEM file,
private key first, then the chain from the leaf up) replaces the self-signed certificate,
``sni_chains`` picks a chain by the SNI name the client sends (Postfix's
``tls_server_sni_maps``), and ``extra_domains`` are more recipient domains with the same
users, each stored under ``vmail/DOMAIN/USER``.
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
from collections.abc import Mapping, Sequence
from pathlib import Path

from mailfort.tls import ensure_self_signed

_MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixMX:
    def __init__(
        self,
        address: str,
        port: int,
        domain: str,
        users: list[str],
        *,
        extra_domains: Sequence[str] = (),
        tls_chain: Path | None = None,
        sni_chains: Mapping[str, Path] | None = None,
        relayhost: str = "",
        transport: Mapping[str, str] | None = None,
        header_checks: Sequence[str] = (),
    ) -> None:
        # Not under pytest's temp dirs: pytest resets their root to 0700 whenever a session
        # starts, and Postfix's daemons (postfix, nobody) must walk down to the queue and
        # Maildirs. A directory of our own under /tmp keeps its 0711.
        self.root = Path(tempfile.mkdtemp(prefix="mailfort-postfix-"))
        self.root.chmod(0o711)
        self.address, self.port, self.domain, self.users = address, port, domain, users
        self.conf = self.root / "conf"
        self.vmail = self.root / "vmail"
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_domains = list(extra_domains)
        self.tls_chain = tls_chain
        self.sni_chains = dict(sni_chains or {})
        # Set ("[127.0.0.3]:2525"): relay everything from mynetworks there, as a submission
        # relay would (bench/smtp_outbound.py's reference).
        self.relayhost = relayhost
        # Recipient -> transport (e.g. "error:5.1.1 gone"): accepted at RCPT, then bounced by
        # Postfix itself, as a mailbox that fails after acceptance does.
        self.transport = dict(transport or {})
        # regexp header_checks lines: reject by content at end of DATA (e.g. a DMARC refusal).
        self.header_checks = list(header_checks)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["postfix", "-c", str(self.conf), *args],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip

    def set_access(self, rules: dict[str, str]) -> None:
        """Recipient -> reply (e.g. ``"451 4.7.1 try later"``)."""
        (self.conf / "access").write_text("".join(f"{k} {v}\n" for k, v in rules.items()))
        if self.proc is not None and self.proc.poll() is None:
            # texthash maps are read when a daemon starts. A `postfix reload` left tlsmgr
            # failing here (and STARTTLS with it), so restart the whole instance instead.
            self.stop()
            self.start()

    def start(self) -> None:
        nobody = pwd.getpwnam("nobody")
        for sub in ("conf", "queue", "data", "vmail"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(self.root / "data", "postfix")
        os.chown(self.vmail, nobody.pw_uid, nobody.pw_gid)
        ensure_self_signed(self.conf / "cert.pem", self.conf / "key.pem", f"mx.{self.domain}")
        (self.conf / "vmailbox").write_text(
            "".join(f"{u}@{self.domain} {u}/Maildir/\n" for u in self.users)
            + "".join(f"{u}@{d} {d}/{u}/Maildir/\n" for d in self.extra_domains for u in self.users)
        )
        tls_files = (
            f"smtpd_tls_chain_files = {self.tls_chain}\n"
            if self.tls_chain is not None
            else f"smtpd_tls_cert_file = {self.conf / 'cert.pem'}\n"
            f"smtpd_tls_key_file = {self.conf / 'key.pem'}\n"
        )
        if self.sni_chains:
            (self.conf / "sni").write_text(
                "".join(f"{name} {path}\n" for name, path in self.sni_chains.items())
            )
            tls_files += f"tls_server_sni_maps = hash:{self.conf / 'sni'}\n"
        if not (self.conf / "access").exists():
            self.set_access({})
        (self.conf / "transport").write_text(
            "".join(f"{k} {v}\n" for k, v in self.transport.items())
        )
        (self.conf / "header_checks").write_text("".join(f"{r}\n" for r in self.header_checks))
        (self.conf / "main.cf").write_text(
            f"""compatibility_level = 3.6
queue_directory = {self.root / "queue"}
data_directory = {self.root / "data"}
mail_owner = postfix
setgid_group = postdrop
maillog_file = {self.root / "postfix.log"}
maillog_file_prefixes = {self.root}
myhostname = mx.{self.domain}
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = {self.relayhost}
alias_maps =
alias_database =
local_recipient_maps =
biff = no
smtpd_tls_security_level = may
{tls_files}smtpd_recipient_restrictions = check_recipient_access texthash:{self.conf / "access"}, permit_mynetworks, reject
virtual_mailbox_domains = {", ".join([self.domain, *self.extra_domains])}
virtual_mailbox_base = {self.vmail}
virtual_mailbox_maps = texthash:{self.conf / "vmailbox"}
virtual_uid_maps = static:{nobody.pw_uid}
virtual_gid_maps = static:{nobody.pw_gid}
virtual_minimum_uid = {min(nobody.pw_uid, 100)}
recipient_delimiter = +
transport_maps = texthash:{self.conf / "transport"}
header_checks = regexp:{self.conf / "header_checks"}
"""
        )
        (self.conf / "master.cf").write_text(
            _MASTER_CF.format(listen=f"{self.address}:{self.port}")
        )
        if self.sni_chains:
            # The SNI table holds the PEM data itself: "postmap -F" reads the files named
            # (after main.cf exists: postmap reads it).
            made = subprocess.run(
                ["postmap", "-c", str(self.conf), "-F", f"hash:{self.conf / 'sni'}"],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            if made.returncode != 0:
                raise RuntimeError(f"postmap -F failed: {made.stderr}")
        check = self._run("check")
        if check.returncode != 0:
            raise RuntimeError(f"postfix check failed: {check.stderr}")
        self.proc = subprocess.Popen(
            ["postfix", "-c", str(self.conf), "start-fg"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.address, self.port), 1) as s,
            ):
                if s.recv(4).startswith(b"220"):
                    return
            time.sleep(0.2)
        raise RuntimeError(f"postfix did not start: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self._run("stop")
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def messages(self, user: str, domain: str | None = None) -> list[bytes]:
        base = self.vmail if domain in (None, self.domain) else self.vmail / domain
        new = base / user / "Maildir" / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(
                (self.root / "postfix.log").read_text(errors="replace").splitlines()[-lines:]
            )
        return ""
