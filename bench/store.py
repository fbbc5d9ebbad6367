"""Deliveries per second into the store, beside the same workload on plain SQLite.

    .venv/bin/python bench/store.py [--messages N]

Four cases: sealed into the spool (mailbox closed) and filed into the open mailbox, each with
1 and 20 concurrent writers. The reference runs the same code and schema on an unencrypted
SQLite file (no sealing, no page encryption), so the ratio is the cost of encryption alone.
Every delivery is durable (fsync) before it counts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import apsw

from mailfort.keys.secrets import MailboxSecrets
from mailfort.store.committer import GroupCommitter
from mailfort.store.mailbox import Mailbox
from mailfort.store.service import MailStore, Recipient
from mailfort.store.spool import Delivery
from mailfort.store.sqlite import open_plain


class PlainMailbox(Mailbox):
    """The reference: the same mailbox code on an unencrypted file."""

    @staticmethod
    def _connect(path: Path, key: bytes, *, create: bool) -> apsw.Connection:
        return open_plain(path)


def message(n: int) -> bytes:
    body = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 80)[:4500]
    return (
        f"From: Sender <s{n}@remote.test>\r\nTo: user@example.test\r\nSubject: bench {n}\r\n"
        f"Message-ID: <{n}.{os.getpid()}@remote.test>\r\nDate: Sat, 28 Nov 2026 10:00:00 +0000\r\n"
        f"\r\n{body}\r\n"
    ).encode()


async def drive(deliver, count: int, writers: int) -> float:  # type: ignore[no-untyped-def]
    queue = iter(range(count))

    async def worker() -> None:
        for n in queue:
            await deliver(message(n))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(writers)))
    return count / (time.perf_counter() - start)


async def spool_case(root: Path, count: int, writers: int) -> tuple[float, float]:
    keys = MailboxSecrets.generate()
    store = MailStore(root / f"enc-spool-{writers}")
    rcpt = Recipient("a" * 32, keys.public_keys())
    enc = await drive(lambda raw: store.deliver(rcpt, raw), count, writers)
    store.close()
    # Reference: the raw message inserted into the same spool table, unsealed.
    path = root / f"plain-spool-{writers}.sqlite"
    con = open_plain(path)
    con.execute(
        "CREATE TABLE spool (id INTEGER PRIMARY KEY AUTOINCREMENT, epoch BLOB, sealed BLOB)"
    )
    committer = GroupCommitter(con, "plain")

    def insert(c: apsw.Connection, blob: bytes) -> None:
        c.execute("INSERT INTO spool(epoch, sealed) VALUES (?, ?)", (b"", blob))

    async def plain(raw: bytes) -> None:
        delivery = MailStore.new_delivery(raw)
        blob = await asyncio.to_thread(Delivery.to_bytes, delivery)
        await committer.run(lambda c: insert(c, blob))

    ref = await drive(plain, count, writers)
    committer.close()
    con.close()
    return enc, ref


async def mailbox_case(root: Path, count: int, writers: int) -> tuple[float, float]:
    results = []
    for cls, name in ((Mailbox, "enc"), (PlainMailbox, "plain")):
        mbx = cls(root / f"{name}-{writers}.mbx", os.urandom(32))

        async def deliver(raw: bytes, mbx: Mailbox = mbx) -> None:
            await mbx.deliver(MailStore.new_delivery(raw))

        results.append(await drive(deliver, count, writers))
        mbx.close()
    return results[0], results[1]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        root = Path(tmp)
        print(f"{args.messages} messages of ~5 KB each, fsync per commit, group commits")
        print(f"{'case':<28}{'mailfort/s':>12}{'plain SQLite/s':>16}{'ratio':>8}")
        for case, fn in (("spool (sealed)", spool_case), ("open mailbox", mailbox_case)):
            for writers in (1, 20):
                enc, ref = await fn(root, args.messages, writers)
                label = f"{case}, {writers} writer{'s' if writers > 1 else ''}"
                print(f"{label:<28}{enc:>12.0f}{ref:>16.0f}{ref / enc:>7.2f}x")
        print("ratio = plain rate / mailfort rate (time cost of encryption; target <= 1.3x)")


if __name__ == "__main__":
    asyncio.run(main())
