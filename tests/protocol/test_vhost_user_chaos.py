"""Chaos: the frontend dies at random points, 500 times, and the next one is served.

Deaths mid-message, mid-chain (a buffer posted, kicked or not, never waited for), between
SET_VRING_ENABLE(0) and GET_VRING_BASE, and in the middle of the start sequence. After
each death the process drops the connection, a new VM connects and starts from a fresh
device (no ballooned-frame record, ``actual`` 0), and no guest byte outside the frames
that VM ballooned or reported has changed. The counters add up at the end.
"""

from __future__ import annotations

import os
import random
import struct
import tempfile
from collections.abc import Iterator

import pytest

from device import Queue
from device.testing import FRAME_SIZE, GuestRam, MiB, frame_pattern
from tests.conftest import is_root
from tests.protocol.vhost_rig import BackendThread, Guest
from vballoon.waiting import wait_until
from vhost_user.messages import FrontendReq, VringState

ROUNDS = int(os.environ.get("VBALLOON_CHAOS_ROUNDS", "500"))
LOW_FRAMES = 8 * MiB // FRAME_SIZE
HUGE_GPA = 1 << 30
HUGE = 2 * MiB // FRAME_SIZE
HUGE_FIRST = HUGE_GPA // FRAME_SIZE
HUGE_PAGES = 2
#: The PC's legacy window: the device must never discard it, named or not.
WINDOW = range(0xA0, 0x100)


class World:
    """The process and the memory every VM in turn gets."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.low = GuestRam(16 * MiB)
        self.huge = GuestRam(HUGE_PAGES * 2 * MiB, gpa=HUGE_GPA, hugetlb=is_root())
        self.golden_low = b"".join(frame_pattern(f) for f in range(LOW_FRAMES))
        self.golden_huge = b"".join(
            frame_pattern(f) for f in range(HUGE_FIRST, HUGE_FIRST + HUGE_PAGES * HUGE)
        )
        self.backend = BackendThread(path)
        self.fresh()

    def fresh(self) -> None:
        """A new VM's memory: all of it live data."""
        self.low.mapping[: LOW_FRAMES * FRAME_SIZE] = self.golden_low
        self.huge.mapping[:] = self.golden_huge

    def changed(self) -> set[int]:
        out: set[int] = set()
        if self.low.mapping[: LOW_FRAMES * FRAME_SIZE] != self.golden_low:
            out |= {f for f in range(LOW_FRAMES) if not self.low.frame_intact(f)}
        if self.huge.mapping[:] != self.golden_huge:
            frames = range(HUGE_FIRST, HUGE_FIRST + HUGE_PAGES * HUGE)
            out |= {f for f in frames if not self.huge.frame_intact(f)}
        return out

    def close(self) -> None:
        self.backend.stop()
        self.low.close()
        self.huge.close()


@pytest.fixture
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    if is_root():
        request.getfixturevalue("hugepages")
    with tempfile.TemporaryDirectory(prefix="vbchaos-") as d:
        w = World(os.path.join(d, "v.sock"))
        yield w
        w.close()


def _frames(rnd: random.Random) -> list[int]:
    if rnd.random() < 0.5:  # half a huge page: what a stale record would complete
        page, half = rnd.randrange(HUGE_PAGES), rnd.randrange(2)
        first = HUGE_FIRST + page * HUGE + half * HUGE // 2
        return list(range(first, first + HUGE // 2))
    if rnd.random() < 0.2:  # the legacy window, which no guest may give
        return list(range(WINDOW.start - 4, WINDOW.stop + 4))
    return [rnd.randrange(LOW_FRAMES) for _ in range(rnd.randint(1, 64))]


def _one_life(w: World, rnd: random.Random) -> set[int]:
    """One VM from connect to a random death; the frames it may have had discarded."""
    g = Guest(w.path, w.low, extra=(w.huge,))
    named: set[int] = set()
    death = rnd.choice(["mid-start", "mid-message", "mid-chain", "between-stop-steps", "clean"])
    try:
        if death == "mid-start":
            g.fe.set_features(g.features | (1 << 30))
            if rnd.random() < 0.5:
                g.fe.set_vring_num(0, 64)
            return named
        g.start()
        for _ in range(rnd.randint(0, 3)):
            frames = _frames(rnd)
            if rnd.random() < 0.7:
                g.inflate(Queue.INFLATE, frames)
                named |= set(frames) - set(WINDOW)
                g.fe.set_config(4, struct.pack("<I", len(frames)))  # the guest's actual
            else:
                blocks = [(f * FRAME_SIZE, FRAME_SIZE) for f in frames[:8]]
                g.post(Queue.REPORTING, [], blocks)
                named |= set(frames[:8]) - set(WINDOW)
        if death == "mid-message":
            body = VringState(0, 64).pack()
            msg = struct.pack("<III", FrontendReq.SET_VRING_NUM, 1, len(body)) + body
            g.fe.conn.sock.sendall(msg[: rnd.randrange(1, len(msg))])
        elif death == "mid-chain":
            frames = _frames(rnd)
            ring = g.rings[Queue.INFLATE]
            ring.add([ring.buffer(struct.pack(f"<{len(frames)}I", *frames))])
            named |= set(frames) - set(WINDOW)  # the device may or may not get to it
            if rnd.random() < 0.5:
                g.notify(Queue.INFLATE)
        elif death == "between-stop-steps":
            for index in range(len(g.layout)):
                g.fe.set_vring_enable(index, False)
        return named
    finally:
        g.close()


def test_frontend_dies_500_times(world: World) -> None:
    rnd = random.Random(20261130)
    dev = world.backend.device
    for round_ in range(ROUNDS):
        drops = world.backend.events.count("disconnected")
        named = _one_life(world, rnd)
        wait_until(
            lambda drops=drops: world.backend.events.count("disconnected") > drops, 10, "the drop"
        )
        stray = sorted(world.changed() - named)
        assert not stray, f"round {round_}: live frames changed: {stray[:16]}"
        world.fresh()
    # The next VM gets a device with nothing of the last one's, and is served.
    g = Guest(world.path, world.low, extra=(world.huge,))
    snap = world.backend.call(dev.snapshot)
    assert (snap.tracked_frames, snap.actual, snap.status) == (0, 0, 0)
    g.start()
    before = world.huge.allocated()
    g.inflate(Queue.INFLATE, list(range(HUGE_FIRST, HUGE_FIRST + HUGE)))
    assert before - world.huge.allocated() == 2 * MiB  # a whole page, one request
    assert world.backend.daemon.connections == ROUNDS + 1
    m = world.backend.call(lambda: dev.metrics)
    assert m.discard_errors == 0 and m.broken_queues == 0
    g.close()
