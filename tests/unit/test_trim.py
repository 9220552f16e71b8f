"""Trimming zero pages (``vballoon migrate --trim``: a migration destination writes every
page it receives, zeros included): every all-zero page goes back, nothing else changes."""

from __future__ import annotations

import os

import pytest

from device import BalloonConfig, BalloonDevice, BalloonError, GuestMemory
from device.testing import FRAME_SIZE, GuestRam, MiB

FALLOC_PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def _punch(ram: GuestRam, first: int, count: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    ret = libc.fallocate(
        ram.fd, FALLOC_PUNCH, ctypes.c_long(first * FRAME_SIZE), ctypes.c_long(count * FRAME_SIZE)
    )
    assert ret == 0, os.strerror(ctypes.get_errno())


def test_zero_pages_go_back_and_data_stays() -> None:
    ram = GuestRam(16 * MiB)
    ram.fill_pattern()
    frames = ram.size // FRAME_SIZE
    zero = {*range(100, 300), 1000, 1002, 2047, frames - 1}
    for f in zero:
        ram.mapping[f * FRAME_SIZE : (f + 1) * FRAME_SIZE] = bytes(FRAME_SIZE)
    # A page with one non-zero byte at its very end is not a zero page.
    ram.mapping[1500 * FRAME_SIZE : 1501 * FRAME_SIZE] = bytes(FRAME_SIZE - 1) + b"\x01"
    _punch(ram, 3000, 500)  # a hole already: skipped, not read (reading would allocate it)
    dev = BalloonDevice(BalloonConfig(stats_interval=0))
    mem = GuestMemory([ram.spec()])
    dev.set_memory(mem)
    try:
        before = ram.allocated()
        given, scanned, secs = dev.trim_zero_pages()
        assert given == len(zero) * FRAME_SIZE == before - ram.allocated()
        assert scanned == frames - 500  # the hole was never read
        assert secs >= 0
        assert dev.trim_zero_pages()[0] == 0  # again: nothing left to give
        for f in range(frames):
            if f in zero or 3000 <= f < 3500:
                assert ram.frame_zero(f)
            elif f != 1500:
                assert ram.frame_intact(f), f
        assert ram.mapping[1501 * FRAME_SIZE - 1] == 1
        assert dev.tracked_frames == 0  # nothing entered the balloon
        # Reading a hole of a shared memfd allocates it (what a migration does): the
        # frames just read come back, and a trim gives them back again.
        assert dev.trim_zero_pages()[0] == (len(zero) + 500) * FRAME_SIZE
    finally:
        dev.set_memory(None)
        mem.close()
        ram.close()


def test_without_memory_it_says_so() -> None:
    with pytest.raises(BalloonError, match="no guest memory"):
        BalloonDevice(BalloonConfig(stats_interval=0)).trim_zero_pages()
