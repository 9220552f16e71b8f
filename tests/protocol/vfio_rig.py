"""A vfio-user server on a thread, and a guest playing QEMU's and Linux's parts against it.

The server is the real :class:`vfio_user.VfioUserServer` serving a
:class:`virtio_pci.VirtioPciFunction` over a :class:`device.BalloonDevice`, on a
real Unix socket, from its own asyncio loop on a thread (as ``vballoon serve
--vfio-user`` runs it). The guest is :class:`virtio_pci.testing.VirtioPciDriver`
(QEMU's vfio-user client plus Linux's virtio-pci driver) with rings laid out in
memfd guest RAM by :class:`device.testing.DriverRing`.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from device import BalloonConfig, BalloonDevice, GuestMemory, Queue, RegionSpec, queue_layout
from device.defs import FRAME_SIZE
from device.testing import DriverRing, GuestRam, MiB
from tests.protocol.loop_thread import LoopThread
from vballoon.waiting import wait_until
from vfio_user import VfioUserServer
from vfio_user.client import VfioUserClient
from vfio_user.errors import DisconnectedError
from virtio_pci import VirtioPciFunction
from virtio_pci.testing import VirtioPciDriver

T = TypeVar("T")
#: Rings and buffers live in the top of guest RAM.
RING_AREA = 8 * MiB
#: Seconds any wait of the suite allows (far above what a healthy run needs).
TIMEOUT = 5.0


def wait_for(predicate: Callable[[], T], what: str, timeout: float = TIMEOUT) -> T:
    """:func:`vballoon.waiting.wait_until` with the suite's timeout, polling every 5 ms."""
    return wait_until(predicate, timeout, what, 0.005)


class ServerThread:
    """The real server and function, serving on ``path`` from a thread with its own loop."""

    def __init__(
        self, path: str, config: BalloonConfig | None = None, busy_poll_us: int = 0
    ) -> None:
        self.path = path
        self.device = BalloonDevice(config or BalloonConfig(stats_interval=0))
        self.events: list[str] = []
        self._cond = threading.Condition()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(8)
        self.loop = asyncio.new_event_loop()
        self.function = VirtioPciFunction(self.device, self.loop, busy_poll_us=busy_poll_us)
        self.server = VfioUserServer(self.function, listener, on_event=self._on_event)
        self.runner = LoopThread(self.server.start, "vfio-user-server", TIMEOUT, self.loop)
        self.thread = self.runner.thread

    def _on_event(self, event: str) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def count(self, event: str) -> int:
        with self._cond:
            return self.events.count(event)

    def wait_event(self, event: str, count: int, timeout: float = TIMEOUT) -> None:
        """Wait until ``event`` happened ``count`` times in all."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self.events.count(event) >= count, timeout)
        assert ok, f"server: {event!r} not seen {count} times within {timeout:g} s: {self.events}"

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server's loop and return its result (safe inspection)."""
        return self.runner.call(fn)

    @property
    def alive(self) -> bool:
        """The loop thread runs and answers."""
        return self.thread.is_alive() and self.call(lambda: True)

    def connected(self) -> bool:
        return self.call(lambda: self.server.conn is not None)

    def stop(self) -> None:
        self.call(self.server.close)
        self.runner.stop()
        if os.path.exists(self.path):
            os.unlink(self.path)


def connect(server: ServerThread) -> VfioUserClient:
    """A new client, once the server dropped the previous one (it serves one at a time)."""
    wait_for(lambda: not server.connected(), "the server to drop its previous client")
    before = server.count("connected")
    client = VfioUserClient(server.path)
    server.wait_event("connected", before + 1)
    return client


def hang_up(server: ServerThread, client: VfioUserClient) -> None:
    """Close ``client`` and wait until the server has let it go."""
    client.close()
    wait_for(lambda: not server.connected(), "the server to drop the client")


def closed_by_server(client: VfioUserClient, timeout: float = TIMEOUT) -> bool:
    """Whether the server closes the connection (no reply may come first)."""
    try:
        header, _ = client.reply(timeout)
    except DisconnectedError:
        return True
    except TimeoutError:
        return False
    raise AssertionError(f"the server answered {header} instead of closing")


def nothing_to_read(client: VfioUserClient, timeout: float = 0.0) -> bool:
    """No byte waits on the client's socket (within ``timeout`` seconds)."""
    r, _, _ = select.select([client.conn.sock], [], [], timeout)
    return not r


