"""``vballoon serve``: the device process.

Wires one :class:`device.BalloonDevice` to the vhost-user transport and the
QMP-compatible control socket on one asyncio loop, then runs until SIGTERM or
SIGINT. A signal is handled between two loop callbacks, so a chain being
processed is finished and its buffer returned before the sockets close.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field

from device import BalloonConfig, BalloonDevice
from vballoon.control import ControlError, ControlServer
from vhost_user import VhostUserDaemon, VhostUserError
from vhost_user.adapter import DetachedInterrupts

log = logging.getLogger("vballoon")


@dataclass
class ServeOptions:
    """What ``vballoon serve`` was asked to do."""

    socket: str
    control: str
    client: bool = False
    busy_poll_us: int = 0
    config: BalloonConfig = field(default_factory=BalloonConfig)


class StartupError(Exception):
    """The process could not start (socket path in use, not writable...)."""


async def serve(opts: ServeOptions) -> int:
    """Run the device until a signal; 0 on a clean shutdown.

    :raise StartupError: if a socket cannot be created.
    """
    loop = asyncio.get_running_loop()
    device = BalloonDevice(opts.config, DetachedInterrupts())
    daemon = VhostUserDaemon(
        device, opts.socket, client=opts.client, busy_poll_us=opts.busy_poll_us
    )
    control = ControlServer(opts.control, device)
    try:
        daemon.start(loop)
    except VhostUserError as err:
        raise StartupError(str(err)) from err
    try:
        await control.start()
    except ControlError as err:
        daemon.close()
        raise StartupError(str(err)) from err
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "vballoon ready: vhost-user %s %s, control socket %s, offering features %#x",
        "connecting to" if opts.client else "listening on",
        opts.socket,
        opts.control,
        device.offered_features,
    )
    await stop.wait()
    log.info("vballoon: signal received, shutting down")
    daemon.close()
    await control.close()
    m = device.metrics
    log.info(
        "vballoon: stopped; %d MiB discarded in %d syscalls, %d errors",
        m.bytes_discarded >> 20,
        m.discard_syscalls,
        m.discard_errors,
    )
    return 0
