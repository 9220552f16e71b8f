"""The control socket: QEMU's balloon commands, answered by this process over QMP.

QEMU's own ``balloon`` and ``query-balloon`` cannot reach a balloon that lives
in another process (only in-QEMU models register a balloon handler), so this
process answers them itself, in QMP's wire format (:mod:`vballoon.qmp_server`),
so that ``qemu.qmp``, ``qmp-shell`` and scripts written for QEMU work unchanged.
Everything is read from the device's :meth:`~device.BalloonDevice.snapshot`.

Commands (sizes in bytes, pages of 4 KiB; member names are kebab-case as in QMP):

``balloon {"value": int}``
    Ask the guest to shrink or grow to ``value`` bytes of RAM, as QEMU's
    command: ``num_pages = (ram_size - value) >> 12``.
``query-balloon``
    ``{"actual": guest RAM size now}``, as QEMU (the guest's size, not the
    balloon's), from the ``actual`` the guest wrote.
``query-balloon-stats``
    QEMU's ``guest-stats`` shape: ``{"stats": {"stat-...": value or -1},
    "last-update": epoch seconds or 0}`` plus ``"age-seconds"`` (null if none yet).
``query-vballoon``
    Features, queue layout, sizes, free-page-hint state and every device
    counter. Names from the device (queues, ``BalloonMetrics`` fields) are
    given in kebab-case: ``free_page`` becomes ``free-page``.
    ``ballooned-bytes`` is what the guest says its balloon holds;
    ``tracked-bytes`` what the device recorded itself since it last stopped
    (huge-page accumulation; forgotten on every stop, so lower after a VM pause).

Event ``BALLOON_CHANGE {"actual": guest RAM size}`` follows every change of
``actual`` by the guest, throttled like QEMU's: the first at once, then at
most one per ``event_interval`` carrying the latest value.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from device import BalloonDevice, BalloonError, DeviceSnapshot, Feature
from device.defs import FRAME_SIZE, STAT_NAMES
from vballoon.qmp_server import (
    DEVICE_NOT_ACTIVE,
    GENERIC_ERROR,
    Param,
    QmpError,
    QmpServer,
    QmpServerError,
)

#: QEMU's rate limit for BALLOON_CHANGE (monitor_qapi_event_conf): one per second.
BALLOON_CHANGE_INTERVAL = 1.0

NO_MEMORY = "guest memory is not known yet: no frontend has sent its memory table"

__all__ = ["BALLOON_CHANGE_INTERVAL", "NO_MEMORY", "ControlServer", "QmpServerError"]

log = logging.getLogger(__name__)


def _feature_names(bits: int) -> list[str]:
    """Names such as ``stats-vq`` for each set bit (``bit-N`` for unknown ones)."""
    known = {int(f): f.name for f in Feature if f.name is not None}
    out = []
    for bit in range(64):
        if bits >> bit & 1:
            name = known.get(1 << bit)
            out.append(name.lower().replace("_", "-") if name else f"bit-{bit}")
    return out


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _guest_size(ram: int, pages: int) -> int:
    """The guest's RAM size with ``pages`` ballooned; a guest may claim more pages than it
    has, and a size is never negative."""
    return max(0, ram - pages * FRAME_SIZE)


class ControlServer(QmpServer):
    """QMP-compatible control socket for one :class:`BalloonDevice`.

    Commands run in this server's event loop, which must be the device's. The
    ``actual`` watcher may be called from any thread; the event is handed to
    this loop.

    :param path: where to create the Unix socket (mode 0600)
    :param device: the balloon this socket controls
    :param event_interval: least seconds between two BALLOON_CHANGE events (0: no limit)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: BalloonDevice,
        *,
        event_interval: float = BALLOON_CHANGE_INTERVAL,
    ) -> None:
        super().__init__(path, what="control socket")
        self.device = device
        self.event_interval = event_interval
        self._loop_thread = 0
        self._unwatch: Callable[[], None] | None = None
        self._throttle: asyncio.TimerHandle | None = None
        self._pending_actual: int | None = None
        self.register("balloon", self._cmd_balloon, (Param("value", "int"),))
        self.register("query-balloon", self._cmd_query_balloon)
        self.register("query-balloon-stats", self._cmd_query_balloon_stats)
        self.register("query-vballoon", self._cmd_query_vballoon)
        self.register("x-vballoon-trim-zero", self._cmd_trim_zero)

    async def start(self) -> None:
        """Create the socket, then follow the device's ``actual`` for BALLOON_CHANGE.

        :raise QmpServerError: if the socket cannot be created.
        """
        await super().start()
        self._loop_thread = threading.get_ident()
        self._unwatch = self.device.watch_actual(self._actual_changed)

    async def close(self) -> None:
        """Stop following the device, then close the socket (safe to call twice)."""
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self._throttle is not None:
            self._throttle.cancel()
            self._throttle = None
        await super().close()

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- commands ---------------------------------------------------------------------

    def _ram(self, snap: DeviceSnapshot) -> int:
        if snap.ram_size is None:
            raise QmpError(DEVICE_NOT_ACTIVE, NO_MEMORY)
        return snap.ram_size

    def _cmd_trim_zero(self, args: dict[str, Any]) -> object:
        """Punch every all-zero page of guest RAM. Only with the VM paused (``vballoon
        migrate --trim`` pauses the destination around it): experimental, hence ``x-``."""
        try:
            given, frames, secs = self.device.trim_zero_pages()
        except BalloonError as err:
            raise QmpError(DEVICE_NOT_ACTIVE, str(err)) from None
        log.info(
            "trimmed %d MiB of zero pages (%d MiB looked at) in %.0f ms",
            given >> 20,
            frames >> 8,
            secs * 1000,
        )
        return {"bytes": given, "scanned-bytes": frames * 4096, "ms": round(secs * 1000, 1)}

    def _cmd_balloon(self, args: dict[str, Any]) -> object:
        ram = self._ram(self.device.snapshot())
        value: int = args["value"]
        if not 0 < value <= ram:
            raise QmpError(
                GENERIC_ERROR,
                f"Parameter 'value' expects a size in bytes from 1 to the guest RAM size "
                f"({ram}), got {value}",
            )
        try:
            self.device.set_num_pages((ram - value) >> 12)
        except BalloonError as err:
            raise QmpError(GENERIC_ERROR, str(err)) from err
        return {}

    def _cmd_query_balloon(self, args: dict[str, Any]) -> object:
        snap = self.device.snapshot()
        return {"actual": _guest_size(self._ram(snap), snap.actual)}

    def _cmd_query_balloon_stats(self, args: dict[str, Any]) -> object:
        snap = self.device.snapshot()
        return {
            "stats": {name: snap.stats.get(name, -1) for name in STAT_NAMES.values()},
            "last-update": int(snap.stats_updated),
            "age-seconds": None if snap.stats_age is None else round(snap.stats_age, 3),
        }

    def _cmd_query_vballoon(self, args: dict[str, Any]) -> object:
        snap = self.device.snapshot()
        ram = snap.ram_size
        h = snap.hints
        return {
            "features": {
                "offered": f"{snap.offered_features:#x}",
                "offered-names": _feature_names(snap.offered_features),
                "negotiated": f"{snap.driver_features:#x}",
                "negotiated-names": _feature_names(snap.driver_features),
            },
            "status": snap.status,
            "driver-ok": snap.running,
            "queues": {_kebab(k): i for k, i in snap.layout.items()},
            "active-queues": list(snap.active_queues),
            "broken-queues": list(snap.broken_queues),
            "ram-size": ram,
            "num-pages": snap.num_pages,
            "actual-pages": snap.actual,
            "target": None if ram is None else _guest_size(ram, snap.num_pages),
            "actual": None if ram is None else _guest_size(ram, snap.actual),
            "ballooned-bytes": snap.actual * FRAME_SIZE,
            "tracked-bytes": snap.tracked_frames * FRAME_SIZE,
            "poison-val": snap.poison_val,
            "stats-interval": snap.stats_interval,
            "free-page-hint": {
                "state": h.state,
                "cmd-id": h.cmd_id,
                "hinted-frames": h.hinted_frames,
                "ranges": h.ranges,
                "ranges-dropped": h.ranges_dropped,
            },
            "counters": {_kebab(k): v for k, v in snap.counters.items()},
        }

    # -- BALLOON_CHANGE ----------------------------------------------------------------

    def _actual_changed(self, actual: int) -> None:
        """Device watcher, on any thread: queue the event for this loop."""
        mem = self.device.memory
        loop = self.loop
        if not self.running or mem is None or loop is None:
            return
        size = _guest_size(mem.total_size, actual)
        if threading.get_ident() == self._loop_thread:
            self._balloon_changed(size)
        else:
            with contextlib.suppress(RuntimeError):  # the loop is gone
                loop.call_soon_threadsafe(self._balloon_changed, size)

    def _balloon_changed(self, size: int) -> None:
        """Send now, or keep the latest value for the end of the quiet period."""
        if not self.running:
            return
        if self.event_interval <= 0:
            self._broadcast(size)
        elif self._throttle is None:
            self._broadcast(size)
            self._start_quiet_period()
        else:
            self._pending_actual = size

    def _start_quiet_period(self) -> None:
        assert self.loop is not None
        self._throttle = self.loop.call_later(self.event_interval, self._quiet_period_over)

    def _quiet_period_over(self) -> None:
        size, self._pending_actual = self._pending_actual, None
        if size is None:
            self._throttle = None
            return
        self._broadcast(size)
        self._start_quiet_period()

    def _broadcast(self, size: int) -> None:
        self.broadcast("BALLOON_CHANGE", {"actual": size})
