"""Live connections per client address across all worker processes of a node.

The per-IP connection cap (issue 6) must hold for the node: with N workers sharing the port
(SO_REUSEPORT), a count kept per process would let a client hold N times the cap. This is
a counter table in an anonymous shared mapping made before the workers are forked, so each
of them maps the same memory.

Layout: open addressing with linear probing over ``slots`` entries; an entry is a 64-bit
key (a keyed BLAKE2b hash of the address: clients cannot aim addresses at one probe chain,
and the table holds no addresses) and one 32-bit count per worker. Each worker only moves
its own column, so a worker that is replaced can have its column cleared without knowing
what the others hold (`clear_worker`). The node-wide count is the sum of the columns.
Entries whose columns are all zero are removed at once by backward-shift deletion (Knuth's
Algorithm R), so the table never fills with dead entries.

Updates take a POSIX record lock (``fcntl.lockf``) on a private unlinked file: record
locks belong to the process and the kernel drops them when it dies, so a worker killed
while holding the lock cannot wedge the others. A ``threading.Lock`` covers threads of one
process, which record locks do not tell apart. The critical section is a few slot reads
and writes, no I/O.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import secrets
import struct
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

DEFAULT_SLOTS: Final = 16384  # distinct addresses with live connections at once
_KEY = struct.Struct("<Q")
_COUNT = struct.Struct("<i")
_EMPTY: Final = 0


class TableFull(Exception):
    """Every slot holds a live address (more than ``slots`` clients connected at once)."""


class SharedConnectionCounts:
    """Per-address connection counts shared by the processes forked after its creation."""

    def __init__(self, workers: int, slots: int = DEFAULT_SLOTS) -> None:
        if workers < 1 or slots < 2:
            raise ValueError("need at least one worker and two slots")
        self.workers = workers
        self.slots = slots
        # Key, then one int32 per worker, padded to 8 bytes.
        self._stride = 8 + 4 * workers + (4 if workers % 2 else 0)
        self._counts = struct.Struct(f"<{workers}i")
        self._mem = mmap.mmap(-1, self._stride * slots)  # anonymous, MAP_SHARED
        self._secret = secrets.token_bytes(16)
        fd, path = tempfile.mkstemp(prefix="mailfort-conncount-")
        os.unlink(path)  # only the descriptor is needed, inherited by the forked workers
        self._lock_fd = fd
        self._thread_lock = threading.Lock()
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        # A lock held by another thread of the parent at fork time stays held in the child.
        self._thread_lock = threading.Lock()

    def close(self) -> None:
        self._mem.close()
        os.close(self._lock_fd)

    # -- the lock ----------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            fd = self._lock_fd
            fcntl.lockf(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN)

    # -- slots -------------------------------------------------------------------------

    def _hash(self, address: str) -> int:
        digest = hashlib.blake2b(address.encode(), key=self._secret, digest_size=8).digest()
        return int.from_bytes(digest, "little") or 1  # 0 marks an empty slot

    def _key_at(self, slot: int) -> int:
        key: int = _KEY.unpack_from(self._mem, slot * self._stride)[0]
        return key

    def _find(self, key: int) -> tuple[int, bool]:
        """(slot, found): the key's slot, or the empty slot where it would go."""
        slot = key % self.slots
        for _ in range(self.slots):
            current = self._key_at(slot)
            if current == key:
                return slot, True
            if current == _EMPTY:
                return slot, False
            slot = (slot + 1) % self.slots
        return -1, False

    def _columns(self, slot: int) -> tuple[int, ...]:
        return self._counts.unpack_from(self._mem, slot * self._stride + 8)

    def _delete(self, slot: int) -> None:
        """Empty ``slot`` and shift later entries of its probe chain back (Algorithm R), so
        a lookup still reaches every key without walking over holes."""
        n = self.slots
        stride = self._stride
        empty = bytes(stride)
        hole = probe = slot
        self._mem[hole * stride : (hole + 1) * stride] = empty
        while True:  # ends at an empty slot: the hole itself at the latest
            probe = (probe + 1) % n
            key = self._key_at(probe)
            if key == _EMPTY:
                return
            home = key % n
            # The entry at probe stays unless the hole lies on its probe path, i.e. unless
            # its home is cyclically outside (hole, probe].
            if (hole < probe and hole < home <= probe) or (
                hole > probe and (home > hole or home <= probe)
            ):
                continue
            self._mem[hole * stride : (hole + 1) * stride] = self._mem[
                probe * stride : (probe + 1) * stride
            ]
            self._mem[probe * stride : (probe + 1) * stride] = empty
            hole = probe

    # -- the API -----------------------------------------------------------------------

    def add(self, worker: int, address: str, delta: int) -> int:
        """Move ``worker``'s count for ``address`` by ``delta``; returns the node-wide count
        after it. Raises `TableFull` when a new address finds no free slot."""
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker {worker} outside 0..{self.workers - 1}")
        key = self._hash(address)
        with self._locked():
            slot, found = self._find(key)
            if not found:
                if delta <= 0:
                    return 0
                if slot < 0:
                    raise TableFull(f"all {self.slots} slots in use")
                _KEY.pack_into(self._mem, slot * self._stride, key)
            offset = slot * self._stride + 8 + 4 * worker
            mine = max(_COUNT.unpack_from(self._mem, offset)[0] + delta, 0)
            _COUNT.pack_into(self._mem, offset, mine)
            total = sum(self._columns(slot))
            if total == 0:
                self._delete(slot)
            return total

    def count(self, address: str) -> int:
        """The node-wide count for ``address``."""
        key = self._hash(address)
        with self._locked():
            slot, found = self._find(key)
            return sum(self._columns(slot)) if found else 0

    def clear_worker(self, worker: int) -> None:
        """Zero ``worker``'s column everywhere: for a worker process that was replaced (its
        connections died with it)."""
        with self._locked():
            slot = 0
            while slot < self.slots:
                if self._key_at(slot) != _EMPTY:
                    _COUNT.pack_into(self._mem, slot * self._stride + 8 + 4 * worker, 0)
                    if sum(self._columns(slot)) == 0:
                        self._delete(slot)
                        continue  # another entry may have moved into this slot
                slot += 1

    def used_slots(self) -> int:
        with self._locked():
            return sum(1 for s in range(self.slots) if self._key_at(s) != _EMPTY)


# The node's table for the MX listener: made by the parent before it forks the workers
# (mailfort.app), found by each worker's listener (smtp/listeners.py). None in a single
# process, where the per-process ConnectionTable is already node-wide.
_node_table: SharedConnectionCounts | None = None


def create_node_table(workers: int, slots: int = DEFAULT_SLOTS) -> SharedConnectionCounts:
    global _node_table
    _node_table = SharedConnectionCounts(workers, slots)
    return _node_table


def node_table() -> SharedConnectionCounts | None:
    return _node_table


__all__ = [
    "DEFAULT_SLOTS",
    "SharedConnectionCounts",
    "TableFull",
    "create_node_table",
    "node_table",
]
