"""Malformed frontend messages: that connection closes with a log line; the process serves on."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Callable

import pytest

from device import Queue
from device.testing import GuestRam, MiB
from tests.protocol.vhost_rig import UADDR_BASE, BackendThread, Guest
from vballoon.waiting import wait_until
from vhost_user.frontend import FrontendRegion, VhostUserFrontend
from vhost_user.messages import FrontendReq, MemRegion, MemTable, VringAddr, VringState

R = FrontendReq


def _memfd(size: int = 4 * MiB) -> int:
    fd = os.memfd_create("bad", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _table(*regions: tuple[int, int, int]) -> bytes:
    return MemTable(tuple(MemRegion(g, s, u, 0) for g, s, u in regions)).pack()


def _owned(fe: VhostUserFrontend) -> None:
    fe.handshake()


CASES: dict[str, Callable[[VhostUserFrontend], None]] = {
    "unknown request": lambda fe: fe.send(99),
    "unsupported request": lambda fe: fe.send(R.SET_LOG_BASE, bytes(16)),
    "bad header version": lambda fe: fe.send(R.GET_FEATURES, flags=0x2),
    "payload too large": lambda fe: fe.conn.sock.sendall(struct.pack("<III", 1, 1, 1 << 20)),
    "short u64": lambda fe: fe.send(R.SET_FEATURES, b"\0\0\0\0"),
    "payload on empty request": lambda fe: fe.send(R.GET_FEATURES, b"x"),
    "unoffered feature": lambda fe: (
        _owned(fe),
        fe.send(R.SET_FEATURES, struct.pack("<Q", 1 << 60)),
    ),
    "fd on SET_OWNER": lambda fe: fe.send(R.SET_OWNER, b"", [_memfd()]),
    "mem table before owner": lambda fe: fe.send(
        R.SET_MEM_TABLE, _table((0, 4 * MiB, 0)), [_memfd()]
    ),
    "too few fds": lambda fe: (
        _owned(fe),
        fe.send(R.SET_MEM_TABLE, _table((0, 4 * MiB, 0), (8 * MiB, 4 * MiB, 8 * MiB)), [_memfd()]),
    ),
    "too many fds": lambda fe: (
        _owned(fe),
        fe.send(R.SET_MEM_TABLE, _table((0, 4 * MiB, 0)), [_memfd(), _memfd()]),
    ),
    "nine regions": lambda fe: (
        _owned(fe),
        fe.send(R.SET_MEM_TABLE, struct.pack("<II", 9, 0) + bytes(32 * 9), [_memfd()] * 9),
    ),
    "overlapping regions": lambda fe: (
        _owned(fe),
        fe.send(
            R.SET_MEM_TABLE,
            _table((0, 4 * MiB, 0), (2 * MiB, 4 * MiB, 8 * MiB)),
            [_memfd(), _memfd()],
        ),
    ),
    "region beyond its file": lambda fe: (
        _owned(fe),
        fe.send(R.SET_MEM_TABLE, _table((0, 64 * MiB, 0)), [_memfd()]),
    ),
    "kick without fd or NOFD": lambda fe: (
        _owned(fe),
        fe.send(R.SET_VRING_KICK, struct.pack("<Q", 0)),
    ),
    "vring index out of range": lambda fe: (
        _owned(fe),
        fe.send(R.SET_VRING_NUM, VringState(40, 64).pack()),
    ),
    "vring size beyond 16 bits": lambda fe: (
        _owned(fe),
        fe.send(R.SET_VRING_NUM, VringState(0, 1 << 16).pack()),
    ),
    "GET_CONFIG of size 0": lambda fe: (_owned(fe), fe.send(R.GET_CONFIG, bytes(12))),
    "config beyond 256 bytes": lambda fe: (
        _owned(fe),
        fe.send(R.GET_CONFIG, struct.pack("<III", 250, 16, 0) + bytes(16)),
    ),
}


def _start_ring_at(fe: VhostUserFrontend, ring_uaddr: int, memory: bool) -> None:
    """Negotiate, optionally send 4 MiB of memory, then start ring 0 at ``ring_uaddr``."""
    fe.handshake()
    fe.set_features(fe.get_features())
    if memory:
        fe.set_mem_table([FrontendRegion(0, 4 * MiB, UADDR_BASE, _memfd())])
    fe.set_vring_num(0, 64)
    addr = VringAddr(0, 0, ring_uaddr, ring_uaddr + 4096, ring_uaddr + 2048, 0)
    fe.send(R.SET_VRING_ADDR, addr.pack())
    kick = os.eventfd(1)
    fe.send(R.SET_VRING_KICK, struct.pack("<Q", 0), [kick])
    os.close(kick)
    fe.send(R.SET_VRING_ENABLE, VringState(0, 1).pack())


CASES["ring addresses outside memory"] = lambda fe: _start_ring_at(fe, UADDR_BASE + 8 * MiB, True)
# A frontend that starts a ring without ever sending a memory table.
CASES["ring started without any memory"] = lambda fe: _start_ring_at(fe, UADDR_BASE, False)


def _closed(fe: VhostUserFrontend) -> bool:
    fe.conn.sock.settimeout(5)
    try:
        while True:
            data = fe.conn.sock.recv(4096)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_message_closes_only_that_connection(
    backend: BackendThread, sock_path: str, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    fe = VhostUserFrontend(sock_path)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        CASES[case](fe)  # the backend may hang up before we finish sending
    assert _closed(fe), f"{case}: connection still open"
    fe.close()
    assert any("closing the connection" in r.message for r in caplog.records), case
    # The process is still up and serves the next frontend end to end.
    ram = GuestRam(16 * MiB)
    g = Guest(sock_path, ram)
    g.start()
    before = ram.allocated()
    ram.fill_pattern()
    before = ram.allocated()
    g.inflate(Queue.INFLATE, list(range(10, 20)))
    assert before - ram.allocated() == 10 * 4096
    g.close()
    ram.close()


def test_second_frontend_is_refused_while_one_is_connected(
    backend: BackendThread, sock_path: str
) -> None:
    ram = GuestRam(16 * MiB)
    g = Guest(sock_path, ram)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.connect(sock_path)
    other.settimeout(5)
    assert other.recv(1) == b""  # closed at once
    other.close()
    g.start()
    g.inflate(Queue.INFLATE, [5])
    g.close()
    ram.close()


def test_a_frontend_that_stops_reading_is_dropped_not_waited_for(
    backend: BackendThread, sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Pipelined requests whose replies are never read used to block the whole process
    in sendall: control socket, rings and SIGTERM with it."""
    fe = VhostUserFrontend(sock_path)
    request = struct.pack("<III", R.GET_FEATURES, 1, 0)
    fe.conn.sock.settimeout(10)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        for _ in range(20000):
            fe.conn.sock.sendall(request)
            # The process keeps answering everything else meanwhile.
    assert backend.call(lambda: 1) == 1
    wait_until(lambda: "disconnected" in backend.events, 10, "the frontend dropped")
    assert any("does not read" in r.message for r in caplog.records)
    fe.close()
    ram = GuestRam(16 * MiB)
    g = Guest(sock_path, ram)
    g.start()
    g.inflate(Queue.INFLATE, [300])
    g.close()
    ram.close()


def test_a_refused_kick_fd_is_closed_once(
    backend: BackendThread, sock_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SET_VRING_KICK before any memory table is refused; its fd is closed by whoever owns
    it then, exactly once (a second close would close someone else's fd)."""
    closed: list[int] = []
    real_close = os.close

    def recording_close(fd: int) -> None:
        closed.append(fd)
        real_close(fd)

    monkeypatch.setattr(os, "close", recording_close)
    fe = VhostUserFrontend(sock_path)
    fe.handshake()
    fe.set_features(fe.get_features())
    fe.set_vring_num(0, 64)
    fe.set_vring_addr(0, 0x1000, 0x2000, 0x3000)
    fe.set_vring_enable(0, True)
    kick = os.eventfd(0)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        fe.send(R.SET_VRING_KICK, struct.pack("<Q", 0), [kick])
    assert _closed(fe)
    wait_until(lambda: "disconnected" in backend.events, 5, "the drop")
    backend.call(lambda: None)  # the backend's teardown has finished
    theirs = [fd for fd in closed if fd != kick]
    assert len(theirs) == len(set(theirs)), f"an fd was closed twice: {sorted(theirs)}"
    real_close(kick)
    fe.close()
