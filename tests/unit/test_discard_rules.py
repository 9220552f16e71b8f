"""What the device must never discard: frames the guest cannot own, huge pages completed
behind a queued deflate, and anything an address near 2^64 could wrap onto."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device import BalloonConfig, ConfigError, Feature, GuestMemory, RegionSpec
from device.defs import PC_LEGACY_WINDOW
from device.discard import DiscardEngine
from device.metrics import BalloonMetrics
from device.testing import FRAME_SIZE, GuestRam, MiB
from tests import reference as ref
from tests.conftest import Rig, is_root

WINDOW = range(PC_LEGACY_WINDOW[0] // FRAME_SIZE, sum(PC_LEGACY_WINDOW) // FRAME_SIZE)
HUGE = 2 * MiB // FRAME_SIZE  # frames in a 2 MiB page
needs_hugepages = pytest.mark.skipif(not is_root(), reason="needs root for nr_hugepages")


# -- the PC's legacy window ------------------------------------------------------------------


def test_legacy_window_is_refused_on_4k_memory(prig: Rig) -> None:
    pfns = list(range(WINDOW.start - 16, WINDOW.stop + 16))
    before = prig.ram.allocated()
    prig.pfns("inflate", pfns)
    m = prig.dev.metrics
    assert (m.refused_ranges, m.refused_frames) == (1, len(WINDOW))
    assert before - prig.ram.allocated() == 32 * FRAME_SIZE
    assert all(prig.ram.frame_intact(f) for f in WINDOW)
    assert all(prig.ram.frame_zero(f) for f in (WINDOW.start - 1, WINDOW.stop))
    assert prig.dev.tracked_frames == 32  # the window never enters the record


def test_legacy_window_in_reports(prig: Rig) -> None:
    before = prig.ram.allocated()
    prig.post("reporting", [], [(0, 2 * MiB)])  # a free-page report over it: the rest goes
    assert before - prig.ram.allocated() == 2 * MiB - len(WINDOW) * FRAME_SIZE
    assert all(prig.ram.frame_intact(f) for f in WINDOW)
    assert prig.dev.metrics.refused_ranges == 1
    status = prig.rings["range_report"].alloc(16)
    report = ref.encode_pfn_len([(WINDOW.start - 1, 2)])
    assert prig.post("range_report", [report], [(status, 16)]) == 16
    err, _, frames = ref.STATUS.unpack(prig.mem.read(status, 16))
    assert (err, frames) == (ref.E_RANGE, 0)  # a range report is refused whole
    assert prig.ram.frame_intact(WINDOW.start)


@needs_hugepages
def test_huge_page_holding_the_window_is_never_punched(hugepages: int) -> None:
    """On hugetlbfs QEMU's first region covers 0-2 MiB, window included."""
    huge = GuestRam(8 * MiB, hugetlb=True)
    huge.fill_pattern()
    rings = GuestRam(8 * MiB, gpa=1 << 30)
    rig = Rig(rings, extra=(huge.spec(),))
    full = huge.allocated()
    rig.pfns("inflate", list(range(HUGE)))  # every frame of page 0, the window too
    assert huge.allocated() == full, "firmware memory was punched"
    rig.post("reporting", [], [(0, 4 * MiB)])
    assert full - huge.allocated() == 2 * MiB  # page 1 only
    assert all(huge.frame_intact(f) for f in range(HUGE))
    rig.close()
    huge.close()


def test_nothing_reserved_when_configured_so(ram: GuestRam) -> None:
    ram.fill_pattern()
    rig = Rig(ram, config=BalloonConfig(stats_interval=0, reserved_gpa=()))
    rig.pfns("inflate", list(WINDOW))
    assert all(ram.frame_zero(f) for f in WINDOW)
    rig.close()


