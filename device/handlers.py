"""Queue handlers: what each balloon queue does with one descriptor chain.

A handler takes a validated chain and the guest memory and returns the used
length to write, or None to hold the buffer (stats). Discards finish inside
``handle``: the buffer is returned only after the memory went back.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from device._accel import CData, ffi
from device.defs import (
    CMD_ID_DONE,
    CMD_ID_MIN,
    CMD_ID_STOP,
    MAX_PFN_BUFFER_BYTES,
    MAX_RANGE_REPORT_BYTES,
    PFN_BATCH,
    STAT_ENTRY_SIZE,
    STAT_NAMES,
    StatTag,
)
from device.discard import DiscardEngine
from device.errors import GuestError
from device.memory import GuestMemory
from device.metrics import BalloonMetrics
from device.virtqueue import DescriptorChain

log = logging.getLogger(__name__)

_STAT = struct.Struct("<HQ")
_U32 = struct.Struct("<I")
_STATUS = struct.Struct("<IIQ")  # struct vballoon_report_status
_RANGE_REPORT_E_COUNT = 3
_RANGE_REPORT_E_CHAIN = 7


class QueueHandler(Protocol):
    """What each queue does with one descriptor chain.

    The chain's addresses were validated against ``mem`` by the ring walk; the
    handler validates the *contents* (PFNs, records, stat tags) itself.
    """

    def handle(self, mem: GuestMemory, chain: DescriptorChain) -> int | None:
        """Process one chain; return the used length, or None to hold the buffer.

        :raise GuestError: the contents break the spec (the chain is returned with
            used length 0 and counted in ``bad_chains``).
        """


def readable_bytes(mem: GuestMemory, chain: DescriptorChain, limit: int) -> tuple[CData, int]:
    """The chain's device-readable bytes as (``uint8_t *``, length), at most ``limit``.

    A single buffer is used in place (no copy); several are joined. The
    pointer stays valid while ``mem`` is.
    """
    if len(chain.readable) == 1:
        gpa, n = chain.readable[0]
        n = min(n, limit)
        region, off = mem.find(gpa), 0
        if region is not None and gpa + n <= region.end:
            off = gpa - region.gpa
            return ffi.cast("uint8_t *", region.hva + off), n
    parts, left = [], limit
    for gpa, n in chain.readable:  # copy only what will be read
        if left <= 0:
            break
        parts.append(mem.read(gpa, min(n, left)))
        left -= min(n, left)
    data = b"".join(parts)
    return ffi.from_buffer(data), len(data)


class _PfnArrayHandler:
    """Inflate and deflate buffers: arrays of le32 PFNs, cut into accelerator batches."""

    def __init__(self, engine: DiscardEngine, metrics: BalloonMetrics) -> None:
        self.engine = engine
        self.metrics = metrics

    def handle(self, mem: GuestMemory, chain: DescriptorChain) -> int | None:
        ptr, n = readable_bytes(mem, chain, MAX_PFN_BUFFER_BYTES)
        count = n // 4  # a trailing partial PFN is ignored
        for start in range(0, count, PFN_BATCH):
            self._apply(ptr + 4 * start, min(PFN_BATCH, count - start))
        self._count()
        return 0

    def _apply(self, ptr: CData, count: int) -> None:
        raise NotImplementedError  # each subclass applies the frames its own way

    def _count(self) -> None:
        raise NotImplementedError  # and counts its own buffers


class InflateHandler(_PfnArrayHandler):
    """Inflate queue: the frames are ballooned and discarded before the buffer returns."""

    def _apply(self, ptr: CData, count: int) -> None:
        self.engine.inflate(ptr, count)

    def _count(self) -> None:
        self.metrics.inflate_buffers += 1


class DeflateHandler(_PfnArrayHandler):
    """Deflate queue: the frames leave the balloon; nothing is discarded."""

    def _apply(self, ptr: CData, count: int) -> None:
        self.engine.deflate(ptr, count)

    def _count(self) -> None:
        self.metrics.deflate_buffers += 1


@dataclass
class GuestStats:
    """The latest statistics the guest sent."""

    values: dict[str, int] = field(default_factory=dict)
    #: wall-clock time of the update (seconds since the epoch), 0 if none yet
    last_update: float = 0.0
    #: monotonic time of the update
    last_update_monotonic: float = 0.0


class StatsHandler:
    """Stats queue: keep the buffer, remember its values, return it to ask for new ones.

    :param interval: seconds between refresh requests; 0 never refreshes.
    """

    def __init__(
        self, metrics: BalloonMetrics, interval: float, clock: Callable[[], float]
    ) -> None:
        self.metrics = metrics
        self.interval = interval
        self.clock = clock
        self.stats = GuestStats()
        #: head of the buffer we hold, if any
        self.held: int | None = None
        self._held_since = 0.0

    def handle(self, mem: GuestMemory, chain: DescriptorChain) -> int | None:
        ptr, n = readable_bytes(mem, chain, 64 * STAT_ENTRY_SIZE)
        data = ffi.buffer(ptr, n)[:]
        values: dict[str, int] = {}
        for off in range(0, n - n % STAT_ENTRY_SIZE, STAT_ENTRY_SIZE):
            tag, val = _STAT.unpack_from(data, off)
            try:
                values[STAT_NAMES[StatTag(tag)]] = val
            except ValueError:
                self.metrics.stats_unknown_tags += 1  # spec: ignore unknown tags
        self.stats = GuestStats(values, time.time(), self.clock())
        self.metrics.stats_updates += 1
        self.held = chain.head
        self._held_since = self.clock()
        return None

    def take_held(self) -> int | None:
        """Hand over the held buffer's head (to return it); None if none is held."""
        head, self.held = self.held, None
        return head

    def due(self, now: float) -> bool:
        """Whether the refresh interval has passed with a buffer held."""
        return (
            self.held is not None and self.interval > 0 and now - self._held_since >= self.interval
        )

    def next_deadline(self) -> float | None:
        """Monotonic time of the next refresh, or None."""
        if self.held is None or self.interval <= 0:
            return None
        return self._held_since + self.interval


