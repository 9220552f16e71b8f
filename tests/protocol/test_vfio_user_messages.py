"""Every vfio-user command over a real socket, as QEMU 11.1 sends it, and what it does."""

from __future__ import annotations

import errno
import json
import os
import select
import struct

import pytest

from device import Queue
from device.defs import FRAME_SIZE
from device.testing import GuestRam, MiB
from tests.protocol.vfio_rig import (
    PciGuest,
    ServerThread,
    closed_by_server,
    connect,
    data_at,
    hang_up,
    holds_fd_of,
    mapped,
    nothing_to_read,
    open_fds,
    serves_a_fresh_client,
    wait_for,
)
from vfio_user.client import QEMU_CAPABILITIES, VfioUserClient
from vfio_user.dispatcher import MAX_DATA_XFER, MAX_DMA_MAPS, MAX_MSG_FDS
from vfio_user.dma import DmaSpace
from vfio_user.errors import CommandError
from vfio_user.messages import (
    HEADER_SIZE,
    Command,
    DeviceFlag,
    DmaFlag,
    DmaMap,
    DmaUnmapFlag,
    Header,
    IrqInfoFlag,
    IrqSetFlag,
    PciIrq,
    PciRegion,
    RegionAccess,
    RegionFlag,
    Version,
    WriteMulti,
)
from virtio_pci.layout import (
    COMMON_OFFSET,
    MSIX_BAR,
    MSIX_PBA_OFFSET,
    NO_VECTOR,
    VIRTIO_BAR,
    Cfg,
    Common,
)

TRIGGER = IrqSetFlag.ACTION_TRIGGER
EVENTFD = IrqSetFlag.DATA_EVENTFD
NONE = IrqSetFlag.DATA_NONE


def _memfd(name: str, size: int = 16 * MiB) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _signalled(fd: int, timeout: float = 0.0) -> bool:
    r, _, _ = select.select([fd], [], [], timeout)
    if r:
        os.eventfd_read(fd)
    return bool(r)


def _eventfds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(n)]


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _errno(call: object, *args: object, **kw: object) -> int:
    with pytest.raises(CommandError) as info:
        call(*args, **kw)  # type: ignore[operator]
    return info.value.errno


# -- VERSION --------------------------------------------------------------------------


def test_version_reply_passes_qemus_checks(vfio_server: ServerThread) -> None:
    c = connect(vfio_server)
    payload = Version(0, 0, QEMU_CAPABILITIES).pack()
    c.send_raw(Header.command_of(7, Command.VERSION, len(payload)).pack() + payload)
    header, body = c.reply()
    assert (header.msg_id, header.command, header.is_reply, header.is_error) == (7, 1, True, False)
    major, minor = struct.unpack_from("<HH", body)
    assert (major, minor) == (0, 0)
    assert body[-1] == 0, "QEMU requires a NUL-terminated JSON string"
    caps = json.loads(body[4:-1])["capabilities"]
    assert set(caps) <= set(QEMU_CAPABILITIES), "only capabilities QEMU proposed"
    assert "migration" not in caps, "no device state is transferred"
    assert 1 <= caps["max_msg_fds"] <= 16
    assert 0 < caps["max_data_xfer_size"] <= 64 * MiB
    assert caps["pgsizes"] % 4096 == 0
    assert 0 < caps["max_dma_maps"] <= 65535
    assert caps["write_multiple"] is True  # offered by QEMU, implemented: accepted
    c.close()


def test_version_without_write_multiple_is_not_offered_back(vfio_server: ServerThread) -> None:
    c = connect(vfio_server)
    v = c.version({"max_msg_fds": 16})
    assert "write_multiple" not in v.capabilities
    multi = WriteMulti((RegionAccess(Cfg.COMMAND, PciRegion.CONFIG, 2, b"\x02\x00"),)).pack()
    assert _errno(c.request, Command.REGION_WRITE_MULTI, multi) == errno.ENOTSUP
    assert c.read_u(PciRegion.CONFIG, Cfg.COMMAND, 2) == 0, "the refused write did nothing"
    c.close()


