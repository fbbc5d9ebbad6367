"""Submission and outbound delivery rates, beside Postfix relaying the same load.

    .venv/bin/python bench/smtp_outbound.py [--messages N] [--clients 20] [--repeat 3]  (root)

Both sides deliver to Postfix's `smtp-sink` on 127.0.0.3, which counts what it accepts.
- mailfort: `mailfort dev --workers 2`; 20 clients each keep one submission session (587,
  STARTTLS, AUTH with an app password) and send their share; every message is DKIM-signed
  (Ed25519 + RSA), queued encrypted and fsynced before 250, then delivered by the engine
  (MX lookup through the loopback DNS server, STARTTLS offered by smtp-sink: no).
- Postfix: a private instance relaying from mynetworks to the sink (`relayhost`), driven by
  the same 20 clients over plain SMTP without AUTH or TLS and without signing: Postfix does
  less work per message here, which the ratio includes.
Printed: submissions accepted per second (all 250s received), and end-to-end delivered per
second (first submission to the sink's last count), and the ratios mailfort/Postfix.

CPU per message (user + system of the server's whole process tree, from /proc; the load
generator, the DNS server and the sink are not counted): wall-clock rates are noisy on a
shared machine, CPU time much less so. "accept" comes from a second run of each side whose
destination is a tarpit (a listening socket that never answers), so nothing is delivered
while it is measured; "deliver" is the full run's CPU minus that.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from _peers import descendants, tree_cpu  # noqa: E402

from mailfort.keys.server import ServerKey  # noqa: E402
from mailfort.outbound.queue import Queue  # noqa: E402
from postfix_peer import PostfixMX  # noqa: E402

from dnsserver import DNSServer  # noqa: E402

SINK_ADDRESS = "127.0.0.3"
TARPIT_ADDRESS = "127.0.0.5"
BODY = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 80)[:4500]


def free_port(host: str, *also: str) -> int:
    """A port free on ``host`` and on every address in ``also``."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        try:
            for other in also:
                with socket.socket() as s:
                    s.bind((other, port))
        except OSError:
            continue
        return port


class Tarpit:
    """A listening socket that never accepts: clients connect (or hang in SYN) and wait
    for a greeting that does not come, so nothing is delivered during an accept-only run."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.bind((TARPIT_ADDRESS, port))
        self.sock.listen(1024)

    def stop(self) -> None:
        self.sock.close()


class Run:
    """One side's figures for one load with delivery: rates and CPU per message."""

    def __init__(self, count: int, start: float, accepted: float, delivered: float,
                 cpu: list[float]) -> None:  # fmt: skip
        self.count = count
        self.accept_rate = count / (accepted - start)
        self.deliver_rate = count / (delivered - start)
        self.cpu_total_ms = (cpu[-1] - cpu[0]) * 1000 / count  # from start to the last delivery


@dataclass
class Phase:
    """One phase measured alone: messages per second and CPU ms per message."""

    rate: float
    cpu_ms: float


def cpu_of(pid: int) -> float:
    user, system = tree_cpu(pid)
    return user + system


