"""The balloon device behind vhost-user: memory table, vrings, kicks and interrupts.

One adapter serves one frontend connection; the :class:`device.BalloonDevice`
outlives it, and a new connection resets it (a new frontend is a new VM: only
the operator's target and the counters carry over, see ``daemon.py``). The
adapter maps the frontend's regions, converts ring addresses (frontend
virtual addresses) to guest physical ones, starts a queue once it has a size,
addresses, a kick fd and is enabled, and turns the device's interrupts into
call-eventfd writes and CONFIG_CHANGE_MSG on the backend channel (sent without
NEED_REPLY: QEMU may be waiting in a synchronous GET_CONFIG, and a backend
that waits for the reply would stall the guest).

Decisions: no INFLIGHT_SHMFD (balloon buffers are idempotent: a frontend that
restarts its rings rewinds to the used index, and re-discarding an unreturned
buffer is harmless); no LOG_ALL/LOG_SHMFD (the QEMU test device is unmigratable, and
without them QEMU blocks migration, which is right for a backend that cannot
log); no PAGEFAULT (postcopy would need discards to stop on the destination).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import socket
from dataclasses import dataclass

from device import BalloonDevice, BalloonError, GuestMemory, RegionSpec, SplitQueue
from device.runner import QueueRunner
from vhost_user.backend import VhostUserBackend
from vhost_user.connection import Connection
from vhost_user.errors import DisconnectedError, ProtocolError
from vhost_user.messages import (
    F_PROTOCOL_FEATURES,
    VERSION,
    BackendReq,
    Header,
    MemRegion,
    ProtocolFeature,
    VringAddr,
)

log = logging.getLogger(__name__)

PROTOCOL_FEATURES = (
    ProtocolFeature.REPLY_ACK
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.CONFIG
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.STATUS
)
#: Memory slots offered with CONFIGURE_MEM_SLOTS.
MAX_MEM_SLOTS = 32
#: Queues a balloon can have (inflate .. range-report).
MAX_QUEUES = 6
#: Bytes the backend channel may hold unsent (config-change messages coalesce anyway).
CHANNEL_SEND_LIMIT = 4096


def _signal(eventfd: int | None) -> None:
    """Write 1 to an eventfd (a full counter already wakes its reader)."""
    if eventfd is not None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_write(eventfd, 1)


def _close_fd(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


@dataclass
class Vring:
    """What the frontend told us about one ring."""

    num: int = 0
    addr: VringAddr | None = None
    base: int = 0
    kick: int | None = None
    call: int | None = None
    err: int | None = None
    enabled: bool = False
    started: bool = False


@dataclass
class MappedRegion:
    """One region of the frontend's memory table, mapped by us."""

    msg: MemRegion
    fd: int
    mapping: mmap.mmap

    def spec(self) -> RegionSpec:
        view = memoryview(self.mapping)[self.msg.mmap_offset : self.msg.mmap_offset + self.msg.size]
        return RegionSpec(self.msg.gpa, self.msg.size, view, self.fd, self.msg.mmap_offset, True)

    def close(self) -> None:
        try:
            self.mapping.close()
        except BufferError:  # pragma: no cover - a view outlived its GuestMemory
            log.warning("region at gpa %#x still referenced; unmapped when collected", self.msg.gpa)
        _close_fd(self.fd)


def map_region(msg: MemRegion, fd: int) -> MappedRegion:
    """Map ``fd`` shared as the frontend describes it.

    :raise ProtocolError: if the mapping fails (bad fd, size beyond the file).
    """
    try:
        size = os.fstat(fd).st_size
        if size and msg.mmap_offset + msg.size > size:
            raise ProtocolError(
                f"region gpa {msg.gpa:#x}: offset {msg.mmap_offset:#x} + size {msg.size:#x} "
                f"is beyond its file of {size:#x} bytes"
            )
        mm = mmap.mmap(
            fd, msg.mmap_offset + msg.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )
    except (OSError, ValueError, OverflowError) as err:
        raise ProtocolError(f"cannot map region gpa {msg.gpa:#x}: {err}") from err
    return MappedRegion(msg, fd, mm)


class _Interrupts:
    """``device.Interrupts`` for one vhost-user connection."""

    def __init__(self, adapter: BalloonVhostUserBackend) -> None:
        self.adapter = adapter

    def queue(self, index: int) -> None:
        _signal(self.adapter.vrings[index].call)

    def config(self) -> None:
        self.adapter.send_config_change()


