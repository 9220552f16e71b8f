"""The balloon device: lifecycle, features, config space, queues and routing to handlers.

Transport-agnostic: a transport maps its wire onto the methods below and gets
interrupts back through the attached :class:`Interrupts` object only. Every
virtio rule lives here, once:

Lifecycle (spec "Device Status Field", "Device Initialization")
    The status register is the device's. :meth:`set_status` applies the
    driver's writes with the spec's rules: writing 0 resets the device;
    FEATURES_OK is refused (left clear, for the driver to read back) when the
    driver accepted a feature that was not offered; DRIVER_OK starts the queues
    (buffers queued before it, such as Linux's first stats buffer, are processed
    then); DEVICE_NEEDS_RESET is set by the device only, never by a write;
    FAILED stops servicing until a reset. A driver cannot clear a bit except by
    writing 0.

    Transports whose wire carries lifecycle *events* rather than the register
    (vhost-user) use :meth:`negotiate` (features accepted, FEATURES_OK),
    :meth:`activate` (DRIVER_OK) and :meth:`stop`.

Stop and reset
    A **stop** (the transport stopped every queue: a VM pause, or a guest reset
    the transport cannot tell from one) keeps what the guest holds: ``actual``,
    the poison value, the target, the statistics. A **reset** means the guest's
    balloon is gone: ``actual`` returns to 0, features and poison are forgotten;
    the target (the operator's) stays. Both forget the frames the device recorded
    as ballooned (huge-page accumulation): keeping them across a guest reset the
    device could not see would later complete a huge page holding live data. So
    the record is dropped whenever the last running queue stops, whatever stopped
    it, and the device is then suspended: DRIVER_OK, a pending request for reset
    and broken queues go; the negotiated features stay, so the transport restarts
    it with :meth:`BalloonDevice.activate` (QEMU 11.1 resumes a vhost-user device
    without renegotiating the status).

Methods run in the caller's event loop; nothing here blocks except the discard
syscalls themselves.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from device.defs import FRAME_SIZE, PC_LEGACY_WINDOW, Feature, Queue, Status
from device.discard import DiscardEngine
from device.errors import (
    BalloonError,
    ChainError,
    ConfigError,
    GuestError,
    RingError,
    RingUnmapped,
)
from device.handlers import (
    DeflateHandler,
    FreePageHintHandler,
    FreePageHints,
    GuestStats,
    InflateHandler,
    QueueHandler,
    RangeReportHandler,
    ReportingHandler,
    StatsHandler,
)
from device.layout import QueueLayout, queue_layout
from device.memory import GuestMemory
from device.metrics import BalloonMetrics
from device.snapshot import DeviceSnapshot, HintSnapshot
from device.virtqueue import SplitQueue

log = logging.getLogger(__name__)

_CONFIG = struct.Struct("<IIII")  # num_pages, actual, free_page_hint_cmd_id, poison_val
#: Status bits a driver may write (the others are the device's).
_DRIVER_BITS = (
    Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK | Status.FAILED
)


class Interrupts(Protocol):
    """How the device reaches the guest: the only way back to a transport."""

    def queue(self, index: int) -> None:
        """Signal a used-buffer interrupt for queue ``index``."""

    def config(self) -> None:
        """Signal a configuration-change interrupt."""


class NullInterrupts:
    """Where interrupts go while no transport is attached: nowhere."""

    def queue(self, index: int) -> None:
        pass

    def config(self) -> None:
        pass


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
    #: guest-physical (gpa, bytes) ranges that are never the guest's RAM, even where a
    #: memory region covers them: never discarded, nor any backing page holding them
    reserved_gpa: tuple[tuple[int, int], ...] = (PC_LEGACY_WINDOW,)

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
    :param interrupts: where used-buffer and config interrupts go (see :meth:`attach`)
    :param clock: monotonic clock (injectable for tests)
    """

    def __init__(
        self,
        config: BalloonConfig,
        interrupts: Interrupts | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.clock = clock
        self.metrics = BalloonMetrics()
        self.hints = FreePageHints()
        self.offered_features = config.offered_features()
        self._interrupts: Interrupts = interrupts or NullInterrupts()
        self._engine = DiscardEngine(self.metrics, config.reserved_gpa)
        #: what the driver wrote; accepted (``_driver_features``) only at FEATURES_OK
        self._written_features = 0
        self._driver_features = 0
        self._layout: QueueLayout = queue_layout(self.offered_features)
        self._status = 0
        self._num_pages = 0
        self._actual = 0
        self._poison_val = 0
        self._memory: GuestMemory | None = None
        self._queues: dict[int, SplitQueue] = {}
        self._broken: set[int] = set()
        self._actual_watchers: list[Callable[[int], None]] = []
        self._stats = StatsHandler(self.metrics, config.stats_interval, clock)
        #: avail index at which the held stats buffer was taken
        self._stats_held_at = 0
        self._handlers: dict[Queue, QueueHandler] = {
            Queue.INFLATE: InflateHandler(self._engine, self.metrics),
            Queue.DEFLATE: DeflateHandler(self._engine, self.metrics),
            Queue.STATS: self._stats,
            Queue.FREE_PAGE: FreePageHintHandler(self.hints, self.metrics),
            Queue.REPORTING: ReportingHandler(self._engine, self.metrics, self._poison_forbids),
            Queue.RANGE_REPORT: RangeReportHandler(
                self._engine, self.metrics, self._poison_forbids
            ),
        }

    # -- what a transport and the control plane may read ---------------------------

    def read_status(self) -> int:
        """The device status register, as the driver reads it."""
        return int(self._status)

    @property
    def negotiated(self) -> bool:
        """FEATURES_OK is set: the queue layout is fixed."""
        return bool(self._status & Status.FEATURES_OK)

    @property
    def driver_features(self) -> int:
        """The features negotiated at FEATURES_OK (0 before, or when they were refused)."""
        return self._driver_features

    @property
    def layout(self) -> QueueLayout:
        """The queue layout for the negotiated (before that: offered) features."""
        return self._layout

    @property
    def running(self) -> bool:
        """DRIVER_OK is set and the driver did not give up: queues are serviced."""
        return bool(self._status & Status.DRIVER_OK) and not self._status & Status.FAILED

    @property
    def memory(self) -> GuestMemory | None:
        """The guest memory map in use, if any."""
        return self._memory

    @property
    def num_pages(self) -> int:
        """The target: 4 KiB pages the guest is asked to give."""
        return self._num_pages

    @property
    def actual(self) -> int:
        """4 KiB pages the guest says its balloon holds."""
        return self._actual

    @property
    def poison_val(self) -> int:
        """The guest's page poison value."""
        return self._poison_val

    @property
    def tracked_frames(self) -> int:
        """Frames recorded as ballooned since the device last stopped (see the module doc)."""
        return self._engine.ballooned_frames

    @property
    def config_size(self) -> int:
        """Bytes of config space exposed (QEMU's rule: depends on offered features)."""
        if self.offered_features & Feature.PAGE_POISON:
            return 16
        if self.offered_features & Feature.FREE_PAGE_HINT:
            return 12
        return 8

    def has(self, feature: Feature) -> bool:
        """Whether ``feature`` was negotiated."""
        return bool(self._driver_features & feature)

    def queue(self, index: int) -> SplitQueue | None:
        """The ring state of queue ``index`` while it is set up."""
        return self._queues.get(index)

    def is_broken(self, index: int) -> bool:
        """Whether queue ``index`` is stopped until reset (the driver corrupted it)."""
        return index in self._broken

    def trim_zero_pages(self) -> tuple[int, int, float]:
        """Give back every all-zero page of guest RAM (a migration destination holds
        them all). Only while the VM is paused: a page written between its check and
        its punch would lose the write. Zero pages read back as zeros: nothing changes
        for the guest, nothing enters the balloon.

        :return: bytes given back, frames looked at, seconds it took.
        :raise BalloonError: without guest memory.
        """
        if self._memory is None:
            raise BalloonError("no guest memory to trim: the frontend sent no memory table")
        return self._engine.trim_zero()

    def is_ballooned(self, gpa: int) -> bool:
        """Whether the frame holding ``gpa`` is recorded as ballooned (for tests and queries)."""
        return self._engine.is_ballooned(gpa)

    def snapshot(self) -> DeviceSnapshot:
        """Everything the control plane may show, as one typed value."""
        st = self._stats.stats
        h = self.hints
        age = None
        if st.last_update:
            age = max(0.0, self.clock() - st.last_update_monotonic)
        return DeviceSnapshot(
            offered_features=self.offered_features,
            driver_features=self._driver_features,
            status=int(self._status),
            running=self.running,
            layout=self._layout.describe(),
            active_queues=tuple(sorted(self._queues)),
            broken_queues=tuple(sorted(self._broken)),
            ram_size=self._memory.total_size if self._memory is not None else None,
            num_pages=self._num_pages,
            actual=self._actual,
            tracked_frames=self._engine.ballooned_frames,
            poison_val=self._poison_val,
            stats_interval=self.config.stats_interval,
            stats=dict(st.values),
            stats_updated=st.last_update,
            stats_age=age,
            hints=HintSnapshot(h.state.value, h.cmd_id, h.frames, len(h.ranges), h.ranges_dropped),
            counters=self.metrics.as_dict(),
        )

    def watch_actual(self, callback: Callable[[int], None]) -> Callable[[], None]:
        """Call ``callback(actual)`` whenever ``actual`` changes; returns the unsubscriber."""
        self._actual_watchers.append(callback)

        def unsubscribe() -> None:
            if callback in self._actual_watchers:
                self._actual_watchers.remove(callback)

        return unsubscribe

    # -- interrupts -------------------------------------------------------------------

    def attach(self, interrupts: Interrupts) -> None:
        """Send interrupts to ``interrupts`` from now on (a transport connected)."""
        self._interrupts = interrupts

    def detach(self) -> None:
        """No transport: interrupts go nowhere until the next :meth:`attach`."""
        self._interrupts = NullInterrupts()

    # -- lifecycle: the status register -------------------------------------------------

    def write_driver_features(self, features: int) -> None:
        """The driver wrote its feature bits; FEATURES_OK decides whether they are accepted.

        Ignored once FEATURES_OK is set (spec: features are fixed from then on).
        """
        if self._status & Status.FEATURES_OK:
            log.warning(
                "driver wrote features %#x after FEATURES_OK: ignored (keeping %#x)",
                features,
                self._driver_features,
            )
            return
        self._written_features = features

    def set_status(self, value: int) -> None:
        """A driver write to the status register, with the spec's rules (see the module doc)."""
        if value == 0:
            self.reset()
            return
        old = self._status
        new = Status(value & _DRIVER_BITS) | (old & Status.DEVICE_NEEDS_RESET)
        cleared = old & _DRIVER_BITS & ~new
        if cleared:
            # Only writing 0 may clear a bit (spec 2.1.2); keep what was set.
            log.warning("driver cleared status bits %#x without a reset: ignored", int(cleared))
            new |= cleared
        newly = new & ~old
        if newly & Status.FEATURES_OK and not self._accept_features(self._written_features):
            new &= ~Status.FEATURES_OK
        if newly & Status.DRIVER_OK and not new & Status.FEATURES_OK:
            log.error("driver set DRIVER_OK without FEATURES_OK: the device needs a reset")
            self._status = (new & ~Status.DRIVER_OK) | Status.DEVICE_NEEDS_RESET
            self._config_interrupt()
            return
        if newly & Status.FAILED:
            log.error("driver set FAILED: it gave up on the device; queues stop until reset")
        self._status = new
        if self.running and not old & Status.DRIVER_OK:
            self._start_running()

    def _accept_features(self, features: int) -> bool:
        """FEATURES_OK: fix the queue layout, or refuse features that were not offered
        (then nothing changes)."""
        extra = features & ~self.offered_features
        if extra:
            log.error(
                "driver accepted features %#x that were not offered: FEATURES_OK refused", extra
            )
            return False
        self._driver_features = features
        self._layout = queue_layout(features)
        # Completing a huge page with frames of earlier requests is safe only while the
        # driver waits for each deflate before reusing its pages.
        self._engine.across_requests = bool(features & Feature.MUST_TELL_HOST)
        offered_layout = queue_layout(self.offered_features)
        if self._layout != offered_layout:
            log.info(
                "driver declined optional queues: layout %s (offered %s)",
                self._layout.describe(),
                offered_layout.describe(),
            )
        log.info("features negotiated: %#x, queues %s", features, self._layout.describe())
        return True

    def _start_running(self) -> None:
        """DRIVER_OK: buffers queued before it (Linux primes stats) are processed now.

        A transport that drives queues through a :class:`device.runner.QueueRunner` calls
        its ``notify_all()`` after a status write too, for the runner's follow-up work.
        """
        for index in list(self._queues):
            self.queue_notify(index)

    # -- lifecycle: events, for transports that carry no status register ----------------

    def negotiate(self, features: int) -> None:
        """The transport says the driver accepted ``features`` (its FEATURES_OK).

        Starts a new negotiation: ACKNOWLEDGE | DRIVER | FEATURES_OK, not running.

        :raise ConfigError: if a queue still runs, or a feature was not offered.
        """
        if self._queues and self.running:
            raise ConfigError("features changed while queues run (stop the device first)")
        extra = features & ~self.offered_features
        if extra:
            raise ConfigError(f"driver accepted features {extra:#x} that were not offered")
        self._status &= Status.DEVICE_NEEDS_RESET
        self._written_features = features
        self._accept_features(features)
        self._status |= Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK

    def activate(self) -> None:
        """The transport says the driver set DRIVER_OK: service the queues.

        :raise ConfigError: if features were not negotiated first.
        """
        if not self._status & Status.FEATURES_OK:
            raise ConfigError("DRIVER_OK before the features were negotiated")
        if not self._status & Status.DRIVER_OK:
            self.set_status(self._status | Status.DRIVER_OK)

    def stop(self) -> None:
        """The transport stopped the device: the guest keeps its balloon (see the module doc).

        Queues still set up are dropped; a transport that needs their resume
        points calls :meth:`stop_queue` for each first. The status register is
        cleared: the transport negotiates again before it restarts the device.
        """
        for index in list(self._queues):
            self.stop_queue(index)
        self._suspend("the device stopped")
        self._status = Status(0)

    def reset(self) -> None:
        """Device reset: the guest's balloon is gone; the target stays (it is the operator's)."""
        self._queues.clear()
        self._broken.clear()
        self._forget_tracked("the device was reset")
        self._stats.take_held()
        self._stats.stats = GuestStats()
        self.hints.stop()
        self._poison_val = 0
        self._status = Status(0)
        self._written_features = self._driver_features = 0
        self._layout = queue_layout(self.offered_features)
        self._engine.across_requests = False
        self._set_actual(0)

    def _suspend(self, why: str) -> None:
        """No queue runs any more: a VM pause, or a guest reset the transport cannot tell
        from one. Forget the ballooned-frame record and what belonged to the running
        device (DRIVER_OK, a request for reset, broken queues); keep the negotiated
        features, so that the transport's next queue start and :meth:`activate` resume it.
        """
        self._forget_tracked(why)
        self._status &= ~(Status.DRIVER_OK | Status.DEVICE_NEEDS_RESET)
        self._broken.clear()

    def _forget_tracked(self, why: str) -> None:
        if self._engine.ballooned_frames:
            log.info(
                "%s: forgetting %d frames recorded as ballooned (the guest says it holds %d)",
                why,
                self._engine.ballooned_frames,
                self._actual,
            )
        self._engine.forget_balloon()

    # -- memory and queues ----------------------------------------------------------------

    def set_memory(self, mem: GuestMemory | None) -> None:
        """Use ``mem`` as guest RAM (a new table replaces the old one).

        Queues drop their views of the old memory, so the caller may unmap it.
        """
        for q in self._queues.values():
            q.detach()
        self._memory = mem
        self._engine.set_memory(mem)

    def start_queue(self, index: int, queue: SplitQueue) -> None:
        """Service queue ``index`` with ring state ``queue`` (once the device runs).

        :raise ConfigError: if no queue exists at ``index`` with the negotiated features.
        """
        if self._layout.queue_at(index) is None:
            raise ConfigError(f"no queue {index} with features {self._driver_features:#x}")
        queue.event_idx = self.has(Feature.RING_EVENT_IDX)
        queue.indirect = self.has(Feature.RING_INDIRECT_DESC)
        self._queues[index] = queue
        self._broken.discard(index)

    def stop_queue(self, index: int) -> int | None:
        """Stop servicing queue ``index``; return where the driver should resume.

        A stats buffer we hold is given back (the next start sees it again). When
        the last queue stops, the device is stopped: the ballooned-frame record is
        forgotten (the module doc says why).
        """
        q = self._queues.pop(index, None)
        if q is None:
            return None
        head = self._stats.take_held() if self._layout.queue_at(index) is Queue.STATS else None
        if head is not None:
            if q.next_avail == (self._stats_held_at + 1) & 0xFFFF:
                q.undo_pop()  # it was the last chain taken: the next start sees it again
            elif self._memory is not None:
                # Chains were taken after it (a skipped bad chain): it cannot be un-taken,
                # so return it now, with its interrupt; the driver answers with fresh stats.
                try:
                    q.push(self._memory, head, 0)
                    if q.publish(self._memory):
                        self._interrupt(index)
                except RingError as err:
                    log.warning("queue %d: held stats buffer not returned: %s", index, err)
        if not self._queues:
            self._suspend("every queue stopped")
        return q.next_avail

    def break_queue(self, index: int, reason: str) -> None:
        """The driver set up queue ``index`` in a way that cannot work (e.g. misaligned
        rings): stop it and ask for a reset, as for a corrupt ring."""
        self._break(index, RingError(reason))

    def _break(self, index: int, err: RingError) -> None:
        log.error("queue %d is broken, stopping it until reset: %s", index, err)
        self._broken.add(index)
        self.metrics.broken_queues += 1
        self._status |= Status.DEVICE_NEEDS_RESET
        self._config_interrupt()

    # -- config space ---------------------------------------------------------------------

    def _config_bytes(self) -> bytes:
        return _CONFIG.pack(self._num_pages, self._actual, self.hints.cmd_id, self._poison_val)

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
        if offset < 8 and offset + len(data) > 4:
            self._set_actual(actual)
        # Linux writes poison_val in probe, before FEATURES_OK reaches a vhost-user backend:
        # keep it whenever PAGE_POISON is offered; whether it binds is decided per report.
        offered = self.offered_features & Feature.PAGE_POISON
        if offset + len(data) > 12 and offered and poison != self._poison_val:
            self._poison_val = poison
            log.info("guest poison value %#x", poison)

    def _set_actual(self, actual: int) -> None:
        if actual == self._actual:
            return
        self._actual = actual
        # One line per buffer would be per-page spam: info only when the target is met.
        level = logging.INFO if actual == self._num_pages else logging.DEBUG
        log.log(
            level,
            "guest balloon now %d MiB (target %d MiB)",
            actual * FRAME_SIZE >> 20,
            self._num_pages * FRAME_SIZE >> 20,
        )
        for watcher in list(self._actual_watchers):
            watcher(actual)

    def set_num_pages(self, num_pages: int) -> None:
        """Set the balloon target (4 KiB pages the guest should give) and tell the guest.

        :raise ConfigError: if ``num_pages`` does not fit the 32-bit config field.
        """
        if not 0 <= num_pages <= 0xFFFFFFFF:
            raise ConfigError(f"balloon target {num_pages} pages does not fit 32 bits")
        if num_pages != self._num_pages:
            self._num_pages = num_pages
            log.info("balloon target %d MiB", num_pages * FRAME_SIZE >> 20)
            self._config_interrupt()

    def _config_interrupt(self) -> None:
        self.metrics.config_interrupts += 1
        self._interrupts.config()

    def _poison_forbids(self) -> bool:
        return self.has(Feature.PAGE_POISON) and self._poison_val != 0

    # -- stats ----------------------------------------------------------------------------

    @property
    def stats(self) -> GuestStats:
        """The latest statistics from the guest."""
        return self._stats.stats

    def request_stats(self) -> bool:
        """Return the held stats buffer so the guest sends fresh values.

        :return: whether a buffer was held (and so a request went out).
        """
        index = self._layout.index(Queue.STATS)
        if index is None or not self.running:
            return False
        q = self._queues.get(index)
        if q is None or self._memory is None or index in self._broken:
            return False
        head = self._stats.held
        if head is None:
            return False
        try:
            q.push(self._memory, head, 0)
            publish = q.publish(self._memory)
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

    # -- free page hinting ------------------------------------------------------------------

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

    # -- the data path ----------------------------------------------------------------------

    def _interrupt(self, index: int) -> None:
        self.metrics.interrupts += 1
        self._interrupts.queue(index)

    def queue_notify(self, index: int) -> bool:
        """The driver kicked queue ``index``: handle its chains (once the device runs).

        Work per call is bounded by ``kick_budget`` chains; one interrupt at most.
        Guest errors are counted and never escape.

        :return: True if chains remain (call again from the event loop).
        """
        q = self._queues.get(index)
        mem = self._memory
        role = self._layout.queue_at(index)
        if q is None or mem is None or role is None or index in self._broken:
            return False
        if not self.running:
            return False  # buffers wait for DRIVER_OK, which processes every queue
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


__all__ = ["BalloonConfig", "BalloonDevice", "Interrupts", "NullInterrupts"]