class PciGuest:
    """A guest with its virtio-pci driver: RAM, rings per negotiated queue, interrupts.

    :param path: the server's socket
    :param ram: guest RAM (DMA-mapped at attach)
    :param msix: MSI-X (else INTx, like ``pci=nomsi``)
    :param features: features the driver accepts (default: all offered)
    """

    def __init__(
        self,
        path: str,
        ram: GuestRam,
        *,
        msix: bool = True,
        features: int | None = None,
        queue_size: int = 64,
        windows: Sequence[tuple[int, int, int]] | None = None,
    ) -> None:
        self.ram = ram
        #: DMA windows on ``ram``'s memfd: (gpa, size, file offset); rings go at the top
        #: of the first one
        self.windows = list(windows or [(ram.gpa, ram.size, 0)])
        self.mem = GuestMemory(
            RegionSpec(g, s, memoryview(ram.mapping)[o : o + s], ram.fd, o)
            for g, s, o in self.windows
        )
        self.drv = VirtioPciDriver(path, ram, msix=msix)
        self.drv.map_ram = self._map_windows  # type: ignore[method-assign]
        self.client = self.drv.client
        self.wanted = features
        self.queue_size = queue_size
        self.features = 0
        self.rings: dict[Queue, DriverRing] = {}

    def _map_windows(self) -> None:
        for gpa, size, offset in self.windows:
            fd = os.dup(self.ram.fd)  # QEMU sends a fresh descriptor with every map
            try:
                self.client.dma_map(gpa, size, fd, offset)
            finally:
                os.close(fd)

    def start(self) -> None:
        """Attach (QEMU's realize), then Linux's probe."""
        self.drv.attach()
        self.probe()

    def probe(self, *, driver_ok: bool = True) -> None:
        """Linux's probe: reset, negotiate, set up and enable every queue, DRIVER_OK."""
        d = self.drv
        self.rings.clear()
        self.features = d.negotiate(self.wanted)
        layout = queue_layout(self.features)
        per = RING_AREA // 8
        gpa, size, _ = self.windows[0]
        base = gpa + size - RING_AREA
        for index, q in enumerate(layout.queues):
            ring = DriverRing(self.mem, self.queue_size, base + index * per, data_size=per // 2)
            self.rings[q] = ring
            d.setup_queue(index, ring)
        for index in range(len(layout.queues)):
            d.enable_queue(index)
        if driver_ok:
            d.driver_ok()

    @property
    def data_frames(self) -> int:
        """Frames of the first window below the ring area."""
        return (self.windows[0][1] - RING_AREA) // FRAME_SIZE

    def index(self, q: Queue) -> int:
        return queue_layout(self.features).index(q)

    def post(
        self, q: Queue, out: list[bytes], inn: list[tuple[int, int]] | None = None
    ) -> list[tuple[int, int]]:
        """Post one chain, notify, wait for the queue's interrupt, return the used elements."""
        ring = self.rings[q]
        ring.add([ring.buffer(b) for b in out], inn or [])
        index = self.index(q)
        self.drv.notify(index)
        assert self.drv.wait_queue_interrupt(index), f"no interrupt on {q.name}"
        return ring.get_used()

    def inflate(self, q: Queue, pfns: list[int]) -> None:
        """Linux's way: buffers of up to 256 PFNs, each waited for."""
        for i in range(0, len(pfns), 256):
            chunk = pfns[i : i + 256]
            used = self.post(q, [struct.pack(f"<{len(chunk)}I", *chunk)])
            assert len(used) == 1

    def close(self) -> None:
        self.drv.close()
        self.mem.close()


def serves_a_fresh_client(server: ServerThread) -> None:
    """The end-to-end check after a bad client: a new guest attaches, negotiates and gets
    16 frames punched out of its memfd, the rest untouched."""
    ram = GuestRam(16 * MiB)
    ram.fill_pattern()
    wait_for(lambda: not server.connected(), "the server to drop the bad client")
    guest = PciGuest(server.path, ram)
    try:
        guest.start()
        before = ram.allocated()
        guest.inflate(Queue.INFLATE, list(range(512, 528)))
        assert before - ram.allocated() == 16 * FRAME_SIZE
        assert ram.frame_zero(512) and ram.frame_zero(527)
        assert ram.frame_intact(511) and ram.frame_intact(528)
    finally:
        guest.close()
        wait_for(lambda: not server.connected(), "the server to drop the good client")
        ram.close()
    assert server.alive


def open_fds() -> int:
    """Descriptors open in this process (the server runs in it: what it keeps shows here)."""
    return len(os.listdir("/proc/self/fd"))


def mapped(name: str) -> int:
    """Mappings of memfd ``name`` in this process (the server's DMA windows among them)."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if f"/memfd:{name} " in line)


def holds_fd_of(name: str) -> int:
    """Descriptors of this process open on memfd ``name``."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == f"/memfd:{name} (deleted)":
                n += 1
        except OSError:
            continue
    return n


def data_at(fd: int, offset: int) -> bool:
    """Whether the file holds data (not a hole) at ``offset`` (SEEK_DATA)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) == offset
    except OSError:  # ENXIO: only holes from there to the end
        return False
