"""A virtio-pci modern function around a virtio device, served by the vfio-user library.

What the function is, in PCI terms (``layout.py`` has the numbers): config
space with the virtio vendor capabilities and MSI-X; BAR0 with the common
configuration, ISR, device configuration and notify windows; BAR1 with the
MSI-X table and pending-bit array; interrupt indexes INTx (level,
automasked), MSI-X and ERR.

How it maps onto the device API (every virtio rule is the device's):

- the driver's feature and status writes go to ``write_driver_features`` and
  ``set_status``; a status write of 0 resets the device and the transport's
  registers (vectors, queue settings, ISR);
- enabling a queue hands its ring to ``start_queue`` and the queue runner;
  buffers are processed once the device runs, so DRIVER_OK looks at every
  queue (Linux queues its first stats buffer before it);
- a notify write is a kick; the device's interrupts go to the queue's or the
  config vector with MSI-X, or set ISR and raise INTx without it;
- DMA windows become the device's guest memory; DEVICE_RESET and a new client
  reset the device (a new client is a new VM: nothing a previous guest owned
  carries over), a client that leaves stops it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from device import (
    BalloonDevice,
    BalloonError,
    GuestMemory,
    QueueRunner,
    RegionSpec,
    SplitQueue,
    queue_layout,
)
from device.defs import FRAME_SIZE
from vfio_user import CommandError, Function, IrqSpec, IrqTable
from vfio_user import RegionSpec as VfioRegion
from vfio_user.dma import DmaWindow
from vfio_user.messages import IrqInfoFlag, PciIrq, PciRegion, RegionFlag
from virtio_pci.common_cfg import CommonConfig
from virtio_pci.config_space import ConfigSpace
from virtio_pci.layout import (
    BAR_SIZES,
    COMMAND_INTX_DISABLE,
    COMMON_OFFSET,
    CONFIG_SPACE_SIZE,
    DEVICE_OFFSET,
    ISR_CONFIG,
    ISR_OFFSET,
    ISR_QUEUE,
    MSIX_BAR,
    MSIX_ENTRY_SIZE,
    MSIX_PBA_OFFSET,
    MSIX_TABLE_OFFSET,
    MSIX_VECTORS,
    NO_VECTOR,
    NOTIFY_MULTIPLIER,
    NOTIFY_OFFSET,
    VIRTIO_BAR,
    WINDOW_SIZE,
)

log = logging.getLogger(__name__)

#: The balloon's virtio device id.
VIRTIO_ID_BALLOON = 5
#: Vector control word of an MSI-X table entry at reset: masked.
_ENTRY_MASKED = (1).to_bytes(4, "little")


class _Interrupts:
    """``device.Interrupts`` for the function."""

    def __init__(self, function: VirtioPciFunction) -> None:
        self.function = function

    def queue(self, index: int) -> None:
        self.function.queue_interrupt(index)

    def config(self) -> None:
        self.function.config_interrupt()


class VirtioPciFunction(Function):
    """The PCI function the vfio-user server runs.

    :param device: the virtio device (outlives clients)
    :param loop: the event loop that runs queue work and timers
    :param busy_poll_us: see :class:`device.runner.QueueRunner`
    """

    def __init__(
        self, device: BalloonDevice, loop: asyncio.AbstractEventLoop, busy_poll_us: int = 0
    ) -> None:
        self.device = device
        self.loop = loop
        self.busy_poll_us = busy_poll_us
        self.num_queues = len(queue_layout(device.offered_features))
        self.common = CommonConfig(
            device, self.num_queues, self._enable_queue, self._status_written
        )
        self.config = ConfigSpace(
            VIRTIO_ID_BALLOON, device.config_size, self._bar_access, self._intx_up
        )
        self.isr = 0
        self.msix_table = bytearray(MSIX_VECTORS * MSIX_ENTRY_SIZE)
        self.lines: IrqTable | None = None
        self.runner: QueueRunner | None = None
        self.memory: GuestMemory | None = None
        #: accesses the function does not decode (reads give zeros, writes are dropped)
        self.ignored_accesses = 0
        self._reset_msix_table()

    # -- what the server asks -----------------------------------------------------------

    def regions(self) -> Sequence[VfioRegion]:
        rw = RegionFlag.READ | RegionFlag.WRITE
        bars = [VfioRegion(i, size, rw) for i, size in enumerate(BAR_SIZES)]
        return [
            *bars,
            VfioRegion(PciRegion.ROM, 0, RegionFlag(0)),
            VfioRegion(PciRegion.CONFIG, CONFIG_SPACE_SIZE, rw),
        ]

    def irqs(self) -> Sequence[IrqSpec]:
        ev = IrqInfoFlag.EVENTFD
        return [
            IrqSpec(PciIrq.INTX, 1, ev | IrqInfoFlag.MASKABLE | IrqInfoFlag.AUTOMASKED),
            IrqSpec(PciIrq.MSI, 0, ev),
            IrqSpec(PciIrq.MSIX, MSIX_VECTORS, ev),
            IrqSpec(PciIrq.ERR, 1, ev),
            IrqSpec(PciIrq.REQ, 0, ev),
        ]

    def connected(self, irqs: IrqTable) -> None:
        # A new client is a new VM: nothing a previous guest wrote or owned carries over.
        self.device.reset()
        self._reset_function()
        self.lines = irqs
        self.runner = QueueRunner(self.device, self.loop, busy_poll_us=self.busy_poll_us)
        self.device.attach(_Interrupts(self))

    def disconnected(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None
        self.device.stop()
        self.device.detach()
        self.lines = None
        log.info(
            "vfio-user client gone: the device is stopped (the guest said it held %d MiB)",
            self.device.actual * FRAME_SIZE >> 20,
        )

    def reset(self) -> None:
        self._stop_queues()
        self.device.reset()
        self._reset_function()
        # ISR is 0 again, so the INTx level goes down, as on a status-0 reset; a line left
        # pending would fire a stale interrupt at the client's next UNMASK.
        if self.lines is not None:
            self.lines.lower(PciIrq.INTX, 0)

    def dma_changed(self, windows: Sequence[DmaWindow]) -> None:
        specs = [
            RegionSpec(
                w.address,
                w.size,
                w.view,
                w.fd,
                w.offset,
                shared=w.shared,
                readonly=not w.writable,
            )
            for w in windows
            if w.view is not None and w.fd is not None
        ]
        try:
            mem = GuestMemory(specs) if specs else None
        except BalloonError as err:
            raise CommandError(f"DMA windows refused: {err}") from None
        old, self.memory = self.memory, mem
        self.device.set_memory(mem)
        if old is not None:
            old.close()
        if self.runner is not None:
            # A kick that came while a ring was outside the map was consumed without work.
            self.runner.notify_all()

    # -- region accesses ---------------------------------------------------------------------

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if index == PciRegion.CONFIG:
            return self.config.read(offset, count)
        if index == VIRTIO_BAR:
            return self._virtio_read(offset, count)
        if index == MSIX_BAR:
            return self._msix_read(offset, count)
        return self._ignored(count)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if index == PciRegion.CONFIG:
            self.config.write(offset, data)
        elif index == VIRTIO_BAR:
            self._virtio_write(offset, data)
        elif index == MSIX_BAR:
            self._msix_write(offset, data)
        else:
            self._ignored(0)

    def _ignored(self, count: int) -> bytes:
        self.ignored_accesses += 1
        return bytes(count)

    def _bar_access(self, bar: int, offset: int, size: int, data: bytes | None) -> bytes:
        """The ``virtio_pci_cfg_cap`` window's access."""
        if data is None:
            return self.region_read(bar, offset, size)
        self.region_write(bar, offset, data)
        return b""

    def _virtio_read(self, offset: int, count: int) -> bytes:
        window, at = divmod(offset, WINDOW_SIZE)
        if at + count > WINDOW_SIZE:
            return self._ignored(count)  # one access, one structure
        base = window * WINDOW_SIZE
        if base == COMMON_OFFSET:
            return self.common.read(at, count)
        if base == ISR_OFFSET:
            return self._read_isr(at, count)
        if base == DEVICE_OFFSET:
            return self._read_device_config(at, count)
        return self._ignored(count)  # the notify window reads as zeros

    def _virtio_write(self, offset: int, data: bytes) -> None:
        window, at = divmod(offset, WINDOW_SIZE)
        if at + len(data) > WINDOW_SIZE:
            self._ignored(0)
            return
        base = window * WINDOW_SIZE
        if base == COMMON_OFFSET:
            self.common.write(at, data)
        elif base == DEVICE_OFFSET:
            self._write_device_config(at, data)
        elif base == NOTIFY_OFFSET:
            self._notify(at, data)
        else:
            self._ignored(0)  # ISR is read-only

    # -- ISR, device config, notify ----------------------------------------------------------

    def _read_isr(self, at: int, count: int) -> bytes:
        out = bytearray(count)
        if at == 0:
            # Reading ISR acknowledges it: the INTx line goes down.
            out[0], self.isr = self.isr, 0
            if self.lines is not None:
                self.lines.lower(PciIrq.INTX, 0)
        return bytes(out)

    def _read_device_config(self, at: int, count: int) -> bytes:
        have = max(0, min(count, self.device.config_size - at))
        data = self.device.read_config(at, have) if have else b""
        return data + bytes(count - len(data))

    def _write_device_config(self, at: int, data: bytes) -> None:
        have = max(0, min(len(data), self.device.config_size - at))
        if have:
            self.device.write_config(at, data[:have])

    def _notify(self, at: int, data: bytes) -> None:
        if len(data) not in (2, 4) or at % NOTIFY_MULTIPLIER:
            self._ignored(0)
            return
        index = int.from_bytes(data[:2], "little")  # without NOTIFICATION_DATA: the index
        if self.runner is None or index >= self.num_queues or not self.common.queues[index].enabled:
            self._ignored(0)
            return
        self.runner.kick(index)

    # -- MSI-X table and PBA ----------------------------------------------------------------

    def _reset_msix_table(self) -> None:
        self.msix_table[:] = bytes(len(self.msix_table))
        for v in range(MSIX_VECTORS):
            at = v * MSIX_ENTRY_SIZE + 12
            self.msix_table[at : at + 4] = _ENTRY_MASKED

    def _msix_read(self, offset: int, count: int) -> bytes:
        end = offset + count
        if offset >= MSIX_TABLE_OFFSET and end <= MSIX_TABLE_OFFSET + len(self.msix_table):
            at = offset - MSIX_TABLE_OFFSET
            return bytes(self.msix_table[at : at + count])
        if offset >= MSIX_PBA_OFFSET and end <= MSIX_PBA_OFFSET + 8:
            bits = 0
            for v in range(MSIX_VECTORS):
                if self.lines is not None and self.lines.pending(PciIrq.MSIX, v):
                    bits |= 1 << v
            at = offset - MSIX_PBA_OFFSET
            return bits.to_bytes(8, "little")[at : at + count]
        return self._ignored(count)

    def _msix_write(self, offset: int, data: bytes) -> None:
        """Table entries are plain storage: the client delivers MSI-X (QEMU emulates the
        table and masks by re-pointing eventfds), so a vector's mask never holds an
        interrupt here. Writes outside the entries, and to the PBA, are dropped."""
        at = offset - MSIX_TABLE_OFFSET
        size = len(data)
        if size in (4, 8) and at >= 0 and at + size <= len(self.msix_table) and at % size == 0:
            self.msix_table[at : at + size] = data
            return
        self._ignored(0)

    # -- queues and status ----------------------------------------------------------------

    def _enable_queue(self, index: int) -> None:
        """The driver enabled queue ``index``: hand its ring to the device."""
        q = self.common.queues[index]
        if self.runner is None:
            return
        try:
            ring = SplitQueue(q.size, q.desc, q.driver, q.device)
            self.device.start_queue(index, ring)
        except BalloonError as err:
            # The guest's own setup cannot work: that queue is broken, nothing else.
            log.error("queue %d cannot start: %s", index, err)
            self.device.break_queue(index, str(err))
            return
        self.runner.watch(index, None)
        log.info(
            "queue %d started: size %d, desc %#x, avail %#x, used %#x",
            index,
            q.size,
            q.desc,
            q.driver,
            q.device,
        )
        self.runner.notify(index)

    def _status_written(self, value: int) -> None:
        if value == 0:
            self._stop_queues()
            self.isr = 0
            if self.lines is not None:
                self.lines.lower(PciIrq.INTX, 0)
        elif self.runner is not None:
            self.runner.notify_all()  # DRIVER_OK: buffers queued before it

    def _stop_queues(self) -> None:
        if self.runner is not None:
            for index in self.runner.watched():
                self.runner.unwatch(index)

    def _reset_function(self) -> None:
        """The transport's power-on state (PCI function-level reset)."""
        self.common.reset()
        self.config.reset()
        self._reset_msix_table()
        self.isr = 0

    # -- interrupts ---------------------------------------------------------------------------

    @property
    def msix_enabled(self) -> bool:
        """Whether the client routes MSI-X (QEMU does once the guest enables it)."""
        return self.lines is not None and self.lines.enabled(PciIrq.MSIX)

    def queue_interrupt(self, index: int) -> None:
        if self.msix_enabled:
            vector = self.common.queues[index].vector if index < self.num_queues else NO_VECTOR
            if vector != NO_VECTOR and self.lines is not None:
                self.lines.trigger(PciIrq.MSIX, vector)
            return
        self.isr |= ISR_QUEUE
        self._raise_intx()

    def config_interrupt(self) -> None:
        self.common.generation = (self.common.generation + 1) & 0xFF
        self.isr |= ISR_CONFIG
        if self.msix_enabled:
            vector = self.common.config_vector
            if vector != NO_VECTOR and self.lines is not None:
                self.lines.trigger(PciIrq.MSIX, vector)
            return
        self._raise_intx()

    def _raise_intx(self) -> None:
        if self.lines is not None and not self.config.command & COMMAND_INTX_DISABLE:
            self.lines.trigger(PciIrq.INTX, 0)

    def _intx_up(self) -> bool:
        return bool(self.isr) and not self.msix_enabled
