"""A vfio-user client for tests and benchmarks: QEMU's side of the socket, blocking.

It speaks the protocol as QEMU 11.1 does (VERSION 0.0 with QEMU's capability
set, posted BAR writes, per-vector SET_IRQS with eventfds taken from the
ancillary data) and also lets a test send anything at all
(:meth:`VfioUserClient.send_raw`).
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from vfio_user.connection import Connection, close_fds
from vfio_user.errors import CommandError, ProtocolError
from vfio_user.messages import (
    Command,
    DeviceInfo,
    DmaFlag,
    DmaMap,
    DmaUnmap,
    Header,
    IrqInfo,
    IrqSetFlag,
    RegionAccess,
    RegionInfo,
    SetIrqs,
    Version,
)

#: The capabilities QEMU 11.1 proposes (docs: vfio-user.md part A2).
QEMU_CAPABILITIES: dict[str, Any] = {
    "migration": {"pgsize": 4096, "max_bitmap_size": 268435456},
    "max_msg_fds": 16,
    "max_data_xfer_size": 1048576,
    "pgsizes": 4096,
    "max_dma_maps": 65535,
    "write_multiple": True,
}
#: Seconds to wait for a reply (QEMU's x-msg-timeout).
REPLY_TIMEOUT = 5.0


class VfioUserClient:
    """One blocking client connection.

    :param path: the server's socket
    """

    def __init__(self, path: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        self.conn = Connection(sock, max_message=(2 << 20), max_fds=16)
        self._next_id = 0
        self.server_caps: dict[str, Any] = {}

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> VfioUserClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw ---------------------------------------------------------------------------

    def _id(self) -> int:
        self._next_id = (self._next_id + 1) & 0xFFFF
        return self._next_id

    def send_raw(self, data: bytes, fds: list[int] | None = None) -> None:
        """Send bytes as they are (a hostile test's message)."""
        if fds:
            socket.send_fds(self.conn.sock, [data], fds)
        else:
            self.conn.sock.sendall(data)

    def reply(self, timeout: float = REPLY_TIMEOUT) -> tuple[Header, bytes]:
        """The next message from the server (fds, which it never sends, are closed)."""
        msg = self.conn.wait_message(timeout)
        close_fds(msg.fds)
        return msg.header, msg.body

    def request(
        self,
        command: Command,
        payload: bytes = b"",
        fds: list[int] | None = None,
        *,
        posted: bool = False,
    ) -> bytes:
        """Send a command; return its reply payload (nothing if ``posted``).

        :raise CommandError: on an error reply (``errno`` from the server).
        :raise ProtocolError: on a reply to another message.
        """
        msg_id = self._id()
        header = Header.command_of(msg_id, command, len(payload), no_reply=posted)
        self.conn.send_message(header, payload, fds)
        if posted:
            return b""
        reply, body = self.reply()
        if reply.msg_id != msg_id or reply.command != command or not reply.is_reply:
            raise ProtocolError(f"reply {reply} to message {msg_id} ({command.name})")
        if reply.is_error:
            raise CommandError(f"{command.name} refused: errno {reply.error}", reply.error)
        return body

    # -- commands ------------------------------------------------------------------------

    def version(self, capabilities: dict[str, Any] | None = None) -> Version:
        caps = QEMU_CAPABILITIES if capabilities is None else capabilities
        v = Version.unpack(self.request(Command.VERSION, Version(0, 0, caps).pack()))
        self.server_caps = v.capabilities
        return v

    def dma_map(
        self,
        address: int,
        size: int,
        fd: int | None,
        offset: int = 0,
        flags: int = DmaFlag.READ | DmaFlag.WRITE,
    ) -> None:
        """Map ``size`` bytes at ``address``, backed by ``fd`` at ``offset`` (sent as a fresh
        fd each time, as QEMU does; the caller keeps its own)."""
        req = DmaMap(DmaMap.FMT.size, int(flags), offset, address, size).pack()
        self.request(Command.DMA_MAP, req, [fd] if fd is not None else None)

    def dma_unmap(self, address: int, size: int, flags: int = 0) -> DmaUnmap:
        req = DmaUnmap(DmaUnmap.FMT.size, flags, address, size)
        body = self.request(Command.DMA_UNMAP, req.pack())
        return DmaUnmap(*DmaUnmap.FMT.unpack(body))

    def device_info(self) -> DeviceInfo:
        body = self.request(Command.DEVICE_GET_INFO, DeviceInfo(16, 0, 0, 0).pack())
        return DeviceInfo(*DeviceInfo.FMT.unpack(body))

    def region_info(self, index: int) -> RegionInfo:
        body = self.request(
            Command.DEVICE_GET_REGION_INFO, RegionInfo(32, 0, index, 0, 0, 0).pack()
        )
        return RegionInfo(*RegionInfo.FMT.unpack(body[: RegionInfo.FMT.size]))

    def irq_info(self, index: int) -> IrqInfo:
        body = self.request(Command.DEVICE_GET_IRQ_INFO, IrqInfo(16, 0, index, 0).pack())
        return IrqInfo(*IrqInfo.FMT.unpack(body))

    def set_irqs(
        self,
        index: int,
        flags: IrqSetFlag,
        start: int = 0,
        count: int = 0,
        fds: list[int] | None = None,
        data: bytes = b"",
    ) -> None:
        """DEVICE_SET_IRQS with ``argsz`` 20 and eventfds as ancillary data (QEMU's way)."""
        req = SetIrqs(20, int(flags), index, start, count, data).pack()
        self.request(Command.DEVICE_SET_IRQS, req, fds)

    def read(self, region: int, offset: int, count: int) -> bytes:
        body = self.request(Command.REGION_READ, RegionAccess(offset, region, count).pack())
        reply = RegionAccess.unpack_reply(body)
        if reply.count != count or len(reply.data) != count:
            raise ProtocolError(f"REGION_READ of {count} bytes answered with {len(reply.data)}")
        return reply.data

    def write(self, region: int, offset: int, data: bytes, *, posted: bool = False) -> None:
        """REGION_WRITE; ``posted`` sends it with NO_REPLY, as QEMU does for BAR writes."""
        req = RegionAccess(offset, region, len(data), data).pack()
        self.request(Command.REGION_WRITE, req, posted=posted)

    def read_u(self, region: int, offset: int, size: int) -> int:
        """A little-endian register of 1, 2, 4 or 8 bytes."""
        return int.from_bytes(self.read(region, offset, size), "little")

    def write_u(
        self, region: int, offset: int, size: int, value: int, *, posted: bool = False
    ) -> None:
        self.write(region, offset, value.to_bytes(size, "little"), posted=posted)

    def reset(self) -> None:
        self.request(Command.DEVICE_RESET)

    def sync(self) -> None:
        """Wait until every posted write before it was handled (any command's reply is
        sent after them: commands run in order)."""
        self.request(Command.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0))
