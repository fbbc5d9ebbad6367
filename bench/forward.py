"""Forwarding: messages relayed per second and the latency forwarding adds, mailfort beside
Postfix with a virtual alias map and postsrsd, in one run.

    .venv/bin/python bench/forward.py [--messages 2000] [--clients 20] [--per-session 10]
                                      [--no-dkim] [--keep] [--quiet SECONDS]  (as root)

The load: ``--clients`` (20) concurrent senders in this process (raw asyncio sockets on
uvloop, no SMTP library: the client should cost as little CPU as it can, it shares the
machine with the servers). Each sender keeps a session for ``--per-session`` messages, as
an MTA's connection cache would, then reconnects. Every message is ~5 KB, distinct
(Subject, Message-ID), from ``sam@sender.test`` and DKIM-signed by sender.test (RSA-2048,
``--no-dkim`` to send unsigned); the bench DNS gives sender.test SPF
``v=spf1 ip4:127.0.0.0/8 -all`` and DMARC ``p=reject``, so mailfort's checks pass.
Latency is per message, from writing MAIL FROM to reading the reply to the end of DATA.
A sender that gets 421 as greeting (mailfort caps live connections per client address at
20, as many as there are senders here) tries again 50 ms later, as an MTA would retry
later; such refusals are counted and printed.

Three phases, each with a fresh Postfix ``smtp-sink`` on 127.0.0.3 that counts what it is
given:
- baseline: the same load straight to the sink (``a@sink.test``). "Added latency" is a
  system's latency minus this one (median minus median, p99 minus p99).
- mailfort: ``mailfort dev --workers 2``, alias ``fwd@example.test -> a@sink.test`` (CLI),
  the load to ``fwd@example.test``. mailfort checks SPF/DKIM/DMARC/ARC, rewrites the sender
  with SRS, DKIM-signs (Ed25519 + RSA) and ARC-seals, looks up sink.test's MX (the bench
  DNS: ``tests/dnsserver.py`` behind `_peers.CachingDNS`) and relays to the sink inside the
  session: its 250 means the sink accepted the copy. Nothing is queued.
- Postfix 3.7 (private instance, ``postfix -c DIR start-fg``): ``virtual_alias_maps``
  maps ``fwd@example.test`` to ``a@sink.test``, ``relayhost`` is the sink (no DNS), and
  Debian's postsrsd 1.x rewrites the envelope sender (``sender_canonical_maps =
  tcp:...`` with ``sender_canonical_classes = envelope_sender``, plus the reverse map for
  recipients as its README configures). No signing, no authentication checks. Postfix
  answers 250 once the message is fsynced in its queue (store and forward) and delivers
  afterwards: its latency is to a different guarantee than mailfort's, so its end-to-end
  rate (first MAIL FROM until the sink counted every message) is printed too.

CPU per message: user + system time of the server's whole process tree from /proc
(`_peers.tree_cpu`; reaped children included), over the measured load; for Postfix the
postsrsd process is added (and shown on its own). The sink, the DNS server and this process
(the load, DNS replies) are not in it; this process's CPU is printed for information, and
so are the cores busy with anything else during each load (other users of the machine).
On a shared machine the rates and latencies are noisy, the CPU per message much less so;
``--quiet SECONDS`` waits (up to that long) for an idle machine before each system.

Every message must get 250 and the sink must count all of them, else the run fails (exit 1)
after printing every refusal and the tail of the server's log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import math
import os
import re
import resource
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dkim
import uvloop
from _peers import CachingDNS, PrivatePostfix, smtp_banner, stop_process, tree_cpu, wait_for
from smtp_inbound import dkim_key, machine_busy, wait_quiet
from smtp_outbound import SINK_ADDRESS, Sink, free_port

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from dnsserver import DNSServer, Zone  # noqa: E402

POSTFIX_ADDRESS = "127.0.0.4"
SENDER = "sam@sender.test"
HELO = "mta.sender.test"
ALIAS = "fwd@example.test"
TARGET = "a@sink.test"
SELECTOR = "bench"
GREETING_RETRIES = 200
GREETING_PAUSE = 0.05  # seconds

# ---- the load ------------------------------------------------------------------------------


def messages(count: int, size: int, key_pem: bytes | None) -> list[bytes]:
    """``count`` distinct messages of about ``size`` bytes, each ready for the wire after
    DATA (CRLF, dot-stuffed, ending with the lone dot). mailfort recognises a retry by
    sender and content, so no two may be equal."""
    words = "privacy first mail forwarding benchmark body with ordinary words of plain prose"
    line = (words + " ") * 2
    out: list[bytes] = []
    date = email.utils.formatdate(localtime=False)
    for n in range(count):
        head = (
            f"From: Sam Sender <{SENDER}>\r\nTo: <{ALIAS}>\r\nSubject: forwarding bench {n}\r\n"
            f"Date: {date}\r\nMessage-ID: <{n}.{secrets.token_hex(6)}@sender.test>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        )
        body: list[str] = []
        target = size - len(head) - (620 if key_pem else 0)
        i = 0
        while sum(len(x) + 2 for x in body) < target:
            body.append(f"{n:05d}-{i:03d} {line[i % 7 :][:60]}")
            i += 1
        raw = (head + "\r\n".join(body) + "\r\n").encode()
        if key_pem is not None:
            raw = (
                dkim.sign(
                    raw,
                    SELECTOR.encode(),
                    b"sender.test",
                    key_pem,
                    canonicalize=(b"relaxed", b"relaxed"),
                    include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
                )
                + raw
            )
        stuffed = re.sub(rb"(?m)^\.", b"..", raw)
        out.append(stuffed + b".\r\n")
    return out


@dataclass
class Load:
    count: int
    latencies: list[float] = field(default_factory=list)  # seconds, accepted messages only
    refusals: list[str] = field(default_factory=list)  # "message N: stage: reply or error"
    first: float = math.inf  # monotonic: the first MAIL FROM
    last: float = 0.0  # monotonic: the last DATA reply
    sessions: int = 0
    client_cpu: float = 0.0  # this process (the senders, the DNS replies) over the load
    machine_cpu: float = 0.0  # every process on the machine over the load
    greeting_refusals: Counter[str] = field(default_factory=Counter)  # 421 at connect

    @property
    def accepted(self) -> int:
        return len(self.latencies)

    @property
    def seconds(self) -> float:
        return self.last - self.first

    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds > 0 else 0.0

    def median_ms(self) -> float:
        return statistics.median(self.latencies) * 1000 if self.latencies else math.nan

    def p99_ms(self) -> float:
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)] * 1000


async def _reply(reader: asyncio.StreamReader, timeout: float) -> tuple[int, str]:
    lines: list[bytes] = []
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line:
            raise ConnectionError("connection closed by the server")
        lines.append(line)
        if line[3:4] != b"-":
            break
    text = b" / ".join(x.rstrip() for x in lines).decode(errors="replace")
    return int(lines[-1][:3]), text


async def _drive(
    host: str,
    port: int,
    rcpt: str,
    wire: list[bytes],
    clients: int,
    per_session: int,
    timeout: float,
) -> Load:
    load = Load(len(wire))
    numbers = iter(range(len(wire)))
    mail = f"MAIL FROM:<{SENDER}>\r\n".encode()
    rcpt_cmd = f"RCPT TO:<{rcpt}>\r\n".encode()

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A session past EHLO. A 421 greeting (the server's per-address connection cap)
        is counted and retried after a pause, as a sending MTA would retry later."""
        for attempt in range(GREETING_RETRIES + 1):
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            try:
                code, text = await _reply(reader, timeout)
                if code == 421 and attempt < GREETING_RETRIES:
                    load.greeting_refusals[text] += 1
                    writer.close()
                    await asyncio.sleep(GREETING_PAUSE)
                    continue
                if code != 220:
                    raise ConnectionError(f"greeting {text}")
                writer.write(f"EHLO {HELO}\r\n".encode())
                code, text = await _reply(reader, timeout)
                if code != 250:
                    raise ConnectionError(f"EHLO {text}")
                return reader, writer
            except BaseException:
                writer.close()
                raise
        raise AssertionError("unreachable")

    async def session(batch: list[int]) -> None:
        load.sessions += 1
        done = 0
        opened: asyncio.StreamWriter | None = None
        try:
            reader, writer = await connect()
            opened = writer
            for n in batch:
                start = time.perf_counter()
                load.first = min(load.first, time.monotonic())
                writer.write(mail)
                code, text = await _reply(reader, timeout)
                stage = "MAIL"
                if code == 250:
                    writer.write(rcpt_cmd)
                    code, text = await _reply(reader, timeout)
                    stage = "RCPT"
                if code == 250:
                    writer.write(b"DATA\r\n")
                    code, text = await _reply(reader, timeout)
                    stage = "DATA"
                    if code == 354:
                        writer.write(wire[n])
                        await writer.drain()
                        code, text = await _reply(reader, timeout)
                        stage = "end of DATA"
                load.last = max(load.last, time.monotonic())
                done += 1
                if stage == "end of DATA" and code == 250:
                    load.latencies.append(time.perf_counter() - start)
                    continue
                load.refusals.append(f"message {n}: {stage}: {text}")
                writer.write(b"RSET\r\n")
                await _reply(reader, timeout)
            writer.write(b"QUIT\r\n")
            with contextlib.suppress(OSError, TimeoutError, ConnectionError):
                await _reply(reader, timeout)
                # The server closes after 221: wait for it, so the next session of this
                # sender does not overlap this one in the server's per-address count.
                await asyncio.wait_for(reader.read(), timeout)
        except (OSError, TimeoutError, ConnectionError) as exc:
            for n in batch[done:]:
                load.refusals.append(f"message {n}: {type(exc).__name__}: {exc}")
        finally:
            if opened is not None:
                opened.close()
                with contextlib.suppress(Exception):
                    await opened.wait_closed()

    async def sender() -> None:
        while batch := [n for _, n in zip(range(per_session), numbers, strict=False)]:
            await session(batch)

    await asyncio.gather(*(sender() for _ in range(clients)))
    return load


