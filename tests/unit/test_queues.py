"""Stats, free-page hints, free-page reporting, range reports, config space, reset."""

from __future__ import annotations

import struct

import pytest

from device import BalloonConfig, ConfigError, Feature, HintState, Status
from device.defs import CMD_ID_DONE, CMD_ID_MIN, CMD_ID_STOP, STAT_NAMES, StatTag
from device.testing import FRAME_SIZE, GuestRam, MiB
from tests.conftest import Rig, is_root


def stats_buffer(values: dict[int, int]) -> bytes:
    return b"".join(struct.pack("<HQ", t, v) for t, v in values.items())


# -- stats ---------------------------------------------------------------------


def test_stats_every_tag_is_parsed_and_buffer_held(prig: Rig) -> None:
    values = {int(t): 1000 + int(t) for t in StatTag}
    ring = prig.rings["stats"]
    head = ring.add([ring.buffer(stats_buffer(values) + stats_buffer({99: 5}) + b"\x07")])
    prig.kick("stats")
    assert ring.get_used() == []  # held, not returned
    got = prig.dev.stats.values
    assert got == {STAT_NAMES[StatTag(t)]: v for t, v in values.items()}
    assert prig.dev.metrics.stats_unknown_tags == 1
    assert prig.dev.stats.last_update > 0
    # Requesting fresh stats returns the buffer with an interrupt.
    assert prig.dev.request_stats() is True
    assert ring.get_used() == [(head, 0)]
    assert prig.irq.queues[-1] == prig.index("stats")
    assert prig.dev.request_stats() is False  # nothing held any more


def test_stats_refresh_on_interval(ram: GuestRam) -> None:
    now = [100.0]
    rig = Rig(ram, config=BalloonConfig(stats_interval=5))
    rig.dev.clock = rig.dev._stats.clock = lambda: now[0]
    ring = rig.rings["stats"]
    ring.add([ring.buffer(stats_buffer({4: 1}))])
    rig.kick("stats")
    assert rig.dev.poll() == 105.0
    now[0] = 104.9
    rig.dev.poll()
    assert ring.get_used() == []
    now[0] = 105.0
    assert rig.dev.poll() is None
    assert len(ring.get_used()) == 1
    ring.add([ring.buffer(stats_buffer({4: 2}))])
    rig.kick("stats")
    assert rig.dev.stats.values["stat-free-memory"] == 2
    rig.close()


def test_stop_queue_rewinds_held_stats(prig: Rig) -> None:
    ring = prig.rings["stats"]
    ring.add([ring.buffer(stats_buffer({4: 1}))])
    prig.kick("stats")
    idx = prig.index("stats")
    assert prig.dev.stop_queue(idx) == 0  # the held buffer will be seen again
    q = ring.device_queue(next_avail=0)
    prig.dev.start_queue(idx, q)
    prig.kick("stats")
    assert prig.dev.metrics.stats_updates == 2
    assert prig.dev.stop_queue(idx) == 0


def test_driver_ok_processes_primed_stats(ram: GuestRam) -> None:
    rig = Rig(ram, activate=False)
    ring = rig.rings["stats"]
    ring.add([ring.buffer(stats_buffer({5: 123}))])  # Linux primes before DRIVER_OK
    assert rig.kick("stats") is False and rig.dev.stats.values == {}  # not yet
    rig.dev.set_status(rig.dev.read_status() | Status.DRIVER_OK)
    assert rig.dev.stats.values == {"stat-total-memory": 123}
    assert rig.dev.read_status() & Status.DRIVER_OK
    rig.close()


# -- free page hinting -----------------------------------------------------------------


