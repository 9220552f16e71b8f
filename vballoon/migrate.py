"""``vballoon migrate``: live-migrate a VM whose balloon is vballoon over vhost-user.

QEMU 11.1 refuses to migrate with ``vhost-user-test-device`` attached (it is
unmigratable), so the balloon leaves before the migration and comes back after it:

1. remember the balloon's target (the source vballoon's ``query-balloon``/``query-vballoon``);
2. ``device_del`` the balloon on the source and wait for DEVICE_DELETED. Linux's driver
   gives the balloon back to the guest on removal: the guest migrates at full size;
3. ``migrate-incoming`` on the destination, ``migrate`` on the source, progress lines
   until it completes;
4. on the destination, ``chardev-add`` a socket to the vballoon serving there and
   ``device_add`` the balloon with the source's properties; with ``trim``, once the
   driver is bound: pause, punch every all-zero page of guest RAM, resume;
5. wait until the guest's driver is bound (DRIVER_OK) and set the target again; wait
   until the guest reached it.

If anything before the switchover fails, the balloon is plugged back on the source (to
the source's vballoon, which kept its target: the guest re-inflates) and the command
fails with what went wrong. Every step has a timeout.

Both QEMUs need a QMP monitor this command may use (``-qmp unix:PATH,server=on,wait=off``,
one the launcher is not holding), the same machine (the destination started with
``-incoming defer`` and the balloon's root port, without the balloon), and shared
fd-backed guest RAM. vfio-user cannot take this route on QEMU 11.1.3: its ``device_del``
aborts QEMU (see README).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Any

from qemu.qmp import EventListener, QMPClient, QMPError

#: Migration states after which nothing more happens.
ENDED = frozenset({"completed", "failed", "cancelled"})
#: Device properties copied from the source's balloon to the destination's.
DEVICE_PROPS = ("num_vqs", "vq_size", "config_size", "virtio-id")
#: Seconds between progress lines while migrating.
PROGRESS_INTERVAL = 1.0


class MigrateError(RuntimeError):
    """A step failed; the message says which and what state things were left in."""


@dataclass
class MigrateOptions:
    """What ``vballoon migrate`` is told."""

    source_qmp: str
    dest_qmp: str
    source_control: str
    dest_control: str
    #: the vhost-user socket the destination's vballoon serves
    dest_socket: str
    #: where the destination listens for the migration stream (``unix:PATH``, ``tcp:...``)
    uri: str
    #: the balloon's ``id`` on the source (QEMU's ``-device ...,id=``)
    device_id: str = "vballoon0"
    #: on the destination, once the balloon is back: pause, punch every all-zero page of
    #: guest RAM, resume (the destination wrote every page it received, zeros too)
    trim: bool = False
    unplug_timeout: float = 60.0
    migrate_timeout: float = 600.0
    replug_timeout: float = 120.0


@dataclass
class Balloon:
    """The source's balloon: enough to plug the same one in again."""

    props: dict[str, Any]
    bus: str
    chardev: str
    #: where the source's chardev connects (for a plug back after a failure)
    source_socket: str
    #: the guest size the operator asked for, in bytes (None: never set)
    target: int | None


def progress(msg: str) -> None:
    print(f"vballoon migrate: {msg}", file=sys.stderr, flush=True)


async def _qmp(path: str, what: str) -> QMPClient:
    client = QMPClient(f"vballoon-migrate-{what}")
    try:
        await asyncio.wait_for(client.connect(path), 10)
    except (QMPError, OSError, TimeoutError) as err:
        raise MigrateError(f"cannot connect to {what} at {path}: {err or 'no greeting'}") from None
    return client


async def _run(client: QMPClient, cmd: str, **args: Any) -> Any:
    try:
        return await client.execute(cmd, args or None)
    except QMPError as err:
        where = (client.name or "").removeprefix("vballoon-migrate-")
        raise MigrateError(f"{cmd} on {where}: {err}") from None


async def _wait(what: str, timeout: float, check: Any, interval: float = 0.2) -> Any:
    """Poll the coroutine function ``check`` until it returns something truthy."""
    end = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > end:
            raise MigrateError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


async def _describe(src: QMPClient, src_ctl: QMPClient, device_id: str) -> Balloon:
    path = f"/machine/peripheral/{device_id}"
    props = {}
    for name in DEVICE_PROPS:
        props[name] = await _run(src, "qom-get", path=path, property=name)
    chardev = str(await _run(src, "qom-get", path=path, property="chardev"))
    bus_path = str(await _run(src, "qom-get", path=path, property="parent_bus"))
    bus = bus_path.rstrip("/").rsplit("/", 1)[-1]
    socket_path = ""
    for dev in await _run(src, "query-chardev"):
        if dev.get("label") == chardev:
            # "unix:/path" or "disconnected:unix:/path"
            socket_path = str(dev.get("filename", "")).split("unix:", 1)[-1].split(",")[0]
    if not socket_path:
        raise MigrateError(f"the balloon's chardev {chardev!r} is not a Unix socket")
    info = await _run(src_ctl, "query-vballoon")
    target = info.get("target")
    return Balloon(props, bus, chardev, socket_path, int(target) if target else None)


async def _unplug(qmp: QMPClient, device_id: str, chardev: str, timeout: float) -> None:
    events = EventListener(("DEVICE_DELETED",))
    with qmp.listen(events):
        await _run(qmp, "device_del", id=device_id)

        async def gone() -> bool:
            while not events.empty():
                event: Any = await events.get()
                if event["data"].get("device") == device_id:
                    return True
            return False

        await _wait(f"DEVICE_DELETED of {device_id} (the guest must release it)", timeout, gone)
    await _run(qmp, "chardev-remove", id=chardev)


