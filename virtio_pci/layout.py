"""Where everything sits in the virtio-pci function: BARs, capabilities, register offsets.

Spec: virtio 1.3 "Virtio Over PCI Bus"; Linux ``include/uapi/linux/virtio_pci.h``
for the offsets; QEMU's own virtio-pci for the plan (four 4 KiB windows in one
BAR, notify multiplier 4, the MSI-X table and PBA in a BAR of their own).
Here the virtio structures are in a 32-bit BAR0 rather than QEMU's 64-bit
BAR4, so that nothing needs a 64-bit BAR's upper half.
"""

from __future__ import annotations

from enum import IntEnum

#: PCI IDs: Red Hat/Qumranet's virtio vendor; modern devices are 0x1040 + virtio id.
VENDOR_ID = 0x1AF4
MODERN_DEVICE_BASE = 0x1040
#: Subsystem IDs as QEMU's virtio-pci sets them (>= 0x40, as the spec asks of a
#: non-transitional device).
SUBSYSTEM_VENDOR_ID = 0x1AF4
SUBSYSTEM_ID = 0x1100
#: Revision 1: a modern-only (non-transitional) device.
REVISION = 1
#: Class code: "other" (0x00ff), as QEMU's balloon.
CLASS_CODE = 0x00FF00

CONFIG_SPACE_SIZE = 256

# -- BARs ------------------------------------------------------------------------------

#: BAR0: the virtio structures, one 4 KiB window each.
VIRTIO_BAR = 0
VIRTIO_BAR_SIZE = 0x4000
COMMON_OFFSET = 0x0000
ISR_OFFSET = 0x1000
DEVICE_OFFSET = 0x2000
NOTIFY_OFFSET = 0x3000
WINDOW_SIZE = 0x1000
#: Bytes between two queues' notify addresses.
NOTIFY_MULTIPLIER = 4

#: BAR1: the MSI-X table and pending-bit array.
MSIX_BAR = 1
MSIX_BAR_SIZE = 0x1000
MSIX_TABLE_OFFSET = 0x000
MSIX_PBA_OFFSET = 0x800
MSIX_ENTRY_SIZE = 16
#: One vector for config changes and one per queue (a balloon has at most 6).
MSIX_VECTORS = 7

BAR_SIZES = (VIRTIO_BAR_SIZE, MSIX_BAR_SIZE, 0, 0, 0, 0)

# -- the config header ----------------------------------------------------------------


class Cfg(IntEnum):
    """Offsets in the type-0 config header."""

    VENDOR_ID = 0x00
    DEVICE_ID = 0x02
    COMMAND = 0x04
    STATUS = 0x06
    REVISION = 0x08
    CLASS_PROG = 0x09
    CACHE_LINE = 0x0C
    LATENCY = 0x0D
    HEADER_TYPE = 0x0E
    BAR0 = 0x10
    SUBSYSTEM_VENDOR_ID = 0x2C
    SUBSYSTEM_ID = 0x2E
    ROM = 0x30
    CAP_PTR = 0x34
    INTERRUPT_LINE = 0x3C
    INTERRUPT_PIN = 0x3D


#: Command register bits a driver may set: memory space, bus master, parity, SERR, INTx off.
COMMAND_WRITABLE = 0x0002 | 0x0004 | 0x0040 | 0x0100 | 0x0400
COMMAND_INTX_DISABLE = 0x0400
STATUS_INTERRUPT = 0x0008
STATUS_CAP_LIST = 0x0010
#: INTA#: the fallback when the guest does not enable MSI-X.
INTERRUPT_PIN = 1

# -- capabilities (offsets in config space) ----------------------------------------------

CAP_MSIX = 0x40
CAP_COMMON = 0x50
CAP_NOTIFY = 0x60
CAP_ISR = 0x74
CAP_DEVICE = 0x84
CAP_PCI_CFG = 0x94

PCI_CAP_ID_MSIX = 0x11
PCI_CAP_ID_VNDR = 0x09
#: MSI-X message control bits the driver writes.
MSIX_ENABLE = 0x8000
MSIX_MASKALL = 0x4000


class VirtioCap(IntEnum):
    """``cfg_type`` of the virtio vendor capabilities."""

    COMMON = 1
    NOTIFY = 2
    ISR = 3
    DEVICE = 4
    PCI_CFG = 5


#: ``struct virtio_pci_cfg_cap``: where its bar/offset/length fields and data window sit.
PCI_CFG_BAR = CAP_PCI_CFG + 4
PCI_CFG_OFFSET = CAP_PCI_CFG + 8
PCI_CFG_LENGTH = CAP_PCI_CFG + 12
PCI_CFG_DATA = CAP_PCI_CFG + 16

# -- the common configuration structure ---------------------------------------------------


class Common(IntEnum):
    """Offsets in ``struct virtio_pci_common_cfg``."""

    DEVICE_FEATURE_SELECT = 0
    DEVICE_FEATURE = 4
    DRIVER_FEATURE_SELECT = 8
    DRIVER_FEATURE = 12
    CONFIG_MSIX_VECTOR = 16
    NUM_QUEUES = 18
    DEVICE_STATUS = 20
    CONFIG_GENERATION = 21
    QUEUE_SELECT = 22
    QUEUE_SIZE = 24
    QUEUE_MSIX_VECTOR = 26
    QUEUE_ENABLE = 28
    QUEUE_NOTIFY_OFF = 30
    QUEUE_DESC_LO = 32
    QUEUE_DESC_HI = 36
    QUEUE_DRIVER_LO = 40
    QUEUE_DRIVER_HI = 44
    QUEUE_DEVICE_LO = 48
    QUEUE_DEVICE_HI = 52
    QUEUE_NOTIF_CONFIG_DATA = 56
    QUEUE_RESET = 58


#: Width of each common-config field.
COMMON_WIDTH: dict[Common, int] = {
    Common.DEVICE_FEATURE_SELECT: 4,
    Common.DEVICE_FEATURE: 4,
    Common.DRIVER_FEATURE_SELECT: 4,
    Common.DRIVER_FEATURE: 4,
    Common.CONFIG_MSIX_VECTOR: 2,
    Common.NUM_QUEUES: 2,
    Common.DEVICE_STATUS: 1,
    Common.CONFIG_GENERATION: 1,
    Common.QUEUE_SELECT: 2,
    Common.QUEUE_SIZE: 2,
    Common.QUEUE_MSIX_VECTOR: 2,
    Common.QUEUE_ENABLE: 2,
    Common.QUEUE_NOTIFY_OFF: 2,
    Common.QUEUE_DESC_LO: 4,
    Common.QUEUE_DESC_HI: 4,
    Common.QUEUE_DRIVER_LO: 4,
    Common.QUEUE_DRIVER_HI: 4,
    Common.QUEUE_DEVICE_LO: 4,
    Common.QUEUE_DEVICE_HI: 4,
    Common.QUEUE_NOTIF_CONFIG_DATA: 2,
    Common.QUEUE_RESET: 2,
}
#: Bytes of the common structure a driver may touch (Linux wants 64 with newer features).
COMMON_SIZE = 64
#: "No MSI-X vector" in the vector registers.
NO_VECTOR = 0xFFFF
#: Descriptors per queue (QEMU's balloon uses 128; the driver takes what it reads).
QUEUE_SIZE_MAX = 128

#: ISR bits.
ISR_QUEUE = 0x1
ISR_CONFIG = 0x2
