"""SharedMemo: an anonymous shared mapping seen by real forked processes, expiry on an
injected clock, full-window eviction, lock recovery after a holder dies, and a model test
against a dict."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailfort.relay.memo import PROBE, SharedMemo


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run_in_child(body: Callable[[], int]) -> int:
    """Fork, run ``body`` in the child, and return its exit status (the body's result)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            code = body()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# -- basic behaviour ----------------------------------------------------------------------


def test_add_contains_discard() -> None:
    memo = SharedMemo(1024)
    assert b"a" not in memo
    memo.add(b"a", 60)
    assert b"a" in memo
    assert b"b" not in memo
    memo.discard(b"a")
    assert b"a" not in memo
    memo.discard(b"never added")


def test_non_bytes_are_never_members() -> None:
    memo = SharedMemo(64)
    memo.add(b"x", 60)
    assert "x" not in memo
    assert None not in memo


def test_any_bytes_key() -> None:
    memo = SharedMemo(64)
    keys = [b"", b"\x00" * 100, bytes(range(256)), b"SRS0=ABC=XY=example.org=jo@fwd.test"]
    for key in keys:
        memo.add(key, 60)
    assert all(key in memo for key in keys)


def test_slots_round_up_to_power_of_two() -> None:
    assert SharedMemo(1000).slots == 1024
    assert SharedMemo(1).slots == 1
    with pytest.raises(ValueError):
        SharedMemo(0)


def test_nan_ttl_is_refused() -> None:
    with pytest.raises(ValueError):
        SharedMemo(16).add(b"k", float("nan"))


def test_nothing_backs_the_table_on_any_filesystem() -> None:
    """No file backs the table or the lock: nothing forwarded may reach a disk."""
    fds_before = set(os.listdir("/proc/self/fd"))
    shm_before = set(os.listdir("/dev/shm"))
    memo = SharedMemo(1024)
    memo.add(b"k", 60)
    assert set(os.listdir("/proc/self/fd")) == fds_before
    assert set(os.listdir("/dev/shm")) == shm_before
    assert b"k" in memo


# -- expiry --------------------------------------------------------------------------------


def test_expiry_on_injected_clock() -> None:
    clock = Clock()
    memo = SharedMemo(64, clock=clock)
    memo.add(b"k", 86400)
    clock.now += 86399.9
    assert b"k" in memo
    clock.now += 0.1
    assert b"k" not in memo


def test_readd_replaces_expiry() -> None:
    clock = Clock()
    memo = SharedMemo(64, clock=clock)
    memo.add(b"k", 10)
    memo.add(b"k", 100)
    clock.now += 50
    assert b"k" in memo
    memo.add(b"k", 1)
    clock.now += 2
    assert b"k" not in memo


def test_zero_or_negative_ttl_is_not_a_member() -> None:
    memo = SharedMemo(64, clock=Clock())
    memo.add(b"zero", 0)
    memo.add(b"neg", -5)
    assert b"zero" not in memo
    assert b"neg" not in memo


def test_short_real_ttl_expires() -> None:
    memo = SharedMemo(64)
    memo.add(b"k", 0.05)
    assert b"k" in memo
    time.sleep(0.1)
    assert b"k" not in memo


# -- a full table ----------------------------------------------------------------------------


def test_full_window_evicts_the_entry_expiring_first() -> None:
    clock = Clock()
    memo = SharedMemo(PROBE, clock=clock)  # one window covers the whole table
    for i in range(PROBE):
        memo.add(b"k%d" % i, 100 + i)
    assert all(b"k%d" % i in memo for i in range(PROBE))
    assert memo.evictions == 0
    memo.add(b"new", 1000)
    assert memo.evictions == 1
    assert b"new" in memo
    assert b"k0" not in memo  # the one expiring first made room
    assert all(b"k%d" % i in memo for i in range(1, PROBE))


def test_full_table_keeps_the_latest_and_never_invents_members() -> None:
    clock = Clock()
    memo = SharedMemo(PROBE, clock=clock)
    total = 10 * PROBE
    for i in range(total):
        memo.add(b"k%d" % i, 1000 + i)  # later keys live longer
    present = [i for i in range(total) if b"k%d" % i in memo]
    assert present == list(range(total - PROBE, total))
    assert memo.evictions == total - PROBE
    assert all(b"other%d" % i not in memo for i in range(1000))


def test_expired_slots_are_reused_before_evicting() -> None:
    clock = Clock()
    memo = SharedMemo(PROBE, clock=clock)
    for i in range(PROBE):
        memo.add(b"short%d" % i if i % 2 else b"long%d" % i, 10 if i % 2 else 1000)
    clock.now += 20
    for i in range(PROBE // 2):
        memo.add(b"fresh%d" % i, 1000)
    assert memo.evictions == 0
    assert all(b"long%d" % i in memo for i in range(0, PROBE, 2))
    assert all(b"fresh%d" % i in memo for i in range(PROBE // 2))


def test_discarded_slot_is_reused() -> None:
    memo = SharedMemo(PROBE, clock=Clock())
    for i in range(PROBE):
        memo.add(b"k%d" % i, 100)
    memo.discard(b"k3")
    memo.add(b"new", 100)
    assert memo.evictions == 0
    assert b"new" in memo
    assert all(b"k%d" % i in memo for i in range(PROBE) if i != 3)


# -- processes ------------------------------------------------------------------------------


def test_forked_child_adds_parent_and_sibling_see_it() -> None:
    memo = SharedMemo(1 << 12)

    def writer() -> int:
        for i in range(200):
            memo.add(b"child-%d" % i, 3600)
        memo.discard(b"parent-gone")
        return 0

    memo.add(b"parent-gone", 3600)
    memo.add(b"parent-kept", 3600)
    assert run_in_child(writer) == 0
    assert all(b"child-%d" % i in memo for i in range(200))
    assert b"parent-gone" not in memo

    def sibling() -> int:
        seen = all(b"child-%d" % i in memo for i in range(200))
        return 0 if seen and b"parent-kept" in memo and b"parent-gone" not in memo else 3

    assert run_in_child(sibling) == 0


def test_concurrent_writers_lose_nothing() -> None:
    """Four processes add disjoint keys at once; with room to spare, all must survive."""
    memo = SharedMemo(1 << 14)
    pids = []
    for worker in range(4):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            try:
                for i in range(500):
                    memo.add(b"w%d-%d" % (worker, i), 3600)
                    if i % 7 == 0:
                        memo.discard(b"w%d-%d" % (worker, i))
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    assert memo.evictions == 0
    for worker in range(4):
        for i in range(500):
            assert (b"w%d-%d" % (worker, i) in memo) == (i % 7 != 0)


def test_lock_held_by_a_dead_process_is_recovered() -> None:
    memo = SharedMemo(64, lock_timeout=0.05)
    memo.add(b"before", 3600)

    def die_holding_the_lock() -> int:
        assert memo._acquire()
        os.kill(os.getpid(), signal.SIGKILL)
        return 0  # pragma: no cover - never reached

    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        die_holding_the_lock()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    # The dead child still "holds" the semaphore; the next operation must get past it.
    memo.add(b"after", 3600)
    assert b"after" in memo
    assert b"before" in memo


def test_lock_held_by_a_live_process_degrades_to_a_miss() -> None:
    memo = SharedMemo(64, lock_timeout=0.05)
    memo.add(b"k", 3600)
    read_end, write_end = os.pipe()
    release_read, release_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            memo._acquire()
            os.write(write_end, b"x")
            os.read(release_read, 1)
            memo._release()
        finally:
            os._exit(0)
    os.read(read_end, 1)
    try:
        assert b"k" not in memo  # cannot look: answer "no", never a false "yes"
        memo.add(b"lost", 3600)
    finally:
        os.write(release_write, b"x")
        os.waitpid(pid, 0)
    assert b"k" in memo
    assert b"lost" not in memo
    for fd in (read_end, write_end, release_read, release_write):
        os.close(fd)


# -- model test --------------------------------------------------------------------------

KEYS = st.binary(min_size=0, max_size=6)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), KEYS, st.floats(min_value=-5, max_value=100)),
        st.tuples(st.just("discard"), KEYS, st.just(0.0)),
        st.tuples(st.just("tick"), st.just(b""), st.floats(min_value=0, max_value=50)),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(ops=OPS, slots=st.sampled_from([16, 64, 4096]))
def test_matches_a_dict_model(ops: list[tuple[str, bytes, float]], slots: int) -> None:
    clock = Clock()
    memo = SharedMemo(slots, clock=clock)
    model: dict[bytes, float] = {}
    seen: set[bytes] = set()
    for op, key, value in ops:
        if op == "add":
            memo.add(key, value)
            model[key] = clock.now + value
            seen.add(key)
        elif op == "discard":
            memo.discard(key)
            model.pop(key, None)
        else:
            clock.now += value
        for probe in seen | {b"absent"}:
            expected = model.get(probe, -1.0) > clock.now
            got = probe in memo
            # Never a member the model lacks; a member lost only through an eviction.
            assert not got or expected
            if memo.evictions == 0:
                assert got == expected


# -- counters ------------------------------------------------------------------------------


def test_incr_counts_and_expires() -> None:
    clock = Clock()
    memo = SharedMemo(64, clock=clock)
    assert memo.count(b"ip") == 0
    assert [memo.incr(b"ip", 10) for _ in range(3)] == [1, 2, 3]
    assert memo.count(b"ip") == 3 and b"ip" in memo
    clock.now += 11
    assert memo.count(b"ip") == 0
    assert memo.incr(b"ip", 10) == 1  # an expired counter starts again
    memo.discard(b"ip")
    assert memo.count(b"ip") == 0


def test_counts_from_every_process_add_up() -> None:
    """Failed logins on two workers count together: four processes, 250 each."""
    memo = SharedMemo(1 << 10)
    pids = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            try:
                for _ in range(250):
                    memo.incr(b"login:ip:x", 3600)
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    assert memo.count(b"login:ip:x") == 1000
