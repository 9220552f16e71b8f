"""The function's PCI configuration space: header, capability list, write masks, BAR sizing.

A 256-byte image with a mask of the bits a driver may write; every other bit
reads back what the device put there, whatever is written (PCI's rule for
read-only bits, which also covers QEMU forwarding writes it emulates itself).
BARs answer a sizing write (all ones) with their size, the ROM BAR is
hard-wired to 0 (no option ROM), and the INTx status bit comes from the
function. Accesses of any width and alignment inside the 256 bytes work
byte by byte, as on real hardware.

The ``virtio_pci_cfg_cap`` window (``pci_cfg_data``) is the one place where a
config access reaches further: the function gives a callback for the BAR
access it stands for.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

from virtio_pci.layout import (
    BAR_SIZES,
    CAP_COMMON,
    CAP_DEVICE,
    CAP_ISR,
    CAP_MSIX,
    CAP_NOTIFY,
    CAP_PCI_CFG,
    CLASS_CODE,
    COMMAND_WRITABLE,
    COMMON_OFFSET,
    CONFIG_SPACE_SIZE,
    DEVICE_OFFSET,
    INTERRUPT_PIN,
    ISR_OFFSET,
    MODERN_DEVICE_BASE,
    MSIX_BAR,
    MSIX_ENABLE,
    MSIX_MASKALL,
    MSIX_PBA_OFFSET,
    MSIX_TABLE_OFFSET,
    MSIX_VECTORS,
    NOTIFY_MULTIPLIER,
    NOTIFY_OFFSET,
    PCI_CAP_ID_MSIX,
    PCI_CAP_ID_VNDR,
    PCI_CFG_BAR,
    PCI_CFG_DATA,
    PCI_CFG_LENGTH,
    PCI_CFG_OFFSET,
    REVISION,
    STATUS_CAP_LIST,
    STATUS_INTERRUPT,
    SUBSYSTEM_ID,
    SUBSYSTEM_VENDOR_ID,
    VENDOR_ID,
    VIRTIO_BAR,
    WINDOW_SIZE,
    Cfg,
    VirtioCap,
)

log = logging.getLogger(__name__)

#: ``bar_access(bar, offset, size, data)``: a write when ``data`` is given, else a read.
BarAccess = Callable[[int, int, int, bytes | None], bytes]


def _virtio_cap(
    cfg_type: VirtioCap, next_cap: int, bar: int, offset: int, length: int, extra: bytes = b""
) -> bytes:
    """``struct virtio_pci_cap`` (16 bytes) plus the type's extra fields."""
    return (
        struct.pack(
            "<BBBBBBHII",
            PCI_CAP_ID_VNDR,
            next_cap,
            16 + len(extra),
            cfg_type,
            bar,
            0,
            0,
            offset,
            length,
        )
        + extra
    )


