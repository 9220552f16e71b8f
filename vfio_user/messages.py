"""vfio-user messages: commands, flags, the header and every payload the server handles.

Layouts follow QEMU's ``docs/interop/vfio-user.rst`` and the VFIO structures it
reuses (``linux/vfio.h``): host byte order, this server runs on little-endian
x86. Each payload is a frozen dataclass whose ``unpack`` checks sizes and
values and raises :class:`CommandError` (an error reply) on anything wrong,
and whose ``pack`` gives the wire bytes. Only :class:`Header` raises
:class:`ProtocolError`: a header that cannot be trusted leaves no way to find
the next message.
"""

from __future__ import annotations

import errno
import json
import struct
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Any, ClassVar

from vfio_user.errors import CommandError, ProtocolError

HEADER = struct.Struct("<HHIII")
HEADER_SIZE = HEADER.size
#: Header flag bits: the message type (low nibble), no reply wanted, error reply.
TYPE_MASK = 0xF
TYPE_COMMAND = 0
TYPE_REPLY = 1
NO_REPLY = 0x10
ERROR = 0x20
_KNOWN_FLAGS = TYPE_MASK | NO_REPLY | ERROR
#: The only protocol version there is.
VERSION_MAJOR = 0
VERSION_MINOR = 0
#: Page size of DMA maps (the ``pgsizes`` capability).
PAGE_SIZE = 4096
_U64_LIMIT = 1 << 64


