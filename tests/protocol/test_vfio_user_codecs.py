"""Property tests of the vfio-user message codecs: every payload survives pack/unpack, and
arbitrary bytes given to any unpack raise only the library's own error."""

from __future__ import annotations

import asyncio
import string
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from device import BalloonConfig, BalloonDevice
from vfio_user.connection import Message
from vfio_user.dispatcher import Session
from vfio_user.errors import CommandError, ProtocolError, VfioUserError
from vfio_user.irqs import IrqTable
from vfio_user.messages import (
    HEADER_SIZE,
    IRQ_ACTIONS,
    IRQ_DATA_TYPES,
    Command,
    DeviceInfo,
    DmaMap,
    DmaUnmap,
    Header,
    IrqInfo,
    IrqSetFlag,
    RegionAccess,
    RegionInfo,
    SetIrqs,
    Version,
    WriteMulti,
)
from virtio_pci import VirtioPciFunction

SETTINGS = settings(max_examples=150, deadline=None)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
PAGE = 4096


@SETTINGS
@given(u16, u16, st.integers(HEADER_SIZE, 1 << 20), st.sampled_from([0, 1, 0x10, 0x21]), u32)
def test_header_round_trip(msg_id: int, command: int, size: int, flags: int, error: int) -> None:
    h = Header(msg_id, command, size, flags, error)
    assert Header.unpack(h.pack(), 1 << 20) == h


@SETTINGS
@given(st.binary(min_size=16, max_size=16), st.integers(0, 1 << 32))
def test_header_of_any_bytes_is_a_header_or_a_protocol_error(data: bytes, limit: int) -> None:
    try:
        h = Header.unpack(data, limit)
    except ProtocolError:
        return
    assert HEADER_SIZE <= h.size <= limit and h.pack() == data


json_leaf = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@SETTINGS
@given(
    u16,
    u16,
    st.dictionaries(st.text(string.ascii_letters + "_", max_size=12), json_value, max_size=5),
)
def test_version_round_trip(major: int, minor: int, caps: dict[str, Any]) -> None:
    v = Version(major, minor, caps)
    assert Version.unpack(v.pack()) == v


@SETTINGS
@given(
    st.sampled_from([1, 2, 3]),
    st.integers(0, 2**40).map(lambda x: x * PAGE),
    st.integers(0, 2**40).map(lambda x: x * PAGE),
    st.integers(1, 2**20).map(lambda x: x * PAGE),
    st.integers(32, 2**32 - 1),
)
def test_dma_map_round_trip(flags: int, offset: int, address: int, size: int, argsz: int) -> None:
    m = DmaMap(argsz, flags, offset, address, size)
    assert DmaMap.unpack(m.pack()) == m


@SETTINGS
@given(st.integers(24, 2**32 - 1), u64, u64)
def test_dma_unmap_round_trip(argsz: int, address: int, size: int) -> None:
    u = DmaUnmap(argsz, 0, address, size)
    assert DmaUnmap.unpack(u.pack()) == u
    every = DmaUnmap(argsz, 2, 0, 0)
    assert DmaUnmap.unpack(every.pack()) == every


@SETTINGS
@given(st.integers(16, 2**32 - 1), u32, u32, u32)
def test_info_round_trips(argsz: int, a: int, b: int, c: int) -> None:
    for cls in (DeviceInfo, IrqInfo):
        info = cls(argsz, a, b, c)
        assert cls.unpack(info.pack()) == info


@SETTINGS
@given(st.integers(32, 2**32 - 1), u32, u32, u32, u64, u64)
def test_region_info_round_trip(
    argsz: int, flags: int, index: int, cap: int, size: int, off: int
) -> None:
    r = RegionInfo(argsz, flags, index, cap, size, off)
    assert RegionInfo.unpack(r.pack()) == r


@SETTINGS
@given(
    st.integers(20, 2**32 - 1),
    st.sampled_from(list(IrqSetFlag(IRQ_DATA_TYPES))),
    st.sampled_from(list(IrqSetFlag(IRQ_ACTIONS))),
    u32,
    st.integers(0, SetIrqs.MAX_COUNT),
    st.integers(0, SetIrqs.MAX_COUNT),
    st.data(),
)
def test_set_irqs_round_trip(
    argsz: int,
    kind: IrqSetFlag,
    action: IrqSetFlag,
    index: int,
    start: int,
    count: int,
    data: st.DataObject,
) -> None:
    payload = (
        data.draw(st.binary(min_size=count, max_size=count))
        if kind is IrqSetFlag.DATA_BOOL
        else b""
    )
    s = SetIrqs(argsz, int(kind | action), index, start, count, payload)
    assert SetIrqs.unpack(s.pack()) == s


@SETTINGS
@given(u64, u32, st.binary(min_size=1, max_size=512))
def test_region_access_round_trips(offset: int, region: int, data: bytes) -> None:
    w = RegionAccess(offset, region, len(data), data)
    assert RegionAccess.unpack_write(w.pack(), 512) == w
    assert RegionAccess.unpack_reply(w.pack()) == w
    r = RegionAccess(offset, region, len(data))
    assert RegionAccess.unpack_read(r.pack(), 512) == r
    assert RegionAccess.unpack_reply(w.pack_header()) == r


