"""Through a real socket: handshake, memory, rings, every queue, config changes."""

from __future__ import annotations

import contextlib
import os
import select
import struct
import time
from collections.abc import Iterator

import pytest

from device import Queue
from device.defs import STAT_NAMES, StatTag
from device.testing import FRAME_SIZE, GuestRam, MiB
from tests.protocol.vhost_rig import BackendThread, Guest
from vballoon.waiting import wait_until
from vhost_user.messages import BackendReq, ProtocolFeature


@pytest.fixture
def guest(backend: BackendThread, sock_path: str) -> Iterator[Guest]:
    ram = GuestRam(64 * MiB)
    ram.fill_pattern()
    g = Guest(sock_path, ram)
    g.start()
    yield g
    g.close()
    ram.close()


def test_handshake_offers(backend: BackendThread, sock_path: str) -> None:
    ram = GuestRam(16 * MiB)
    g = Guest(sock_path, ram)
    assert g.features & (1 << 32)  # VERSION_1 must come from the backend
    pf = g.fe.protocol_features
    for need in (ProtocolFeature.REPLY_ACK, ProtocolFeature.BACKEND_REQ, ProtocolFeature.CONFIG):
        assert pf & need
    for never in (
        ProtocolFeature.PAGEFAULT,
        ProtocolFeature.LOG_SHMFD,
        ProtocolFeature.INFLIGHT_SHMFD,
        ProtocolFeature.INBAND_NOTIFICATIONS,
    ):
        assert not pf & never
    assert g.fe.get_max_mem_slots() >= 8
    g.close()
    ram.close()


def test_inflate_deflate_through_kicks(guest: Guest, backend: BackendThread) -> None:
    before = guest.ram.allocated()
    pfns = list(range(2048, 2048 + 4096))
    guest.inflate(Queue.INFLATE, pfns)
    assert before - guest.ram.allocated() == 4096 * FRAME_SIZE
    for f in range(0, guest.data_frames, 31):
        if f not in range(2048, 6144):
            assert guest.ram.frame_intact(f)
    assert backend.call(lambda: backend.device.tracked_frames) == 4096
    after = guest.ram.allocated()
    guest.inflate(Queue.DEFLATE, pfns)
    assert guest.ram.allocated() == after
    assert backend.call(lambda: backend.device.tracked_frames) == 0