class ConfigSpace:
    """The 256 bytes of config space and what writes to them do.

    :param device_id: the virtio device id (the PCI device id is 0x1040 + it)
    :param device_config_size: bytes of the device-specific structure
    :param bar_access: performs the BAR access of the ``virtio_pci_cfg_cap`` window
    :param interrupt_status: whether the INTx line is up (PCI status bit 3)
    """

    def __init__(
        self,
        device_id: int,
        device_config_size: int,
        bar_access: BarAccess,
        interrupt_status: Callable[[], bool],
    ) -> None:
        self.device_id = device_id
        self.device_config_size = device_config_size
        self.bar_access = bar_access
        self.interrupt_status = interrupt_status
        self.image = bytearray(CONFIG_SPACE_SIZE)
        self.writable = bytearray(CONFIG_SPACE_SIZE)
        self.reset()

    # -- layout ------------------------------------------------------------------------

    def _put(self, offset: int, fmt: str, *values: int) -> None:
        struct.pack_into(fmt, self.image, offset, *values)

    def _mask(self, offset: int, fmt: str, mask: int) -> None:
        struct.pack_into(fmt, self.writable, offset, mask)

    def reset(self) -> None:
        """Power-on state (also a PCI function-level reset)."""
        self.image[:] = bytes(CONFIG_SPACE_SIZE)
        self.writable[:] = bytes(CONFIG_SPACE_SIZE)
        self._put(Cfg.VENDOR_ID, "<H", VENDOR_ID)
        self._put(Cfg.DEVICE_ID, "<H", MODERN_DEVICE_BASE + self.device_id)
        self._put(Cfg.STATUS, "<H", STATUS_CAP_LIST)
        self._put(Cfg.REVISION, "<B", REVISION)
        self.image[Cfg.CLASS_PROG : Cfg.CLASS_PROG + 3] = CLASS_CODE.to_bytes(3, "little")
        self._put(Cfg.SUBSYSTEM_VENDOR_ID, "<H", SUBSYSTEM_VENDOR_ID)
        self._put(Cfg.SUBSYSTEM_ID, "<H", SUBSYSTEM_ID)
        self._put(Cfg.CAP_PTR, "<B", CAP_MSIX)
        self._put(Cfg.INTERRUPT_PIN, "<B", INTERRUPT_PIN)
        self._mask(Cfg.COMMAND, "<H", COMMAND_WRITABLE)
        self._mask(Cfg.CACHE_LINE, "<B", 0xFF)
        self._mask(Cfg.LATENCY, "<B", 0xFF)
        self._mask(Cfg.INTERRUPT_LINE, "<B", 0xFF)
        for bar, size in enumerate(BAR_SIZES):
            if size:  # 32-bit memory BARs, not prefetchable: type bits 0
                self._mask(Cfg.BAR0 + 4 * bar, "<I", ~(size - 1) & 0xFFFFFFF0)
        # The ROM BAR (0x30) stays 0 and read-only: no ROM, so sizing reads 0.
        self._capabilities()

    def _capabilities(self) -> None:
        msix_ctl = MSIX_VECTORS - 1
        self.image[CAP_MSIX : CAP_MSIX + 12] = struct.pack(
            "<BBHII",
            PCI_CAP_ID_MSIX,
            CAP_COMMON,
            msix_ctl,
            MSIX_TABLE_OFFSET | MSIX_BAR,
            MSIX_PBA_OFFSET | MSIX_BAR,
        )
        self._mask(CAP_MSIX + 2, "<H", MSIX_ENABLE | MSIX_MASKALL)
        caps = [
            (
                CAP_COMMON,
                _virtio_cap(VirtioCap.COMMON, CAP_NOTIFY, VIRTIO_BAR, COMMON_OFFSET, WINDOW_SIZE),
            ),
            (
                CAP_NOTIFY,
                _virtio_cap(
                    VirtioCap.NOTIFY,
                    CAP_ISR,
                    VIRTIO_BAR,
                    NOTIFY_OFFSET,
                    WINDOW_SIZE,
                    struct.pack("<I", NOTIFY_MULTIPLIER),
                ),
            ),
            (CAP_ISR, _virtio_cap(VirtioCap.ISR, CAP_DEVICE, VIRTIO_BAR, ISR_OFFSET, WINDOW_SIZE)),
            (
                CAP_DEVICE,
                _virtio_cap(
                    VirtioCap.DEVICE,
                    CAP_PCI_CFG,
                    VIRTIO_BAR,
                    DEVICE_OFFSET,
                    self.device_config_size,
                ),
            ),
            (CAP_PCI_CFG, _virtio_cap(VirtioCap.PCI_CFG, 0, 0, 0, 0, bytes(4))),
        ]
        for offset, data in caps:
            self.image[offset : offset + len(data)] = data
        # The window's bar, offset, length and data are the driver's to write.
        self._mask(PCI_CFG_BAR, "<B", 0xFF)
        self._mask(PCI_CFG_OFFSET, "<I", 0xFFFFFFFF)
        self._mask(PCI_CFG_LENGTH, "<I", 0xFFFFFFFF)
        self._mask(PCI_CFG_DATA, "<I", 0xFFFFFFFF)

    # -- what the function reads ----------------------------------------------------------

    def u16(self, offset: int) -> int:
        return int(struct.unpack_from("<H", self.image, offset)[0])

    @property
    def command(self) -> int:
        return self.u16(Cfg.COMMAND)

    @property
    def msix_control(self) -> int:
        return self.u16(CAP_MSIX + 2)

    # -- accesses --------------------------------------------------------------------------

    def read(self, offset: int, count: int) -> bytes:
        """Bytes ``[offset, offset + count)`` (inside the 256; the server checked)."""
        if self._touches_window(offset, count):
            self._window_access(None)
        out = bytearray(self.image[offset : offset + count])
        status = Cfg.STATUS - offset
        if 0 <= status < count and self.interrupt_status():
            out[status] |= STATUS_INTERRUPT
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        """A driver write: only writable bits change."""
        for i, b in enumerate(data):
            at = offset + i
            mask = self.writable[at]
            self.image[at] = (self.image[at] & ~mask) | (b & mask)
        if self._touches_window(offset, len(data)):
            self._window_access(bytes(self.image[PCI_CFG_DATA : PCI_CFG_DATA + 4]))

    # -- the virtio_pci_cfg_cap window ---------------------------------------------------------

    @staticmethod
    def _touches_window(offset: int, count: int) -> bool:
        return offset < PCI_CFG_DATA + 4 and offset + count > PCI_CFG_DATA

    def _window_access(self, data: bytes | None) -> None:
        """Do the BAR access the window names (spec: lengths 1, 2, 4, naturally aligned)."""
        bar = self.image[PCI_CFG_BAR]
        off, length = struct.unpack_from("<II", self.image, PCI_CFG_OFFSET)
        size = BAR_SIZES[bar] if bar < len(BAR_SIZES) else 0
        if length not in (1, 2, 4) or off % length or off + length > size:
            log.debug("pci_cfg window: bar %d offset %#x length %d ignored", bar, off, length)
            return
        if data is not None:
            self.bar_access(bar, off, length, data[:length])
        else:
            got = self.bar_access(bar, off, length, None)
            self.image[PCI_CFG_DATA : PCI_CFG_DATA + 4] = got.ljust(4, b"\0")
