"""The virtio-pci function's registers over vfio-user: config header, BAR sizing, the
capabilities, common config, MSI-X table and PBA; read-only stays read-only, odd accesses
are ignored, and none of it disturbs the connection."""

from __future__ import annotations

import struct

import pytest

from device import Queue
from device.testing import GuestRam, MiB
from tests.protocol.vfio_rig import PciGuest, ServerThread
from vfio_user.client import VfioUserClient
from vfio_user.messages import PciRegion
from virtio_pci.layout import (
    CAP_MSIX,
    CAP_PCI_CFG,
    COMMON_OFFSET,
    DEVICE_OFFSET,
    ISR_OFFSET,
    MSIX_BAR,
    MSIX_PBA_OFFSET,
    NO_VECTOR,
    NOTIFY_OFFSET,
    PCI_CFG_BAR,
    PCI_CFG_DATA,
    PCI_CFG_LENGTH,
    PCI_CFG_OFFSET,
    VIRTIO_BAR,
    Cfg,
    Common,
)

CFG = PciRegion.CONFIG
VECTORS = 7


def _cfg(c: VfioUserClient, offset: int, size: int) -> int:
    return c.read_u(CFG, offset, size)


def _common(c: VfioUserClient, field: Common, size: int, value: int | None = None) -> int:
    if value is not None:
        c.write_u(VIRTIO_BAR, COMMON_OFFSET + field, size, value)
    return c.read_u(VIRTIO_BAR, COMMON_OFFSET + field, size)


def test_config_header_identifies_a_modern_virtio_balloon(vfio_client: VfioUserClient) -> None:
    c = vfio_client
    assert (_cfg(c, Cfg.VENDOR_ID, 2), _cfg(c, Cfg.DEVICE_ID, 2)) == (0x1AF4, 0x1045)
    assert _cfg(c, Cfg.REVISION, 1) >= 1
    assert _cfg(c, Cfg.HEADER_TYPE, 1) == 0
    assert _cfg(c, Cfg.STATUS, 2) & 0x10, "capabilities list"
    assert _cfg(c, Cfg.SUBSYSTEM_ID, 2) >= 0x40
    assert _cfg(c, Cfg.CAP_PTR, 1) % 4 == 0 and _cfg(c, Cfg.CAP_PTR, 1) >= 0x40


@pytest.mark.parametrize(
    ("offset", "size"),
    [
        (Cfg.VENDOR_ID, 4),
        (Cfg.REVISION, 4),
        (Cfg.HEADER_TYPE, 1),
        (Cfg.SUBSYSTEM_VENDOR_ID, 4),
        (Cfg.CAP_PTR, 1),
        (Cfg.INTERRUPT_PIN, 1),
        (Cfg.STATUS, 2),
        (CAP_MSIX, 4),
        (CAP_MSIX + 4, 4),
        (CAP_MSIX + 8, 4),
        (CAP_PCI_CFG, 4),
    ],
)
def test_read_only_config_bits_ignore_writes(
    vfio_client: VfioUserClient, offset: int, size: int
) -> None:
    c = vfio_client
    before = c.read(CFG, 0, 256)
    c.write(CFG, offset, b"\xff" * size)
    c.write(CFG, offset, b"\x00" * size)
    after = c.read(CFG, 0, 256)
    assert after[offset : offset + size] == before[offset : offset + size]


def test_whole_config_space_written_with_ones_keeps_identity(vfio_client: VfioUserClient) -> None:
    c = vfio_client
    c.write(CFG, 0, b"\xff" * 256)
    assert (_cfg(c, 0, 2), _cfg(c, 2, 2)) == (0x1AF4, 0x1045)
    assert _cfg(c, Cfg.CAP_PTR, 1) == CAP_MSIX
    assert _cfg(c, Cfg.COMMAND, 2) == 0x0002 | 0x0004 | 0x0040 | 0x0100 | 0x0400


