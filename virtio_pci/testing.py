"""A virtio-pci driver over a vfio-user client, for tests, benchmarks and the demo.

It plays both of QEMU's parts (the vfio-user client: VERSION, DMA maps of the
guest RAM with a fresh fd each time, MSI-X eventfds per vector, posted BAR
writes) and Linux's ``virtio_pci`` modern driver (capability walk, reset,
feature negotiation, queue setup, DRIVER_OK, notifies, ISR), on rings laid out
by :class:`device.testing.DriverRing`. Nothing in the product's data path
imports this module.
"""

from __future__ import annotations

import os
import select
import struct
from dataclasses import dataclass

from device.defs import Status
from device.testing import DriverRing, GuestRam
from vfio_user.client import VfioUserClient
from vfio_user.messages import IrqSetFlag, PciIrq, PciRegion
from virtio_pci.layout import (
    NO_VECTOR,
    PCI_CAP_ID_MSIX,
    PCI_CAP_ID_VNDR,
    Cfg,
    Common,
    VirtioCap,
)

#: MSI-X vector of the config interrupt; queue i gets vector i + 1 (Linux's layout).
CONFIG_VECTOR = 0


@dataclass(frozen=True)
class Window:
    """Where one virtio structure is: BAR and offset."""

    bar: int
    offset: int
    length: int


