"""A frontend dies mid-stream; the next one resumes: nothing lost, nothing done twice."""

from __future__ import annotations

import struct

import pytest

from device import Queue
from device.testing import FRAME_SIZE, GuestRam, MiB
from tests.protocol.vhost_rig import BackendThread, Guest, reconnect
from vballoon.waiting import wait_until


@pytest.mark.parametrize("kick_before_death", [False, True])
def test_frontend_dies_mid_stream(
    backend: BackendThread, sock_path: str, kick_before_death: bool
) -> None:
    ram = GuestRam(64 * MiB)
    ram.fill_pattern()
    g = Guest(sock_path, ram)
    g.start()
    inflate, report = g.rings[Queue.INFLATE], g.rings[Queue.REPORTING]
    # 20 inflate buffers go through completely.
    first = list(range(1000, 1000 + 20 * 64))
    for i in range(20):
        g.post(Queue.INFLATE, [struct.pack("<64I", *first[64 * i : 64 * (i + 1)])])
    # Then a stream the backend may or may not finish before the frontend dies.
    second = list(range(4000, 4000 + 30 * 64))
    for i in range(30):
        inflate.add([inflate.buffer(struct.pack("<64I", *second[64 * i : 64 * (i + 1)]))])
    reports = [(2 * MiB * k, 2 * MiB) for k in (10, 11, 12, 13, 14, 15)]
    for gpa, n in reports:
        report.add([], [(gpa, n)])
    if kick_before_death:
        g.notify(Queue.INFLATE)
        g.notify(Queue.REPORTING)
    g.fe.conn.close()  # dies without a goodbye
    wait_until(lambda: "disconnected" in backend.events, 5, "the disconnect", 0.005)

    returned = {h for h, _ in inflate.get_used()}
    report_used = len(report.get_used())
    # The guest reuses what came back: pages of returned inflate buffers are written again
    # (as after a deflate), pages of returned reports too. A re-run would destroy them.
    done_frames = first + [p for i, p in enumerate(second) if i // 64 < len(returned)]
    for f in done_frames:
        ram.mapping[f * FRAME_SIZE : f * FRAME_SIZE + 8] = struct.pack("<Q", 0xC0FFEE)
    for gpa, _ in reports[:report_used]:
        ram.mapping[gpa : gpa + 8] = struct.pack("<Q", 0xC0FFEE)

    reconnect(g, sock_path)
    wait_until(
        lambda: inflate.used_idx() == 50 and report.used_idx() == 6, 5, "every buffer", 0.005
    )
    for f in done_frames:
        assert ram.mapping[f * FRAME_SIZE : f * FRAME_SIZE + 8] == struct.pack("<Q", 0xC0FFEE)
    for gpa, _ in reports[:report_used]:
        assert ram.mapping[gpa : gpa + 8] == struct.pack("<Q", 0xC0FFEE)
    # Buffers not returned before the death were processed after the restart.
    for f in second[64 * len(returned) :]:
        assert ram.frame_zero(f)
    # Every frame was processed exactly once, across both connections ...
    dev = backend.device
    assert backend.call(lambda: dev.metrics.inflated_frames) == len(first) + len(second)
    # ... and the device's own record restarted with the new frontend (a stop forgets it).
    assert backend.call(lambda: dev.tracked_frames) == 64 * (30 - len(returned))
    assert backend.call(lambda: backend.device.metrics.reports) == 6
    assert backend.daemon.connections == 2
    g.close()
    ram.close()
