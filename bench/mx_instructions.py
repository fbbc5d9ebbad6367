"""The MX's own cost per message in instructions, this tree against another revision.

    .venv/bin/python bench/mx_instructions.py [--against REV] [--messages 200] [--calls]

On a shared virtual machine the CPU time of one run varies by 10 % or more (other guests
take the cores: `top` shows the steal), so `smtp_inbound.py` cannot see a change worth a
few per cent. Instructions counted by valgrind's callgrind are the same from run to run
(+-0.1 % here), whatever else the machine does. This runs the MX's whole path for one
message in one process: `SMTPProtocol` on a transport that keeps what is written,
`InboundHandler` with SPF/DKIM/DMARC/ARC against a DNS server on loopback, and `MailStore`
sealing into the recipients' spools with fsync; the same message files as
`smtp_inbound.py` (DKIM-signed ~5 KB, 100 users, 10 sessions at a time). Counting starts
after a warm-up (caches, spools) and stops before shutdown (``callgrind_control``), and is
divided by the messages.

What it leaves out: the kernel (socket and disk system calls are not instructions of
ours), uvloop's socket work, and CPU that instructions do not show. Time does not follow
instructions one for one: the interpreter's instructions are slow ones, C loops over bytes
fast ones (regular expressions or byte counts done in C were a sixth of the instructions
but little of the time). ``--calls`` adds Python function calls per message (cProfile,
no valgrind), the better guide to interpreter time.

The reference is the same measurement of ``--against`` (default ``HEAD``) checked out in
a temporary git worktree and imported instead of this tree (``PYTHONPATH``); the ratio is
this tree's count over the reference's. Needs valgrind (Debian package).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_WARM = 200  # sessions before counting: one spool and one sealing epoch per user, DNS cached


class _Transport(asyncio.Transport):
    """Keeps what the server writes; closing reports the connection lost, as a socket's."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.written: list[bytes] = []
        self.closed = False
        self.wrote = asyncio.Event()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 25)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))
        self.wrote.set()

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)
            self.wrote.set()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _callgrind(instrumentation: str) -> None:
    """Switch counting on or off in the valgrind running us. The tool asks valgrind, which
    answers only while this process runs: wait for it without blocking."""
    control = subprocess.Popen(
        ["callgrind_control", "-i", instrumentation, str(os.getpid())], stdout=subprocess.DEVNULL
    )
    while control.poll() is None:
        await asyncio.sleep(0.05)
    if control.returncode != 0:
        raise RuntimeError(f"callgrind_control -i {instrumentation} failed")


