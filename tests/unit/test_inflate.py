"""Inflate and deflate through the real queue path: memory really goes back.

Each test checks the memfd's allocated blocks (what the host got back) and
that every frame not ballooned keeps its pattern byte for byte.
"""

from __future__ import annotations

import mmap
import random
from collections.abc import Iterator

import pytest

from device import RegionSpec
from device.testing import FRAME_SIZE, GuestRam, MiB
from tests.conftest import Rig, is_root

#: First frame above the PC's legacy window (1 MiB): below it the device refuses frames
#: 0xA0-0xFF, which random samples over all of RAM would hit.
LOW_RAM_END = 0x100000 // FRAME_SIZE


@pytest.fixture
def big(ram256: GuestRam) -> Iterator[Rig]:
    ram256.fill_pattern()
    r = Rig(ram256)
    yield r
    r.close()


def assert_only_ballooned_changed(rig: Rig, ballooned: set[int]) -> None:
    for f in range(rig.data_frames):
        if f not in ballooned:
            assert rig.ram.frame_intact(f), f"frame {f} was not ballooned but changed"


def test_contiguous_inflate_frees_exactly(big: Rig) -> None:
    before = big.ram.allocated()
    pfns = list(range(1000, 1000 + 16384))  # 64 MiB as 64 buffers of 256
    big.pfns("inflate", pfns)
    assert before - big.ram.allocated() == len(pfns) * FRAME_SIZE
    m = big.dev.metrics
    assert m.inflate_buffers == 64 and m.inflated_frames == 16384
    assert m.discard_syscalls == 64  # one coalesced punch per 1 MiB buffer
    assert m.bytes_discarded == 64 * MiB and m.discard_errors == 0
    assert big.dev.tracked_frames == 16384
    assert_only_ballooned_changed(big, set(pfns))
    assert all(big.ram.frame_zero(f) for f in (1000, 9000, 17383))


def test_shuffled_inflate_frees_exactly(big: Rig) -> None:
    rnd = random.Random(7)
    pfns = rnd.sample(range(LOW_RAM_END, big.data_frames), 20000)
    before = big.ram.allocated()
    big.pfns("inflate", pfns)
    assert before - big.ram.allocated() == len(pfns) * FRAME_SIZE
    assert big.dev.metrics.inflated_frames == len(pfns)
    assert_only_ballooned_changed(big, set(pfns))


def test_duplicated_pfns_count_once(big: Rig) -> None:
    rnd = random.Random(3)
    base = rnd.sample(range(LOW_RAM_END, big.data_frames), 3000)
    pfns = base + base[:1000] + [base[0]] * 50
    rnd.shuffle(pfns)
    before = big.ram.allocated()
    big.pfns("inflate", pfns)
    assert before - big.ram.allocated() == len(set(base)) * FRAME_SIZE
    assert big.dev.metrics.inflated_frames == len(set(base))
    assert big.dev.tracked_frames == len(set(base))
    assert_only_ballooned_changed(big, set(base))


def test_deflate_discards_nothing_and_reinflate_discards_again(big: Rig) -> None:
    pfns = list(range(5000, 5000 + 2048))
    big.pfns("inflate", pfns)
    after_inflate = big.ram.allocated()
    syscalls = big.dev.metrics.discard_syscalls
    big.pfns("deflate", pfns)
    assert big.ram.allocated() == after_inflate
    assert big.dev.metrics.discard_syscalls == syscalls
    assert big.dev.metrics.deflated_frames == 2048 and big.dev.tracked_frames == 0
    # The guest reuses the pages, then balloons them again: they must go back again.
    big.ram.fill_pattern(5000, 2048)
    big.pfns("inflate", pfns)
    assert big.ram.allocated() == after_inflate
    assert big.dev.tracked_frames == 2048


def test_pfns_outside_ram_are_refused_and_counted(big: Rig) -> None:
    total = big.ram.size // FRAME_SIZE
    before = big.ram.allocated()
    big.pfns("inflate", [total, total + 1, total + 2, 0xFFFFFFFF, 10, 11])
    m = big.dev.metrics
    assert m.refused_ranges == 2 and m.refused_frames == 4
    assert before - big.ram.allocated() == 2 * FRAME_SIZE
    assert_only_ballooned_changed(big, {10, 11})


def test_long_and_odd_sized_buffers(big: Rig) -> None:
    """A 5000-PFN buffer (longer than Linux sends) plus a trailing partial PFN."""
    import struct

    pfns = list(range(20000, 25000))
    before = big.ram.allocated()
    big.post("inflate", [struct.pack("<5000I", *pfns) + b"\x01\x02"])
    assert before - big.ram.allocated() == 5000 * FRAME_SIZE