@needs_hugepages
def test_a_region_off_the_huge_page_grid_gives_back_only_the_pages_inside(
    ram: GuestRam, hugepages: int
) -> None:
    """vfio-user maps RAM in pieces (QEMU's PAM windows split it below 1 MiB), so a region
    may start or end inside a huge page of its file. The pages wholly inside go back; the
    two it shares with its neighbours are never punched, whatever the guest gives."""
    huge = GuestRam(8 * MiB, hugetlb=True)  # the file: huge pages at 0, 2, 4, 6 MiB
    huge.fill_pattern()
    view = memoryview(huge.mapping)[1 * MiB : 7 * MiB]
    gpa = 1 << 30
    rig = Rig(ram, extra=(RegionSpec(gpa, 6 * MiB, view, huge.fd, 1 * MiB),))
    try:
        full = huge.allocated()
        first = gpa // FRAME_SIZE
        rig.pfns("inflate", list(range(first, first + 6 * MiB // FRAME_SIZE)))
        assert full - huge.allocated() == 4 * MiB  # the pages at 2 and 4 MiB
        frames = 1 * MiB // FRAME_SIZE
        assert all(huge.frame_intact(f) for f in range(frames, 2 * frames)), "edge punched"
        assert all(huge.frame_intact(f) for f in range(6 * frames, 7 * frames)), "edge punched"
        assert all(huge.frame_zero(f) for f in range(2 * frames, 6 * frames))
        assert rig.dev.metrics.discard_errors == 0
    finally:
        rig.close()
        view.release()
        huge.close()


# -- huge pages without MUST_TELL_HOST -----------------------------------------------------------


@pytest.fixture
def huge_rig(ram: GuestRam, hugepages: int) -> Iterator[tuple[Rig, GuestRam]]:
    huge = GuestRam(8 * MiB, gpa=1 << 30, hugetlb=True)
    huge.fill_pattern()
    rig = Rig(ram, extra=(huge.spec(),), features=_offered() & ~Feature.MUST_TELL_HOST)
    yield rig, huge
    rig.close()
    huge.close()


def _offered() -> int:
    return BalloonConfig().offered_features()


@needs_hugepages
def test_without_must_tell_host_halves_never_complete_a_page(
    huge_rig: tuple[Rig, GuestRam],
) -> None:
    rig, huge = huge_rig
    first = huge.gpa // FRAME_SIZE
    full = huge.allocated()
    rig.pfns("inflate", list(range(first, first + HUGE // 2)))
    rig.pfns("inflate", list(range(first + HUGE // 2, first + HUGE)))
    assert huge.allocated() == full
    assert rig.dev.tracked_frames == HUGE  # recorded all the same
    # A whole page named by one request does go back.
    rig.pfns("inflate", list(range(first + HUGE, first + 2 * HUGE)), per_buffer=HUGE)
    assert full - huge.allocated() == 2 * MiB


@needs_hugepages
def test_without_must_tell_host_a_queued_deflate_is_not_overtaken(
    huge_rig: tuple[Rig, GuestRam],
) -> None:
    """The driver may reuse a page once its deflate is queued; the device may serve the next
    inflate first. That inflate must not complete the page."""
    rig, huge = huge_rig
    first = huge.gpa // FRAME_SIZE
    rig.pfns("inflate", list(range(first, first + HUGE // 2)))
    deflate = rig.rings["deflate"]
    deflate.add([deflate.buffer(struct.pack(f"<{HUGE // 2}I", *range(first, first + HUGE // 2)))])
    huge.fill_pattern(0, HUGE // 2)  # queued, not yet served: the guest writes the pages again
    rig.pfns("inflate", list(range(first + HUGE // 2, first + HUGE)))
    assert all(huge.frame_intact(f) for f in range(first, first + HUGE // 2)), "data lost"
    rig.kick("deflate")
    assert deflate.get_used()


# -- addresses near 2^64 ------------------------------------------------------------------------


def test_a_region_reaching_2_64_is_refused(ram: GuestRam) -> None:
    with pytest.raises(ConfigError, match="2\\^64"):
        GuestMemory([RegionSpec(2**64 - ram.size, ram.size, ram.mapping, ram.fd)])


@pytest.fixture(scope="module")
def engine() -> Iterator[tuple[DiscardEngine, GuestRam]]:
    ram = GuestRam(8 * MiB)
    mem = GuestMemory([ram.spec()])
    eng = DiscardEngine(BalloonMetrics())
    eng.set_memory(mem)
    yield eng, ram
    eng.set_memory(None)
    mem.close()
    ram.close()


@settings(max_examples=300, deadline=None)
@given(
    gpa=st.one_of(
        st.integers(2**64 - 2 * FRAME_SIZE, 2**64 - 1), st.integers(2**64 - 2**32, 2**64 - 1)
    ),
    length=st.one_of(st.integers(0, 3 * FRAME_SIZE), st.integers(0, 2**64 - 1)),
)
def test_report_ranges_near_2_64_discard_nothing(
    engine: tuple[DiscardEngine, GuestRam], gpa: int, length: int
) -> None:
    """Rounding such a range up to whole frames used to wrap and name all of guest RAM."""
    eng, ram = engine
    ram.mapping[:FRAME_SIZE] = b"\x5a" * FRAME_SIZE
    before = eng.metrics.bytes_discarded
    assert eng.discard_gpa_ranges([(gpa, length)]) == 0
    assert eng.metrics.bytes_discarded == before
    assert ram.mapping[:FRAME_SIZE] == b"\x5a" * FRAME_SIZE


# -- work one range report may cause ------------------------------------------------------------


def _range_report(rig: Rig, report: bytes) -> tuple[int, int]:
    status = rig.rings["range_report"].alloc(16)
    assert rig.post("range_report", [report], [(status, 16)]) == 16
    err, _, frames = ref.STATUS.unpack(rig.mem.read(status, 16))
    return err, frames


def test_a_report_over_the_run_limit_discards_nothing() -> None:
    """A BITMAP of alternating bits names a run per set bit: a million syscalls in 256 KiB."""
    ram = GuestRam(512 * MiB)
    rig = Rig(ram)
    start = WINDOW.stop
    for runs in (ref.MAX_RUNS, ref.MAX_RUNS + 1):
        before = rig.dev.metrics.discard_syscalls
        report = ref.encode_bitmap(start, 0, range(0, 2 * runs, 2), 2 * runs)
        err, frames = _range_report(rig, report)
        syscalls = rig.dev.metrics.discard_syscalls - before
        if runs == ref.MAX_RUNS:
            assert (err, frames, syscalls) == (ref.OK, runs, runs)
        else:
            assert (err, frames, syscalls) == (ref.E_RUNS, 0, 0)
    rig.close()
    ram.close()


def test_range_reports_honour_page_poison(prig: Rig) -> None:
    prig.dev.write_config(12, struct.pack("<I", 0xAAAAAAAA))
    before = prig.ram.allocated()
    err, frames = _range_report(prig, ref.encode_pfn_len([(1024, 512)]))
    assert (err, frames) == (ref.OK, 0)
    assert prig.ram.allocated() == before and prig.ram.frame_intact(1024)
    assert prig.dev.metrics.poison_skipped == 1
    err, _ = _range_report(prig, ref.encode_pfn_len([(1024, 0)]))  # still validated
    assert err == ref.E_RECORD


def test_a_status_spanning_two_regions_is_written(ram: GuestRam) -> None:
    """Adjacent regions (QEMU splits RAM so): the ring walk accepts the buffer, so must the
    status write, or the frames go and the guest hears nothing."""
    upper = GuestRam(4 * MiB, gpa=ram.size)
    upper.fill_pattern()
    rig = Rig(ram, extra=(upper.spec(),))
    ring = rig.rings["range_report"]
    first = upper.gpa // FRAME_SIZE
    head = ring.add([ring.buffer(ref.encode_pfn_len([(first + 16, 16)]))], [(ram.size - 8, 16)])
    rig.kick("range_report")
    assert ring.get_used() == [(head, 16)]
    err, _, frames = ref.STATUS.unpack(rig.mem.read(ram.size - 8, 16))
    assert (err, frames) == (ref.OK, 16)
    rig.close()
    upper.close()