class Command(IntEnum):
    """Command codes (vfio-user.rst, "Commands")."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


class DmaFlag(IntFlag):
    """DMA_MAP flags: what the device may do in the window."""

    READ = 1 << 0
    WRITE = 1 << 1


class DmaUnmapFlag(IntFlag):
    """DMA_UNMAP flags (VFIO's)."""

    GET_DIRTY_BITMAP = 1 << 0
    ALL = 1 << 1


class DeviceFlag(IntFlag):
    """DEVICE_GET_INFO flags (``VFIO_DEVICE_FLAGS_*``)."""

    RESET = 1 << 0
    PCI = 1 << 1


class RegionFlag(IntFlag):
    """DEVICE_GET_REGION_INFO flags (``VFIO_REGION_INFO_FLAG_*``)."""

    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class IrqInfoFlag(IntFlag):
    """DEVICE_GET_IRQ_INFO flags (``VFIO_IRQ_INFO_*``)."""

    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqSetFlag(IntFlag):
    """DEVICE_SET_IRQS flags (``VFIO_IRQ_SET_*``): one data type, one action."""

    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


IRQ_DATA_TYPES = IrqSetFlag.DATA_NONE | IrqSetFlag.DATA_BOOL | IrqSetFlag.DATA_EVENTFD
IRQ_ACTIONS = IrqSetFlag.ACTION_MASK | IrqSetFlag.ACTION_UNMASK | IrqSetFlag.ACTION_TRIGGER

# Masks of the flag bits each payload may carry, as plain ints: ``~`` of an IntFlag
# inverts only within the flag's own members (``~DmaFlag(3)`` is 0), so a check
# ``flags & ~Flag`` would let every unknown bit through.
_DMA_MAP_FLAGS = int(DmaFlag.READ | DmaFlag.WRITE)
_DMA_UNMAP_FLAGS = int(DmaUnmapFlag.GET_DIRTY_BITMAP | DmaUnmapFlag.ALL)
_SET_IRQS_FLAGS = int(IRQ_DATA_TYPES | IRQ_ACTIONS)


class PciRegion(IntEnum):
    """Region indexes of a PCI device (``VFIO_PCI_*_REGION_INDEX``)."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


class PciIrq(IntEnum):
    """Interrupt indexes of a PCI device (``VFIO_PCI_*_IRQ_INDEX``)."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


@dataclass(frozen=True)
class Header:
    """The 16-byte header; ``size`` counts the header too."""

    msg_id: int
    command: int
    size: int
    flags: int = TYPE_COMMAND
    error: int = 0

    @classmethod
    def unpack(cls, data: bytes, max_size: int) -> Header:
        """:raise ProtocolError: on a size below the header or above ``max_size``, or
        unknown flag bits (the stream cannot be trusted past this header)."""
        msg_id, command, size, flags, error = HEADER.unpack(data)
        if size < HEADER_SIZE:
            raise ProtocolError(f"message size {size} is smaller than its header")
        if size > max_size:
            raise ProtocolError(f"message of {size} bytes is larger than the {max_size} allowed")
        if flags & ~_KNOWN_FLAGS or flags & TYPE_MASK not in (TYPE_COMMAND, TYPE_REPLY):
            raise ProtocolError(f"header flags {flags:#x}")
        return cls(msg_id, command, size, flags, error)

    def pack(self) -> bytes:
        return HEADER.pack(self.msg_id, self.command, self.size, self.flags, self.error)

    @property
    def is_reply(self) -> bool:
        return self.flags & TYPE_MASK == TYPE_REPLY

    @property
    def no_reply(self) -> bool:
        """The sender wants no reply (a posted write)."""
        return bool(self.flags & NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & ERROR)

    @property
    def payload_size(self) -> int:
        return self.size - HEADER_SIZE

    def reply(self, payload_size: int = 0, error: int | None = None) -> Header:
        """The header of the reply to this command (an error reply carries no payload)."""
        if error is not None:
            return Header(self.msg_id, self.command, HEADER_SIZE, TYPE_REPLY | ERROR, error)
        return Header(self.msg_id, self.command, HEADER_SIZE + payload_size, TYPE_REPLY)

    @classmethod
    def command_of(
        cls, msg_id: int, command: Command, payload_size: int, *, no_reply: bool = False
    ) -> Header:
        """A command header (the client's side)."""
        flags = TYPE_COMMAND | (NO_REPLY if no_reply else 0)
        return cls(msg_id, command, HEADER_SIZE + payload_size, flags)


def _exact(name: str, body: bytes, size: int) -> None:
    if len(body) != size:
        raise CommandError(f"{name}: payload of {len(body)} bytes, expected {size}")


def _argsz(name: str, argsz: int, least: int) -> None:
    if argsz < least:
        raise CommandError(f"{name}: argsz {argsz} is smaller than {least}")


@dataclass(frozen=True)
class Version:
    """VERSION: ``u16 major; u16 minor; char json[]`` (NUL-terminated capabilities)."""

    major: int
    minor: int
    capabilities: dict[str, Any] = field(default_factory=dict)
    FMT: ClassVar[struct.Struct] = struct.Struct("<HH")
    #: Largest JSON accepted (QEMU's is about 200 bytes).
    MAX_JSON: ClassVar[int] = 4096

    @classmethod
    def unpack(cls, body: bytes) -> Version:
        if len(body) < cls.FMT.size:
            raise CommandError(f"VERSION: payload of {len(body)} bytes")
        major, minor = cls.FMT.unpack_from(body)
        text = body[cls.FMT.size :]
        caps: dict[str, Any] = {}
        if text:
            if len(text) > cls.MAX_JSON:
                raise CommandError(f"VERSION: {len(text)} bytes of JSON")
            if text[-1] != 0:
                raise CommandError("VERSION: JSON not NUL-terminated")
            try:
                doc = json.loads(text[:-1].decode()) if len(text) > 1 else {}
            # RecursionError: a few thousand "[" nest deeper than json's recursion limit;
            # that is a bad payload (an error reply), not an internal error.
            except (UnicodeDecodeError, ValueError, RecursionError) as err:
                raise CommandError(f"VERSION: bad JSON: {err}") from None
            if not isinstance(doc, dict):
                raise CommandError("VERSION: JSON is not an object")
            inner = doc.get("capabilities", {})
            if not isinstance(inner, dict):
                raise CommandError("VERSION: capabilities is not an object")
            caps = inner
        return cls(major, minor, caps)

    def pack(self) -> bytes:
        text = json.dumps({"capabilities": self.capabilities}, sort_keys=True).encode()
        return self.FMT.pack(self.major, self.minor) + text + b"\0"


@dataclass(frozen=True)
class DmaMap:
    """DMA_MAP: ``u32 argsz; u32 flags; u64 offset; u64 address; u64 size``.

    With a file descriptor, ``[address, address + size)`` of the client's DMA
    space is the file's ``[offset, offset + size)``.
    """

    argsz: int
    flags: int
    offset: int
    address: int
    size: int
    FMT: ClassVar[struct.Struct] = struct.Struct("<IIQQQ")

    @classmethod
    def unpack(cls, body: bytes) -> DmaMap:
        _exact("DMA_MAP", body, cls.FMT.size)
        m = cls(*cls.FMT.unpack(body))
        _argsz("DMA_MAP", m.argsz, cls.FMT.size)
        if m.flags & ~_DMA_MAP_FLAGS:
            raise CommandError(f"DMA_MAP: unknown flags {m.flags:#x}")
        if not m.size or (m.address | m.size | m.offset) % PAGE_SIZE:
            raise CommandError(
                f"DMA_MAP: address {m.address:#x} size {m.size:#x} offset {m.offset:#x} "
                f"not {PAGE_SIZE}-byte pages"
            )
        if m.address + m.size > _U64_LIMIT or m.offset + m.size > _U64_LIMIT:
            raise CommandError(f"DMA_MAP: [{m.address:#x} +{m.size:#x}] wraps around 2^64")
        return m

    def pack(self) -> bytes:
        return self.FMT.pack(self.argsz, self.flags, self.offset, self.address, self.size)

    @property
    def readable(self) -> bool:
        return bool(self.flags & DmaFlag.READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & DmaFlag.WRITE)


@dataclass(frozen=True)
class DmaUnmap:
    """DMA_UNMAP: ``u32 argsz; u32 flags; u64 address; u64 size`` (echoed in the reply)."""

    argsz: int
    flags: int
    address: int
    size: int
    FMT: ClassVar[struct.Struct] = struct.Struct("<IIQQ")

    @classmethod
    def unpack(cls, body: bytes) -> DmaUnmap:
        _exact("DMA_UNMAP", body, cls.FMT.size)
        u = cls(*cls.FMT.unpack(body))
        _argsz("DMA_UNMAP", u.argsz, cls.FMT.size)
        if u.flags & DmaUnmapFlag.GET_DIRTY_BITMAP:
            raise CommandError("DMA_UNMAP: dirty page tracking is not offered", errno.ENOTSUP)
        if u.flags & ~_DMA_UNMAP_FLAGS:
            raise CommandError(f"DMA_UNMAP: unknown flags {u.flags:#x}")
        if u.flags & DmaUnmapFlag.ALL and (u.address or u.size):
            raise CommandError("DMA_UNMAP: ALL with an address or size")
        return u

    def pack(self) -> bytes:
        return self.FMT.pack(self.argsz, self.flags, self.address, self.size)

    @property
    def all(self) -> bool:
        return bool(self.flags & DmaUnmapFlag.ALL)


@dataclass(frozen=True)
class DeviceInfo:
    """DEVICE_GET_INFO: ``u32 argsz; u32 flags; u32 num_regions; u32 num_irqs``."""

    argsz: int
    flags: int
    num_regions: int
    num_irqs: int
    FMT: ClassVar[struct.Struct] = struct.Struct("<IIII")

    @classmethod
    def unpack(cls, body: bytes) -> DeviceInfo:
        _exact("DEVICE_GET_INFO", body, cls.FMT.size)
        d = cls(*cls.FMT.unpack(body))
        _argsz("DEVICE_GET_INFO", d.argsz, cls.FMT.size)
        return d

    def pack(self) -> bytes:
        return self.FMT.pack(self.argsz, self.flags, self.num_regions, self.num_irqs)


@dataclass(frozen=True)
class RegionInfo:
    """DEVICE_GET_REGION_INFO: ``u32 argsz; u32 flags; u32 index; u32 cap_offset;
    u64 size; u64 offset`` (request and reply)."""

    argsz: int
    flags: int
    index: int
    cap_offset: int
    size: int
    offset: int
    FMT: ClassVar[struct.Struct] = struct.Struct("<IIIIQQ")

    @classmethod
    def unpack(cls, body: bytes) -> RegionInfo:
        _exact("DEVICE_GET_REGION_INFO", body, cls.FMT.size)
        r = cls(*cls.FMT.unpack(body))
        _argsz("DEVICE_GET_REGION_INFO", r.argsz, cls.FMT.size)
        return r

    def pack(self) -> bytes:
        return self.FMT.pack(
            self.argsz, self.flags, self.index, self.cap_offset, self.size, self.offset
        )


@dataclass(frozen=True)
class IrqInfo:
    """DEVICE_GET_IRQ_INFO: ``u32 argsz; u32 flags; u32 index; u32 count``."""

    argsz: int
    flags: int
    index: int
    count: int
    FMT: ClassVar[struct.Struct] = struct.Struct("<IIII")

    @classmethod
    def unpack(cls, body: bytes) -> IrqInfo:
        _exact("DEVICE_GET_IRQ_INFO", body, cls.FMT.size)
        i = cls(*cls.FMT.unpack(body))
        _argsz("DEVICE_GET_IRQ_INFO", i.argsz, cls.FMT.size)
        return i

    def pack(self) -> bytes:
        return self.FMT.pack(self.argsz, self.flags, self.index, self.count)


@dataclass(frozen=True)
class SetIrqs:
    """DEVICE_SET_IRQS: ``u32 argsz; u32 flags; u32 index; u32 start; u32 count; data[]``.

    ``data`` holds ``count`` bytes with DATA_BOOL and nothing otherwise: eventfds
    travel as ancillary data, and QEMU leaves ``argsz`` at 20 when it sends them.
    """

    argsz: int
    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""
    FMT: ClassVar[struct.Struct] = struct.Struct("<IIIII")
    #: Most vectors one request may name (a PCI function has at most 2048 MSI-X vectors).
    MAX_COUNT: ClassVar[int] = 2048

    @classmethod
    def unpack(cls, body: bytes) -> SetIrqs:
        if len(body) < cls.FMT.size:
            raise CommandError(f"DEVICE_SET_IRQS: payload of {len(body)} bytes")
        argsz, flags, index, start, count = cls.FMT.unpack_from(body)
        data = body[cls.FMT.size :]
        _argsz("DEVICE_SET_IRQS", argsz, cls.FMT.size)
        if flags & ~_SET_IRQS_FLAGS:
            raise CommandError(f"DEVICE_SET_IRQS: unknown flags {flags:#x}")
        kinds = IrqSetFlag(flags & IRQ_DATA_TYPES)
        actions = IrqSetFlag(flags & IRQ_ACTIONS)
        if kinds.bit_count() != 1 or actions.bit_count() != 1:
            raise CommandError(
                f"DEVICE_SET_IRQS: flags {flags:#x} are not one data type, one action"
            )
        if count > cls.MAX_COUNT or start > cls.MAX_COUNT:
            raise CommandError(f"DEVICE_SET_IRQS: start {start} count {count}")
        want = count if kinds is IrqSetFlag.DATA_BOOL else 0
        if len(data) != want:
            raise CommandError(f"DEVICE_SET_IRQS: {len(data)} data bytes for {count} vectors")
        return cls(argsz, flags, index, start, count, data)

    def pack(self) -> bytes:
        return self.FMT.pack(self.argsz, self.flags, self.index, self.start, self.count) + self.data

    @property
    def data_type(self) -> IrqSetFlag:
        return IrqSetFlag(self.flags & IRQ_DATA_TYPES)

    @property
    def action(self) -> IrqSetFlag:
        return IrqSetFlag(self.flags & IRQ_ACTIONS)


@dataclass(frozen=True)
class RegionAccess:
    """REGION_READ / REGION_WRITE: ``u64 offset; u32 region; u32 count; u8 data[]``.

    A read request carries no data; its reply and a write request carry
    ``count`` bytes; a write reply carries none.
    """

    offset: int
    region: int
    count: int
    data: bytes = b""
    FMT: ClassVar[struct.Struct] = struct.Struct("<QII")

    @classmethod
    def unpack_read(cls, body: bytes, max_count: int) -> RegionAccess:
        _exact("REGION_READ", body, cls.FMT.size)
        a = cls(*cls.FMT.unpack(body))
        if not 0 < a.count <= max_count:
            raise CommandError(f"REGION_READ of {a.count} bytes (at most {max_count})")
        return a

    @classmethod
    def unpack_write(cls, body: bytes, max_count: int) -> RegionAccess:
        if len(body) < cls.FMT.size:
            raise CommandError(f"REGION_WRITE: payload of {len(body)} bytes")
        offset, region, count = cls.FMT.unpack_from(body)
        data = body[cls.FMT.size :]
        if len(data) != count:
            raise CommandError(f"REGION_WRITE: count {count} with {len(data)} data bytes")
        if not 0 < count <= max_count:
            raise CommandError(f"REGION_WRITE of {count} bytes (at most {max_count})")
        return cls(offset, region, count, data)

    @classmethod
    def unpack_reply(cls, body: bytes) -> RegionAccess:
        """A reply as the client sees it (header fields, then data if any).

        :raise CommandError: if the data does not match the count.
        """
        if len(body) < cls.FMT.size:
            raise CommandError(f"region access reply of {len(body)} bytes")
        offset, region, count = cls.FMT.unpack_from(body)
        data = body[cls.FMT.size :]
        if data and len(data) != count:
            raise CommandError(f"region access reply: count {count} with {len(data)} bytes")
        return cls(offset, region, count, data)

    def pack(self) -> bytes:
        return self.FMT.pack(self.offset, self.region, self.count) + self.data

    def pack_header(self) -> bytes:
        """The fields without data (a write reply)."""
        return self.FMT.pack(self.offset, self.region, self.count)


@dataclass(frozen=True)
class WriteMulti:
    """REGION_WRITE_MULTI: ``u64 wr_cnt; {u64 offset; u32 region; u32 count; u8 data[8]}[]``.

    QEMU coalesces posted writes of at most 8 bytes into one of these when its
    queue to the server is congested; each entry is one REGION_WRITE, in order.
    """

    writes: tuple[RegionAccess, ...]
    COUNT: ClassVar[struct.Struct] = struct.Struct("<Q")
    ENTRY: ClassVar[struct.Struct] = struct.Struct("<QII8s")
    #: Most entries in one message (QEMU's VFIO_USER_MULTI_MAX).
    MAX_WRITES: ClassVar[int] = 200

    @classmethod
    def unpack(cls, body: bytes) -> WriteMulti:
        if len(body) < cls.COUNT.size:
            raise CommandError(f"REGION_WRITE_MULTI: payload of {len(body)} bytes")
        (n,) = cls.COUNT.unpack_from(body)
        if not 0 < n <= cls.MAX_WRITES:
            raise CommandError(f"REGION_WRITE_MULTI with {n} writes (1..{cls.MAX_WRITES})")
        _exact("REGION_WRITE_MULTI", body, cls.COUNT.size + n * cls.ENTRY.size)
        writes = []
        for i in range(n):
            offset, region, count, data = cls.ENTRY.unpack_from(
                body, cls.COUNT.size + i * cls.ENTRY.size
            )
            if not 0 < count <= 8:
                raise CommandError(f"REGION_WRITE_MULTI entry {i}: {count} bytes")
            writes.append(RegionAccess(offset, region, count, data[:count]))
        return cls(tuple(writes))

    def pack(self) -> bytes:
        out = [self.COUNT.pack(len(self.writes))]
        for w in self.writes:
            out.append(self.ENTRY.pack(w.offset, w.region, w.count, w.data.ljust(8, b"\0")))
        return b"".join(out)