def test_version_minor_above_ours_is_answered_with_ours(vfio_server: ServerThread) -> None:
    c = connect(vfio_server)
    payload = Version(0, 5, {}).pack()
    v = Version.unpack(c.request(Command.VERSION, payload))
    assert (v.major, v.minor) == (0, 0)
    c.close()


@pytest.mark.parametrize(
    ("command", "payload", "with_fd"),
    [
        (Command.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0), False),
        (Command.REGION_READ, RegionAccess(0, PciRegion.CONFIG, 4).pack(), False),
        (Command.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0, 16 * MiB), True),
        (Command.DEVICE_RESET, b"", False),
    ],
)
def test_anything_before_version_closes_the_connection(
    vfio_server: ServerThread, command: Command, payload: bytes, with_fd: bool
) -> None:
    fd = _memfd("before-version") if with_fd else None
    base = open_fds()
    c = connect(vfio_server)
    c.send_raw(Header.command_of(1, command, len(payload)).pack() + payload, [fd] if fd else None)
    assert closed_by_server(c)
    c.close()
    wait_for(lambda: open_fds() <= base, "the server to close the fd it was sent")
    if fd is not None:
        assert holds_fd_of("before-version") == 1 and mapped("before-version") == 0
        os.close(fd)
    serves_a_fresh_client(vfio_server)


def test_unknown_command_before_version_closes_the_connection(vfio_server: ServerThread) -> None:
    c = connect(vfio_server)
    c.send_raw(Header(1, 99, HEADER_SIZE).pack())
    assert closed_by_server(c)
    c.close()
    serves_a_fresh_client(vfio_server)


def test_version_twice_is_refused_the_connection_stays(vfio_client: VfioUserClient) -> None:
    assert _errno(vfio_client.version) == errno.EINVAL
    assert vfio_client.device_info().num_regions >= 8


@pytest.mark.parametrize(
    ("payload", "err"),
    [
        (Version(1, 0, {}).pack(), errno.ENOTSUP),
        (struct.pack("<HH", 0, 0) + b'{"capabilities":{}}', errno.EINVAL),  # no NUL
        (struct.pack("<HH", 0, 0) + b"[1,2]\0", errno.EINVAL),
        (struct.pack("<HH", 0, 0) + b'{"capabilities":[]}\0', errno.EINVAL),
        (struct.pack("<HH", 0, 0) + b"\xff\xfe\0", errno.EINVAL),
        (struct.pack("<HH", 0, 0) + b"{" * 5000 + b"\0", errno.EINVAL),
        (struct.pack("<HH", 0, 0) + b"[" * 4000 + b"\0", errno.EINVAL),
        (Version(0, 0, {"max_data_xfer_size": 0}).pack(), errno.EINVAL),
        (Version(0, 0, {"max_data_xfer_size": True}).pack(), errno.EINVAL),
        (Version(0, 0, {"max_msg_fds": -1}).pack(), errno.EINVAL),
        (b"\0", errno.EINVAL),
    ],
    ids=[
        "major 1",
        "no NUL",
        "array",
        "capabilities array",
        "not UTF-8",
        "JSON too long",
        "nested too deep",
        "xfer 0",
        "xfer bool",
        "fds negative",
        "short",
    ],
)
def test_bad_version_is_refused_and_a_good_one_follows(
    vfio_server: ServerThread, payload: bytes, err: int
) -> None:
    c = connect(vfio_server)
    assert _errno(c.request, Command.VERSION, payload) == err
    v = c.version()  # the refused VERSION left the session unversioned, not broken
    assert v.major == 0
    assert c.device_info().flags & DeviceFlag.PCI
    c.close()


# -- DMA_MAP / DMA_UNMAP ----------------------------------------------------------------


