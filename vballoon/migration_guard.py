"""Refuse live migrations of a VM while its balloon is vballoon over vfio-user.

QEMU 11.1 migrates a VM with a ``vfio-user-pci`` device without a word: the
device has no migration state and registers no blocker, so the destination's
guest driver finds a device in reset (no status, no MSI-X routes) and the
balloon is dead for good. Nothing in QEMU can be told to refuse it, so
vballoon does, through a QMP monitor of its own (``serve --qemu-qmp``).

While QEMU's device is attached (a vfio-user client is connected):

1. the guard turns on the ``events`` migration capability (so QEMU reports every
   migration state change) and ``pause-before-switchover`` (so a migration
   stops before the destination takes over and cannot complete without a
   ``migrate-continue``, which the guard never sends while the device is there);
2. on the first MIGRATION event of a migration, and whenever a poll of
   ``query-migrate`` (every :data:`POLL_INTERVAL` seconds, in case an operator
   turned the events off) finds one running, it sends ``migrate_cancel`` and
   logs why and what to do instead;
3. the capabilities are put back whenever they were turned off while no
   migration runs, and the monitor is reconnected if QEMU restarts.

Once the device is gone (QEMU closed the vfio-user socket: an unplug, on a QEMU
whose ``device_del`` of ``vfio-user-pci`` works; 11.1.3 aborts) the guard puts
back the capabilities it turned on, lets migrations run, and continues one it
finds paused before switchover. It puts them back when vballoon stops, too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from qemu.qmp import EventListener, QMPClient, QMPError, Runstate

log = logging.getLogger(__name__)
# qemu.qmp logs every failed connection attempt at ERROR; the guard says it once itself.
logging.getLogger("qemu.qmp.protocol.vballoon-migration-guard").setLevel(logging.CRITICAL + 1)

#: Seconds between two ``query-migrate`` polls.
POLL_INTERVAL = 1.0
#: Seconds between connection attempts while QEMU's monitor is not there.
RETRY_INTERVAL = 0.5
#: Seconds QEMU's monitor has to greet a connection.
CONNECT_TIMEOUT = 5.0
#: Seconds vballoon's shutdown waits to put QEMU's capabilities back.
CLOSE_TIMEOUT = 2.0
#: Migration states in which a migration is still under way (and can be cancelled).
RUNNING_STATES = frozenset(
    {
        "setup",
        "active",
        "pre-switchover",
        "device",
        "wait-unplug",
        "postcopy-active",
        "postcopy-paused",
        "postcopy-recover-setup",
        "postcopy-recover",
    }
)
#: The capabilities the guard holds on.
CAPABILITIES = ("events", "pause-before-switchover")
WHY = (
    "vballoon refused a live migration of this VM: its balloon is a vfio-user device, "
    "whose state QEMU 11.1 does not migrate (the balloon would be dead on the "
    "destination). Unplugging it first is no way out on QEMU 11.1: device_del of a "
    "vfio-user-pci device aborts QEMU (measured; on pcie.0 it is refused). To move this "
    "VM, shut it down and start it on the destination"
)


class MigrationGuard:
    """Watches one QEMU's QMP socket and cancels every migration while the device is there.

    :param path: the QMP socket (a ``-qmp unix:PATH,server=on,wait=off`` of QEMU's)
    :param attached: whether QEMU's device is attached now (a vfio-user client connected)
    """

    def __init__(self, path: str, attached: Callable[[], bool] = lambda: True) -> None:
        self.path = path
        self.attached = attached
        self.connected = False
        #: migrations cancelled
        self.refused = 0
        self._task: asyncio.Task[None] | None = None
        #: a migration is being refused (so that one migration is refused, and logged, once)
        self._refusing = False
        #: the capabilities the guard turned on (and puts back when the device goes)
        self._turned_on: set[str] = set()
        self._wake = asyncio.Event()
        self._qmp: QMPClient | None = None
        self._closing = False

    def start(self) -> None:
        """Begin watching (in the running event loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="migration-guard")

    def device_changed(self) -> None:
        """The device was attached or detached: look again now, not at the next poll."""
        self._wake.set()

    async def close(self) -> None:
        """Stop watching; put back the capabilities the guard turned on (best effort)."""
        self._closing = True  # no re-arming from here on
        qmp = self._qmp
        if qmp is not None and qmp.runstate == Runstate.RUNNING and self._turned_on:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._restore(qmp), CLOSE_TIMEOUT)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        waiting_logged = False
        while True:
            qmp = QMPClient("vballoon-migration-guard")
            try:
                # A monitor held by another client never greets: do not wait for ever.
                await asyncio.wait_for(qmp.connect(self.path), CONNECT_TIMEOUT)
            except (QMPError, OSError, TimeoutError) as err:
                if not waiting_logged:
                    log.info(
                        "migration guard: waiting for QEMU's QMP at %s (%s)",
                        self.path,
                        err or "no greeting",
                    )
                    waiting_logged = True
                with contextlib.suppress(Exception):
                    await qmp.disconnect()
                await asyncio.sleep(RETRY_INTERVAL)
                continue
            waiting_logged = False
            self.connected = True
            self._qmp = qmp
            self._turned_on = set()  # a new QEMU (or monitor) starts from its own settings
            log.info("migration guard: watching QEMU's QMP at %s", self.path)
            try:
                await self._watch(qmp)
            except (QMPError, OSError, EOFError) as err:
                log.info("migration guard: QEMU's monitor went away (%s)", err)
            except Exception:
                # Whatever QEMU answered, the guard must not end silently: log, reconnect.
                log.exception("migration guard: unexpected error; reconnecting")
            finally:
                self.connected = False
                self._qmp = None
                with contextlib.suppress(Exception):
                    await qmp.disconnect()
            await asyncio.sleep(RETRY_INTERVAL)

    async def _watch(self, qmp: QMPClient) -> None:
        events = EventListener(("MIGRATION",))
        with qmp.listen(events):
            await self._poll(qmp)
            while qmp.runstate == Runstate.RUNNING:
                self._wake.clear()
                get = asyncio.ensure_future(events.get())
                wake = asyncio.ensure_future(self._wake.wait())
                done, pending = await asyncio.wait(
                    {get, wake}, timeout=POLL_INTERVAL, return_when=asyncio.FIRST_COMPLETED
                )
                for task in pending:
                    task.cancel()
                if get in done:
                    event: Any = get.result()
                    data: Any = event.get("data")
                    status = str(data.get("status", "")) if isinstance(data, dict) else ""
                    await self._saw(qmp, status)
                else:
                    await self._poll(qmp)

    async def _poll(self, qmp: QMPClient) -> None:
        info: Any = await qmp.execute("query-migrate")
        status = str(info.get("status", "none")) if isinstance(info, dict) else "none"
        await self._saw(qmp, status)
        if status in RUNNING_STATES:
            return
        if self._closing:
            return
        if self.attached():
            await self._arm(qmp)
        elif self._turned_on:
            await self._restore(qmp)

    async def _arm(self, qmp: QMPClient) -> None:
        """Put the capabilities back if they are off (only possible while not migrating)."""
        caps: Any = await qmp.execute("query-migrate-capabilities")
        on = {c["capability"] for c in caps if c.get("state")} if isinstance(caps, list) else set()
        missing = [c for c in CAPABILITIES if c not in on]
        if not missing:
            return
        try:
            await qmp.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": c, "state": True} for c in missing]},
            )
        except QMPError as err:
            log.warning("migration guard: cannot set %s: %s", ", ".join(missing), err)
            return
        self._turned_on.update(missing)
        log.info("migration guard: migration capabilities %s on", ", ".join(missing))

    async def _restore(self, qmp: QMPClient) -> None:
        """Turn off what the guard turned on (the device is gone, or vballoon stops)."""
        names = sorted(self._turned_on)
        try:
            await qmp.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": c, "state": False} for c in names]},
            )
        except QMPError as err:
            log.warning("migration guard: cannot put back %s: %s", ", ".join(names), err)
            return
        self._turned_on.clear()
        log.info(
            "migration guard: the device is not attached; migration capabilities %s "
            "back off, migrations allowed",
            ", ".join(names),
        )

    async def _saw(self, qmp: QMPClient, status: str) -> None:
        if status not in RUNNING_STATES:
            if status == "completed" and self._refusing:
                log.error("migration guard: a migration completed before it could be cancelled")
            self._refusing = False
            return
        if not self.attached():
            if status == "pre-switchover" and "pause-before-switchover" in self._turned_on:
                # Paused by the guard's own capability, with no device left to protect.
                log.info("migration guard: the device is gone; letting the migration finish")
                with contextlib.suppress(QMPError):
                    await qmp.execute("migrate-continue", {"state": "pre-switchover"})
            return
        if not self._refusing:
            self._refusing = True
            self.refused += 1
            log.error("%s (migration state %r: cancelling it)", WHY, status)
        try:
            await qmp.execute("migrate_cancel")
        except QMPError as err:
            log.warning("migration guard: migrate_cancel failed: %s", err)