class Sink:
    """`smtp-sink -c`: prints `sess=N quit=N mesg=N` as mail arrives."""

    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen(
            ["smtp-sink", "-c", "-u", "nobody", f"{SINK_ADDRESS}:{port}", "256"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.count = 0
        self.first_arrival = 0.0  # when the first message came
        self.last_change = time.monotonic()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        buf = b""
        while chunk := self.proc.stdout.read1(4096):  # type: ignore[attr-defined]
            buf = (buf + chunk)[-4096:]
            found = re.findall(rb"mesg=(\d+)", buf)
            if found and int(found[-1]) != self.count:
                if not self.count:
                    self.first_arrival = time.monotonic()
                self.count = int(found[-1])
                self.last_change = time.monotonic()

    def wait_for(self, total: int, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while self.count < total and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.count < total:
            raise RuntimeError(f"sink got {self.count} of {total} messages in {timeout} s")
        return self.last_change

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)


def message(n: int) -> bytes:
    return (
        f"From: Alice <alice@example.test>\r\nTo: <u{n % 100}@sink.test>\r\n"
        f"Subject: bench {n}\r\n\r\n{BODY}\r\n"
    ).encode()


async def drive(
    host: str,
    port: int,
    count: int,
    clients: int,
    *,
    tls: ssl.SSLContext | None = None,
    auth: tuple[str, str] | None = None,
) -> float:
    """Send ``count`` messages over ``clients`` sessions; the time when all were accepted."""
    numbers = iter(range(count))

    async def client() -> None:
        smtp = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=120)
        await smtp.connect()
        if tls is not None:
            await smtp.starttls(tls_context=tls)
        if auth is not None:
            await smtp.login(*auth)
        for n in numbers:
            await smtp.sendmail("alice@example.test", [f"u{n % 100}@sink.test"], message(n))
        await smtp.quit()

    await asyncio.gather(*(client() for _ in range(clients)))
    return time.monotonic()


def measure(sink_port: int, count: int, load: Coroutine[Any, Any, float], server_pid: int) -> Run:
    """One load, accepted and delivered to the sink, which is stopped however it ends."""
    sink = Sink(sink_port)
    try:
        cpu = [cpu_of(server_pid)]
        start = time.monotonic()
        accepted = asyncio.run(load)
        delivered = sink.wait_for(count, timeout=600)
        cpu.append(cpu_of(server_pid))
    finally:
        sink.stop()
    return Run(count, start, accepted, delivered, cpu)


def accept_only(
    sink_port: int, count: int, load: Coroutine[Any, Any, float], server_pid: int
) -> Phase:
    """The load with a tarpit as the destination: acceptance alone (the engine's first
    transactions wait for a greeting that never comes). The tarpit stays up."""
    cpu = cpu_of(server_pid)
    start = time.monotonic()
    accepted = asyncio.run(load)
    return Phase(count / (accepted - start), (cpu_of(server_pid) - cpu) * 1000 / count)


def deliver_only(
    sink: Sink, count: int, release: Callable[[], None], server_pid: Callable[[], int]
) -> Phase:
    """Delivery alone: the server holds ``count`` parked messages; ``release`` lets them go.
    The rate runs from the first arrival at the sink to the last (how long the release
    command itself takes to start is no part of it)."""
    cpu = cpu_of(server_pid())
    release()
    delivered = sink.wait_for(count, timeout=600)
    used = cpu_of(server_pid()) - cpu
    return Phase((count - 1) / (delivered - sink.first_arrival), used * 1000 / count)


class Mailfort:
    """`mailfort dev --workers 2` on a data directory, with alice's app password."""

    def __init__(self, root: Path, dns_port: int, sink_port: int) -> None:
        self.root = root
        self.data_dir = root / "mailfort"
        self.env = {
            **os.environ,
            "MAILFORT_OUTBOUND_PORT": str(sink_port),
            "MAILFORT_HOSTNAME": "mx.example.test",
            "PYTHONFAULTHANDLER": "1",
        }
        self.cli = [sys.executable, "-m", "mailfort.cli", "--data-dir", str(self.data_dir)]
        self.dns_port = dns_port
        self.app_password = ""
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "mailfort.stderr").open("a") as log:  # read it when a run goes wrong
            self.proc = subprocess.Popen(
                [*self.cli, "dev", "--workers", "2", "--dns", f"127.0.0.1:{self.dns_port}"],
                stdout=subprocess.PIPE, stderr=log, text=True, env=self.env,
            )  # fmt: skip
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if "Ctrl-C stops" in line:
                break
        if self.app_password:
            return
        self.run_cli("user", "add", "alice@example.test", "--password-stdin")
        self.app_password = self.run_cli(
            "app-password", "add", "alice@example.test", "--label", "bench"
        ).strip()

    def run_cli(self, *args: str) -> str:
        return subprocess.run(
            [*self.cli, *args], input="a long bench passphrase\n", text=True, check=True,
            capture_output=True, env=self.env,
        ).stdout  # fmt: skip

    def load(self, count: int, clients: int) -> Coroutine[Any, Any, float]:
        ports = json.loads((self.data_dir / "dev.json").read_text())["ports"]
        tls = ssl.create_default_context(cafile=str(self.data_dir / "tls" / "cert.pem"))
        auth = ("alice@example.test", self.app_password)
        return drive("127.0.0.1", ports["submission"], count, clients, tls=tls, auth=auth)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def park_queue(self) -> None:
        """Every waiting recipient due in an hour (mailfort stopped): nothing moves until
        `mailfort queue flush`."""
        queue = Queue(self.data_dir, ServerKey.load_or_create(self.data_dir))
        try:
            later = time.time() + 3600
            queue.committer.submit(
                lambda con: con.execute("UPDATE recipients SET next_attempt = ?", (later,))
            ).result()
        finally:
            queue.close()

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            # SIGABRT makes faulthandler (PYTHONFAULTHANDLER) print every thread's stack
            # into the log; the figures measured stand.
            for pid in reversed(descendants(proc.pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGABRT)
            proc.wait(timeout=30)
            stacks = (self.root / "mailfort.stderr").read_text(errors="replace").splitlines()
            print("mailfort did not stop in 60 s; its threads:", *stacks[-80:], sep="\n")


def sink_zone(address: str) -> dict[str, Any]:
    return {"sink.test": [("MX", (10, "mx.sink.test"))], "mx.sink.test": [("A", address)]}


def run_mailfort(root: Path, count: int, clients: int, sink_port: int) -> Run:
    dns = DNSServer()
    dns.set_zone(sink_zone(SINK_ADDRESS))
    server = Mailfort(root, dns.port, sink_port)
    try:
        server.start()
        return measure(sink_port, count, server.load(count, clients), server.pid)
    finally:
        server.stop()
        dns.close()


def split_mailfort(root: Path, count: int, clients: int, sink_port: int) -> tuple[Phase, Phase]:
    """Acceptance alone (to a tarpit), then delivery alone: the messages parked, mailfort
    restarted towards the sink, and `mailfort queue flush` (a process of its own, another
    worker's wake-up path) lets them go."""
    dns = DNSServer()
    dns.set_zone(sink_zone(TARPIT_ADDRESS))
    server = Mailfort(root, dns.port, sink_port)
    tarpit = Tarpit(sink_port)
    try:
        server.start()
        accepted = accept_only(sink_port, count, server.load(count, clients), server.pid)
        server.stop()
        tarpit.stop()
        server.park_queue()
        dns.set_zone(sink_zone(SINK_ADDRESS))
        sink = Sink(sink_port)
        try:
            server.start()
            delivered = deliver_only(
                sink, count, lambda: server.run_cli("queue", "flush"), lambda: server.pid
            )
        finally:
            sink.stop()
        return accepted, delivered
    finally:
        tarpit.stop()
        server.stop()
        dns.close()


def run_postfix(count: int, clients: int, sink_port: int) -> Run:
    port = free_port("127.0.0.4")
    postfix = PostfixMX(
        "127.0.0.4", port, "unused.test", [], relayhost=f"[{SINK_ADDRESS}]:{sink_port}"
    )
    postfix.start()
    try:
        assert postfix.proc is not None
        return measure(sink_port, count, drive("127.0.0.4", port, count, clients), postfix.proc.pid)
    finally:
        postfix.remove()


def split_postfix(count: int, clients: int, sink_port: int) -> tuple[Phase, Phase]:
    """As `split_mailfort`: relaying to a tarpit, then every message put on hold
    (``postsuper -h``), Postfix restarted towards the sink, and the hold released."""
    port = free_port("127.0.0.4")
    postfix = PostfixMX(
        "127.0.0.4", port, "unused.test", [], relayhost=f"[{TARPIT_ADDRESS}]:{sink_port}"
    )
    tarpit = Tarpit(sink_port)

    def tool(*args: str) -> None:
        # Not check=True: with Postfix stopped, postsuper does its work and then fails to
        # open the private log file as the postfix user.
        done = subprocess.run([*args[:1], "-c", str(postfix.conf), *args[1:]],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        if done.returncode != 0 and "fatal: open logfile" not in done.stderr:
            raise RuntimeError(f"{args}: {done.stderr}")

    try:
        postfix.start()
        assert postfix.proc is not None
        load = drive("127.0.0.4", port, count, clients)
        accepted = accept_only(sink_port, count, load, postfix.proc.pid)
        postfix.stop()
        tarpit.stop()
        tool("postsuper", "-h", "ALL")
        postfix.relayhost = f"[{SINK_ADDRESS}]:{sink_port}"
        sink = Sink(sink_port)
        try:
            postfix.start()

            def release() -> None:
                tool("postsuper", "-H", "ALL")
                tool("postqueue", "-f")

            def pid() -> int:
                assert postfix.proc is not None
                return postfix.proc.pid

            delivered = deliver_only(sink, count, release, pid)
        finally:
            sink.stop()
        return accepted, delivered
    finally:
        tarpit.stop()
        postfix.remove()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians are printed")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the Postfix reference needs root")
    os.environ.setdefault("MAILFORT_ARGON2_MEMORY_KIB", "8192")
    # The per-user limits (200 messages an hour by default) would stop the benchmark.
    for name in (
        "MESSAGES_PER_HOUR",
        "MESSAGES_PER_DAY",
        "RECIPIENTS_PER_HOUR",
        "RECIPIENTS_PER_DAY",
    ):
        os.environ[f"MAILFORT_SUBMISSION_{name}"] = str(10 * args.messages)
    n, clients = args.messages, args.clients
    full: dict[str, list[Run]] = {"mf": [], "pf": []}
    alone: dict[str, list[tuple[Phase, Phase]]] = {"mf": [], "pf": []}
    with tempfile.TemporaryDirectory() as tmp:
        # Rounds alternate the sides, so that both meet the same load from the machine's
        # other users; each figure is the median over the rounds.
        for r in range(args.repeat):
            root = Path(tmp) / str(r)
            full["mf"].append(run_mailfort(root / "full", n, clients, sink_port()))
            full["pf"].append(run_postfix(n, clients, sink_port()))
            alone["mf"].append(split_mailfort(root / "split", n, clients, sink_port()))
            alone["pf"].append(split_postfix(n, clients, sink_port()))

    def run_median(side: str, figure: Callable[[Run], float]) -> float:
        return statistics.median(figure(run) for run in full[side])

    def phase_median(side: str, which: int, figure: Callable[[Phase], float]) -> float:
        return statistics.median(figure(pair[which]) for pair in alone[side])

    print(
        f"{n} messages of ~4.7 KB, {clients} concurrent submission sessions;"
        f" median of {args.repeat} rounds"
    )
    print(f"{'':<40}{'mailfort':>10}{'Postfix':>10}{'ratio':>8}")

    def row(label: str, ours: float, theirs: float) -> None:
        print(f"{label:<40}{ours:>10.2f}{theirs:>10.2f}{ours / theirs:>7.2f}x")

    def rate(phase: Phase) -> float:
        return phase.rate

    def cpu(phase: Phase) -> float:
        return phase.cpu_ms

    print("both at once (submissions, then the sink's count):")
    row("  accepted per second", run_median("mf", lambda r: r.accept_rate),
        run_median("pf", lambda r: r.accept_rate))  # fmt: skip
    row("  delivered per second", run_median("mf", lambda r: r.deliver_rate),
        run_median("pf", lambda r: r.deliver_rate))  # fmt: skip
    row("  CPU ms per message", run_median("mf", lambda r: r.cpu_total_ms),
        run_median("pf", lambda r: r.cpu_total_ms))  # fmt: skip
    print("each phase alone:")
    row("  accepted per second (to a tarpit)", phase_median("mf", 0, rate),
        phase_median("pf", 0, rate))  # fmt: skip
    row("  CPU ms per accepted message", phase_median("mf", 0, cpu),
        phase_median("pf", 0, cpu))  # fmt: skip
    row("  delivered per second (from the queue)", phase_median("mf", 1, rate),
        phase_median("pf", 1, rate))  # fmt: skip
    row("  CPU ms per delivered message", phase_median("mf", 1, cpu),
        phase_median("pf", 1, cpu))  # fmt: skip
    rounds = "; ".join(
        f"{run.cpu_total_ms:.2f} = {a.cpu_ms:.2f} + {d.cpu_ms:.2f}"
        for run, (a, d) in zip(full["mf"], alone["mf"], strict=True)
    )
    print(f"mailfort CPU ms per message by round (both at once = accept + deliver): {rounds}")
    print(
        "mailfort: STARTTLS + AUTH + DKIM (Ed25519 + RSA) + encrypted queue; Postfix: plain relay"
    )


def sink_port() -> int:
    return free_port(SINK_ADDRESS, TARPIT_ADDRESS)


if __name__ == "__main__":
    main()
