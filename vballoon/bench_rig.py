"""What the benchmarks that cross a process boundary share: ``vballoon serve`` as a child,
and a vhost-user frontend or a vfio-user virtio-pci driver playing QEMU's (and the guest
driver's) part with a guest's memory and rings.

Guest RAM and the ring region are memfds shared with the child exactly as QEMU shares
them; every buffer is kicked through an eventfd and waited for on the call eventfd, one
at a time, as Linux's driver does.
"""

from __future__ import annotations

import contextlib
import gc
import mmap
import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Sequence

from device import Feature, GuestMemory, RegionSpec
from device.testing import RING_GPA, DriverRing
from vballoon.units import MiB
from vballoon.waiting import WaitTimeout, wait_until
from vhost_user.frontend import FrontendRegion, VhostUserFrontend
from vhost_user.messages import F_PROTOCOL_FEATURES

#: Where the frontend pretends guest physical 0 is mapped (QEMU's virtual address).
UADDR = 0x7F00_0000_0000
#: Bytes of the ring region (rings and buffers; apart from guest RAM proper).
RING_BYTES = 16 * MiB


class RigError(RuntimeError):
    """The child or the frontend did not do what it must."""


class ServeChild:
    """``vballoon serve`` in a child process, sockets in ``workdir``.

    :raise RigError: if it does not come up within 10 s.
    """

    def __init__(self, workdir: str, *args: str, transport: str = "vhost-user") -> None:
        vfio = transport == "vfio-user"
        self.sock = os.path.join(workdir, "vfio-user.sock" if vfio else "vhost.sock")
        self.control = os.path.join(workdir, "control.sock")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vballoon.cli",
                "serve",
                "--vfio-user" if vfio else "--socket",
                self.sock,
                "--control",
                self.control,
                "--log-level",
                "warning",
                "--stats-interval",
                "0",
                *args,
            ],
            stdin=subprocess.DEVNULL,
        )
        proc = self.proc
        try:
            wait_until(
                lambda: os.path.exists(self.control) or proc.poll() is not None,
                10,
                "vballoon serve",
            )
        except WaitTimeout as err:
            self.close()
            raise RigError(str(err)) from None
        if proc.poll() is not None:
            raise RigError(f"vballoon serve exited with status {proc.returncode}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        """SIGTERM, as systemd stops it; killed if it does not exit within 10 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class GuestMemfds:
    """A guest's RAM (at gpa 0) and ring region (at ``RING_GPA``) as memfds, with our view
    of the ring region for the driver side of the rings."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create("vballoon-bench-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.ring_fd = os.memfd_create("vballoon-bench-rings", os.MFD_CLOEXEC)
        os.ftruncate(self.ring_fd, RING_BYTES)
        self.ring_map = mmap.mmap(self.ring_fd, RING_BYTES, mmap.MAP_SHARED)
        self.mem = GuestMemory([RegionSpec(RING_GPA, RING_BYTES, self.ring_map, self.ring_fd, 0)])

    def allocated(self) -> int:
        """Bytes of guest RAM the memfd holds."""
        return os.fstat(self.fd).st_blocks * 512

    def regions(self) -> list[FrontendRegion]:
        return [
            FrontendRegion(0, self.size, UADDR, self.fd),
            FrontendRegion(RING_GPA, RING_BYTES, UADDR + RING_GPA, self.ring_fd),
        ]

    def close(self) -> None:
        self.mem.close()
        gc.collect()  # ring views held by queue objects pin the mapping
        with contextlib.suppress(BufferError):
            self.ring_map.close()
        os.close(self.fd)
        os.close(self.ring_fd)


class Frontend:
    """QEMU's part on one connection: features, memory table, rings, buffers.

    :param sock: the child's vhost-user socket
    :param guest: the guest memory to share
    :param queues: how many rings to start (inflate, deflate, ...), 64 entries each
    :param poll_us: after a kick, watch the used ring this long before sleeping on the
        call eventfd (a KVM vCPU halt-polls so; 0: sleep at once)
    """

    def __init__(self, sock: str, guest: GuestMemfds, queues: int = 1, poll_us: int = 0) -> None:
        self.guest = guest
        self.poll_ns = poll_us * 1000
        self.fe = VhostUserFrontend(sock)
        features = self.fe.handshake() & (Feature.VERSION_1 | Feature.RING_EVENT_IDX)
        self.fe.set_features(features | F_PROTOCOL_FEATURES)
        self.fe.set_mem_table(guest.regions())
        self.rings: list[DriverRing] = []
        self.kicks: list[int] = []
        self.calls: list[int] = []
        for index in range(queues):
            ring = DriverRing(guest.mem, 64, RING_GPA + index * 4 * MiB, data_size=2 * MiB)
            kick = os.eventfd(0, os.EFD_NONBLOCK)
            call = os.eventfd(0, os.EFD_NONBLOCK)
            self.rings.append(ring)
            self.kicks.append(kick)
            self.calls.append(call)
            self.fe.start_vring(
                index,
                64,
                UADDR + ring.desc,
                UADDR + ring.avail,
                UADDR + ring.used,
                kick,
                call,
            )

    def post_pfns(self, index: int, pfns: Sequence[int]) -> None:
        """One buffer of le32 PFNs on queue ``index``; kick; wait until it is used.

        :raise RigError: if no interrupt comes within 10 s.
        """
        ring = self.rings[index]
        ring.add([ring.buffer(struct.pack(f"<{len(pfns)}I", *pfns))])
        os.eventfd_write(self.kicks[index], 1)
        poll_end = time.perf_counter_ns() + self.poll_ns
        while ring.used_idx() == ring.last_used and time.perf_counter_ns() < poll_end:
            pass
        while not ring.get_used():
            ready, _, _ = select.select([self.calls[index]], [], [], 10)
            if not ready:
                raise RigError(f"queue {index}: no interrupt within 10 s")
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.calls[index])

    def close(self) -> None:
        self.fe.close()
        for fd in (*self.kicks, *self.calls):
            os.close(fd)


class PciDriver:
    """QEMU's vfio-user part and Linux's virtio-pci driver on one connection: guest RAM
    and the ring region DMA-mapped, VERSION_1 negotiated, the inflate queue running
    with its MSI-X vector on an eventfd.

    :param sock: the child's vfio-user socket
    :param guest: the guest memory to map
    :param poll_us: after a notify, watch the used ring this long before sleeping on the
        vector's eventfd (a KVM vCPU halt-polls so; 0: sleep at once)
    """

    def __init__(self, sock: str, guest: GuestMemfds, poll_us: int = 0) -> None:
        from vfio_user import VfioUserError
        from virtio_pci.testing import VirtioPciDriver

        self.guest = guest
        self.poll_ns = poll_us * 1000
        ram = GuestRamView(guest.fd, 0, guest.size)
        self.driver = VirtioPciDriver(sock, ram)  # type: ignore[arg-type]
        try:
            self.driver.attach()
            fd = os.dup(guest.ring_fd)  # QEMU sends a fresh descriptor with every map
            try:
                self.driver.client.dma_map(RING_GPA, RING_BYTES, fd, 0)
            finally:
                os.close(fd)
            self.driver.negotiate(int(Feature.VERSION_1 | Feature.RING_EVENT_IDX))
            self.ring = DriverRing(guest.mem, 64, RING_GPA, data_size=2 * MiB)
            self.driver.setup_queue(0, self.ring)
            self.driver.enable_queue(0)
            self.driver.driver_ok()
            self.notify_off = self.driver.queue_notify_off(0)
        except (VfioUserError, OSError, AssertionError) as err:
            self.driver.close()
            raise RigError(f"vfio-user driver setup: {err}") from None
        self.vector = self.driver.vectors[self.driver.queue_vector[0]]

    def post_pfns(self, pfns: Sequence[int]) -> None:
        """One buffer of le32 PFNs on the inflate queue; notify; wait until it is used.

        :raise RigError: if no interrupt comes within 10 s.
        """
        ring = self.ring
        ring.add([ring.buffer(struct.pack(f"<{len(pfns)}I", *pfns))])
        self.driver.notify_fast(0, self.notify_off)
        poll_end = time.perf_counter_ns() + self.poll_ns
        while ring.used_idx() == ring.last_used and time.perf_counter_ns() < poll_end:
            pass
        while not ring.get_used():
            ready, _, _ = select.select([self.vector], [], [], 10)
            if not ready:
                raise RigError("inflate queue: no interrupt within 10 s")
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.vector)

    def close(self) -> None:
        self.driver.close()


class GuestRamView:
    """The three attributes of :class:`device.testing.GuestRam` a driver maps (no mapping)."""

    def __init__(self, fd: int, gpa: int, size: int) -> None:
        self.fd = fd
        self.gpa = gpa
        self.size = size