class HintState(Enum):
    """Free-page-hint run state (device view)."""

    IDLE = "idle"  #: no id issued yet
    REQUESTED = "requested"  #: new id issued, driver has not acknowledged it
    RUNNING = "running"  #: driver sent the id: hints are accepted
    STOPPED = "stopped"  #: STOP sent (by the driver, or by us): hints are stale
    DONE = "done"  #: DONE sent: the driver may reuse every hinted page


@dataclass
class FreePageHints:
    """Free-page hinting state machine (spec "Free Page Hinting").

    Hinted pages are never discarded: the spec lets the device change a hinted
    page only if the guest has not written it since the id was issued, which a
    process outside the guest cannot know without write tracking. The hints
    are recorded (bounded) for a consumer such as a migration stream, together
    with ``poison_val``, which such a consumer must write instead of zeros.
    """

    max_ranges: int = 65536
    cmd_id: int = CMD_ID_STOP
    state: HintState = HintState.IDLE
    ranges: list[tuple[int, int]] = field(default_factory=list)
    frames: int = 0
    ranges_dropped: int = 0
    _next_id: int = CMD_ID_MIN

    def start(self) -> int:
        """Issue a fresh id (never reused) and forget the previous run's hints."""
        self.cmd_id = self._next_id
        self._next_id = CMD_ID_MIN if self._next_id == 0xFFFFFFFF else self._next_id + 1
        self.state = HintState.REQUESTED
        self.ranges.clear()
        self.frames = self.ranges_dropped = 0
        return self.cmd_id

    def stop(self) -> None:
        """Device-side STOP: hints arriving from now on are stale."""
        self.cmd_id = CMD_ID_STOP
        self.state = HintState.STOPPED

    def done(self) -> None:
        """Device-side DONE: the guest may reuse all hinted pages; forget them."""
        self.cmd_id = CMD_ID_DONE
        self.state = HintState.DONE
        self.ranges.clear()


