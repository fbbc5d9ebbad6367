"""A delivery process for the crash test: prints `OK <id>` once each delivery is durable.

Run as: python crash_writer.py DATA_DIR ADDRESS PREFIX [SECRET]
With SECRET the mailbox is held open (direct delivery); without, mail goes to the spool.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from mailfort.delivery import recipient
from mailfort.directory.service import Directory
from mailfort.store.service import MailStore


async def main() -> None:
    data_dir, address, prefix = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    directory = Directory.open(f"sqlite:///{data_dir / 'directory.sqlite3'}")
    store = MailStore(data_dir)
    if len(sys.argv) > 4:
        unlocked = directory.unlock(address, sys.argv[4])
        store.open(unlocked.user.mailbox_id, unlocked.secrets)
    user = directory.get_user(address)
    assert user is not None
    rcpt = recipient(user)
    counter = 0

    async def one(n: int) -> None:
        raw = f"Subject: {prefix}-{n}\r\n\r\nbody {n} {'x' * 3000}\r\n".encode()
        await store.deliver(rcpt, raw)
        sys.stdout.write(f"OK {prefix}-{n}\n")
        sys.stdout.flush()

    async def worker() -> None:
        nonlocal counter
        while True:
            counter += 1
            await one(counter)

    await asyncio.gather(*(worker() for _ in range(8)))


if __name__ == "__main__":
    asyncio.run(main())
