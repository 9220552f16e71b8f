"""Hostile clients: a whole message that is wrong gets an error reply and the connection
stays; one that breaks the framing closes the connection. Either way nothing leaks, the
process lives, and the next client is served end to end."""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections.abc import Callable

import pytest

import vfio_user.connection
from device.testing import MiB
from tests.protocol.vfio_rig import (
    ServerThread,
    closed_by_server,
    connect,
    hang_up,
    open_fds,
    serves_a_fresh_client,
    wait_for,
)
from vfio_user.client import VfioUserClient
from vfio_user.dispatcher import MAX_DATA_XFER, MAX_MESSAGE, MAX_MSG_FDS
from vfio_user.errors import DisconnectedError
from vfio_user.messages import (
    HEADER_SIZE,
    Command,
    DmaMap,
    Header,
    IrqSetFlag,
    PciIrq,
    PciRegion,
    RegionAccess,
    SetIrqs,
)
from virtio_pci.layout import VIRTIO_BAR

C = Command
MSG_ID = 0x4242


def _memfd(size: int = 4 * MiB) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _send(
    c: VfioUserClient,
    command: int,
    payload: bytes = b"",
    fds: list[int] | None = None,
    *,
    size: int | None = None,
    flags: int = 0,
) -> None:
    """One message as given (a lying ``size`` or ``flags`` too); our copies of ``fds`` are
    closed once sent, so any fd still open afterwards is the server's."""
    header = Header(MSG_ID, command, HEADER_SIZE + len(payload) if size is None else size, flags)
    try:
        c.send_raw(header.pack() + payload, fds)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server closed on the header, before the rest was sent
    finally:
        for fd in fds or []:
            os.close(fd)


def _map(flags: int, offset: int, address: int, size: int, argsz: int = 32) -> bytes:
    return struct.pack("<IIQQQ", argsz, flags, offset, address, size)


def _read(region: int, offset: int, count: int) -> bytes:
    return RegionAccess(offset, region, count).pack()


def _write(region: int, offset: int, data: bytes, count: int | None = None) -> bytes:
    n = len(data) if count is None else count
    return struct.pack("<QII", offset, region, n) + data


def _irqs(flags: int, index: int, start: int, count: int, data: bytes = b"") -> bytes:
    return SetIrqs(20, flags, index, start, count, data).pack()


def _mapped_first(c: VfioUserClient) -> None:
    fd = _memfd()
    c.dma_map(0, 4 * MiB, fd, 0)
    os.close(fd)


def _pipe_end() -> list[int]:
    r, w = os.pipe()
    os.close(w)
    return [r]


_EV = IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER
_RW = 3
Send = Callable[[VfioUserClient], None]

