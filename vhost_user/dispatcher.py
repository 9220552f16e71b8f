"""Dispatch of frontend requests: one table, one shape per arm.

Each arm: payload decode (size check), fd count check, protocol-feature gate,
the typed backend call, then the reply or the REPLY_ACK ack. The dispatcher
owns the protocol state (owner, negotiated protocol features) and is the only
place that sees request codes.

Anything malformed raises :class:`ProtocolError`; the daemon then closes the
connection. Fds that came with a rejected message are closed here.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from vhost_user.backend import VhostUserBackend
from vhost_user.connection import Connection
from vhost_user.errors import ProtocolError
from vhost_user.messages import (
    F_PROTOCOL_FEATURES,
    REPLY,
    U64,
    VERSION,
    VRING_IDX_MASK,
    VRING_NOFD,
    ConfigSpace,
    FrontendReq,
    Header,
    MemTable,
    ProtocolFeature,
    SingleRegion,
    VringAddr,
    VringState,
)

log = logging.getLogger(__name__)

#: What an arm returns: payload bytes to reply with, or None (ack if asked).
Reply = bytes | None


@dataclass(frozen=True)
class Arm:
    """How one request is handled.

    :param call: decodes the body and calls the backend; returns the reply payload
    :param fds: fds expected: an int, or a callable of the body giving the count
    :param gate: protocol feature that must be negotiated first
    :param owner: the request needs SET_OWNER first
    :param replies: the request always has a natural reply
    """

    call: Callable[[VhostUserBackend, bytes, list[int]], Reply]
    fds: int | Callable[[bytes], int] = 0
    gate: ProtocolFeature | None = None
    owner: bool = False
    replies: bool = False


def _u64(body: bytes) -> int:
    return U64.unpack(body).value


def _vring_fd_count(body: bytes) -> int:
    return 0 if _u64(body) & VRING_NOFD else 1


def _vring_fd(body: bytes, fds: list[int]) -> tuple[int, int | None]:
    value = _u64(body)
    if value & ~(VRING_IDX_MASK | VRING_NOFD):
        raise ProtocolError(f"vring fd request with unknown bits {value:#x}")
    return value & VRING_IDX_MASK, (None if value & VRING_NOFD else fds[0])


def _table_fd_count(body: bytes) -> int:
    return len(MemTable.unpack(body).regions)


def _get_config(b: VhostUserBackend, body: bytes, fds: list[int]) -> Reply:
    req = ConfigSpace.unpack(body)
    if req.size == 0:
        raise ProtocolError("GET_CONFIG of size 0")
    data = b.get_config(req.offset, req.size)
    return ConfigSpace(req.offset, len(data), req.flags, data).pack()


def _get_vring_base(b: VhostUserBackend, body: bytes, fds: list[int]) -> Reply:
    state = VringState.unpack(body)
    return VringState(state.index, b.get_vring_base(state.index)).pack()


def _set_vring_enable(b: VhostUserBackend, body: bytes, fds: list[int]) -> Reply:
    state = VringState.unpack(body)
    if state.num > 1:
        raise ProtocolError(f"SET_VRING_ENABLE with num {state.num}")
    b.set_vring_enable(state.index, bool(state.num))
    return None


def _rem_mem_reg(b: VhostUserBackend, body: bytes, fds: list[int]) -> Reply:
    _close(fds)  # some frontends pass the region's fd along; it is not needed to unmap
    b.rem_mem_reg(SingleRegion.unpack(body).region)
    return None


def _set_config(b: VhostUserBackend, body: bytes, fds: list[int]) -> Reply:
    c = ConfigSpace.unpack(body)
    b.set_config(c.offset, c.data, c.flags)
    return None


_R = FrontendReq
_PF = ProtocolFeature

ARMS: dict[FrontendReq, Arm] = {
    _R.GET_FEATURES: Arm(lambda b, body, f: U64(b.get_features()).pack(), replies=True),
    _R.SET_FEATURES: Arm(lambda b, body, f: b.set_features(_u64(body))),
    _R.GET_PROTOCOL_FEATURES: Arm(
        lambda b, body, f: U64(b.get_protocol_features()).pack(), replies=True
    ),
    _R.SET_PROTOCOL_FEATURES: Arm(lambda b, body, f: b.set_protocol_features(_u64(body))),
    _R.SET_OWNER: Arm(lambda b, body, f: b.set_owner()),
    _R.RESET_OWNER: Arm(lambda b, body, f: b.reset_owner()),
    _R.GET_QUEUE_NUM: Arm(
        lambda b, body, f: U64(b.get_queue_num()).pack(), gate=_PF.MQ, replies=True
    ),
    _R.SET_MEM_TABLE: Arm(
        lambda b, body, f: b.set_mem_table(MemTable.unpack(body).regions, f),
        fds=_table_fd_count,
        owner=True,
    ),
    _R.GET_MAX_MEM_SLOTS: Arm(
        lambda b, body, f: U64(b.get_max_mem_slots()).pack(),
        gate=_PF.CONFIGURE_MEM_SLOTS,
        replies=True,
    ),
    _R.ADD_MEM_REG: Arm(
        lambda b, body, f: b.add_mem_reg(SingleRegion.unpack(body).region, f[0]),
        fds=1,
        gate=_PF.CONFIGURE_MEM_SLOTS,
        owner=True,
    ),
    _R.REM_MEM_REG: Arm(
        _rem_mem_reg,
        fds=lambda body: -1,  # 0 or 1: some frontends pass the region's fd; we close it
        gate=_PF.CONFIGURE_MEM_SLOTS,
        owner=True,
    ),
    _R.SET_VRING_NUM: Arm(lambda b, body, f: b.set_vring_num(*_state(body)), owner=True),
    _R.SET_VRING_ADDR: Arm(lambda b, body, f: b.set_vring_addr(VringAddr.unpack(body)), owner=True),
    _R.SET_VRING_BASE: Arm(lambda b, body, f: b.set_vring_base(*_state(body)), owner=True),
    _R.GET_VRING_BASE: Arm(_get_vring_base, owner=True, replies=True),
    _R.SET_VRING_KICK: Arm(
        lambda b, body, f: b.set_vring_kick(*_vring_fd(body, f)), fds=_vring_fd_count, owner=True
    ),
    _R.SET_VRING_CALL: Arm(
        lambda b, body, f: b.set_vring_call(*_vring_fd(body, f)), fds=_vring_fd_count, owner=True
    ),
    _R.SET_VRING_ERR: Arm(
        lambda b, body, f: b.set_vring_err(*_vring_fd(body, f)), fds=_vring_fd_count, owner=True
    ),
    _R.SET_VRING_ENABLE: Arm(_set_vring_enable, owner=True),
    _R.SET_BACKEND_REQ_FD: Arm(
        lambda b, body, f: b.set_backend_req_fd(f[0]), fds=1, gate=_PF.BACKEND_REQ
    ),
    _R.GET_CONFIG: Arm(_get_config, gate=_PF.CONFIG, replies=True),
    _R.SET_CONFIG: Arm(_set_config, gate=_PF.CONFIG),
    _R.RESET_DEVICE: Arm(lambda b, body, f: b.reset_device(), gate=_PF.RESET_DEVICE),
    _R.SET_STATUS: Arm(lambda b, body, f: b.set_status(_u64(body)), gate=_PF.STATUS),
    _R.GET_STATUS: Arm(
        lambda b, body, f: U64(b.get_status()).pack(), gate=_PF.STATUS, replies=True
    ),
}

#: Requests whose payload is empty.
_EMPTY = {
    _R.GET_FEATURES,
    _R.GET_PROTOCOL_FEATURES,
    _R.SET_OWNER,
    _R.RESET_OWNER,
    _R.GET_QUEUE_NUM,
    _R.GET_MAX_MEM_SLOTS,
    _R.RESET_DEVICE,
    _R.GET_STATUS,
}


def _state(body: bytes) -> tuple[int, int]:
    s = VringState.unpack(body)
    return s.index, s.num


class Dispatcher:
    """Reads requests from one frontend connection and runs them against a backend.

    :param conn: the main socket
    :param backend: the device side
    """

    def __init__(self, conn: Connection, backend: VhostUserBackend) -> None:
        self.conn = conn
        self.backend = backend
        self.owner = False
        self.protocol_features = 0

    def negotiated(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features & feature)

    def handle_one(self) -> FrontendReq | None:
        """Take what the frontend sent and handle a request once one is whole (runs in the
        event loop, never blocks); None while a request is still arriving.

        :raise ProtocolError: the frontend broke the protocol (close the connection).
        :raise DisconnectedError: the frontend went away.
        """
        msg = self.conn.poll_message()
        if msg is None:
            return None
        header, body, fds = msg
        try:
            req = self._check(header, body, fds)
        except BaseException:
            _close(fds)
            raise
        arm = ARMS[req]
        log.debug("<- %s %s", req.name, body.hex() if len(body) <= 40 else f"({len(body)} bytes)")
        try:
            reply = arm.call(self.backend, body, fds)
        except BaseException:
            _close(fds)  # ownership did not pass to the backend
            raise
        self._after(req, body)
        if arm.replies:
            assert reply is not None
            self.conn.send_message(Header(req, VERSION | REPLY, len(reply)), reply)
        elif header.need_reply and self.negotiated(ProtocolFeature.REPLY_ACK):
            ack = U64(0).pack()
            self.conn.send_message(Header(req, VERSION | REPLY, len(ack)), ack)
        return req

    def _check(self, header: Header, body: bytes, fds: list[int]) -> FrontendReq:
        try:
            req = FrontendReq(header.request)
        except ValueError:
            raise ProtocolError(f"unknown request {header.request}") from None
        arm = ARMS.get(req)
        if arm is None:
            raise ProtocolError(f"{req.name} is not supported by this backend")
        if req in _EMPTY and body:
            raise ProtocolError(f"{req.name} with a {len(body)}-byte payload")
        if arm.gate is not None and not self.negotiated(arm.gate):
            raise ProtocolError(f"{req.name} without protocol feature {arm.gate.name}")
        if arm.owner and not self.owner:
            raise ProtocolError(f"{req.name} before SET_OWNER")
        want = arm.fds(body) if callable(arm.fds) else arm.fds
        if want == -1 and len(fds) <= 1:
            return req
        if len(fds) != want:
            raise ProtocolError(f"{req.name} with {len(fds)} fds, expected {want}")
        return req

    def _after(self, req: FrontendReq, body: bytes) -> None:
        """Protocol state kept by the dispatcher itself."""
        if req is FrontendReq.SET_OWNER:
            self.owner = True
        elif req is FrontendReq.SET_PROTOCOL_FEATURES:
            self.protocol_features = _u64(body)
        elif req is FrontendReq.RESET_OWNER:
            self.owner = False


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


__all__ = ["ARMS", "F_PROTOCOL_FEATURES", "Arm", "Dispatcher"]
