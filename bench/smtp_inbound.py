"""Inbound SMTP: messages durable in mailboxes per second, mailfort beside Postfix, one run.

    .venv/bin/python bench/smtp_inbound.py            # as root: Postfix needs it
        [--messages 10000] [--users 100] [--sessions 20] [--size 5000] [--workers 2]
        [--rounds 1] [--only mailfort,virtual,lmtp] [--no-dkim] [--profile DIR] [--keep]
        [--quiet SECONDS]   # on a shared machine: wait for an idle one before each case

Three systems take the same load, one after the other, each on its own loopback port:

- mailfort: ``mailfort dev --workers 2 --dns <bench DNS>``; SPF, DKIM, DMARC and ARC run on
  every message, which is sealed to the recipient's keys and fsynced before 250.
- Postfix ``virtual``: a private Postfix 3.7 (``postfix -c DIR start-fg``) whose ``virtual``
  delivery agent writes each recipient's Maildir.
- Postfix + Dovecot LMTP: the same Postfix with ``virtual_transport = lmtp:unix:...`` to a
  private Dovecot 2.3 (``dovecot -F -c FILE``) that writes the Maildirs.

Neither peer authenticates mail (no SPF/DKIM/DMARC milter): they are the bar for moving mail
to disk, mailfort does more work per message. Each peer runs with its defaults except what
a private instance needs (paths, port, no chroot).

**Load layout.** ``smtp-source -N`` would number the recipients (10,000 distinct addresses)
and there are 100 users, so the load is instead ``users`` runs of
``smtp-source -s 1 -m <messages/users> -F <message file> -t u<K>@example.test``, 20 (``--sessions``)
running at any time from a pool: 20 concurrent SMTP sessions throughout (fewer only in the
last wave's tail), 100 messages to each of 100 users, 10,000 in all. smtp-source opens one
connection per message (no ``-d``), as independent senders do; it sends HELO, no pipelining.
With fewer users than sessions (``--users 1``: every message to one mailbox), each user's
messages are split over several runs so that 20 sessions still run at once.

**Messages.** One ~5 KB plain-text file per user (``-F``), ``From: news@sender.test``, DKIM
signed with RSA-2048 (relaxed/relaxed, d=sender.test; ``--no-dkim`` to send unsigned). The
bench DNS zone gives sender.test ``v=spf1 ip4:127.0.0.0/8 -all`` and DMARC ``p=reject``, and
the HELO name mta.sender.test its own SPF pass, so mailfort verifies SPF, DKIM and DMARC as
pass on every message (checked on a sample mailbox after the run). The zone is served by
``tests/dnsserver.py`` behind a reply cache (`_peers.CachingDNS`) in this process.

**What counts.** A message counts once it is durable in its mailbox. mailfort answers 250
only after the sealed message is fsynced into the recipient's spool, so its time is until
the last smtp-source exits; the spools are then counted (all rows must be there). Postfix
answers 250 once the message is in its queue, so its time is until the last message file
is in the Maildirs (polled from the last 250 on; 20 ms resolution at the end). ``accepted/s``
is messages over the time until the last 250, for information. ``server CPU`` is the CPU of
the server's whole process tree (utime+stime from /proc, reaped children included) over the
measured time, per message: it is less sensitive than the rate to other load on the machine.
The load generator's own CPU (smtp-source; this process's DNS replies and polling) runs on
the same two cores and is printed beside it. Each run also prints the cores busy with
anything else meanwhile: kernel work no process is charged for (the ext4 journal, loopback
softirq: ~0.45-0.6 cores here even alone) plus other users of the machine; well above that,
the figures are noise. ``--rounds N`` keeps each system's best round.

``--profile DIR`` adds one more mailfort run under py-spy (``pip install py-spy`` into the
venv; it is not a dependency) and prints where the CPU goes per message; the raw stacks are
kept in DIR for flamegraph.pl or speedscope. It samples with ``--gil``: only the thread that
holds the GIL, which is where mailfort's workers spend ~90-95 % of their CPU (the summary
prints the share); without it, threads blocked in C (queue waits, epoll) count as busy.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import email.utils
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apsw
import dkim
from _peers import (
    CachingDNS,
    DovecotLMTP,
    Postfix,
    Proc,
    free_port,
    maildir_count,
    stop_process,
    tree_cpu,
    wait_for,
)

from mailfort.directory import dkimkeys

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from dnsserver import DNSServer, Zone  # noqa: E402

DOMAIN = "example.test"
SENDER = "news@sender.test"
HELO = "mta.sender.test"
SELECTOR = "bench"
PASSWORD = "bench passphrase shared by every user"
CASES = ("mailfort", "virtual", "lmtp")

# ---- the load --------------------------------------------------------------------------------


@dataclass
class Workload:
    messages: int
    users: int
    sessions: int
    size: int
    files: dict[str, Path] = field(default_factory=dict)
    signed: bool = False

    @property
    def locals(self) -> list[str]:
        return [f"u{k}" for k in range(1, self.users + 1)]

    def per_user(self, local: str) -> int:
        k = int(local[1:]) - 1
        return self.messages // self.users + (1 if k < self.messages % self.users else 0)

    def runs(self) -> list[tuple[str, int]]:
        """(user, messages) per smtp-source run: one run per user, or with fewer users than
        sessions each user's messages split over enough runs to keep every session busy."""
        split = -(-self.sessions // self.users)  # ceil
        out: list[tuple[str, int]] = []
        for local in self.locals:
            n = self.per_user(local)
            out.extend((local, n // split + (1 if i < n % split else 0)) for i in range(split))
        return [(local, n) for local, n in out if n]


def dkim_key() -> tuple[bytes, str]:
    """A fresh RSA-2048 key of the sender's: (PEM for dkimpy, base64 public key for DNS)."""
    new = dkimkeys.generate("rsa", SELECTOR)
    return new.private, new.public_b64


def write_messages(work: Workload, outdir: Path, key_pem: bytes | None) -> None:
    """One message file per user, about ``work.size`` bytes in all, LF line ends
    (smtp-source sends each line with CRLF)."""
    outdir.mkdir(parents=True)
    words = ["privacy", "first", "mail", "server", "benchmark", "message", "body", "text"]
    words += ["with", "ordinary", "words", "spread", "over", "lines", "of", "plain", "prose"]
    words += ["the", "way", "a", "newsletter", "would", "carry", "them"]
    for local in work.locals:
        head = [
            f"From: Sender News <{SENDER}>",
            f"To: <{local}@{DOMAIN}>",
            f"Subject: Bench newsletter for {local}",
            f"Date: {email.utils.formatdate(localtime=False)}",
            f"Message-ID: <{os.urandom(8).hex()}.{local}@sender.test>",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=us-ascii",
        ]
        body: list[str] = []
        target = work.size - sum(len(h) + 2 for h in head) - (600 if key_pem else 0)
        i = 0
        while sum(len(line) + 2 for line in body) < target:
            line = " ".join(words[(i + j) % len(words)] for j in range(11))
            body.append(f"{i:04d} {line}")
            i += 1
        message = ("\r\n".join(head) + "\r\n\r\n" + "\r\n".join(body) + "\r\n").encode()
        if key_pem is not None:
            signature = dkim.sign(
                message,
                SELECTOR.encode(),
                b"sender.test",
                key_pem,
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=[
                    b"from",
                    b"to",
                    b"subject",
                    b"date",
                    b"message-id",
                    b"mime-version",
                    b"content-type",
                ],
            )
            message = signature + message
        path = outdir / f"{local}.eml"
        path.write_bytes(message.replace(b"\r\n", b"\n"))
        work.files[local] = path
    work.signed = key_pem is not None


def zone(dkim_public: str | None) -> Zone:
    records: dict[str, list[tuple[str, object] | str]] = {
        "sender.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all"), ("MX", (10, HELO))],
        HELO: [("TXT", "v=spf1 ip4:127.0.0.0/8 -all"), ("A", "127.0.0.1")],
        "_dmarc.sender.test": [("TXT", "v=DMARC1; p=reject")],
    }
    if dkim_public is not None:
        records[f"{SELECTOR}._domainkey.sender.test"] = [
            ("TXT", f"v=DKIM1; k=rsa; p={dkim_public}")
        ]
    return records


@dataclass
class Drive:
    seconds: float
    failures: list[str]
    smtp_source_cpu: float  # seconds, all smtp-source processes


def drive(port: int, work: Workload, timeout: float) -> Drive:
    """Every run through a pool of ``work.sessions`` smtp-source processes."""
    binary = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    deadline = time.monotonic() + timeout
    failures: list[str] = []

    def one(local: str, count: int) -> None:
        cmd = [
            binary,
            *("-s", "1", "-m", str(count), "-F", str(work.files[local])),
            *("-f", SENDER, "-t", f"{local}@{DOMAIN}", "-M", HELO, f"127.0.0.1:{port}"),
        ]
        left = deadline - time.monotonic()
        if left <= 0:
            failures.append(f"{local}: not started, out of time")
            return
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=left, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            failures.append(f"{local}: smtp-source still running after {timeout:.0f} s")
            return
        if done.returncode != 0 or done.stderr.strip():
            failures.append(f"{local}: exit {done.returncode}: {done.stderr.strip()[:300]}")

    children0 = _cpu(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with ThreadPoolExecutor(work.sessions) as pool:
        for fut in [pool.submit(one, local, n) for local, n in work.runs()]:
            fut.result()
    seconds = time.perf_counter() - start
    return Drive(seconds, failures, _cpu(resource.RUSAGE_CHILDREN) - children0)


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


# ---- results ---------------------------------------------------------------------------------


@dataclass
class Meter:
    """CPU seconds of the machine and of this process from ``start`` to ``stop``."""

    def __init__(self) -> None:
        self.machine = -machine_busy()
        self.bench = -_cpu(resource.RUSAGE_SELF)

    def stop(self) -> Meter:
        self.machine += machine_busy()
        self.bench += _cpu(resource.RUSAGE_SELF)
        return self


@dataclass
class Result:
    case: str
    durable: int  # messages counted in mailboxes afterwards
    seconds: float  # until the last one was durable
    drive: Drive  # until the last 250, smtp-source's CPU and failures
    cpu: float  # the server's process tree, CPU seconds, until the last one was durable
    cpu_sys: float  # of which in the kernel (system time)
    meter: Meter  # the machine and this process (DNS, polling, the driver) over that time
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.notes.extend(self.drive.failures[:10])
        if len(self.drive.failures) > 10:
            self.notes.append(f"... {len(self.drive.failures)} smtp-source runs failed")

    def rate(self) -> float:
        return self.durable / self.seconds if self.seconds > 0 else 0.0

    def others(self) -> float:
        """Cores busy with anything but the server, smtp-source and this process during
        the drive: other users of the machine, and kernel work (softirq) not charged to
        a process. High values mean a noisy measurement."""
        rest = self.meter.machine - self.cpu - self.drive.smtp_source_cpu - self.meter.bench
        return max(rest, 0.0) / self.seconds if self.seconds else 0.0


def wait_quiet(limit: float, most: float = 0.25, window: float = 2.0) -> float:
    """Wait (up to ``limit`` seconds) for a ``window`` in which the machine kept at most
    ``most`` cores busy; returns the busy cores of the last window."""
    deadline = time.monotonic() + limit
    while True:
        before = machine_busy()
        time.sleep(window)
        busy = (machine_busy() - before) / window
        if busy <= most or time.monotonic() >= deadline:
            return busy


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (not idle, not waiting for I/O)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    return (total - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


# ---- mailfort ----------------------------------------------------------------------------------


def create_users(data_dir: Path, work: Workload) -> dict[str, str]:
    """Domain and users through the directory API in this process, with a cheap Argon2id
    (the cost only matters to logins, which this benchmark does not do). Returns
    local part -> mailbox id."""
    from mailfort.directory.service import Directory

    saved = {
        k: os.environ.get(k) for k in ("MAILFORT_ARGON2_MEMORY_KIB", "MAILFORT_ARGON2_TIME_COST")
    }
    os.environ["MAILFORT_ARGON2_MEMORY_KIB"] = "8192"
    os.environ["MAILFORT_ARGON2_TIME_COST"] = "1"
    data_dir.mkdir(parents=True, mode=0o700)
    directory = Directory.open(f"sqlite:///{data_dir / 'directory.sqlite3'}")
    try:
        directory.add_domain(DOMAIN)
        return {
            local: directory.add_user(f"{local}@{DOMAIN}", PASSWORD).user.mailbox_id
            for local in work.locals
        }
    finally:
        directory.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def spool_rows(path: Path) -> int:
    if not path.exists():
        return 0
    con = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        rows: list[Any] = con.execute("SELECT count(*) FROM spool").fetchall()
        return int(rows[0][0])
    finally:
        con.close()


def check_sample(data_dir: Path, local: str) -> tuple[int, str]:
    """Open one mailbox as its user (drains its spool): message count and the verdicts in
    the first message's Authentication-Results header."""
    from mailfort.directory.service import Directory
    from mailfort.store.service import MailStore

    directory = Directory.open(f"sqlite:///{data_dir / 'directory.sqlite3'}")
    store = MailStore(data_dir)
    try:
        unlocked = directory.unlock(f"{local}@{DOMAIN}", PASSWORD)
        mbx = store.open(unlocked.user.mailbox_id, unlocked.secrets)
        try:
            count = mbx.count()
            rows = mbx.messages("INBOX")
            raw = mbx.raw("INBOX", rows[0].uid) if rows else b""
        finally:
            store.release(unlocked.user.mailbox_id)
    finally:
        store.close()
        directory.close()
    head = raw.split(b"\r\n\r\n", 1)[0].replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ")
    found = [
        line.decode(errors="replace")
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"authentication-results:")
    ]
    verdicts = " ".join(re.findall(r"\b(?:spf|dkim|dmarc|arc)=\w+", found[0])) if found else ""
    return count, verdicts or "no Authentication-Results header"


@dataclass
class Profiling:
    outdir: Path
    rate: int = 200
    gil: bool = True  # sample only the thread holding the GIL (see the module docstring)


def run_mailfort(
    work: Workload,
    root: Path,
    dns_port: int,
    workers: int,
    timeout: float,
    profiling: Profiling | None = None,
) -> Result:
    data_dir = root / "var"
    ids = create_users(data_dir, work)
    log = (root / "mailfort.log").open("wb")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "mailfort.cli", "--data-dir", str(data_dir), "dev"),
            *("--dns", f"127.0.0.1:{dns_port}", "--workers", str(workers)),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.close()
    spy: Proc | None = None
    try:
        dev_json = data_dir / "dev.json"
        try:
            wait_for(dev_json.exists, 120, "mailfort dev", proc)
        except BaseException:
            raise RuntimeError(f"mailfort did not start:\n{tail(root / 'mailfort.log')}") from None
        port = int(json.loads(dev_json.read_text())["ports"]["smtp"])
        if profiling is not None:
            spy = start_spy(proc.pid, profiling)
        cpu0 = tree_cpu(proc.pid)
        meter = Meter()
        result = drive(port, work, timeout)
        meter.stop()
        cpu1 = tree_cpu(proc.pid)
        cpu, cpu_sys = sum(cpu1) - sum(cpu0), cpu1[1] - cpu0[1]
        if spy is not None:
            stop_spy(spy)
    finally:
        if spy is not None and spy.poll() is None:
            stop_spy(spy)
        stop_process(proc, timeout=60)
    durable = sum(spool_rows(data_dir / "mailboxes" / f"{mid}.spool") for mid in ids.values())
    out = Result("mailfort", durable, result.seconds, result, cpu, cpu_sys, meter)
    if proc.returncode not in (0, None):
        out.notes.append(f"mailfort exited {proc.returncode}: {tail(root / 'mailfort.log')}")
    sample = work.locals[0]
    count, verdicts = check_sample(data_dir, sample)
    out.notes.append(
        f"sample mailbox {sample}@{DOMAIN}: {count} messages (expected "
        f"{work.per_user(sample)}); first one: {verdicts}"
    )
    return out


def tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


# ---- Postfix ------------------------------------------------------------------------------------


def run_postfix(work: Workload, root: Path, lmtp: bool, timeout: float) -> Result:
    dovecot = DovecotLMTP(root / "dovecot") if lmtp else None
    postfix = Postfix(
        root / "postfix", free_port(), DOMAIN, work.locals, dovecot.socket if dovecot else None
    )
    try:
        if dovecot is not None:
            dovecot.start()
        postfix.start()
        maildirs = dovecot.maildirs(work.locals) if dovecot else postfix.maildirs()
        procs = [p.proc for p in (postfix, dovecot) if p is not None and p.proc is not None]
        cpu0 = [tree_cpu(p.pid) for p in procs]
        meter = Meter()
        start = time.perf_counter()
        result = drive(postfix.port, work, timeout)
        # No message can be in a Maildir before its 250, so polling starts now: scanning
        # Maildirs costs CPU the peer would otherwise have. Every 0.2 s, every 20 ms near
        # the end.
        deadline = time.monotonic() + timeout
        finished = False
        durable = 0
        while time.monotonic() < deadline:
            durable = maildir_count(maildirs)
            if durable >= work.messages:
                finished = True
                break
            time.sleep(0.02 if work.messages - durable < 400 else 0.2)
        seconds = time.perf_counter() - start
        meter.stop()
        cpu1 = [tree_cpu(p.pid) for p in procs]
        cpu = sum(map(sum, cpu1)) - sum(map(sum, cpu0))
        cpu_sys = sum(c[1] for c in cpu1) - sum(c[1] for c in cpu0)
        name = "Postfix+LMTP" if lmtp else "Postfix virtual"
        out = Result(name, durable, seconds, result, cpu, cpu_sys, meter)
        if not finished:
            out.notes.append(f"only {durable} of {work.messages} in the Maildirs before timeout")
            out.notes.append(postfix.log_tail())
        return out
    finally:
        postfix.stop()
        if dovecot is not None:
            dovecot.stop()


# ---- profile ------------------------------------------------------------------------------------


def start_spy(pid: int, profiling: Profiling) -> Proc:
    binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(binary).exists():
        raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
    profiling.outdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        binary, "record", "--pid", str(pid), "--subprocesses", "--nonblocking",
        "--full-filenames", "--format", "raw", "--rate", str(profiling.rate),
        "-o", str(profiling.outdir / "mailfort-stacks.txt"),
    ]  # fmt: skip
    if profiling.gil:
        cmd.append("--gil")
    spy = subprocess.Popen(
        cmd,
        stdout=(profiling.outdir / "py-spy.log").open("wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # py-spy attaches to the workers
    if spy.poll() is not None:
        raise RuntimeError(f"py-spy failed: {tail(profiling.outdir / 'py-spy.log')}")
    return spy


def stop_spy(spy: Proc) -> None:
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(60)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# Where a stack's samples go: the innermost frame that matches (file fragment, function
# prefix) names its stage. The innermost matching frame wins; within a frame, the first entry that matches.
STAGES: list[tuple[str, str, str]] = [
    ("mailfort/smtp/core.py", "", "SMTP protocol core (mailfort.smtp.core)"),
    # uvloop's write() sends at once: with --gil the syscall's samples include the time the
    # worker is preempted by the client it woke, so this is wall time more than CPU.
    ("mailfort/smtp/server.py", "SMTPProtocol._flush", "reply writes (send on loopback)"),
    ("mailfort/smtp/", "", "SMTP server and handler (mailfort.smtp)"),
    ("mailfort/directory/", "Directory.route", "RCPT: directory lookup"),
    ("/sqlalchemy/", "", "RCPT: directory lookup (SQLAlchemy)"),
    ("mailfort/auth/spf.py", "", "SPF"),
    ("/spf.py", "", "SPF (pyspf)"),
    ("mailfort/auth/dkim.py", "", "DKIM"),
    ("mailfort/auth/canon.py", "", "DKIM (canonicalisation)"),
    ("/dkim/", "", "DKIM (dkimpy)"),
    ("mailfort/auth/dmarc.py", "", "DMARC"),
    ("/publicsuffixlist/", "", "DMARC (public suffix list)"),
    ("mailfort/auth/arc.py", "", "ARC"),
    ("mailfort/auth/results.py", "", "Authentication-Results / parsing"),
    ("mailfort/dns.py", "", "DNS client"),
    ("/dns/", "", "DNS client (dnspython)"),
    ("mailfort/keys/", "", "sealing (mailfort.keys)"),
    ("/cryptography/", "", "crypto (cryptography)"),
    ("mailfort/store/spool.py", "", "spool"),
    ("mailfort/store/committer.py", "", "group commit (SQLite + fsync)"),
    ("mailfort/store/", "", "store"),
    ("mailfort/mail/", "", "mail parsing / CRLF"),
    ("/email/", "", "stdlib email"),
]


def _frames(stack: str) -> list[tuple[str, str]]:
    out = []
    for frame in stack.split(";"):
        if frame.startswith(("process ", "thread ")):
            continue
        m = _FRAME.match(frame)
        out.append((m["func"], m["file"]) if m else (frame, ""))
    return out


def _short(func: str, file: str) -> str:
    for marker in ("/site-packages/", "/src/", "/lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{func} ({file})"


# Functions whose inclusive share the summary reports (regex on the frame text). Coroutine
# frames show only while they run on the event loop; work they hand to threads is listed
# under its own entry (SPF, sync DNS, thread pool).
KEY_FUNCTIONS: list[tuple[str, str]] = [
    ("SMTP: ServerCore.next_event (framing, commands)", r"^ServerCore\.next_event "),
    ("SMTP: SMTPProtocol.connection_made (per-IP cap, banner)", r"^SMTPProtocol\.connection_made "),
    ("replies: SMTPProtocol._flush -> transport.write", r"^SMTPProtocol\._flush "),
    ("RCPT: Directory.route (SQLAlchemy, in a thread)", r"^Directory\.route "),
    ("DATA: InboundHandler.handle_DATA (event-loop side)", r"^InboundHandler\.handle_DATA "),
    ("  auth.authenticate (event-loop side)", r"^authenticate "),
    ("  SPF: spf._run_check (pyspf; inline when cached, else a thread)", r"^_run_check "),
    ("  DKIM: dkim.verify_dkim_parsed", r"^verify_dkim_parsed "),
    ("  DKIM: canonicalisation (auth.canon)", r"^(rfc822_parse|canonicalize_|signed_header_data) "),
    ("  DMARC: dmarc.discover_policy", r"^discover_policy "),
    ("  DMARC: dmarc.author_domains (plain From, else headerregistry)", r"^author_domains "),
    ("  store: MailStore.deliver (event-loop side)", r"^MailStore\.deliver "),
    ("  store: Spool.seal (in a thread)", r"^Spool\.seal "),
    ("  store: GroupCommitter (commit threads)", r"^GroupCommitter\._run "),
    ("DNS: Resolver._query (async)", r"^Resolver\._query "),
    ("DNS: Resolver.query_sync (pyspf's lookups)", r"^Resolver\.query_sync "),
    ("thread hand-offs: ThreadPoolExecutor.submit", r"^ThreadPoolExecutor\.submit "),
    ("thread pool workers: all work run by to_thread", r"^_worker "),
]


def summarize_profile(stacks: Path, messages: int, cpu: float, rate: int, top: int = 20) -> str:
    """Sample shares by stage, for key functions (inclusive) and by function (self); ms per
    message is a share times the measured CPU per message."""
    samples: list[tuple[list[tuple[str, str]], int]] = []
    for line in stacks.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            samples.append((_frames(stack), int(count)))
    total = sum(n for _, n in samples)
    if not total:
        return "profile: no samples"
    per_msg = cpu / messages * 1000
    self_t: collections.Counter[str] = collections.Counter()
    stage: collections.Counter[str] = collections.Counter()
    key: collections.Counter[str] = collections.Counter()
    patterns = [(label, re.compile(rx)) for label, rx in KEY_FUNCTIONS]
    for frames, n in samples:
        if frames:
            self_t[_short(*frames[-1])] += n
        label = "other (event loop, threads, stdlib)"
        for func, file in reversed(frames):
            hit = next((s for frag, fn, s in STAGES if frag in file and func.startswith(fn)), None)
            if hit is not None:
                label = hit
                break
        stage[label] += n
        texts = [f"{func} " for func, _file in frames]
        for name, rx in patterns:
            if any(rx.search(t) for t in texts):
                key[name] += n

    def row(name: str, n: int) -> str:
        return f"  {n / total:>6.1%} {n / total * per_msg:>7.3f}  {name}"

    head = f"  {'share':>6} {'ms/msg':>7}  what"
    covered = total / rate / max(cpu, 1e-9)
    return "\n".join(
        [
            f"profile: {total} samples at {rate} Hz = {total / rate:.1f} s, {covered:.0%} of the"
            f" workers' measured CPU ({cpu:.1f} s, {per_msg:.2f} ms/msg)",
            "by stage (innermost matching frame):",
            head,
            *(row(name, n) for name, n in stage.most_common()),
            "key functions (inclusive; they overlap):",
            head,
            *(row(name, key[name]) for name, _rx in KEY_FUNCTIONS),
            f"top {top} functions (self):",
            head,
            *(row(name, n) for name, n in self_t.most_common(top)),
        ]
    )


# ---- main -----------------------------------------------------------------------------------


def report(results: list[Result]) -> str:
    """One line per system; CPU columns are milliseconds per message."""
    lines = [
        f"{'system':<17}{'durable/s':>10}{'accepted/s':>11}{'server CPU':>11}{'(sys)':>7}"
        f"{'smtp-source':>12}{'bench proc':>11}{'durable':>9}",
    ]
    for r in results:
        n = max(r.durable, 1)
        acc = r.durable / r.drive.seconds if r.drive.seconds else 0.0
        lines.append(
            f"{r.case:<17}{r.rate():>10.0f}{acc:>11.0f}{r.cpu / n * 1000:>11.2f}"
            f"{r.cpu_sys / n * 1000:>7.2f}"
            f"{r.drive.smtp_source_cpu / n * 1000:>12.2f}{r.meter.bench / n * 1000:>11.2f}"
            f"{r.durable:>9}"
        )
    lines.append(
        "(CPU in ms per message: the server's process tree, and the kernel's part of it; the"
        " smtp-source processes; this process, i.e. the DNS replies, Maildir polling, driver)"
    )
    return "\n".join(lines)


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every server this bench started is stopped."""

    def raise_exit(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--sessions", type=int, default=20, help="concurrent SMTP sessions")
    ap.add_argument("--size", type=int, default=5000, help="message size in bytes")
    ap.add_argument("--workers", type=int, default=2, help="mailfort worker processes")
    ap.add_argument("--rounds", type=int, default=1, help="repeat; the best rate counts")
    ap.add_argument("--only", default=",".join(CASES), help="subset of " + ",".join(CASES))
    ap.add_argument("--no-dkim", action="store_true", help="send unsigned messages")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per case at most")
    ap.add_argument("--profile", type=Path, help="also profile one mailfort run into DIR")
    ap.add_argument(
        "--profile-all-threads",
        action="store_true",
        help="py-spy without --gil (threads blocked in C count as busy)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument(
        "--quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="before each case wait up to this long for an idle machine (shared machines)",
    )
    args = ap.parse_args()
    cases = [c.strip() for c in args.only.split(",") if c.strip()]
    if unknown := set(cases) - set(CASES):
        ap.error(f"--only: unknown {', '.join(sorted(unknown))}")
    if shutil.which("smtp-source") is None and not Path("/usr/sbin/smtp-source").exists():
        ap.error("smtp-source not found: install Debian's postfix (scripts/setup.sh --test)")
    if ({"virtual", "lmtp"} & set(cases)) and os.geteuid() != 0:
        ap.error("the Postfix cases need root; run as root or --only mailfort")

    work = Workload(args.messages, args.users, args.sessions, args.size)
    tmp = Path(tempfile.mkdtemp(prefix="mailfort-bench-", dir=os.environ.get("BENCH_DIR")))
    tmp.chmod(0o711)  # the peers' unprivileged processes reach their Maildirs below it
    dns_server: DNSServer | None = None
    dns: CachingDNS | None = None
    try:
        with terminate_on_sigterm():
            key_pem, public = (None, None) if args.no_dkim else dkim_key()
            write_messages(work, tmp / "messages", key_pem)
            dns_server = DNSServer()
            dns_server.set_zone(zone(public))
            dns = CachingDNS(dns_server.answer)
            size = sum(p.stat().st_size for p in work.files.values()) // len(work.files)
            print(
                f"{work.messages} messages of ~{size} bytes"
                f" ({'DKIM RSA-2048 signed' if work.signed else 'unsigned'}), {work.users} users,"
                f" {work.sessions} concurrent sessions (smtp-source, one connection per message);"
                f" mailfort --workers {args.workers}; {os.cpu_count()} CPUs",
                flush=True,
            )
            best: dict[str, Result] = {}
            for rnd in range(1, args.rounds + 1):
                for case in cases:
                    where = tmp / f"r{rnd}-{case}"
                    where.mkdir()
                    if args.quiet > 0:
                        idle = wait_quiet(args.quiet)
                        print(f"  (machine before {case}: {idle:.2f} cores busy)", flush=True)
                    if case == "mailfort":
                        res = run_mailfort(work, where, dns.port, args.workers, args.timeout)
                    else:
                        res = run_postfix(work, where, case == "lmtp", args.timeout)
                    print(
                        f"round {rnd} {res.case:<16} {res.rate():7.0f} durable/s"
                        f"  ({res.durable} in {res.seconds:.1f} s; CPU beside the measured"
                        f" processes: {res.others():.2f} of {os.cpu_count()} cores)",
                        flush=True,
                    )
                    for note in res.notes:
                        print(f"    {note}")
                    if res.durable != work.messages:
                        print(f"    WARNING: {res.durable} of {work.messages} durable")
                    if res.case not in best or res.rate() > best[res.case].rate():
                        best[res.case] = res
            results = list(best.values())
            print()
            print(report(results))
            rates = {r.case: r.rate() for r in results}
            mf = rates.get("mailfort")
            for peer, goal in (("Postfix virtual", 1.0), ("Postfix+LMTP", 2.0)):
                if mf and rates.get(peer):
                    print(f"mailfort/{peer}: {mf / rates[peer]:.2f}x (target >= {goal:.1f}x)")
            print(f"DNS: {dns.queries} queries, {dns.misses} answered by the zone, rest cached")
            if args.profile is not None:
                prof = Profiling(args.profile.resolve(), gil=not args.profile_all_threads)
                where = tmp / "profile-mailfort"
                where.mkdir()
                if args.quiet > 0:
                    idle = wait_quiet(args.quiet)
                    print(f"  (machine before the profile: {idle:.2f} cores busy)", flush=True)
                res = run_mailfort(work, where, dns.port, args.workers, args.timeout, prof)
                print(
                    f"\nprofiled run (py-spy{' --gil' if prof.gil else ''} attached):"
                    f" {res.rate():.0f} durable/s, CPU {res.cpu / max(res.durable, 1) * 1000:.2f}"
                    " ms/msg"
                )
                stacks = prof.outdir / "mailfort-stacks.txt"
                print(summarize_profile(stacks, res.durable, res.cpu, prof.rate))
                print(f"raw stacks: {prof.outdir / 'mailfort-stacks.txt'}")
            failed = [r for r in results if r.durable != work.messages]
            return 1 if failed else 0
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    finally:
        if dns is not None:
            dns.close()
        if dns_server is not None:
            dns_server.close()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
