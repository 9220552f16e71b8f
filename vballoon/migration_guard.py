"""Refuse live migrations of a VM whose balloon is vballoon over vfio-user.

QEMU 11.1 migrates a VM with a ``vfio-user-pci`` device without a word: the
device has no migration state and registers no blocker, so the destination's
guest driver finds a device in reset (no status, no MSI-X routes) and the
balloon is dead for good. Nothing in QEMU can be told to refuse it, so
vballoon does, through a QMP monitor of its own (``serve --qemu-qmp``):

1. it turns on the ``events`` migration capability (so QEMU reports every
   migration state change) and ``pause-before-switchover`` (so a migration
   stops before the destination takes over and cannot complete without a
   ``migrate-continue``, which vballoon never sends);
2. on the first MIGRATION event of a migration, and whenever a poll of
   ``query-migrate`` (every :data:`POLL_INTERVAL` seconds, in case an operator
   turned the events off) finds one running, it sends ``migrate_cancel`` and
   logs why and what to do instead;
3. the capabilities are put back whenever they were turned off while no
   migration runs, and the monitor is reconnected if QEMU restarts.

The cancel on the first event comes before QEMU sent any RAM; the paused
switchover is the guarantee behind it if that first reaction came too late.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from qemu.qmp import EventListener, QMPClient, QMPError, Runstate

log = logging.getLogger(__name__)

#: Seconds between two ``query-migrate`` polls.
POLL_INTERVAL = 1.0
#: Seconds between connection attempts while QEMU's monitor is not there.
RETRY_INTERVAL = 0.5
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
    "destination). To move the VM: device_del the vfio-user-pci device, migrate, then "
    "device_add it on the destination with a vballoon serving there"
)


class MigrationGuard:
    """Watches one QEMU's QMP socket and cancels every migration it sees.

    :param path: the QMP socket (a ``-qmp unix:PATH,server=on,wait=off`` of QEMU's)
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.connected = False
        #: migrations cancelled
        self.refused = 0
        self._task: asyncio.Task[None] | None = None
        #: the migration state last seen, so that one migration is refused (and logged) once
        self._refusing = False

    def start(self) -> None:
        """Begin watching (in the running event loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="migration-guard")

    async def close(self) -> None:
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
                await qmp.connect(self.path)
            except (QMPError, OSError) as err:
                if not waiting_logged:
                    log.info("migration guard: waiting for QEMU's QMP at %s (%s)", self.path, err)
                    waiting_logged = True
                await asyncio.sleep(RETRY_INTERVAL)
                continue
            waiting_logged = False
            self.connected = True
            log.info("migration guard: watching QEMU's QMP at %s", self.path)
            try:
                await self._watch(qmp)
            except (QMPError, OSError, EOFError) as err:
                log.info("migration guard: QEMU's monitor went away (%s)", err)
            finally:
                self.connected = False
                with contextlib.suppress(Exception):
                    await qmp.disconnect()
            await asyncio.sleep(RETRY_INTERVAL)

    async def _watch(self, qmp: QMPClient) -> None:
        events = EventListener(("MIGRATION",))
        with qmp.listen(events):
            await self._poll(qmp)
            while qmp.runstate == Runstate.RUNNING:
                try:
                    event: Any = await asyncio.wait_for(events.get(), POLL_INTERVAL)
                except TimeoutError:
                    await self._poll(qmp)
                    continue
                data: Any = event.get("data")
                status = str(data.get("status", "")) if isinstance(data, dict) else ""
                await self._saw(qmp, status)

    async def _poll(self, qmp: QMPClient) -> None:
        info: Any = await qmp.execute("query-migrate")
        status = str(info.get("status", "none")) if isinstance(info, dict) else "none"
        await self._saw(qmp, status)
        if status not in RUNNING_STATES:
            await self._arm(qmp)

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
        log.info("migration guard: migration capabilities %s on", ", ".join(missing))

    async def _saw(self, qmp: QMPClient, status: str) -> None:
        if status not in RUNNING_STATES:
            if status == "completed" and self._refusing:
                log.error("migration guard: a migration completed before it could be cancelled")
            self._refusing = False
            return
        if not self._refusing:
            self._refusing = True
            self.refused += 1
            log.error("%s (migration state %r: cancelling it)", WHY, status)
        try:
            await qmp.execute("migrate_cancel")
        except QMPError as err:
            log.warning("migration guard: migrate_cancel failed: %s", err)
