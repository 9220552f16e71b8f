"""The device's lifecycle: the status register's rules, stop against reset, interrupts."""

from __future__ import annotations

import struct

import pytest

from device import BalloonConfig, BalloonDevice, ConfigError, Feature, Queue, Status, queue_layout
from device.testing import FRAME_SIZE, GuestRam, MiB, RecordingInterrupts
from tests.conftest import Rig

ACK_DRIVER = Status.ACKNOWLEDGE | Status.DRIVER


def stats_buffer(values: dict[int, int]) -> bytes:
    return b"".join(struct.pack("<HQ", t, v) for t, v in values.items())


def fresh_device() -> tuple[BalloonDevice, RecordingInterrupts]:
    irq = RecordingInterrupts()
    return BalloonDevice(BalloonConfig(stats_interval=0), irq), irq


def test_the_spec_sequence_through_the_status_register(ram: GuestRam) -> None:
    """ACKNOWLEDGE, DRIVER, features, FEATURES_OK (read back), queues, DRIVER_OK."""
    rig = Rig(ram, activate=False)  # FEATURES_OK through negotiate, queues set up
    dev = rig.dev
    dev.reset()
    assert dev.read_status() == 0 and not dev.negotiated
    dev.set_status(Status.ACKNOWLEDGE)
    dev.set_status(ACK_DRIVER)
    feats = Feature.VERSION_1 | Feature.STATS_VQ
    dev.write_driver_features(feats)
    dev.set_status(ACK_DRIVER | Status.FEATURES_OK)
    assert dev.read_status() & Status.FEATURES_OK, "the driver reads FEATURES_OK back"
    assert dev.layout.queues == (Queue.INFLATE, Queue.DEFLATE, Queue.STATS)
    ring = rig.rings["inflate"]
    dev.start_queue(0, ring.device_queue())
    ring.add([ring.buffer(struct.pack("<I", 7))])
    assert dev.queue_notify(0) is False and ring.get_used() == []  # not before DRIVER_OK
    dev.set_status(ACK_DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)
    assert ring.get_used() != [] and dev.running  # DRIVER_OK processed what was queued
    rig.close()


def test_refused_features_are_never_in_force() -> None:
    dev, _ = fresh_device()
    with pytest.raises(ConfigError):
        dev.negotiate(dev.offered_features | (1 << 40))
    assert dev.driver_features == 0 and dev.read_status() == 0
    assert not dev.has(Feature.STATS_VQ)


def test_features_not_offered_are_refused_at_features_ok() -> None:
    dev, _ = fresh_device()
    cfg_off = BalloonDevice(BalloonConfig(stats=False, stats_interval=0))
    for d in (dev, cfg_off):
        d.set_status(ACK_DRIVER)
        d.write_driver_features(Feature.VERSION_1 | Feature.STATS_VQ | (1 << 40))
        d.set_status(ACK_DRIVER | Status.FEATURES_OK)
        assert not d.read_status() & Status.FEATURES_OK, "FEATURES_OK must read back clear"
        assert d.layout == queue_layout(d.offered_features)  # unchanged: the offered one
        with pytest.raises(ConfigError):
            d.negotiate(Feature.VERSION_1 | (1 << 40))


def test_features_are_fixed_after_features_ok() -> None:
    dev, _ = fresh_device()
    dev.write_driver_features(Feature.VERSION_1)
    dev.set_status(ACK_DRIVER | Status.FEATURES_OK)
    dev.write_driver_features(Feature.VERSION_1 | Feature.STATS_VQ)
    assert dev.driver_features == Feature.VERSION_1
    assert dev.layout.index(Queue.STATS) is None


def test_driver_ok_without_features_ok_needs_reset() -> None:
    dev, irq = fresh_device()
    dev.set_status(ACK_DRIVER | Status.DRIVER_OK)
    st = dev.read_status()
    assert not st & Status.DRIVER_OK and st & Status.DEVICE_NEEDS_RESET
    assert irq.configs == 1 and not dev.running
    with pytest.raises(ConfigError):
        dev.activate()


def test_needs_reset_is_the_devices_bit(prig: Rig) -> None:
    dev = prig.dev
    before = dev.read_status()
    dev.set_status(before | Status.DEVICE_NEEDS_RESET)  # a driver cannot set it
    assert dev.read_status() == before
    prig.rings["inflate"].set_avail_idx(1000)  # a corrupt ring: the device sets it
    prig.kick("inflate")
    assert dev.read_status() & Status.DEVICE_NEEDS_RESET
    dev.set_status(before)  # ... and a driver cannot clear it, except by a reset
    assert dev.read_status() & Status.DEVICE_NEEDS_RESET
    dev.set_status(0)
    assert dev.read_status() == 0