class BalloonVhostUserBackend(VhostUserBackend):
    """vhost-user requests mapped onto a :class:`BalloonDevice`.

    What is vhost-user's own stays here: the memory table (frontend virtual
    addresses to guest physical ones), the rings' fds and their
    started/enabled states, the backend channel. Every virtio rule is the
    device's; the mapping of vhost-user's lifecycle messages onto it is:

    - SET_FEATURES: the driver's accepted features (the frontend already did
      FEATURES_OK with the guest) -> :meth:`BalloonDevice.negotiate`;
    - the first ring that starts -> :meth:`BalloonDevice.activate`: QEMU starts a
      backend only after the driver set DRIVER_OK, and its test device never
      sends SET_STATUS(DRIVER_OK), so a started ring is the wire's DRIVER_OK;
    - SET_STATUS(0), RESET_OWNER, a disconnect -> :meth:`BalloonDevice.stop`:
      QEMU sends the same status 0 for a VM pause and a guest reset, so the
      device keeps the guest's balloon and forgets only what a reset must not keep;
    - RESET_DEVICE -> :meth:`BalloonDevice.reset`;
    - other SET_STATUS values -> :meth:`BalloonDevice.set_status`.

    :param device: the balloon; survives this connection
    :param loop: the event loop that watches kick fds and runs timers
    :param busy_poll_us: after a kick that did work, watch the ring this long for more
    """

    def __init__(
        self, device: BalloonDevice, loop: asyncio.AbstractEventLoop, busy_poll_us: int = 0
    ) -> None:
        self.device = device
        self.loop = loop
        self.vrings = [Vring() for _ in range(MAX_QUEUES)]
        self.regions: list[MappedRegion] = []
        self.memory: GuestMemory | None = None
        self.protocol_features = 0
        self.backend_channel: Connection | None = None
        self._config_pending = False
        self.runner = QueueRunner(
            device, loop, busy_poll_us=busy_poll_us, on_broken=self._signal_err
        )
        device.attach(_Interrupts(self))

    # -- features, ownership, status -------------------------------------------------

    def get_features(self) -> int:
        return self.device.offered_features | F_PROTOCOL_FEATURES

    def set_features(self, features: int) -> None:
        if any(v.started for v in self.vrings):
            # Only dirty logging may change features on running rings, and it is not offered.
            raise ProtocolError("SET_FEATURES while rings run")
        try:
            self.device.negotiate(features & ~F_PROTOCOL_FEATURES)
        except BalloonError as err:
            raise ProtocolError(str(err)) from err
        if not features & F_PROTOCOL_FEATURES:
            # Without the extension every ring is enabled from the start.
            for i in range(MAX_QUEUES):
                self.set_vring_enable(i, True)

    def get_protocol_features(self) -> int:
        return int(PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        extra = features & ~PROTOCOL_FEATURES
        if extra:
            raise ProtocolError(
                f"frontend acked protocol features {extra:#x} that were not offered"
            )
        self.protocol_features = features

    def set_owner(self) -> None:
        pass

    def reset_owner(self) -> None:
        self._stop_device()

    def reset_device(self) -> None:
        self._stop_all()
        self.device.reset()

    def set_status(self, status: int) -> None:
        if status == 0:
            self._stop_device()
        else:
            self.device.set_status(status)

    def get_status(self) -> int:
        return self.device.read_status()

    # -- memory ---------------------------------------------------------------

    def _install(self, regions: list[MappedRegion]) -> None:
        """Make ``regions`` the guest memory, then unmap what is no longer in it."""
        try:
            mem = GuestMemory(r.spec() for r in regions)
        except BalloonError as err:
            raise ProtocolError(f"memory table refused: {err}") from err
        old_mem, old_regions = self.memory, self.regions
        self.device.set_memory(mem)
        self.memory, self.regions = mem, regions
        if old_mem is not None:
            old_mem.close()
        for r in old_regions:
            if r not in regions:
                r.close()
        # A kick that arrived while a ring was outside the map was consumed without work.
        self.runner.notify_all()
        log.info(
            "guest memory: %s",
            ", ".join(f"[{r.msg.gpa:#x}+{r.msg.size >> 20} MiB]" for r in regions),
        )

    def set_mem_table(self, regions: tuple[MemRegion, ...], fds: list[int]) -> None:
        mapped: list[MappedRegion] = []
        try:
            for msg, fd in zip(regions, fds, strict=True):
                mapped.append(map_region(msg, fd))
            self._install(mapped)
        except BaseException:
            for m in mapped:  # the dispatcher closes the fds themselves
                with contextlib.suppress(BufferError):
                    m.mapping.close()
            raise

    def get_max_mem_slots(self) -> int:
        return MAX_MEM_SLOTS

    def add_mem_reg(self, region: MemRegion, fd: int) -> None:
        if len(self.regions) >= MAX_MEM_SLOTS:
            raise ProtocolError(f"more than {MAX_MEM_SLOTS} memory regions")
        m = map_region(region, fd)
        try:
            self._install([*self.regions, m])
        except BaseException:
            with contextlib.suppress(BufferError):
                m.mapping.close()
            raise

    def rem_mem_reg(self, region: MemRegion) -> None:
        keep = [
            r
            for r in self.regions
            if (r.msg.gpa, r.msg.size, r.msg.uaddr) != (region.gpa, region.size, region.uaddr)
        ]
        if len(keep) == len(self.regions):
            raise ProtocolError(f"REM_MEM_REG of unknown region gpa {region.gpa:#x}")
        self._install(keep)

    def _uaddr_to_gpa(self, uaddr: int, length: int, what: str) -> int:
        for r in self.regions:
            m = r.msg
            if m.uaddr <= uaddr and uaddr + length <= m.uaddr + m.size:
                return m.gpa + (uaddr - m.uaddr)
        raise ProtocolError(f"{what} address {uaddr:#x} is outside the memory table")

    # -- vrings -----------------------------------------------------------------

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < MAX_QUEUES:
            raise ProtocolError(f"vring index {index} (a balloon has at most {MAX_QUEUES})")
        return self.vrings[index]

    def set_vring_num(self, index: int, num: int) -> None:
        # The size may be the guest's choice: a bad one breaks that queue when it starts
        # (SplitQueue checks it), it does not cost the VM its connection.
        if num > 0xFFFF:
            raise ProtocolError(f"vring {index} size {num} does not fit 16 bits")
        self._vring(index).num = num

    def set_vring_addr(self, addr: VringAddr) -> None:
        self._vring(addr.index).addr = addr

    def set_vring_base(self, index: int, base: int) -> None:
        if base > 0xFFFF:
            raise ProtocolError(f"vring {index} base {base:#x} has bits above 16")
        self._vring(index).base = base

    def get_vring_base(self, index: int) -> int:
        v = self._vring(index)
        if v.started:
            self._stop(index)
        _close_fd(v.kick)
        v.kick = None
        return v.base

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        v = self._vring(index)
        if v.started:
            self._stop(index)
        _close_fd(v.kick)
        v.kick = fd
        try:
            self._maybe_start(index)
        except BaseException:
            v.kick = None  # the dispatcher closes the fd of a refused request: not ours
            raise

    def set_vring_call(self, index: int, fd: int | None) -> None:
        v = self._vring(index)
        old, v.call = v.call, fd
        _close_fd(old)  # only the newest call fd is ever signalled
        if fd is not None:
            os.set_blocking(fd, False)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        v = self._vring(index)
        old, v.err = v.err, fd
        _close_fd(old)
        if fd is not None:
            os.set_blocking(fd, False)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        v = self._vring(index)
        v.enabled = enable
        if enable:
            self._maybe_start(index)
        elif v.started:
            self._stop(index)

    def _maybe_start(self, index: int) -> None:
        v = self.vrings[index]
        if v.started or not v.enabled or v.kick is None or v.addr is None or not v.num:
            return
        if self.memory is None:
            raise ProtocolError(f"vring {index} started before any memory table")
        if not self.device.negotiated:
            raise ProtocolError(f"vring {index} started before SET_FEATURES")
        role = self.device.layout.queue_at(index)
        if role is None:
            log.debug("vring %d has no queue with the negotiated features; not started", index)
            return
        a = v.addr
        desc = self._uaddr_to_gpa(a.desc, 16 * v.num, f"vring {index} descriptor table")
        avail = self._uaddr_to_gpa(a.avail, 6 + 2 * v.num, f"vring {index} avail ring")
        used = self._uaddr_to_gpa(a.used, 6 + 8 * v.num, f"vring {index} used ring")
        try:
            q = SplitQueue(v.num, desc, avail, used, next_avail=v.base)
            q.resume_used_from_ring(self.memory)
            self.device.start_queue(index, q)
        except BalloonError as err:
            # The guest chose these ring addresses: its fault, not the frontend's. Closing
            # the connection mid-start would make QEMU abort; stop just this queue instead.
            log.error("vring %d cannot start: %s", index, err)
            self.device.break_queue(index, str(err))
            self._signal_err(index)
            return
        v.started = True
        self.device.activate()  # a started ring is vhost-user's DRIVER_OK (class doc)
        self.runner.watch(index, v.kick)
        log.info("queue %d (%s) started: size %d, base %d", index, role.name.lower(), v.num, v.base)
        self.runner.notify(index)

    def _stop(self, index: int) -> None:
        v = self.vrings[index]
        self.runner.unwatch(index)
        nxt = self.device.stop_queue(index)
        if nxt is not None:
            v.base = nxt
        v.started = False

    def _stop_all(self) -> None:
        for i, v in enumerate(self.vrings):
            if v.started:
                self._stop(i)

    def _stop_device(self) -> None:
        """Stop every ring (their bases are kept for the next start), then the device."""
        self._stop_all()
        self.device.stop()

    def _signal_err(self, index: int) -> None:
        """The driver broke queue ``index``: tell the frontend on the ring's error eventfd."""
        _signal(self.vrings[index].err)

    # -- config space and the backend channel -----------------------------------------

    def get_config(self, offset: int, size: int) -> bytes:
        # QEMU asks for config_size bytes, which may exceed what our features expose.
        have = max(0, min(size, self.device.config_size - offset))
        data = self.device.read_config(offset, have) if have else b""
        return data + bytes(size - len(data))

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        have = max(0, min(len(data), self.device.config_size - offset))
        if have:
            self.device.write_config(offset, data[:have])

    def set_backend_req_fd(self, fd: int) -> None:
        if self.backend_channel is not None:
            self._close_channel()
        try:
            sock = socket.socket(fileno=fd)
        except OSError as err:
            raise ProtocolError(f"backend request fd is not a socket: {err}") from err
        self.backend_channel = Connection(sock, send_limit=CHANNEL_SEND_LIMIT)
        self.loop.add_reader(fd, self._on_channel_readable)
        if self._config_pending:
            self.send_config_change()

    def _on_channel_readable(self) -> None:
        # We never ask for replies; anything readable is EOF or noise to drain.
        ch = self.backend_channel
        if ch is None:
            return
        try:
            data = ch.sock.recv(4096, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            log.info("backend request channel closed by the frontend")
            self._close_channel()

    def send_config_change(self) -> None:
        """Tell the frontend the config changed; never waits for an answer."""
        ch = self.backend_channel
        if ch is None or not self.protocol_features & ProtocolFeature.CONFIG:
            self._config_pending = True
            return
        try:
            sent = ch.try_send(Header(BackendReq.CONFIG_CHANGE_MSG, VERSION, 0))
        except (DisconnectedError, ProtocolError) as err:
            log.warning("backend request channel dropped: %s", err)
            self._close_channel()
            self._config_pending = True
            return
        # Not sent (the channel is full): one message goes when it drains, however
        # many changes came meanwhile.
        self._config_pending = not sent
        if ch.pending or not sent:
            self.loop.add_writer(ch.fileno(), self._on_channel_writable)

    def _on_channel_writable(self) -> None:
        ch = self.backend_channel
        if ch is None:
            return
        try:
            ch.flush()
        except (DisconnectedError, ProtocolError) as err:
            log.warning("backend request channel dropped: %s", err)
            self._close_channel()
            return
        if ch.pending:
            return
        self.loop.remove_writer(ch.fileno())
        if self._config_pending:
            self.send_config_change()

    def _close_channel(self) -> None:
        ch, self.backend_channel = self.backend_channel, None
        if ch is not None:
            self.loop.remove_reader(ch.fileno())
            self.loop.remove_writer(ch.fileno())
            ch.close()

    # -- teardown -------------------------------------------------------------------

    def close(self) -> None:
        """The frontend is gone: stop the device, release fds and memory.

        What the guest holds (``actual``, the target, counters) stays with the device.
        """
        self._stop_device()
        self.runner.close()
        self.runner.on_broken = None  # no adapter <-> runner cycle left for the collector
        for v in self.vrings:
            for fd in (v.kick, v.call, v.err):
                _close_fd(fd)
            v.kick = v.call = v.err = None
        self._close_channel()
        self.device.set_memory(None)
        if self.memory is not None:
            self.memory.close()
        for r in self.regions:
            r.close()
        self.memory, self.regions = None, []
        self.device.detach()
