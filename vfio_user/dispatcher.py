"""One client session: the dispatch table, protocol state and the checks before a device call.

Each arm: payload decode (sizes and values), the fd rule, the checks that
belong to the protocol (region bounds and flags, DMA window overlap,
interrupt vector ranges), then the typed :class:`Function` call, and the
reply payload. The session is the only place that sees command codes.

What happens to a bad message: a whole message that is wrong gets an error
reply with an errno (:class:`CommandError`), its fds closed, and the
connection stays; with NO_REPLY set the error is logged and nothing is sent
(a posted write is never answered). A message that breaks the framing, or a
first message that is not VERSION, raises :class:`ProtocolError`: the server
closes the connection.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vfio_user.connection import Message, close_fds
from vfio_user.dma import DmaSpace, DmaWindow
from vfio_user.errors import CommandError, ProtocolError
from vfio_user.function import Function, RegionSpec
from vfio_user.irqs import IrqTable
from vfio_user.messages import (
    HEADER_SIZE,
    PAGE_SIZE,
    VERSION_MAJOR,
    VERSION_MINOR,
    Command,
    DeviceInfo,
    DmaMap,
    DmaUnmap,
    IrqInfo,
    RegionAccess,
    RegionFlag,
    RegionInfo,
    SetIrqs,
    Version,
    WriteMulti,
)

log = logging.getLogger(__name__)

#: Descriptors the server accepts in one message (SET_IRQS of 16 vectors; QEMU's limit).
MAX_MSG_FDS = 16
#: Largest REGION_READ/WRITE the server accepts (QEMU's default, 1 MiB).
MAX_DATA_XFER = 1 << 20
#: Most DMA windows at once (QEMU maps about 20 for a PC; each costs an fd and a mapping).
MAX_DMA_MAPS = 256
#: Most bytes of DMA windows at once: 1 TiB of guest memory, mapped once, with room for
#: QEMU's PAM aliases (a device keeps a bit per 4 KiB page of its windows: 32 MiB here).
MAX_DMA_BYTES = 1 << 40
#: Largest message accepted: a REGION_WRITE of MAX_DATA_XFER bytes.
MAX_MESSAGE = HEADER_SIZE + RegionAccess.FMT.size + MAX_DATA_XFER
#: What the client assumes when VERSION's reply omits a capability.
CLIENT_DEFAULT_XFER = 1 << 20

#: What an arm returns: the reply payload (b"" for a header-only reply).
Handler = Callable[["Session", bytes, list[int]], bytes]


@dataclass(frozen=True)
class Arm:
    """How one command is handled.

    :param call: decodes the payload, runs the command, returns the reply payload
    :param fds: the most descriptors it takes (they are checked further by ``call``)
    """

    call: Handler
    fds: int = 0


def _int_cap(caps: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = caps.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise CommandError(f"VERSION: capability {key}={value!r} (expected {lo}..{hi})")
    return value


class Session:
    """The protocol state of one client connection.

    :param function: the device (outlives sessions)
    :param irqs: the client's interrupt table (the function gets it on connect)
    """

    def __init__(self, function: Function, irqs: IrqTable) -> None:
        self.function = function
        self.irqs = irqs
        self.dma = DmaSpace(MAX_DMA_MAPS, MAX_DMA_BYTES)
        self.versioned = False
        #: the client's own limit on data we send it (REGION_READ replies)
        self.client_xfer = CLIENT_DEFAULT_XFER
        self.write_multiple = False
        self.regions: Sequence[RegionSpec] = function.regions()
        self.commands = 0
        self.errors = 0

    # -- entry point ---------------------------------------------------------------

    def handle(self, msg: Message) -> bytes | None:
        """Run one command; return the whole reply message (None: no reply).

        :raise ProtocolError: the connection must close.
        """
        header = msg.header
        if header.is_reply:
            close_fds(msg.fds)
            raise ProtocolError("the client sent a reply; this server sends no commands")
        if not self.versioned and header.command != Command.VERSION:
            close_fds(msg.fds)
            raise ProtocolError(f"first message is command {header.command}, not VERSION")
        self.commands += 1
        try:
            arm = _arm(header.command)
            if len(msg.fds) > arm.fds:
                raise CommandError(
                    f"{Command(header.command).name} with {len(msg.fds)} fds (at most {arm.fds})"
                )
            payload = arm.call(self, msg.body, msg.fds)
        except CommandError as err:
            close_fds(msg.fds)
            self.errors += 1
            if header.no_reply:
                log.warning("posted command %d refused (no reply wanted): %s", header.command, err)
                return None
            log.warning("command %d refused: %s", header.command, err)
            return header.reply(error=err.errno).pack()
        except BaseException:
            close_fds(msg.fds)
            raise
        if header.no_reply:
            return None
        return header.reply(len(payload)).pack() + payload

    def close(self) -> None:
        """The client is gone: release every window (after the function let go)."""
        gone = self.dma.clear()
        if gone:
            self.function.dma_changed(())
        for w in gone:
            w.close()

    # -- arms ---------------------------------------------------------------------------

    def version(self, body: bytes, fds: list[int]) -> bytes:
        if self.versioned:
            raise CommandError("VERSION sent twice")
        v = Version.unpack(body)
        if v.major != VERSION_MAJOR:
            raise CommandError(f"VERSION {v.major}.{v.minor}: only major 0 is known", errno.ENOTSUP)
        caps = v.capabilities
        self.client_xfer = _int_cap(caps, "max_data_xfer_size", CLIENT_DEFAULT_XFER, 1, 1 << 30)
        _int_cap(caps, "max_msg_fds", 1, 0, 253)
        self.write_multiple = caps.get("write_multiple") is True
        ours: dict[str, Any] = {
            "max_msg_fds": MAX_MSG_FDS,
            "max_data_xfer_size": MAX_DATA_XFER,
            "pgsizes": PAGE_SIZE,
            "max_dma_maps": MAX_DMA_MAPS,
        }
        if self.write_multiple:
            ours["write_multiple"] = True
        # No "migration": this library transfers no device state.
        self.versioned = True
        log.info("vfio-user: client version %d.%d, capabilities %s", v.major, v.minor, sorted(caps))
        return Version(VERSION_MAJOR, min(v.minor, VERSION_MINOR), ours).pack()

    def dma_map(self, body: bytes, fds: list[int]) -> bytes:
        req = DmaMap.unpack(body)
        if fds and not req.readable:
            raise CommandError("DMA_MAP with an fd the device may not read")
        win = self.dma.add(req, fds[0] if fds else None)
        try:
            self.function.dma_changed(self.dma.windows)
        except CommandError:
            self.dma.remove(DmaUnmap(DmaUnmap.FMT.size, 0, req.address, req.size))
            win.fd = None  # still the caller's: its error path closes it
            win.close()
            self.function.dma_changed(self.dma.windows)
            raise
        log.debug("DMA map %#x+%#x at file offset %#x", req.address, req.size, req.offset)
        return b""

    def dma_unmap(self, body: bytes, fds: list[int]) -> bytes:
        req = DmaUnmap.unpack(body)
        gone = self.dma.remove(req)
        self.function.dma_changed(self.dma.windows)
        for w in gone:  # after the function dropped its views: the protocol's "release first"
            w.close()
        return req.pack()

    def device_info(self, body: bytes, fds: list[int]) -> bytes:
        DeviceInfo.unpack(body)
        return DeviceInfo(
            DeviceInfo.FMT.size,
            int(self.function.device_flags),
            len(self.regions),
            len(self.function.irqs()),
        ).pack()

    def region_info(self, body: bytes, fds: list[int]) -> bytes:
        req = RegionInfo.unpack(body)
        r = self._region(req.index)
        flags = int(r.flags) if r.size else 0
        return RegionInfo(RegionInfo.FMT.size, flags, r.index, 0, r.size, 0).pack()

    def region_io_fds(self, body: bytes, fds: list[int]) -> bytes:
        # "No ioeventfds for this region": every access stays a message. The request is
        # argsz, flags, index, count: the layout of IRQ info.
        if len(body) != 16:
            raise CommandError(f"DEVICE_GET_REGION_IO_FDS: payload of {len(body)} bytes")
        argsz, flags, index, _count = IrqInfo.FMT.unpack(body)
        if argsz < 16 or flags:
            raise CommandError(f"DEVICE_GET_REGION_IO_FDS: argsz {argsz} flags {flags:#x}")
        self._region(index)
        return IrqInfo.FMT.pack(16, 0, index, 0)

    def irq_info(self, body: bytes, fds: list[int]) -> bytes:
        req = IrqInfo.unpack(body)
        specs = self.function.irqs()
        if not 0 <= req.index < len(specs):
            raise CommandError(f"DEVICE_GET_IRQ_INFO: no interrupt index {req.index}")
        s = specs[req.index]
        return IrqInfo(IrqInfo.FMT.size, int(s.flags) if s.count else 0, s.index, s.count).pack()

    def set_irqs(self, body: bytes, fds: list[int]) -> bytes:
        self.irqs.set_irqs(SetIrqs.unpack(body), fds)
        return b""

    def region_read(self, body: bytes, fds: list[int]) -> bytes:
        req = RegionAccess.unpack_read(body, min(MAX_DATA_XFER, self.client_xfer))
        self._check_access(req, RegionFlag.READ)
        data = self.function.region_read(req.region, req.offset, req.count)
        if len(data) != req.count:
            raise RuntimeError(f"region {req.region} read gave {len(data)} of {req.count} bytes")
        return RegionAccess(req.offset, req.region, req.count, data).pack()

    def region_write(self, body: bytes, fds: list[int]) -> bytes:
        req = RegionAccess.unpack_write(body, MAX_DATA_XFER)
        self._check_access(req, RegionFlag.WRITE)
        self.function.region_write(req.region, req.offset, req.data)
        return req.pack_header()

    def region_write_multi(self, body: bytes, fds: list[int]) -> bytes:
        if not self.write_multiple:
            raise CommandError("REGION_WRITE_MULTI was not negotiated", errno.ENOTSUP)
        multi = WriteMulti.unpack(body)
        for w in multi.writes:
            self._check_access(w, RegionFlag.WRITE)
        for w in multi.writes:
            self.function.region_write(w.region, w.offset, w.data)
        return b""

    def device_reset(self, body: bytes, fds: list[int]) -> bytes:
        if body:
            raise CommandError(f"DEVICE_RESET with a {len(body)}-byte payload")
        log.info("vfio-user: device reset by the client")
        self.function.reset()
        return b""

    # -- checks -------------------------------------------------------------------------

    def _region(self, index: int) -> RegionSpec:
        if not 0 <= index < len(self.regions):
            raise CommandError(f"no region {index}")
        return self.regions[index]

    def _check_access(self, a: RegionAccess, need: RegionFlag) -> None:
        r = self._region(a.region)
        if not r.size or not r.flags & need:
            raise CommandError(f"region {a.region} does not allow {need.name}")
        if a.offset >= r.size or a.count > r.size - a.offset:
            raise CommandError(
                f"access {a.offset:#x}+{a.count} outside region {a.region} of {r.size:#x} bytes"
            )

    @property
    def windows(self) -> tuple[DmaWindow, ...]:
        return self.dma.windows


def _unsupported(name: str) -> Handler:
    def refuse(s: Session, body: bytes, fds: list[int]) -> bytes:
        raise CommandError(f"{name} is not supported by this server", errno.ENOTSUP)

    return refuse


_C = Command
ARMS: dict[Command, Arm] = {
    _C.VERSION: Arm(Session.version),
    _C.DMA_MAP: Arm(Session.dma_map, fds=1),
    _C.DMA_UNMAP: Arm(Session.dma_unmap),
    _C.DEVICE_GET_INFO: Arm(Session.device_info),
    _C.DEVICE_GET_REGION_INFO: Arm(Session.region_info),
    _C.DEVICE_GET_REGION_IO_FDS: Arm(Session.region_io_fds),
    _C.DEVICE_GET_IRQ_INFO: Arm(Session.irq_info),
    _C.DEVICE_SET_IRQS: Arm(Session.set_irqs, fds=MAX_MSG_FDS),
    _C.REGION_READ: Arm(Session.region_read),
    _C.REGION_WRITE: Arm(Session.region_write),
    _C.DEVICE_RESET: Arm(Session.device_reset),
    _C.REGION_WRITE_MULTI: Arm(Session.region_write_multi),
    # Server-to-client commands, dirty logging and migration: never offered.
    _C.DMA_READ: Arm(_unsupported("DMA_READ from the client")),
    _C.DMA_WRITE: Arm(_unsupported("DMA_WRITE from the client")),
    _C.DIRTY_PAGES: Arm(_unsupported("DIRTY_PAGES")),
    _C.DEVICE_FEATURE: Arm(_unsupported("DEVICE_FEATURE (migration)")),
    _C.MIG_DATA_READ: Arm(_unsupported("MIG_DATA_READ")),
    _C.MIG_DATA_WRITE: Arm(_unsupported("MIG_DATA_WRITE")),
}


def _arm(command: int) -> Arm:
    try:
        return ARMS[Command(command)]
    except ValueError:
        raise CommandError(f"unknown command {command}", errno.ENOTSUP) from None