#: Whole messages that are wrong: name -> (what to send, the errno of the error reply).
ERROR_CASES: dict[str, tuple[Send, int]] = {
    # sizes and counts
    "read above max_data_xfer": (
        lambda c: _send(c, C.REGION_READ, _read(PciRegion.CONFIG, 0, MAX_DATA_XFER + 1)),
        errno.EINVAL,
    ),
    "read of 4 GiB - 1": (
        lambda c: _send(c, C.REGION_READ, _read(VIRTIO_BAR, 0, 0xFFFFFFFF)),
        errno.EINVAL,
    ),
    "read of 0 bytes": (lambda c: _send(c, C.REGION_READ, _read(0, 0, 0)), errno.EINVAL),
    "read with data": (
        lambda c: _send(c, C.REGION_READ, _read(PciRegion.CONFIG, 0, 4) + b"abcd"),
        errno.EINVAL,
    ),
    "write count above its data": (
        lambda c: _send(c, C.REGION_WRITE, _write(PciRegion.CONFIG, 4, b"\1\0", 64)),
        errno.EINVAL,
    ),
    "write count below its data": (
        lambda c: _send(c, C.REGION_WRITE, _write(PciRegion.CONFIG, 4, b"\1\0\0\0", 2)),
        errno.EINVAL,
    ),
    "write of 1 MiB to config space": (
        lambda c: _send(c, C.REGION_WRITE, _write(PciRegion.CONFIG, 0, bytes(MAX_DATA_XFER))),
        errno.EINVAL,
    ),
    "write of 0 bytes": (lambda c: _send(c, C.REGION_WRITE, _write(0, 0, b"")), errno.EINVAL),
    "set_irqs count 2^32-1": (
        lambda c: _send(c, C.DEVICE_SET_IRQS, _irqs(_EV, PciIrq.MSIX, 0, 0xFFFFFFFF)),
        errno.EINVAL,
    ),
    "set_irqs short": (lambda c: _send(c, C.DEVICE_SET_IRQS, bytes(12)), errno.EINVAL),
    "set_irqs argsz 4": (
        lambda c: _send(c, C.DEVICE_SET_IRQS, struct.pack("<IIIII", 4, _EV, 2, 0, 1)),
        errno.EINVAL,
    ),
    "set_irqs unknown flag": (
        lambda c: _send(c, C.DEVICE_SET_IRQS, _irqs(_EV | 0x40, PciIrq.MSIX, 0, 1)),
        errno.EINVAL,
    ),
    "write_multi count 2^64-1": (
        lambda c: _send(c, C.REGION_WRITE_MULTI, struct.pack("<Q", 2**64 - 1) + bytes(24)),
        errno.EINVAL,
    ),
    "write_multi count 0": (
        lambda c: _send(c, C.REGION_WRITE_MULTI, struct.pack("<Q", 0)),
        errno.EINVAL,
    ),
    "write_multi count lies": (
        lambda c: _send(c, C.REGION_WRITE_MULTI, struct.pack("<Q", 3) + bytes(24)),
        errno.EINVAL,
    ),
    "write_multi entry of 9 bytes": (
        lambda c: _send(
            c,
            C.REGION_WRITE_MULTI,
            struct.pack("<QQII8s", 1, 0, PciRegion.CONFIG, 9, bytes(8)),
        ),
        errno.EINVAL,
    ),
    "device_info argsz 8": (
        lambda c: _send(c, C.DEVICE_GET_INFO, struct.pack("<IIII", 8, 0, 0, 0)),
        errno.EINVAL,
    ),
    "device_info short": (lambda c: _send(c, C.DEVICE_GET_INFO, bytes(8)), errno.EINVAL),
    "device_info long": (lambda c: _send(c, C.DEVICE_GET_INFO, bytes(4096)), errno.EINVAL),
    "irq_info short": (lambda c: _send(c, C.DEVICE_GET_IRQ_INFO, bytes(4)), errno.EINVAL),
    "region_info huge argsz, short body": (
        lambda c: _send(c, C.DEVICE_GET_REGION_INFO, struct.pack("<IIII", 0xFFFFFFFF, 0, 0, 0)),
        errno.EINVAL,
    ),
    "unmap short": (lambda c: _send(c, C.DMA_UNMAP, bytes(16)), errno.EINVAL),
    "unmap unknown flags": (
        lambda c: _send(c, C.DMA_UNMAP, struct.pack("<IIQQ", 24, 0x80, 0, 4096)),
        errno.EINVAL,
    ),
    "reset with a payload": (lambda c: _send(c, C.DEVICE_RESET, bytes(8)), errno.EINVAL),
    # fds
    "fd on DEVICE_GET_INFO": (
        lambda c: _send(c, C.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0), [_memfd()]),
        errno.EINVAL,
    ),
    "fd on REGION_WRITE": (
        lambda c: _send(c, C.REGION_WRITE, _write(PciRegion.CONFIG, 4, b"\0\0"), [_memfd()]),
        errno.EINVAL,
    ),
    "two fds on DMA_MAP": (
        lambda c: _send(c, C.DMA_MAP, _map(_RW, 0, 0, 4 * MiB), [_memfd(), _memfd()]),
        errno.EINVAL,
    ),
    "16 fds on SET_IRQS of 1 vector": (
        lambda c: _send(
            c,
            C.DEVICE_SET_IRQS,
            _irqs(_EV, PciIrq.MSIX, 0, 1),
            [os.eventfd(0) for _ in range(MAX_MSG_FDS)],
        ),
        errno.EINVAL,
    ),
    "pipe as DMA_MAP fd": (
        lambda c: _send(c, C.DMA_MAP, _map(_RW, 0, 0, 4096), _pipe_end()),
        errno.EINVAL,
    ),
    "socket as DMA_MAP fd": (
        lambda c: _send(c, C.DMA_MAP, _map(_RW, 0, 0, 4096), [socket.socket().detach()]),
        errno.EINVAL,
    ),
    "regular file as the INTx unmask fd": (
        lambda c: _send(
            c,
            C.DEVICE_SET_IRQS,
            _irqs(IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_UNMASK, PciIrq.INTX, 0, 1),
            [_memfd()],
        ),
        errno.EINVAL,
    ),
    # A pipe whose writer is gone is readable for ever: watched, it would spin the loop.
    "dead pipe as the INTx unmask fd": (
        lambda c: _send(
            c,
            C.DEVICE_SET_IRQS,
            _irqs(IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_UNMASK, PciIrq.INTX, 0, 1),
            _pipe_end(),
        ),
        errno.EINVAL,
    ),
    "pipe as an MSI-X trigger fd": (
        lambda c: _send(c, C.DEVICE_SET_IRQS, _irqs(_EV, PciIrq.MSIX, 0, 1), _pipe_end()),
        errno.EINVAL,
    ),
    "write-only map with an fd": (
        lambda c: _send(c, C.DMA_MAP, _map(2, 0, 0, 4 * MiB), [_memfd()]),
        errno.EINVAL,
    ),
    # DMA maps
    "map short": (lambda c: _send(c, C.DMA_MAP, bytes(24)), errno.EINVAL),
    "map argsz 8": (lambda c: _send(c, C.DMA_MAP, _map(_RW, 0, 0, 4096, argsz=8)), errno.EINVAL),
    "map unknown flags": (lambda c: _send(c, C.DMA_MAP, _map(7, 0, 0, 4096)), errno.EINVAL),
    "map size 0": (lambda c: _send(c, C.DMA_MAP, _map(_RW, 0, 0, 0)), errno.EINVAL),
    "map unaligned address": (
        lambda c: _send(c, C.DMA_MAP, _map(_RW, 0, 0x800, 4096)),
        errno.EINVAL,
    ),
    "map unaligned offset": (
        lambda c: _send(c, C.DMA_MAP, _map(_RW, 0x10, 0, 4096), [_memfd()]),
        errno.EINVAL,
    ),
    "map wraps 2^64": (
        lambda c: _send(c, C.DMA_MAP, _map(_RW, 0, 2**64 - 4096, 8192)),
        errno.EINVAL,
    ),
    "map offset wraps 2^64": (
        lambda c: _send(c, C.DMA_MAP, _map(_RW, 2**64 - 4096, 0, 8192), [_memfd()]),
        errno.EINVAL,
    ),
    "map beyond the file's end": (
        lambda c: _send(c, C.DMA_MAP, _map(_RW, 0, 0, 8 * MiB), [_memfd(4 * MiB)]),
        errno.EINVAL,
    ),
    "map offset beyond the file's end": (
        lambda c: _send(c, C.DMA_MAP, _map(_RW, 8 * MiB, 0, 4096), [_memfd(4 * MiB)]),
        errno.EINVAL,
    ),
    "map of an empty file": (
        lambda c: _send(c, C.DMA_MAP, _map(_RW, 0, 0, 4096), [_memfd(0)]),
        errno.EINVAL,
    ),
    "map overlapping another": (
        lambda c: (
            _mapped_first(c),
            _send(c, C.DMA_MAP, _map(_RW, 0, 2 * MiB, 4 * MiB), [_memfd(8 * MiB)]),
        ),
        errno.EEXIST,
    ),
    "map inside another, fd-less": (
        lambda c: (_mapped_first(c), _send(c, C.DMA_MAP, _map(_RW, 0, MiB, 4096))),
        errno.EEXIST,
    ),
    # accesses outside every region
    "read of region 8 (VGA)": (
        lambda c: _send(c, C.REGION_READ, _read(PciRegion.VGA, 0, 4)),
        errno.EINVAL,
    ),
    "read of region 2^32-1": (
        lambda c: _send(c, C.REGION_READ, _read(0xFFFFFFFF, 0, 4)),
        errno.EINVAL,
    ),
    "read of a size-0 BAR": (lambda c: _send(c, C.REGION_READ, _read(2, 0, 4)), errno.EINVAL),
    "read of the ROM": (
        lambda c: _send(c, C.REGION_READ, _read(PciRegion.ROM, 0, 4)),
        errno.EINVAL,
    ),
    "write of the ROM": (
        lambda c: _send(c, C.REGION_WRITE, _write(PciRegion.ROM, 0, b"\0" * 4)),
        errno.EINVAL,
    ),
    "read past BAR0": (lambda c: _send(c, C.REGION_READ, _read(0, 0x4000, 4)), errno.EINVAL),
    "read straddling BAR0's end": (
        lambda c: _send(c, C.REGION_READ, _read(0, 0x3FFE, 4)),
        errno.EINVAL,
    ),
    "read past config space": (
        lambda c: _send(c, C.REGION_READ, _read(PciRegion.CONFIG, 0xFE, 4)),
        errno.EINVAL,
    ),
    "read at offset 2^64-1": (
        lambda c: _send(c, C.REGION_READ, _read(PciRegion.CONFIG, 2**64 - 1, 4)),
        errno.EINVAL,
    ),
    "write straddling BAR1's end": (
        lambda c: _send(c, C.REGION_WRITE, _write(1, 0xFFC, bytes(8))),
        errno.EINVAL,
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_wrong_message_gets_an_error_reply_and_the_connection_stays(
    vfio_server: ServerThread, case: str
) -> None:
    send, err = ERROR_CASES[case]
    base = open_fds()
    c = connect(vfio_server)
    c.version()
    send(c)
    header, body = c.reply()
    assert (header.msg_id, header.is_reply, header.is_error) == (MSG_ID, True, True), header
    assert header.error == err and body == b""
    assert c.device_info().num_regions >= 8, "the connection still serves"
    assert c.read_u(PciRegion.CONFIG, 0, 2) == 0x1AF4
    hang_up(vfio_server, c)
    assert open_fds() == base, "every fd the server was sent is closed"
    serves_a_fresh_client(vfio_server)


def _fds_mid_message(c: VfioUserClient, server: ServerThread) -> None:
    payload = DmaMap(32, _RW, 0, 0, 4 * MiB).pack()
    c.send_raw(Header(MSG_ID, C.DMA_MAP, HEADER_SIZE + len(payload)).pack() + payload[:8])

    def half_read() -> bool:
        conn = server.server.conn
        return conn is not None and conn.receiving

    wait_for(lambda: server.call(half_read), "the server to hold the first half")
    fd = _memfd()
    c.send_raw(payload[8:], [fd])
    os.close(fd)


def _too_many_fds(c: VfioUserClient, server: ServerThread) -> None:
    fds = [os.eventfd(0) for _ in range(MAX_MSG_FDS + 1)]
    _send(c, C.DEVICE_SET_IRQS, _irqs(_EV, PciIrq.MSIX, 0, 7), fds)


def _oversized_write(c: VfioUserClient, server: ServerThread) -> None:
    data = bytes(MAX_DATA_XFER + 8)
    _send(c, C.REGION_WRITE, _write(VIRTIO_BAR, 0, data))


#: Messages that break the framing: the connection closes without a reply.
CLOSE_CASES: dict[str, Callable[[VfioUserClient, ServerThread], None]] = {
    "size below the header": lambda c, s: _send(c, C.DEVICE_GET_INFO, bytes(16), size=8),
    "size 0": lambda c, s: _send(c, C.DEVICE_GET_INFO, b"", size=0),
    "size 4 GiB": lambda c, s: _send(c, C.DEVICE_GET_INFO, bytes(16), size=0xFFFFFFFF),
    "size one above the largest": lambda c, s: _send(
        c, C.REGION_WRITE, bytes(64), size=MAX_MESSAGE + 1
    ),
    "write above max_data_xfer": _oversized_write,
    "unknown flag bits": lambda c, s: _send(
        c, C.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0), flags=0x40
    ),
    "message type 2": lambda c, s: _send(
        c, C.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0), flags=2
    ),
    "a reply from the client": lambda c, s: _send(
        c, C.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0), flags=1
    ),
    "an error reply from the client": lambda c, s: _send(c, C.DMA_READ, b"", flags=0x21),
    "more fds than max_msg_fds": _too_many_fds,
    "fds in the middle of a message": _fds_mid_message,
}


