"""Guest memory map: translation bounds, backing detection, discard mode choice."""

import mmap

import pytest

from device import ConfigError, DiscardMode, GuestError, GuestMemory, RegionSpec
from device.testing import GuestRam, MiB
from tests.conftest import is_root


def two_regions() -> tuple[GuestMemory, list[GuestRam]]:
    a, b = GuestRam(4 * MiB), GuestRam(4 * MiB, gpa=1 << 32)
    return GuestMemory([a.spec(), b.spec()]), [a, b]


def test_translate_inside_and_edges() -> None:
    mem, rams = two_regions()
    r, off = mem.translate(0x1000, 0x1000)
    assert (r.gpa, off) == (0, 0x1000)
    r, off = mem.translate((1 << 32) + 4 * MiB - 1, 1)
    assert off == 4 * MiB - 1
    mem.translate(4 * MiB - 8, 8)
    for gpa, n in [
        (4 * MiB - 8, 9),
        (4 * MiB, 1),
        ((1 << 32) - 1, 2),
        ((1 << 64) - 1, 2),
        (2**64 - 4096, 8192),
        (-1, 1),
        (0, -1),
    ]:
        with pytest.raises(GuestError):
            mem.translate(gpa, n)
    for x in rams:
        x.close()


def test_covers_adjacent_regions_but_translate_refuses_span() -> None:
    a, b = GuestRam(4 * MiB), GuestRam(4 * MiB, gpa=4 * MiB)
    mem = GuestMemory([b.spec(), a.spec()])  # unsorted input is fine
    assert mem.covers(4 * MiB - 4096, 8192)
    assert not mem.covers(8 * MiB - 4096, 8192)
    with pytest.raises(GuestError):
        mem.translate(4 * MiB - 4096, 8192)
    a.mapping[4 * MiB - 2 :] = b"xy"
    b.mapping[:2] = b"zw"
    assert mem.read(4 * MiB - 2, 4) == b"xyzw"
    a.close()
    b.close()


def test_overlapping_and_misaligned_regions_are_refused() -> None:
    a, b = GuestRam(4 * MiB), GuestRam(4 * MiB, gpa=2 * MiB)
    with pytest.raises(ConfigError):
        GuestMemory([a.spec(), b.spec()])
    with pytest.raises(ConfigError):
        GuestMemory([RegionSpec(100, 4096, bytearray(4096))])
    with pytest.raises(ConfigError):
        GuestMemory([RegionSpec(0, 8192, bytearray(4096))])
    a.close()
    b.close()


def test_discard_mode_from_backing() -> None:
    ram = GuestRam(2 * MiB)
    priv = mmap.mmap(-1, MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    shared = mmap.mmap(-1, MiB)
    mem = GuestMemory(
        [
            ram.spec(),
            RegionSpec(1 << 30, MiB, priv, shared=False),
            RegionSpec(2 << 30, MiB, shared),
            RegionSpec(3 << 30, MiB, bytearray(MiB), readonly=True),
        ]
    )
    modes = [r.mode for r in mem]
    assert modes == [
        DiscardMode.PUNCH_HOLE,
        DiscardMode.DONTNEED,
        DiscardMode.REMOVE,
        DiscardMode.NONE,
    ]
    assert [r.page_size for r in mem] == [4096] * 4
    mem.close()
    ram.close()


@pytest.mark.skipif(not is_root(), reason="needs root for nr_hugepages")
def test_hugetlbfs_is_recognised(hugepages: int) -> None:
    ram = GuestRam(4 * MiB, hugetlb=True)
    mem = GuestMemory([ram.spec()])
    (r,) = list(mem)
    assert r.hugetlbfs and r.page_size == 2 * MiB and r.mode is DiscardMode.PUNCH_HOLE
    mem.close()
    ram.close()