class FreePageHintHandler:
    """Free-page queue: 4-byte id buffers (readable) and hinted blocks (writable)."""

    def __init__(self, hints: FreePageHints, metrics: BalloonMetrics) -> None:
        self.hints = hints
        self.metrics = metrics

    def handle(self, mem: GuestMemory, chain: DescriptorChain) -> int | None:
        self.metrics.hint_buffers += 1
        h = self.hints
        if chain.readable:
            ptr, n = readable_bytes(mem, chain, 4)
            if n < 4:
                raise GuestError(f"free-page-hint id buffer of {n} bytes")
            (cmd_id,) = _U32.unpack(ffi.buffer(ptr, 4)[:])
            if cmd_id == CMD_ID_STOP and h.state in (HintState.REQUESTED, HintState.RUNNING):
                h.state = HintState.STOPPED
                log.info("free page hint run %#x finished: %d frames hinted", h.cmd_id, h.frames)
            elif cmd_id == h.cmd_id and h.state is HintState.REQUESTED:
                h.state = HintState.RUNNING
        for gpa, n in chain.writable:
            if h.state is not HintState.RUNNING:
                self.metrics.hint_stale += 1
                continue
            h.frames += n >> 12
            self.metrics.hinted_frames += n >> 12
            if len(h.ranges) < h.max_ranges:
                h.ranges.append((gpa, n))
            else:
                h.ranges_dropped += 1
        return 0


class _ReportHandler:
    """What both report queues need: the engine, the counters, and the page poison rule.

    :param poison_forbids_discard: returns True while PAGE_POISON with a non-zero
        poison_val is in force (a discard would turn the pages into zeros).
    """

    def __init__(
        self,
        engine: DiscardEngine,
        metrics: BalloonMetrics,
        poison_forbids_discard: Callable[[], bool],
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.poison_forbids_discard = poison_forbids_discard


class ReportingHandler(_ReportHandler):
    """Free-page reporting queue: each writable buffer is a free block to discard."""

    def handle(self, mem: GuestMemory, chain: DescriptorChain) -> int | None:
        self.metrics.reports += 1
        self.metrics.reported_bytes += chain.writable_len
        self.metrics.report_entries += len(chain.writable)
        if self.poison_forbids_discard():
            self.metrics.poison_skipped += 1
            return 0
        self.engine.discard_gpa_ranges(chain.writable)
        return 0


class RangeReportHandler(_ReportHandler):
    """vballoon range-report queue (guest_driver_c/vballoon_report_abi.h).

    Readable part: header and records; writable part: the 16-byte status. With page
    poison in force a report is validated and answered, but nothing is discarded
    (the ABI header says so), as for free page reports.
    """

    def handle(self, mem: GuestMemory, chain: DescriptorChain) -> int | None:
        self.metrics.range_reports += 1
        if not chain.writable or chain.writable[0][1] < _STATUS.size:
            # Nowhere to write a status: return the chain untouched.
            self.metrics.range_report_errors += 1
            raise GuestError("range report without a 16-byte status buffer")
        if chain.readable_len > MAX_RANGE_REPORT_BYTES:
            err, frames, bad = _RANGE_REPORT_E_COUNT, 0, 0xFFFFFFFF
        elif not chain.readable:
            err, frames, bad = _RANGE_REPORT_E_CHAIN, 0, 0xFFFFFFFF
        else:
            ptr, n = readable_bytes(mem, chain, MAX_RANGE_REPORT_BYTES)
            # A private copy: the report is read twice (validate, then discard), and a
            # vCPU rewriting it in between must not get unvalidated records discarded.
            poisoned = self.poison_forbids_discard()
            err, frames, bad = self.engine.range_report(
                bytes(ffi.buffer(ptr, n)), validate_only=poisoned
            )
            if poisoned and not err:
                self.metrics.poison_skipped += 1
        if err:
            self.metrics.range_report_errors += 1
        mem.write(chain.writable[0][0], _STATUS.pack(err, bad, frames))
        return _STATUS.size
