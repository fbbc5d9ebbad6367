"""Submission and outbound delivery rates, beside Postfix relaying the same load.

    .venv/bin/python bench/smtp_outbound.py [--messages N] [--clients 20]   (as root)

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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import aiosmtplib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from postfix_peer import PostfixMX  # noqa: E402

from dnsserver import DNSServer  # noqa: E402

SINK_ADDRESS = "127.0.0.3"
BODY = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 80)[:4500]


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Sink:
    """`smtp-sink -c`: prints `sess=N quit=N mesg=N` as mail arrives."""

    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen(
            ["smtp-sink", "-c", "-u", "nobody", f"{SINK_ADDRESS}:{port}", "256"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.count = 0
        self.last_change = time.monotonic()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        buf = b""
        while chunk := self.proc.stdout.read1(4096):  # type: ignore[attr-defined]
            buf = (buf + chunk)[-4096:]
            found = re.findall(rb"mesg=(\d+)", buf)
            if found and int(found[-1]) != self.count:
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


def measure(sink_port: int, count: int, load: Coroutine[Any, Any, float]) -> tuple[float, float]:
    """(accepted/s, delivered/s) for one load; the sink is stopped however the run ends."""
    sink = Sink(sink_port)
    try:
        start = time.monotonic()
        accepted = asyncio.run(load)
        delivered = sink.wait_for(count, timeout=600)
    finally:
        sink.stop()
    return count / (accepted - start), count / (delivered - start)


def run_mailfort(root: Path, count: int, clients: int, sink_port: int) -> tuple[float, float]:
    dns = DNSServer()
    dns.set_zone(
        {"sink.test": [("MX", (10, "mx.sink.test"))], "mx.sink.test": [("A", SINK_ADDRESS)]}
    )
    data_dir = root / "mailfort"
    env = {
        **os.environ,
        "MAILFORT_OUTBOUND_PORT": str(sink_port),
        "MAILFORT_HOSTNAME": "mx.example.test",
    }
    cli = [sys.executable, "-m", "mailfort.cli", "--data-dir", str(data_dir)]
    proc = subprocess.Popen(
        [*cli, "dev", "--workers", "2", "--dns", f"127.0.0.1:{dns.port}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "Ctrl-C stops" in line:
                break
        ports = json.loads((data_dir / "dev.json").read_text())["ports"]
        subprocess.run(
            [*cli, "user", "add", "alice@example.test", "--password-stdin"],
            input="a long bench passphrase\n", text=True, check=True, capture_output=True, env=env,
        )  # fmt: skip
        app = subprocess.run(
            [*cli, "app-password", "add", "alice@example.test", "--label", "bench"],
            input="a long bench passphrase\n", text=True, check=True, capture_output=True, env=env,
        ).stdout.strip()  # fmt: skip
        tls = ssl.create_default_context(cafile=str(data_dir / "tls" / "cert.pem"))
        auth = ("alice@example.test", app)
        return measure(
            sink_port,
            count,
            drive("127.0.0.1", ports["submission"], count, clients, tls=tls, auth=auth),
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        dns.close()


def run_postfix(count: int, clients: int, sink_port: int) -> tuple[float, float]:
    port = free_port("127.0.0.4")
    postfix = PostfixMX(
        "127.0.0.4", port, "unused.test", [], relayhost=f"[{SINK_ADDRESS}]:{sink_port}"
    )
    postfix.start()
    try:
        return measure(sink_port, count, drive("127.0.0.4", port, count, clients))
    finally:
        postfix.remove()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=20)
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
    with tempfile.TemporaryDirectory() as tmp:
        mf_accept, mf_deliver = run_mailfort(
            Path(tmp), args.messages, args.clients, free_port(SINK_ADDRESS)
        )
        pf_accept, pf_deliver = run_postfix(args.messages, args.clients, free_port(SINK_ADDRESS))
    print(f"{args.messages} messages of ~4.7 KB, {args.clients} concurrent submission sessions")
    print(f"{'':<34}{'mailfort':>10}{'Postfix':>10}{'ratio':>8}")
    print(
        f"{'submissions accepted per second':<34}{mf_accept:>10.0f}{pf_accept:>10.0f}{mf_accept / pf_accept:>7.2f}x"
    )
    print(
        f"{'delivered to smtp-sink per second':<34}{mf_deliver:>10.0f}{pf_deliver:>10.0f}{mf_deliver / pf_deliver:>7.2f}x"
    )
    print(
        "mailfort: STARTTLS + AUTH + DKIM (Ed25519 + RSA) + encrypted queue; Postfix: plain relay"
    )


if __name__ == "__main__":
    main()
