"""Runs one device's queues on an asyncio event loop: kicks, bounded work, timers.

Every transport needs the same loop glue, so it lives here once: a reader per
kick eventfd, the device's per-kick budget turned into "call again soon" (so
other fds get their turn), the statistics timer, adaptive polling after work,
and one report per queue that the driver broke. A transport hands over its
kick fds and keeps owning them.

Adaptive polling: a driver that waits for each buffer (Linux's balloon does)
posts the next one a few microseconds after the interrupt, but a process that
went to sleep in between pays a wake-up, and in a VM whose vCPU idled that is
50-100 microseconds, as long as the discards of a 1 MiB buffer. So after work
the queue watches its ring for a while before sleeping, the way KVM's halt
polling does: the window grows (from 10 us, doubling, up to the limit) while
the driver's next kicks come within the limit of the last work, and halves
towards nothing when they come later. A queue whose driver is slow, or idle,
does not spin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable

from device.balloon import BalloonDevice
from device.errors import BalloonError

log = logging.getLogger(__name__)

#: Smallest polling window once polling pays off, in nanoseconds.
POLL_START_NS = 10_000
#: Default limit of the window, in microseconds: KVM's default halt_poll_ns, for the
#: same reason (a vCPU that idles pays tens of microseconds to wake).
DEFAULT_POLL_LIMIT_US = 200


class _Poll:
    """Adaptive polling state of one queue."""

    __slots__ = ("idle_since", "window")

    def __init__(self) -> None:
        #: nanoseconds to watch the ring after work
        self.window = 0
        #: perf_counter_ns when the queue last ran out of work (0: not since the last kick)
        self.idle_since = 0


class QueueRunner:
    """Services a :class:`BalloonDevice`'s queues from ``loop`` (all methods run in it).

    :param device: the device whose queues are kicked
    :param loop: the event loop that watches kick fds and runs timers
    :param busy_poll_us: the longest adaptive polling window after work (module doc);
        0 never polls
    :param on_broken: called once with a queue index when the driver broke that queue
        (vhost-user signals the ring's error eventfd, vfio-user its ERR interrupt)
    """

    def __init__(
        self,
        device: BalloonDevice,
        loop: asyncio.AbstractEventLoop,
        *,
        busy_poll_us: int = 0,
        on_broken: Callable[[int], None] | None = None,
    ) -> None:
        self.device = device
        self.loop = loop
        self.busy_poll_ns = busy_poll_us * 1000
        self.on_broken = on_broken
        self._kicks: dict[int, int] = {}
        self._polls: dict[int, _Poll] = {}
        self._reported_broken: set[int] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def watch(self, index: int, kick_fd: int | None) -> None:
        """Service queue ``index``; ``kick_fd`` (an eventfd, or None) wakes it up."""
        self.unwatch(index)
        self._reported_broken.discard(index)
        self._polls[index] = _Poll()
        if kick_fd is not None:
            os.set_blocking(kick_fd, False)
            self._kicks[index] = kick_fd
            self.loop.add_reader(kick_fd, self._on_kick, index, kick_fd)
        else:
            self._kicks[index] = -1

    def unwatch(self, index: int) -> None:
        """Stop watching queue ``index``'s kick fd (the caller still owns the fd)."""
        self._polls.pop(index, None)
        fd = self._kicks.pop(index, None)
        if fd is not None and fd >= 0:
            self.loop.remove_reader(fd)

    def watched(self) -> list[int]:
        """Indices of the queues being serviced."""
        return list(self._kicks)

    def _on_kick(self, index: int, fd: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(fd)
        self.kick(index)

    def kick(self, index: int) -> None:
        """The driver notified queue ``index`` (an eventfd, or a transport's notify
        message): adapt its polling window, then handle it."""
        poll = self._polls.get(index)
        if poll is not None and poll.idle_since and self.busy_poll_ns:
            # Would a window up to the limit have caught this kick? Then poll longer.
            if time.perf_counter_ns() - poll.idle_since <= self.busy_poll_ns:
                poll.window = min(self.busy_poll_ns, max(2 * poll.window, POLL_START_NS))
            else:
                poll.window //= 2
                if poll.window < POLL_START_NS:
                    poll.window = 0
            poll.idle_since = 0
        self.notify(index)

    def notify(self, index: int) -> None:
        """Handle queue ``index`` now (a kick, or work that may have been missed)."""
        if index not in self._kicks or self._closed:
            return
        q = self.device.queue(index)
        seen = q.next_avail if q is not None else None
        more = self.device.queue_notify(index)
        if not more and q is not None and q.next_avail != seen:
            poll = self._polls[index]
            poll.idle_since = time.perf_counter_ns()
            if poll.window:
                more = self._poll_for_more(index, poll.window)
        if self.device.is_broken(index):
            self.report_broken(index)
        if more:
            self.loop.call_soon(self.notify, index)  # yield to other fds, then go on
        self.schedule_timer()

    def notify_all(self) -> None:
        """Look at every serviced queue soon (e.g. a memory table arrived)."""
        for index in self._kicks:
            self.loop.call_soon(self.notify, index)

    def report_broken(self, index: int) -> None:
        """Tell the transport, once per start of the queue, that the driver broke it."""
        if index in self._reported_broken:
            return
        self._reported_broken.add(index)
        if self.on_broken is not None:
            self.on_broken(index)

    def _poll_for_more(self, index: int, window_ns: int) -> bool:
        """Watch the avail ring for ``window_ns`` after work (module doc); True if the
        driver posted more, which then costs no kick and no wake-up."""
        q = self.device.queue(index)
        mem = self.device.memory
        if q is None or mem is None or self.device.is_broken(index):
            return False
        deadline = time.perf_counter_ns() + window_ns
        try:
            while time.perf_counter_ns() < deadline:
                if q.pending(mem):
                    return True
        except BalloonError:
            return True  # let queue_notify meet (and count) the corrupt ring
        return False

    def schedule_timer(self) -> None:
        """Run the device's timer work and arm the loop for its next deadline."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._closed:
            return
        deadline = self.device.poll()
        if deadline is not None:
            delay = max(0.0, deadline - self.device.clock())
            self._timer = self.loop.call_later(delay, self.schedule_timer)

    def close(self) -> None:
        """Stop watching every fd and cancel the timer."""
        for index in list(self._kicks):
            self.unwatch(index)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._closed = True
