"""Shared fixtures: guest RAM on a memfd, a device with rings in that RAM."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from device import BalloonConfig, BalloonDevice, Feature, GuestMemory, RegionSpec, queue_layout
from device.testing import DriverRing, GuestRam, MiB, RecordingInterrupts
from tests.package_rig import Installed, build_and_install

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

    def __init__(
        self,
        ram: GuestRam,
        config: BalloonConfig | None = None,
        features: int | None = None,
        queue_size: int = 64,
        extra: tuple[RegionSpec, ...] = (),
        activate: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ram = ram
        self.irq = RecordingInterrupts()
        self.dev = BalloonDevice(config or BalloonConfig(stats_interval=0), self.irq, clock)
        self.mem = GuestMemory([ram.spec(), *extra])
        self.dev.set_memory(self.mem)
        feats = self.dev.offered_features if features is None else features
        self.dev.negotiate(feats)
        self.rings: dict[str, DriverRing] = {}
        base = ram.gpa + ram.size - RING_AREA
        per = RING_AREA // 8
        for index, q in enumerate(queue_layout(feats).queues):
            ring = DriverRing(self.mem, queue_size, base + index * per, data_size=per // 2)
            self.rings[q.name.lower()] = ring
            self.dev.start_queue(index, ring.device_queue())
        if activate:  # DRIVER_OK
            self.dev.activate()
        self.data_frames = (ram.size - RING_AREA) // 4096

    def index(self, name: str) -> int:
        return list(self.rings).index(name)

    def kick(self, name: str) -> bool:
        return self.dev.queue_notify(self.index(name))

    def has(self, f: Feature) -> bool:
        return self.dev.has(f)

    def post(self, name: str, out: list[bytes], inn: list[tuple[int, int]] = ()) -> int:
        """Post one chain of fresh readable buffers (and given writable ones), kick, reap."""
        ring = self.rings[name]
        head = ring.add([ring.buffer(b) for b in out], list(inn))
        self.kick(name)
        used = ring.get_used()
        assert [h for h, _ in used] == [head], f"buffer {head} not returned: {used}"
        return used[0][1]

    def pfns(self, name: str, pfns: list[int], per_buffer: int = 256) -> None:
        """Send PFNs the way Linux does: at most 256 le32 PFNs a buffer, one buffer at a time."""
        for i in range(0, len(pfns), per_buffer):
            chunk = pfns[i : i + per_buffer]
            self.post(name, [struct.pack(f"<{len(chunk)}I", *chunk)])

    def close(self) -> None:
        self.mem.close()


@pytest.fixture
def rig(ram: GuestRam) -> Iterator[Rig]:
    r = Rig(ram)
    yield r
    r.close()


@pytest.fixture
def prig(ram: GuestRam) -> Iterator[Rig]:
    """A rig whose RAM holds its known pattern (so discards are visible)."""
    ram.fill_pattern()
    r = Rig(ram)
    yield r
    r.close()


class ManualClock:
    """A monotonic clock a test moves by hand (the device's ``clock``)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def is_root() -> bool:
    return os.geteuid() == 0


@pytest.fixture(scope="session")
def hugepages() -> Iterator[int]:
    """Reserve 2 MiB huge pages for the session (root only); restore the old count."""
    path = "/proc/sys/vm/nr_hugepages"
    with open(path) as f:
        old = int(f.read())
    want = old + 16
    with open(path, "w") as f:
        f.write(str(want))
    with open(path) as f:
        got = int(f.read())
    if got < want:
        pytest.fail(f"could reserve only {got - old} of 16 huge pages")
    yield 16
    with open(path, "w") as f:
        f.write(str(old))


@pytest.fixture(scope="session")
def installed() -> Iterator[Installed]:
    """The wheel built from this checkout, installed in a fresh venv outside it."""
    yield from build_and_install()
