"""A vhost-user frontend (the side QEMU plays): used by the tests and benchmarks.

It speaks the protocol over a real Unix socket with real fds: memory table
fds, kick and call eventfds, the backend-request channel. Each method sends
one request and, where the protocol has one, waits for the reply.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

from vhost_user.connection import Connection
from vhost_user.errors import ProtocolError
from vhost_user.messages import (
    F_PROTOCOL_FEATURES,
    NEED_REPLY,
    REPLY,
    U64,
    VERSION,
    VRING_NOFD,
    ConfigSpace,
    FrontendReq,
    Header,
    MemRegion,
    MemTable,
    ProtocolFeature,
    SingleRegion,
    VringAddr,
    VringState,
)


@dataclass
class FrontendRegion:
    """A region as the frontend shares it: guest range, our virtual address, fd and offset."""

    gpa: int
    size: int
    uaddr: int
    fd: int
    offset: int = 0

    def msg(self) -> MemRegion:
        return MemRegion(self.gpa, self.size, self.uaddr, self.offset)


class VhostUserFrontend:
    """Client side of the main socket.

    :param path: the backend's socket, or pass ``sock`` already connected
    """

    def __init__(self, path: str | None = None, sock: socket.socket | None = None) -> None:
        if sock is None:
            if path is None:
                raise ValueError("give the backend's socket path or a connected socket")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
        self.conn = Connection(sock)
        self.protocol_features = 0
        self.backend_channel: socket.socket | None = None

    def close(self) -> None:
        self.conn.close()
        if self.backend_channel is not None:
            self.backend_channel.close()

    # -- framing ----------------------------------------------------------------

    def send(
        self,
        req: int,
        body: bytes = b"",
        fds: list[int] | None = None,
        *,
        need_reply: bool = False,
        flags: int | None = None,
    ) -> None:
        f = VERSION | (NEED_REPLY if need_reply else 0) if flags is None else flags
        self.conn.send_message(Header(req, f, len(body)), body, fds)

    def recv_reply(self, req: int) -> bytes:
        header, body, fds = self.conn.recv_message()
        for fd in fds:
            os.close(fd)
        if header.request != req or not header.flags & REPLY:
            raise ProtocolError(f"expected reply to {req}, got {header}")
        return body

    def request(
        self,
        req: FrontendReq,
        body: bytes = b"",
        fds: list[int] | None = None,
        *,
        reply: bool = False,
    ) -> bytes | None:
        """Send; read the natural reply (``reply``) or the REPLY_ACK ack if negotiated."""
        ack = not reply and bool(self.protocol_features & ProtocolFeature.REPLY_ACK)
        self.send(req, body, fds, need_reply=ack)
        if reply:
            return self.recv_reply(req)
        if ack:
            status = U64.unpack(self.recv_reply(req)).value
            if status:
                raise ProtocolError(f"{req.name} failed with status {status}")
        return None

    # -- requests -----------------------------------------------------------------

    def get_features(self) -> int:
        return U64.unpack(self.request(FrontendReq.GET_FEATURES, reply=True) or b"").value

    def set_features(self, features: int) -> None:
        self.request(FrontendReq.SET_FEATURES, U64(features).pack())

    def get_protocol_features(self) -> int:
        body = self.request(FrontendReq.GET_PROTOCOL_FEATURES, reply=True) or b""
        return U64.unpack(body).value

    def set_protocol_features(self, features: int) -> None:
        self.send(FrontendReq.SET_PROTOCOL_FEATURES, U64(features).pack())
        self.protocol_features = features

    def set_owner(self) -> None:
        self.request(FrontendReq.SET_OWNER)

    def open_backend_channel(self) -> socket.socket:
        """SET_BACKEND_REQ_FD: returns our end of the backend-request channel."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.request(FrontendReq.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
        theirs.close()
        self.backend_channel = ours
        return ours

    def set_mem_table(self, regions: list[FrontendRegion]) -> None:
        table = MemTable(tuple(r.msg() for r in regions))
        self.request(FrontendReq.SET_MEM_TABLE, table.pack(), [r.fd for r in regions])

    def add_mem_reg(self, region: FrontendRegion) -> None:
        self.request(FrontendReq.ADD_MEM_REG, SingleRegion(region.msg()).pack(), [region.fd])

    def rem_mem_reg(self, region: FrontendRegion) -> None:
        self.request(FrontendReq.REM_MEM_REG, SingleRegion(region.msg()).pack())

    def get_max_mem_slots(self) -> int:
        return U64.unpack(self.request(FrontendReq.GET_MAX_MEM_SLOTS, reply=True) or b"").value

    def set_vring_num(self, index: int, num: int) -> None:
        self.request(FrontendReq.SET_VRING_NUM, VringState(index, num).pack())

    def set_vring_base(self, index: int, base: int) -> None:
        self.request(FrontendReq.SET_VRING_BASE, VringState(index, base).pack())

    def set_vring_addr(self, index: int, desc: int, avail: int, used: int) -> None:
        self.request(FrontendReq.SET_VRING_ADDR, VringAddr(index, 0, desc, used, avail, 0).pack())

    def _vring_fd(self, req: FrontendReq, index: int, fd: int | None) -> None:
        if fd is None:
            self.request(req, U64(index | VRING_NOFD).pack())
        else:
            self.request(req, U64(index).pack(), [fd])

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._vring_fd(FrontendReq.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._vring_fd(FrontendReq.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._vring_fd(FrontendReq.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.request(FrontendReq.SET_VRING_ENABLE, VringState(index, int(enable)).pack())

    def get_vring_base(self, index: int) -> int:
        body = self.request(FrontendReq.GET_VRING_BASE, VringState(index, 0).pack(), reply=True)
        return VringState.unpack(body or b"").num

    def get_config(self, offset: int, size: int) -> bytes:
        body = self.request(
            FrontendReq.GET_CONFIG, ConfigSpace(offset, size, 0, bytes(size)).pack(), reply=True
        )
        return ConfigSpace.unpack(body or b"").data

    def set_config(self, offset: int, data: bytes) -> None:
        self.request(FrontendReq.SET_CONFIG, ConfigSpace(offset, len(data), 0, data).pack())

    def set_status(self, status: int) -> None:
        self.request(FrontendReq.SET_STATUS, U64(status).pack())

    def get_status(self) -> int:
        body = self.request(FrontendReq.GET_STATUS, reply=True)
        assert body is not None
        return U64.unpack(body).value

    def reset_device(self) -> None:
        self.request(FrontendReq.RESET_DEVICE)

    # -- sequences ----------------------------------------------------------------

    def handshake(self, protocol_features: int | None = None, *, without: int = 0) -> int:
        """QEMU's realize order: features, protocol features, backend channel, owner.

        :param protocol_features: what to acknowledge (default: everything offered)
        :param without: protocol features to leave out of what is offered
        :return: the backend's virtio features (without bit 30).
        """
        features = self.get_features()
        if not features & F_PROTOCOL_FEATURES:
            raise ProtocolError("backend does not offer protocol features")
        offered = self.get_protocol_features()
        ack = offered if protocol_features is None else protocol_features
        self.set_protocol_features(ack & ~without)
        if self.protocol_features & ProtocolFeature.BACKEND_REQ:
            self.open_backend_channel()
        self.set_owner()
        return features & ~F_PROTOCOL_FEATURES

    def start_vring(
        self,
        index: int,
        num: int,
        desc: int,
        avail: int,
        used: int,
        kick: int,
        call: int,
        base: int = 0,
        *,
        enable: bool = True,
    ) -> None:
        """QEMU's start order for one ring: NUM, BASE, ADDR, KICK, CALL, then ENABLE (QEMU
        enables every ring only once all are set up: pass ``enable=False`` for that)."""
        self.set_vring_num(index, num)
        self.set_vring_base(index, base)
        self.set_vring_addr(index, desc, avail, used)
        self.set_vring_kick(index, kick)
        self.set_vring_call(index, call)
        if enable:
            self.set_vring_enable(index, True)

    def stop_device(
        self, num_vqs: int, started: list[int], *, status_zero: bool = False
    ) -> dict[int, int]:
        """QEMU 11.1's stop order, measured with vhost-user-test-device (a VM pause, a guest
        reset and a quit look the same): SET_VRING_ENABLE(0) on all ``num_vqs`` rings, then
        GET_VRING_BASE per started ring; no SET_STATUS(0), although STATUS is negotiated.
        ``status_zero`` sends the SET_STATUS(0) other frontends send, before the rest.

        :return: each started ring's base, for the next start.
        """
        if status_zero and self.protocol_features & ProtocolFeature.STATUS:
            self.set_status(0)
        for index in range(num_vqs):
            self.set_vring_enable(index, False)
        return {index: self.get_vring_base(index) for index in started}

    def read_backend_request(self) -> tuple[int, int]:
        """One message from the backend channel: (request, flags)."""
        assert self.backend_channel is not None
        data = self.backend_channel.recv(12, socket.MSG_WAITALL)
        req, flags, size = struct.unpack("<III", data)
        if size:
            self.backend_channel.recv(size, socket.MSG_WAITALL)
        return req, flags