def test_free_page_hint_full_cycle(prig: Rig) -> None:
    dev, ring = prig.dev, prig.rings["free_page"]
    before = prig.ram.allocated()
    cmd = dev.start_free_page_hint()
    assert cmd == CMD_ID_MIN and dev.read_config(8, 4) == struct.pack("<I", cmd)
    assert prig.irq.configs == 1
    # A hint before the id arrives is stale.
    ring.add([], [(4 * MiB, 4 * MiB)])
    prig.kick("free_page")
    assert dev.metrics.hint_stale == 1 and dev.hints.state is HintState.REQUESTED
    # The driver acknowledges the id, then hints two 4 MiB blocks.
    ring.add([ring.buffer(struct.pack("<I", cmd))])
    ring.add([], [(8 * MiB, 4 * MiB)])
    ring.add([], [(16 * MiB, 4 * MiB)])
    prig.kick("free_page")
    assert dev.hints.state is HintState.RUNNING
    assert dev.hints.ranges == [(8 * MiB, 4 * MiB), (16 * MiB, 4 * MiB)]
    assert dev.metrics.hinted_frames == 2048
    assert len(ring.get_used()) == 4  # every buffer returned
    # Hinted pages are never discarded (the spec forbids it once the guest writes them).
    assert prig.ram.allocated() == before
    assert all(prig.ram.frame_intact(f) for f in range(2048, 2048 + 1024, 97))
    # The driver stops the run.
    ring.add([ring.buffer(struct.pack("<I", CMD_ID_STOP))])
    prig.kick("free_page")
    assert dev.hints.state is HintState.STOPPED
    ring.add([], [(20 * MiB, 4 * MiB)])
    prig.kick("free_page")
    assert dev.metrics.hint_stale == 2
    # DONE lets the guest reuse the pages; a new run gets a fresh id.
    dev.done_free_page_hint()
    assert dev.read_config(8, 4) == struct.pack("<I", CMD_ID_DONE) and dev.hints.ranges == []
    assert dev.start_free_page_hint() == CMD_ID_MIN + 1
    dev.stop_free_page_hint()
    assert dev.read_config(8, 4) == struct.pack("<I", CMD_ID_STOP)
    # An old id is stale after a new run started.
    cmd3 = dev.start_free_page_hint()
    ring.add([ring.buffer(struct.pack("<I", cmd))])
    prig.kick("free_page")
    assert dev.hints.state is HintState.REQUESTED and cmd3 == CMD_ID_MIN + 2


def test_hint_id_wraps_to_min() -> None:
    from device import FreePageHints

    h = FreePageHints()
    h._next_id = 0xFFFFFFFF
    assert h.start() == 0xFFFFFFFF
    assert h.start() == CMD_ID_MIN


def test_hinting_needs_feature(ram: GuestRam) -> None:
    rig = Rig(ram, features=Feature.VERSION_1 | Feature.STATS_VQ)
    with pytest.raises(ConfigError):
        rig.dev.start_free_page_hint()
    rig.close()


# -- free page reporting -------------------------------------------------------------