async def _plug(
    qmp: QMPClient,
    ctl: QMPClient,
    balloon: Balloon,
    socket_path: str,
    device_id: str,
    timeout: float,
    target: int | None,
    trim: dict[str, Any] | None = None,
) -> None:
    """chardev-add + device_add, then DRIVER_OK and the target reached."""
    await _run(
        qmp,
        "chardev-add",
        id=balloon.chardev,
        backend={
            "type": "socket",
            "data": {"addr": {"type": "unix", "data": {"path": socket_path}}, "server": False},
        },
    )
    await _run(
        qmp,
        "device_add",
        driver="vhost-user-test-device-pci",
        id=device_id,
        bus=balloon.bus,
        chardev=balloon.chardev,
        **balloon.props,
    )

    async def bound() -> bool:
        info = await _run(ctl, "query-vballoon")
        return bool(info.get("driver-ok"))

    await _wait("the guest's balloon driver to bind (DRIVER_OK)", timeout, bound)
    if trim is not None:
        trim.update(await _trim(qmp, ctl))
    if target is None:
        return
    await _run(ctl, "balloon", value=target)

    async def reached() -> bool:
        return int((await _run(ctl, "query-balloon"))["actual"]) == target

    await _wait(f"the guest to reach its target {target >> 20} MiB", timeout, reached, 0.5)


async def _trim(qmp: QMPClient, ctl: QMPClient) -> dict[str, Any]:
    """Pause the destination, punch its all-zero pages (it wrote every page it received,
    zeros too), resume it: the pause is downtime the trim adds."""
    t0 = time.monotonic()
    await _run(qmp, "stop")
    try:
        done: dict[str, Any] = await _run(ctl, "x-vballoon-trim-zero")
    finally:
        await _run(qmp, "cont")
    done["paused-ms"] = round((time.monotonic() - t0) * 1000, 1)
    progress(
        f"trimmed {done['bytes'] >> 20} MiB of zero pages on the destination "
        f"(paused {done['paused-ms']:.0f} ms)"
    )
    return done


async def _migrate(src: QMPClient, dst: QMPClient, uri: str, timeout: float) -> dict[str, Any]:
    await _run(dst, "migrate-incoming", uri=uri)
    await _run(src, "migrate", uri=uri)
    end = time.monotonic() + timeout
    last = 0.0
    while True:
        info: dict[str, Any] = await _run(src, "query-migrate")
        status = str(info.get("status", "none"))
        if status in ENDED:
            if status != "completed":
                raise MigrateError(
                    f"the migration {status}: {info.get('error-desc', 'no reason given')}"
                )
            return info
        if time.monotonic() > end:
            await _run(src, "migrate_cancel")
            raise MigrateError(f"the migration took over {timeout:g} s: cancelled")
        if time.monotonic() - last >= PROGRESS_INTERVAL:
            last = time.monotonic()
            ram = info.get("ram", {})
            progress(
                f"{status}: {ram.get('transferred', 0) >> 20} MiB sent, "
                f"{ram.get('remaining', 0) >> 20} MiB to go, "
                f"{ram.get('duplicate', 0)} zero pages"
            )
        await asyncio.sleep(0.1)


async def migrate(opts: MigrateOptions) -> dict[str, Any]:
    """Run the whole route; what ``query-migrate`` said at the end, plus the balloon's.

    :raise MigrateError: on any failure (the source runs on, balloon plugged back, if the
        failure came before the switchover).
    """
    src = await _qmp(opts.source_qmp, "source QMP")
    clients = [src]
    try:
        dst = await _qmp(opts.dest_qmp, "destination QMP")
        clients.append(dst)
        src_ctl = await _qmp(opts.source_control, "source control socket")
        clients.append(src_ctl)
        dst_ctl = await _qmp(opts.dest_control, "destination control socket")
        clients.append(dst_ctl)
        balloon = await _describe(src, src_ctl, opts.device_id)
        shown = "none" if balloon.target is None else f"{balloon.target >> 20} MiB"
        progress(f"balloon {opts.device_id} on bus {balloon.bus}, target {shown}")
        await _unplug(src, opts.device_id, balloon.chardev, opts.unplug_timeout)
        progress("balloon unplugged from the source (the guest took its balloon back)")
        try:
            t0 = time.monotonic()
            info = await _migrate(src, dst, opts.uri, opts.migrate_timeout)
        except MigrateError as err:
            progress(f"{err}; plugging the balloon back into the source")
            try:
                await _plug(
                    src,
                    src_ctl,
                    balloon,
                    balloon.source_socket,
                    opts.device_id,
                    opts.replug_timeout,
                    balloon.target,
                )
            except MigrateError as again:
                raise MigrateError(
                    f"{err}; and plugging the balloon back failed: {again}"
                ) from None
            raise MigrateError(f"{err} (the source runs on with its balloon back)") from None
        progress(
            f"migrated in {time.monotonic() - t0:.1f} s, downtime {info.get('downtime', '?')} ms"
        )
        trim: dict[str, Any] | None = {} if opts.trim else None
        await _plug(
            dst,
            dst_ctl,
            balloon,
            opts.dest_socket,
            opts.device_id,
            opts.replug_timeout,
            balloon.target,
            trim,
        )
        progress(
            "balloon plugged into the destination"
            + (f", guest at {shown}" if balloon.target else "")
        )
        return {"migration": info, "target": balloon.target, "bus": balloon.bus, "trim": trim}
    finally:
        for c in clients:
            with contextlib.suppress(Exception):  # closing is best effort
                await c.disconnect()
