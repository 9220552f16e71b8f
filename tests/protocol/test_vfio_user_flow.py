"""End to end through the driver double: what a Linux guest behind QEMU's vfio-user-pci
does, and what the host gets back."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest

from device import Feature, Queue
from device.defs import FRAME_SIZE, STAT_NAMES, StatTag, Status
from device.testing import GuestRam, MiB
from tests.protocol.vfio_rig import (
    PciGuest,
    ServerThread,
    data_at,
    hang_up,
    mapped,
    serves_a_fresh_client,
    wait_for,
)
from vfio_user.messages import IrqSetFlag, PciIrq, PciRegion
from virtio_pci.layout import STATUS_INTERRUPT, Cfg, Common

RAM = 64 * MiB


@pytest.fixture
def ram() -> Iterator[GuestRam]:
    r = GuestRam(RAM, name="flow-ram")
    r.fill_pattern()
    yield r
    r.close()


@pytest.fixture
def guest(vfio_server: ServerThread, ram: GuestRam) -> Iterator[PciGuest]:
    g = PciGuest(vfio_server.path, ram)
    g.start()
    yield g
    g.close()


def test_negotiation_reaches_driver_ok_with_every_offered_queue(
    guest: PciGuest, vfio_server: ServerThread
) -> None:
    dev = vfio_server.device
    assert guest.features == dev.offered_features and guest.features & Feature.VERSION_1
    assert guest.drv.status() == Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | 4
    running, layout = vfio_server.call(lambda: (dev.running, dev.layout))
    assert running and len(layout.queues) == len(guest.rings)
    assert guest.drv._common(Common.NUM_QUEUES, 2) == len(guest.rings)


def test_inflate_through_notify_and_msix_punches_the_memfd(
    guest: PciGuest, vfio_server: ServerThread, ram: GuestRam
) -> None:
    before = ram.allocated()
    pfns = list(range(2048, 2048 + 1024))
    guest.inflate(Queue.INFLATE, pfns)
    assert before - ram.allocated() == len(pfns) * FRAME_SIZE
    assert not data_at(ram.fd, 2048 * FRAME_SIZE) and not data_at(ram.fd, 3071 * FRAME_SIZE)
    assert data_at(ram.fd, 2047 * FRAME_SIZE) and data_at(ram.fd, 3072 * FRAME_SIZE)
    for f in range(0, guest.data_frames, 61):
        if f not in range(2048, 3072):
            assert ram.frame_intact(f), f"frame {f} outside the request changed"
    assert vfio_server.call(lambda: vfio_server.device.tracked_frames) == len(pfns)
    # Deflate: nothing to give back, nothing else changes; the record goes.
    after = ram.allocated()
    guest.inflate(Queue.DEFLATE, pfns)
    assert ram.allocated() == after
    assert vfio_server.call(lambda: vfio_server.device.tracked_frames) == 0
    ram.mapping[2048 * FRAME_SIZE] = 1  # the guest uses the page again: allocated again
    assert data_at(ram.fd, 2048 * FRAME_SIZE)


def test_target_change_interrupts_on_the_config_vector(
    guest: PciGuest, vfio_server: ServerThread
) -> None:
    drv = guest.drv
    gen = drv._common(Common.CONFIG_GENERATION, 1)
    vfio_server.call(lambda: vfio_server.device.set_num_pages(300))
    assert drv.wait_config_interrupt(), "no config interrupt on MSI-X vector 0"
    assert drv.read_config(0, 4) == 300
    assert drv._common(Common.CONFIG_GENERATION, 1) != gen
    guest.inflate(Queue.INFLATE, list(range(4096, 4396)))
    drv.write_config(4, 4, 300)  # actual
    guest.client.sync()
    assert vfio_server.call(lambda: vfio_server.device.actual) == 300


def test_stats_and_free_page_reporting(
    guest: PciGuest, vfio_server: ServerThread, ram: GuestRam
) -> None:
    dev = vfio_server.device
    ring = guest.rings[Queue.STATS]
    values = {int(t): 11 * int(t) + 1 for t in StatTag}
    ring.add([ring.buffer(b"".join(struct.pack("<HQ", t, v) for t, v in values.items()))])
    guest.drv.notify(guest.index(Queue.STATS))
    want = {STAT_NAMES[StatTag(t)]: v for t, v in values.items()}
    wait_for(lambda: vfio_server.call(lambda: dict(dev.stats.values)) == want, "the stats")
    assert vfio_server.call(dev.request_stats) is True
    assert guest.drv.wait_queue_interrupt(guest.index(Queue.STATS))
    assert len(ring.get_used()) == 1
    before = ram.allocated()
    used = guest.post(Queue.REPORTING, [], [(4 * MiB, 4 * MiB), (16 * MiB, 2 * MiB)])
    assert used[0][1] == 0
    assert before - ram.allocated() == 6 * MiB
    assert not data_at(ram.fd, 4 * MiB) and not data_at(ram.fd, 17 * MiB)
    assert ram.frame_intact(8 * MiB // FRAME_SIZE) and ram.frame_intact(4 * MiB // FRAME_SIZE - 1)
    assert ram.frame_intact(18 * MiB // FRAME_SIZE)


def test_stats_buffer_queued_before_driver_ok_is_seen(
    vfio_server: ServerThread, ram: GuestRam
) -> None:
    """Linux queues and notifies its first stats buffer before DRIVER_OK."""
    g = PciGuest(vfio_server.path, ram)
    d = g.drv
    d.attach()
    g.probe(driver_ok=False)
    ring = g.rings[Queue.STATS]
    ring.add([ring.buffer(struct.pack("<HQ", StatTag.MEMFREE, 1234))])
    d.notify(g.index(Queue.STATS))
    g.client.sync()
    dev = vfio_server.device
    assert vfio_server.call(lambda: dev.metrics.stats_updates) == 0, "not before DRIVER_OK"
    d.driver_ok()
    wait_for(lambda: vfio_server.call(lambda: dev.metrics.stats_updates) == 1, "the stats")
    g.close()


def test_guest_reset_through_status_zero_then_renegotiation(
    guest: PciGuest, vfio_server: ServerThread, ram: GuestRam
) -> None:
    guest.inflate(Queue.INFLATE, list(range(5000, 5100)))
    guest.drv.set_status(0)
    assert guest.drv.status() == 0
    assert vfio_server.call(lambda: vfio_server.device.tracked_frames) == 0
    guest.probe()  # Linux probes again on the same connection
    before = ram.allocated()
    guest.inflate(Queue.INFLATE, list(range(5200, 5216)))
    assert before - ram.allocated() == 16 * FRAME_SIZE


def test_ram_unmapped_and_mapped_again_under_running_rings(
    guest: PciGuest, vfio_server: ServerThread, ram: GuestRam
) -> None:
    """The firmware's PAM toggling: DMA_UNMAP then DMA_MAP (a fresh fd) of the RAM holding
    the rings; a notify in the gap is not lost."""
    guest.client.dma_unmap(0, RAM)
    assert mapped("flow-ram") == 1
    ring = guest.rings[Queue.INFLATE]
    ring.add([ring.buffer(struct.pack("<4I", 6000, 6001, 6002, 6003))])
    guest.drv.notify(guest.index(Queue.INFLATE))
    guest.client.sync()
    assert ram.frame_intact(6000)
    guest.drv.map_ram()
    assert guest.drv.wait_queue_interrupt(guest.index(Queue.INFLATE)), "the buffer was lost"
    assert ring.get_used() and ram.frame_zero(6000) and ram.frame_zero(6003)
    assert not vfio_server.call(lambda: vfio_server.device.snapshot().broken_queues)


def test_client_gone_stops_the_device_and_the_next_vm_starts_clean(
    guest: PciGuest, vfio_server: ServerThread
) -> None:
    dev = vfio_server.device
    vfio_server.call(lambda: dev.set_num_pages(100))
    guest.inflate(Queue.INFLATE, list(range(7000, 7100)))
    guest.drv.write_config(4, 4, 100)
    hang_up(vfio_server, guest.client)
    assert mapped("flow-ram") == 1
    assert vfio_server.call(lambda: (dev.running, dev.tracked_frames)) == (False, 0)
    serves_a_fresh_client(vfio_server)
    assert vfio_server.call(lambda: dev.num_pages) == 100, "the target is the operator's"


def test_intx_path_isr_read_clears_and_lowers_unmask_refires(
    vfio_server: ServerThread, ram: GuestRam
) -> None:
    """``pci=nomsi``: interrupts on INTx; reading ISR acknowledges and lowers the line
    (PCI status bit 3 follows it); QEMU unmasks after each EOI."""
    g = PciGuest(vfio_server.path, ram, msix=False)
    g.start()
    d, c = g.drv, g.client
    assert d.intx is not None
    before = ram.allocated()
    g.inflate(Queue.INFLATE, list(range(8000, 8512)))  # each wait: ISR read + UNMASK
    assert before - ram.allocated() == 512 * FRAME_SIZE
    ring = g.rings[Queue.DEFLATE]
    ring.add([ring.buffer(struct.pack("<I", 8000))])
    d.notify(g.index(Queue.DEFLATE))
    assert _wait(d.intx), "no INTx"
    status = c.read_u(PciRegion.CONFIG, Cfg.STATUS, 2)
    assert status & STATUS_INTERRUPT, "the line is up: PCI status says so"
    # Still masked (automasked) and still up: an UNMASK before the ISR read fires again.
    c.set_irqs(PciIrq.INTX, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_UNMASK, 0, 1)
    assert _wait(d.intx), "a line still up fires again on unmask"
    assert d.read_isr() == 1, "ISR bit 0: a queue interrupt"
    assert d.read_isr() == 0, "reading ISR cleared it"
    assert not c.read_u(PciRegion.CONFIG, Cfg.STATUS, 2) & STATUS_INTERRUPT
    c.set_irqs(PciIrq.INTX, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_UNMASK, 0, 1)
    assert not _wait(d.intx, 0.05), "the line is down: no interrupt after the unmask"
    assert ring.get_used()
    # A config change on INTx: ISR bit 1.
    vfio_server.call(lambda: vfio_server.device.set_num_pages(8))
    assert d.wait_config_interrupt()
    g.close()


def test_intx_disable_in_the_command_register_holds_the_line(
    vfio_server: ServerThread, ram: GuestRam
) -> None:
    g = PciGuest(vfio_server.path, ram, msix=False)
    g.start()
    d, c = g.drv, g.client
    assert d.intx is not None
    c.write_u(PciRegion.CONFIG, Cfg.COMMAND, 2, 0x0406)  # INTx Disable
    ring = g.rings[Queue.DEFLATE]
    ring.add([ring.buffer(struct.pack("<I", 8000))])
    d.notify(g.index(Queue.DEFLATE))
    wait_for(lambda: ring.used_idx() == 1, "the deflate buffer used")
    assert not _wait(d.intx, 0.05), "INTx is disabled"
    assert d.read_isr() == 1
    g.close()


def test_intx_line_is_down_after_device_reset(vfio_server: ServerThread, ram: GuestRam) -> None:
    """A reset returns ISR to 0: an UNMASK after it must not fire a stale interrupt."""
    g = PciGuest(vfio_server.path, ram, msix=False)
    g.start()
    d, c = g.drv, g.client
    assert d.intx is not None
    ring = g.rings[Queue.DEFLATE]
    ring.add([ring.buffer(struct.pack("<I", 8000))])
    d.notify(g.index(Queue.DEFLATE))
    assert _wait(d.intx)
    c.reset()
    c.set_irqs(PciIrq.INTX, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_UNMASK, 0, 1)
    assert not _wait(d.intx, 0.05), "a stale INTx after the reset"
    g.close()


def _wait(fd: int, timeout: float = 5.0) -> bool:
    import select

    r, _, _ = select.select([fd], [], [], timeout)
    if r:
        os.eventfd_read(fd)
    return bool(r)


# -- a driver that gets it wrong: the queue breaks, never the connection -----------------------


def test_queue_size_not_a_power_of_two_breaks_that_queue_only(
    vfio_server: ServerThread, ram: GuestRam
) -> None:
    g = PciGuest(vfio_server.path, ram)
    d = g.drv
    d.attach()
    g.probe(driver_ok=False)
    deflate = g.index(Queue.DEFLATE)
    # Re-probe with a bad size on the deflate queue (the ring is still laid out for 64).
    d.negotiate()
    for index, ring in enumerate(g.rings.values()):
        d.setup_queue(index, ring)
    d._common(Common.CONFIG_MSIX_VECTOR, 2, 0)  # Linux routes config before the queues
    d._common(Common.QUEUE_SELECT, 2, deflate)
    d._common(Common.QUEUE_SIZE, 2, 60)
    for index in range(len(g.rings)):
        d.enable_queue(index)
    d.driver_ok()
    assert d.wait_config_interrupt(), "a broken queue asks for a reset with a config interrupt"
    assert d.status() & Status.DEVICE_NEEDS_RESET
    assert deflate in vfio_server.call(lambda: vfio_server.device.snapshot().broken_queues)
    before = ram.allocated()
    g.inflate(Queue.INFLATE, [900, 901, 902])  # the other queues and the connection work
    assert before - ram.allocated() == 3 * FRAME_SIZE
    g.close()


def test_enabling_a_queue_of_a_feature_not_negotiated_breaks_it(
    vfio_server: ServerThread, ram: GuestRam
) -> None:
    g = PciGuest(vfio_server.path, ram, features=int(Feature.VERSION_1))
    g.start()
    d = g.drv
    assert len(g.rings) == 2
    d._common(Common.QUEUE_SELECT, 2, 2)
    assert d._common(Common.QUEUE_SIZE, 2) == 0, "no queue 2 with these features"
    d.enable_queue(2)
    assert d.wait_config_interrupt()
    assert d.status() & Status.DEVICE_NEEDS_RESET
    before = ram.allocated()
    g.inflate(Queue.INFLATE, [950])
    assert before - ram.allocated() == FRAME_SIZE
    g.close()


def test_rings_outside_guest_ram_do_nothing_harmful(
    vfio_server: ServerThread, ram: GuestRam
) -> None:
    g = PciGuest(vfio_server.path, ram)
    g.start()
    d = g.drv
    d.set_status(0)
    d.negotiate()
    for index, ring in enumerate(g.rings.values()):
        d.setup_queue(index, ring)
    d._common(Common.QUEUE_SELECT, 2, 0)
    for lo in (Common.QUEUE_DESC_LO, Common.QUEUE_DRIVER_LO, Common.QUEUE_DEVICE_LO):
        d._common(Common(lo + 4), 4, 0x100)  # 1 TiB up: no DMA window there
    for index in range(len(g.rings)):
        d.enable_queue(index)
    d.driver_ok()
    before = ram.allocated()
    for _ in range(3):
        d.notify(0)
    g.client.sync()
    assert ram.allocated() == before
    used = g.post(Queue.DEFLATE, [struct.pack("<I", 960)])  # another queue still works
    assert len(used) == 1
    g.close()


def test_driver_ok_without_features_ok_needs_a_reset(
    vfio_server: ServerThread, ram: GuestRam
) -> None:
    g = PciGuest(vfio_server.path, ram)
    d = g.drv
    d.attach()
    d.set_status(0)
    d.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
    d._common(Common.CONFIG_MSIX_VECTOR, 2, 0)
    d.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.DRIVER_OK)
    status = d.status()
    assert status & Status.DEVICE_NEEDS_RESET and not status & Status.DRIVER_OK
    assert d.wait_config_interrupt(), "DEVICE_NEEDS_RESET comes with a config interrupt"
    g.probe()  # reset and start over: it works
    before = ram.allocated()
    g.inflate(Queue.INFLATE, [970])
    assert before - ram.allocated() == FRAME_SIZE
    g.close()


def test_qemu_system_reset_sequence_then_the_guest_inflates_again(
    guest: PciGuest, vfio_server: ServerThread, ram: GuestRam
) -> None:
    """QEMU 11.1 ``system_reset``: DEVICE_RESET twice, interrupts disabled and enabled
    around each; the target survives, the guest's balloon does not, the guest re-probes."""
    dev = vfio_server.device
    c, d = guest.client, guest.drv
    vfio_server.call(lambda: dev.set_num_pages(64))
    assert d.wait_config_interrupt()
    guest.inflate(Queue.INFLATE, list(range(3000, 3064)))
    none_trigger = IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER
    for _ in range(2):
        c.set_irqs(PciIrq.MSIX, none_trigger, 0, 0)
        c.set_irqs(PciIrq.INTX, none_trigger, 0, 0)
        c.reset()
        assert d.intx is not None
        c.set_irqs(PciIrq.INTX, IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER, 0, 1, [d.intx])
    assert vfio_server.call(lambda: (dev.num_pages, dev.actual, dev.tracked_frames)) == (64, 0, 0)
    for fd in d.vectors:  # the guest enables MSI-X again: fresh eventfds
        os.close(fd)
    d.vectors = []
    d.enable_msix()
    guest.probe()
    assert d.read_config(0, 4) == 64, "the target survived the reset"
    before = ram.allocated()
    guest.inflate(Queue.INFLATE, list(range(3100, 3164)))
    assert before - ram.allocated() == 64 * FRAME_SIZE
