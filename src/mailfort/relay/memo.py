"""An expiring set that forked worker processes share, held only in memory.

Forwarding uses it for two short-lived facts that must be visible to every worker on the
node, because the retry or the bounce may arrive at a different worker than the forward:

- "this message (fingerprint) was already accepted by this target": a sender retrying
  after our 4xx must not deliver twice to the targets that said 250 (about a day);
- "this SRS address was issued by a recent forward": a bounce to an SRS address is
  accepted only then, so an SRS address is never an open relay.

Forwarded mail is never written to disk, and neither is anything about it: the table is
an anonymous shared mapping (``MAP_SHARED | MAP_ANONYMOUS``) created in the parent before
it forks, so the workers inherit the same physical pages and no file exists anywhere.

Layout: a 64-byte header, then ``slots + PROBE - 1`` slots of 24 bytes each, an 8-byte
keyed hash, an 8-byte expiry (a float on the clock below) and an 8-byte counter (``incr``:
the login guard's failure counts, which must hold across workers too). A key's home slot is its
hash modulo ``slots`` and it may live in any of the ``PROBE`` slots from there; the spare
``PROBE - 1`` slots past the end let every probe window be one contiguous read instead of
wrapping. (A table of at most ``PROBE`` slots is a single window.) Every lookup reads the whole window (16 slots, 384 bytes, six cache lines), so
there are no tombstones and a discard simply zeroes its slot.

It is a cache, and losing an entry is its only failure mode:
- When a window is full of live entries, ``add`` reuses the slot that expires first
  (counted in ``evictions``). Expired slots are reused before anything is evicted.
  Probe windows fill before the table does: measured at 2**18 slots, filling to half
  evicted 0.03% of entries and to three quarters 1.3%, so size the table at about twice
  the live entries you expect (24 bytes a slot; the default is 6 MiB).
- Keys are stored as a 64-bit BLAKE2b hash keyed with a random secret made at
  construction and shared by the forked workers. Nobody outside can predict where a key
  lands, so a remote party who controls keys (message fingerprints, addresses) can neither
  craft collisions nor flood one window to evict a chosen entry.
- A false positive needs a live entry with the same 64-bit hash: with at most ``n`` live
  entries a lookup of an absent key errs with probability at most ``n / 2**64``; for the
  default 2**18 slots that is 2**-46 (about 1.4e-14) per lookup, or about one in 70,000
  years at a billion lookups a day.

Cross-process safety: one ``multiprocessing`` lock (a POSIX semaphore; with the fork
context it is unlinked from /dev/shm as soon as it is made) guards every operation, reads
included, because a slot is three 8-byte words and Python gives no atomic 24-byte access: an
unlocked read could pair one entry's hash with another's expiry. The critical sections
are a few microseconds. A POSIX semaphore is not robust, though: a worker killed while
holding it would block the others forever. So the holder writes its pid in the header,
acquisition has a timeout, and a waiter that times out while the recorded holder is dead
releases the lock on the dead process's behalf (under a second lock, so only one waiter
does). If the lock still cannot be had, the operation degrades to a miss (``add`` and
``discard`` do nothing, ``in`` answers False): a possible duplicate delivery or a refused
bounce, never a false "yes".

The clock is ``time.monotonic`` by default: CLOCK_MONOTONIC is system-wide on Linux, so
all workers agree on it, and wall-clock steps cannot expire or resurrect entries.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import multiprocessing
import os
import struct
import time
from collections.abc import Callable

__all__ = ["PROBE", "SharedMemo"]

PROBE = 16
"""Slots a key may occupy from its home slot: bounds the work of every operation."""

_SLOT = struct.Struct("<8sdq")  # keyed hash, expiry, count (for incr)
_COUNT = struct.Struct("<q")
_EMPTY = bytes(_SLOT.size)
_ZERO_HASH = bytes(8)
_ONE_HASH = b"\x01" + bytes(7)
_HEADER_SIZE = 64
# Header words: the pid holding the lock (0 when free) and the eviction counter.
_HOLDER = struct.Struct("<q")
_HOLDER_AT = 0
_EVICTIONS = struct.Struct("<Q")
_EVICTIONS_AT = 8
_LOCK_TIMEOUT = 0.1
_HASH_KEY_SIZE = 16


def _find(window: bytes, pattern: bytes) -> int:
    """The index of the slot in ``window`` starting with ``pattern``, or -1.

    ``bytes.find`` does the scan in C; a hit not on a slot boundary (inside an expiry,
    or straddling two slots) is skipped.
    """
    pos = window.find(pattern)
    while pos >= 0:
        if pos % _SLOT.size == 0:
            return pos // _SLOT.size
        pos = window.find(pattern, pos + 1)
    return -1


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SharedMemo:
    """A bounded set of byte keys with per-key expiry, shared across ``os.fork()``.

    Create it in the parent before forking the workers; every process then sees every
    other's ``add`` and ``discard`` at once.
    """

    def __init__(
        self,
        slots: int = 1 << 18,
        *,
        clock: Callable[[], float] = time.monotonic,
        lock_timeout: float = _LOCK_TIMEOUT,
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be positive")
        # A power of two turns the modulo into a mask.
        self._slots = 1 << (slots - 1).bit_length()
        self._probe = min(PROBE, self._slots)
        # A table no bigger than a window is one window: every key may use every slot.
        self._mask = self._slots - 1 if self._slots > PROBE else 0
        spare = self._probe - 1 if self._slots > PROBE else 0
        self._clock = clock
        self._lock_timeout = lock_timeout
        self._hash_key = os.urandom(_HASH_KEY_SIZE)
        self._hasher = hashlib.blake2b(digest_size=8, key=self._hash_key)
        self._span = self._probe * _SLOT.size
        self._expiries = struct.Struct("<" + "8xd8x" * self._probe)
        size = _HEADER_SIZE + (self._slots + spare) * _SLOT.size
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        # The fork context unlinks the semaphore at once and starts no resource tracker.
        context = multiprocessing.get_context("fork")
        self._lock = context.Lock()
        self._recovery = context.Lock()

    @property
    def slots(self) -> int:
        """The table's capacity (``slots`` rounded up to a power of two)."""
        return self._slots

    @property
    def evictions(self) -> int:
        """Live entries pushed out by ``add`` on a full window, across all processes."""
        return int(_EVICTIONS.unpack_from(self._map, _EVICTIONS_AT)[0])

    def add(self, key: bytes, ttl: float) -> None:
        """Remember ``key`` for ``ttl`` seconds from now (replacing any earlier expiry)."""
        if math.isnan(ttl):
            raise ValueError("ttl is NaN")
        needle, base = self._locate(key)
        if not self._acquire():
            return
        try:
            now = self._clock()
            window = self._map[base : base + self._span]
            slot = _find(window, needle)
            if slot < 0:
                slot = _find(window, _EMPTY)
            if slot < 0:
                slot = self._reusable(window, now)
            _SLOT.pack_into(self._map, base + slot * _SLOT.size, needle, now + ttl, 0)
        finally:
            self._release()

    def incr(self, key: bytes, ttl: float) -> int:
        """Add one to ``key``'s counter (0 if absent or expired) and let it live ``ttl``
        seconds from now; returns the new count (0 if the table could not be locked: a
        counter shared this way is an approximation that errs towards leniency)."""
        if math.isnan(ttl):
            raise ValueError("ttl is NaN")
        needle, base = self._locate(key)
        if not self._acquire():
            return 0
        try:
            now = self._clock()
            window = self._map[base : base + self._span]
            slot = _find(window, needle)
            count = 0
            if slot >= 0:
                _hash, expiry, count = _SLOT.unpack_from(window, slot * _SLOT.size)
                if expiry <= now:
                    count = 0
            else:
                slot = _find(window, _EMPTY)
                if slot < 0:
                    slot = self._reusable(window, now)
            _SLOT.pack_into(self._map, base + slot * _SLOT.size, needle, now + ttl, count + 1)
            return int(count + 1)
        finally:
            self._release()

    def count(self, key: bytes) -> int:
        """``key``'s live counter (0 when absent or expired)."""
        entry = self._read(key)
        return entry[1] if entry is not None else 0

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self._read(key) is not None

    def _read(self, key: bytes) -> tuple[float, int] | None:
        """(expiry, count) of ``key`` if live; None if absent, expired or not lockable."""
        needle, base = self._locate(key)
        if not self._acquire():
            return None
        try:
            now = self._clock()
            window = self._map[base : base + self._span]
        finally:
            self._release()
        slot = _find(window, needle)
        if slot < 0:
            return None
        _hash, expiry, count = _SLOT.unpack_from(window, slot * _SLOT.size)
        return (expiry, int(count)) if expiry > now else None

    def discard(self, key: bytes) -> None:
        """Forget ``key`` if present."""
        needle, base = self._locate(key)
        if not self._acquire():
            return
        try:
            slot = _find(self._map[base : base + self._span], needle)
            if slot >= 0:
                offset = base + slot * _SLOT.size
                self._map[offset : offset + _SLOT.size] = _EMPTY
        finally:
            self._release()

    def _reusable(self, window: bytes, now: float) -> int:
        """The slot to overwrite in a window with no free slot: expired, else oldest."""
        expiries = self._expiries.unpack_from(window)
        for i, expiry in enumerate(expiries):
            if expiry <= now:
                return i
        count = _EVICTIONS.unpack_from(self._map, _EVICTIONS_AT)[0]
        _EVICTIONS.pack_into(self._map, _EVICTIONS_AT, count + 1)
        return min(range(len(expiries)), key=expiries.__getitem__)

    def _locate(self, key: bytes) -> tuple[bytes, int]:
        hasher = self._hasher.copy()
        hasher.update(key)
        needle = hasher.digest()
        # All zeros marks an empty slot, so the one hash equal to it is moved aside.
        if needle == _ZERO_HASH:
            needle = _ONE_HASH
        home = int.from_bytes(needle, "little") & self._mask
        return needle, _HEADER_SIZE + home * _SLOT.size

    def _acquire(self) -> bool:
        if self._lock.acquire(timeout=self._lock_timeout):
            _HOLDER.pack_into(self._map, _HOLDER_AT, os.getpid())
            return True
        if self._recover() and self._lock.acquire(timeout=self._lock_timeout):
            _HOLDER.pack_into(self._map, _HOLDER_AT, os.getpid())
            return True
        return False

    def _release(self) -> None:
        _HOLDER.pack_into(self._map, _HOLDER_AT, 0)
        self._lock.release()

    def _recover(self) -> bool:
        """Release the lock if the process recorded as holding it has died.

        Only one waiter may do this: the recovery lock is taken without waiting, and the
        holder is re-read under it, because the main lock cannot change hands while its
        dead holder still owns it. A holder that died between acquiring and writing its
        pid leaves 0 here and cannot be recovered; the window is a few instructions.
        """
        if not self._recovery.acquire(block=False):
            return False
        try:
            holder = _HOLDER.unpack_from(self._map, _HOLDER_AT)[0]
            if holder <= 0 or holder == os.getpid() or _pid_alive(holder):
                return False
            _HOLDER.pack_into(self._map, _HOLDER_AT, 0)
            try:
                # multiprocessing's non-recursive Lock is a plain semaphore and may be
                # released by a process other than the one that acquired it.
                self._lock.release()
            except ValueError:
                return False
            return True
        finally:
            self._recovery.release()