def test_bar_sizing_reads_back_the_size_masks(vfio_client: VfioUserClient) -> None:
    c = vfio_client
    sizes = [0x4000, 0x1000, 0, 0, 0, 0]
    for bar, size in enumerate(sizes):
        at = Cfg.BAR0 + 4 * bar
        c.write_u(CFG, at, 4, 0xFFFFFFFF)
        got = _cfg(c, at, 4)
        assert got == ((~(size - 1) & 0xFFFFFFF0) if size else 0), f"BAR{bar}"
        c.write_u(CFG, at, 4, 0xFEB0_0000)  # the address firmware programs
        assert _cfg(c, at, 4) == (0xFEB0_0000 if size else 0)
    # 32-bit memory BARs, not prefetchable: type bits 0.
    assert _cfg(c, Cfg.BAR0, 4) & 0xF == 0


def test_rom_bar_reads_zero_after_sizing(vfio_client: VfioUserClient) -> None:
    c = vfio_client
    assert _cfg(c, Cfg.ROM, 4) == 0
    c.write_u(CFG, Cfg.ROM, 4, 0xFFFFF800)
    assert _cfg(c, Cfg.ROM, 4) == 0, "QEMU would create a ROM BAR"
    c.write_u(CFG, Cfg.ROM, 4, 0)


def test_msix_capability_and_virtio_capabilities(vfio_client: VfioUserClient) -> None:
    c = vfio_client
    cfg = c.read(CFG, 0, 256)
    cap_id, _, ctl, table, pba = struct.unpack_from("<BBHII", cfg, CAP_MSIX)
    assert cap_id == 0x11 and (ctl & 0x7FF) + 1 == VECTORS and not ctl & 0xC000
    assert (table & 7, table & ~7) == (MSIX_BAR, 0)
    assert (pba & 7, pba & ~7) == (MSIX_BAR, MSIX_PBA_OFFSET)
    seen: dict[int, tuple[int, int, int]] = {}
    at, hops = cfg[Cfg.CAP_PTR], 0
    while at and hops < 48:
        if cfg[at] == 0x09:
            cap_len, cfg_type, bar = cfg[at + 2], cfg[at + 3], cfg[at + 4]
            offset, length = struct.unpack_from("<II", cfg, at + 8)
            seen[cfg_type] = (bar, offset, length)
            if cfg_type == 2:
                assert cap_len == 20
                (mult,) = struct.unpack_from("<I", cfg, at + 16)
                assert mult == 4
        at, hops = cfg[at + 1], hops + 1
    assert at == 0, "the list ends"
    assert seen[1] == (VIRTIO_BAR, COMMON_OFFSET, 0x1000)
    assert seen[2][:2] == (VIRTIO_BAR, NOTIFY_OFFSET)
    assert seen[3][:2] == (VIRTIO_BAR, ISR_OFFSET)
    assert seen[4] == (VIRTIO_BAR, DEVICE_OFFSET, 16)
    assert 5 in seen, "PCI_CFG is mandatory"


def test_msix_control_enable_and_mask_bits_are_writable(vfio_client: VfioUserClient) -> None:
    c = vfio_client
    c.write_u(CFG, CAP_MSIX + 2, 2, 0xFFFF)  # QEMU forwards what it emulates: masked
    assert _cfg(c, CAP_MSIX + 2, 2) == 0xC000 | (VECTORS - 1)
    c.write_u(CFG, CAP_MSIX + 2, 2, 0)
    assert _cfg(c, CAP_MSIX + 2, 2) == VECTORS - 1


