"""The client's DMA space as the server sees it: windows from DMA_MAP, mapped by us.

A window with a file descriptor is mapped shared (the device reads and writes
the client's memory directly); one without is reachable only through
DMA_READ/DMA_WRITE, which this library does not use, so it is recorded (to
match its unmap) and nothing more. A read-only window is mapped privately: the
device can read it, and a write by the device could never reach the client.

QEMU sends every map with a fresh descriptor and the offset into its RAM
block, so each window owns its fd and its mapping, and closes both on unmap.
The mapping starts at the file offset rounded down to the file's block size
(a hugetlbfs file maps only whole huge pages; QEMU's windows below 1 MiB
start mid-page), and the window is a view into it.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import mmap
import os
from dataclasses import dataclass, field

from vfio_user.errors import CommandError
from vfio_user.messages import DmaMap, DmaUnmap

log = logging.getLogger(__name__)

#: Largest block size a mapping's start is rounded to (1 GiB huge pages).
MAX_ALIGN = 1 << 30


@dataclass(eq=False)
class DmaWindow:
    """One DMA_MAP.

    :param address: first DMA (guest physical) address
    :param size: bytes
    :param offset: file offset of ``address`` in ``fd``
    :param readable: the device may read it
    :param writable: the device may write it
    :param fd: the client's file, owned by the window; None for an fd-less map
    :param view: the window's bytes, None for an fd-less map
    """

    address: int
    size: int
    offset: int
    readable: bool
    writable: bool
    fd: int | None = None
    view: memoryview | None = field(default=None, repr=False)
    _mapping: mmap.mmap | None = field(default=None, repr=False)

    @property
    def end(self) -> int:
        return self.address + self.size

    @property
    def shared(self) -> bool:
        """The device sees the client's memory itself (writable and fd-backed)."""
        return self.fd is not None and self.writable

    def close(self) -> None:
        """Unmap and close; a view still exported elsewhere keeps the mapping until
        it is collected (logged: the owner of that view should have let it go)."""
        if self.view is not None:
            self.view.release()
            self.view = None
        if self._mapping is not None:
            try:
                self._mapping.close()
            except BufferError:
                log.warning("DMA window %#x+%#x still referenced at unmap", self.address, self.size)
            self._mapping = None
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def _block_size(fd: int) -> int:
    try:
        bsize = os.fstatvfs(fd).f_bsize
    except OSError:
        return mmap.PAGESIZE
    if bsize <= mmap.PAGESIZE or bsize > MAX_ALIGN or bsize & (bsize - 1):
        return mmap.PAGESIZE
    return bsize


def map_window(req: DmaMap, fd: int | None) -> DmaWindow:
    """Map ``req`` (taking ``fd`` on success; on failure the caller still owns it).

    :raise CommandError: if the file is shorter than the window, or mmap fails.
    """
    win = DmaWindow(req.address, req.size, req.offset, req.readable, req.writable)
    if fd is None:
        return win
    try:
        st = os.fstat(fd)
    except OSError as err:
        raise CommandError(f"DMA_MAP: fd: {err.strerror}", errno.EBADF) from None
    if st.st_size and req.offset + req.size > st.st_size:
        raise CommandError(
            f"DMA_MAP: [{req.offset:#x} +{req.size:#x}] is beyond the file's {st.st_size:#x} bytes"
        )
    align = _block_size(fd)
    start = req.offset - req.offset % align
    length = req.offset + req.size - start
    length += -length % align
    if st.st_size:
        length = min(length, st.st_size - start)
    shared = req.writable
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    try:
        mapping = mmap.mmap(
            fd, length, mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE, prot, offset=start
        )
    except (OSError, ValueError, OverflowError) as err:
        raise CommandError(f"DMA_MAP of {req.address:#x}+{req.size:#x}: {err}") from None
    delta = req.offset - start
    win.fd, win._mapping = fd, mapping
    win.view = memoryview(mapping)[delta : delta + req.size]
    return win


class DmaSpace:
    """The windows of one client, sorted and never overlapping.

    :param max_maps: most windows at once (the ``max_dma_maps`` capability)
    :param max_bytes: most bytes mapped at once (what a function keeps per page of the
        windows grows with it: a client must not make it grow without bound)
    """

    def __init__(self, max_maps: int, max_bytes: int | None = None) -> None:
        self.max_maps = max_maps
        self.max_bytes = max_bytes
        self._windows: list[DmaWindow] = []

    @property
    def windows(self) -> tuple[DmaWindow, ...]:
        return tuple(self._windows)

    def add(self, req: DmaMap, fd: int | None) -> DmaWindow:
        """Map a window (owning ``fd`` on success).

        :raise CommandError: EEXIST over another window, ENOSPC past ``max_maps`` or
            ``max_bytes``, or
            what :func:`map_window` refuses.
        """
        starts = [w.address for w in self._windows]
        i = bisect.bisect_left(starts, req.address)
        before = self._windows[i - 1] if i else None
        after = self._windows[i] if i < len(self._windows) else None
        if (before is not None and before.end > req.address) or (
            after is not None and after.address < req.address + req.size
        ):
            raise CommandError(
                f"DMA_MAP of {req.address:#x}+{req.size:#x} overlaps a mapped window",
                errno.EEXIST,
            )
        if len(self._windows) >= self.max_maps:
            raise CommandError(f"DMA_MAP: more than {self.max_maps} windows", errno.ENOSPC)
        if self.max_bytes is not None:
            mapped = sum(w.size for w in self._windows)
            if mapped + req.size > self.max_bytes:
                raise CommandError(
                    f"DMA_MAP of {req.size:#x} bytes: more than {self.max_bytes:#x} bytes "
                    f"mapped ({mapped:#x} already)",
                    errno.ENOSPC,
                )
        win = map_window(req, fd)
        self._windows.insert(i, win)
        return win

    def remove(self, req: DmaUnmap) -> list[DmaWindow]:
        """Take the windows ``req`` names out (the caller closes them once nothing uses them).

        :raise CommandError: ENOENT if no window matches exactly.
        """
        if req.all:
            gone, self._windows = self._windows, []
            return gone
        for i, w in enumerate(self._windows):
            if w.address == req.address and w.size == req.size:
                return [self._windows.pop(i)]
        raise CommandError(
            f"DMA_UNMAP of {req.address:#x}+{req.size:#x}: no such window", errno.ENOENT
        )

    def clear(self) -> list[DmaWindow]:
        gone, self._windows = self._windows, []
        return gone
