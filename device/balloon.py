"""The balloon device: features, config space, queue layout, routing to handlers.

Transport-agnostic: a transport feeds it memory, queue setups and kicks, and
gets interrupts back through the injected :class:`Interrupts` object only.
Methods run in the caller's event loop; nothing here blocks except the
discard syscalls themselves.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from device.defs import FRAME_SIZE, Feature, Queue, Status
from device.discard import DiscardEngine
from device.errors import ChainError, ConfigError, GuestError, RingError, RingUnmapped
from device.handlers import (
    DeflateHandler,
    FreePageHintHandler,
    FreePageHints,
    GuestStats,
    InflateHandler,
    RangeReportHandler,
    ReportingHandler,
    StatsHandler,
)
from device.layout import QueueLayout, queue_layout
from device.memory import GuestMemory
from device.metrics import BalloonMetrics
from device.virtqueue import SplitQueue

log = logging.getLogger(__name__)

_CONFIG = struct.Struct("<IIII")  # num_pages, actual, free_page_hint_cmd_id, poison_val


class Interrupts(Protocol):
    """How the device reaches the guest: the only way back to a transport."""

    def queue(self, index: int) -> None:
        """Signal a used-buffer interrupt for queue ``index``."""

    def config(self) -> None:
        """Signal a configuration-change interrupt."""


@dataclass
class BalloonConfig:
    """Host-side options of one device (each optional feature can be switched off)."""

    must_tell_host: bool = True
    stats: bool = True
    deflate_on_oom: bool = True
    free_page_hint: bool = True
    page_poison: bool = True
    reporting: bool = True
    range_report: bool = True
    event_idx: bool = True
    indirect_desc: bool = True
    #: seconds between stats refreshes (0: only on request)
    stats_interval: float = 5.0
    #: chains handled per kick before yielding back to the event loop
    kick_budget: int = 1024
    #: discard syscalls per kick before yielding (a chain in progress always finishes)
    kick_syscall_budget: int = 4096

    def offered_features(self) -> int:
        """The feature bits this configuration offers."""
        f = Feature.VERSION_1
        for on, bit in (
            (self.must_tell_host, Feature.MUST_TELL_HOST),
            (self.stats, Feature.STATS_VQ),
            (self.deflate_on_oom, Feature.DEFLATE_ON_OOM),
            (self.free_page_hint, Feature.FREE_PAGE_HINT),
            (self.page_poison, Feature.PAGE_POISON),
            (self.reporting, Feature.REPORTING),
            (self.range_report, Feature.RANGE_REPORT),
            (self.event_idx, Feature.RING_EVENT_IDX),
            (self.indirect_desc, Feature.RING_INDIRECT_DESC),
        ):
            if on:
                f |= bit
        return int(f)


class BalloonDevice:
    """One virtio balloon device.

    :param config: host-side options
    :param interrupts: where used-buffer and config interrupts go
    :param clock: monotonic clock (injectable for tests)
    """

    def __init__(
        self,
        config: BalloonConfig,
        interrupts: Interrupts,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.interrupts = interrupts
        self.clock = clock
        self.metrics = BalloonMetrics()
        self.engine = DiscardEngine(self.metrics)
        self.hints = FreePageHints()
        self.offered_features = config.offered_features()
        self.driver_features = 0
        self.layout: QueueLayout = queue_layout(self.offered_features)
        self.status = 0
        self.num_pages = 0
        self.actual = 0
        self.poison_val = 0
        self.memory: GuestMemory | None = None
        self.queues: dict[int, SplitQueue] = {}
        self.broken: set[int] = set()
        #: called with the new ``actual`` (4 KiB pages) when the driver changes it
        self.on_actual_change: Callable[[int], None] | None = None
        self._stats = StatsHandler(self.metrics, config.stats_interval, clock)
        #: avail index at which the held stats buffer was taken
        self._stats_held_at = 0
        self._handlers = {
            Queue.INFLATE: InflateHandler(self.engine, self.metrics),
            Queue.DEFLATE: DeflateHandler(self.engine, self.metrics),
            Queue.STATS: self._stats,
            Queue.FREE_PAGE: FreePageHintHandler(self.hints, self.metrics),
            Queue.REPORTING: ReportingHandler(self.engine, self.metrics, self._poison_forbids),
            Queue.RANGE_REPORT: RangeReportHandler(self.engine, self.metrics),
        }

    # -- negotiation and setup ----------------------------------------------

    @property
    def config_size(self) -> int:
        """Bytes of config space exposed (QEMU's rule: depends on offered features)."""
        if self.offered_features & Feature.PAGE_POISON:
            return 16
        if self.offered_features & Feature.FREE_PAGE_HINT:
            return 12
        return 8

    def set_features(self, features: int) -> None:
        """Accept the driver's features (FEATURES_OK) and fix the queue layout.

        :raise ConfigError: if the driver accepted a feature we did not offer.
        """
        extra = features & ~self.offered_features
        if extra:
            raise ConfigError(f"driver accepted features {extra:#x} that were not offered")
        self.driver_features = features
        self.layout = queue_layout(features)
        offered_layout = queue_layout(self.offered_features)
        if self.layout != offered_layout:
            log.info(
                "driver declined optional queues: layout %s (offered %s)",
                self.layout.describe(),
                offered_layout.describe(),
            )
        log.info("features negotiated: %#x, queues %s", features, self.layout.describe())

    def has(self, feature: Feature) -> bool:
        """Whether ``feature`` was negotiated."""
        return bool(self.driver_features & feature)

    def set_memory(self, mem: GuestMemory | None) -> None:
        """Use ``mem`` as guest RAM (a new table replaces the old one).

        Queues drop their views of the old memory, so the caller may unmap it.
        """
        for q in self.queues.values():
            q.detach()
        self.memory = mem
        self.engine.set_memory(mem)

    def set_queue(self, index: int, queue: SplitQueue) -> None:
        """Start servicing queue ``index`` with ring state ``queue``.

        :raise ConfigError: if no queue exists at ``index`` with the negotiated features.
        """
        if self.layout.queue_at(index) is None:
            raise ConfigError(f"no queue {index} with features {self.driver_features:#x}")
        queue.event_idx = self.has(Feature.RING_EVENT_IDX)
        queue.indirect = self.has(Feature.RING_INDIRECT_DESC)
        self.queues[index] = queue
        self.broken.discard(index)

    def stop_queue(self, index: int) -> int | None:
        """Stop servicing queue ``index``; return where the driver should resume.

        A stats buffer we hold is given back (the next start sees it again).
        """
        q = self.queues.pop(index, None)
        if q is None:
            return None
        head = self._stats.take_held() if self.layout.queue_at(index) is Queue.STATS else None
        if head is not None:
            if q.next_avail == (self._stats_held_at + 1) & 0xFFFF:
                q.undo_pop()  # it was the last chain taken: the next start sees it again
            elif self.memory is not None:
                # Chains were taken after it (a skipped bad chain): it cannot be un-taken,
                # so return it now, with its interrupt; the driver answers with fresh stats.
                try:
                    q.push(self.memory, head, 0)
                    if q.publish(self.memory):
                        self._interrupt(index)
                except RingError as err:
                    log.warning("queue %d: held stats buffer not returned: %s", index, err)
        return q.next_avail

    def driver_ok(self) -> None:
        """DRIVER_OK: buffers queued before it (Linux primes stats) are processed now."""
        self.status |= Status.DRIVER_OK
        for index in list(self.queues):
            self.queue_notify(index)

    def reset(self) -> None:
        """Guest reset: the balloon is empty again; target and ``actual`` are kept (as QEMU)."""
        self.queues.clear()
        self.broken.clear()
        self.engine.forget_balloon()
        self._stats.take_held()
        self._stats.stats = GuestStats()
        self.hints.stop()
        self.poison_val = 0
        self.status = 0
        self.driver_features = 0
        self.layout = queue_layout(self.offered_features)

    # -- config space ---------------------------------------------------------

    def _config_bytes(self) -> bytes:
        return _CONFIG.pack(self.num_pages, self.actual, self.hints.cmd_id, self.poison_val)

    def read_config(self, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset + size)`` of the config space.

        :raise ConfigError: if the range is outside the config space.
        """
        if offset < 0 or size < 0 or offset + size > self.config_size:
            raise ConfigError(f"config read {offset}+{size} outside {self.config_size} bytes")
        return self._config_bytes()[offset : offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write to the config space: only ``actual`` and ``poison_val`` are taken.

        :raise ConfigError: if the range is outside the config space.
        """
        if offset < 0 or offset + len(data) > self.config_size:
            raise ConfigError(f"config write {offset}+{len(data)} outside {self.config_size} bytes")
        cur = bytearray(self._config_bytes())
        cur[offset : offset + len(data)] = data
        _, actual, _, poison = _CONFIG.unpack(cur)
        if offset < 8 and offset + len(data) > 4 and actual != self.actual:
            self.actual = actual
            # One line per buffer would be per-page spam: info only when the target is met.
            level = logging.INFO if actual == self.num_pages else logging.DEBUG
            log.log(
                level,
                "guest balloon now %d MiB (target %d MiB)",
                actual * FRAME_SIZE >> 20,
                self.num_pages * FRAME_SIZE >> 20,
            )
            if self.on_actual_change is not None:
                self.on_actual_change(actual)
        # Linux writes poison_val in probe, before FEATURES_OK reaches a vhost-user backend:
        # keep it whenever PAGE_POISON is offered; whether it binds is decided per report.
        offered = self.offered_features & Feature.PAGE_POISON
        if offset + len(data) > 12 and offered and poison != self.poison_val:
            self.poison_val = poison
            log.info("guest poison value %#x", poison)

    def set_num_pages(self, num_pages: int) -> None:
        """Set the balloon target (4 KiB pages the guest should give) and tell the guest."""
        if not 0 <= num_pages <= 0xFFFFFFFF:
            raise ConfigError(f"balloon target {num_pages} pages does not fit 32 bits")
        if num_pages != self.num_pages:
            self.num_pages = num_pages
            log.info("balloon target %d MiB", num_pages * FRAME_SIZE >> 20)
            self._config_interrupt()

    def _config_interrupt(self) -> None:
        self.metrics.config_interrupts += 1
        self.interrupts.config()

    def _poison_forbids(self) -> bool:
        return self.has(Feature.PAGE_POISON) and self.poison_val != 0

    # -- stats ----------------------------------------------------------------

    @property
    def stats(self) -> GuestStats:
        """The latest statistics from the guest."""
        return self._stats.stats

    def request_stats(self) -> bool:
        """Return the held stats buffer so the guest sends fresh values.

        :return: whether a buffer was held (and so a request went out).
        """
        index = self.layout.index(Queue.STATS)
        q = self.queues.get(index) if index is not None else None
        if q is None or self.memory is None or index in self.broken:
            return False
        head = self._stats.held
        if head is None:
            return False
        try:
            q.push(self.memory, head, 0)
            publish = q.publish(self.memory)
        except RingError as err:  # ring not mapped right now: keep holding it
            log.debug("stats request deferred: %s", err)
            return False
        self._stats.take_held()
        if publish:
            self._interrupt(index)
        return True

    def poll(self, now: float | None = None) -> float | None:
        """Timer work (stats refresh); return the next monotonic deadline, or None."""
        if self._stats.due(self.clock() if now is None else now):
            self.request_stats()
        return self._stats.next_deadline()

    # -- free page hinting ------------------------------------------------------

    def start_free_page_hint(self) -> int:
        """Ask the guest for a new round of free page hints; return the command id.

        :raise ConfigError: if FREE_PAGE_HINT was not negotiated.
        """
        if not self.has(Feature.FREE_PAGE_HINT):
            raise ConfigError("free page hinting was not negotiated")
        cmd_id = self.hints.start()
        self._config_interrupt()
        return cmd_id

    def stop_free_page_hint(self) -> None:
        """Tell the guest to stop hinting (hints from now on are stale)."""
        self.hints.stop()
        self._config_interrupt()

    def done_free_page_hint(self) -> None:
        """Tell the guest it may reuse every hinted page."""
        self.hints.done()
        self._config_interrupt()

    # -- the data path ----------------------------------------------------------

    def _interrupt(self, index: int) -> None:
        self.metrics.interrupts += 1
        self.interrupts.queue(index)

    def break_queue(self, index: int, reason: str) -> None:
        """The driver set up queue ``index`` in a way that cannot work (e.g. misaligned
        rings): stop it and ask for a reset, as for a corrupt ring."""
        self._break(index, RingError(reason))

    def _break(self, index: int, err: RingError) -> None:
        log.error("queue %d is broken, stopping it until reset: %s", index, err)
        self.broken.add(index)
        self.metrics.broken_queues += 1
        self.status |= Status.DEVICE_NEEDS_RESET
        self._config_interrupt()

    def queue_notify(self, index: int) -> bool:
        """The driver kicked queue ``index``: handle its chains.

        Work per call is bounded by ``kick_budget`` chains; one interrupt at most.
        Guest errors are counted and never escape.

        :return: True if chains remain (call again from the event loop).
        """
        q = self.queues.get(index)
        mem = self.memory
        role = self.layout.queue_at(index)
        if q is None or mem is None or role is None or index in self.broken:
            return False
        self.metrics.kicks += 1
        handler = self._handlers[role]
        budget = self.config.kick_budget
        # Chains are not equal: one PFN buffer can mean thousands of syscalls. Yield to
        # the event loop after this much kernel work too.
        syscalls_end = self.metrics.discard_syscalls + self.config.kick_syscall_budget
        more = False
        try:
            while budget > 0:
                try:
                    chain = q.pop(mem)
                except ChainError as err:
                    self.metrics.bad_chains += 1
                    log.warning("queue %d (%s): %s", index, role.name.lower(), err)
                    q.push(mem, err.head, 0)
                    budget -= 1
                    continue
                if chain is None:
                    if q.enable_notification(mem):
                        continue  # raced with the driver: more arrived
                    break
                if role is Queue.STATS:
                    # A driver that sends a new stats buffer while we hold one gets the
                    # old one back first (only one is ever outstanding, spec 5.5.6.3).
                    old = self._stats.take_held()
                    if old is not None:
                        q.push(mem, old, 0)
                try:
                    used = handler.handle(mem, chain)
                except GuestError as err:
                    self.metrics.bad_chains += 1
                    log.warning("queue %d (%s): %s", index, role.name.lower(), err)
                    used = 0
                if used is not None:
                    q.push(mem, chain.head, used)
                elif role is Queue.STATS:
                    self._stats_held_at = (q.next_avail - 1) & 0xFFFF
                budget -= 1
                if self.metrics.discard_syscalls >= syscalls_end:
                    budget = 0
            else:
                # Out of budget: still ask for the next kick (EVENT_IDX), or a driver that
                # adds its next buffer later would not notify and the queue would stall.
                more = q.enable_notification(mem)
            if q.publish(mem):
                self._interrupt(index)
        except RingUnmapped as err:
            # The frontend is between two memory-table updates: not the guest's fault.
            # The transport notifies the queue again once the table is complete.
            log.debug("queue %d: %s; waiting for the memory table", index, err)
            return False
        except RingError as err:
            # Publish what was completed so no finished buffer is lost.
            try:
                if q.publish(mem):
                    self._interrupt(index)
            except RingError:
                pass
            self._break(index, err)
            return False
        return more