def test_clearing_a_bit_without_reset_is_ignored(prig: Rig) -> None:
    dev = prig.dev
    dev.set_status(Status.ACKNOWLEDGE)
    assert dev.read_status() & Status.DRIVER_OK and dev.running


def test_failed_stops_servicing_until_reset(prig: Rig) -> None:
    dev = prig.dev
    dev.set_status(dev.read_status() | Status.FAILED)
    assert not dev.running
    ring = prig.rings["inflate"]
    ring.add([ring.buffer(struct.pack("<I", 9))])
    assert prig.kick("inflate") is False and ring.get_used() == []
    before = prig.ram.allocated()
    dev.set_status(0)
    assert not dev.running and prig.ram.allocated() == before  # nothing discarded
    # After the reset a new driver brings it up again and it serves the queue.
    dev.negotiate(dev.offered_features)
    dev.start_queue(prig.index("inflate"), ring.device_queue())
    dev.activate()  # DRIVER_OK serves what waited: the PFN 9 buffer
    assert [h for h, _ in ring.get_used()] == [0]
    prig.pfns("inflate", [300])
    assert before - prig.ram.allocated() == 2 * FRAME_SIZE


def test_stop_keeps_what_the_guest_holds_reset_does_not(prig: Rig) -> None:
    rig = prig
    dev = rig.dev
    changes: list[int] = []
    dev.watch_actual(changes.append)
    dev.set_num_pages(300)
    rig.pfns("inflate", list(range(300, 600)))
    dev.write_config(4, struct.pack("<I", 300))
    dev.write_config(12, struct.pack("<I", 0x55))
    ring = rig.rings["stats"]
    ring.add([ring.buffer(stats_buffer({4: 1234}))])
    rig.kick("stats")
    assert dev.tracked_frames == 300
    dev.stop()
    snap = dev.snapshot()
    assert (snap.actual, snap.num_pages, snap.poison_val) == (300, 300, 0x55)
    assert snap.stats == {"stat-free-memory": 1234}
    assert snap.tracked_frames == 0, "a stop may be a reset in disguise: the record goes"
    assert snap.status == 0 and not snap.running and snap.active_queues == ()
    assert changes == [300], "a stop is no change of what the guest holds"
    dev.reset()
    snap = dev.snapshot()
    # The guest's balloon is gone with its driver; the target is the operator's.
    assert (snap.actual, snap.num_pages, snap.poison_val, snap.status) == (0, 300, 0, 0)
    assert snap.stats == {} and changes == [300, 0]
    assert snap.driver_features == 0 and dev.layout.index(Queue.STATS) == 2  # offered layout
    assert not dev.is_ballooned(350 * FRAME_SIZE)


def test_the_last_queue_to_stop_suspends_the_device(prig: Rig) -> None:
    """Whichever message stops it (vhost-user's ENABLE(0) comes before GET_VRING_BASE)."""
    dev = prig.dev
    prig.pfns("inflate", list(range(300, 400)))
    prig.rings["deflate"].set_avail_idx(1000)  # a corrupt ring: broken, NEEDS_RESET
    prig.kick("deflate")
    indices = list(range(len(prig.rings)))
    for i in indices[:-1]:
        dev.stop_queue(i)
        assert dev.tracked_frames == 100 and dev.running
    dev.stop_queue(indices[-1])
    assert dev.tracked_frames == 0 and not dev.is_ballooned(350 * FRAME_SIZE)
    assert dev.stop_queue(indices[-1]) is None  # already stopped
    snap = dev.snapshot()
    assert not snap.running and snap.broken_queues == ()
    assert snap.status == Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK
    assert snap.driver_features == dev.offered_features, "negotiation is kept for the restart"
    # The transport restarts a queue and says DRIVER_OK: it serves again.
    ring = prig.rings["inflate"]
    dev.start_queue(prig.index("inflate"), ring.device_queue(next_avail=ring.avail_idx))
    dev.activate()
    prig.pfns("inflate", [500])
    assert dev.tracked_frames == 1


def test_negotiate_refuses_while_queues_run(prig: Rig) -> None:
    with pytest.raises(ConfigError, match="while queues run"):
        prig.dev.negotiate(Feature.VERSION_1)


def test_interrupts_attach_and_detach(prig: Rig) -> None:
    dev = prig.dev
    dev.detach()
    dev.set_num_pages(5)
    assert prig.irq.configs == 0
    other = RecordingInterrupts()
    dev.attach(other)
    dev.set_num_pages(6)
    prig.pfns("inflate", [3])
    assert other.configs == 1 and other.queues == [prig.index("inflate")]


def test_snapshot_is_a_copy(prig: Rig) -> None:
    snap = prig.dev.snapshot()
    prig.pfns("inflate", list(range(16)))
    assert snap.counters["inflated_frames"] == 0
    assert prig.dev.snapshot().counters["inflated_frames"] == 16
    assert snap.ram_size == 64 * MiB