@pytest.mark.parametrize("case", list(CLOSE_CASES))
def test_framing_breakers_close_the_connection(vfio_server: ServerThread, case: str) -> None:
    base = open_fds()
    c = connect(vfio_server)
    c.version()
    _mapped_first(c)  # something for the close to release
    CLOSE_CASES[case](c, vfio_server)
    assert closed_by_server(c)
    c.close()
    wait_for(lambda: open_fds() == base, "every fd of the connection closed")
    vfio_server.wait_event("disconnected", 1)
    serves_a_fresh_client(vfio_server)


def test_size_shorter_than_the_payload_then_garbage_closes(vfio_server: ServerThread) -> None:
    """A header that under-states its payload: that message is refused (it is whole, and
    wrong); the rest of its payload is read as the next header, which breaks the framing."""
    c = connect(vfio_server)
    c.version()
    _send(c, C.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0), size=HEADER_SIZE)
    header, _ = c.reply()
    assert (header.msg_id, header.is_error, header.error) == (MSG_ID, True, errno.EINVAL)
    assert closed_by_server(c), "the left-over bytes (size 0) cannot be framed"
    c.close()
    serves_a_fresh_client(vfio_server)


def test_a_client_limit_below_a_read_is_respected(vfio_server: ServerThread) -> None:
    c = connect(vfio_server)
    c.version({"max_data_xfer_size": 64})
    assert len(c.read(PciRegion.CONFIG, 0, 64)) == 64
    _send(c, C.REGION_READ, _read(PciRegion.CONFIG, 0, 65))
    header, _ = c.reply()
    assert header.is_error and header.error == errno.EINVAL
    c.close()