def test_stats_and_reports(guest: Guest, backend: BackendThread) -> None:
    ring = guest.rings[Queue.STATS]
    values = {int(t): 7 * int(t) for t in StatTag}
    ring.add([ring.buffer(b"".join(struct.pack("<HQ", t, v) for t, v in values.items()))])
    guest.notify(Queue.STATS)
    got = {}
    for _ in range(100):
        got = backend.call(lambda: dict(backend.device.stats.values))
        if got:
            break
        select.select([], [], [], 0.01)
    assert got == {STAT_NAMES[StatTag(t)]: v for t, v in values.items()}
    assert backend.call(backend.device.request_stats) is True
    assert guest.wait_call(Queue.STATS)
    assert len(ring.get_used()) == 1
    before = guest.ram.allocated()
    used = guest.post(Queue.REPORTING, [], [(4 * MiB, 4 * MiB), (16 * MiB, 2 * MiB)])
    assert used[0][1] == 0
    assert before - guest.ram.allocated() == 6 * MiB
    assert guest.ram.frame_intact(8 * MiB // FRAME_SIZE) and guest.ram.frame_zero(1024)


def test_target_change_sends_config_change(guest: Guest, backend: BackendThread) -> None:
    ch = guest.fe.backend_channel
    assert ch is not None
    backend.call(lambda: backend.device.set_num_pages(4096))
    req, flags = guest.fe.read_backend_request()
    assert req == BackendReq.CONFIG_CHANGE_MSG
    assert not flags & 0x8  # never asks for a reply: QEMU may be busy in GET_CONFIG
    assert guest.fe.get_config(0, 16)[:4] == struct.pack("<I", 4096)
    guest.fe.set_config(0, struct.pack("<IIII", 0, 4096, 0, 0))  # QEMU sends all 16 bytes
    assert backend.call(lambda: backend.device.actual) == 4096
    assert backend.call(lambda: backend.device.num_pages) == 4096


def test_get_vring_base_stops_the_ring(guest: Guest, backend: BackendThread) -> None:
    guest.inflate(Queue.INFLATE, list(range(300, 556)))
    idx = guest.index(Queue.INFLATE)
    assert guest.fe.get_vring_base(idx) == 1
    ring = guest.rings[Queue.INFLATE]
    before = guest.ram.allocated()
    ring.add([ring.buffer(struct.pack("<I", 5000))])
    guest.notify(Queue.INFLATE)  # the kick fd was closed on stop: nothing may run
    assert not guest.wait_call(Queue.INFLATE, timeout=0.3)
    assert guest.ram.allocated() == before and ring.get_used() == []


def test_held_stats_buffer_is_rewound_on_stop(guest: Guest, backend: BackendThread) -> None:
    ring = guest.rings[Queue.STATS]
    ring.add([ring.buffer(struct.pack("<HQ", 4, 1))])
    guest.notify(Queue.STATS)
    for _ in range(200):
        if backend.call(lambda: backend.device.metrics.stats_updates):
            break
        select.select([], [], [], 0.01)
    # The device holds that buffer: the base handed back makes the next start see it again.
    assert guest.fe.get_vring_base(guest.index(Queue.STATS)) == 0


def test_only_the_newest_call_fd_is_signalled(guest: Guest, backend: BackendThread) -> None:
    idx = guest.index(Queue.DEFLATE)
    new_call = os.eventfd(0, os.EFD_NONBLOCK)
    old_call = guest.call[Queue.DEFLATE]
    guest.fe.set_vring_call(idx, new_call)  # QEMU sends a second CALL after ENABLE
    guest.call[Queue.DEFLATE] = new_call
    used = guest.post(Queue.DEFLATE, [struct.pack("<I", 10)])
    assert len(used) == 1
    os.close(old_call)


def test_add_and_remove_memory_regions(backend: BackendThread, sock_path: str) -> None:
    ram = GuestRam(32 * MiB)
    extra = GuestRam(16 * MiB, gpa=1 << 32)
    extra.fill_pattern()
    g = Guest(sock_path, ram)
    g.start()
    from tests.protocol.vhost_rig import UADDR_BASE
    from vhost_user.frontend import FrontendRegion

    region = FrontendRegion(extra.gpa, extra.size, UADDR_BASE + extra.gpa, extra.fd)
    g.fe.add_mem_reg(region)
    first = extra.gpa // FRAME_SIZE
    g.inflate(Queue.INFLATE, list(range(first, first + 512)))
    assert extra.allocated() == 14 * MiB
    g.fe.rem_mem_reg(region)
    before = extra.allocated()
    g.inflate(Queue.INFLATE, list(range(first + 512, first + 1024)))  # no longer RAM: refused
    assert extra.allocated() == before
    assert backend.call(lambda: backend.device.metrics.refused_frames) == 512
    g.close()
    ram.close()
    extra.close()


def _poll_window(b: BackendThread, index: int) -> int:
    def window() -> int:
        backend = b.daemon.backend
        assert backend is not None
        return backend.runner._polls[index].window

    return b.call(window)


def test_polling_grows_with_a_quick_driver_and_catches_an_unkicked_buffer(
    sock_path: str,
) -> None:
    b = BackendThread(sock_path, busy_poll_us=300_000)
    ram = GuestRam(16 * MiB)
    ram.fill_pattern()
    g = Guest(sock_path, ram)
    g.start()
    idx = g.index(Queue.INFLATE)
    assert _poll_window(b, idx) == 0  # nothing learnt yet: no spinning
    ring = g.rings[Queue.INFLATE]
    before = ram.allocated()
    for f in range(300, 316):  # a driver that posts each buffer as the last one returns
        g.inflate(Queue.INFLATE, [f])
    ring.add([ring.buffer(struct.pack("<I", 400))])  # no kick
    assert g.wait_call(Queue.INFLATE), "the polling backend did not see the buffer"
    assert ring.get_used() and before - ram.allocated() == 17 * FRAME_SIZE
    assert _poll_window(b, idx) >= 10_000 * 2**8
    g.close()
    ram.close()
    b.stop()


def test_polling_backs_off_from_a_slow_driver(sock_path: str) -> None:
    b = BackendThread(sock_path, busy_poll_us=2000)
    ram = GuestRam(16 * MiB)
    g = Guest(sock_path, ram)
    g.start()
    idx = g.index(Queue.INFLATE)
    for f in range(300, 310):
        g.inflate(Queue.INFLATE, [f])
    assert _poll_window(b, idx) > 0
    for f in range(310, 320):  # kicks 10 ms apart: polling 2 ms would never catch one
        time.sleep(0.01)
        g.inflate(Queue.INFLATE, [f])
    assert _poll_window(b, idx) == 0, "the backend still spins for a driver that is slow"
    g.close()
    ram.close()
    b.stop()


def test_reset_device_empties_the_balloon_keeps_the_target(
    guest: Guest, backend: BackendThread
) -> None:
    backend.call(lambda: backend.device.set_num_pages(256))
    guest.inflate(Queue.INFLATE, list(range(300, 556)))
    guest.fe.set_config(4, struct.pack("<I", 256))
    assert backend.call(lambda: backend.device.tracked_frames) == 256
    guest.fe.reset_device()
    dev = backend.device
    assert backend.call(lambda: (dev.tracked_frames, dev.num_pages, dev.actual)) == (0, 256, 0)
    assert backend.call(lambda: dev.snapshot().active_queues) == ()


def test_status_reaches_the_device(backend: BackendThread, sock_path: str) -> None:
    ram = GuestRam(16 * MiB)
    g = Guest(sock_path, ram)
    g.start()
    assert g.fe.protocol_features & ProtocolFeature.STATUS
    g.fe.set_status(1 | 2 | 8 | 4)  # ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    assert backend.call(lambda: backend.device.read_status()) & 4
    g.close()
    ram.close()


@pytest.mark.parametrize("status_zero", [False, True])
def test_pause_and_resume_in_qemus_order_keep_the_guests_balloon(
    guest: Guest, backend: BackendThread, status_zero: bool
) -> None:
    """QMP ``stop``/``cont`` on QEMU 11.1: SET_VRING_ENABLE(0) on every ring first, then
    GET_VRING_BASE per ring (and SET_STATUS(0) from frontends that send it); then the start
    sequence again."""
    dev = backend.device
    backend.call(lambda: dev.set_num_pages(256))
    guest.inflate(Queue.INFLATE, list(range(300, 556)))
    guest.fe.set_config(4, struct.pack("<I", 256))
    ring = guest.rings[Queue.STATS]
    ring.add([ring.buffer(struct.pack("<HQ", StatTag.MEMFREE, 4321))])
    guest.notify(Queue.STATS)
    wait_until(lambda: backend.call(lambda: dev.metrics.stats_updates) == 1, 5, "stats")
    bases = guest.pause(status_zero)
    state = backend.call(
        lambda: (dev.tracked_frames, dev.actual, dev.snapshot().active_queues, dev.running)
    )
    assert state == (0, 256, (), False), "stopped: the record goes, what the guest holds stays"
    assert bool(guest.fe.get_status() & 8) is not status_zero  # FEATURES_OK kept unless reset
    assert bases[Queue.STATS] == 0, "the held stats buffer is handed back by rewinding"
    guest.resume(bases)
    assert backend.call(lambda: (dev.running, dev.actual, dev.num_pages)) == (True, 256, 256)
    # The held stats buffer was seen again: the guest's stats arrive once more.
    wait_until(lambda: backend.call(lambda: dev.metrics.stats_updates) == 2, 5, "stats again")
    before = guest.ram.allocated()
    guest.inflate(Queue.INFLATE, list(range(600, 728)))
    assert before - guest.ram.allocated() == 128 * FRAME_SIZE


def test_stopping_every_ring_forgets_the_balloon(guest: Guest, backend: BackendThread) -> None:
    """Guest reset and VM pause look alike: a stale partial huge page must never complete."""
    guest.inflate(Queue.INFLATE, list(range(300, 556)))
    assert backend.call(lambda: backend.device.tracked_frames) == 256
    for index in range(len(guest.layout)):
        guest.fe.get_vring_base(index)
    assert backend.call(lambda: backend.device.tracked_frames) == 0
    assert not backend.call(lambda: backend.device.is_ballooned(300 * FRAME_SIZE))


def test_misaligned_rings_break_the_queue_not_the_connection(
    backend: BackendThread, sock_path: str
) -> None:
    from tests.protocol.vhost_rig import UADDR_BASE

    ram = GuestRam(16 * MiB)
    g = Guest(sock_path, ram)
    g.start()
    idx = g.index(Queue.DEFLATE)
    g.fe.get_vring_base(idx)
    ring = g.rings[Queue.DEFLATE]
    g.fe.set_vring_addr(
        idx, UADDR_BASE + ring.desc + 8, UADDR_BASE + ring.avail, UADDR_BASE + ring.used
    )
    kick = os.eventfd(1, os.EFD_NONBLOCK)
    g.fe.set_vring_kick(idx, kick)  # the guest's misaligned table: that queue breaks
    assert idx in backend.call(lambda: set(backend.device.snapshot().broken_queues))
    assert backend.call(lambda: backend.device.read_status()) & 64  # DEVICE_NEEDS_RESET
    g.inflate(Queue.INFLATE, [7])  # the connection and the other queues still work
    os.close(kick)
    g.close()
    ram.close()


def test_a_bad_ring_size_breaks_that_queue_not_the_connection(
    backend: BackendThread, sock_path: str
) -> None:
    """The ring size may be the guest's choice (virtio-pci lets the driver shrink it)."""
    ram = GuestRam(16 * MiB)
    g = Guest(sock_path, ram)
    g.start()
    idx = g.index(Queue.DEFLATE)
    g.fe.get_vring_base(idx)
    err = os.eventfd(0, os.EFD_NONBLOCK)
    g.fe.set_vring_err(idx, err)
    g.fe.set_vring_num(idx, 60)
    kick = os.eventfd(1, os.EFD_NONBLOCK)
    g.fe.set_vring_kick(idx, kick)
    assert idx in backend.call(lambda: set(backend.device.snapshot().broken_queues))
    assert os.eventfd_read(err) == 1  # the frontend is told on the ring's error eventfd
    g.inflate(Queue.INFLATE, [300])  # the connection and the other queues still work
    os.close(kick)
    os.close(err)
    g.close()
    ram.close()


def test_memory_table_gap_keeps_the_kick(guest: Guest, backend: BackendThread) -> None:
    """REM_MEM_REG then ADD_MEM_REG while the rings run (QEMU's delta updates)."""
    from tests.protocol.vhost_rig import UADDR_BASE
    from vhost_user.frontend import FrontendRegion

    region = FrontendRegion(guest.ram.gpa, guest.ram.size, UADDR_BASE + guest.ram.gpa, guest.ram.fd)
    guest.fe.rem_mem_reg(region)
    ring = guest.rings[Queue.INFLATE]
    ring.add([ring.buffer(struct.pack("<I", 50))])
    guest.notify(Queue.INFLATE)  # lands while the ring is outside the map
    assert not guest.wait_call(Queue.INFLATE, timeout=0.3)
    guest.fe.add_mem_reg(region)
    assert guest.wait_call(Queue.INFLATE), "the buffer was lost in the gap"
    assert ring.get_used() and not backend.call(lambda: backend.device.snapshot().broken_queues)


def test_rem_mem_reg_may_carry_an_fd(guest: Guest, backend: BackendThread) -> None:
    from tests.protocol.vhost_rig import UADDR_BASE
    from vhost_user.messages import FrontendReq, MemRegion, SingleRegion

    extra = GuestRam(4 * MiB, gpa=1 << 32)
    from vhost_user.frontend import FrontendRegion

    region = FrontendRegion(extra.gpa, extra.size, UADDR_BASE + extra.gpa, extra.fd)
    guest.fe.add_mem_reg(region)
    body = SingleRegion(MemRegion(extra.gpa, extra.size, UADDR_BASE + extra.gpa, 0)).pack()
    guest.fe.request(FrontendReq.REM_MEM_REG, body, [extra.fd])
    guest.inflate(Queue.INFLATE, [9])  # still connected
    extra.close()


def test_trickled_message_times_out_as_a_whole(
    backend: BackendThread, sock_path: str, monkeypatch
) -> None:
    import time

    from vhost_user import connection

    monkeypatch.setattr(connection, "BODY_TIMEOUT", 0.5)
    from vhost_user.frontend import VhostUserFrontend

    fe = VhostUserFrontend(sock_path)
    fe.conn.sock.sendall(struct.pack("<III", 2, 1, 8))  # SET_FEATURES, 8-byte body...
    t0 = time.monotonic()
    try:
        for _ in range(8):  # ...one byte every 0.2 s: 1.6 s in all
            fe.conn.sock.send(b"\0")
            time.sleep(0.2)
    except (BrokenPipeError, ConnectionResetError):
        pass
    fe.conn.sock.settimeout(3)
    with contextlib.suppress(ConnectionResetError):  # closed with our bytes unread
        assert fe.conn.sock.recv(1) == b""
    assert time.monotonic() - t0 < 1.5
    fe.close()


def test_half_a_message_then_silence_holds_only_that_connection(
    backend: BackendThread, sock_path: str, monkeypatch
) -> None:
    """The process used to wait in recv for the rest of the message: rings, control socket
    and signals with it, 5 s a time, again and again."""
    import time

    from vhost_user import connection
    from vhost_user.frontend import VhostUserFrontend

    monkeypatch.setattr(connection, "BODY_TIMEOUT", 1.0)
    fe = VhostUserFrontend(sock_path)
    fe.conn.sock.sendall(struct.pack("<III", 2, 1, 8)[:7])  # half a header, then nothing
    time.sleep(0.1)
    t0 = time.monotonic()
    assert backend.call(lambda: 1) == 1
    assert time.monotonic() - t0 < 0.5, "the backend waits for the rest of the message"
    wait_until(lambda: "disconnected" in backend.events, 5, "the silent frontend dropped")
    assert time.monotonic() - t0 < 3
    fe.close()
