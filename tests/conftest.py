"""Shared fixtures: guest RAM on a memfd, a device with rings in that RAM."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from device import BalloonConfig, BalloonDevice, Feature, GuestMemory
from device.layout import queue_layout
from tests.driver import DriverRing, GuestRam, MiB, RecordingInterrupts

#: The last MiBs of guest RAM hold the rings and buffers; the rest is data.
RING_AREA = 8 * MiB


@pytest.fixture
def ram() -> Iterator[GuestRam]:
    r = GuestRam(64 * MiB)
    yield r
    r.close()


@pytest.fixture
def ram256() -> Iterator[GuestRam]:
    r = GuestRam(256 * MiB)
    yield r
    r.close()


class Rig:
    """A device wired to guest RAM with every negotiated queue's ring in that RAM."""

    def __init__(self, ram: GuestRam, config: BalloonConfig | None = None,
                 features: int | None = None, queue_size: int = 64) -> None:
        self.ram = ram
        self.irq = RecordingInterrupts()
        self.dev = BalloonDevice(config or BalloonConfig(stats_interval=0), self.irq)
        self.mem = GuestMemory([ram.spec()])
        self.dev.set_memory(self.mem)
        feats = self.dev.offered_features if features is None else features
        self.dev.set_features(feats)
        self.rings: dict[str, DriverRing] = {}
        base = ram.gpa + ram.size - RING_AREA
        per = RING_AREA // 8
        for index, q in enumerate(queue_layout(feats).queues):
            ring = DriverRing(self.mem, queue_size, base + index * per, data_size=per // 2)
            self.rings[q.name.lower()] = ring
            self.dev.set_queue(index, ring.device_queue())
        self.data_frames = (ram.size - RING_AREA) // 4096

    def index(self, name: str) -> int:
        return list(self.rings).index(name)

    def kick(self, name: str) -> bool:
        return self.dev.queue_notify(self.index(name))

    def has(self, f: Feature) -> bool:
        return self.dev.has(f)


@pytest.fixture
def rig(ram: GuestRam) -> Rig:
    return Rig(ram)


def is_root() -> bool:
    return os.geteuid() == 0