def test_half_a_message_then_silence_is_dropped(
    vfio_server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vfio_user.connection, "BODY_TIMEOUT", 0.3)
    c = connect(vfio_server)
    c.version()
    c.send_raw(Header(1, C.DEVICE_GET_INFO, 32).pack()[:10])  # half a header, then nothing
    t0 = time.monotonic()
    assert vfio_server.call(lambda: 1) == 1, "the loop is not blocked by the half message"
    assert closed_by_server(c, timeout=3.0)
    assert time.monotonic() - t0 < 2.0
    c.close()
    serves_a_fresh_client(vfio_server)


def test_trickled_message_times_out_as_a_whole(
    vfio_server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vfio_user.connection, "BODY_TIMEOUT", 0.5)
    c = connect(vfio_server)
    c.version()
    msg = Header(1, C.DEVICE_GET_INFO, 32).pack() + struct.pack("<IIII", 16, 0, 0, 0)
    t0 = time.monotonic()
    closed = False
    for i in range(len(msg) - 1):  # one byte every 0.1 s: 3 s for the message
        try:
            c.conn.sock.send(msg[i : i + 1])
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        if closed_by_server(c, timeout=0.1):
            closed = True
            break
    assert closed and time.monotonic() - t0 < 2.0
    c.close()
    serves_a_fresh_client(vfio_server)