@SETTINGS
@given(
    st.lists(
        st.tuples(u64, u32, st.binary(min_size=1, max_size=8)),
        min_size=1,
        max_size=WriteMulti.MAX_WRITES,
    )
)
def test_write_multi_round_trip(writes: list[tuple[int, int, bytes]]) -> None:
    m = WriteMulti(tuple(RegionAccess(o, r, len(d), d) for o, r, d in writes))
    assert WriteMulti.unpack(m.pack()) == m


UNPACKS: dict[str, Callable[[bytes], object]] = {
    "Version": Version.unpack,
    "DmaMap": DmaMap.unpack,
    "DmaUnmap": DmaUnmap.unpack,
    "DeviceInfo": DeviceInfo.unpack,
    "RegionInfo": RegionInfo.unpack,
    "IrqInfo": IrqInfo.unpack,
    "SetIrqs": SetIrqs.unpack,
    "RegionAccess.read": lambda b: RegionAccess.unpack_read(b, 1 << 20),
    "RegionAccess.write": lambda b: RegionAccess.unpack_write(b, 1 << 20),
    "RegionAccess.reply": RegionAccess.unpack_reply,
    "WriteMulti": WriteMulti.unpack,
}


def _packed_shapes() -> st.SearchStrategy[bytes]:
    """Bytes near the shapes the codecs expect: a valid prefix, then anything."""
    prefixes = st.sampled_from(
        [
            b"\0\0\0\0",  # VERSION 0.0
            b"\0\0\0\0{",
            b"\0\0\0\0" + b"[" * 2000,
            b"\0\0\0\0" + b'{"capabilities":',
            (32).to_bytes(4, "little"),
            (20).to_bytes(4, "little") + (0x24).to_bytes(4, "little"),
            (1).to_bytes(8, "little"),
        ]
    )
    return st.builds(lambda p, t: p + t, prefixes, st.binary(max_size=64))


@pytest.mark.parametrize("name", list(UNPACKS))
@SETTINGS
@given(data=st.binary(max_size=256) | _packed_shapes())
@example(data=b"\0\0\0\0" + b"[" * 4000 + b"\0")
@example(data=b"\0\0\0\0" + b'{"capabilities":' * 300 + b"\0")
@example(data=b"\0\0\0\0\xff\0")
def test_any_bytes_raise_only_the_librarys_error(name: str, data: bytes) -> None:
    try:
        UNPACKS[name](data)
    except CommandError as err:
        assert isinstance(err, VfioUserError) and err.errno > 0


@SETTINGS
@given(st.integers(2, 31))
def test_unknown_flag_bits_are_refused(bit: int) -> None:
    flag = 1 << bit
    if flag > 2:
        with pytest.raises(CommandError):
            DmaMap.unpack(DmaMap(32, 3 | flag, 0, 0, PAGE).pack())
        with pytest.raises(CommandError):
            DmaUnmap.unpack(DmaUnmap(24, flag, 0, PAGE).pack())
    if flag > 0x20:
        with pytest.raises(CommandError):
            SetIrqs.unpack(SetIrqs(20, 0x24 | flag, 2, 0, 1).pack())


# -- the dispatch table under arbitrary commands ------------------------------------------------


@pytest.fixture(scope="module")
def session_factory() -> Iterator[Callable[[], Session]]:
    loop = asyncio.new_event_loop()
    made: list[Session] = []

    def make() -> Session:
        function = VirtioPciFunction(BalloonDevice(BalloonConfig(stats_interval=0)), loop)
        irqs = IrqTable(function.irqs())
        function.connected(irqs)
        s = Session(function, irqs)
        s.handle(Message(Header.command_of(1, Command.VERSION, 0), Version(0, 0, {}).pack(), []))
        made.append(s)
        return s

    yield make
    for s in made:
        s.function.disconnected()
        s.close()
        s.irqs.close()
    loop.close()


def _region_access() -> st.SearchStrategy[bytes]:
    """REGION_READ/WRITE payloads aimed at the function's regions (small offsets)."""
    return st.builds(
        lambda off, region, data: struct.pack("<QII", off, region, len(data)) + data,
        st.integers(0, 0x4100),
        st.sampled_from([0, 1, 2, 6, 7, 8]),
        st.binary(min_size=0, max_size=16),
    )


command_payloads = st.tuples(
    st.sampled_from([int(c) for c in Command] + [0, 19, 0xFFFF]),
    st.sampled_from([0, 0x10]),
    st.binary(max_size=64) | _region_access(),
)


@SETTINGS
@given(st.lists(command_payloads, min_size=1, max_size=12))
def test_any_command_sequence_is_answered_or_refused_never_crashes(
    session_factory: Callable[[], Session], commands: list[tuple[int, int, bytes]]
) -> None:
    """Arbitrary commands (no fds) to one session: each is answered, refused with an error
    reply, or (a reply type, a second VERSION...) raises the library's ProtocolError."""
    session = session_factory()
    for i, (command, flags, payload) in enumerate(commands):
        header = Header(i & 0xFFFF, command, HEADER_SIZE + len(payload), flags)
        try:
            reply = session.handle(Message(header, payload, []))
        except ProtocolError:
            return
        if flags & 0x10:
            assert reply is None, "a posted command is never answered"
            continue
        assert reply is not None
        got = Header.unpack(reply[:HEADER_SIZE], 1 << 21)
        assert got.msg_id == i & 0xFFFF and got.is_reply and got.size == len(reply)
        if command == Command.REGION_READ and not got.is_error:
            count = struct.unpack_from("<I", payload, 12)[0]
            assert got.size == HEADER_SIZE + 16 + count