def drive(
    host: str, port: int, rcpt: str, wire: list[bytes], clients: int, per_session: int
) -> Load:
    cpu0, machine0 = _self_cpu(), machine_busy()
    load = uvloop.run(_drive(host, port, rcpt, wire, clients, per_session, timeout=120))
    load.client_cpu = _self_cpu() - cpu0
    load.machine_cpu = machine_busy() - machine0
    return load


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_of(pid: int) -> float:
    return sum(tree_cpu(pid))


# ---- results -------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    load: Load
    delivered: int = 0  # what the sink counted
    delivered_at: float = 0.0  # monotonic: the sink's last count
    cpu: float = 0.0  # server tree, whole phase (until the sink had everything)
    cpu_accept: float = 0.0  # server tree until the last 250
    cpu_extra: float = 0.0  # postsrsd's share of ``cpu``
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def e2e_rate(self) -> float:
        span = self.delivered_at - self.load.first
        return self.delivered / span if span > 0 else 0.0

    def per_msg_ms(self, seconds: float) -> float:
        return seconds * 1000 / max(self.load.count, 1)

    def others(self) -> float:
        """Cores busy with anything but the server and this process during the load: other
        users of the machine, the sink, kernel work not charged to a process."""
        rest = self.load.machine_cpu - self.cpu_accept - self.load.client_cpu
        return max(rest, 0.0) / self.load.seconds if self.load.seconds > 0 else 0.0

    def check(self, sink: Sink | None) -> None:
        n = self.load.count
        if self.load.accepted != n:
            self.failures.append(f"{self.name}: {self.load.accepted} of {n} messages got 250")
            counts = Counter(re.sub(r"message \d+: ", "", r)[:120] for r in self.load.refusals)
            self.failures.extend(f"  {k!r} x{v}" for k, v in counts.most_common(10))
        if sink is not None and self.delivered != n:
            self.failures.append(f"{self.name}: the sink counted {self.delivered} of {n}")