def test_msix_table_writes_with_bad_vectors_are_dropped(vfio_client: VfioUserClient) -> None:
    c = vfio_client
    for v in range(VECTORS):
        assert c.read_u(MSIX_BAR, 16 * v + 12, 4) == 1, "masked after reset"
    c.write_u(MSIX_BAR, 16 * 3, 8, 0xFEE0_0000_0000_1000)
    c.write_u(MSIX_BAR, 16 * 3 + 8, 4, 0x4021)
    assert c.read_u(MSIX_BAR, 16 * 3, 8) == 0xFEE0_0000_0000_1000
    assert c.read_u(MSIX_BAR, 16 * 3 + 8, 4) == 0x4021
    before = c.read(MSIX_BAR, 0, 0x1000)
    c.write_u(MSIX_BAR, 16 * VECTORS, 4, 0xDEAD)  # vector 7: past the table
    c.write_u(MSIX_BAR, 16 * 100, 8, 0xDEAD)
    c.write_u(MSIX_BAR, 16 * 2 + 2, 4, 0xDEAD)  # unaligned
    c.write_u(MSIX_BAR, 16 * 2 + 4, 8, 0xDEAD)  # 8 bytes not 8-aligned
    c.write_u(MSIX_BAR, 16 * 2, 2, 0xDEAD)  # 2 bytes
    c.write(MSIX_BAR, 0, bytes(16 * VECTORS + 16))  # a write spanning past the table
    c.write_u(MSIX_BAR, MSIX_PBA_OFFSET, 8, 0xFF)  # the PBA is read-only
    c.write_u(MSIX_BAR, 0xFFC, 4, 0xDEAD)
    assert c.read(MSIX_BAR, 0, 0x1000) == before
    assert c.read_u(MSIX_BAR, 16 * VECTORS, 4) == 0


@pytest.mark.parametrize("vector", [VECTORS, VECTORS + 1, 0x7FF, 0xFFFE, NO_VECTOR])
def test_vectors_beyond_the_table_read_back_no_vector(
    vfio_client: VfioUserClient, vector: int
) -> None:
    c = vfio_client
    assert _common(c, Common.CONFIG_MSIX_VECTOR, 2, vector) == NO_VECTOR
    for q in range(_common(c, Common.NUM_QUEUES, 2)):
        _common(c, Common.QUEUE_SELECT, 2, q)
        assert _common(c, Common.QUEUE_MSIX_VECTOR, 2, q + 1) == q + 1
        assert _common(c, Common.QUEUE_MSIX_VECTOR, 2, vector) == NO_VECTOR
    assert _common(c, Common.CONFIG_MSIX_VECTOR, 2, VECTORS - 1) == VECTORS - 1


def test_read_only_common_fields_ignore_writes(vfio_client: VfioUserClient) -> None:
    c = vfio_client
    num = _common(c, Common.NUM_QUEUES, 2)
    assert _common(c, Common.NUM_QUEUES, 2, 0) == num
    _common(c, Common.DEVICE_FEATURE_SELECT, 4, 1)
    feat = _common(c, Common.DEVICE_FEATURE, 4)
    assert feat & 1, "VERSION_1 (bit 32)"
    assert _common(c, Common.DEVICE_FEATURE, 4, 0xFFFFFFFF) == feat
    assert _common(c, Common.CONFIG_GENERATION, 1, 0x55) == 0
    _common(c, Common.QUEUE_SELECT, 2, 0)
    assert _common(c, Common.QUEUE_NOTIFY_OFF, 2, 9) == 0
    _common(c, Common.DEVICE_FEATURE_SELECT, 4, 2)
    assert _common(c, Common.DEVICE_FEATURE, 4) == 0, "nothing beyond bit 63"


def test_odd_common_accesses_are_ignored(vfio_client: VfioUserClient) -> None:
    c = vfio_client
    _common(c, Common.QUEUE_SELECT, 2, 1)
    c.write_u(VIRTIO_BAR, COMMON_OFFSET + Common.QUEUE_SELECT + 1, 1, 0x7F)  # half a field
    c.write_u(VIRTIO_BAR, COMMON_OFFSET + Common.QUEUE_SELECT, 4, 0x70007)  # two fields
    c.write_u(VIRTIO_BAR, COMMON_OFFSET + 0x100, 4, 7)  # past the structure
    assert _common(c, Common.QUEUE_SELECT, 2) == 1
    # Reads work at any width: the 4 bytes at 20 are status, generation, queue_select.
    word = c.read_u(VIRTIO_BAR, COMMON_OFFSET + Common.DEVICE_STATUS, 4)
    assert word >> 16 == 1
    # One access, one structure: a read across two windows gives zeros.
    assert c.read(VIRTIO_BAR, ISR_OFFSET - 2, 4) == bytes(4)
    assert c.read(VIRTIO_BAR, NOTIFY_OFFSET, 4) == bytes(4), "the notify window reads 0"
    assert c.read(VIRTIO_BAR, 0, 0x4000)[Common.QUEUE_SELECT] == 0, "a whole-BAR read: zeros"
    # Selecting a queue that does not exist: size 0, writes to it ignored.
    _common(c, Common.QUEUE_SELECT, 2, 99)
    assert _common(c, Common.QUEUE_SIZE, 2) == 0
    assert _common(c, Common.QUEUE_SIZE, 2, 64) == 0
    assert _common(c, Common.QUEUE_ENABLE, 2, 1) == 0