def test_a_client_that_never_reads_its_replies_is_dropped(vfio_server: ServerThread) -> None:
    c = connect(vfio_server)
    c.version()
    c.conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reads = 400  # 400 x 16 KiB of replies: far above what the server keeps for a client
    req = _read(VIRTIO_BAR, 0, 0x4000)
    c.send_raw((Header(1, C.REGION_READ, HEADER_SIZE + len(req)).pack() + req) * reads)
    wait_for(lambda: vfio_server.count("disconnected") == 1, "the server to give up")
    got = 0
    while True:
        try:
            c.reply(timeout=2.0)
        except DisconnectedError:
            break
        got += 1
    assert got < reads
    c.close()
    serves_a_fresh_client(vfio_server)


def test_a_second_client_is_refused_while_one_is_served(vfio_server: ServerThread) -> None:
    first = connect(vfio_server)
    first.version()
    second = VfioUserClient(vfio_server.path)
    assert closed_by_server(second)
    second.close()
    assert first.device_info().num_irqs >= 3, "the first client is not disturbed"
    hang_up(vfio_server, first)
    serves_a_fresh_client(vfio_server)


def test_garbage_stream_closes_and_the_process_lives(vfio_server: ServerThread) -> None:
    c = connect(vfio_server)
    c.send_raw(os.urandom(4096))
    assert closed_by_server(c)
    c.close()
    serves_a_fresh_client(vfio_server)
