"""Split virtqueue (virtio 1.x, little-endian), device side.

The queue never owns memory: every method takes the ``GuestMemory`` to use.
Ring areas are translated once per memory map and cached.

What a bad chain does (decided once, here):

- The ring itself lies (``avail.idx`` more than the queue size ahead of what we
  consumed, or a head index outside the table): :class:`RingError`. The
  device marks the queue broken, sets DEVICE_NEEDS_RESET and stops servicing
  it (spec 2.1.2: the device signals that it needs a reset). Nothing else can
  be trusted in such a ring, and stopping is bounded.
- One chain is malformed (``next`` out of range, loop, chain longer than the
  queue, indirect table of bad size or alignment, indirect inside indirect,
  INDIRECT together with NEXT, indirect not negotiated, a readable descriptor
  after a writable one, a total length over 2^32, a buffer outside guest RAM):
  :class:`ChainError` carrying the head. The device returns that chain with used
  length 0 and counts it; the guest's waiter wakes up, nothing is discarded.

Barriers: ``avail.idx`` is read before the ring (acquire); used elements are
written before ``used.idx`` (release); a full barrier separates publishing
``avail_event`` from re-reading ``avail.idx``, and publishing ``used.idx`` from
reading ``used_event`` (spec "Virtqueue Notification Suppression").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from device._accel import lib
from device.defs import AVAIL_F_NO_INTERRUPT, MAX_QUEUE_SIZE, DescFlag
from device.errors import ChainError, ConfigError, GuestError, RingError, RingUnmapped
from device.memory import GuestMemory

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
_DESC_SIZE = 16
_MAX_CHAIN_BYTES = 1 << 32
_F_NEXT = int(DescFlag.NEXT)
_F_WRITE = int(DescFlag.WRITE)
_F_INDIRECT = int(DescFlag.INDIRECT)


@dataclass(slots=True)
class DescriptorChain:
    """One popped chain: (gpa, length) buffers, split by direction.

    Every buffer was checked to lie inside guest RAM.
    """

    head: int
    readable: list[tuple[int, int]]
    writable: list[tuple[int, int]]

    @property
    def readable_len(self) -> int:
        """Bytes the device may read."""
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        """Bytes the device may write."""
        return sum(n for _, n in self.writable)


def vring_need_event(event: int, new: int, old: int) -> bool:
    """Whether moving an index from ``old`` to ``new`` passes ``event`` (16-bit arithmetic)."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class SplitQueue:
    """Device-side state of one split virtqueue.

    :param size: number of descriptors (power of two, at most 32768)
    :param desc: guest physical address of the descriptor table (16-aligned)
    :param avail: guest physical address of the available ring (2-aligned)
    :param used: guest physical address of the used ring (4-aligned)
    :param event_idx: VIRTIO_RING_F_EVENT_IDX negotiated
    :param indirect: VIRTIO_RING_F_INDIRECT_DESC negotiated
    :param next_avail: first avail entry to consume (vhost-user's vring base)
    :param next_used: used index to continue from
    :raise ConfigError: on a bad size or misaligned ring address
    """

    def __init__(
        self,
        size: int,
        desc: int,
        avail: int,
        used: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        next_avail: int = 0,
        next_used: int | None = None,
    ) -> None:
        if size <= 0 or size > MAX_QUEUE_SIZE or size & (size - 1):
            raise ConfigError(f"queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        if desc % 16 or avail % 2 or used % 4:
            raise ConfigError(
                f"ring addresses desc={desc:#x} avail={avail:#x} used={used:#x} are misaligned"
            )
        self.size = size
        self.desc_gpa = desc
        self.avail_gpa = avail
        self.used_gpa = used
        self.event_idx = event_idx
        self.indirect = indirect
        self.next_avail = next_avail & 0xFFFF
        self.next_used = (next_avail if next_used is None else next_used) & 0xFFFF
        self._published_used = self.next_used
        self._mem: GuestMemory | None = None
        self._desc = self._avail = self._used = memoryview(b"")

    # -- ring areas ---------------------------------------------------------

    def _attach(self, mem: GuestMemory) -> None:
        """Translate the three ring areas for ``mem`` (once per memory map)."""
        if mem is self._mem:
            return
        try:
            dr, doff = mem.translate(self.desc_gpa, _DESC_SIZE * self.size)
            ar, aoff = mem.translate(self.avail_gpa, 6 + 2 * self.size)
            ur, uoff = mem.translate(self.used_gpa, 6 + 8 * self.size)
        except GuestError as err:
            raise RingUnmapped(f"ring outside guest RAM: {err}") from err
        self._desc = dr.view[doff : doff + _DESC_SIZE * self.size]
        self._avail = ar.view[aoff : aoff + 6 + 2 * self.size]
        self._used = ur.view[uoff : uoff + 6 + 8 * self.size]
        self._mem = mem

    def detach(self) -> None:
        """Drop the cached ring views (before the memory they point into is unmapped)."""
        for v in (self._desc, self._avail, self._used):
            v.release()
        self._desc = self._avail = self._used = memoryview(b"")
        self._mem = None

    def resume_used_from_ring(self, mem: GuestMemory) -> None:
        """Continue from the ``used.idx`` in guest memory (vhost-user: the ring is the truth)."""
        self.next_used = self._published_used = self.used_idx(mem)

    def avail_idx(self, mem: GuestMemory) -> int:
        """The driver's ``avail.idx``."""
        self._attach(mem)
        return int(_U16.unpack_from(self._avail, 2)[0])

    def used_idx(self, mem: GuestMemory) -> int:
        """The published ``used.idx``."""
        self._attach(mem)
        return int(_U16.unpack_from(self._used, 2)[0])

    # -- consuming ----------------------------------------------------------

    def pending(self, mem: GuestMemory) -> int:
        """Number of chains the driver made available that we have not popped.

        :raise RingError: if the driver claims more than the queue size.
        """
        n = (self.avail_idx(mem) - self.next_avail) & 0xFFFF
        if n > self.size:
            raise RingError(
                f"guest says {n} buffers are available on a queue of {self.size} (avail.idx lies)"
            )
        return n

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        """Take the next available chain, or None if there is none.

        :raise RingError: the ring is corrupt; nothing was consumed.
        :raise ChainError: the chain is malformed; it was consumed, return it with len 0.
        """
        if not self.pending(mem):
            return None
        lib.balloon_accel_rmb()
        slot = 4 + 2 * (self.next_avail % self.size)
        head = _U16.unpack_from(self._avail, slot)[0]
        if head >= self.size:
            raise RingError(f"avail ring names head {head} on a queue of {self.size}")
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return self._walk(mem, head)

    def undo_pop(self) -> None:
        """Give the last popped chain back to the ring (it will be popped again)."""
        self.next_avail = (self.next_avail - 1) & 0xFFFF

    def _walk(self, mem: GuestMemory, head: int) -> DescriptorChain:
        table = self._desc
        base = 0
        count = self.size
        idx = head
        ttl = self.size  # spec: no chain is longer than the queue
        in_indirect = False
        total = 0
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        while True:
            if ttl == 0:
                raise ChainError(f"chain {head} loops or is longer than the queue", head)
            ttl -= 1
            addr, length, flags, nxt = _DESC.unpack_from(table, base + _DESC_SIZE * idx)
            if flags & _F_INDIRECT:
                if in_indirect:
                    raise ChainError(f"chain {head}: indirect table inside an indirect table", head)
                if not self.indirect:
                    raise ChainError(f"chain {head}: INDIRECT without the feature", head)
                if flags & _F_NEXT:
                    raise ChainError(f"chain {head}: INDIRECT together with NEXT", head)
                if length == 0 or length % _DESC_SIZE or addr % _DESC_SIZE:
                    raise ChainError(
                        f"chain {head}: indirect table addr={addr:#x} len={length} is malformed",
                        head,
                    )
                try:
                    region, off = mem.translate(addr, length)
                except GuestError as err:
                    raise ChainError(f"chain {head}: indirect table: {err}", head) from err
                table, base, count = region.view, off, length // _DESC_SIZE
                idx, in_indirect = 0, True
                continue
            if length:
                if not mem.covers(addr, length):
                    raise ChainError(
                        f"chain {head}: buffer gpa={addr:#x} len={length:#x} "
                        "is not inside guest RAM",
                        head,
                    )
                total += length
                if total > _MAX_CHAIN_BYTES:
                    raise ChainError(f"chain {head} is longer than 4 GiB", head)
                if flags & _F_WRITE:
                    writable.append((addr, length))
                elif writable:
                    raise ChainError(f"chain {head}: readable buffer after a writable one", head)
                else:
                    readable.append((addr, length))
            if not flags & _F_NEXT:
                return DescriptorChain(head, readable, writable)
            if nxt >= count:
                raise ChainError(f"chain {head}: next index {nxt} beyond table of {count}", head)
            idx = nxt

    # -- returning ----------------------------------------------------------

    def push(self, mem: GuestMemory, head: int, length: int) -> None:
        """Write one used element (not yet visible: call :meth:`publish`)."""
        self._attach(mem)
        _USED_ELEM.pack_into(self._used, 4 + 8 * (self.next_used % self.size), head, length)
        self.next_used = (self.next_used + 1) & 0xFFFF

    def publish(self, mem: GuestMemory) -> bool:
        """Make pushed elements visible; return whether the driver wants an interrupt."""
        self._attach(mem)
        old, new = self._published_used, self.next_used
        if old == new:
            return False
        lib.balloon_accel_wmb()
        _U16.pack_into(self._used, 2, new)
        self._published_used = new
        lib.balloon_accel_mb()
        if self.event_idx:
            used_event = _U16.unpack_from(self._avail, 4 + 2 * self.size)[0]
            return vring_need_event(used_event, new, old)
        return not _U16.unpack_from(self._avail, 0)[0] & AVAIL_F_NO_INTERRUPT

    def enable_notification(self, mem: GuestMemory) -> bool:
        """Ask for a kick at the next buffer; return True if buffers arrived meanwhile.

        With EVENT_IDX this publishes ``avail_event``; without it our used.flags
        stay 0 (we never suppress kicks) and only the re-check remains.
        """
        self._attach(mem)
        if self.event_idx:
            _U16.pack_into(self._used, 4 + 8 * self.size, self.next_avail)
            lib.balloon_accel_mb()
        return self.pending(mem) > 0