def _rss_kib(addr: int) -> int:
    """Rss of the mapping starting at ``addr`` in this process, from smaps."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if line.split("-", 1)[0] == f"{addr:x}":
            for sub in lines[i + 1 :]:
                if sub.startswith("Rss:"):
                    return int(sub.split()[1])
    raise AssertionError(f"no mapping at {addr:#x}")


@pytest.mark.parametrize("shared", [False, True], ids=["private-dontneed", "shared-remove"])
def test_anonymous_region_rss_drops(ram: GuestRam, shared: bool) -> None:
    flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
    anon = mmap.mmap(-1, 32 * MiB, flags=flags | mmap.MAP_ANONYMOUS)
    anon.write(b"\xab" * (32 * MiB))
    gpa = 1 << 30
    rig = Rig(ram, extra=(RegionSpec(gpa, 32 * MiB, anon, shared=shared),))
    region = rig.mem.find(gpa)
    assert _rss_kib(region.hva) >= 32 * 1024
    first = gpa // FRAME_SIZE
    rig.pfns("inflate", list(range(first, first + 4096)))  # 16 MiB
    assert _rss_kib(region.hva) <= 16 * 1024 + 64
    assert anon[16 * MiB : 16 * MiB + 4] == b"\xab" * 4
    assert anon[:4] == bytes(4)
    rig.close()


@pytest.mark.skipif(not is_root(), reason="needs root for nr_hugepages")
def test_hugetlbfs_halves_complete_a_huge_page(ram: GuestRam, hugepages: int) -> None:
    huge = GuestRam(8 * MiB, gpa=1 << 30, hugetlb=True)
    huge.fill_pattern()
    rig = Rig(ram, extra=(huge.spec(),))
    first = huge.gpa // FRAME_SIZE
    full = huge.allocated()
    assert full == 8 * MiB
    # Half of huge page 0: 4 KiB punches into a 2 MiB page free nothing, so none is issued.
    rig.pfns("inflate", list(range(first, first + 256)))
    assert huge.allocated() == full
    assert rig.dev.metrics.discard_syscalls == 0
    assert rig.dev.is_ballooned(huge.gpa) and rig.dev.is_ballooned(huge.gpa + MiB - 1)
    assert not rig.dev.is_ballooned(huge.gpa + MiB)
    assert huge.frame_intact(first)  # nothing zeroed yet
    # The other half in a separate buffer completes it: exactly one huge page goes back.
    rig.pfns("inflate", list(range(first + 256, first + 512)))
    assert huge.allocated() == full - 2 * MiB
    # One half of huge page 1 only: nothing freed, the half stays recorded.
    rig.pfns("inflate", list(range(first + 512, first + 768)))
    assert huge.allocated() == full - 2 * MiB
    assert rig.dev.tracked_frames == 768
    for f in range(first + 512, first + 4 * 512):
        assert huge.frame_intact(f)
    # Deflating half of page 1 and inflating it again completes nothing.
    rig.pfns("deflate", list(range(first + 512, first + 640)))
    rig.pfns("inflate", list(range(first + 768, first + 1024)))
    assert huge.allocated() == full - 2 * MiB
    rig.pfns("inflate", list(range(first + 512, first + 640)))
    assert huge.allocated() == full - 4 * MiB
    rig.close()
    huge.close()


def test_failed_discard_is_counted_not_fatal(ram: GuestRam) -> None:
    """A backing fd that cannot punch (opened read-only): errors counted, buffer returned."""
    import os

    data = GuestRam(8 * MiB, gpa=1 << 30)
    data.fill_pattern()
    ro = os.open(f"/proc/self/fd/{data.fd}", os.O_RDONLY)
    spec = RegionSpec(data.gpa, data.size, data.mapping, ro, 0, True)
    rig = Rig(ram, extra=(spec,))
    first = data.gpa // FRAME_SIZE
    rig.pfns("inflate", list(range(first, first + 256)))
    m = rig.dev.metrics
    assert m.discard_errors == 1 and m.discard_syscalls == 1 and m.bytes_discarded == 0
    assert m.inflated_frames == 256  # accounted as ballooned all the same
    assert data.allocated() == 8 * MiB
    rig.close()
    os.close(ro)
    data.close()


def test_missing_accelerator_says_how_to_build() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['device._balloon_accel'] = None\n"
        "try:\n import device\nexcept ImportError as e:\n print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "make dev" in out.stdout and "pip install -e ." in out.stdout
