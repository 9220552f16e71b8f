"""The typed interface a vhost-user device implements: one method per request.

The dispatcher decodes and validates a message, then calls the method named
after it; a method not overridden raises :class:`Unsupported`, which closes
the connection (the frontend asked for something we never offered).
Methods run inside the event loop.
"""

from __future__ import annotations

from vhost_user.errors import Unsupported
from vhost_user.messages import MemRegion, VringAddr


class VhostUserBackend:
    """Base class of backends; every default refuses the request."""

    def get_features(self) -> int:
        """Virtio features offered (including bit 30 for protocol features)."""
        raise Unsupported("GET_FEATURES")

    def set_features(self, features: int) -> None:
        raise Unsupported("SET_FEATURES")

    def get_protocol_features(self) -> int:
        raise Unsupported("GET_PROTOCOL_FEATURES")

    def set_protocol_features(self, features: int) -> None:
        raise Unsupported("SET_PROTOCOL_FEATURES")

    def set_owner(self) -> None:
        raise Unsupported("SET_OWNER")

    def reset_owner(self) -> None:
        raise Unsupported("RESET_OWNER")

    def get_queue_num(self) -> int:
        raise Unsupported("GET_QUEUE_NUM")

    def set_mem_table(self, regions: tuple[MemRegion, ...], fds: list[int]) -> None:
        """Replace guest memory; the backend owns ``fds`` from here on."""
        raise Unsupported("SET_MEM_TABLE")

    def get_max_mem_slots(self) -> int:
        raise Unsupported("GET_MAX_MEM_SLOTS")

    def add_mem_reg(self, region: MemRegion, fd: int) -> None:
        raise Unsupported("ADD_MEM_REG")

    def rem_mem_reg(self, region: MemRegion) -> None:
        raise Unsupported("REM_MEM_REG")

    def set_vring_num(self, index: int, num: int) -> None:
        raise Unsupported("SET_VRING_NUM")

    def set_vring_addr(self, addr: VringAddr) -> None:
        raise Unsupported("SET_VRING_ADDR")

    def set_vring_base(self, index: int, base: int) -> None:
        raise Unsupported("SET_VRING_BASE")

    def get_vring_base(self, index: int) -> int:
        """Stop the ring; return the next avail index to process."""
        raise Unsupported("GET_VRING_BASE")

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        raise Unsupported("SET_VRING_KICK")

    def set_vring_call(self, index: int, fd: int | None) -> None:
        raise Unsupported("SET_VRING_CALL")

    def set_vring_err(self, index: int, fd: int | None) -> None:
        raise Unsupported("SET_VRING_ERR")

    def set_vring_enable(self, index: int, enable: bool) -> None:
        raise Unsupported("SET_VRING_ENABLE")

    def set_backend_req_fd(self, fd: int) -> None:
        raise Unsupported("SET_BACKEND_REQ_FD")

    def get_config(self, offset: int, size: int) -> bytes:
        raise Unsupported("GET_CONFIG")

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        raise Unsupported("SET_CONFIG")

    def reset_device(self) -> None:
        raise Unsupported("RESET_DEVICE")

    def set_status(self, status: int) -> None:
        raise Unsupported("SET_STATUS")

    def get_status(self) -> int:
        raise Unsupported("GET_STATUS")
