"""Doubles shared by the tests, the benchmarks and the in-process demo.

``GuestRam`` is guest RAM as QEMU gives it to a backend: a memfd mapped
shared, with a known pattern per frame to prove what a discard left alone.
``DriverRing`` plays the part of Linux's virtio_ring: it lays out a
descriptor table, avail ring and used ring in guest memory, posts chains the
way the Linux balloon driver does and reads back used elements. Its ``raw_*``
methods write whatever a hostile driver would. Nothing in the product's data
path imports this module.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Sequence

from device.defs import FRAME_SIZE
from device.memory import GuestMemory, RegionSpec
from device.virtqueue import SplitQueue

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
MiB = 1 << 20


class DriverRing:
    """Driver side of one split virtqueue living at ``base`` in guest memory.

    Layout: descriptor table, avail ring (+ used_event), used ring (+ avail_event),
    then a data area that buffers are carved from.
    """

    def __init__(self, mem: GuestMemory, size: int, base: int, data_size: int = MiB) -> None:
        self.mem = mem
        self.size = size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.data = (self.used + 6 + 8 * size + FRAME_SIZE - 1) & ~(FRAME_SIZE - 1)
        self.data_end = self.data + data_size
        self._next_data = self.data
        self.avail_idx = 0
        self.last_used = 0
        #: keep used_event current (a hostile-driver test may turn this off)
        self.event_idx_writes = True
        self._free = list(range(size))
        self._chains: dict[int, list[int]] = {}
        for off in range(base, self.data, 4096):
            mem.write(off, bytes(min(4096, self.data - off)))

    def device_queue(self, **kw: object) -> SplitQueue:
        """The device-side state for this ring."""
        return SplitQueue(self.size, self.desc, self.avail, self.used, **kw)  # type: ignore[arg-type]

    # -- buffers ------------------------------------------------------------

    def alloc(self, n: int, align: int = 16) -> int:
        gpa = (self._next_data + align - 1) & ~(align - 1)
        if gpa + n > self.data_end:
            gpa = self.data
        self._next_data = gpa + n
        return gpa

    def buffer(self, data: bytes) -> tuple[int, int]:
        gpa = self.alloc(len(data))
        self.mem.write(gpa, data)
        return gpa, len(data)

    # -- posting --------------------------------------------------------------

    def raw_desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.mem.write(self.desc + 16 * i, DESC.pack(addr, length, flags, nxt))

    def raw_avail(self, head: int) -> None:
        """Publish ``head`` as the next available entry, whatever it is."""
        self.mem.write(self.avail + 4 + 2 * (self.avail_idx % self.size), U16.pack(head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(self.avail + 2, U16.pack(self.avail_idx))

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self.mem.write(self.avail + 2, U16.pack(self.avail_idx))

    def add(
        self,
        out: list[tuple[int, int]],
        inn: Sequence[tuple[int, int]] = (),
        *,
        indirect: bool = False,
    ) -> int:
        """Post one chain: ``out`` device-readable, ``inn`` device-writable buffers."""
        bufs = [(a, n, 0) for a, n in out] + [(a, n, F_WRITE) for a, n in inn]
        if indirect:
            table = self.alloc(16 * len(bufs))
            for i, (a, n, f) in enumerate(bufs):
                nf = f | (F_NEXT if i + 1 < len(bufs) else 0)
                self.mem.write(table + 16 * i, DESC.pack(a, n, nf, i + 1 if nf & F_NEXT else 0))
            head = self._free.pop(0)
            self.raw_desc(head, table, 16 * len(bufs), F_INDIRECT, 0)
            self._chains[head] = [head]
        else:
            ids = [self._free.pop(0) for _ in bufs]
            for k, (i, (a, n, f)) in enumerate(zip(ids, bufs, strict=True)):
                last = k + 1 == len(ids)
                self.raw_desc(i, a, n, f | (0 if last else F_NEXT), 0 if last else ids[k + 1])
            head = ids[0]
            self._chains[head] = ids
        self.raw_avail(head)
        return head

    # -- completions ----------------------------------------------------------

    def used_idx(self) -> int:
        return int(U16.unpack(self.mem.read(self.used + 2, 2))[0])

    def get_used(self) -> list[tuple[int, int]]:
        """New used elements (id, len) since the last call; their descriptors become free."""
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            head, length = struct.unpack("<II", self.mem.read(slot, 8))
            out.append((head, length))
            self._free.extend(self._chains.pop(head, []))
            self.last_used = (self.last_used + 1) & 0xFFFF
        # Like Linux's virtqueue_enable_cb: interrupt me at the next used buffer.
        if self.event_idx_writes:
            self.set_used_event(self.last_used)
        return out

    def set_used_event(self, value: int) -> None:
        self.mem.write(self.avail + 4 + 2 * self.size, U16.pack(value & 0xFFFF))

    def set_no_interrupt(self, on: bool) -> None:
        self.mem.write(self.avail, U16.pack(1 if on else 0))

    def avail_event(self) -> int:
        return int(U16.unpack(self.mem.read(self.used + 4 + 8 * self.size, 2))[0])


class RecordingInterrupts:
    """``Interrupts`` double that counts what the device signalled."""

    def __init__(self) -> None:
        self.queues: list[int] = []
        self.configs = 0

    def queue(self, index: int) -> None:
        self.queues.append(index)

    def config(self) -> None:
        self.configs += 1


#: Where a separate ring region goes in tests and benchmarks: far above any data region.
RING_GPA = 1 << 40


def frame_pattern(frame: int) -> bytes:
    """The known contents of guest frame ``frame`` (distinct per frame)."""
    return struct.pack("<QQ", frame, frame ^ 0x5A5A5A5A5A5A5A5A) * (FRAME_SIZE // 16)


class GuestRam:
    """One region of guest RAM on a memfd mapped shared, as QEMU's
    ``memory-backend-memfd,share=on`` (or a hugetlbfs memfd) gives it to a backend.

    :param size: bytes
    :param gpa: guest physical address of its first byte
    :param hugetlb: back it with 2 MiB huge pages (needs reserved huge pages)
    :param name: the memfd's name (shows in /proc/<pid>/fd)
    """

    def __init__(
        self, size: int, gpa: int = 0, hugetlb: bool = False, name: str = "vballoon-test-ram"
    ) -> None:
        self.size = size
        self.gpa = gpa
        self.hugetlb = hugetlb
        flags = os.MFD_CLOEXEC | (os.MFD_HUGETLB if hugetlb else 0)
        self.fd = os.memfd_create(name, flags)
        os.ftruncate(self.fd, size)
        self.mapping = mmap.mmap(self.fd, size, mmap.MAP_SHARED)

    def spec(self) -> RegionSpec:
        """The region as a transport describes it to the device."""
        return RegionSpec(self.gpa, self.size, self.mapping, self.fd, 0, True)

    def fill_pattern(self, first_frame: int = 0, frames: int | None = None) -> None:
        """Touch every frame (so it is allocated) with its known pattern."""
        n = self.size // FRAME_SIZE - first_frame if frames is None else frames
        base = self.gpa // FRAME_SIZE
        chunk = 256
        for f0 in range(first_frame, first_frame + n, chunk):
            k = min(chunk, first_frame + n - f0)
            data = b"".join(frame_pattern(base + f) for f in range(f0, f0 + k))
            self.mapping[f0 * FRAME_SIZE : (f0 + k) * FRAME_SIZE] = data

    def allocated(self) -> int:
        """Bytes the memfd really holds (what the host got back shows here)."""
        return os.fstat(self.fd).st_blocks * 512

    def frame_intact(self, frame: int) -> bool:
        """Whether guest frame ``frame`` (a global frame number) still has its pattern."""
        off = (frame - self.gpa // FRAME_SIZE) * FRAME_SIZE
        return self.mapping[off : off + FRAME_SIZE] == frame_pattern(frame)

    def frame_zero(self, frame: int) -> bool:
        """Whether guest frame ``frame`` reads as zeros (a discarded frame does)."""
        off = (frame - self.gpa // FRAME_SIZE) * FRAME_SIZE
        return self.mapping[off : off + FRAME_SIZE] == bytes(FRAME_SIZE)

    def close(self) -> None:
        """Unmap and close (a ``GuestMemory`` still exporting the mapping keeps it until
        collected)."""
        with contextlib.suppress(BufferError):
            self.mapping.close()
        os.close(self.fd)


def guest_memory(*rams: GuestRam) -> GuestMemory:
    """The device's view of these regions."""
    return GuestMemory(r.spec() for r in rams)
