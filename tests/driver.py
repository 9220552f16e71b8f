"""Test doubles: guest RAM on a memfd with a known pattern per frame.

The driver-side ring builder (``DriverRing``) lives in ``device.testing`` so
that the benchmarks can post chains exactly as the tests do; it is re-exported
here. Tests reach for its ``raw_*`` methods to write what a hostile driver would.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from dataclasses import dataclass, field

from device import RegionSpec
from device.defs import FRAME_SIZE
from device.testing import (  # noqa: F401  (re-exported for tests)
    DESC,
    F_INDIRECT,
    F_NEXT,
    F_WRITE,
    DriverRing,
    RecordingInterrupts,
)

MiB = 1 << 20


def frame_pattern(frame: int) -> bytes:
    """The known contents of guest frame ``frame`` (distinct per frame)."""
    return struct.pack("<QQ", frame, frame ^ 0x5A5A5A5A5A5A5A5A) * (FRAME_SIZE // 16)


@dataclass
class GuestRam:
    """A memfd mapped shared, as QEMU's memory-backend-memfd,share=on gives a backend."""

    size: int
    gpa: int = 0
    hugetlb: bool = False
    fd: int = -1
    mapping: mmap.mmap = field(init=False, repr=False)

    def __post_init__(self) -> None:
        flags = os.MFD_CLOEXEC | (os.MFD_HUGETLB if self.hugetlb else 0)
        self.fd = os.memfd_create("vballoon-test-ram", flags)
        os.ftruncate(self.fd, self.size)
        self.mapping = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED)

    def spec(self) -> RegionSpec:
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
        off = (frame - self.gpa // FRAME_SIZE) * FRAME_SIZE
        return self.mapping[off : off + FRAME_SIZE] == frame_pattern(frame)

    def frame_zero(self, frame: int) -> bool:
        off = (frame - self.gpa // FRAME_SIZE) * FRAME_SIZE
        return self.mapping[off : off + FRAME_SIZE] == bytes(FRAME_SIZE)

    def close(self) -> None:
        # A GuestMemory still exporting the mapping keeps it alive until collected.
        with contextlib.suppress(BufferError):
            self.mapping.close()
        os.close(self.fd)
