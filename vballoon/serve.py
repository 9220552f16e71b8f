"""``vballoon serve``: the device process.

Wires one :class:`device.BalloonDevice` to one transport (vhost-user, or
vfio-user with the virtio-pci function) and the QMP-compatible control socket
on one asyncio loop, then runs until SIGTERM or SIGINT. A signal is handled
between two loop callbacks, so a chain being processed is finished and its
buffer returned before the sockets close.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from dataclasses import dataclass, field

from device import BalloonConfig, BalloonDevice
from device.runner import DEFAULT_POLL_LIMIT_US
from vballoon.control import ControlServer, QmpServerError
from vballoon.migration_guard import MigrationGuard
from vballoon.unix_socket import ClaimedSocket, SocketPathError
from vfio_user import VfioUserServer
from vhost_user import VhostUserDaemon
from virtio_pci import VirtioPciFunction

log = logging.getLogger("vballoon")


@dataclass
class ServeOptions:
    """What ``vballoon serve`` was asked to do."""

    socket: str
    control: str
    #: "vhost-user" or "vfio-user"
    transport: str = "vhost-user"
    client: bool = False
    #: QEMU's QMP socket for the migration guard (vfio-user), if any
    qemu_qmp: str | None = None
    busy_poll_us: int = DEFAULT_POLL_LIMIT_US
    config: BalloonConfig = field(default_factory=BalloonConfig)


class StartupError(Exception):
    """The process could not start (socket path in use, not writable...)."""


async def serve(opts: ServeOptions) -> int:
    """Run the device until a signal; 0 on a clean shutdown.

    :raise StartupError: if a socket cannot be created.
    """
    loop = asyncio.get_running_loop()
    device = BalloonDevice(opts.config)
    listener: ClaimedSocket | None = None

    guard: MigrationGuard | None = None

    def connection_event(event: str) -> None:
        # A connection leaves cycles behind (asyncio transports, the adapter's state):
        # collect them when it ends, so a process that serves many VMs in turn stays flat.
        if event == "disconnected":
            gc.collect(1)
        if guard is not None:
            guard.device_changed()  # QEMU's device came or went (device_add / device_del)

    daemon: VhostUserDaemon | VfioUserServer
    if opts.client:
        daemon = VhostUserDaemon(
            device,
            connect_to=opts.socket,
            busy_poll_us=opts.busy_poll_us,
            on_event=connection_event,
        )
    else:
        try:
            listener = ClaimedSocket(opts.socket, f"{opts.transport} socket")
        except SocketPathError as err:
            raise StartupError(str(err)) from err
        if opts.transport == "vfio-user":
            function = VirtioPciFunction(device, loop, busy_poll_us=opts.busy_poll_us)
            daemon = VfioUserServer(function, listener.sock, on_event=connection_event)
        else:
            daemon = VhostUserDaemon(
                device,
                listener=listener.sock,
                busy_poll_us=opts.busy_poll_us,
                on_event=connection_event,
            )
    control = ControlServer(opts.control, device)
    daemon.start(loop)
    try:
        await control.start()
    except QmpServerError as err:
        daemon.close()
        if listener is not None:
            listener.release()
        raise StartupError(str(err)) from err
    if opts.qemu_qmp:
        server = daemon
        guard = MigrationGuard(
            opts.qemu_qmp,
            attached=lambda: isinstance(server, VfioUserServer) and server.conn is not None,
        )
    if guard is not None:
        guard.start()
    elif opts.transport == "vfio-user":
        log.warning(
            "no --qemu-qmp: nothing stops QEMU from migrating this VM, and a migrated "
            "vfio-user balloon is dead on the destination"
        )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "vballoon ready: %s %s %s, control socket %s, offering features %#x",
        opts.transport,
        "connecting to" if opts.client else "listening on",
        opts.socket,
        opts.control,
        device.offered_features,
    )
    await stop.wait()
    log.info("vballoon: signal received, shutting down")
    if guard is not None:
        await guard.close()
    daemon.close()
    if listener is not None:
        listener.release()
    await control.close()
    m = device.metrics
    log.info(
        "vballoon: stopped; %d MiB discarded in %d syscalls, %d errors",
        m.bytes_discarded >> 20,
        m.discard_syscalls,
        m.discard_errors,
    )
    return 0
