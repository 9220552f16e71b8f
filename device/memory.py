"""Guest memory: the regions a transport mapped, and checked address translation.

Built from plain values so any transport can feed it (vhost-user's memory
table, vfio-user's DMA maps, tests' memfds). Knows nothing about virtio.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import mmap
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum

from device._accel import ffi, lib
from device.defs import FRAME_SIZE
from device.errors import ConfigError, GuestError

_U64_LIMIT = 1 << 64
log = logging.getLogger(__name__)


class DiscardMode(Enum):
    """How a region's memory is given back; decided by its backing, not by callers."""

    NONE = lib.BALLOON_ACCEL_MODE_NONE  #: read-only: never discard
    PUNCH_HOLE = lib.BALLOON_ACCEL_MODE_PUNCH_HOLE  #: shared, fd-backed (memfd, hugetlbfs, file)
    REMOVE = lib.BALLOON_ACCEL_MODE_REMOVE  #: shared anonymous (no fd): MADV_REMOVE
    DONTNEED = lib.BALLOON_ACCEL_MODE_DONTNEED  #: private anonymous: MADV_DONTNEED


@dataclass(frozen=True)
class RegionSpec:
    """What a transport knows about one region, as plain values.

    :param gpa: guest physical address of the first byte
    :param size: length in bytes
    :param mapping: our writable mapping of the region (an ``mmap`` or buffer)
    :param fd: backing file descriptor, or -1 (the region does not own it)
    :param fd_offset: file offset of ``gpa`` in ``fd``
    :param shared: the mapping is MAP_SHARED (guest and device see one copy)
    :param readonly: never discard (ROM-like windows)
    """

    gpa: int
    size: int
    mapping: mmap.mmap | bytearray | memoryview
    fd: int = -1
    fd_offset: int = 0
    shared: bool = True
    readonly: bool = False


@dataclass
class MemoryRegion:
    """One mapped guest RAM region with its backing facts resolved."""

    gpa: int
    size: int
    fd: int
    fd_offset: int
    page_size: int
    hugetlbfs: bool
    mode: DiscardMode
    view: memoryview = field(repr=False)
    hva: int = field(repr=False)
    _cbuf: object = field(repr=False, default=None)
    #: (st_dev, st_ino) of the backing file, None without one: the same guest frames
    #: on another file are other memory
    backing: tuple[int, int] | None = None

    @property
    def end(self) -> int:
        """First guest physical address after the region."""
        return self.gpa + self.size


def backing_page_size(fd: int) -> tuple[int, bool]:
    """Return (page size, is hugetlbfs) of the file behind ``fd``.

    :raise ConfigError: if fstatfs fails.
    """
    magic = ffi.new("uint64_t *")
    bsize = ffi.new("uint64_t *")
    ret = lib.balloon_accel_fs_info(fd, magic, bsize)
    if ret < 0:
        raise ConfigError(f"fstatfs on fd {fd} failed: {os.strerror(-ret)}")
    if magic[0] == lib.BALLOON_ACCEL_HUGETLBFS_MAGIC:
        return int(bsize[0]), True
    return FRAME_SIZE, False


def _make_region(spec: RegionSpec) -> MemoryRegion:
    if spec.gpa % FRAME_SIZE or spec.size <= 0 or spec.size % FRAME_SIZE:
        raise ConfigError(f"region gpa={spec.gpa:#x} size={spec.size:#x} is not 4 KiB aligned")
    if spec.gpa + spec.size >= _U64_LIMIT:
        # Ending at 2^64 would make its end 0 in 64-bit arithmetic.
        raise ConfigError(f"region gpa={spec.gpa:#x} size={spec.size:#x} reaches 2^64")
    backing = None
    if spec.fd >= 0:
        page_size, huge = backing_page_size(spec.fd)
        try:
            st = os.fstat(spec.fd)
        except OSError as err:
            raise ConfigError(f"fstat on fd {spec.fd} failed: {err.strerror}") from err
        backing = (st.st_dev, st.st_ino)
    else:
        page_size, huge = FRAME_SIZE, False
    # Huge pages can only be punched whole: one that sticks out of the region at either
    # end (a region that does not start or end on a page of its file) is never
    # discarded; the discard engine keeps to the pages inside.
    if spec.size % page_size or spec.fd_offset % page_size:
        log.debug(
            "region gpa=%#x size=%#x is not aligned to its %d byte backing pages: "
            "the partial pages at its edges are never discarded",
            spec.gpa,
            spec.size,
            page_size,
        )
    view = memoryview(spec.mapping).cast("B")
    if len(view) < spec.size:
        raise ConfigError(f"mapping of region gpa={spec.gpa:#x} is shorter than its size")
    view = view[: spec.size]
    cbuf = ffi.from_buffer(view, require_writable=True)
    if spec.readonly:
        mode = DiscardMode.NONE
        page_size = FRAME_SIZE  # never discarded: no huge-page completion to track
    elif not spec.shared:
        mode = DiscardMode.DONTNEED
    elif spec.fd >= 0:
        mode = DiscardMode.PUNCH_HOLE
    else:
        mode = DiscardMode.REMOVE
    return MemoryRegion(
        gpa=spec.gpa,
        size=spec.size,
        fd=spec.fd,
        fd_offset=spec.fd_offset,
        page_size=page_size,
        hugetlbfs=huge,
        mode=mode,
        view=view,
        hva=int(ffi.cast("uintptr_t", cbuf)),
        _cbuf=cbuf,
        backing=backing,
    )