def test_each_map_gets_a_fresh_fd_and_an_offset_into_the_ram_memfd(
    vfio_server: ServerThread,
) -> None:
    """QEMU's PC layout: RAM below 4 GiB and above it are windows on one memfd; frames
    in the upper window are punched at ``map.offset + (gpa - map.gpa)`` of its fd."""
    low, high_gpa = 16 * MiB, 1 << 32
    ram = GuestRam(32 * MiB, name="split-ram")
    ram.fill_pattern()
    ours = holds_fd_of("split-ram")
    guest = PciGuest(vfio_server.path, ram, windows=[(0, low, 0), (high_gpa, low, low)])
    guest.start()
    c = guest.client
    per_window, odd = divmod(holds_fd_of("split-ram") - ours, 2)
    assert per_window >= 1 and not odd, "each window holds the fd it came with"
    assert mapped("split-ram") == 3, "ours, and the server's mapping of each window"
    before = ram.allocated()
    first = high_gpa // FRAME_SIZE
    guest.inflate(Queue.INFLATE, list(range(first + 100, first + 164)))
    assert before - ram.allocated() == 64 * FRAME_SIZE
    for k in range(100, 164):
        assert not data_at(ram.fd, low + k * FRAME_SIZE), "a hole at map.offset + delta"
    assert ram.frame_intact(low // FRAME_SIZE + 99)
    assert ram.frame_intact(low // FRAME_SIZE + 164)
    assert ram.frame_intact(100), "the same page number in the low window is untouched"
    # Unmapped, those GPAs are no RAM: nothing is punched; mapped again (fresh fd), it is.
    c.dma_unmap(high_gpa, low)
    assert mapped("split-ram") == 2
    assert holds_fd_of("split-ram") == ours + per_window
    before = ram.allocated()
    guest.inflate(Queue.INFLATE, list(range(first + 200, first + 208)))
    assert ram.allocated() == before and ram.frame_intact(low // FRAME_SIZE + 200)
    fd = os.dup(ram.fd)
    c.dma_map(high_gpa, low, fd, low)
    os.close(fd)
    guest.inflate(Queue.INFLATE, list(range(first + 300, first + 308)))
    assert before - ram.allocated() == 8 * FRAME_SIZE
    assert not data_at(ram.fd, low + 300 * FRAME_SIZE)
    guest.close()
    wait_for(lambda: holds_fd_of("split-ram") == ours, "the windows released on disconnect")
    assert mapped("split-ram") == 1  # our own mapping only
    ram.close()


def test_read_only_and_fdless_maps_are_never_discarded(vfio_server: ServerThread) -> None:
    ram = GuestRam(16 * MiB)
    rom = GuestRam(4 * MiB, gpa=64 * MiB, name="rom")
    rom.fill_pattern()
    guest = PciGuest(vfio_server.path, ram)
    guest.start()
    c = guest.client
    fd = os.dup(rom.fd)
    c.dma_map(rom.gpa, rom.size, fd, 0, flags=DmaFlag.READ)
    os.close(fd)
    c.dma_map(128 * MiB, 4 * MiB, None, 0)  # RAM without an fd (QEMU's BIOS, VGA RAM)
    before = rom.allocated()
    pfns = [rom.gpa // FRAME_SIZE + k for k in range(0, 1024, 3)]
    pfns += [128 * MiB // FRAME_SIZE + k for k in range(0, 1024, 3)]
    guest.inflate(Queue.INFLATE, pfns)
    assert rom.allocated() == before
    assert all(rom.frame_intact(p) for p in pfns[: len(pfns) // 2])
    assert all(data_at(rom.fd, (p - rom.gpa // FRAME_SIZE) * FRAME_SIZE) for p in pfns[:10])
    refused = vfio_server.call(lambda: vfio_server.device.metrics.refused_frames)
    assert refused == len(pfns) // 2, "the fd-less window's frames are no RAM to discard"
    guest.close()
    rom.close()
    ram.close()


def test_unmap_releases_the_window_before_the_reply(vfio_client: VfioUserClient) -> None:
    fd = _memfd("unmap-me")
    vfio_client.dma_map(0, 16 * MiB, fd, 0)
    assert holds_fd_of("unmap-me") > 1 and mapped("unmap-me") == 1
    echo = vfio_client.dma_unmap(0, 16 * MiB)
    assert (echo.argsz, echo.flags, echo.address, echo.size) == (24, 0, 0, 16 * MiB)
    # The reply came after the munmap and close: nothing of the window is left.
    assert mapped("unmap-me") == 0 and holds_fd_of("unmap-me") == 1
    os.close(fd)


def test_unmap_all_and_unmatched_unmaps(vfio_client: VfioUserClient) -> None:
    fd = _memfd("unmap-all", 32 * MiB)
    for gpa in (0, 16 * MiB):
        dup = os.dup(fd)
        vfio_client.dma_map(gpa, 16 * MiB, dup, gpa)
        os.close(dup)
    assert mapped("unmap-all") == 2
    c = vfio_client
    assert _errno(c.dma_unmap, 0, 8 * MiB) == errno.ENOENT, "must match a map exactly"
    assert _errno(c.dma_unmap, 4096, 16 * MiB) == errno.ENOENT
    assert mapped("unmap-all") == 2
    assert _errno(c.dma_unmap, 0, 4096, DmaUnmapFlag.ALL) == errno.EINVAL
    assert _errno(c.dma_unmap, 0, 16 * MiB, DmaUnmapFlag.GET_DIRTY_BITMAP) == errno.ENOTSUP
    c.dma_unmap(0, 0, DmaUnmapFlag.ALL)
    assert mapped("unmap-all") == 0 and holds_fd_of("unmap-all") == 1
    assert _errno(c.dma_unmap, 0, 16 * MiB) == errno.ENOENT
    os.close(fd)


def test_maps_up_to_the_limit_then_enospc(vfio_client: VfioUserClient) -> None:
    for i in range(MAX_DMA_MAPS):
        vfio_client.dma_map(i * 4096, 4096, None)
    assert _errno(vfio_client.dma_map, MAX_DMA_MAPS * 4096, 4096, None) == errno.ENOSPC
    vfio_client.dma_unmap(0, 4096)
    vfio_client.dma_map(MAX_DMA_MAPS * 4096, 4096, None)


def test_disconnect_releases_every_window_and_eventfd(vfio_server: ServerThread) -> None:
    fd = _memfd("left-behind")
    efds = _eventfds(4)
    base = open_fds()
    c = connect(vfio_server)
    c.version()
    c.dma_map(0, 8 * MiB, fd, 0)
    c.dma_map(8 * MiB, 8 * MiB, fd, 8 * MiB)
    c.set_irqs(PciIrq.MSIX, EVENTFD | TRIGGER, 0, 3, efds[:3])
    c.set_irqs(PciIrq.INTX, EVENTFD | IrqSetFlag.ACTION_UNMASK, 0, 1, efds[3:])
    assert mapped("left-behind") == 2 and holds_fd_of("left-behind") > 2
    assert open_fds() > base + 1 + 2 + 4  # the client's socket and what the server holds
    hang_up(vfio_server, c)
    assert mapped("left-behind") == 0 and holds_fd_of("left-behind") == 1
    assert open_fds() == base, "every window fd and eventfd the server held is closed"
    os.eventfd_write(efds[3], 1)  # the unmask fd is no longer watched: no harm
    assert vfio_server.alive
    _close([fd, *efds])


# -- DEVICE_GET_INFO, GET_REGION_INFO, GET_IRQ_INFO -------------------------------------------


def test_device_info_meets_qemus_requirements(vfio_client: VfioUserClient) -> None:
    info = vfio_client.device_info()
    assert info.argsz == 16
    assert info.flags == DeviceFlag.RESET | DeviceFlag.PCI
    assert 8 <= info.num_regions <= 100, "CONFIG (index 7) must exist"
    assert 3 <= info.num_irqs <= 50, "MSIX (index 2) must exist"


def test_region_info_of_every_region(vfio_client: VfioUserClient) -> None:
    rw = RegionFlag.READ | RegionFlag.WRITE
    want = {0: (0x4000, rw), 1: (0x1000, rw), 2: (0, 0), 3: (0, 0), 4: (0, 0), 5: (0, 0)}
    want |= {PciRegion.ROM: (0, 0), PciRegion.CONFIG: (256, rw)}
    for index, (size, flags) in want.items():
        r = vfio_client.region_info(index)
        assert (r.index, r.size, r.flags, r.argsz, r.cap_offset) == (index, size, flags, 32, 0)
        assert not r.flags & RegionFlag.MMAP, "every access must arrive as a message"
    for bad in (PciRegion.VGA, 9, 0xFFFFFFFF):
        assert _errno(vfio_client.region_info, bad) == errno.EINVAL
    short = struct.pack("<IIIIQQ", 16, 0, 0, 0, 0, 0)
    assert _errno(vfio_client.request, Command.DEVICE_GET_REGION_INFO, short) == errno.EINVAL


def test_irq_info_of_every_index(vfio_client: VfioUserClient) -> None:
    ev = IrqInfoFlag.EVENTFD
    intx = vfio_client.irq_info(PciIrq.INTX)
    assert intx.count == 1
    assert intx.flags == ev | IrqInfoFlag.MASKABLE | IrqInfoFlag.AUTOMASKED
    msix = vfio_client.irq_info(PciIrq.MSIX)
    assert msix.count == 7 and msix.flags & ev and not msix.flags & IrqInfoFlag.NORESIZE
    assert vfio_client.irq_info(PciIrq.MSI).count == 0
    err = vfio_client.irq_info(PciIrq.ERR)
    assert (err.index, err.count, err.flags & ev) == (PciIrq.ERR, 1, ev)
    assert vfio_client.irq_info(PciIrq.REQ).count == 0
    assert _errno(vfio_client.irq_info, 5) == errno.EINVAL


def test_region_io_fds_are_none(vfio_client: VfioUserClient) -> None:
    body = vfio_client.request(
        Command.DEVICE_GET_REGION_IO_FDS, struct.pack("<IIII", 16, 0, VIRTIO_BAR, 0)
    )
    assert struct.unpack("<IIII", body) == (16, 0, VIRTIO_BAR, 0)


# -- SET_IRQS ------------------------------------------------------------------------------


def test_msix_eventfds_trigger_mask_unmask(vfio_client: VfioUserClient) -> None:
    c = vfio_client
    fds = _eventfds(7)
    # QEMU: "enable MSI-X, nothing routed", then one SET_IRQS per vector in use.
    c.set_irqs(PciIrq.MSIX, EVENTFD | TRIGGER, 0, 1)
    for v in range(7):
        c.set_irqs(PciIrq.MSIX, EVENTFD | TRIGGER, v, 1, [fds[v]])
    c.set_irqs(PciIrq.MSIX, NONE | TRIGGER, 3, 1)  # loopback: vector 3 fires
    assert [_signalled(fd) for fd in fds] == [v == 3 for v in range(7)]
    c.set_irqs(PciIrq.MSIX, IrqSetFlag.DATA_BOOL | TRIGGER, 1, 3, data=b"\1\0\1")
    assert [_signalled(fd) for fd in fds] == [v in (1, 3) for v in range(7)]
    c.set_irqs(PciIrq.MSIX, NONE | IrqSetFlag.ACTION_MASK, 5, 1)
    c.set_irqs(PciIrq.MSIX, NONE | TRIGGER, 5, 1)
    assert not _signalled(fds[5]), "a masked vector only becomes pending"
    assert c.read_u(MSIX_BAR, MSIX_PBA_OFFSET, 8) == 1 << 5, "the PBA shows it"
    c.set_irqs(PciIrq.MSIX, NONE | IrqSetFlag.ACTION_UNMASK, 5, 1)
    assert _signalled(fds[5]), "unmasking a pending vector delivers it"
    assert c.read_u(MSIX_BAR, MSIX_PBA_OFFSET, 8) == 0
    # De-assign vector 2 (no fds): its events are dropped; the others stay routed.
    c.set_irqs(PciIrq.MSIX, EVENTFD | TRIGGER, 2, 1)
    c.set_irqs(PciIrq.MSIX, IrqSetFlag.DATA_BOOL | TRIGGER, 0, 4, data=b"\0\0\1\1")
    assert [_signalled(fd) for fd in fds[:4]] == [False, False, False, True]
    # Disable the whole index: every eventfd closed on the server's side.
    base = open_fds()
    c.set_irqs(PciIrq.MSIX, NONE | TRIGGER, 0, 0)
    assert open_fds() == base - 6
    c.set_irqs(PciIrq.MSIX, NONE | TRIGGER, 0, 7)
    assert not any(_signalled(fd) for fd in fds)
    _close(fds)


def test_err_index_takes_an_eventfd(vfio_client: VfioUserClient) -> None:
    (fd,) = _eventfds(1)
    vfio_client.set_irqs(PciIrq.ERR, EVENTFD | TRIGGER, 0, 1, [fd])
    vfio_client.set_irqs(PciIrq.ERR, NONE | TRIGGER, 0, 1)
    assert _signalled(fd)
    os.close(fd)


def test_intx_is_automasked_until_unmask_and_unmask_eventfd(vfio_client: VfioUserClient) -> None:
    c = vfio_client
    line, unmask = _eventfds(2)
    c.set_irqs(PciIrq.INTX, EVENTFD | TRIGGER, 0, 1, [line])
    c.set_irqs(PciIrq.INTX, NONE | TRIGGER, 0, 1)
    assert _signalled(line)
    c.set_irqs(PciIrq.INTX, NONE | TRIGGER, 0, 1)
    assert not _signalled(line), "automasked after the first trigger"
    c.set_irqs(PciIrq.INTX, NONE | IrqSetFlag.ACTION_UNMASK, 0, 1)
    assert _signalled(line), "still pending: the unmask fires it again"
    # VFIO's resample path: a write to the unmask eventfd unmasks.
    c.set_irqs(PciIrq.INTX, EVENTFD | IrqSetFlag.ACTION_UNMASK, 0, 1, [unmask])
    os.eventfd_write(unmask, 1)
    assert _signalled(line, timeout=5.0), "the unmask eventfd unmasked the pending line"
    c.set_irqs(PciIrq.INTX, NONE | TRIGGER, 0, 0)
    os.eventfd_write(unmask, 1)  # no longer watched: nothing happens
    c.sync()
    assert not _signalled(line)
    _close([line, unmask])


@pytest.mark.parametrize(
    ("index", "flags", "start", "count", "nfds", "data"),
    [
        (PciIrq.MSIX, EVENTFD | TRIGGER, 6, 2, 2, b""),  # beyond the 7 vectors
        (PciIrq.MSIX, EVENTFD | TRIGGER, 0, 2, 1, b""),  # fewer fds than vectors
        (PciIrq.MSIX, EVENTFD | TRIGGER, 0, 1, 2, b""),  # more fds than vectors
        (PciIrq.MSIX, NONE | TRIGGER, 0, 1, 1, b""),  # fds without DATA_EVENTFD
        (PciIrq.MSIX, EVENTFD | IrqSetFlag.ACTION_MASK, 0, 1, 1, b""),  # mask eventfds
        (PciIrq.MSI, EVENTFD | TRIGGER, 0, 1, 1, b""),  # an index with no vectors
        (7, EVENTFD | TRIGGER, 0, 1, 1, b""),  # no such index
        (PciIrq.MSIX, EVENTFD | NONE | TRIGGER, 0, 1, 1, b""),  # two data types
        (PciIrq.MSIX, EVENTFD | TRIGGER | IrqSetFlag.ACTION_MASK, 0, 1, 1, b""),
        (PciIrq.MSIX, IrqSetFlag.DATA_BOOL | TRIGGER, 0, 2, 0, b"\1"),  # short bool data
        (PciIrq.MSIX, EVENTFD | TRIGGER, 0xFFFFFFFF, 1, 0, b""),
        (PciIrq.MSIX, EVENTFD | TRIGGER, 1, 0xFFFFFFFF, 0, b""),
    ],
)
def test_bad_set_irqs_is_refused_and_its_fds_closed(
    vfio_client: VfioUserClient,
    index: int,
    flags: IrqSetFlag,
    start: int,
    count: int,
    nfds: int,
    data: bytes,
) -> None:
    good = _eventfds(1)
    vfio_client.set_irqs(PciIrq.MSIX, EVENTFD | TRIGGER, 0, 1, good)
    fds = _eventfds(nfds)
    base = open_fds()
    assert _errno(vfio_client.set_irqs, index, flags, start, count, fds, data) == errno.EINVAL
    assert open_fds() == base, "the refused message's fds were closed"
    vfio_client.set_irqs(PciIrq.MSIX, NONE | TRIGGER, 0, 1)
    assert _signalled(good[0]), "vector 0's routing was left alone"
    _close(fds + good)


# -- REGION_READ / REGION_WRITE ---------------------------------------------------------------


def test_region_read_and_write_reply_shapes(vfio_client: VfioUserClient) -> None:
    c = vfio_client
    body = c.request(Command.REGION_READ, RegionAccess(0, PciRegion.CONFIG, 4).pack())
    assert body == struct.pack("<QII", 0, PciRegion.CONFIG, 4) + struct.pack("<HH", 0x1AF4, 0x1045)
    req = RegionAccess(Cfg.COMMAND, PciRegion.CONFIG, 2, b"\x06\x00")
    body = c.request(Command.REGION_WRITE, req.pack())
    assert body == struct.pack("<QII", Cfg.COMMAND, PciRegion.CONFIG, 2), "no data echoed"
    assert c.read_u(PciRegion.CONFIG, Cfg.COMMAND, 2) == 6
    whole = c.read(PciRegion.CONFIG, 0, 256)
    assert whole[:4] == struct.pack("<HH", 0x1AF4, 0x1045) and len(whole) == 256


def test_posted_writes_get_no_reply(vfio_client: VfioUserClient) -> None:
    c = vfio_client
    sel = COMMON_OFFSET + Common.QUEUE_SELECT
    for q in range(3):
        c.write_u(VIRTIO_BAR, sel, 2, q, posted=True)
    c.write_u(VIRTIO_BAR, 0x10_0000, 4, 1, posted=True)  # refused: still no reply
    c.write_u(PciRegion.BAR2, 0, 4, 1, posted=True)
    assert nothing_to_read(c, 0.05)
    c.sync()  # the next message is this reply (the client checks its id): none came before
    assert nothing_to_read(c)
    assert c.read_u(VIRTIO_BAR, sel, 2) == 2, "the posted writes ran, in order"


def test_commands_are_answered_in_order_when_pipelined(vfio_client: VfioUserClient) -> None:
    c = vfio_client
    msgs = b""
    for i in range(100):
        req = RegionAccess(COMMON_OFFSET + Common.QUEUE_SELECT, VIRTIO_BAR, 2, struct.pack("<H", i))
        msgs += Header.command_of(1000 + 2 * i, Command.REGION_WRITE, 18, no_reply=True).pack()
        msgs += req.pack()
        read = RegionAccess(COMMON_OFFSET + Common.QUEUE_SELECT, VIRTIO_BAR, 2).pack()
        msgs += Header.command_of(1001 + 2 * i, Command.REGION_READ, len(read)).pack() + read
    c.send_raw(msgs)
    for i in range(100):
        header, body = c.reply()
        assert header.msg_id == 1001 + 2 * i
        assert RegionAccess.unpack_reply(body).data == struct.pack("<H", i)


@pytest.mark.parametrize("posted", [False, True])
def test_region_write_multi_applies_every_write_in_order(
    vfio_client: VfioUserClient, posted: bool
) -> None:
    c = vfio_client
    sel = COMMON_OFFSET + Common.QUEUE_SELECT
    vec = COMMON_OFFSET + Common.QUEUE_MSIX_VECTOR
    writes = []
    for q in range(3):
        writes.append(RegionAccess(sel, VIRTIO_BAR, 2, struct.pack("<H", q)))
        writes.append(RegionAccess(vec, VIRTIO_BAR, 2, struct.pack("<H", q + 1)))
    writes.append(RegionAccess(sel, VIRTIO_BAR, 2, b"\1\0"))
    body = c.request(Command.REGION_WRITE_MULTI, WriteMulti(tuple(writes)).pack(), posted=posted)
    assert body == b""
    if posted:
        assert nothing_to_read(c, 0.05)
    for q in range(3):
        c.write_u(VIRTIO_BAR, sel, 2, q)
        assert c.read_u(VIRTIO_BAR, vec, 2) == q + 1
    # One bad entry refuses the whole message: nothing of it is applied.
    bad = (RegionAccess(vec, VIRTIO_BAR, 2, b"\5\0"), RegionAccess(0x4000, VIRTIO_BAR, 2, b"\0\0"))
    assert _errno(c.request, Command.REGION_WRITE_MULTI, WriteMulti(bad).pack()) == errno.EINVAL
    assert c.read_u(VIRTIO_BAR, vec, 2) == 3


# -- DEVICE_RESET -------------------------------------------------------------------------------


def test_device_reset_returns_function_and_device_to_power_on(vfio_server: ServerThread) -> None:
    ram = GuestRam(16 * MiB)
    ram.fill_pattern()
    guest = PciGuest(vfio_server.path, ram)
    guest.start()
    c = guest.client
    dev = vfio_server.device
    vfio_server.call(lambda: dev.set_num_pages(64))
    guest.inflate(Queue.INFLATE, list(range(600, 664)))
    guest.drv.write_config(4, 4, 64)  # actual: a posted write
    c.sync()
    assert vfio_server.call(lambda: (dev.actual, dev.tracked_frames)) == (64, 64)
    c.write_u(PciRegion.CONFIG, Cfg.COMMAND, 2, 0x0406)
    assert _errno(c.request, Command.DEVICE_RESET, b"\0") == errno.EINVAL
    c.reset()
    assert guest.drv.status() == 0
    assert vfio_server.call(lambda: (dev.actual, dev.tracked_frames, dev.num_pages)) == (0, 0, 64)
    assert c.read_u(PciRegion.CONFIG, Cfg.COMMAND, 2) == 0
    cc = guest.drv._common
    assert cc(Common.CONFIG_MSIX_VECTOR, 2) == NO_VECTOR
    for q in range(len(guest.rings)):
        cc(Common.QUEUE_SELECT, 2, q)
        assert (cc(Common.QUEUE_ENABLE, 2), cc(Common.QUEUE_MSIX_VECTOR, 2)) == (0, NO_VECTOR)
        assert cc(Common.QUEUE_SIZE, 2) == 128
    cc(Common.DRIVER_FEATURE_SELECT, 4, 1)
    assert cc(Common.DRIVER_FEATURE, 4) == 0
    # A kick after the reset does nothing: the rings are no longer the device's.
    ring = guest.rings[Queue.INFLATE]
    ring.add([ring.buffer(struct.pack("<I", 700))])
    before = ram.allocated()
    guest.drv.notify_fast(0, 0)
    c.sync()
    assert ram.allocated() == before and ram.frame_intact(700)
    guest.close()
    ram.close()


# -- unsupported commands -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        Command.DMA_READ,
        Command.DMA_WRITE,
        Command.DIRTY_PAGES,
        Command.DEVICE_FEATURE,
        Command.MIG_DATA_READ,
        Command.MIG_DATA_WRITE,
        0,
        19,
        0xFFFF,
    ],
)
def test_unsupported_commands_get_enotsup(vfio_client: VfioUserClient, command: int) -> None:
    payload = bytes(24)
    vfio_client.send_raw(Header(42, command, HEADER_SIZE + len(payload)).pack() + payload)
    header, body = vfio_client.reply()
    assert (header.msg_id, header.command) == (42, command)
    assert header.is_reply and header.is_error and header.error == errno.ENOTSUP
    assert body == b"", "an error reply is header-only"
    assert vfio_client.device_info().num_irqs >= 3


def test_limits_match_what_the_server_announces(vfio_client: VfioUserClient) -> None:
    caps = vfio_client.server_caps
    assert caps["max_msg_fds"] == MAX_MSG_FDS
    assert caps["max_data_xfer_size"] == MAX_DATA_XFER
    assert caps["max_dma_maps"] == MAX_DMA_MAPS


def test_dma_space_refuses_maps_past_its_byte_budget() -> None:
    """What a device keeps per mapped page grows with the windows: their total is capped."""
    space = DmaSpace(max_maps=8, max_bytes=8 * MiB)
    fd = os.memfd_create("budget")
    os.ftruncate(fd, 8 * MiB)
    extra = os.dup(fd)
    try:
        for gpa in (0, 4 * MiB):
            space.add(DmaMap(32, 3, gpa, gpa, 4 * MiB), os.dup(fd))
        with pytest.raises(CommandError) as err:
            space.add(DmaMap(32, 3, 0, 8 * MiB, 4096), extra)
        assert err.value.errno == errno.ENOSPC and len(space.windows) == 2
    finally:
        for w in space.clear():
            w.close()
        os.close(extra)
        os.close(fd)
