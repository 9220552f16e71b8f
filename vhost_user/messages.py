"""vhost-user messages: request codes, feature bits, header and payloads.

Layouts follow QEMU's docs/interop/vhost-user.rst ("Message Specification",
"Payload"). The header is in host byte order; so are the payloads (this
backend runs on little-endian x86). Each payload is a frozen dataclass with
``unpack`` (which validates sizes and values) and ``pack``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import ClassVar

from vhost_user.errors import ProtocolError

HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size
#: Largest payload accepted (memory table 264, config 12 + 256).
MAX_PAYLOAD = 4096
#: Header flags.
VERSION = 0x1
VERSION_MASK = 0x3
REPLY = 0x4
NEED_REPLY = 0x8
#: Most regions in SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS).
MAX_TABLE_REGIONS = 8
#: Most fds a message may carry (sized for the memory table, with margin).
MAX_FDS = 16
#: Largest config space QEMU exchanges.
MAX_CONFIG_SIZE = 256
#: vring index / no-fd bits of the u64 in SET_VRING_KICK/CALL/ERR.
VRING_IDX_MASK = 0xFF
VRING_NOFD = 0x100
#: Bit 30 of the virtio features: the protocol-features extension.
F_PROTOCOL_FEATURES = 1 << 30


class FrontendReq(IntEnum):
    """Requests from the frontend (QEMU) on the main socket."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendReq(IntEnum):
    """Requests from the backend on the backend-request channel."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3


class ProtocolFeature(IntFlag):
    """Protocol feature bits (GET/SET_PROTOCOL_FEATURES)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


@dataclass(frozen=True)
class Header:
    """The 12-byte message header."""

    request: int
    flags: int
    size: int

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        """:raise ProtocolError: on a bad version or an oversized payload."""
        request, flags, size = HEADER.unpack(data)
        if flags & VERSION_MASK != VERSION:
            raise ProtocolError(f"header version {flags & VERSION_MASK} (flags {flags:#x})")
        if size > MAX_PAYLOAD:
            raise ProtocolError(f"payload of {size} bytes is larger than {MAX_PAYLOAD}")
        return cls(request, flags, size)

    def pack(self) -> bytes:
        return HEADER.pack(self.request, self.flags, self.size)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & NEED_REPLY)


def _exact(name: str, body: bytes, size: int) -> None:
    if len(body) != size:
        raise ProtocolError(f"{name}: payload of {len(body)} bytes, expected {size}")


@dataclass(frozen=True)
class U64:
    """A single u64 payload (features, vring fd index, status, acks)."""

    value: int
    FMT: ClassVar[struct.Struct] = struct.Struct("<Q")

    @classmethod
    def unpack(cls, body: bytes) -> U64:
        _exact("u64", body, 8)
        return cls(cls.FMT.unpack(body)[0])

    def pack(self) -> bytes:
        return self.FMT.pack(self.value & 0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class VringState:
    """``struct vhost_vring_state``: a ring index and a number."""

    index: int
    num: int
    FMT: ClassVar[struct.Struct] = struct.Struct("<II")

    @classmethod
    def unpack(cls, body: bytes) -> VringState:
        _exact("vring state", body, 8)
        return cls(*cls.FMT.unpack(body))

    def pack(self) -> bytes:
        return self.FMT.pack(self.index, self.num)


@dataclass(frozen=True)
class VringAddr:
    """``struct vhost_vring_addr``: frontend virtual addresses (order desc, used, avail)."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int
    FMT: ClassVar[struct.Struct] = struct.Struct("<IIQQQQ")

    @classmethod
    def unpack(cls, body: bytes) -> VringAddr:
        _exact("vring address", body, 40)
        return cls(*cls.FMT.unpack(body))

    def pack(self) -> bytes:
        return self.FMT.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)


@dataclass(frozen=True)
class MemRegion:
    """One memory region: guest physical range, frontend virtual address, file offset."""

    gpa: int
    size: int
    uaddr: int
    mmap_offset: int
    FMT: ClassVar[struct.Struct] = struct.Struct("<QQQQ")

    @classmethod
    def unpack_from(cls, body: bytes, off: int) -> MemRegion:
        r = cls(*cls.FMT.unpack_from(body, off))
        r.validate()
        return r

    def validate(self) -> None:
        """:raise ProtocolError: on an empty or wrapping region."""
        if self.size == 0:
            raise ProtocolError(f"memory region at gpa {self.gpa:#x} has size 0")
        for name, base in (
            ("gpa", self.gpa),
            ("uaddr", self.uaddr),
            ("mmap_offset", self.mmap_offset),
        ):
            if base + self.size > 1 << 64:
                raise ProtocolError(f"memory region {name} {base:#x} + {self.size:#x} wraps")

    def pack(self) -> bytes:
        return self.FMT.pack(self.gpa, self.size, self.uaddr, self.mmap_offset)


@dataclass(frozen=True)
class MemTable:
    """SET_MEM_TABLE payload: up to 8 regions (one fd each, in order)."""

    regions: tuple[MemRegion, ...]

    @classmethod
    def unpack(cls, body: bytes) -> MemTable:
        if len(body) < 8:
            raise ProtocolError(f"memory table: payload of {len(body)} bytes")
        n, _pad = struct.unpack_from("<II", body)
        if n == 0 or n > MAX_TABLE_REGIONS:
            raise ProtocolError(f"memory table with {n} regions (1..{MAX_TABLE_REGIONS})")
        if len(body) < 8 + 32 * n:
            raise ProtocolError(f"memory table of {n} regions in {len(body)} bytes")
        return cls(tuple(MemRegion.unpack_from(body, 8 + 32 * i) for i in range(n)))

    def pack(self) -> bytes:
        body = struct.pack("<II", len(self.regions), 0) + b"".join(r.pack() for r in self.regions)
        return body + bytes(32 * (MAX_TABLE_REGIONS - len(self.regions)))


@dataclass(frozen=True)
class SingleRegion:
    """ADD_MEM_REG / REM_MEM_REG payload: padding, then one region."""

    region: MemRegion

    @classmethod
    def unpack(cls, body: bytes) -> SingleRegion:
        _exact("single memory region", body, 40)
        return cls(MemRegion.unpack_from(body, 8))

    def pack(self) -> bytes:
        return bytes(8) + self.region.pack()


@dataclass(frozen=True)
class ConfigSpace:
    """GET_CONFIG / SET_CONFIG payload: offset, size, flags, then ``size`` bytes."""

    offset: int
    size: int
    flags: int
    data: bytes
    FMT: ClassVar[struct.Struct] = struct.Struct("<III")

    @classmethod
    def unpack(cls, body: bytes) -> ConfigSpace:
        if len(body) < 12:
            raise ProtocolError(f"config: payload of {len(body)} bytes")
        offset, size, flags = cls.FMT.unpack_from(body)
        if size > MAX_CONFIG_SIZE or offset + size > MAX_CONFIG_SIZE:
            raise ProtocolError(f"config access {offset}+{size} beyond {MAX_CONFIG_SIZE} bytes")
        if len(body) != 12 + size:
            raise ProtocolError(f"config of {size} bytes in a payload of {len(body)}")
        return cls(offset, size, flags, bytes(body[12:]))

    def pack(self) -> bytes:
        return self.FMT.pack(self.offset, self.size, self.flags) + self.data
