"""The interface a device implements to be served over vfio-user.

The server owns the protocol: framing, VERSION, the DMA windows, interrupt
eventfds, and every bounds check of an access against the regions the device
declared. A device sees only typed calls that already passed those checks: a
read or write inside one of its regions, the set of DMA windows after each
change, a reset, and the client coming and going. Interrupts go out through
the :class:`IrqTable` it is given.

For a PCI function the regions are ``PciRegion`` indexes (BARs, ROM, config
space) and the interrupts ``PciIrq`` ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vfio_user.dma import DmaWindow
from vfio_user.irqs import IrqSpec, IrqTable
from vfio_user.messages import DeviceFlag, RegionFlag


@dataclass(frozen=True)
class RegionSpec:
    """One region as the device declares it.

    :param index: region index
    :param size: bytes (0: the region does not exist)
    :param flags: READ / WRITE (no MMAP: every access arrives as a message)
    """

    index: int
    size: int
    flags: RegionFlag = RegionFlag.READ | RegionFlag.WRITE


class Function:
    """Base class of the devices the server runs; override what the device has."""

    #: DEVICE_GET_INFO flags.
    device_flags: DeviceFlag = DeviceFlag.RESET | DeviceFlag.PCI

    def regions(self) -> Sequence[RegionSpec]:
        """Every region index up to the highest one the device has (sizes may be 0)."""
        raise NotImplementedError

    def irqs(self) -> Sequence[IrqSpec]:
        """Every interrupt index up to the highest one (counts may be 0)."""
        raise NotImplementedError

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """Read ``count`` bytes at ``offset`` of region ``index`` (inside the region and
        allowed by its flags: the server checked). Must return ``count`` bytes."""
        raise NotImplementedError

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of region ``index`` (checked as for reads)."""
        raise NotImplementedError

    def dma_changed(self, windows: Sequence[DmaWindow]) -> None:
        """The client's DMA windows are now ``windows``. Drop every reference to a window
        not among them before returning: the server unmaps it next."""

    def reset(self) -> None:
        """DEVICE_RESET: the device returns to its power-on state."""

    def connected(self, irqs: IrqTable) -> None:
        """A client connected; ``irqs`` is where interrupts go until it leaves."""

    def disconnected(self) -> None:
        """The client is gone (its windows and eventfds are released after this)."""
