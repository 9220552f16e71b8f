"""Discard engine: turns frame lists and reports into discards via the C data plane.

The mechanism comes from each region's backing (see ``DiscardMode``): punch a
hole in shared fd-backed memory (memfd, hugetlbfs, files), MADV_REMOVE for
shared anonymous memory, MADV_DONTNEED for private anonymous memory. On huge
backing pages only whole aligned pages are discarded; the set of ballooned
frames (one bit per 4 KiB frame, kept across requests and across memory-map
updates of the same region) tells when a huge page is complete.

Every discard is finished before the caller returns the guest's buffer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from device._accel import CData, ffi, lib
from device.defs import FRAME_SIZE, MAX_RANGE_REPORT_BYTES, PFN_BATCH
from device.memory import GuestMemory
from device.metrics import BalloonMetrics

log = logging.getLogger(__name__)

_COUNTER_FIELDS = (
    ("bytes_discarded", "bytes_discarded"),
    ("syscalls", "discard_syscalls"),
    ("refused_ranges", "refused_ranges"),
    ("refused_frames", "refused_frames"),
    ("errors", "discard_errors"),
    ("ns", "discard_ns"),
)


def _words(size: int) -> int:
    """64-bit words of a bitmap with one bit per frame of ``size`` bytes."""
    return (size // FRAME_SIZE + 63) // 64


def _popcount(bm: CData, size: int) -> int:
    return int.from_bytes(ffi.buffer(bm, 8 * _words(size)), "little").bit_count()


#: What identifies one region's bitmap: gpa, size and the backing file (None: anonymous).
_Key = tuple[int, int, tuple[int, int] | None]


class DiscardEngine:
    """Owns the accelerator's region table, the ballooned-frame bitmaps and scratch.

    :param metrics: counters to add every call's results to
    :param reserved: guest-physical byte ranges that are never the guest's RAM, even
        where a region covers them: refused like frames outside RAM, and a backing
        page holding any of their frames is never discarded
    """

    def __init__(self, metrics: BalloonMetrics, reserved: Sequence[tuple[int, int]] = ()) -> None:
        self.metrics = metrics
        self._bitmaps: dict[_Key, CData] = {}
        self._regions_c: CData = ffi.NULL
        self._map = ffi.new("struct balloon_accel_map *")
        extents = sorted(
            (gpa // FRAME_SIZE, -(-(gpa + size) // FRAME_SIZE) - gpa // FRAME_SIZE)
            for gpa, size in reserved
            if size > 0
        )
        self._reserved_c = ffi.new("struct balloon_accel_extent[]", max(len(extents), 1))
        for i, (start, count) in enumerate(extents):
            self._reserved_c[i].start = start
            self._reserved_c[i].count = count
        self._map.reserved = self._reserved_c
        self._map.nreserved = len(extents)
        self._scratch = ffi.new("uint32_t[]", PFN_BATCH)
        self._runs = ffi.new("struct balloon_accel_extent[]", PFN_BATCH)
        self._report_cap = lib.balloon_accel_report_scratch_extents(MAX_RANGE_REPORT_BYTES)
        self._report_scratch = ffi.new("struct balloon_accel_extent[]", self._report_cap)
        self._last_errno = 0
        #: 4 KiB frames currently in the balloon.
        self.ballooned_frames = 0

    # -- memory map ---------------------------------------------------------

    def set_memory(self, mem: GuestMemory | None) -> None:
        """Use ``mem`` from now on.

        Balloon bitmaps of regions that stay (same gpa and size) are kept; with no
        memory at all (the frontend went away) every bitmap is kept for the next
        table. Regions that disappear take their ballooned frames with them.
        """
        regions = list(mem) if mem is not None else []
        keep: dict[_Key, CData] = {}
        arr = ffi.new("struct balloon_accel_region[]", max(len(regions), 1))
        for i, r in enumerate(regions):
            key = (r.gpa, r.size, r.backing)
            bm = self._bitmaps.get(key)
            if bm is None:
                bm = ffi.new("uint64_t[]", _words(r.size))
            keep[key] = bm
            c = arr[i]
            c.gpa, c.size, c.hva = r.gpa, r.size, r.hva
            c.fd_offset, c.page_size, c.fd = r.fd_offset, r.page_size, r.fd
            c.mode = r.mode.value
            c.ballooned = bm
        if mem is None:
            keep = self._bitmaps
        else:
            for key in set(self._bitmaps) - set(keep):
                gone = _popcount(self._bitmaps[key], key[1])
                self.ballooned_frames -= gone
                log.info(
                    "memory map changed: region [%#x+%#x) left with %d ballooned frames",
                    key[0],
                    key[1],
                    gone,
                )
        self._bitmaps = keep
        self._regions_c = arr
        self._map.regions = arr
        self._map.nregions = len(regions)

    @property
    def across_requests(self) -> bool:
        """Whether a huge backing page may be completed by frames of earlier requests
        (safe only with MUST_TELL_HOST: the driver waits for each deflate)."""
        return bool(self._map.flags & lib.BALLOON_ACCEL_MAP_ACROSS_REQUESTS)

    @across_requests.setter
    def across_requests(self, on: bool) -> None:
        if on:
            self._map.flags |= lib.BALLOON_ACCEL_MAP_ACROSS_REQUESTS
        else:
            self._map.flags &= ~lib.BALLOON_ACCEL_MAP_ACROSS_REQUESTS

    def forget_balloon(self) -> None:
        """The guest was reset: every frame is the guest's again; never re-discard them."""
        for (_, size, _), bm in self._bitmaps.items():
            nbytes = 8 * _words(size)
            ffi.memmove(bm, bytes(nbytes), nbytes)
        self.ballooned_frames = 0

    # -- operations -----------------------------------------------------------

    def _absorb(self, c: CData) -> None:
        m = self.metrics
        for cfield, mfield in _COUNTER_FIELDS:
            v = getattr(c, cfield)
            if v:
                setattr(m, mfield, getattr(m, mfield) + v)
        if c.errors:
            if c.last_errno != self._last_errno:
                log.warning("discard failed: errno %d", c.last_errno)
            self._last_errno = c.last_errno

    def inflate(self, pfns: CData, count: int) -> int:
        """Balloon ``count`` little-endian PFNs at ``pfns`` (a ``uint8_t *``).

        :return: frames newly ballooned.
        """
        c = ffi.new("struct balloon_accel_counters *")
        lib.balloon_accel_inflate(self._map, pfns, count, self._scratch, self._runs, c)
        self._absorb(c)
        self.ballooned_frames += c.frames_changed
        self.metrics.inflated_frames += c.frames_changed
        return int(c.frames_changed)

    def deflate(self, pfns: CData, count: int) -> int:
        """Take ``count`` PFNs out of the balloon; nothing is discarded.

        :return: frames that left the balloon.
        """
        c = ffi.new("struct balloon_accel_counters *")
        lib.balloon_accel_deflate(self._map, pfns, count, self._scratch, self._runs, c)
        self._absorb(c)
        self.ballooned_frames -= c.frames_changed
        self.metrics.deflated_frames += c.frames_changed
        return int(c.frames_changed)

    def trim_zero(self) -> tuple[int, int, float]:
        """Punch every all-zero page of the file-backed guest RAM (see
        ``balloon_accel_trim_zero``: only while nothing writes guest RAM).

        :return: bytes given back, frames looked at, seconds it took.
        """
        c = ffi.new("struct balloon_accel_counters *")
        lib.balloon_accel_trim_zero(self._map, c)
        self._absorb(c)
        return int(c.bytes_discarded), int(c.frames), c.ns / 1e9

    def discard_gpa_ranges(self, ranges: Sequence[tuple[int, int]]) -> int:
        """Discard free-page report entries given as (gpa, length) byte ranges.

        :return: bytes discarded.
        """
        n = len(ranges)
        if not n:
            return 0
        arr = ffi.new("struct balloon_accel_gpa_range[]", n)
        for i, (gpa, length) in enumerate(ranges):
            arr[i].gpa = gpa
            arr[i].len = length
        scratch = ffi.new("struct balloon_accel_extent[]", n)
        c = ffi.new("struct balloon_accel_counters *")
        lib.balloon_accel_discard_gpa_ranges(self._map, arr, n, scratch, c)
        self._absorb(c)
        return int(c.bytes_discarded)

    def range_report(
        self, buf: bytes | memoryview, *, validate_only: bool = False
    ) -> tuple[int, int, int]:
        """Validate and discard one range report (header + records).

        :param validate_only: check it, discard nothing (page poison is in force)
        :return: (status code, frames discarded, index of the bad record or 0xffffffff).
        """
        frames = ffi.new("uint64_t *")
        bad = ffi.new("uint32_t *")
        c = ffi.new("struct balloon_accel_counters *")
        err = lib.balloon_accel_range_report(
            self._map,
            ffi.from_buffer(buf),
            len(buf),
            self._report_scratch,
            self._report_cap,
            c,
            frames,
            bad,
            lib.BALLOON_ACCEL_REPORT_VALIDATE_ONLY if validate_only else 0,
        )
        self._absorb(c)
        return int(err), int(frames[0]), int(bad[0])

    def is_ballooned(self, gpa: int) -> bool:
        """Whether the frame holding ``gpa`` is in the balloon (for tests and queries)."""
        for (start, size, _), bm in self._bitmaps.items():
            if start <= gpa < start + size:
                f = (gpa - start) // FRAME_SIZE
                return bool(bm[f // 64] >> (f % 64) & 1)
        return False

    @staticmethod
    def extent_array(extents: Sequence[tuple[int, int]]) -> tuple[CData, int]:
        """(first frame, frames) pairs as a C array for :meth:`raw_discard`."""
        arr = ffi.new("struct balloon_accel_extent[]", max(len(extents), 1))
        for i, (start, count) in enumerate(extents):
            arr[i].start = start
            arr[i].count = count
        return arr, len(extents)

    def raw_discard(self, arr: CData, n: int) -> int:
        """Reference path for benchmarks: one syscall per run of :meth:`extent_array`, as given.

        No decoding, sorting or bookkeeping: what a caller that already had the
        coalesced ranges would issue. :return: bytes discarded.
        """
        c = ffi.new("struct balloon_accel_counters *")
        lib.balloon_accel_discard_extents(self._map, arr, n, c)
        self._absorb(c)
        return int(c.bytes_discarded)
