"""Target changes while the frontend is busy in synchronous config traffic never stall."""

from __future__ import annotations

import struct
import threading
import time

from device.testing import GuestRam, MiB
from tests.protocol.vhost_rig import BackendThread, Guest
from vhost_user.messages import NEED_REPLY, BackendReq


def test_target_changes_during_sync_config_traffic(backend: BackendThread, sock_path: str) -> None:
    ram = GuestRam(16 * MiB)
    g = Guest(sock_path, ram)
    g.start()
    stop = threading.Event()
    changes = 0

    def host_changes_target() -> None:
        nonlocal changes
        while not stop.is_set():
            changes += 1
            backend.call(lambda n=changes: backend.device.set_num_pages(n % 1000 + 1))

    t = threading.Thread(target=host_changes_target)
    t.start()
    # Like a vCPU writing `actual` and reading the config back, never reading the backend channel.
    worst = 0.0
    for i in range(300):
        t0 = time.monotonic()
        g.fe.set_config(0, struct.pack("<IIII", 0, i, 0, 0))
        g.fe.get_config(0, 16)
        worst = max(worst, time.monotonic() - t0)
    stop.set()
    t.join()
    assert changes > 10
    # A stall would be the backend waiting for a reply on the channel (seconds); allow slack.
    assert worst < 1.0, f"a config round trip took {worst:.2f} s"
    assert backend.call(lambda: backend.device.actual) == 299
    # The channel filled up while nobody read it: the backend coalesced the rest into one
    # pending message instead of blocking. Reading frees room and the pending one follows.
    ch = g.fe.backend_channel
    assert ch is not None
    data = b""
    ch.settimeout(2.0)
    try:
        while True:
            data += ch.recv(65536)
    except TimeoutError:
        pass
    msgs = [struct.unpack_from("<III", data, off) for off in range(0, len(data), 12)]
    assert len(data) % 12 == 0 and msgs
    assert all(r == BackendReq.CONFIG_CHANGE_MSG and not f & NEED_REPLY for r, f, _ in msgs)
    final = backend.call(lambda: backend.device.num_pages)
    assert g.fe.get_config(0, 4) == struct.pack("<I", final)
    if len(msgs) < changes:  # coalesced: the last message came after the last change
        assert backend.call(lambda: backend.device.metrics.config_interrupts) == changes
    g.close()
    ram.close()