def _child(messages: int, concurrency: int, count: str) -> None:
    """The measured process: the MX in-process, ``count`` = "callgrind" or "calls"."""
    import cProfile
    import pstats

    import smtp_inbound as load  # bench/smtp_inbound.py: the same messages and zone
    import uvloop

    from mailfort.directory.service import Directory
    from mailfort.dns import Nameserver, Resolver
    from mailfort.smtp import conncount
    from mailfort.smtp.inbound import InboundHandler, InboundPolicy
    from mailfort.smtp.server import ConnectionTable, smtp_factory
    from mailfort.store.service import MailStore

    from dnsserver import DNSServer

    tmp = Path(tempfile.mkdtemp(prefix="mailfort-mxins-"))
    work = load.Workload(100, 100, 1, 5000)
    key, public = load.dkim_key()
    load.write_messages(work, tmp / "messages", key)
    raw = {u: p.read_bytes().replace(b"\n", b"\r\n") for u, p in work.files.items()}
    load.create_users(tmp / "var", work)
    directory = Directory.open(f"sqlite:///{tmp / 'var' / 'directory.sqlite3'}")
    store = MailStore(tmp / "var")
    dns_server = DNSServer(ttl=3600)
    dns_server.set_zone(load.zone(public))
    # Valgrind runs ~50x slower: a lookup must not time out, nor a sealing epoch (5 s) end
    # within the run and charge its key encapsulation to a few messages only.
    resolver = Resolver([Nameserver("127.0.0.1", dns_server.port)], timeout=120, cache=True)
    import mailfort.keys.seal as seal

    seal.SealingEpoch.__init__.__defaults__ = (256, 1e9)  # type: ignore[attr-defined]
    handler = InboundHandler(directory, store, resolver, InboundPolicy(hostname="mx.bench.test"))
    table = ConnectionTable(conncount.create_node_table(2), 0)
    factory = smtp_factory(handler, "mx.bench.test", None, connections=table, chunking=True)

    async def session(i: int) -> None:
        local = work.locals[i % len(work.locals)]
        proto = factory()
        t = _Transport(proto)
        proto.connection_made(t)

        async def says(data: bytes | None, code: bytes) -> None:
            t.wrote.clear()
            seen = len(t.written) if data is not None else 0
            if data is not None:
                proto.data_received(data)
            while len(t.written) <= seen:
                if t.closed:
                    raise RuntimeError(f"session closed: {t.written!r}")
                t.wrote.clear()
                await t.wrote.wait()
            if not t.written[-1].startswith(code):
                raise RuntimeError(f"expected {code!r}, got {t.written[-1]!r}")

        await says(None, b"220")
        await says(f"HELO {load.HELO}\r\n".encode(), b"250")
        await says(f"MAIL FROM:<{load.SENDER}>\r\n".encode(), b"250")
        await says(f"RCPT TO:<{local}@{load.DOMAIN}>\r\n".encode(), b"250")
        await says(b"DATA\r\n", b"354")
        await says(raw[local] + b".\r\n", b"250 2.6.0")
        await says(b"QUIT\r\n", b"221")

    async def batch(start: int, n: int) -> None:
        for k in range(start, start + n, concurrency):
            await asyncio.gather(*(session(k + j) for j in range(min(concurrency, start + n - k))))

    async def main() -> None:
        await batch(0, _WARM)
        if count == "callgrind":
            await _callgrind("on")
        profile = cProfile.Profile() if count == "calls" else None
        if profile is not None:
            profile.enable()
        await batch(_WARM, messages)
        if profile is not None:
            profile.disable()
            print(f"CALLS {pstats.Stats(profile).total_calls / messages:.0f}", flush=True)  # type: ignore[attr-defined]
        if count == "callgrind":
            await _callgrind("off")

    try:
        uvloop.run(main())
    finally:
        store.close()
        directory.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(src: Path, messages: int, concurrency: int, count: str) -> float:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(src), str(ROOT / "bench"), str(ROOT / "tests")])
    )
    child = [sys.executable, __file__, "--child", count, "--messages", str(messages)]
    child += ["--concurrency", str(concurrency)]
    if count == "calls":
        out = subprocess.run(child, env=env, capture_output=True, text=True, check=True).stdout
        return float(re.findall(r"CALLS (\d+)", out)[-1])
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--callgrind-out-file=/dev/null"]
    done = subprocess.run(cmd + child, env=env, capture_output=True, text=True)
    found = re.findall(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"measured run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return int(found[-1]) / messages


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--against", default="HEAD", help="git revision to compare with")
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--calls", action="store_true", help="also Python calls per message")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.messages, args.concurrency, args.child)
        return 0
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        ap.error("needs valgrind (apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="mailfort-ref-") as ref:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", ref, args.against],
            check=True,
            capture_output=True,
        )
        try:
            trees = [("this tree", ROOT / "src"), (f"{args.against}", Path(ref) / "src")]
            figures: dict[str, tuple[float, float | None]] = {}
            for name, src in trees:
                started = time.monotonic()
                ins = _measure(src, args.messages, args.concurrency, "callgrind")
                calls = (
                    _measure(src, args.messages, args.concurrency, "calls") if args.calls else None
                )
                figures[name] = (ins, calls)
                print(
                    f"{name:>12}: {ins / 1e6:.3f} M instructions/msg"
                    + (f", {calls:.0f} Python calls/msg" if calls is not None else "")
                    + f"  ({time.monotonic() - started:.0f} s)",
                    flush=True,
                )
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", ref], capture_output=True
            )
    (mine, mine_calls), (theirs, theirs_calls) = figures["this tree"], figures[args.against]
    print(
        f"this tree / {args.against}: {mine / theirs:.3f}x instructions"
        + (f", {mine_calls / theirs_calls:.3f}x calls" if mine_calls and theirs_calls else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
