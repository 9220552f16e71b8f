"""Split virtqueue: chains, used ring, event index, wrap-around, malformed chains."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from device import ChainError, ConfigError, GuestMemory, RingError, SplitQueue
from device.testing import F_INDIRECT, F_NEXT, F_WRITE, DriverRing, GuestRam, MiB

BASE = 8 * MiB


@pytest.fixture
def env() -> Iterator[tuple[GuestMemory, DriverRing]]:
    ram = GuestRam(16 * MiB)
    mem = GuestMemory([ram.spec()])
    yield mem, DriverRing(mem, 16, BASE)
    mem.close()
    ram.close()


def test_pop_splits_readable_and_writable(env) -> None:
    mem, ring = env
    q = ring.device_queue()
    a, b, c = ring.buffer(b"x" * 100), ring.buffer(b"y" * 8), ring.buffer(bytes(32))
    head = ring.add([a, b], [c])
    chain = q.pop(mem)
    assert chain is not None and chain.head == head
    assert chain.readable == [a, b] and chain.writable == [c]
    assert chain.readable_len == 108 and chain.writable_len == 32
    assert q.pop(mem) is None


def test_indirect_chain(env) -> None:
    mem, ring = env
    q = ring.device_queue(indirect=True)
    a, c = ring.buffer(b"a" * 16), ring.buffer(bytes(16))
    ring.add([a], [c], indirect=True)
    chain = q.pop(mem)
    assert chain.readable == [a] and chain.writable == [c]


def test_used_ring_and_interrupt_without_event_idx(env) -> None:
    mem, ring = env
    q = ring.device_queue()
    h = ring.add([ring.buffer(b"1234")])
    chain = q.pop(mem)
    q.push(mem, chain.head, 7)
    assert ring.get_used() == []  # not published yet
    assert q.publish(mem) is True
    assert ring.get_used() == [(h, 7)]
    assert q.publish(mem) is False  # nothing new
    ring.set_no_interrupt(True)
    ring.add([ring.buffer(b"1234")])
    q.push(mem, q.pop(mem).head, 0)
    assert q.publish(mem) is False


def test_event_idx_both_directions(env) -> None:
    mem, ring = env
    q = ring.device_queue(event_idx=True)
    for _ in range(3):
        ring.add([ring.buffer(b"abcd")])
    ring.set_used_event(1)  # driver wants an interrupt once used idx passes 1
    q.push(mem, q.pop(mem).head, 0)
    assert q.publish(mem) is False  # used 0 -> 1 does not pass event 1
    q.push(mem, q.pop(mem).head, 0)
    assert q.publish(mem) is True  # 1 -> 2 passes it
    q.push(mem, q.pop(mem).head, 0)
    assert q.publish(mem) is False
    assert q.enable_notification(mem) is False
    assert ring.avail_event() == 3  # device asks for a kick at the next buffer
    ring.add([ring.buffer(b"abcd")])
    assert q.enable_notification(mem) is True  # re-check sees the racing buffer


def test_index_wrap_around(env) -> None:
    mem, ring = env
    start = 0xFFFF - 5
    ring.set_avail_idx(start)
    ring.last_used = start
    ring.mem.write(ring.used + 2, start.to_bytes(2, "little"))
    q = ring.device_queue(next_avail=start)
    heads = []
    for i in range(40):  # crosses 0xffff -> 0 and the ring size several times
        h = ring.add([ring.buffer(bytes([i]) * 4)])
        chain = q.pop(mem)
        assert chain.head == h
        q.push(mem, chain.head, i)
        q.publish(mem)
        heads.append((h, i))
        assert ring.get_used() == [(h, i)]
    assert q.next_avail == (start + 40) & 0xFFFF


def test_undo_pop(env) -> None:
    mem, ring = env
    q = ring.device_queue()
    h = ring.add([ring.buffer(b"abcd")])
    assert q.pop(mem).head == h
    q.undo_pop()
    assert q.pop(mem).head == h


def test_bad_queue_config() -> None:
    for size in (0, 3, 65536):
        with pytest.raises(ConfigError):
            SplitQueue(size, 0, 4096, 8192)
    with pytest.raises(ConfigError):
        SplitQueue(16, 8, 4096, 8192)


# -- malformed chains: each is consumed and reported with its head ----------------


def _expect_chain_error(mem: GuestMemory, q: SplitQueue, head: int, words: str) -> None:
    with pytest.raises(ChainError, match=words) as ei:
        q.pop(mem)
    assert ei.value.head == head
    assert q.pop(mem) is None  # consumed


def test_loop(env) -> None:
    mem, ring = env
    a = ring.buffer(b"abcd")
    ring.raw_desc(0, a[0], 4, F_NEXT, 1)
    ring.raw_desc(1, a[0], 4, F_NEXT, 0)
    ring.raw_avail(0)
    _expect_chain_error(mem, ring.device_queue(), 0, "loops")


def test_next_out_of_range(env) -> None:
    mem, ring = env
    a = ring.buffer(b"abcd")
    ring.raw_desc(2, a[0], 4, F_NEXT, 16)
    ring.raw_avail(2)
    _expect_chain_error(mem, ring.device_queue(), 2, "next index")


def test_buffer_outside_ram(env) -> None:
    mem, ring = env
    ring.raw_desc(0, 16 * MiB - 2, 4, 0, 0)
    ring.raw_avail(0)
    _expect_chain_error(mem, ring.device_queue(), 0, "not inside guest RAM")
    ring.raw_desc(0, 2**64 - 2, 4, 0, 0)
    ring.raw_avail(0)
    _expect_chain_error(mem, ring.device_queue(next_avail=1), 0, "not inside guest RAM")


def test_readable_after_writable(env) -> None:
    mem, ring = env
    a = ring.buffer(b"abcd")
    ring.raw_desc(0, a[0], 4, F_WRITE | F_NEXT, 1)
    ring.raw_desc(1, a[0], 4, 0, 0)
    ring.raw_avail(0)
    _expect_chain_error(mem, ring.device_queue(), 0, "readable buffer after a writable")


@pytest.mark.parametrize(
    ("table_len", "table_off", "flags", "words"),
    [
        (0, 0, F_INDIRECT, "malformed"),
        (24, 0, F_INDIRECT, "malformed"),
        (32, 8, F_INDIRECT, "malformed"),
        (32, 0, F_INDIRECT | F_NEXT, "together with NEXT"),
    ],
)
def test_bad_indirect_tables(env, table_len: int, table_off: int, flags: int, words: str) -> None:
    mem, ring = env
    table = ring.alloc(64) + table_off
    ring.raw_desc(0, table, table_len, flags, 1)
    ring.raw_avail(0)
    _expect_chain_error(mem, ring.device_queue(indirect=True), 0, words)


def test_indirect_needs_feature_and_no_nesting(env) -> None:
    mem, ring = env
    a = ring.buffer(b"abcd")
    ring.add([a], indirect=True)
    _expect_chain_error(mem, ring.device_queue(indirect=False), 0, "without the feature")
    inner = ring.alloc(16)
    ring.mem.write(inner, bytes(16))
    outer = ring.alloc(16)
    from device.testing import DESC

    ring.mem.write(outer, DESC.pack(inner, 16, F_INDIRECT, 0))
    ring.raw_desc(1, outer, 16, F_INDIRECT, 0)
    ring.raw_avail(1)
    _expect_chain_error(
        mem, ring.device_queue(indirect=True, next_avail=1), 1, "inside an indirect"
    )


def test_indirect_loop_is_bounded(env) -> None:
    mem, ring = env
    from device.testing import DESC

    table = ring.alloc(32)
    a = ring.buffer(b"abcd")
    ring.mem.write(table, DESC.pack(a[0], 4, F_NEXT, 1) + DESC.pack(a[0], 4, F_NEXT, 0))
    ring.raw_desc(0, table, 32, F_INDIRECT, 0)
    ring.raw_avail(0)
    _expect_chain_error(mem, ring.device_queue(indirect=True), 0, "loops")


def test_chain_longer_than_4g() -> None:
    ram = GuestRam(3 << 30)  # sparse: never touched beyond the rings
    mem = GuestMemory([ram.spec()])
    ring = DriverRing(mem, 16, BASE)
    ring.raw_desc(0, 0, (3 << 30) - 1, F_NEXT, 1)
    ring.raw_desc(1, 0, (3 << 30) - 1, 0, 0)
    ring.raw_avail(0)
    _expect_chain_error(mem, ring.device_queue(), 0, "longer than 4 GiB")
    mem.close()
    ram.close()


def test_avail_idx_lie_is_a_ring_error(env) -> None:
    mem, ring = env
    ring.set_avail_idx(17)
    q = ring.device_queue()
    with pytest.raises(RingError, match=r"avail\.idx lies"):
        q.pop(mem)
    assert q.next_avail == 0


def test_head_out_of_range_is_a_ring_error(env) -> None:
    mem, ring = env
    ring.raw_avail(16)
    with pytest.raises(RingError, match="head 16"):
        ring.device_queue().pop(mem)


def test_ring_outside_ram() -> None:
    ram = GuestRam(MiB)
    mem = GuestMemory([ram.spec()])
    q = SplitQueue(256, MiB - 4096, MiB - 512, MiB - 256)
    with pytest.raises(RingError):
        q.pop(mem)
    mem.close()
    ram.close()