class VirtioPciDriver:
    """Linux's modern virtio-pci driver, reduced to what the tests and benchmarks need.

    :param path: the server's socket
    :param ram: guest RAM (mapped into the server with DMA_MAP)
    :param msix: route interrupts with MSI-X (else INTx and ISR, like ``pci=nomsi``)
    """

    def __init__(self, path: str, ram: GuestRam, *, msix: bool = True) -> None:
        self.ram = ram
        self.client = VfioUserClient(path)
        self.msix = msix
        self.windows: dict[VirtioCap, Window] = {}
        self.notify_multiplier = 0
        self.vectors: list[int] = []
        self.intx: int | None = None
        self.queue_vector: dict[int, int] = {}

    # -- QEMU's part ---------------------------------------------------------------------

    def attach(self) -> None:
        """VERSION, DMA map of guest RAM, device info, capabilities, interrupts."""
        c = self.client
        c.version()
        self.map_ram()
        c.device_info()
        for index in (*range(6), PciRegion.CONFIG):
            c.region_info(index)
        self._walk_capabilities()
        self.intx = os.eventfd(0, os.EFD_NONBLOCK)
        c.set_irqs(
            PciIrq.INTX, IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER, 0, 1, [self.intx]
        )
        if self.msix:
            self.enable_msix()

    def map_ram(self) -> None:
        fd = os.dup(self.ram.fd)  # QEMU sends a fresh descriptor with every map
        try:
            self.client.dma_map(self.ram.gpa, self.ram.size, fd, 0)
        finally:
            os.close(fd)

    def enable_msix(self, vectors: int = 7) -> None:
        """What QEMU does when the guest enables MSI-X: INTx off, one eventfd per vector."""
        c = self.client
        c.set_irqs(PciIrq.INTX, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER, 0, 0)
        for v in range(vectors):
            fd = os.eventfd(0, os.EFD_NONBLOCK)
            self.vectors.append(fd)
            c.set_irqs(PciIrq.MSIX, IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER, v, 1, [fd])

    def _walk_capabilities(self) -> None:
        c = self.client
        cfg = c.read(PciRegion.CONFIG, 0, 256)
        at = cfg[Cfg.CAP_PTR]
        for _ in range(48):  # a capability list is at most 48 entries long
            if not at:
                break
            cap_id, nxt = cfg[at], cfg[at + 1]
            if cap_id == PCI_CAP_ID_VNDR:
                cfg_type, bar = cfg[at + 3], cfg[at + 4]
                offset, length = struct.unpack_from("<II", cfg, at + 8)
                try:
                    kind = VirtioCap(cfg_type)
                except ValueError:
                    kind = None
                if kind is not None and kind not in self.windows:
                    self.windows[kind] = Window(bar, offset, length)
                if kind is VirtioCap.NOTIFY:
                    (self.notify_multiplier,) = struct.unpack_from("<I", cfg, at + 16)
            elif cap_id != PCI_CAP_ID_MSIX:
                raise AssertionError(f"unexpected capability {cap_id:#x} at {at:#x}")
            at = nxt

    def close(self) -> None:
        self.client.close()
        for fd in [*self.vectors, *([self.intx] if self.intx is not None else [])]:
            os.close(fd)
        self.vectors = []
        self.intx = None

    # -- register access ----------------------------------------------------------------

    def _common(self, field: Common, size: int, value: int | None = None) -> int:
        w = self.windows[VirtioCap.COMMON]
        if value is None:
            return self.client.read_u(w.bar, w.offset + field, size)
        self.client.write_u(w.bar, w.offset + field, size, value, posted=True)
        return value

    def status(self) -> int:
        return self._common(Common.DEVICE_STATUS, 1)

    def set_status(self, value: int) -> None:
        self._common(Common.DEVICE_STATUS, 1, value)

    def device_features(self) -> int:
        out = 0
        for sel in (0, 1):
            self._common(Common.DEVICE_FEATURE_SELECT, 4, sel)
            out |= self._common(Common.DEVICE_FEATURE, 4) << (32 * sel)
        return out

    def read_config(self, offset: int, size: int) -> int:
        w = self.windows[VirtioCap.DEVICE]
        return self.client.read_u(w.bar, w.offset + offset, size)

    def write_config(self, offset: int, size: int, value: int) -> None:
        w = self.windows[VirtioCap.DEVICE]
        self.client.write_u(w.bar, w.offset + offset, size, value, posted=True)

    def read_isr(self) -> int:
        w = self.windows[VirtioCap.ISR]
        return self.client.read_u(w.bar, w.offset, 1)

    # -- Linux's part --------------------------------------------------------------------

    def negotiate(self, features: int | None = None) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns the features set.

        :raise AssertionError: if the device refuses FEATURES_OK.
        """
        self.set_status(0)
        assert self.status() == 0
        self.set_status(Status.ACKNOWLEDGE)
        self.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
        offered = self.device_features()
        chosen = offered if features is None else features
        for sel in (0, 1):
            self._common(Common.DRIVER_FEATURE_SELECT, 4, sel)
            self._common(Common.DRIVER_FEATURE, 4, chosen >> (32 * sel) & 0xFFFFFFFF)
        self.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        assert self.status() & Status.FEATURES_OK, "device refused the features"
        return chosen

    def setup_queue(self, index: int, ring: DriverRing) -> None:
        """What ``vp_modern`` does per queue: size, rings, vector; enable comes later."""
        self._common(Common.QUEUE_SELECT, 2, index)
        size = self._common(Common.QUEUE_SIZE, 2)
        assert size, f"queue {index} does not exist"
        self._common(Common.QUEUE_SIZE, 2, ring.size)
        for lo, addr in (
            (Common.QUEUE_DESC_LO, ring.desc),
            (Common.QUEUE_DRIVER_LO, ring.avail),
            (Common.QUEUE_DEVICE_LO, ring.used),
        ):
            self._common(lo, 4, addr & 0xFFFFFFFF)
            self._common(Common(lo + 4), 4, addr >> 32)
        if self.msix:
            vector = index + 1
            self._common(Common.QUEUE_MSIX_VECTOR, 2, vector)
            assert self._common(Common.QUEUE_MSIX_VECTOR, 2) == vector
            self.queue_vector[index] = vector

    def enable_queue(self, index: int) -> None:
        self._common(Common.QUEUE_SELECT, 2, index)
        self._common(Common.QUEUE_ENABLE, 2, 1)

    def driver_ok(self) -> None:
        if self.msix:
            self._common(Common.CONFIG_MSIX_VECTOR, 2, CONFIG_VECTOR)
            assert self._common(Common.CONFIG_MSIX_VECTOR, 2) != NO_VECTOR
        self.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)

    def notify(self, index: int) -> None:
        """A posted write of the queue index to its notify address."""
        w = self.windows[VirtioCap.NOTIFY]
        self._common(Common.QUEUE_SELECT, 2, index)
        off = self._common(Common.QUEUE_NOTIFY_OFF, 2)
        self.client.write_u(w.bar, w.offset + off * self.notify_multiplier, 2, index, posted=True)

    def queue_notify_off(self, index: int) -> int:
        """Queue ``index``'s notify offset (what a driver reads once at setup)."""
        self._common(Common.QUEUE_SELECT, 2, index)
        return self._common(Common.QUEUE_NOTIFY_OFF, 2)

    def notify_fast(self, index: int, notify_off: int) -> None:
        """A notify with the offset already known (what a driver caches at setup)."""
        w = self.windows[VirtioCap.NOTIFY]
        self.client.write_u(
            w.bar, w.offset + notify_off * self.notify_multiplier, 2, index, posted=True
        )

    def wait_queue_interrupt(self, index: int, timeout: float = 5.0) -> bool:
        """Wait for queue ``index``'s interrupt (its MSI-X vector, or INTx + ISR bit 0)."""
        if self.msix:
            return _wait(self.vectors[self.queue_vector[index]], timeout)
        return self._wait_intx(0x1, timeout)

    def wait_config_interrupt(self, timeout: float = 5.0) -> bool:
        if self.msix:
            return _wait(self.vectors[CONFIG_VECTOR], timeout)
        return self._wait_intx(0x2, timeout)

    def _wait_intx(self, bit: int, timeout: float) -> bool:
        assert self.intx is not None
        if not _wait(self.intx, timeout):
            return False
        isr = self.read_isr()  # acknowledges: the line goes down
        # QEMU unmasks after the guest's end-of-interrupt.
        self.client.set_irqs(PciIrq.INTX, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_UNMASK, 0, 1)
        return bool(isr & bit)


def _wait(fd: int, timeout: float) -> bool:
    r, _, _ = select.select([fd], [], [], timeout)
    if r:
        os.eventfd_read(fd)
    return bool(r)