def test_device_config_num_pages_is_read_only(
    vfio_client: VfioUserClient, vfio_server: ServerThread
) -> None:
    c = vfio_client
    vfio_server.call(lambda: vfio_server.device.set_num_pages(77))
    c.write_u(VIRTIO_BAR, DEVICE_OFFSET, 4, 5)
    assert c.read_u(VIRTIO_BAR, DEVICE_OFFSET, 4) == 77
    c.write_u(VIRTIO_BAR, DEVICE_OFFSET + 4, 4, 33)  # actual: the driver's
    assert c.read_u(VIRTIO_BAR, DEVICE_OFFSET + 4, 4) == 33
    assert vfio_server.call(lambda: vfio_server.device.actual) == 33
    c.write(VIRTIO_BAR, DEVICE_OFFSET + 14, bytes(8))  # past the 16 bytes: clipped
    assert c.read(VIRTIO_BAR, DEVICE_OFFSET + 16, 16) == bytes(16)
    assert c.read_u(VIRTIO_BAR, DEVICE_OFFSET, 4) == 77


def test_pci_cfg_window_reaches_the_bar(vfio_client: VfioUserClient) -> None:
    c = vfio_client
    num = _common(c, Common.NUM_QUEUES, 2)
    c.write_u(CFG, PCI_CFG_BAR, 1, VIRTIO_BAR)
    c.write_u(CFG, PCI_CFG_OFFSET, 4, COMMON_OFFSET + Common.NUM_QUEUES)
    c.write_u(CFG, PCI_CFG_LENGTH, 4, 2)
    assert _cfg(c, PCI_CFG_DATA, 2) == num
    c.write_u(CFG, PCI_CFG_OFFSET, 4, COMMON_OFFSET + Common.QUEUE_SELECT)
    c.write_u(CFG, PCI_CFG_DATA, 2, 2)
    assert _common(c, Common.QUEUE_SELECT, 2) == 2
    # A window naming a BAR that does not exist, or out of its BAR, does nothing.
    c.write_u(CFG, PCI_CFG_BAR, 1, 5)
    c.write_u(CFG, PCI_CFG_DATA, 2, 3)
    c.write_u(CFG, PCI_CFG_BAR, 1, VIRTIO_BAR)
    c.write_u(CFG, PCI_CFG_OFFSET, 4, 0xFFFFFFFE)
    c.write_u(CFG, PCI_CFG_DATA, 2, 3)
    c.write_u(CFG, PCI_CFG_OFFSET, 4, COMMON_OFFSET + Common.QUEUE_SELECT)
    c.write_u(CFG, PCI_CFG_LENGTH, 4, 3)  # not 1, 2 or 4
    c.write_u(CFG, PCI_CFG_DATA, 4, 3)
    assert _common(c, Common.QUEUE_SELECT, 2) == 2


def test_notify_of_a_queue_not_enabled_or_odd_is_harmless(vfio_server: ServerThread) -> None:
    ram = GuestRam(16 * MiB)
    ram.fill_pattern()
    g = PciGuest(vfio_server.path, ram)
    g.start()
    c = g.client
    for off, data in ((0, b"\x63\x00"), (2, b"\0\0"), (0, b"\0"), (0x0FFC, b"\5\0\0\0")):
        c.write(VIRTIO_BAR, NOTIFY_OFFSET + off, data, posted=True)
    c.sync()
    assert not vfio_server.call(lambda: vfio_server.device.snapshot().broken_queues)
    before = ram.allocated()
    g.inflate(Queue.INFLATE, [600, 601])  # the real notify still works
    assert before - ram.allocated() == 2 * 4096
    g.close()
    ram.close()