def test_reporting_discards_every_entry(prig: Rig) -> None:
    before = prig.ram.allocated()
    entries = [(2 * MiB * i, 2 * MiB) for i in (1, 2, 5, 9)] + [(30 * MiB, 4 * MiB)]
    assert prig.post("reporting", [], entries) == 0
    assert before - prig.ram.allocated() == 12 * MiB
    reported = set()
    for gpa, n in entries:
        reported.update(range(gpa // FRAME_SIZE, (gpa + n) // FRAME_SIZE))
    for f in range(0, prig.data_frames, 7):
        assert prig.ram.frame_zero(f) if f in reported else prig.ram.frame_intact(f)
    assert prig.dev.metrics.reports == 1 and prig.dev.metrics.reported_bytes == 12 * MiB
    # Adjacent blocks 1 and 2 were merged into one syscall.
    assert prig.dev.metrics.discard_syscalls == 4


def test_reporting_shrinks_unaligned_entries(prig: Rig) -> None:
    before = prig.ram.allocated()
    prig.post("reporting", [], [(MiB + 100, 3 * FRAME_SIZE)])  # covers 2 whole frames
    assert before - prig.ram.allocated() == 2 * FRAME_SIZE
    assert prig.ram.frame_intact(MiB // FRAME_SIZE)
    assert prig.ram.frame_intact(MiB // FRAME_SIZE + 3)


def _write_poison(rig: Rig, value: int) -> None:
    rig.dev.write_config(0, struct.pack("<IIII", 0, 0, 0, value))


def test_reporting_with_nonzero_poison_discards_nothing(prig: Rig) -> None:
    _write_poison(prig, 0xAAAAAAAA)
    assert prig.dev.poison_val == 0xAAAAAAAA
    before = prig.ram.allocated()
    prig.post("reporting", [], [(4 * MiB, 4 * MiB)])
    assert prig.ram.allocated() == before
    assert prig.dev.metrics.poison_skipped == 1
    _write_poison(prig, 0)
    prig.post("reporting", [], [(4 * MiB, 4 * MiB)])
    assert before - prig.ram.allocated() == 4 * MiB


def test_poison_binds_only_when_negotiated(ram: GuestRam) -> None:
    ram.fill_pattern()
    rig = Rig(ram, features=Feature.VERSION_1 | Feature.REPORTING)
    _write_poison(rig, 0xAAAAAAAA)  # offered, not negotiated: kept, but does not bind
    before = rig.ram.allocated()
    rig.post("reporting", [], [(4 * MiB, 2 * MiB)])
    assert before - rig.ram.allocated() == 2 * MiB
    rig.close()


def test_poison_written_before_features_is_honoured(ram: GuestRam) -> None:
    """Linux writes poison_val in probe, before a vhost-user backend sees FEATURES_OK."""
    ram.fill_pattern()
    rig = Rig(ram, features=Feature.VERSION_1, activate=False)
    _write_poison(rig, 0xAAAAAAAA)
    rig.dev.negotiate(rig.dev.offered_features)
    assert rig.dev.read_config(12, 4) == struct.pack("<I", 0xAAAAAAAA)
    rig.close()
    rig = Rig(ram)
    _write_poison(rig, 0xAAAAAAAA)
    before = rig.ram.allocated()
    rig.post("reporting", [], [(4 * MiB, 2 * MiB)])
    assert rig.ram.allocated() == before and rig.dev.metrics.poison_skipped == 1
    rig.close()


def test_poison_ignored_when_not_offered(ram: GuestRam) -> None:
    rig = Rig(ram, config=BalloonConfig(stats_interval=0, page_poison=False))
    assert rig.dev.config_size == 12  # no poison_val field at all
    with pytest.raises(ConfigError):
        _write_poison(rig, 0xAAAAAAAA)
    assert rig.dev.poison_val == 0
    rig.close()


# -- range reports (device side of the experimental queue) -------------------------------


def range_report(encoding: int, records: bytes, nr: int, base: int = 0, order: int = 0) -> bytes:
    return struct.pack("<HHIIIQ", 1, encoding, nr, order, 0, base) + records


def test_range_report_pfn_len_discards_and_writes_status(prig: Rig) -> None:
    ring = prig.rings["range_report"]
    before = prig.ram.allocated()
    recs = struct.pack("<QQQQ", 256, 256, 1024, 512)
    status = ring.alloc(16)
    used = prig.post("range_report", [range_report(1, recs, 2)], [(status, 16)])
    assert used == 16
    err, _bad, frames = struct.unpack("<IIQ", prig.mem.read(status, 16))
    assert (err, frames) == (0, 768)
    assert before - prig.ram.allocated() == 768 * FRAME_SIZE
    assert prig.ram.frame_intact(255) and prig.ram.frame_intact(512) and prig.ram.frame_zero(300)


def test_range_report_bad_record_discards_nothing(prig: Rig) -> None:
    ring = prig.rings["range_report"]
    before = prig.ram.allocated()
    total = prig.ram.size // FRAME_SIZE
    recs = struct.pack("<QQQQ", 256, 256, total - 1, 2)  # second runs past RAM
    status = ring.alloc(16)
    prig.post("range_report", [range_report(1, recs, 2)], [(status, 16)])
    err, _, frames = struct.unpack("<IIQ", prig.mem.read(status, 16))
    assert err == 5 and frames == 0  # VBALLOON_REPORT_E_RANGE
    assert prig.ram.allocated() == before
    assert prig.dev.metrics.range_report_errors == 1


def test_range_report_without_status_buffer_is_returned(prig: Rig) -> None:
    recs = struct.pack("<QQ", 256, 256)
    before = prig.ram.allocated()
    assert prig.post("range_report", [range_report(1, recs, 1)]) == 0
    assert prig.ram.allocated() == before
    assert prig.dev.metrics.bad_chains == 1


# -- config space, target, reset ------------------------------------------------------------


def test_config_read_write_rules(prig: Rig) -> None:
    dev = prig.dev
    changes = []
    dev.watch_actual(changes.append)
    assert dev.config_size == 16
    dev.set_num_pages(1234)
    assert prig.irq.configs == 1
    assert dev.read_config(0, 8) == struct.pack("<II", 1234, 0)
    # A full-size write (as QEMU's SET_CONFIG sends it) with stale read-only fields.
    dev.write_config(0, struct.pack("<IIII", 99, 1000, 77, 0))
    assert dev.num_pages == 1234 and dev.actual == 1000 and dev.hints.cmd_id == 0
    assert changes == [1000]
    dev.write_config(4, struct.pack("<I", 1000))
    assert changes == [1000]  # no change, no event
    dev.write_config(6, b"\x01\x00")  # partial write of actual's high half
    assert dev.actual == 1000 + (1 << 16)
    with pytest.raises(ConfigError):
        dev.read_config(12, 8)
    with pytest.raises(ConfigError):
        dev.write_config(16, b"\0")
    with pytest.raises(ConfigError):
        dev.set_num_pages(1 << 32)


def test_corrupt_ring_breaks_only_that_queue(prig: Rig) -> None:
    ring = prig.rings["inflate"]
    ring.set_avail_idx(1000)
    assert prig.kick("inflate") is False
    assert prig.dev.metrics.broken_queues == 1
    assert prig.dev.read_status() & Status.DEVICE_NEEDS_RESET and prig.irq.configs == 1
    assert prig.kick("inflate") is False and prig.dev.metrics.broken_queues == 1
    # Other queues keep working.
    before = prig.ram.allocated()
    prig.post("reporting", [], [(4 * MiB, 2 * MiB)])
    assert before - prig.ram.allocated() == 2 * MiB


def test_kick_budget_bounds_work(ram: GuestRam) -> None:
    rig = Rig(ram, config=BalloonConfig(stats_interval=0, kick_budget=4))
    ring = rig.rings["deflate"]
    for i in range(10):
        ring.add([ring.buffer(struct.pack("<I", i))])
    assert rig.kick("deflate") is True
    assert len(ring.get_used()) == 4
    assert rig.kick("deflate") is True
    assert rig.kick("deflate") is False
    assert len(ring.get_used()) == 6
    rig.close()


@pytest.mark.skipif(not is_root(), reason="needs root for nr_hugepages")
def test_report_on_hugetlbfs_discards_only_whole_pages(ram: GuestRam, hugepages: int) -> None:
    huge = GuestRam(8 * MiB, gpa=1 << 30, hugetlb=True)
    huge.fill_pattern()
    rig = Rig(ram, extra=(huge.spec(),))
    rig.post("reporting", [], [(huge.gpa, MiB)])  # 1 MiB: shrinks to nothing
    assert huge.allocated() == 8 * MiB and huge.frame_intact(huge.gpa // FRAME_SIZE)
    rig.post("reporting", [], [(huge.gpa + MiB, 4 * MiB)])  # covers huge page 1 only
    assert huge.allocated() == 6 * MiB
    assert huge.frame_intact(huge.gpa // FRAME_SIZE + 256)
    assert huge.frame_intact(huge.gpa // FRAME_SIZE + 1536)
    rig.close()
    huge.close()


def test_syscall_budget_yields_between_chains(ram: GuestRam) -> None:
    rig = Rig(ram, config=BalloonConfig(stats_interval=0, kick_syscall_budget=1000))
    ring = rig.rings["inflate"]
    for k in range(3):  # 3 chains of 1500 isolated frames: 1500 punches each
        pfns = list(range(256 + 2 * 1500 * k, 256 + 2 * 1500 * (k + 1), 2))
        ring.add([ring.buffer(struct.pack(f"<{len(pfns)}I", *pfns))])
    assert rig.kick("inflate") is True  # one chain finished, then it yields
    assert len(ring.get_used()) == 1 and rig.dev.metrics.discard_syscalls == 1500
    while rig.kick("inflate"):
        pass
    assert len(ring.get_used()) == 2 and rig.dev.metrics.discard_syscalls == 4500
    rig.close()


def test_engine_keeps_bitmaps_without_memory_and_drops_vanished_regions(ram: GuestRam) -> None:
    rig = Rig(ram)
    rig.pfns("inflate", list(range(300, 400)))
    eng = rig.dev._engine  # white box: the engine's own bookkeeping
    eng.set_memory(None)  # the frontend went away
    assert eng.ballooned_frames == 100
    eng.set_memory(rig.mem)  # the same table comes back
    assert eng.ballooned_frames == 100 and eng.is_ballooned(350 * FRAME_SIZE)
    other = GuestRam(8 * MiB, gpa=1 << 32)
    from device import GuestMemory

    mem2 = GuestMemory([other.spec()])
    eng.set_memory(mem2)  # the region is gone: its frames leave the count
    assert eng.ballooned_frames == 0
    mem2.close()
    other.close()
    rig.close()


def test_out_of_budget_still_asks_for_the_next_kick(ram: GuestRam) -> None:
    """With EVENT_IDX the driver kicks only if avail_event asks for it: a kick that ends on
    the budget must publish avail_event too, or the next buffer is never announced."""
    rig = Rig(ram, config=BalloonConfig(stats_interval=0, kick_syscall_budget=10))
    idx = rig.index("inflate")
    q = ring_q = rig.dev.queue(idx)
    ring_q.event_idx = True
    ring = rig.rings["inflate"]
    pfns = list(range(300, 340, 2))  # 20 isolated frames: 20 syscalls, over the budget
    ring.add([ring.buffer(struct.pack("<20I", *pfns))])
    assert rig.kick("inflate") is False  # done, nothing pending
    assert ring.avail_event() == q.next_avail == 1
    rig.close()