class GuestMemory:
    """The guest's RAM as a sorted set of non-overlapping regions.

    Every translation is overflow-safe and refuses anything not wholly inside
    one region. The regions' fds stay owned by the caller.
    """

    def __init__(self, specs: Iterable[RegionSpec]) -> None:
        regions = sorted((_make_region(s) for s in specs), key=lambda r: r.gpa)
        for prev, cur in itertools.pairwise(regions):
            if cur.gpa < prev.end:
                raise ConfigError(
                    f"regions overlap: [{prev.gpa:#x}, {prev.end:#x}) "
                    f"and [{cur.gpa:#x}, {cur.end:#x})"
                )
        self.regions: list[MemoryRegion] = regions
        self._starts = [r.gpa for r in regions]

    @classmethod
    def from_tuples(
        cls, tuples: Iterable[tuple[int, int, mmap.mmap | bytearray | memoryview, int, int, bool]]
    ) -> GuestMemory:
        """Build from ``(gpa, size, mapping, fd, fd_offset, shared)`` tuples."""
        return cls(RegionSpec(g, s, m, fd, off, sh) for g, s, m, fd, off, sh in tuples)

    def __iter__(self) -> Iterator[MemoryRegion]:
        return iter(self.regions)

    @property
    def total_size(self) -> int:
        """Bytes of guest RAM."""
        return sum(r.size for r in self.regions)

    def find(self, gpa: int) -> MemoryRegion | None:
        """The region holding ``gpa``, or None."""
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and gpa < self.regions[i].end:
            return self.regions[i]
        return None

    def translate(self, gpa: int, length: int) -> tuple[MemoryRegion, int]:
        """Map ``[gpa, gpa + length)`` to (region, offset into the region).

        :raise GuestError: if the range wraps, or is not wholly inside one region.
        """
        if gpa < 0 or length < 0 or gpa + length > _U64_LIMIT:
            raise GuestError(f"range gpa={gpa:#x} len={length:#x} wraps")
        r = self.find(gpa)
        if r is None or gpa + length > r.end:
            raise GuestError(f"range gpa={gpa:#x} len={length:#x} is not inside guest RAM")
        return r, gpa - r.gpa

    def covers(self, gpa: int, length: int) -> bool:
        """Whether ``[gpa, gpa + length)`` lies in RAM, possibly across adjacent regions."""
        if gpa < 0 or length < 0 or gpa + length > _U64_LIMIT:
            return False
        end = gpa + length
        while True:
            r = self.find(gpa)
            if r is None:
                return False
            if end <= r.end:
                return True
            gpa = r.end

    def read(self, gpa: int, length: int) -> bytes:
        """Copy ``length`` bytes from guest memory (may cross adjacent regions).

        :raise GuestError: if any byte is outside guest RAM.
        """
        if not self.covers(gpa, length):
            raise GuestError(f"read gpa={gpa:#x} len={length:#x} is not inside guest RAM")
        parts = []
        while length:
            r = self.find(gpa)
            assert r is not None  # covers() checked every byte
            n = min(length, r.end - gpa)
            off = gpa - r.gpa
            parts.append(r.view[off : off + n])
            gpa += n
            length -= n
        return b"".join(parts)

    def write(self, gpa: int, data: bytes) -> None:
        """Write ``data`` to guest memory (may cross adjacent regions, as a read may).

        :raise GuestError: if any byte is outside guest RAM (nothing is written then).
        """
        if not self.covers(gpa, len(data)):
            raise GuestError(f"write gpa={gpa:#x} len={len(data):#x} is not inside guest RAM")
        done = 0
        while done < len(data):
            r = self.find(gpa + done)
            assert r is not None  # covers() checked every byte
            off = gpa + done - r.gpa
            n = min(len(data) - done, r.end - (gpa + done))
            r.view[off : off + n] = data[done : done + n]
            done += n

    def close(self) -> None:
        """Drop our views so the caller can unmap; the object is unusable after."""
        for r in self.regions:
            ffi.release(r._cbuf)
            r.view.release()
        self.regions = []
        self._starts = []
