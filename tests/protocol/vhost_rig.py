"""A vhost-user backend on a thread, and a frontend playing QEMU's part against it.

The backend is the real daemon on its own asyncio loop; the frontend speaks
over a real Unix socket with memfd guest memory, eventfds and the backend
channel, and drives the rings with ``device.testing.DriverRing``.
"""

from __future__ import annotations

import os
import select
import struct
from collections.abc import Callable
from typing import TypeVar

from device import BalloonConfig, BalloonDevice, GuestMemory, Queue, queue_layout
from device.testing import DriverRing, GuestRam, MiB
from tests.protocol.loop_thread import LoopThread
from vballoon.unix_socket import ClaimedSocket
from vhost_user import VhostUserDaemon
from vhost_user.frontend import FrontendRegion, VhostUserFrontend

T = TypeVar("T")
#: Pretend QEMU virtual address of guest physical 0.
UADDR_BASE = 0x7F00_0000_0000
#: Rings and buffers live in the top of guest RAM.
RING_AREA = 8 * MiB


class BackendThread:
    """The real daemon, serving on ``path`` from a thread with its own event loop."""

    def __init__(
        self, path: str, config: BalloonConfig | None = None, busy_poll_us: int = 0
    ) -> None:
        self.device = BalloonDevice(config or BalloonConfig(stats_interval=0))
        self.events: list[str] = []
        self.socket = ClaimedSocket(path, "vhost-user socket")
        self.daemon = VhostUserDaemon(
            self.device,
            listener=self.socket.sock,
            busy_poll_us=busy_poll_us,
            on_event=self.events.append,
        )
        self.runner = LoopThread(self.daemon.start, "vhost-user-backend")
        self.loop = self.runner.loop

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the backend's loop and return its result (safe inspection)."""
        return self.runner.call(fn)

    def stop(self) -> None:
        self.call(self.daemon.close)
        self.socket.release()
        self.runner.stop()


class Guest:
    """QEMU's side: guest RAM, a frontend connection and one ring per queue."""

    def __init__(
        self,
        path: str,
        ram: GuestRam,
        *,
        features: int | None = None,
        queue_size: int = 64,
        extra: tuple[GuestRam, ...] = (),
        without_protocol: int = 0,
    ) -> None:
        self.ram = ram
        self.extra = extra
        self.mem = GuestMemory([ram.spec()])
        self.fe = VhostUserFrontend(path)
        offered = self.fe.handshake(without=without_protocol)
        self.features = offered if features is None else features
        self.layout = queue_layout(self.features)
        self.queue_size = queue_size
        self.rings: dict[Queue, DriverRing] = {}
        self.kick: dict[Queue, int] = {}
        self.call: dict[Queue, int] = {}
        self.data_frames = (ram.size - RING_AREA) // 4096

    def start(self, bases: dict[Queue, int] | None = None, fresh_rings: bool = True) -> None:
        """QEMU's start sequence: SET_FEATURES, SET_MEM_TABLE, per ring NUM/BASE/ADDR/KICK/CALL."""
        self.fe.set_features(self.features | (1 << 30))
        self.fe.set_mem_table(
            [
                FrontendRegion(r.gpa, r.size, UADDR_BASE + r.gpa, r.fd)
                for r in (self.ram, *self.extra)
            ]
        )
        per = RING_AREA // 8
        base_gpa = self.ram.gpa + self.ram.size - RING_AREA
        for index, q in enumerate(self.layout.queues):
            if fresh_rings or q not in self.rings:
                self.rings[q] = DriverRing(
                    self.mem, self.queue_size, base_gpa + index * per, data_size=per // 2
                )
            ring = self.rings[q]
            self.kick[q] = os.eventfd(1, os.EFD_NONBLOCK)  # QEMU's starts signalled
            self.call[q] = os.eventfd(0, os.EFD_NONBLOCK)
            self.fe.start_vring(
                index,
                ring.size,
                UADDR_BASE + ring.desc,
                UADDR_BASE + ring.avail,
                UADDR_BASE + ring.used,
                self.kick[q],
                self.call[q],
                base=(bases or {}).get(q, 0),
                enable=False,
            )
        for index in range(len(self.layout)):  # QEMU enables them all at the end
            self.fe.set_vring_enable(index, True)

    def pause(self, status_zero: bool = False) -> dict[Queue, int]:
        """QEMU's stop sequence (a QMP ``stop``); the rings keep their contents."""
        started = [self.index(q) for q in self.rings]
        bases = self.fe.stop_device(len(self.layout), started, status_zero=status_zero)
        for fd in [*self.kick.values(), *self.call.values()]:
            os.close(fd)
        self.kick.clear()
        self.call.clear()
        return {q: bases[self.index(q)] for q in self.rings}

    def resume(self, bases: dict[Queue, int]) -> None:
        """QEMU's start sequence again (a QMP ``cont``), continuing where the rings were."""
        self.start(bases=bases, fresh_rings=False)

    def index(self, q: Queue) -> int:
        return self.layout.index(q)

    def notify(self, q: Queue) -> None:
        os.eventfd_write(self.kick[q], 1)

    def wait_call(self, q: Queue, timeout: float = 5.0) -> bool:
        r, _, _ = select.select([self.call[q]], [], [], timeout)
        if r:
            os.eventfd_read(self.call[q])
        return bool(r)

    def post(
        self, q: Queue, out: list[bytes], inn: list[tuple[int, int]] = ()
    ) -> list[tuple[int, int]]:
        """Post one chain, kick, wait for the interrupt, return the used elements."""
        ring = self.rings[q]
        ring.add([ring.buffer(b) for b in out], list(inn))
        self.notify(q)
        assert self.wait_call(q), f"no interrupt on {q.name}"
        return ring.get_used()

    def inflate(self, q: Queue, pfns: list[int]) -> None:
        for i in range(0, len(pfns), 256):
            chunk = pfns[i : i + 256]
            used = self.post(q, [struct.pack(f"<{len(chunk)}I", *chunk)])
            assert len(used) == 1

    def close(self) -> None:
        self.fe.close()
        for fd in [*self.kick.values(), *self.call.values()]:
            os.close(fd)
        self.kick.clear()
        self.call.clear()
        self.mem.close()


def reconnect(guest: Guest, path: str) -> None:
    """A new frontend takes over the same guest: rings resume at the used index (QEMU's rule)."""
    for fd in [*guest.kick.values(), *guest.call.values()]:
        os.close(fd)
    guest.kick.clear()
    guest.call.clear()
    guest.fe = VhostUserFrontend(path)
    guest.fe.handshake()
    bases = {q: ring.used_idx() for q, ring in guest.rings.items()}
    guest.start(bases=bases, fresh_rings=False)