def sink_counted(sink: Sink, total: int, timeout: float) -> tuple[int, float]:
    """(messages the sink counted, when it last counted) after waiting up to ``timeout``
    for ``total``."""
    with contextlib.suppress(RuntimeError):
        sink.wait_for(total, timeout)
    time.sleep(0.3)  # anything beyond ``total`` would show up now
    return sink.count, sink.last_change


def start_sink() -> tuple[Sink, int]:
    port = free_port(SINK_ADDRESS)
    sink = Sink(port)
    wait_for(lambda: smtp_banner(port, SINK_ADDRESS), 20, "smtp-sink", sink.proc)
    sink.count = 0  # the readiness probe was a session, not a message
    return sink, port


def tail(path: Path, lines: int = 25) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


# ---- baseline ------------------------------------------------------------------------------


def run_baseline(wire: list[bytes], clients: int, per_session: int) -> Result:
    sink, port = start_sink()
    try:
        load = drive(SINK_ADDRESS, port, TARGET, wire, clients, per_session)
        res = Result("baseline", load)
        res.delivered, res.delivered_at = sink_counted(sink, len(wire), 30)
    finally:
        sink.stop()
    res.check(sink)
    return res


# ---- mailfort ------------------------------------------------------------------------------


def zone(dkim_public: str | None) -> dict[str, list[tuple[str, object] | str]]:
    records: dict[str, list[tuple[str, object] | str]] = {
        "sender.test": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all"), ("MX", (10, HELO))],
        HELO: [("TXT", "v=spf1 ip4:127.0.0.0/8 -all"), ("A", "127.0.0.1")],
        "_dmarc.sender.test": [("TXT", "v=DMARC1; p=reject")],
        "sink.test": [("MX", (10, "mx.sink.test"))],
        "mx.sink.test": [("A", SINK_ADDRESS)],
        "mx.example.test": [("A", "127.0.0.1")],
    }
    if dkim_public is not None:
        records[f"{SELECTOR}._domainkey.sender.test"] = [
            ("TXT", f"v=DKIM1; k=rsa; p={dkim_public}")
        ]
    return records


