"""IMAP: mailfort against a private Dovecot (Maildir), the same operations in one run.

    .venv/bin/python bench/imap.py [--messages 10000] [--idle 1000] [--repeat 5]
                                   [--only mailfort|dovecot]

Both servers get the same 10,000 generated messages by APPEND (rate, and server CPU per
message: a noisy shared machine still measures that fairly), then each operation runs
on an already SELECTed mailbox, once to warm caches and `--repeat` times timed (the median
is printed): SELECT, UID FETCH 1:* (FLAGS), FETCH 1:* ENVELOPE, UID SEARCH FROM, SEARCH BODY,
FETCH of BODY.PEEK[] for 1,000 messages, STORE of a flag on every message; then LOGIN/LOGOUT
per second on fresh TLS connections (mailfort with an app password, Dovecot with a
SHA512-CRYPT passwd-file entry), and resident memory per idle IDLE connection with
`--idle` connections open (RSS, and PSS, of the server's whole process tree, delta over
the connection count).

Timing uses a raw-socket client (tests/interop/rawimap.py): imaplib's own parsing costs
more than a fast server's work on the large answers (stack-notes). Every loop is bounded in
count and in time; everything listens on 127.0.0.1 and stops at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import resource
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from interop.dovecot import dovecot_binary, process_tree  # noqa: E402
from interop.rawimap import Literal, RawImap, quote, tls_client_context  # noqa: E402
from interop.servers import (  # noqa: E402
    HOST,
    Account,
    Target,
    running_dovecot_target,
    running_mailfort,
)

NEEDLE_FROM = "needle.sender@bench.test"  # UID SEARCH FROM: about 1 % of the messages
NEEDLE_WORD = "zanzibar"  # SEARCH BODY: about 1 % of the bodies
FLAG = b"(\\Flagged)"
OP_BUDGET = 60.0  # seconds at most for the repeats of one operation
WORDS = [
    *("account", "invoice", "meeting", "project", "report", "schedule", "budget", "review"),
    *("update", "draft", "team", "client", "release", "issue", "feature", "design"),
    *("server", "network", "storage", "backup", "monday", "tuesday", "quarter", "annual"),
    *("summary", "notes", "agenda", "follow", "question", "answer"),
]


# ---- the mailbox ------------------------------------------------------------------------


def message(i: int, rng: random.Random) -> bytes:
    sender = NEEDLE_FROM if i % 100 == 7 else f"person{rng.randrange(300)}@example.org"
    words = [rng.choice(WORDS) for _ in range(rng.randrange(150, 900))]
    if i % 100 == 42:
        words[rng.randrange(len(words))] = NEEDLE_WORD
    lines = [" ".join(words[j : j + 12]) for j in range(0, len(words), 12)]
    head = (
        f"From: Person {i % 300} <{sender}>\r\n"
        f"To: Bench User <bench@example.test>\r\n"
        f"Subject: {' '.join(rng.choice(WORDS) for _ in range(5))} #{i}\r\n"
        f"Date: Mon, 3 Jun 2024 {i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d} +0000\r\n"
        f"Message-ID: <bench-{i}@example.org>\r\n"
        "MIME-Version: 1.0\r\n"
    )
    text = "\r\n".join(lines) + "\r\n"
    if i % 10:
        return (head + "Content-Type: text/plain; charset=utf-8\r\n\r\n" + text).encode()
    # One message in ten has an attachment.
    blob = rng.randbytes(rng.randrange(2000, 12000)).hex()
    attachment = "\r\n".join(blob[j : j + 76] for j in range(0, len(blob), 76))
    return (
        (
            head + 'Content-Type: multipart/mixed; boundary="b-{0}"\r\n\r\n'
            "--b-{0}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{1}"
            "--b-{0}\r\nContent-Type: application/octet-stream; name=data.bin\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n{2}\r\n--b-{0}--\r\n"
        )
        .format(i, text, attachment)
        .encode()
    )


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU of the processes, with what their exited children used
    (Dovecot's per-connection imap process is gone by the time a fill ends)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / os.sysconf("SC_CLK_TCK")


def connect(target: Target) -> RawImap:
    return RawImap(HOST, target.ports["imaps"], context=tls_client_context(target.cafile))


def fill(target: Target, account: Account, count: int, batch: int = 200) -> float:
    """APPEND `count` messages, pipelined in batches; returns the seconds it took."""
    rng = random.Random(20240603)
    conn = connect(target)
    conn.capability()
    conn.login(account.user, account.password)
    start = time.perf_counter()
    done = 0
    while done < count:
        tags = []
        for i in range(done, min(count, done + batch)):
            tag = conn.new_tag()
            conn._send_command(tag, [b"APPEND", b"INBOX", Literal(message(i, rng))])
            tags.append(tag)
        for tag in tags:
            r = conn.read_response(tag)
            if r.status != b"OK":
                raise RuntimeError(f"{target.name}: APPEND failed: {r.status!r} {r.text!r}")
        done += len(tags)
    elapsed = time.perf_counter() - start
    conn.logout()
    return elapsed


# ---- timed operations -------------------------------------------------------------------


@dataclass
class Result:
    seconds: dict[str, float] = field(default_factory=dict)  # median per operation
    sizes: dict[str, int] = field(default_factory=dict)  # answer bytes per operation
    extra: dict[str, float] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)  # matches per SEARCH


def operations(n: int) -> list[tuple[str, Callable[[int], list[bytes]]]]:
    lo = max(1, n // 2 - 499)
    hi = min(n, lo + 999)
    return [
        ("SELECT INBOX", lambda k: [b"SELECT", b"INBOX"]),
        ("UID FETCH 1:* (FLAGS)", lambda k: [b"UID", b"FETCH", b"1:*", b"(FLAGS)"]),
        ("FETCH 1:* ENVELOPE", lambda k: [b"FETCH", b"1:*", b"ENVELOPE"]),
        ("UID SEARCH FROM", lambda k: [b"UID", b"SEARCH", b"FROM", NEEDLE_FROM.encode()]),
        ("SEARCH BODY", lambda k: [b"SEARCH", b"BODY", NEEDLE_WORD.encode()]),
        (
            f"FETCH {hi - lo + 1} BODY.PEEK[]",
            lambda k: [b"FETCH", b"%d:%d" % (lo, hi), b"BODY.PEEK[]"],
        ),
        (
            "STORE 1:* +/-FLAGS.SILENT",
            # Alternate, so that every timed STORE changes every message.
            lambda k: [b"STORE", b"1:*", b"-FLAGS.SILENT" if k % 2 else b"+FLAGS.SILENT", FLAG],
        ),
    ]


def time_operations(target: Target, account: Account, count: int, repeat: int) -> Result:
    result = Result()
    conn = connect(target)
    conn.capability()
    conn.login(account.user, account.password)
    conn.ok(b"SELECT", b"INBOX")
    for name, parts in operations(count):
        samples: list[float] = []
        budget = time.monotonic() + OP_BUDGET
        for k in range(repeat + 1):  # the first run warms caches and is not counted
            start = time.perf_counter()
            status, size = conn.timed(*parts(k))
            elapsed = time.perf_counter() - start
            if status != b"OK":
                raise RuntimeError(f"{target.name}: {name} answered {status!r}")
            if k:
                samples.append(elapsed)
                result.sizes[name] = size
            if time.monotonic() > budget:
                break
        result.seconds[name] = statistics.median(samples) if samples else float("nan")
        if "SEARCH" in name:
            # A fast wrong answer is no result: keep the hits to compare the servers.
            r = conn.command(*parts(0))
            hits = [ln.split()[2:] for ln in r.untagged if ln.upper().startswith(b"* SEARCH")]
            result.hits[name] = sum(len(h) for h in hits)
    conn.logout()
    return result


def login_rate(target: Target, account: Account, seconds: float, limit: int) -> float:
    """LOGIN + LOGOUT per second, each on a fresh TLS connection (as mail clients do)."""
    ctx = tls_client_context(target.cafile)
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while done < limit and time.perf_counter() < deadline:
        conn = RawImap(HOST, target.ports["imaps"], context=ctx)
        conn.ok(b"LOGIN", quote(account.user.encode()), quote(account.password.encode()))
        conn.command(b"LOGOUT")
        conn.close()
        done += 1
    return done / (time.perf_counter() - start)


# ---- memory per idle connection -----------------------------------------------------------


def memory_kib(pids: list[int]) -> tuple[int, int]:
    """Summed RSS and PSS (KiB) of the processes; PSS shares common pages fairly."""
    rss = pss = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
    return rss, pss


async def _idle_one(
    target: Target, account: Account, ctx: ssl.SSLContext, sem: asyncio.Semaphore
) -> asyncio.StreamWriter:
    async with sem:
        reader, writer = await asyncio.open_connection(
            HOST, target.ports["imaps"], ssl=ctx, server_hostname=HOST
        )

        async def until(prefix: bytes, tagged: bool = True) -> None:
            while True:
                line = await reader.readline()
                if not line:
                    raise ConnectionError("closed by the server")
                if line.startswith(prefix):
                    if tagged and not line[len(prefix) :].startswith(b"OK"):
                        raise ConnectionError(line.decode(errors="replace").strip())
                    return

        await until(b"* OK", tagged=False)
        login = b"a LOGIN " + quote(account.user.encode()) + b" " + quote(account.password.encode())
        writer.write(login + b"\r\nb SELECT INBOX\r\nc IDLE\r\n")
        await until(b"a ")
        await until(b"b ")
        await until(b"+", tagged=False)
        return writer


async def _idle_all(
    target: Target, account: Account, count: int, deadline: float
) -> tuple[list[asyncio.StreamWriter], int]:
    ctx = tls_client_context(target.cafile)
    sem = asyncio.Semaphore(25)
    tasks = [asyncio.create_task(_idle_one(target, account, ctx, sem)) for _ in range(count)]
    done, pending = await asyncio.wait(tasks, timeout=max(1.0, deadline - time.monotonic()))
    for t in pending:
        t.cancel()
    writers = [t.result() for t in done if not t.cancelled() and t.exception() is None]
    failed = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
    if failed:
        print(f"  {target.name}: {len(failed)} IDLE connections failed, e.g. {failed[0]!r}")
    return writers, len(pending)


def idle_memory(
    target: Target, account: Account, pids: Callable[[], list[int]], count: int
) -> dict[str, float]:
    async def run() -> dict[str, float]:
        before = memory_kib(pids())
        start = time.monotonic()
        writers, timed_out = await _idle_all(target, account, count, start + 240)
        opened = time.monotonic() - start
        await asyncio.sleep(3)  # let lazily freed memory and late allocations settle
        after = memory_kib(pids())
        processes = len(pids())
        for w in writers:
            w.close()
        await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
        n = max(1, len(writers))
        return {
            "connections": len(writers),
            "timed out": timed_out,
            "seconds to open": opened,
            "RSS KiB/conn": (after[0] - before[0]) / n,
            "PSS KiB/conn": (after[1] - before[1]) / n,
            "processes": processes,
        }

    return asyncio.run(run())


# ---- the run ------------------------------------------------------------------------------


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, needed))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


@contextlib.contextmanager
def server(kind: str, root: Path, idle: int) -> Iterator[tuple[Target, Callable[[], list[int]]]]:
    if kind == "dovecot":
        with running_dovecot_target(max_connections=idle + 100) as d:
            assert d.server.proc is not None
            pid = d.server.proc.pid
            yield d, lambda: process_tree(pid)
    else:
        with running_mailfort(root / "mailfort", need=("imaps",)) as m:
            pid = m.proc.pid
            yield m, lambda: process_tree(pid)


def bench_one(kind: str, args: argparse.Namespace, root: Path) -> Result:
    with server(kind, root, args.idle) as (target, pids):
        account = target.add_account("bench")
        print(f"{kind}: filling {args.messages} messages ...", flush=True)
        cpu_before = cpu_seconds(pids())
        took = fill(target, account, args.messages)
        # CPU per message is what a shared, noisy machine still measures fairly.
        append_cpu = (cpu_seconds(pids()) - cpu_before) / args.messages * 1000
        print(
            f"  APPEND: {args.messages / took:.0f} messages/s, "
            f"{append_cpu:.2f} ms server CPU per message",
            flush=True,
        )
        result = time_operations(target, account, args.messages, args.repeat)
        result.extra["APPEND msg/s"] = args.messages / took
        result.extra["APPEND CPU ms/msg"] = append_cpu
        for name, secs in result.seconds.items():
            hits = f"  ({result.hits[name]} hits)" if name in result.hits else ""
            kib = result.sizes.get(name, 0) / 1024
            print(f"  {name:<28} {secs * 1000:9.1f} ms {kib:9.0f} KiB{hits}", flush=True)
        rate = login_rate(target, account, args.login_seconds, args.login_limit)
        result.extra["LOGIN/LOGOUT per s"] = rate
        print(f"  LOGIN/LOGOUT per second     {rate:9.1f}", flush=True)
        mem = idle_memory(target, account, pids, args.idle)
        for k, v in mem.items():
            result.extra[f"IDLE {k}"] = v
        print(
            f"  IDLE x{mem['connections']:.0f}: {mem['RSS KiB/conn']:.0f} KiB RSS, "
            f"{mem['PSS KiB/conn']:.0f} KiB PSS per connection "
            f"({mem['processes']:.0f} processes, {mem['seconds to open']:.1f} s to open)",
            flush=True,
        )
        return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--messages", type=int, default=10_000)
    p.add_argument("--idle", type=int, default=1_000, help="idle IDLE connections to hold")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--login-seconds", type=float, default=5.0)
    p.add_argument("--login-limit", type=int, default=2_000)
    p.add_argument("--only", choices=("mailfort", "dovecot"))
    args = p.parse_args()
    if dovecot_binary() is None and args.only != "mailfort":
        sys.exit("bench/imap.py: needs Dovecot (Debian dovecot-imapd; scripts/setup.sh --test)")
    # The servers inherit this: each idle connection is a descriptor on both sides.
    raise_fd_limit(4 * args.idle + 1024)
    kinds = [args.only] if args.only else ["mailfort", "dovecot"]
    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(prefix="bench-imap-") as tmp:
        for kind in kinds:
            results[kind] = bench_one(kind, args, Path(tmp))
    if len(results) < 2:
        return
    m, d = results["mailfort"], results["dovecot"]
    print(f"\n{'':<30}{'mailfort':>12}{'dovecot':>12}{'mailfort/dovecot':>18}")
    for name in m.seconds:
        a, b = m.seconds[name] * 1000, d.seconds[name] * 1000
        print(f"{name + ' (ms)':<30}{a:12.1f}{b:12.1f}{a / b:18.2f}")
    for name in (
        "LOGIN/LOGOUT per s",
        "IDLE RSS KiB/conn",
        "IDLE PSS KiB/conn",
        "APPEND msg/s",
        "APPEND CPU ms/msg",
    ):
        a, b = m.extra[name], d.extra[name]
        print(f"{name:<30}{a:12.1f}{b:12.1f}{a / b if b else float('nan'):18.2f}")
    print("(times, CPU: below 1 is faster than Dovecot; rates: above 1 is faster; memory: below 1)")
    for name, n in m.hits.items():
        if d.hits.get(name) != n:
            print(f"WARNING: {name} found {n} messages on mailfort, {d.hits.get(name)} on Dovecot")


if __name__ == "__main__":
    main()