def zone_from_dns_output(text: str) -> Zone:
    """`mailfort domain dns` lines (``name ttl IN TYPE value``) as zone entries."""
    out: dict[str, list[tuple[str, object] | str]] = {}
    for line in text.splitlines():
        parts = line.split(" ", 4)
        if len(parts) != 5:
            continue
        name, _ttl, _cls, rtype, value = parts
        data: object
        if rtype == "TXT":
            data = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', value))
        elif rtype == "MX":
            pref, host = value.split()
            data = (int(pref), host.rstrip("."))
        else:
            continue
        out.setdefault(name.rstrip("."), []).append((rtype, data))
    return out


def run_mailfort(
    root: Path, wire: list[bytes], clients: int, per_session: int, dns: DNSServer, dns_port: int
) -> Result:
    root.mkdir(parents=True)
    sink, sink_port = start_sink()
    data_dir = root / "var"
    log_path = root / "mailfort.log"
    env = {
        **os.environ,
        "MAILFORT_OUTBOUND_PORT": str(sink_port),
        "MAILFORT_HOSTNAME": "mx.example.test",
    }
    cli = [sys.executable, "-m", "mailfort.cli", "--data-dir", str(data_dir)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*cli, "dev", "--workers", "2", "--dns", f"127.0.0.1:{dns_port}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )  # fmt: skip
    try:
        try:
            wait_for(lambda: "Ctrl-C stops" in tail(log_path), 120, "mailfort dev", proc)
        except BaseException:
            raise RuntimeError(f"mailfort did not start:\n{tail(log_path)}") from None

        def mailfort(*args: str) -> str:
            done = subprocess.run(
                [*cli, *args], capture_output=True, text=True, env=env, timeout=120, check=False
            )
            if done.returncode != 0:
                raise RuntimeError(f"mailfort {' '.join(args)}: {done.stderr.strip()}")
            return done.stdout

        mailfort("alias", "add", ALIAS, TARGET)
        dns.add_records(zone_from_dns_output(mailfort("domain", "dns", "example.test")))
        cpu0 = cpu_of(proc.pid)
        load = drive("127.0.0.1", int(_ports(data_dir)["smtp"]), ALIAS, wire, clients, per_session)
        cpu1 = cpu_of(proc.pid)
        res = Result("mailfort", load, cpu=cpu1 - cpu0, cpu_accept=cpu1 - cpu0)
        # In-session relay: every 250 means the sink already has the copy.
        res.delivered, res.delivered_at = sink_counted(sink, load.accepted, 10)
        res.delivered_at = min(res.delivered_at, load.last)
    finally:
        sink.stop()
        stop_process(proc, timeout=60)
    res.check(sink)
    if proc.returncode not in (0, None, -15):
        res.failures.append(f"mailfort exited {proc.returncode}")
    logged = log_path.read_text(errors="replace").splitlines()
    problems = [x for x in logged if re.search(r"\b(ERROR|WARNING|CRITICAL|Traceback)\b", x)]
    if problems:
        res.notes.append(f"mailfort log: {len(problems)} warning/error lines, e.g.:")
        res.notes.extend(f"  {x[:200]}" for x in problems[:8])
    if res.failures:
        res.failures.append(f"mailfort log ({log_path}), last lines:\n{tail(log_path)}")
    return res


def _ports(data_dir: Path) -> dict[str, int]:
    import json

    ports: dict[str, int] = json.loads((data_dir / "dev.json").read_text())["ports"]
    return ports


# ---- Postfix + postsrsd --------------------------------------------------------------------


class PostSRSd:
    """Debian's postsrsd 1.x on two loopback ports, with a secret file of its own; the
    process stays in the foreground (a child of this one) and drops to the postsrsd user."""

    def __init__(self, root: Path, domain: str) -> None:
        self.root = root
        self.domain = domain
        self.forward_port = free_port("127.0.0.1")
        self.reverse_port = free_port("127.0.0.1")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        """Start it and rewrite one address through it; returns that rewrite."""
        binary = shutil.which("postsrsd")
        if binary is None:
            raise RuntimeError("postsrsd not found (Debian: apt-get install postsrsd)")
        self.root.mkdir(parents=True, exist_ok=True)
        secret = self.root / "postsrsd.secret"
        secret.write_text(secrets.token_urlsafe(24) + "\n")
        secret.chmod(0o600)
        user = ["-upostsrsd"] if _user_exists("postsrsd") else []
        with (self.root / "postsrsd.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary, f"-s{secret}", f"-d{self.domain}", "-l127.0.0.1", "-4",
                    f"-f{self.forward_port}", f"-r{self.reverse_port}", *user,
                ],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        wait_for(
            lambda: _connectable(self.forward_port) and _connectable(self.reverse_port),
            20,
            "postsrsd",
            self.proc,
        )
        reply = self.lookup(self.forward_port, SENDER)
        if not reply.startswith("200 SRS0"):
            raise RuntimeError(f"postsrsd answered {reply!r} for {SENDER}")
        back = self.lookup(self.reverse_port, reply[4:])
        if back != f"200 {SENDER}":
            raise RuntimeError(f"postsrsd reversed {reply[4:]!r} to {back!r}")
        return reply[4:]

    @staticmethod
    def lookup(port: int, key: str) -> str:
        """One Postfix tcp_table request."""
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(f"get {key}\n".encode())
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(1024)
                if not chunk:
                    break
                data += chunk
        return data.decode(errors="replace").strip()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _connectable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class PostfixForwarder(PrivatePostfix):
    """Forwards ``fwd@example.test`` to the sink: a virtual alias domain, ``relayhost`` the
    sink, and (given ``srsd``) postsrsd's two tcp tables as its README configures them."""

    purpose = "bench/forward.py"
    hostname = "mx.example.test"
    interfaces = "loopback-only"

    def __init__(self, root: Path, sink_port: int, srsd: PostSRSd | None) -> None:
        super().__init__(root, free_port(POSTFIX_ADDRESS), POSTFIX_ADDRESS)
        self.relayhost = f"[{SINK_ADDRESS}]:{sink_port}"
        self.srsd = srsd

    def settings(self) -> str:
        (self.conf / "virtual").write_text(f"{ALIAS} {TARGET}\n")
        lines = f"virtual_alias_domains = example.test\nvirtual_alias_maps = texthash:{self.conf / 'virtual'}\n"
        if self.srsd is not None:
            lines += (
                f"sender_canonical_maps = tcp:127.0.0.1:{self.srsd.forward_port}\n"
                "sender_canonical_classes = envelope_sender\n"
                f"recipient_canonical_maps = tcp:127.0.0.1:{self.srsd.reverse_port}\n"
                "recipient_canonical_classes = envelope_recipient, header_recipient\n"
            )
        return lines


def run_postfix(root: Path, wire: list[bytes], clients: int, per_session: int) -> Result:
    notes: list[str] = []
    srsd: PostSRSd | None = PostSRSd(root / "postsrsd", "example.test")
    assert srsd is not None
    try:
        example = srsd.start()
        notes.append(f"postsrsd: {SENDER} -> {example}")
    except (RuntimeError, OSError, TimeoutError) as exc:
        notes.append(f"postsrsd could not be used ({exc}); Postfix runs WITHOUT SRS")
        srsd.stop()
        srsd = None
    sink, sink_port = start_sink()
    postfix = PostfixForwarder(root / "postfix", sink_port, srsd)
    try:
        postfix.start()
        assert postfix.proc is not None
        pids = [postfix.proc.pid] + ([srsd.proc.pid] if srsd and srsd.proc else [])
        cpu0 = [cpu_of(p) for p in pids]
        load = drive(POSTFIX_ADDRESS, postfix.port, ALIAS, wire, clients, per_session)
        cpu1 = [cpu_of(p) for p in pids]
        delivered, delivered_at = sink_counted(sink, load.accepted, 600)
        cpu2 = [cpu_of(p) for p in pids]
        res = Result(
            "Postfix",
            load,
            delivered,
            delivered_at,
            cpu=sum(cpu2) - sum(cpu0),
            cpu_accept=sum(cpu1) - sum(cpu0),
            cpu_extra=(cpu2[1] - cpu0[1]) if len(pids) > 1 else 0.0,
            notes=notes,
        )
        time.sleep(1.0)  # postlogd writes the log asynchronously
        log = postfix.log()
        sent = len(re.findall(r" status=sent ", log))
        srs_from = len(re.findall(r"qmgr\[\d+\]: \w+: from=<SRS0[=+-]", log))
        res.notes.append(
            f"Postfix log: {sent} status=sent, {srs_from} queued with an SRS0 envelope sender"
        )
        if srsd is not None and srs_from != load.accepted:
            res.failures.append(
                f"Postfix: {srs_from} of {load.accepted} messages had an SRS sender"
            )
    finally:
        sink.stop()
        postfix.stop()
        if srsd is not None:
            srsd.stop()
    res.check(sink)
    if res.failures:
        res.failures.append(f"Postfix log, last lines:\n{postfix.log_tail()}")
    return res


# ---- main ----------------------------------------------------------------------------------


def report(base: Result, mf: Result, pf: Result, srs: bool) -> str:
    head = f"{'':<46}{'baseline':>10}{'mailfort':>10}{'Postfix':>10}{'mf/PF':>8}"
    lines = [head]

    def row(label: str, b: float | None, m: float, p: float, ratio: bool = True) -> None:
        bs = f"{b:>10.2f}" if b is not None else f"{'':>10}"
        r = f"{m / p:>7.2f}x" if ratio and p else ""
        lines.append(f"{label:<46}{bs}{m:>10.2f}{p:>10.2f}{r}")

    bl = base.load
    row("accepted per second (all 250s)", bl.rate(), mf.load.rate(), pf.load.rate())
    row("delivered per second (sink has all)", base.e2e_rate(), mf.e2e_rate(), pf.e2e_rate())
    row("latency ms, median (MAIL FROM to DATA reply)", bl.median_ms(), mf.load.median_ms(),
        pf.load.median_ms())  # fmt: skip
    row("latency ms, p99", bl.p99_ms(), mf.load.p99_ms(), pf.load.p99_ms())
    row("added latency ms, median (minus baseline)", None,
        mf.load.median_ms() - bl.median_ms(), pf.load.median_ms() - bl.median_ms())  # fmt: skip
    row("added latency ms, p99 (minus baseline)", None, mf.load.p99_ms() - bl.p99_ms(),
        pf.load.p99_ms() - bl.p99_ms())  # fmt: skip
    row("server CPU ms/msg, until the sink had all", None, mf.per_msg_ms(mf.cpu),
        pf.per_msg_ms(pf.cpu))  # fmt: skip
    row("server CPU ms/msg, until the last 250", None, mf.per_msg_ms(mf.cpu_accept),
        pf.per_msg_ms(pf.cpu_accept))  # fmt: skip
    if srs:
        lines.append(
            f"{'  of which postsrsd':<46}{'':>10}{'':>10}{pf.per_msg_ms(pf.cpu_extra):>10.2f}"
        )
    row("this process CPU ms/msg (senders, DNS)", base.per_msg_ms(bl.client_cpu),
        mf.per_msg_ms(mf.load.client_cpu), pf.per_msg_ms(pf.load.client_cpu),
        ratio=False)  # fmt: skip
    lines.append(
        f"cores busy with anything else during the load (of {os.cpu_count()}): baseline"
        f" {base.others():.2f}, mailfort {mf.others():.2f}, Postfix {pf.others():.2f}"
    )
    lines.append(
        "connections refused at the greeting (421), then retried after"
        f" {GREETING_PAUSE * 1000:.0f} ms: baseline {bl.greeting_refusals.total()},"
        f" mailfort {mf.load.greeting_refusals.total()},"
        f" Postfix {pf.load.greeting_refusals.total()}"
    )
    for name, res in (("mailfort", mf), ("Postfix", pf)):
        for text, count in res.load.greeting_refusals.most_common(3):
            lines.append(f"  {name}: {count} x {text!r}")
    lines.append(
        f"sessions: {bl.sessions} per system; Postfix end-to-end {pf.delivered} in"
        f" {pf.delivered_at - pf.load.first:.1f} s, mailfort {mf.load.seconds:.1f} s"
    )
    return "\n".join(lines)


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix="mailfort-bench-fwd-"))
    tmp.chmod(0o711)  # Postfix's unprivileged daemons walk down to their queue
    try:
        yield tmp
    finally:
        if keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=20, help="concurrent senders")
    ap.add_argument("--per-session", type=int, default=10, help="messages per SMTP session")
    ap.add_argument("--size", type=int, default=5000, help="message size in bytes")
    ap.add_argument("--no-dkim", action="store_true", help="send unsigned messages")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument(
        "--quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="before each system wait up to this long for an idle machine (shared machines)",
    )
    args = ap.parse_args()

    def settle(what: str) -> None:
        if args.quiet > 0:
            busy = wait_quiet(args.quiet)
            print(f"  (machine before {what}: {busy:.2f} cores busy)", flush=True)

    if os.geteuid() != 0:
        ap.error("the Postfix reference needs root")
    for tool in ("postfix", "smtp-sink"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} not found: install Debian's postfix")
    key_pem, public = (None, None) if args.no_dkim else dkim_key()
    wire = messages(args.messages, args.size, key_pem)
    size = sum(map(len, wire)) // len(wire)
    dns_server = DNSServer()
    dns_server.set_zone(zone(public))
    dns = CachingDNS(dns_server.answer)
    try:
        with workdir(args.keep) as tmp:
            print(
                f"{args.messages} messages of ~{size} bytes"
                f" ({'unsigned' if args.no_dkim else 'DKIM RSA-2048 signed'}), {args.clients}"
                f" concurrent senders, {args.per_session} messages per session;"
                f" {os.cpu_count()} CPUs",
                flush=True,
            )
            settle("the baseline")
            base = run_baseline(wire, args.clients, args.per_session)
            print(f"  baseline: {base.load.rate():.0f}/s", flush=True)
            settle("mailfort")
            mf = run_mailfort(tmp / "mailfort", wire, args.clients, args.per_session,
                              dns_server, dns.port)  # fmt: skip
            print(f"  mailfort: {mf.load.rate():.0f}/s", flush=True)
            settle("Postfix")
            pf = run_postfix(tmp / "postfix", wire, args.clients, args.per_session)
            print(f"  Postfix:  {pf.load.rate():.0f}/s accepted", flush=True)
            srs = not any("WITHOUT SRS" in n for n in pf.notes)
            print()
            print(report(base, mf, pf, srs))
            for note in mf.notes + pf.notes:
                print(note)
            print(
                "mailfort answers 250 after the sink accepted the relayed copy (SPF/DKIM/DMARC/"
                "ARC checks, SRS, DKIM Ed25519+RSA, ARC seal, MX lookup, nothing on disk);\n"
                "Postfix answers 250 once the message is fsynced in its queue and relays later"
                f" ({'postsrsd SRS' if srs else 'NO SRS'}, no signing, no checks, relayhost by"
                " IP):\nthe latencies are to different guarantees; compare Postfix's delivered/s."
            )
            print(f"DNS: {dns.queries} queries, {dns.misses} answered by the zone, rest cached")
            failures = base.failures + mf.failures + pf.failures
            if failures:
                print("\nFAILED:", file=sys.stderr)
                for failure in failures:
                    print(failure, file=sys.stderr)
                return 1
            return 0
    finally:
        dns.close()
        dns_server.close()


if __name__ == "__main__":
    sys.exit(main())
